#pragma once
// Helpers shared by the [peft] and [multi] tests, on top of tests/testing.h:
// a tiny model whose prefixes and deltas move the logits by much more than
// float rounding, per-row losses and tensor comparisons.
#include <algorithm>
#include <cmath>
#include <vector>

#include "autograd/ops.h"
#include "autograd/tape.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "tests/testing.h"

namespace peftlab::peft_testing {

using namespace peftlab::testing;

inline GPTConfig tiny_config(int layers = 3) { return small_gpt(48, 32, layers); }

// Adds N(0, std) noise to every tensor: LoRA's B and BitFit's deltas start at
// zero, and an adapter that does nothing would make equivalences trivial.
inline void perturb(const NamedTensors& tensors, uint64_t seed, float std = 0.3f) {
    Rng rng(seed);
    for (const auto& [name, t] : tensors) {
        float* p = Tensor(t).data();
        for (int64_t i = 0; i < t.numel(); ++i) p[i] += rng.normal(0.f, std);
    }
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

// Logits of `base` with `hooks` installed (null: the bare base), no gradient;
// the hooks are removed again before it returns.
inline Tensor logits_of(GPT& base, ModelHooks* hooks, const ModelInput& in) {
    NoGradGuard no_grad;
    base.set_hooks(hooks);
    Tensor out = base.forward(in);
    base.set_hooks(nullptr);
    return out;
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

// `steps` updates of opt on one fixed batch through base (with whatever hooks
// it has); returns each step's loss, taken before its update.
inline std::vector<float> losses_of_steps(GPT& base, AdamW& opt, const ModelInput& in,
                                          const std::vector<int32_t>& targets, int steps) {
    std::vector<float> losses;
    for (int s = 0; s < steps; ++s) {
        opt.zero_grad();
        Tensor loss = lm_loss(base.forward(in), targets);
        losses.push_back(loss.item());
        backward(loss);
        opt.step();
    }
    return losses;
}

}  // namespace peftlab::peft_testing
