#include "datasets/batch.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include <fmt/format.h>

#include "nn/json_limits.h"

namespace peftlab::data {

namespace {

Batch empty_batch(int B, int T, int32_t pad_id) {
    Batch b;
    b.B = B;
    b.T = T;
    size_t n = size_t(B) * size_t(T);
    b.tokens.assign(n, pad_id);
    b.targets.assign(n, -1);
    b.valid.assign(n, 0);
    b.positions.assign(n, 0);
    b.source_len.assign(size_t(B), 0);
    return b;
}

void check_max_len(const char* who, int max_len) {
    if (max_len < 1) throw std::invalid_argument(fmt::format("{}: max_len {} must be >= 1", who, max_len));
}

void check_index(const char* who, size_t index, size_t n) {
    if (index >= n) throw std::out_of_range(fmt::format("{}: index {} out of range for {} examples", who, index, n));
}

void append(std::vector<int32_t>& dst, const std::vector<int32_t>& src) { dst.insert(dst.end(), src.begin(), src.end()); }

}  // namespace

std::vector<int32_t> encode_lines(const Tokenizer& tok, std::string_view text) {
    std::vector<int32_t> stream;
    size_t line_no = 0;
    for (size_t start = 0; start < text.size();) {
        size_t end = std::min(text.find('\n', start), text.size());
        std::string_view line = text.substr(start, end - start);
        ++line_no;
        if (line.find_first_not_of(" \t\r\v\f") != std::string_view::npos) {
            stream.push_back(tok.bos_id());
            try {
                append(stream, tok.encode(line));
            } catch (const std::invalid_argument& e) {
                // The line quoted too: the text may be a file's lines reordered
                // (load_text_corpus's splits), whose numbers are not the file's.
                throw std::invalid_argument(fmt::format("line {} of the text ({}): {}", line_no,
                                                        json_excerpt(std::string(line.substr(0, 200)), 60), e.what()));
            }
            stream.push_back(tok.eos_id());
        }
        start = end + 1;
    }
    return stream;
}

Batch make_lm_batch(const std::vector<int32_t>& stream, const std::vector<size_t>& offsets, int T) {
    if (T < 1) throw std::invalid_argument(fmt::format("make_lm_batch: T {} must be >= 1", T));
    Batch b = empty_batch(int(offsets.size()), T, 0);
    for (size_t r = 0; r < offsets.size(); ++r) {
        size_t off = offsets[r];
        if (off + size_t(T) + 1 > stream.size())
            throw std::out_of_range(fmt::format("make_lm_batch: offset {} (row {}) + T {} + 1 runs past the stream of {} tokens",
                                                off, r, T, stream.size()));
        for (int t = 0; t < T; ++t) {
            size_t i = r * size_t(T) + size_t(t);
            b.tokens[i] = stream[off + t];
            b.targets[i] = stream[off + t + 1];
            b.valid[i] = 1;
            b.positions[i] = t;
        }
    }
    return b;
}

Batch make_lm_batch(const std::vector<int32_t>& stream, int B, int T, Rng& rng) {
    if (T < 1 || stream.size() < size_t(T) + 1)
        throw std::invalid_argument(
            fmt::format("make_lm_batch: a stream of {} tokens holds no window of T + 1 = {} tokens", stream.size(), T + 1));
    size_t n_starts = stream.size() - size_t(T);  // offsets 0 .. size - T - 1
    if (n_starts > UINT32_MAX)
        throw std::invalid_argument(fmt::format("make_lm_batch: stream of {} tokens is too long for Rng::below", stream.size()));
    std::vector<size_t> offsets(size_t(std::max(B, 0)));
    for (auto& off : offsets) off = rng.below(uint32_t(n_starts));
    return make_lm_batch(stream, offsets, T);
}

EncodedExample encode_example(const Example& ex, const Tokenizer& tok, int max_len) {
    check_max_len("encode_example", max_len);
    auto source = tok.encode(ex.source);
    const auto sep = tok.encode(kSeparator);
    const auto target = tok.encode(ex.target);

    // Framed length is 1 + source + sep + target + 1; it must be <= max_len + 1.
    const size_t fixed = 1 + sep.size() + target.size() + 1;
    if (fixed > size_t(max_len) + 1)
        throw std::invalid_argument(fmt::format(
            "encode_example: target \"{}\" needs {} tokens with BOS, separator and EOS, more than max_len + 1 = {}",
            ex.target, fixed, max_len + 1));
    const size_t keep = std::min(source.size(), size_t(max_len) + 1 - fixed);

    EncodedExample e;
    e.tokens.reserve(fixed + keep);
    e.tokens.push_back(tok.bos_id());
    e.tokens.insert(e.tokens.end(), source.end() - keep, source.end());
    append(e.tokens, sep);
    e.target_start = e.tokens.size();
    append(e.tokens, target);
    e.tokens.push_back(tok.eos_id());
    return e;
}

Batch make_conditional_batch(const std::vector<Example>& examples, const std::vector<size_t>& indices,
                             const Tokenizer& tok, int max_len, PadSide side) {
    check_max_len("make_conditional_batch", max_len);
    std::vector<EncodedExample> rows;
    size_t T = 0;
    for (size_t idx : indices) {
        check_index("make_conditional_batch", idx, examples.size());
        rows.push_back(encode_example(examples[idx], tok, max_len));
        T = std::max(T, rows.back().tokens.size() - 1);
    }

    Batch b = empty_batch(int(rows.size()), int(T), tok.pad_id());
    for (size_t r = 0; r < rows.size(); ++r) {
        const auto& seq = rows[r].tokens;
        const size_t n = seq.size() - 1;  // inputs of this row
        const size_t pad = side == PadSide::Left ? T - n : 0;
        b.source_len[r] = int32_t(pad + rows[r].target_start);
        for (size_t t = 0; t < n; ++t) {
            size_t i = r * T + pad + t;
            b.tokens[i] = seq[t];
            // Position t predicts seq[t + 1]; count it only if that is a target token or EOS.
            b.targets[i] = t + 1 >= rows[r].target_start ? seq[t + 1] : -1;
            b.valid[i] = 1;
            b.positions[i] = int32_t(t);
        }
    }
    return b;
}

Batch make_prompt_batch(const std::vector<Example>& examples, const std::vector<size_t>& indices,
                        const Tokenizer& tok, int max_len) {
    check_max_len("make_prompt_batch", max_len);
    const auto sep = tok.encode(kSeparator);
    if (1 + sep.size() > size_t(max_len))
        throw std::invalid_argument(fmt::format(
            "make_prompt_batch: max_len {} leaves no room for BOS and the {}-token separator", max_len, sep.size()));

    std::vector<std::vector<int32_t>> rows;
    size_t T = 0;
    for (size_t idx : indices) {
        check_index("make_prompt_batch", idx, examples.size());
        auto source = tok.encode(examples[idx].source);
        size_t keep = std::min(source.size(), size_t(max_len) - 1 - sep.size());
        std::vector<int32_t> row{tok.bos_id()};
        row.insert(row.end(), source.end() - keep, source.end());
        append(row, sep);
        T = std::max(T, row.size());
        rows.push_back(std::move(row));
    }

    Batch b = empty_batch(int(rows.size()), int(T), tok.pad_id());
    for (size_t r = 0; r < rows.size(); ++r) {
        const size_t pad = T - rows[r].size();
        b.source_len[r] = int32_t(T);
        for (size_t t = 0; t < rows[r].size(); ++t) {
            size_t i = r * T + pad + t;
            b.tokens[i] = rows[r][t];
            b.valid[i] = 1;
            b.positions[i] = int32_t(t);
        }
    }
    return b;
}

// ---------------------------------------------------------------- BatchSampler

BatchSampler::BatchSampler(size_t n, size_t batch_size, uint64_t seed, bool drop_last)
    : n_(n), batch_size_(batch_size), seed_(seed), drop_last_(drop_last), order_(n) {
    if (n == 0) throw std::invalid_argument("BatchSampler: dataset is empty");
    if (batch_size == 0) throw std::invalid_argument("BatchSampler: batch_size must be >= 1");
    if (drop_last && batch_size > n)
        throw std::invalid_argument(fmt::format(
            "BatchSampler: with drop_last, batch_size {} > dataset size {} would yield no batch", batch_size, n));
    shuffle();
}

size_t BatchSampler::batches_per_epoch() const { return drop_last_ ? n_ / batch_size_ : (n_ + batch_size_ - 1) / batch_size_; }

void BatchSampler::shuffle() {
    // A fresh stream per epoch: epoch e's order is a function of (seed, e) alone.
    Rng mix(seed_ ^ ((epoch_ + 1) * 0xD1B54A32D192ED03ull));
    Rng rng(mix.next_u64());
    std::iota(order_.begin(), order_.end(), size_t{0});
    for (size_t i = n_ - 1; i > 0; --i) std::swap(order_[i], order_[rng.below(uint32_t(i + 1))]);
}

std::vector<size_t> BatchSampler::next() {
    size_t end = std::min(cursor_ + batch_size_, n_);
    std::vector<size_t> batch(order_.begin() + cursor_, order_.begin() + end);
    cursor_ = end;
    if (cursor_ == n_ || (drop_last_ && n_ - cursor_ < batch_size_)) {
        ++epoch_;
        cursor_ = 0;
        shuffle();
    }
    return batch;
}

Truncate parse_truncate(const std::string& text) {
    if (text == "left") return Truncate::Left;
    if (text == "right") return Truncate::Right;
    if (text == "error") return Truncate::Error;
    throw std::invalid_argument(fmt::format("--truncate: '{}' is not left, right or error", text));
}

void fit_to_context(Task& task, const Tokenizer& tok, int max_len, Truncate mode) {
    const int64_t sep = int64_t(tok.encode(kSeparator).size());
    auto name_of = [&](const Example& ex, size_t i, const char* split) {
        return ex.origin.empty() ? fmt::format("{} {} example {}", task.name, split, i) : ex.origin;
    };
    // `text` in tokens; a tokenizer's refusal of it (ByteTokenizer: a control
    // byte) says where the text is: "data.csv:12: field 'input': ByteTokenizer::encode: ...".
    auto tokens_in = [&](std::string_view text, const auto& where) {
        try {
            return int64_t(tok.encode(text).size());
        } catch (const std::invalid_argument& e) {
            throw std::invalid_argument(fmt::format("{}: {}", where(), e.what()));
        }
    };
    int64_t longest_target = 0;
    for (auto split_examples : {std::pair{"train", &task.train}, {"valid", &task.valid}, {"test", &task.test}}) {
        // Plain names, not structured bindings: the lambdas below capture them (clang 14 cannot capture bindings).
        const char* const split = split_examples.first;
        std::vector<Example>* const examples = split_examples.second;
        DataReport::Split& report = task.report.splits[split];
        // Every source and target in tokens before any example is kept: a text
        // refused is then reported at its own example, not at an earlier one
        // whose references hold it (a training example's references are the
        // targets of every example with its source).
        std::vector<std::pair<int64_t, int64_t>> lengths;  // [examples] (source, target) tokens
        lengths.reserve(examples->size());
        for (size_t i = 0; i < examples->size(); ++i) {
            const Example& ex = (*examples)[i];
            const int64_t src = tokens_in(ex.source, [&] { return name_of(ex, i, split) + ": " + task.source_name; });
            lengths.emplace_back(src, tokens_in(ex.target, [&] { return name_of(ex, i, split) + ": " + task.target_name; }));
        }
        std::vector<Example> kept;
        kept.reserve(examples->size());
        for (size_t i = 0; i < examples->size(); ++i) {
            Example& ex = (*examples)[i];
            const int64_t src = lengths[i].first, tgt = lengths[i].second;
            // Generation's length comes from the examples kept: one left out must not set it.
            auto keep = [&] {
                for (size_t k = 0; k < ex.references.size(); ++k)
                    longest_target = std::max(longest_target, tokens_in(ex.references[k], [&] {
                                                  return fmt::format("{}: {}, reference {} of {}", name_of(ex, i, split),
                                                                     task.target_name, k + 1, ex.references.size());
                                              }));
                longest_target = std::max(longest_target, tgt);
                kept.push_back(std::move(ex));
            };
            // Model inputs of the framed example: BOS + source + sep + target (EOS is only a target).
            const int64_t room = int64_t(max_len) - 1 - sep - tgt;  // source tokens that fit
            if (src <= room) {
                keep();
                continue;
            }
            // A source cut to nothing leaves a target without its input: such an example is left out.
            if (mode == Truncate::Error || room < 1) {
                if (mode == Truncate::Error)
                    throw std::invalid_argument(fmt::format(
                        "{}: the example takes {} tokens framed, more than --seq {} (--truncate left|right cuts its "
                        "source{})",
                        name_of(ex, i, split), 1 + src + sep + tgt, max_len,
                        room < 1 ? "; its target leaves no room for a single source token" : ""));
                ++report.dropped_too_long;
                continue;
            }
            ++report.truncated;
            if (mode == Truncate::Right) {
                // Longest prefix (at a character boundary) whose encoding fits:
                // binary search on the byte length, then step back while it does not.
                auto boundary = [&](size_t n) {
                    while (n > 0 && (static_cast<unsigned char>(ex.source[n]) & 0xC0) == 0x80) --n;
                    return n;
                };
                size_t lo = 0, hi = ex.source.size();
                while (lo < hi) {
                    const size_t mid = boundary(lo + (hi - lo + 1) / 2);
                    if (mid <= lo) break;
                    if (int64_t(tok.encode(std::string_view(ex.source).substr(0, mid)).size()) <= room) lo = mid;
                    else hi = mid - 1;
                }
                lo = boundary(lo);
                while (lo > 0 && int64_t(tok.encode(std::string_view(ex.source).substr(0, lo)).size()) > room)
                    lo = boundary(lo - 1);
                ex.source.resize(lo);
            }
            keep();
        }
        *examples = std::move(kept);
        report.examples = examples->size();  // those kept: the ones left out are counted apart
        if (examples->empty())
            throw std::invalid_argument(fmt::format("{}: no {} example fits --seq {} ({} left out as too long)",
                                                    task.name, split, max_len, report.dropped_too_long));
    }
    if (task.defaults.max_new_tokens == 0) task.defaults.max_new_tokens = int(longest_target + 1);
}

}  // namespace peftlab::data
