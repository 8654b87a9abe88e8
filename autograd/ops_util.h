#pragma once
// Helpers shared by the op implementations (not part of the public API).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/tape.h"
#include "autograd/threads.h"

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

// Element-wise loops split at kParallelMin elements (threads.h); GEMM-like
// loops of our own at this many multiply-adds. Below it, waking the team costs
// more than it saves (a decoding step's attention), and on a loaded machine a
// team waits for its slowest thread.
inline constexpr int64_t kMacsParallelMin = int64_t(1) << 20;

// d[i] = g(i), or d[i] += g(i) when `add`, for i in [begin, end): a gradient's
// first arrival is written, later ones added (GradCell::target). One loop per
// case: a test inside the loop would keep it from vectorizing.
template <class G>
inline void assign_or_add(float* d, bool add, int64_t begin, int64_t end, const G& g) {
    if (add) {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) d[i] += g(i);
    } else {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) d[i] = g(i);
    }
}

// Stores g(i) for i < n into the gradient held by `cell` (n elements): written
// on its first arrival, added afterwards. No temporary, no memset. Each
// thread takes the range `omp for schedule(static)` would give it. g should
// capture by value: each thread then holds its own copy, whose captured
// pointers the compiler keeps in registers, and the loop vectorizes.
template <class G>
void store_grad(GradCell& cell, int64_t n, const G& g) {
    bool add;
    float* d = cell.target(add);
    parallel_region(n > kParallelMin, [=] {
        const G f = g;
        const detail::Range mine = detail::static_range(n, omp_get_thread_num(), omp_get_num_threads());
        assign_or_add(d, add, mine.begin, mine.end, f);
    });
}

// dst[j] += sum over rows r of term(r * C + j, j) for an [R, C] term. Rows
// are read contiguously in column blocks (threads take whole blocks) and
// added in row order, so the result does not depend on the thread count.
template <class F>
void add_column_sums_of(float* dst, int64_t R, int64_t C, const F& term) {
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (C + kBlock - 1) / kBlock;
    parallel_for(blocks, R * C > kParallelMin, [=](int64_t blk) {
        const int64_t j0 = blk * kBlock, w = std::min(kBlock, C - j0);
        float acc[kBlock] = {};
        for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < w; ++j) acc[j] += term(r * C + j0 + j, j0 + j);
        for (int64_t j = 0; j < w; ++j) dst[j0 + j] += acc[j];
    });
}

// dst[j] += sum over rows r of src[r * C + j], src [R, C] (as add_column_sums_of).
inline void add_column_sums(float* dst, const float* src, int64_t R, int64_t C) {
    add_column_sums_of(dst, R, C, [src](int64_t i, int64_t) { return src[i]; });
}

// e^x in plain arithmetic, so that loops calling it vectorize (libm's expf is
// a call the compiler cannot vectorize without -ffast-math). Cephes' expf:
// x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial, times 2^n built
// in the exponent bits; within 2 ulp of expf. Below -87.3 (where expf turns
// subnormal) the result is 0, exactly as a masked softmax entry needs; above
// 87 it saturates at e^87, which the callers' uses (sigmoid, softmax with the
// row maximum subtracted) allow.
inline float exp_approx(float x_in) {
    const float x = std::min(std::max(x_in, -87.f), 87.f);
    // n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer in float arithmetic.
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    float r = x - n * 0.693359375f;  // ln2 split in two parts (Cody-Waite)
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const float e = p * std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
    return x_in < -87.33f ? 0.f : e;
}

// Sum of f(j) for j < n in kSumLanes interleaved partial sums (lane j mod
// kSumLanes), then those added pairwise in a fixed order. A plain float loop
// may not be reordered without -ffast-math, so it stays scalar; this one is a
// vector of partial sums, and its result depends only on n and the values (not
// on alignment, the caller or the thread count). f may also store element j.
inline constexpr int kSumLanes = 8;
template <class F>
inline float lane_sum(int64_t n, const F& f) {
    float acc[kSumLanes] = {};
    int64_t j = 0;
    for (; j + kSumLanes <= n; j += kSumLanes) {
#pragma omp simd
        for (int l = 0; l < kSumLanes; ++l) acc[l] += f(j + l);
    }
    for (int l = 0; j + l < n; ++l) acc[l] += f(j + l);
    for (int w = kSumLanes / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

namespace softmax_impl {
// masked_softmax_row with the mask test resolved at compile time: a load of
// valid[j] under `valid != nullptr` inside the loop cannot be if-converted,
// which left the whole row scalar.
template <bool kMasked>
inline void row(float* p, const float* s, int64_t Tk, int64_t limit, const float* valid) {
    auto allowed = [valid](int64_t j) { return !kMasked || valid[j] != 0.f; };
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < limit; ++j) mx = std::max(mx, allowed(j) ? s[j] : -INFINITY);
    if (mx == -INFINITY) {
        for (int64_t j = 0; j < Tk; ++j) p[j] = 0.f;
        return;
    }
    // p may be s (in place): element j is read before it is written.
    const float total = lane_sum(limit, [=](int64_t j) {
        const float e = allowed(j) ? exp_approx(s[j] - mx) : 0.f;
        p[j] = e;
        return e;
    });
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t j = 0; j < limit; ++j) p[j] *= inv;
    for (int64_t j = limit; j < Tk; ++j) p[j] = 0.f;
}
}  // namespace softmax_impl

// Softmax of one row of scores s[0..Tk) into p, where only keys j < limit with
// valid[j] != 0 (valid may be null) take part; others get p = 0. A row with no
// allowed key is all zeros. p may equal s. Used by softmax and attention.
inline void masked_softmax_row(float* p, const float* s, int64_t Tk, int64_t limit, const float* valid) {
    if (valid) softmax_impl::row<true>(p, s, Tk, limit, valid);
    else softmax_impl::row<false>(p, s, Tk, limit, nullptr);
}

// Softmax backward for one row: ds = p * (dp - sum(dp * p)) * scale. ds may be dp.
inline void softmax_backward_row(float* ds, const float* dp, const float* p, int64_t Tk, float scale) {
    const float dot = lane_sum(Tk, [=](int64_t j) { return dp[j] * p[j]; });
#pragma omp simd
    for (int64_t j = 0; j < Tk; ++j) ds[j] = p[j] * (dp[j] - dot) * scale;
}

// A Linear's output y [R, out] before its GEMM: the bias rows (counted as
// R * out FLOPs) if bias is defined. Returns the GEMM's beta: 1 to add x W^T
// onto them, 0 to overwrite y.
inline float fill_bias_rows(float* y, const Tensor& bias, int64_t R, int64_t outf) {
    if (!bias.defined()) return 0.f;
    const float* b = bias.data();
    parallel_for(R, R * outf > kParallelMin, [=](int64_t r) {
        for (int64_t j = 0; j < outf; ++j) y[r * outf + j] = b[j];
    });
    flops::add(uint64_t(R * outf));
    return 1.f;
}

// Row-major GEMM: C[M,N] = alpha * op(A) op(B) + beta * C with leading dims.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
#if defined(__AVX512F__)
// gemm() on AVX-512 register tiles of our own, packed and blocked as BLIS
// does (gemm_packed.cpp: why, and its determinism). gemm() takes it for
// every product it does not give gemm_few_rows (x W^T of up to 128 rows with
// the weight read in place, C^T = W x^T). bias [N] (or null) is added
// to every row of C as the tiles are stored: C = alpha op(A) op(B) + beta C
// + bias, the bits of filling C with the bias rows and taking beta = 1.
void gemm_packed(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                 const float* bias = nullptr);
#endif
// A Linear's forward, y [R, out] = x [R, in] W [out, in]^T + bias [out] (if
// defined; counted as R * out FLOPs): the bias added in gemm_packed's
// epilogue, or filled in as rows (fill_bias_rows) under another kernel.
void linear_forward(int64_t R, int64_t outf, int64_t in, const float* x, const float* w, const Tensor& bias, float* y);
// gemm(false, true, ...) with B [N, K] in binary16 (half.h; ldb in halves):
// bit for bit the same as gemm on B converted to float.
void gemm_half_b(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const uint16_t* B,
                 int64_t ldb, float beta, float* C, int64_t ldc);
// C [M, N] = alpha * op(A) B, written over C or (accumulate) added to it;
// op(A) [M, K] is A [M, K] rows lda apart, or (trans_a) the transpose of A
// [K, M]; B [K, N] rows ldb apart. For small products, e.g. attention's
// [32, <= T] x [T, 64] per head: no packing and no zeroing pass (gemm_small.cpp).
// With AVX2 and FMA, each element of C sums its K products in order of k,
// then is scaled by alpha: its bits depend on its row of op(A) and column of B
// only, not on M, N or where C lies. Without: gemm().
void gemm_small(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

}  // namespace peftlab::detail
