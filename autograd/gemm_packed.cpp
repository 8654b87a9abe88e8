// gemm_packed: the Linear layers' and the LM head's GEMMs on AVX-512 register
// tiles of our own (declared in ops_util.h), blocked and packed as in Goto &
// van de Geijn, "Anatomy of High-Performance Matrix Multiplication" (TOMS
// 2008) and BLIS (Van Zee & van de Geijn, TOMS 2015).
//
// Why not OpenBLAS: Debian's OpenBLAS 0.3.21 does not know AMD Zen 5 and runs
// its Haswell (AVX2) kernel there, at most 32 flops per cycle, while the core
// issues two 512-bit FMAs per cycle (64). On a 2-core Zen 5 these tiles ran
// the training shapes (e.g. [4096, 768] x [768, 3072]) at 1.5-1.8x
// cblas_sgemm's GFLOP/s, 1 and 2 threads (`make bench` reports both peaks).
// Without AVX-512 gemm() keeps calling cblas_sgemm.
//
// Loops, outermost first: columns of C in blocks of kNC; K in blocks of kKC,
// for which the threads pack op(B) [kKC, kNC] together into column panels of
// kNR (each panel k-major: kNR floats per k); each thread then takes its own
// share of C (the panels it packed, or with many rows its own rows), packs
// op(A) [kMC, kKC] of those rows into row panels of kMR (kMR floats per k),
// and the micro-kernel multiplies one A panel by one B panel, keeping a
// [kMR, kNR] tile of C in 28 registers over the whole kKC. A product of at
// most kWeightAsAMaxRows rows with a transposed B (x W^T: a prefill) swaps
// the roles instead and reads B where it lies (gemm_weight_as_a).
//
// Determinism: every element of C sums its products in order of k, in blocks
// of kKC added to C in order, whatever M, N, the element's position or the
// thread count: a row alone gives the bits it gives in a batch, and 1 and 2
// threads give the same bits.
#include <algorithm>
#include <cstdlib>
#include <memory>

#include <omp.h>

#include "autograd/ops_util.h"
#include "autograd/threads.h"

#if defined(__AVX512F__)
#include "autograd/intrinsics.h"

namespace peftlab::detail {
namespace {

constexpr int64_t kMR = 14;   // rows of a C tile: 14 x 2 accumulators + 2 of B + 1 broadcast of 32 registers
constexpr int64_t kNR = 32;   // columns of a C tile: two 16-float vectors
constexpr int64_t kKC = 384;  // depth of a block: an A panel (21 KiB) and B panel (48 KiB) per tile
constexpr int64_t kMC = 168;  // rows of a thread's packed A block (252 KiB, in L2)
constexpr int64_t kNC = 3072; // columns of the shared packed B block (4.5 MiB)
static_assert(kMC % kMR == 0, "an A block is whole panels");
static_assert(kNC % kNR == 0, "a B block is whole panels");
// Rows of A up to which x W^T takes gemm_weight_as_a. Against packing W, at
// GPT-2 small's weights (2 threads, Emerald Rapids guest, minima of two
// alternating runs): 64 rows 1.2-1.9x faster, 128 rows 1.1-1.6x, 256 rows
// within the host's noise either way.
constexpr int64_t kWeightAsAMaxRows = 128;

// 64-byte aligned scratch that grows and is kept: one per thread (A) and per
// calling thread (B), so concurrent callers never share one.
struct Scratch {
    mem::Buffer<float> p{nullptr, &std::free};
    size_t cap = 0;
    float* get(size_t n) {
        if (n > cap) {
            const size_t rounded = (n + 15) / 16 * 16;  // whole 64-byte lines
            p = mem::alloc_array<float>(rounded);
            if (!p) throw std::bad_alloc();
            cap = rounded;
        }
        return p.get();
    }
};

// The first n of a vector's 16 lanes (none for n <= 0, all for n >= 16).
inline __mmask16 lanes(int64_t n) { return __mmask16((1u << std::clamp<int64_t>(n, 0, 16)) - 1); }
// d [0, width) = s [0, valid), then zeros, for 0 <= valid <= width <= 32: a
// panel's row (kNR or kMR floats), padded to a tile, in one or two masked
// 16-float moves. As std::copy_n + std::fill it was a memmove call per row of
// 56 or 128 bytes (and a memset for a partial panel's rows): 6% of a
// small-config full training step's samples were memmove, most of it here.
// Weight-gradient products dY^T X at the small config's shapes
// ([2048, 768]^T [2048, 256], [2048, 1024]^T [2048, 256]; 2 threads, Emerald
// Rapids guest, best of 10 alternating runs of 60) took 3.02 and 3.84 ms
// instead of 3.24 and 3.96 (their A^T packed 56 bytes per row); dY W (B
// packed 128 bytes per row) and x W^T (no such copy) were unchanged.
inline void copy_padded(const float* s, int64_t valid, int64_t width, float* d) {
    for (int64_t o = 0; o < width; o += 16) {
        const float* from = valid > o ? s + o : s;  // s + o may lie past the row; its load is all masked
        _mm512_mask_storeu_ps(d + o, lanes(width - o), _mm512_maskz_loadu_ps(lanes(valid - o), from));
    }
}

// r[i][j] <- r[j][i]: a 16 x 16 block of floats transposed in registers
// (unpack pairs of rows, then shuffle pairs, then 128-bit lanes twice).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

// dst [kc, kNR] (k-major) = op(B)[pc : pc + kc, j0 : j0 + w], zero past w.
void pack_b(bool trans_b, const float* B, int64_t ldb, int64_t pc, int64_t kc, int64_t j0, int64_t w, float* dst) {
    if (!trans_b) {
        for (int64_t k = 0; k < kc; ++k) copy_padded(B + (pc + k) * ldb + j0, w, kNR, dst + k * kNR);
        return;
    }
    // op(B)(k, n) = B[n, k]: B's rows read contiguously, 16 k at a time, and
    // transposed in registers 16 rows at a time. A store per element instead
    // (stride kNR floats) was slower than the micro-kernel at 64 rows of A
    // (a prefill): 20% of the samples against its 17%.
    const int64_t k16 = kc - kc % 16;
    for (int64_t n0 = 0; n0 < kNR; n0 += 16) {
        const float* s[16];
        for (int64_t i = 0; i < 16; ++i) s[i] = n0 + i < w ? B + (j0 + n0 + i) * ldb + pc : nullptr;
        for (int64_t k = 0; k < k16; k += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) r[i] = s[i] ? _mm512_loadu_ps(s[i] + k) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + (k + i) * kNR + n0, r[i]);
        }
        for (int64_t k = k16; k < kc; ++k)
            for (int64_t i = 0; i < 16; ++i) dst[k * kNR + n0 + i] = s[i] ? s[i][k] : 0.f;
    }
}

// An A panel: op(A)[r0 : r0 + h, pc : pc + kc], zero past row h. With
// trans_a k-major, dst [kc, kMR]: a row of A holds one k's kMR values. Else
// row-major, dst [kMR, kKC]: each row of A copied as it lies (a vectorized
// copy; transposing it to k-major took a scalar store per element and was
// half of all packing time), the micro-kernel reading kMR rows kKC apart.
void pack_a(bool trans_a, const float* A, int64_t lda, int64_t pc, int64_t kc, int64_t r0, int64_t h, float* dst) {
    if (trans_a) {  // op(A)(m, k) = A[k, m]
        for (int64_t k = 0; k < kc; ++k) copy_padded(A + (pc + k) * lda + r0, h, kMR, dst + k * kMR);
        return;
    }
    for (int64_t r = 0; r < kMR; ++r) {
        float* d = dst + r * kKC;
        if (r < h) std::copy_n(A + (r0 + r) * lda + pc, kc, d);
        else std::fill_n(d, kc, 0.f);
    }
}

// c0[r] and c1[r] (a tile's row r, columns 0-15 and 16-31) = the sum over
// k < kc of a(r, k) b[k], b [kc, kNR] a packed B panel, in order of k.
template <class AtRowK>
inline void tile_products(int64_t kc, const AtRowK& a, const float* __restrict b, __m512 c0[kMR], __m512 c1[kMR]) {
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 16
        for (int r = 0; r < kMR; ++r) {
            const __m512 x = _mm512_set1_ps(a(r, k));
            c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
        }
        b += kNR;
    }
}

// C [mr, nr] = alpha * a b + (first ? beta * C + bias : C), a an A panel
// (pack_a; a_rows: row-major), b [kc, kNR] packed, bias [nr] or null;
// beta == 0 reads nothing of C (it may hold NaN).
template <bool a_rows>
void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* C, int64_t ldc,
                  float alpha, float beta, const float* bias, bool first, int64_t mr, int64_t nr) {
    __m512 c0[kMR], c1[kMR];
    tile_products(kc, [a](int r, int64_t k) { return a_rows ? a[r * kKC + k] : a[k * kMR + r]; }, b, c0, c1);
    const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    const bool add = !first || beta != 0.f;
    const bool add_bias = first && bias;
    const __m512 bias0 = add_bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = add_bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
        if (r >= mr) break;
        float* p = C + r * ldc;
        __m512 v0 = _mm512_mul_ps(va, c0[r]), v1 = _mm512_mul_ps(va, c1[r]);
        if (add) {
            __m512 o0 = _mm512_maskz_loadu_ps(m0, p), o1 = _mm512_maskz_loadu_ps(m1, p + 16);
            if (first && beta != 1.f) o0 = _mm512_mul_ps(vb, o0), o1 = _mm512_mul_ps(vb, o1);
            v0 = _mm512_add_ps(v0, o0);
            v1 = _mm512_add_ps(v1, o1);
        }
        if (add_bias) v0 = _mm512_add_ps(v0, bias0), v1 = _mm512_add_ps(v1, bias1);
        _mm512_mask_storeu_ps(p, m0, v0);
        _mm512_mask_storeu_ps(p + 16, m1, v1);
    }
}

// The same tile transposed, for few rows of x against a weight W [N, K]
// read where it lies (gemm_weight_as_a): the accumulators hold C^T [kMR
// columns n, kNR rows m] = W[n0 : n0 + kMR] x^T, each W row a broadcast stream
// (w[r][k]), x^T packed as a B panel. The tile is transposed
// in registers and stored as micro_kernel stores its own: C [mr rows, nr
// columns] = alpha * c + (first ? bias : C), the same arithmetic per element
// (each product W[n, k] x[m, k] is x[m, k] W[n, k]), so C has micro_kernel's
// bits. Rows of W past nr are not read (w[r] repeats a valid row).
void micro_kernel_t(int64_t kc, const float* const w[kMR], const float* __restrict b, float* C, int64_t ldc,
                    float alpha, const float* bias, bool first, int64_t mr, int64_t nr) {
    __m512 c0[kMR], c1[kMR];
    tile_products(kc, [w](int r, int64_t k) { return w[r][k]; }, b, c0, c1);
    const __mmask16 mask = lanes(nr);
    const __m512 va = _mm512_set1_ps(alpha);
    const __m512 vbias = first && bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    for (int half = 0; half < 2; ++half) {  // rows m of C [16 * half, 16 * half + 16)
        __m512 t[16];
        for (int r = 0; r < 16; ++r) t[r] = r < kMR ? (half ? c1[r] : c0[r]) : _mm512_setzero_ps();
        transpose16(t);  // t[j]: row m = 16 * half + j of C, its lanes the tile's columns n
        for (int j = 0; j < 16 && 16 * half + j < mr; ++j) {
            float* p = C + (16 * half + j) * ldc;
            __m512 v = _mm512_mul_ps(va, t[j]);
            if (!first) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p));
            else if (bias) v = _mm512_add_ps(v, vbias);
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

thread_local Scratch packed_a, packed_b;

// C [M, N] = alpha * A B^T + bias for few rows of A [M, K] (lda) against B
// [N, K] (ldb), beta = 0: the product of a prefill's or a short batch's
// tokens with a Linear weight. gemm_packed's way transposes all of B into
// panels on every call, a read and a write of the whole weight for only M
// uses of each element: with GPT-2 small's weights and 64 rows that packing
// took 24% of a prefill's samples, the micro-kernel 55%. Here the roles
// swap, C^T = B A^T: B's rows are the micro-kernel's broadcast streams, read
// where they lie, and only A^T, M rows, is packed, by every thread for
// itself (a few hundred KB; no barrier). Threads split B's row tiles.
void gemm_weight_as_a(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, const float* bias) {
    const int64_t m_panels = (M + kNR - 1) / kNR, n_tiles = (N + kMR - 1) / kMR;
    parallel_region(M * N * K > kMacsParallelMin, [&] {
        const detail::Range mine = detail::static_range(n_tiles, omp_get_thread_num(), omp_get_num_threads());
        if (mine.begin == mine.end) return;  // fewer row tiles than threads: nothing to pack A^T for
        float* xp = packed_b.get(size_t(kKC * kNR * m_panels));
        for (int64_t pc = 0; pc < K; pc += kKC) {
            const int64_t kc = std::min(kKC, K - pc);
            for (int64_t q = 0; q < m_panels; ++q)
                pack_b(true, A, lda, pc, kc, q * kNR, std::min(kNR, M - q * kNR), xp + q * kKC * kNR);
            for (int64_t t = mine.begin; t < mine.end; ++t) {
                const int64_t n0 = t * kMR, nr = std::min(kMR, N - n0);
                const float* w[kMR];
                for (int64_t r = 0; r < kMR; ++r) w[r] = B + (n0 + std::min(r, nr - 1)) * ldb + pc;
                for (int64_t q = 0; q < m_panels; ++q)
                    micro_kernel_t(kc, w, xp + q * kKC * kNR, C + q * kNR * ldc + n0, ldc, alpha,
                                   bias ? bias + n0 : nullptr, pc == 0, std::min(kNR, M - q * kNR), nr);
            }
        }
    });
}

}  // namespace

void gemm_packed(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, const float* bias) {
    if (!trans_a && trans_b && beta == 0.f && M <= kWeightAsAMaxRows)
        return gemm_weight_as_a(M, N, K, alpha, A, lda, B, ldb, C, ldc, bias);
    const int64_t n_block = std::min(kNC, (N + kNR - 1) / kNR * kNR);
    float* bp = packed_b.get(size_t(kKC * n_block));
    const int64_t m_tiles = (M + kMR - 1) / kMR;
    parallel_region(M * N * K > kMacsParallelMin, [&] {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        // Each thread's share of C: B's column panels, unless C has many rows
        // or too few panels to share (then rows, if every thread gets two
        // tiles). Split by panels, a thread computes with the panels it packed
        // itself (the `omp for` below splits them alike), in its own L2; split
        // by rows, it reads every panel, half of them from the other core, and
        // C's few row tiles divide unevenly (5 at 64 rows: 2 and 3). At 2
        // threads (AVX-512 Zen 5, x W^T at GPT-2 small's widths, K 768 or
        // 3072) panels ran 64 rows at 316-335 GFLOP/s against 168-173 by rows,
        // 256 rows at 363-392 against 288-309, 512 at 363-396 against 316-361;
        // at 1024 and 4096 rows the two were within 2% (noise), as were the
        // weight gradients (A^T B, 768-3072 rows, K 4096).
        const int64_t panels_total = (std::min(N, kNC) + kNR - 1) / kNR;
        const bool split_rows = m_tiles >= 2 * team && (m_tiles >= 32 * team || panels_total < 4 * team);
        const int64_t row_begin = split_rows ? std::min(M, m_tiles * me / team * kMR) : 0;
        const int64_t row_end = split_rows ? std::min(M, m_tiles * (me + 1) / team * kMR) : M;
        float* ap = packed_a.get(size_t(kKC * kMC));
        for (int64_t jc = 0; jc < N; jc += kNC) {
            const int64_t nc = std::min(kNC, N - jc), panels = (nc + kNR - 1) / kNR;
            // Split by panels: the ones the `omp for schedule(static)` below packs on this thread.
            const detail::Range mine = detail::static_range(panels, me, team);
            const int64_t panel_begin = split_rows ? 0 : mine.begin, panel_end = split_rows ? panels : mine.end;
            for (int64_t pc = 0; pc < K; pc += kKC) {
                const int64_t kc = std::min(kKC, K - pc);
#pragma omp for schedule(static)
                for (int64_t p = 0; p < panels; ++p)
                    pack_b(trans_b, B, ldb, pc, kc, jc + p * kNR, std::min(kNR, N - jc - p * kNR), bp + p * kKC * kNR);
                // (the implied barrier: B is packed before anyone reads it)
                for (int64_t i0 = row_begin; i0 < row_end; i0 += kMC) {
                    const int64_t mc = std::min(kMC, row_end - i0), a_panels = (mc + kMR - 1) / kMR;
                    for (int64_t q = 0; q < a_panels; ++q)
                        pack_a(trans_a, A, lda, pc, kc, i0 + q * kMR, std::min(kMR, row_end - i0 - q * kMR),
                               ap + q * kKC * kMR);
                    for (int64_t p = panel_begin; p < panel_end; ++p)
                        for (int64_t q = 0; q < a_panels; ++q) {
                            const int64_t r0 = i0 + q * kMR, j0 = jc + p * kNR;
                            const float* a = ap + q * kKC * kMR;
                            const float* b = bp + p * kKC * kNR;
                            float* c = C + r0 * ldc + j0;
                            const int64_t mr = std::min(kMR, row_end - r0), nr = std::min(kNR, N - j0);
                            const float* bias_j = bias ? bias + j0 : nullptr;
                            if (trans_a) micro_kernel<false>(kc, a, b, c, ldc, alpha, beta, bias_j, pc == 0, mr, nr);
                            else micro_kernel<true>(kc, a, b, c, ldc, alpha, beta, bias_j, pc == 0, mr, nr);
                        }
                }
#pragma omp barrier  // B's panels are read by all before the next block overwrites them
            }
        }
    });
}

}  // namespace peftlab::detail
#endif
