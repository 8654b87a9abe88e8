#pragma once
// Turning token ids into fixed-shape [B, T] batches for training and generation.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "autograd/rng.h"
#include "datasets/task.h"
#include "datasets/tokenizer.h"

namespace peftlab::data {

enum class PadSide { Right, Left };

struct Batch {
    int B = 0, T = 0;
    std::vector<int32_t> tokens;     // [B*T] input ids; pad_id at padding
    std::vector<int32_t> targets;    // [B*T] next-token target of each position, -1 = not counted
                                     //       (padding, or the source part of a conditional example)
    std::vector<uint8_t> valid;      // [B*T] 1 = real token, 0 = padding (attention mask)
    std::vector<int32_t> positions;  // [B*T] position id: real tokens count 0.. from their row's
                                     //       first real token; 0 at padding
    std::vector<int32_t> source_len;  // [B] columns (left padding included) before the row's
                                      //       target: BOS, source and separator; 0 for LM windows
};

// The LM token stream of a text: BOS + encode(line) + EOS for every non-blank
// line, so pretraining sentences are framed like conditional examples. A line
// the tokenizer refuses (ByteTokenizer: a control byte) throws
// std::invalid_argument "line N of the text (\"its start\"): <why>", N
// counting every line of `text`.
std::vector<int32_t> encode_lines(const Tokenizer& tok, std::string_view text);

// Row b is the window stream[offsets[b], offsets[b] + T]: tokens are its first
// T ids, targets its last T. No padding; positions 0..T-1. Throws
// std::out_of_range naming the offset if a window runs past the stream.
Batch make_lm_batch(const std::vector<int32_t>& stream, const std::vector<size_t>& offsets, int T);
// Same, with B offsets drawn uniformly from [0, stream.size() - T - 1] by rng.
Batch make_lm_batch(const std::vector<int32_t>& stream, int B, int T, Rng& rng);

// BOS + encode(source) + encode(kSeparator) + encode(target) + EOS, with
// source tokens dropped from the left (just after BOS) until the framed
// example has at most max_len + 1 tokens, i.e. at most max_len inputs.
// target_start is the index of the first target token. Throws
// std::invalid_argument naming the example if even an empty source is too long.
struct EncodedExample {
    std::vector<int32_t> tokens;
    size_t target_start = 0;
};
EncodedExample encode_example(const Example& ex, const Tokenizer& tok, int max_len);

// One row per examples[indices[b]], framed by encode_example. Inputs are the
// framed tokens but the last, targets the tokens after them; only targets that
// are target tokens or EOS count (the separator's last token predicts the
// first target token), everything else is -1. T is the longest row (<= max_len);
// shorter rows are padded on `side`.
Batch make_conditional_batch(const std::vector<Example>& examples, const std::vector<size_t>& indices,
                             const Tokenizer& tok, int max_len, PadSide side);

// Prompts for generation: BOS + encode(source) + encode(kSeparator), source
// truncated from the left to at most max_len tokens, left padded so every
// row's next token goes in column T. Targets are all -1. Pass
// max_len = context length - tokens to generate.
Batch make_prompt_batch(const std::vector<Example>& examples, const std::vector<size_t>& indices,
                        const Tokenizer& tok, int max_len);

// What fit_to_context does with an example whose framed form (BOS source
// separator target EOS) gives more than max_len model inputs:
//   Left   keep it; encode_example drops source tokens from the left (just
//          after BOS) when it is batched, as for every example;
//   Right  cut its source text at the end (on a UTF-8 character boundary) to
//          the longest prefix that fits;
//   Error  throw std::invalid_argument naming the example (Example::origin),
//          its token count and max_len.
// A target that leaves no room for one source token cannot be cut: the
// example is left out (Left, Right) and counted, or refused (Error).
enum class Truncate { Left, Right, Error };
// "left" | "right" | "error"; throws std::invalid_argument naming the value.
Truncate parse_truncate(const std::string& text);

// Applies `mode` to every split of `task` for a context of max_len tokens,
// counting DataReport::Split::truncated and dropped_too_long per split, and
// sets task.defaults.max_new_tokens when it is 0 (the longest target or
// reference of the examples kept, in tokens, + 1 for EOS). Throws std::invalid_argument when a
// split is left empty, and when the tokenizer refuses a text (ByteTokenizer: a
// control byte), naming the example and the text: "data.csv:12: field 'input': <why>"
// (Task::source_name, target_name; "target, reference 2 of 3" for a further reference).
void fit_to_context(Task& task, const Tokenizer& tok, int max_len, Truncate mode);

// Mini-batches of indices into a dataset of n examples, reshuffled every
// epoch. Epoch e's order depends only on (seed, e), so a run can resume at
// any epoch. With drop_last the final short batch of an epoch is skipped;
// otherwise it is returned as is.
class BatchSampler {
public:
    BatchSampler(size_t n, size_t batch_size, uint64_t seed, bool drop_last = false);

    // The next batch; crosses into the next epoch when this one is done.
    std::vector<size_t> next();
    size_t epoch() const { return epoch_; }          // epoch of the batch next() returns next
    size_t batches_per_epoch() const;

private:
    void shuffle();

    size_t n_, batch_size_;
    uint64_t seed_;
    bool drop_last_;
    size_t epoch_ = 0, cursor_ = 0;
    std::vector<size_t> order_;  // [n] this epoch's permutation
};

}  // namespace peftlab::data
