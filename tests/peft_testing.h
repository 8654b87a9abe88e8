#pragma once
// Helpers shared by the [peft] and [multi] tests: a tiny model whose prefixes
// and deltas move the logits by much more than float rounding, padded batches,
// per-row losses and tensor comparisons.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "autograd/ops.h"
#include "autograd/tape.h"
#include "nn/gpt.h"

namespace peftlab::peft_testing {

inline GPTConfig tiny_config(int layers = 3) {
    GPTConfig c;
    c.vocab = 48;
    c.d_model = 32;
    c.n_layers = layers;
    c.n_heads = 4;
    c.d_ff = 64;
    c.max_seq = 32;
    return c;
}

// Scales every matrix of the base so that prefixes and deltas change the
// logits clearly (at the init std 0.02 their effect is near float rounding).
inline void sharpen(GPT& model, float factor = 5.f) {
    for (auto& [name, t] : model.named_parameters())
        if (t.ndim() == 2)
            for (int64_t i = 0; i < t.numel(); ++i) Tensor(t).data()[i] *= factor;
}

// Adds N(0, std) noise to every tensor: LoRA's B and BitFit's deltas start at
// zero, and an adapter that does nothing would make equivalences trivial.
inline void perturb(const NamedTensors& tensors, uint64_t seed, float std = 0.3f) {
    Rng rng(seed);
    for (const auto& [name, t] : tensors) {
        float* p = Tensor(t).data();
        for (int64_t i = 0; i < t.numel(); ++i) p[i] += rng.normal(0.f, std);
    }
}

inline std::vector<int32_t> random_tokens(Rng& rng, int64_t n, int64_t vocab) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(rng.below(uint32_t(vocab)));
    return t;
}

// Rows padded to the longest one (plus `extra` slots), on the left (real
// tokens keep positions 0..len-1) or on the right. Padding holds token 0.
inline ModelInput padded_batch(const std::vector<std::vector<int32_t>>& rows, bool left, int64_t extra = 0) {
    ModelInput in;
    in.B = int64_t(rows.size());
    for (auto& r : rows) in.T = std::max(in.T, int64_t(r.size()));
    in.T += extra;
    const size_t T = size_t(in.T);
    in.tokens.assign(rows.size() * T, 0);
    in.positions.assign(rows.size() * T, 0);
    in.valid.assign(rows.size() * T, 0);
    for (size_t b = 0; b < rows.size(); ++b) {
        const size_t start = left ? T - rows[b].size() : 0;
        for (size_t i = 0; i < rows[b].size(); ++i) {
            in.tokens[b * T + start + i] = rows[b][i];
            in.positions[b * T + start + i] = int32_t(i);
            in.valid[b * T + start + i] = 1;
        }
    }
    return in;
}

inline ModelInput single_row(const std::vector<int32_t>& tokens) {
    ModelInput in;
    in.B = 1;
    in.T = int64_t(tokens.size());
    in.tokens = tokens;
    return in;
}

// Index of row b's first real token in a batch padded as padded_batch pads.
inline int64_t first_real(const ModelInput& in, int64_t b) {
    for (int64_t t = 0; t < in.T; ++t)
        if (in.valid.empty() || in.valid[size_t(b * in.T + t)]) return t;
    return in.T;
}

// Sum over batch rows of each row's mean cross-entropy over its targets (-1:
// not counted). Per-row means make the batch loss the sum of the rows' own
// losses, so gradients of a batch equal the sum of its rows' gradients.
inline Tensor sum_of_row_losses(const Tensor& logits, const std::vector<int32_t>& targets) {
    const int64_t B = logits.dim(0), T = logits.dim(1);
    Tensor total;
    for (int64_t b = 0; b < B; ++b) {
        std::vector<int32_t> row(targets.begin() + b * T, targets.begin() + (b + 1) * T);
        Tensor l = cross_entropy(slice(logits, 0, b, b + 1), row, -1);
        total = total.defined() ? add(total, l) : l;
    }
    return total;
}

// lm_loss computed in double from float32 logits [B, T, V] (targets -1 not
// counted): finite differences of it are not limited by the loss's own
// float32 rounding.
inline double mean_cross_entropy_in_double(const Tensor& logits, const std::vector<int32_t>& targets) {
    const int64_t V = logits.dim(logits.ndim() - 1);
    double total = 0;
    int64_t counted = 0;
    for (size_t r = 0; r < targets.size(); ++r) {
        if (targets[r] < 0) continue;
        const float* row = logits.data() + int64_t(r) * V;
        const double top = *std::max_element(row, row + V);
        double sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - top);
        total += top + std::log(sum) - row[targets[r]];
        ++counted;
    }
    return total / double(counted);
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() &&
           (a.numel() == 0 || std::memcmp(a.data(), b.data(), size_t(a.numel()) * sizeof(float)) == 0);
}

inline float max_abs(const Tensor& a) {
    float m = 0.f;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.data()[i]));
    return m;
}

// Largest |a - b| of two tensors with equal numel; +inf if sizes differ.
inline float max_diff(const Tensor& a, const Tensor& b) {
    if (a.numel() != b.numel()) return INFINITY;
    float m = 0.f;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.data()[i] - b.data()[i]));
    return m;
}

// Largest |a - b| between T positions of row a_row of a [B, Ta, V] starting at
// column a_col and those of row b_row of b starting at b_col.
inline float max_diff_rows(const Tensor& a, int64_t a_row, int64_t a_col, const Tensor& b, int64_t b_row,
                           int64_t b_col, int64_t T) {
    const int64_t V = a.dim(2);
    float m = 0.f;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t v = 0; v < V; ++v) {
            float x = a.data()[(a_row * a.dim(1) + a_col + t) * V + v];
            float y = b.data()[(b_row * b.dim(1) + b_col + t) * V + v];
            m = std::max(m, std::fabs(x - y));
        }
    return m;
}

inline NamedTensors clones(const NamedTensors& tensors) {
    NamedTensors out;
    for (const auto& [name, t] : tensors) out.emplace_back(name, t.clone());
    return out;
}

inline int64_t total_numel(const NamedTensors& tensors) {
    int64_t n = 0;
    for (const auto& [name, t] : tensors) n += t.numel();
    return n;
}

inline void zero_grads(const NamedTensors& tensors) {
    for (const auto& [name, t] : tensors) Tensor(t).zero_grad();
}

}  // namespace peftlab::peft_testing
