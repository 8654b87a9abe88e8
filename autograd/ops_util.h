#pragma once
// Helpers shared by the op implementations (not part of the public API).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/tape.h"

namespace peftlab::detail {

// Normalises a possibly negative axis; error names the op, axis and shape.
inline int norm_axis(const char* op, int axis, int ndim, const Shape& shape) {
    int a = axis < 0 ? axis + ndim : axis;
    if (a < 0 || a >= ndim)
        throw std::invalid_argument(fmt::format("{}: axis {} out of range for shape {}", op, axis, shape_str(shape)));
    return a;
}

inline void require_rank(const char* op, const Tensor& t, int lo, int hi, const char* what) {
    if (t.ndim() < lo || t.ndim() > hi)
        throw std::invalid_argument(fmt::format("{}: {} must have rank {}..{}, got shape {}", op, what, lo, hi,
                                                shape_str(t.shape())));
}

inline void require_defined(const char* op, const Tensor& t, const char* what) {
    if (!t.defined()) throw std::invalid_argument(fmt::format("{}: {} is undefined", op, what));
}

// Product of dims [from, to).
inline int64_t prod(const Shape& s, int from, int to) {
    int64_t n = 1;
    for (int i = from; i < to; ++i) n *= s[size_t(i)];
    return n;
}

// Element-wise loops go parallel only when the work pays for the fork.
inline constexpr int64_t kParallelMin = 32768;

// Softmax of one row of scores s[0..Tk) into p, where only keys j < limit with
// valid[j] != 0 (valid may be null) take part; others get p = 0. A row with no
// allowed key is all zeros. Used by softmax and attention.
inline void masked_softmax_row(float* p, const float* s, int64_t Tk, int64_t limit, const float* valid) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < limit; ++j)
        if (!valid || valid[j] != 0.f) mx = std::max(mx, s[j]);
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < Tk; ++j) p[j] = 0.f;
        return;
    }
    float total = 0.f;
    for (int64_t j = 0; j < Tk; ++j) {
        float e = j < limit && (!valid || valid[j] != 0.f) ? std::exp(s[j] - mx) : 0.f;
        p[j] = e;
        total += e;
    }
    float inv = 1.f / total;
    for (int64_t j = 0; j < Tk; ++j) p[j] *= inv;
}

// Softmax backward for one row: ds = p * (dp - sum(dp * p)) * scale.
inline void softmax_backward_row(float* ds, const float* dp, const float* p, int64_t Tk, float scale) {
    float dot = 0.f;
    for (int64_t j = 0; j < Tk; ++j) dot += dp[j] * p[j];
    for (int64_t j = 0; j < Tk; ++j) ds[j] = p[j] * (dp[j] - dot) * scale;
}

// Row-major GEMM: C[M,N] = alpha * op(A) op(B) + beta * C with leading dims.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace peftlab::detail
