// gemm_small: attention's per-head products as register tiles of our own
// (declared in ops_util.h). OpenBLAS packs both operands and, for beta = 0,
// zeroes C in a pass of its own on every call; a training step's attention
// makes thousands of calls of [32, <= T] x [T, 64] (ops_matmul.cpp), where that
// overhead was ~15% of a small-config step. Here the operands are read where
// they lie: each tile of C (6 rows x 2 vectors) keeps its sums in registers
// over all of K, reading per k one row piece of B and one element of each of
// its 6 rows of op(A).
#include <algorithm>

#include "autograd/ops_util.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include "autograd/intrinsics.h"
#endif

namespace peftlab::detail {
namespace {

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// One vector of W floats with the operations a tile needs; Mask selects the
// first n lanes of a partial vector (C's last columns).
#if defined(__AVX512F__)
struct Lanes {
    using V = __m512;
    using Mask = __mmask16;
    static constexpr int64_t W = 16;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
    static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static Mask mask(int64_t n) { return n >= W ? Mask(0xFFFF) : Mask((1u << n) - 1); }
    // p = alpha * v (+ p): whole, or the lanes in m.
    static void store(float* p, V v, float alpha, bool accumulate) {
        v = _mm512_mul_ps(_mm512_set1_ps(alpha), v);
        _mm512_storeu_ps(p, accumulate ? _mm512_add_ps(v, _mm512_loadu_ps(p)) : v);
    }
    static void store(float* p, V v, float alpha, bool accumulate, Mask m) {
        v = _mm512_mul_ps(_mm512_set1_ps(alpha), v);
        _mm512_mask_storeu_ps(p, m, accumulate ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p)) : v);
    }
};
#else
struct Lanes {
    using V = __m256;
    using Mask = __m256i;
    static constexpr int64_t W = 8;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
    static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static Mask mask(int64_t n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min(n, W))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static void store(float* p, V v, float alpha, bool accumulate) {
        v = _mm256_mul_ps(_mm256_set1_ps(alpha), v);
        _mm256_storeu_ps(p, accumulate ? _mm256_add_ps(v, _mm256_loadu_ps(p)) : v);
    }
    static void store(float* p, V v, float alpha, bool accumulate, Mask m) {
        v = _mm256_mul_ps(_mm256_set1_ps(alpha), v);
        _mm256_maskstore_ps(p, m, accumulate ? _mm256_add_ps(v, _mm256_maskload_ps(p, m)) : v);
    }
};
#endif
using L = Lanes;
constexpr int kTileRows = 6;  // 12 accumulators, two rows of B and a broadcast: 15 of AVX2's 16 registers

// C [MR, 2W] (+)= alpha * A B over k < K, A(r, k) = A[r * ars + k * acs].
// `whole`: all 2W columns exist; else the lanes in m0, m1 (masked loads read
// nothing past C's last column). The r loops are unrolled so that GCC keeps
// the accumulators in registers (not unrolled, it stored them every k).
template <int MR, bool whole>
void tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
          L::Mask m0, L::Mask m1, float alpha, bool accumulate) {
    L::V acc0[MR], acc1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = L::zero();
    for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb;
        const L::V b0 = whole ? L::load(b) : L::load(b, m0);
        const L::V b1 = whole ? L::load(b + L::W) : L::load(b + L::W, m1);
        const float* a = A + k * acs;
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const L::V x = L::broadcast(a + r * ars);
            acc0[r] = L::fma(x, b0, acc0[r]);
            acc1[r] = L::fma(x, b1, acc1[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        float* c = C + r * ldc;
        if (whole) {
            L::store(c, acc0[r], alpha, accumulate);
            L::store(c + L::W, acc1[r], alpha, accumulate);
        } else {
            L::store(c, acc0[r], alpha, accumulate, m0);
            L::store(c + L::W, acc1[r], alpha, accumulate, m1);
        }
    }
}

// All M rows of one column strip of C, kTileRows at a time, then the rest.
template <bool whole>
void strip(int64_t M, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
           int64_t ldc, L::Mask m0, L::Mask m1, float alpha, bool accumulate) {
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows)
        tile<kTileRows, whole>(K, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc, m0, m1, alpha, accumulate);
    const float* a = A + m * ars;
    float* c = C + m * ldc;
    switch (M - m) {
        case 5: tile<5, whole>(K, a, ars, acs, B, ldb, c, ldc, m0, m1, alpha, accumulate); break;
        case 4: tile<4, whole>(K, a, ars, acs, B, ldb, c, ldc, m0, m1, alpha, accumulate); break;
        case 3: tile<3, whole>(K, a, ars, acs, B, ldb, c, ldc, m0, m1, alpha, accumulate); break;
        case 2: tile<2, whole>(K, a, ars, acs, B, ldb, c, ldc, m0, m1, alpha, accumulate); break;
        case 1: tile<1, whole>(K, a, ars, acs, B, ldb, c, ldc, m0, m1, alpha, accumulate); break;
        default: break;
    }
}
static_assert(kTileRows == 6, "strip's switch handles kTileRows - 1 remaining rows");
#endif

}  // namespace

void gemm_small(bool trans_a, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    if (M == 0 || N == 0) return;
    // op(A)(m, k) = A[m * ars + k * acs]
    const int64_t ars = trans_a ? 1 : lda, acs = trans_a ? lda : 1;
    constexpr int64_t strip_cols = 2 * L::W;
    const L::Mask all = L::mask(L::W);
    for (int64_t j = 0; j < N; j += strip_cols) {
        if (N - j >= strip_cols)
            strip<true>(M, K, A, ars, acs, B + j, ldb, C + j, ldc, all, all, alpha, accumulate);
        else
            strip<false>(M, K, A, ars, acs, B + j, ldb, C + j, ldc, L::mask(N - j),
                         L::mask(std::max<int64_t>(N - j - L::W, 0)), alpha, accumulate);
    }
#else
    gemm(trans_a, false, M, N, K, alpha, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
#endif
}

}  // namespace peftlab::detail
