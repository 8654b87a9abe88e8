#pragma once
// Decoder-only GPT-style LM: token + learned position embeddings, L pre-LN
// blocks, final LayerNorm, LM head (tied to the token embedding or not).
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "nn/layers.h"

namespace peftlab {

struct GPTConfig {
    int64_t vocab = 256;
    int64_t d_model = 256;
    int n_layers = 4;
    int n_heads = 4;
    int64_t d_ff = 1024;
    int64_t max_seq = 256;
    float dropout = 0.f;
    bool tie_embeddings = false;
    // GPT-2's config.json names: layer_norm_epsilon, and activation_function
    // "gelu_new" (tanh form) or "gelu" (exact x * Phi(x)). Optional in JSON
    // (older checkpoints lack them; the defaults are what they were written with).
    float ln_eps = 1e-5f;
    std::string activation = "gelu_new";

    // Throws std::invalid_argument naming the bad field and value.
    void validate() const;
    nlohmann::json to_json() const;
    static GPTConfig from_json(const nlohmann::json& j);  // validates; names missing/bad keys
    bool operator==(const GPTConfig&) const = default;
};

// One forward's input. Position ids let left-padded rows keep real positions
// 0..T-1; `valid` marks real tokens (padding is never attended).
struct ModelInput {
    int64_t B = 0, T = 0;
    std::vector<int32_t> tokens;     // [B*T]
    std::vector<int32_t> positions;  // [B*T]; empty: 0..T-1 in every row
    std::vector<uint8_t> valid;      // [B*T]; empty: all real
    // [B]: row b's first source_len[b] columns (padding included) are its
    // source and the rest its target, for hooks that place vectors between
    // them (LayerPrefix::visible_from); each in [0, T]. Empty: every column is
    // source, as for a prompt.
    std::vector<int32_t> source_len;
    // Checks sizes, token ids and positions against the config.
    void validate(const GPTConfig& cfg) const;
};

// Keys and values of every layer, appended to in place by each cached forward.
struct KVCache {
    std::vector<LayerCache> layers;
    int64_t B = 0;
    bool empty() const { return layers.empty() || !layers[0].k.defined(); }
};

class GPT : public Module {
    // Declared first: members below are initialised from them.
    GPTConfig cfg_;
    Rng init_rng_;

public:
    // Weights ~ N(0, 0.02^2) (projections into the residual stream scaled by
    // 1/sqrt(2L), as GPT-2); init_std = 0 leaves them zero without drawing
    // (for loaders that overwrite every weight).
    GPT(const GPTConfig& cfg, uint64_t seed, float init_std = 0.02f);

    // logits [B, T, V] for the real tokens of `in` (prepended prompt vectors
    // are dropped from the output). Positions follow the hooks' convention
    // (ModelHooks::position_offset): real tokens sit at in.positions + the
    // row's offset. With a cache, keys/values are appended and
    // hooks' prefixes are only requested on the first (prefill) call. The
    // cache keeps no graph: a cached forward whose keys or values need
    // gradients throws (run it under NoGradGuard).
    Tensor forward(const ModelInput& in, KVCache* cache = nullptr);

    // Logits [B, V] at one column per row: row b's at column columns[b] of
    // `in` (0 <= columns[b] < in.T), as forward(in, cache) would give there.
    // Every position still runs through the blocks (the cache needs their keys
    // and values), but the final LayerNorm and the LM head run on the B
    // selected positions only: generation samples one token per row, and at
    // GPT-2's V = 50257 the head over all T prompt positions is T times the
    // needed work (and a [B, T, V] buffer). Throws std::invalid_argument
    // naming the row for a wrong count or a column outside [0, T).
    Tensor forward_at(const ModelInput& in, const std::vector<int32_t>& columns, KVCache* cache = nullptr);

    // The training loss: lm_loss(forward(in), targets) (targets [B*T], -1 not
    // counted) without materializing the logits: the LM head and the
    // cross-entropy run as one chunked op (linear_cross_entropy, ops_fused.h),
    // same value, gradients and FLOP counts. A hook that adds a delta to the
    // head's output (LoRA on `head`) needs the logits: then the unfused path.
    Tensor loss(const ModelInput& in, const std::vector<int32_t>& targets);

    // Non-owning; null detaches. An adapter calls this to attach itself.
    void set_hooks(ModelHooks* hooks) { hooks_ = hooks; }
    ModelHooks* hooks() const { return hooks_; }

    // Activation recomputation (gradient checkpointing, Chen et al. 2016), per
    // block: blocks[l] with l in `layers` keeps only its input [B, S, C] for
    // backward instead of every activation its ops save, and runs its forward
    // again there (autograd/tape.h checkpoint; the FLOPs count under phase
    // `recompute`). Same loss and gradients, bit for bit; peak activation
    // memory falls by about the chosen blocks' saved activations, and a step
    // costs one more forward of them. Only where the forward records a graph
    // (grad mode on, no KV cache). Empty: none. Throws std::invalid_argument
    // naming a layer outside [0, n_layers) or given twice.
    void set_recompute(const std::vector<int>& layers);
    std::vector<int> recompute() const;  // the chosen layers, ascending

    // F16 weights for inference (autograd/half.h): on, every Linear's weight
    // (the blocks' projections and MLP, and the LM head, tied or not) is
    // rounded to IEEE binary16 now, and forwards that record no graph multiply
    // with those copies (F32 accumulation; embeddings, LayerNorms and biases
    // stay F32): a batch-1 decoding step reads half the weight bytes. Logits
    // are those of the F32 model with its weights so rounded, bit for bit.
    // The copies add 2 bytes per weight and do not follow later changes to
    // the F32 weights (call again after loading or merging). While on, a
    // forward with grad mode on throws std::logic_error (it would train
    // weights the copies no longer match): generate and evaluate under
    // NoGradGuard. Off frees the copies.
    void set_weights_f16(bool on);
    bool weights_f16() const { return weights_f16_; }

    const GPTConfig& config() const { return cfg_; }
    Rng& dropout_rng() { return dropout_rng_; }

    Embedding wte, wpe;
    std::vector<std::unique_ptr<Block>> blocks;
    LayerNorm ln_f;
    std::unique_ptr<Linear> head;  // null when tied to wte

private:
    // forward's body; with targets, returns loss() instead of the logits;
    // with columns, forward_at's logits.
    Tensor run(const ModelInput& in, KVCache* cache, const std::vector<int32_t>* targets,
               const std::vector<int32_t>* columns = nullptr);
    ModelHooks* hooks_ = nullptr;
    Rng dropout_rng_;
    std::vector<bool> recompute_;  // [n_layers], or empty: none
    bool weights_f16_ = false;
    std::shared_ptr<const HalfMatrix> wte_f16_;  // the tied head's weight in F16, or null
};

// Mean cross-entropy over targets != -1 of logits [B, T, V].
Tensor lm_loss(const Tensor& logits, const std::vector<int32_t>& targets);

}  // namespace peftlab
