#pragma once
// Autoregressive generation with a KV cache.
//
// generate() is the whole loop for a batch of prompts. The pieces under it are
// what a server with continuous batching needs: prefill() each arriving request
// (or a group of them), append_rows() it to the running batch, decode_step()
// every row by one token, keep_rows() to drop finished requests, and
// sample_token() to pick tokens.
//
// Prompts of different lengths are LEFT padded: row r of a [B, T] prefill holds
// T - len_r padding slots and then its prompt, whose tokens take positions
// 0..len_r-1, so every row's last prompt token sits in column T-1 and every
// row's next token is fed in the same decode column. Padding is marked invalid
// and never attended. Hooks' prefixes are requested only by prefill (the
// cache is empty then) and enter the cache once; decode steps reuse them.
// Linear deltas (LoRA) run on every call, so a hook that treats batch rows
// differently (e.g. MultiAdapter's rows) must be told the new row order after
// keep_rows / append_rows.
//
// All entry points run without recording gradients and with the model in
// evaluation mode (no dropout); the model's previous mode is restored after.
#include <cstdint>
#include <vector>

#include "autograd/rng.h"
#include "nn/gpt.h"

namespace peftlab {

struct GenerateOptions {
    int max_new_tokens = 32;
    float temperature = 0.f;  // 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    int top_k = 0;            // sample only among the k largest logits; 0: all
    uint64_t seed = 0;        // sampling only; row r draws from its own generator derived from (seed, r)
    int32_t stop_token = -1;  // a row stops after emitting it (it is kept in the output); -1: none
    int32_t pad_token = 0;    // token id placed in padding slots (never attended; must be in the vocabulary)

    // Throws std::invalid_argument naming the option and its value.
    void validate(const GPTConfig& cfg) const;
};

// Sequences decoding together: row r of every cache tensor belongs to sequence r.
struct DecodeBatch {
    KVCache cache;
    std::vector<int32_t> next_position;  // [rows]: position id the next token fed to each row takes
    int64_t rows() const { return int64_t(next_position.size()); }
};

// Runs `prompts` (left padded with pad_token) through the model into a fresh
// `batch` (whatever it held is dropped). Returns the logits [B, V] at each
// row's last prompt token. Errors name the prompt row: empty list, empty
// prompt, prompt longer than max_seq, token outside the vocabulary.
Tensor prefill(GPT& model, DecodeBatch& batch, const std::vector<std::vector<int32_t>>& prompts,
               int32_t pad_token = 0);

// Feeds tokens[r] to row r at its next position and appends its keys and
// values to the cache. Returns logits [rows, V].
Tensor decode_step(GPT& model, DecodeBatch& batch, const std::vector<int32_t>& tokens);

// Keeps the listed rows, in the listed order (e.g. drops finished requests).
// An empty list leaves an empty batch.
void keep_rows(DecodeBatch& batch, const std::vector<int32_t>& rows);

// Appends other's rows after batch's (e.g. a freshly prefilled request). The
// cache with fewer entries is left padded with invalid entries, which no query
// attends, so every row continues exactly as it would alone.
void append_rows(DecodeBatch& batch, const DecodeBatch& other);

// Picks a token from one row of logits [V]. temperature == 0: argmax, the
// lowest id on ties (no draw). Otherwise one draw from softmax(logits /
// temperature) restricted to the top_k largest logits (all if top_k == 0 or
// >= V; ties broken by lower id).
int32_t sample_token(const float* logits, int64_t V, float temperature, int top_k, Rng& rng);

// Continues every prompt by up to max_new_tokens tokens; returns only the new
// tokens of each row. A row that emits stop_token ends with it and grows no
// further. Rows keep their index for the whole call, so a hook that treats
// rows differently (per-row prefixes or deltas) sees the same row order at
// every step. Errors (std::invalid_argument) as prefill(), plus options and a
// prompt whose length + max_new_tokens exceeds max_seq.
std::vector<std::vector<int32_t>> generate(GPT& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opts);

}  // namespace peftlab
