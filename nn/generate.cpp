#include "nn/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/tape.h"

namespace peftlab {

namespace {

void check_token(const char* fn, const char* what, int32_t token, const GPTConfig& cfg) {
    if (token < 0 || token >= cfg.vocab)
        throw std::invalid_argument(
            fmt::format("{}: {} = {} is outside the vocabulary [0, {})", fn, what, token, cfg.vocab));
}

}  // namespace

void GenerateOptions::validate(const GPTConfig& cfg) const {
    if (max_new_tokens < 0)
        throw std::invalid_argument(fmt::format("generate: max_new_tokens = {} must be >= 0", max_new_tokens));
    if (!(temperature >= 0.f) || std::isinf(temperature))
        throw std::invalid_argument(fmt::format("generate: temperature = {} must be finite and >= 0", temperature));
    if (top_k < 0) throw std::invalid_argument(fmt::format("generate: top_k = {} must be >= 0", top_k));
    if (stop_token != -1) check_token("generate", "stop_token", stop_token, cfg);
    check_token("generate", "pad_token", pad_token, cfg);
}

Tensor prefill(GPT& model, DecodeBatch& batch, const std::vector<std::vector<int32_t>>& prompts, int32_t pad_token) {
    const GPTConfig& cfg = model.config();
    if (prompts.empty()) throw std::invalid_argument("prefill: no prompts given");
    check_token("prefill", "pad_token", pad_token, cfg);
    size_t T = 0;
    for (size_t r = 0; r < prompts.size(); ++r) {
        const auto& p = prompts[r];
        if (p.empty()) throw std::invalid_argument(fmt::format("prefill: prompt {} is empty", r));
        if (int64_t(p.size()) > cfg.max_seq)
            throw std::invalid_argument(
                fmt::format("prefill: prompt {} has {} tokens, more than max_seq = {}", r, p.size(), cfg.max_seq));
        for (size_t i = 0; i < p.size(); ++i)
            if (p[i] < 0 || p[i] >= cfg.vocab)
                throw std::invalid_argument(fmt::format("prefill: prompt {} token {} = {} is outside the vocabulary [0, {})",
                                                        r, i, p[i], cfg.vocab));
        T = std::max(T, p.size());
    }
    const size_t B = prompts.size();
    ModelInput in;
    in.B = int64_t(B);
    in.T = int64_t(T);
    in.tokens.assign(B * T, pad_token);
    in.positions.assign(B * T, 0);
    in.valid.assign(B * T, 0);
    batch = DecodeBatch{};
    batch.next_position.resize(B);
    for (size_t r = 0; r < B; ++r) {
        const auto& p = prompts[r];
        const size_t pad = T - p.size();
        for (size_t i = 0; i < p.size(); ++i) {
            in.tokens[r * T + pad + i] = p[i];
            in.positions[r * T + pad + i] = int32_t(i);
            in.valid[r * T + pad + i] = 1;
        }
        batch.next_position[r] = int32_t(p.size());
    }
    EvalScope eval(model);
    NoGradGuard no_grad;
    // Every row's last prompt token sits in column T-1 (left padding): the
    // head runs there only.
    return model.forward_at(in, std::vector<int32_t>(B, int32_t(T - 1)), &batch.cache);
}

Tensor decode_step(GPT& model, DecodeBatch& batch, const std::vector<int32_t>& tokens) {
    const GPTConfig& cfg = model.config();
    const int64_t B = batch.rows();
    if (B == 0 || batch.cache.empty()) throw std::invalid_argument("decode_step: the batch is empty; prefill first");
    if (int64_t(tokens.size()) != B)
        throw std::invalid_argument(
            fmt::format("decode_step: {} tokens given for a batch of {} rows", tokens.size(), B));
    for (int64_t r = 0; r < B; ++r) {
        if (tokens[size_t(r)] < 0 || tokens[size_t(r)] >= cfg.vocab)
            throw std::invalid_argument(fmt::format("decode_step: row {} token {} is outside the vocabulary [0, {})",
                                                    r, tokens[size_t(r)], cfg.vocab));
        if (batch.next_position[size_t(r)] >= cfg.max_seq)
            throw std::invalid_argument(fmt::format("decode_step: row {} would take position {}, max_seq = {}", r,
                                                    batch.next_position[size_t(r)], cfg.max_seq));
    }
    ModelInput in;
    in.B = B;
    in.T = 1;
    in.tokens = tokens;
    in.positions = batch.next_position;
    EvalScope eval(model);
    NoGradGuard no_grad;
    Tensor logits = model.forward_at(in, std::vector<int32_t>(size_t(B), 0), &batch.cache);  // [B, V], no copy
    for (auto& p : batch.next_position) ++p;
    return logits;
}

void keep_rows(DecodeBatch& batch, const std::vector<int32_t>& rows) {
    for (size_t i = 0; i < rows.size(); ++i)
        if (rows[i] < 0 || rows[i] >= batch.rows())
            throw std::invalid_argument(
                fmt::format("keep_rows: rows[{}] = {} is outside the batch of {} rows", i, rows[i], batch.rows()));
    if (rows.empty()) {
        batch = DecodeBatch{};
        return;
    }
    NoGradGuard no_grad;
    for (LayerCache& lc : batch.cache.layers) {  // whole rows: the room to grow comes along
        lc.k = index_rows(lc.k, rows);
        lc.v = index_rows(lc.v, rows);
        lc.valid = index_rows(lc.valid, rows);
    }
    std::vector<int32_t> next(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) next[i] = batch.next_position[size_t(rows[i])];
    batch.next_position = std::move(next);
    batch.cache.B = int64_t(rows.size());
}

void append_rows(DecodeBatch& batch, const DecodeBatch& other) {
    if (other.rows() == 0) return;
    if (batch.rows() == 0) {
        batch = other;
        return;
    }
    if (batch.cache.layers.size() != other.cache.layers.size())
        throw std::invalid_argument(fmt::format("append_rows: caches of {} and {} layers (different models?)",
                                                batch.cache.layers.size(), other.cache.layers.size()));
    for (size_t l = 0; l < batch.cache.layers.size(); ++l) {
        LayerCache& a = batch.cache.layers[l];
        const LayerCache& b = other.cache.layers[l];
        if (a.k.dim(2) != b.k.dim(2))
            throw std::invalid_argument(fmt::format("append_rows: layer {} caches {} and {} differ in width", l,
                                                    shape_str(a.k.shape()), shape_str(b.k.shape())));
        // a's rows, then b's, each right-aligned at the longer length; the
        // free room on the left stays zeros and invalid.
        const int64_t Tk = std::max(a.length, b.length);
        LayerCache c = LayerCache::with_room(a.k.dim(0) + b.k.dim(0), std::max({Tk, a.capacity(), b.capacity()}),
                                             a.k.dim(2));
        c.place(a, 0, Tk - a.length);
        c.place(b, a.k.dim(0), Tk - b.length);
        c.length = Tk;
        a = std::move(c);
    }
    batch.next_position.insert(batch.next_position.end(), other.next_position.begin(), other.next_position.end());
    batch.cache.B = batch.rows();
}

int32_t sample_token(const float* logits, int64_t V, float temperature, int top_k, Rng& rng) {
    if (V < 1) throw std::invalid_argument(fmt::format("sample_token: V = {} must be >= 1", V));
    if (temperature == 0.f) return int32_t(std::max_element(logits, logits + V) - logits);
    if (!(temperature > 0.f) || top_k < 0)
        throw std::invalid_argument(
            fmt::format("sample_token: temperature = {} must be >= 0 and top_k = {} >= 0", temperature, top_k));
    const int64_t k = top_k == 0 ? V : std::min<int64_t>(top_k, V);
    std::vector<int32_t> ids(static_cast<size_t>(V));
    std::iota(ids.begin(), ids.end(), 0);
    // Candidates: the k largest logits, ties to the lower id, so the result
    // does not depend on the sort implementation.
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    std::vector<double> w(static_cast<size_t>(k));
    double total = 0.0;
    for (int64_t i = 0; i < k; ++i) {
        w[size_t(i)] = std::exp((double(logits[ids[size_t(i)]]) - double(logits[ids[0]])) / double(temperature));
        total += w[size_t(i)];
    }
    double u = double(rng.next_u64() >> 11) * (1.0 / 9007199254740992.0) * total;  // [0, total)
    for (int64_t i = 0; i < k; ++i) {
        u -= w[size_t(i)];
        if (u < 0.0) return ids[size_t(i)];
    }
    return ids[size_t(k - 1)];  // rounding left u just above 0
}

std::vector<std::vector<int32_t>> generate(GPT& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opts) {
    const GPTConfig& cfg = model.config();
    opts.validate(cfg);
    if (prompts.empty()) throw std::invalid_argument("generate: no prompts given");
    for (size_t r = 0; r < prompts.size(); ++r)
        if (int64_t(prompts[r].size()) + opts.max_new_tokens > cfg.max_seq)
            throw std::invalid_argument(
                fmt::format("generate: prompt {} has {} tokens; with max_new_tokens = {} that exceeds max_seq = {}", r,
                            prompts[r].size(), opts.max_new_tokens, cfg.max_seq));
    const size_t B = prompts.size();
    std::vector<std::vector<int32_t>> out(B);

    DecodeBatch batch;
    Tensor logits = prefill(model, batch, prompts, opts.pad_token);  // validates the prompts
    if (opts.max_new_tokens == 0) return out;

    // Row r's generator depends only on (seed, r), so a row samples the same
    // tokens whatever the other rows do.
    Rng seeder(opts.seed);
    std::vector<Rng> rngs;
    for (size_t r = 0; r < B; ++r) rngs.emplace_back(seeder.next_u64());

    const int64_t V = cfg.vocab;
    std::vector<bool> done(B, false);
    std::vector<int32_t> fed(B, opts.pad_token);
    for (int step = 0; step < opts.max_new_tokens; ++step) {
        bool all_done = true;
        for (size_t r = 0; r < B; ++r) {
            if (done[r]) continue;  // keeps being fed pad_token; its logits are ignored
            int32_t t = sample_token(logits.data() + int64_t(r) * V, V, opts.temperature, opts.top_k, rngs[r]);
            out[r].push_back(t);
            fed[r] = t;
            done[r] = t == opts.stop_token;
            all_done = all_done && done[r];
        }
        if (all_done || step + 1 == opts.max_new_tokens) break;
        logits = decode_step(model, batch, fed);
    }
    return out;
}

}  // namespace peftlab
