// matmul, linear and fused multi-head attention on detail::gemm (gemm_packed.cpp with AVX-512, else cblas_sgemm).
#include <cblas.h>
#include <omp.h>

#include <cmath>
#include <memory>
#include <vector>

#include "autograd/half.h"
#include "autograd/intrinsics.h"
#include "autograd/ops_util.h"

namespace peftlab {
using namespace detail;

namespace {
// Query rows per block of causal attention: smaller blocks skip more of the
// masked triangle (1/(2 * blocks) of it is still computed) but make more,
// smaller GEMM calls.
constexpr int64_t kQueryBlock = 32;
}  // namespace

namespace detail {
namespace {
// GEMMs with at most this many rows of op(A) (decoding: a row per sequence)
// and a B of at least kFewRowsMinB elements (a weight) skip BLAS, which packs
// all of B on every call and then spends longer packing than multiplying;
// gemm_few_rows reads B once, where it lies. With a small B (a decoding
// step's attention against its keys) BLAS's small-matrix kernels do better.
constexpr int64_t kFewRows = 16;
constexpr int64_t kFewRowsMinB = int64_t(1) << 16;
bool takes_few_rows(bool trans_a, int64_t M, int64_t N, int64_t K) {
    return M <= kFewRows && !trans_a && N * K >= kFewRowsMinB;
}
// Columns of C (rows of a transposed B) per block of gemm_few_rows, and how
// many blocks ahead the rows of B are fetched into L2 (dots_chunk's `ahead`).
constexpr int64_t kFewCols = 4, kFewAhead = 4;
// Rows of A up to which rows_in_turn does gemm_few_rows' trans_b case (at 4
// rows it measured no faster than few_rows_block in a generate; see there),
// and the rows of B per in_turn_dots call (its most: sum_lanes16 reduces 16).
constexpr int64_t kInTurnRows = 2, kInTurnGroup = 16;
// Weights from which rows_in_turn's threads steal groups from each other
// (pool_for_balanced). Below it the claims cost more than the balance gains:
// a small-config generate (weights of 0.25-1 MiB, batch 1, 2 threads) took
// 14.2 / 15.4 ms (minimum / median) with stealing at every size against
// 12.6 / 14.0 without (tools/ab_steps.py; a claim then cost a second, failing
// compare-and-swap, since removed).
constexpr int64_t kStealMinBytes = int64_t(2) << 20;
// gemm_few_rows splits B's rows across threads whatever their size (in
// blocks of kFewCols rows; of kInTurnGroup with one or two rows of A, so a
// B of at most 16 rows then runs on one thread). Reading B (from L2,
// L3 or memory) dominates, and two threads read it faster even at the
// smallest B these kernels take (kFewRowsMinB). Splitting only above
// kMacsParallelMin / 4 multiply-adds left the 512 x 512 and 256 x 1024 weights
// of batch-1 decoding on one thread: a 64 + 64 generate at 2 threads took
// 387 ms on the medium config and 42.4 on small; split, 212 and 32.0
// (minima, tools/ab_steps.py --kind generate --batch 1; AVX-512 Zen 5).

// Sixteen floats: one AVX-512 register (two AVX2 ones where that is all there
// is). Unaligned, and allowed to alias the floats it is loaded from.
typedef float Vec16 __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;

// B's elements in the few-rows kernels: floats as they lie, or IEEE binary16
// (F16 weights for decoding) widened as they are loaded. Widening is exact,
// so a dot sums the same floats either way.
// (The K-tail's multiply-adds are explicit fma: whether GCC contracts a * b + c
// on its own differed between the two element types.)
inline float b_float(float x) { return x; }
inline float b_float(uint16_t h) { return half_to_float(h); }
#if defined(__AVX512F__)  // dots_chunk's loads (only AVX-512 builds use it: a Vec16 return value elsewhere changes the ABI)
inline Vec16 load_b16(const float* p) { return *(const Vec16*)p; }
inline Vec16 load_b16(const uint16_t* p) {
    return (Vec16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// sums[p] = the sum of v[p]'s 16 lanes, for 16 vectors at once (a dot's
// horizontal sum alone would cost as much as its K/16 multiply-adds). Every
// v[p] is summed by the same tree: lanes l + l+8, then + 4, + 2, + 1. (The
// result is stored, not returned: a Vec16 return value changes the ABI
// between AVX-512 builds and others, and GCC warns.)
inline void sum_lanes16(const Vec16 v[16], float sums[16]) {
    Vec16 u[8], w[4], z[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s 8 partial sums, 8-15: v[2i+1]'s
        u[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)  // 4 partial sums of each of 4 vectors
        w[i] = __builtin_shufflevector(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)  // 2 partial sums of each of 8 vectors
        z[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const Vec16 all = __builtin_shufflevector(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                      __builtin_shufflevector(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    __builtin_memcpy(sums, &all, sizeof all);
}

// Adds the dots of R rows of A with 4 rows of B over k in [k0, k1) (a
// multiple of 16 long) to acc[r][c], lane l holding the terms k = l mod 16.
// Each B vector loaded is used R times, each A vector 4 times, from registers
// (4R accumulators): a row-at-a-time kernel reloads B for every row and is
// bound by loads at any batch size.
//
// `ahead` (or null): rows of B the caller multiplies later, fetched a cache
// line per row and step while this block computes: ahead[0..4) from memory
// into L2 (kAhead blocks later), ahead[4..8) on into L1 (the next block). A
// weight read from L3 or memory in rows of ~1 KB is too short a stream for
// the hardware prefetcher: without this a 16-row GEMM on a weight in memory
// ran at ~36 GFLOP/s, with it ~60 (1 row: 8 -> 17 GB/s of weight read).
// Fetching everything straight into L1 overflows its few miss buffers.
//
// The first chunk (k0 = 0) starts from zero and also zeroes acc's rows past R,
// so that all 16 vectors are defined for sum_lanes16.
template <int R, class BT>
void dots_chunk(const float* const* a, const BT* const* b, const BT* const* ahead, int64_t k0, int64_t k1,
                Vec16 acc[4][4]) {
    Vec16 sum[R][4];  // in registers for the loop; acc lives in memory between chunks
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) sum[r][c] = k0 == 0 ? Vec16{} : acc[r][c];
    if (k0 == 0)
        for (int r = R; r < 4; ++r)
            for (int c = 0; c < 4; ++c) acc[r][c] = Vec16{};
    for (int64_t k = k0; k < k1; k += kLanes) {
        if (ahead && k % (64 / sizeof(BT)) == 0)  // a cache line per row
            for (int c = 0; c < 4; ++c) {
                __builtin_prefetch(ahead[c] + k, 0, 2);      // into L2
                __builtin_prefetch(ahead[4 + c] + k, 0, 3);  // into L1
            }
        Vec16 b0 = load_b16(b[0] + k), b1 = load_b16(b[1] + k), b2 = load_b16(b[2] + k), b3 = load_b16(b[3] + k);
        // Keeps each loaded vector in a register: left alone, GCC folds the
        // loads into every multiply-add's memory operand, loads 8R vectors per
        // step where R + 4 are needed, and the loop is bound by loads. Only
        // where a Vec16 is one register (AVX-512; elsewhere GCC splits it and
        // chooses itself). Inline: through a function taking a reference the
        // kernel ran 15-20% slower.
#if defined(__AVX512F__)
        asm("" : "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3));
#endif
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            Vec16 x = *(const Vec16*)(a[r] + k);
#if defined(__AVX512F__)
            asm("" : "+v"(x));
#endif
            sum[r][0] += x * b0;
            sum[r][1] += x * b1;
            sum[r][2] += x * b2;
            sum[r][3] += x * b3;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = sum[r][c];
}

#if !defined(__AVX512F__)
// AVX2 (16 registers of 8 floats): gemm_few_rows' trans_b case with 8-float
// vectors and 2 rows x 4 columns per register block (8 accumulators + 4 B + 1
// A registers). The 16-float kernel's 4 x 4 block needs 32 accumulator
// registers here; GCC kept them on the stack and 8-row GEMMs ran at ~25
// GFLOP/s on a 2-core Zen. Every dot is summed the same way whatever the rows:
// lanes by k mod 8 in order of k, sum_lanes8's tree, then the K mod 8 tail.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kLanes8 = 8;
constexpr int64_t kBlockRows = 2;  // rows of A per register block

inline Vec8 load_b8(const float* p) { return *(const Vec8*)p; }
#if defined(__F16C__)
inline Vec8 load_b8(const uint16_t* p) {
    return (Vec8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

inline float sum_lanes8(const Vec8& v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

// acc[r][c] += the lane sums of row r of A and row c of B over [k0, k1) (a
// multiple of 8 long); k0 = 0 starts from zero. `ahead` as dots_chunk's.
template <int R, class BT>
void dots_chunk8(const float* const* a, const BT* const* b, const BT* const* ahead, int64_t k0, int64_t k1,
                 Vec8 acc[2][4]) {
    Vec8 sum[R][4];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) sum[r][c] = k0 == 0 ? Vec8{} : acc[r][c];
    for (int64_t k = k0; k < k1; k += kLanes8) {
        if (ahead && k % (64 / sizeof(BT)) == 0)  // a cache line per row (16 floats, 32 halves)
            for (int c = 0; c < 4; ++c) {
                __builtin_prefetch(ahead[c] + k, 0, 2);
                __builtin_prefetch(ahead[4 + c] + k, 0, 3);
            }
        const Vec8 b0 = load_b8(b[0] + k), b1 = load_b8(b[1] + k), b2 = load_b8(b[2] + k), b3 = load_b8(b[3] + k);
        for (int r = 0; r < R; ++r) {
            const Vec8 x = *(const Vec8*)(a[r] + k);
            sum[r][0] += x * b0;
            sum[r][1] += x * b1;
            sum[r][2] += x * b2;
            sum[r][3] += x * b3;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = sum[r][c];
}

// C[i, j] for rows i < M (<= kFewRows) of A and the w <= 4 columns whose B
// rows are b[0..4) (a last partial block repeats its last row); C points at
// column j0. Every dot is summed the same way whatever the rows: lanes by k
// mod 8 in order of k, sum_lanes8's tree, then the K mod 8 tail.
template <class BT>
void few_rows_block(int64_t M, int64_t K, float alpha, const float* A, int64_t lda, const BT* const b[4],
                    const BT* const* ahead, float beta, float* C, int64_t ldc, int64_t w) {
    constexpr int64_t kRows = kBlockRows, kMaxRowBlocks = kFewRows / kRows, kChunk = 256;
    const int64_t K8 = K - K % kLanes8, row_blocks = (M + kRows - 1) / kRows;
    const float* a[kMaxRowBlocks][kRows];
    for (int64_t i = 0; i < M; ++i) a[i / kRows][i % kRows] = A + i * lda;
    Vec8 acc[kMaxRowBlocks][2][4];
    for (int64_t k0 = 0; k0 < std::max<int64_t>(K8, 1); k0 += kChunk) {
        const int64_t k1 = std::min(k0 + kChunk, K8);
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
            const BT* const* pf = rb == 0 ? ahead : nullptr;
            if (M - rb * kRows >= 2) dots_chunk8<2>(a[rb], b, pf, k0, k1, acc[rb]);
            else dots_chunk8<1>(a[rb], b, pf, k0, k1, acc[rb]);
        }
    }
    for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        for (int64_t j = 0; j < w; ++j) {
            float dot = sum_lanes8(acc[i / kRows][i % kRows][j]);
            for (int64_t k = K8; k < K; ++k) dot = std::fma(a[i / kRows][i % kRows][k], b_float(b[j][k]), dot);
            c[j] = alpha * dot + (beta == 0.f ? 0.f : beta * c[j]);
        }
    }
}
// dots[r][j] = A_r . b_j for the R rows A_r = a + r lda and the
// n <= kInTurnGroup rows b_j = b + j ldb, each summed exactly as
// few_rows_block sums it: lanes by k mod 8 in order of k, sum_lanes8's tree,
// then the K mod 8 tail. See rows_in_turn.
template <int R, class BT>
void in_turn_dots(int64_t K, const float* a, int64_t lda, const BT* b, int64_t ldb, int64_t n,
                  float dots[][kInTurnGroup]) {
    const int64_t K8 = K - K % kLanes8;
    for (int64_t j = 0; j < n; ++j) {
        const BT* bj = b + j * ldb;
        Vec8 sum[R] = {};
        for (int64_t k = 0; k < K8; k += kLanes8) {
            const Vec8 bv = load_b8(bj + k);
            for (int r = 0; r < R; ++r) sum[r] += *(const Vec8*)(a + r * lda + k) * bv;
        }
        for (int r = 0; r < R; ++r) {
            float dot = sum_lanes8(sum[r]);
            for (int64_t k = K8; k < K; ++k) dot = std::fma(a[r * lda + k], b_float(bj[k]), dot);
            dots[r][j] = dot;
        }
    }
}
#else
// As above with 16-float vectors and 4 rows x 4 columns per register block.
// Every dot is summed the same way whatever the number of rows and the block
// its row falls in: lanes by k mod 16 in order of k, sum_lanes16's tree, then
// the K mod 16 tail in order.
constexpr int64_t kBlockRows = 4;  // rows of A per register block

template <class BT>
void few_rows_block(int64_t M, int64_t K, float alpha, const float* A, int64_t lda, const BT* const b[4],
                    const BT* const* ahead, float beta, float* C, int64_t ldc, int64_t w) {
    // Chunks of kChunk along K, so that a chunk of B (4 KB) and of every row
    // of A (16 KB at 16 rows) stay in L1 while the rows of A pass in blocks of 4.
    constexpr int64_t kRows = kBlockRows, kMaxRowBlocks = kFewRows / kRows, kChunk = 256;
    static_assert(kFewRows % kRows == 0 && kChunk % kLanes == 0);
    const int64_t K16 = K - K % kLanes, row_blocks = (M + kRows - 1) / kRows;
    const float* a[kMaxRowBlocks][kRows];
    for (int64_t i = 0; i < M; ++i) a[i / kRows][i % kRows] = A + i * lda;
    Vec16 acc[kMaxRowBlocks][kRows][4];
    for (int64_t k0 = 0; k0 < std::max<int64_t>(K16, 1); k0 += kChunk) {  // one pass even if K < 16
        const int64_t k1 = std::min(k0 + kChunk, K16);
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
            const BT* const* pf = rb == 0 ? ahead : nullptr;  // once per line (past the end: the last row)
            switch (std::min(kRows, M - rb * kRows)) {
                case 4: dots_chunk<4>(a[rb], b, pf, k0, k1, acc[rb]); break;
                case 3: dots_chunk<3>(a[rb], b, pf, k0, k1, acc[rb]); break;
                case 2: dots_chunk<2>(a[rb], b, pf, k0, k1, acc[rb]); break;
                default: dots_chunk<1>(a[rb], b, pf, k0, k1, acc[rb]); break;
            }
        }
    }
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
        float sums[kLanes];  // 4r + c: row r, column c
        sum_lanes16(&acc[rb][0][0], sums);
        for (int64_t r = 0; r < std::min(kRows, M - rb * kRows); ++r) {
            float* c = C + (rb * kRows + r) * ldc;
            for (int64_t j = 0; j < w; ++j) {
                float dot = sums[4 * r + j];
                for (int64_t k = K16; k < K; ++k) dot = std::fma(a[rb][r][k], b_float(b[j][k]), dot);
                c[j] = alpha * dot + (beta == 0.f ? 0.f : beta * c[j]);
            }
        }
    }
}
// dots[r][j] = A_r . b_j for the R rows A_r = a + r lda and the
// n <= kInTurnGroup rows b_j = b + j ldb, each summed exactly as
// few_rows_block sums it: lanes by k mod 16 in order of k, sum_lanes16's
// tree, then the K mod 16 tail. See rows_in_turn.
template <int R, class BT>
void in_turn_dots(int64_t K, const float* a, int64_t lda, const BT* b, int64_t ldb, int64_t n,
                  float dots[][kInTurnGroup]) {
    const int64_t K16 = K - K % kLanes;
    Vec16 acc[R][kLanes] = {};  // B rows past n stay zero: sum_lanes16 reads all 16
    for (int64_t j = 0; j < n; ++j) {
        const BT* bj = b + j * ldb;
        Vec16 sum[R] = {};
        for (int64_t k = 0; k < K16; k += kLanes) {
            const Vec16 bv = load_b16(bj + k);
            for (int r = 0; r < R; ++r) sum[r] += *(const Vec16*)(a + r * lda + k) * bv;
        }
        for (int r = 0; r < R; ++r) acc[r][j] = sum[r];
    }
    for (int r = 0; r < R; ++r) {
        sum_lanes16(acc[r], dots[r]);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t k = K16; k < K; ++k) dots[r][j] = std::fma(a[r * lda + k], b_float(b[j * ldb + k]), dots[r][j]);
    }
}
#endif

// C [M, N] = alpha * A [M, K] B^T + beta * C for B [N, K] and M <= kInTurnRows:
// decoding at batch 1 and 2. B's rows are read one after another, so that each
// thread reads its part of a weight as one sequential stream, which the
// hardware prefetcher follows without help. few_rows_block's 4 interleaved
// rows, fetched ahead in software, pay once each loaded B vector serves enough
// rows of A; below that the stream is what counts. GPT-2 small's decoding
// weights in a throwaway driver (AVX-512 Zen 5, 1 thread, both kernels
// interleaved), rows in turn against few_rows_block: at 1 row 30-34 GB/s of
// weight read against 27-28 (58 against 51-54 at 2 threads), at 2 rows 26.7
// GFLOP/s against 20.9, at 4 rows 42.9 against 37.7, at 8 rows 48.9 against
// 78.3. A gpt2 64 + 64 generate (1 thread, tools/ab_steps.py minima) took 1073
// ms instead of 1527 at batch 1, 1403 instead of 1794 at batch 2, and 2054
// against 2074 at batch 4 (medians 2435 against 2298). Each dot is summed as
// few_rows_block sums it, so a row decodes to the same bits alone or in a
// batch.
template <class BT>
void rows_in_turn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const BT* B,
                  int64_t ldb, float beta, float* C, int64_t ldc) {
    static_assert(kInTurnRows == 2);  // the two instances below
    const int64_t groups = (N + kInTurnGroup - 1) / kInTurnGroup;
    auto group = [&](int64_t g) {
        const int64_t j0 = g * kInTurnGroup, n = std::min(kInTurnGroup, N - j0);
        float dots[kInTurnRows][kInTurnGroup];
        const BT* b = B + j0 * ldb;
        if (M == 1) in_turn_dots<1>(K, A, lda, b, ldb, n, dots);
        else in_turn_dots<2>(K, A, lda, b, ldb, n, dots);
        for (int64_t r = 0; r < M; ++r) {
            float* c = C + r * ldc + j0;
            for (int64_t j = 0; j < n; ++j) c[j] = alpha * dots[r][j] + (beta == 0.f ? 0.f : beta * c[j]);
        }
    };
    // A group's dots do not depend on the thread, so a weight of kStealMinBytes
    // or more is shared with stealing (pool_for_balanced), as the threads'
    // halves of one GEMV finished apart by ~10% of its time: in a gpt2 decoding
    // step the caller waited for the worker 3.4% and the worker for the caller
    // 5.1% of the samples, against 28% each in the kernel.
    if (N * K * int64_t(sizeof(BT)) >= kStealMinBytes) pool_for_balanced(groups, group);
    else pool_for(groups, group);
}

// C [M, N] = alpha * A [M, K] B^T + beta * C for B [N, K] (a Linear weight,
// floats or halves) read where it lies: C[i, j] = A_i . B_j, in blocks of 4
// columns (4 rows of B), each read once for all M rows and fetched
// `ahead_blocks` blocks ahead; up to kInTurnRows rows of A, rows_in_turn's way
// instead (ahead_blocks unused). So a row's result does not depend on the other
// rows: a request decodes to the same tokens alone or in any batch.
template <class BT>
void few_rows_b_rows(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const BT* B,
                     int64_t ldb, float beta, float* C, int64_t ldc, int64_t ahead_blocks) {
    if (M <= kInTurnRows) return rows_in_turn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    const int64_t blocks = (N + kFewCols - 1) / kFewCols;
    pool_for(blocks, [&](int64_t blk) {
        const int64_t j0 = blk * kFewCols, w = std::min(kFewCols, N - j0);
        const BT* b[kFewCols];
        const BT* ahead[2 * kFewCols];
        for (int64_t c = 0; c < kFewCols; ++c) {
            b[c] = B + (j0 + std::min(c, w - 1)) * ldb;
            ahead[c] = B + std::min(j0 + ahead_blocks * kFewCols + c, N - 1) * ldb;
            ahead[kFewCols + c] = B + std::min(j0 + kFewCols + c, N - 1) * ldb;
        }
        few_rows_block(M, K, alpha, A, lda, b, ahead, beta, C + j0, ldc, w);
    });
}

// C [M, N] = alpha * A [M, K] op(B) + beta * C. Each C element is computed by
// one thread in a fixed order, so the result does not depend on the thread count.
void gemm_few_rows(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (trans_b) return few_rows_b_rows(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, kFewAhead);
    // B [K, N]: C_i = sum_k A[i, k] B_k, rows of B added in order, in column blocks.
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (N + kBlock - 1) / kBlock;
    pool_for(M * blocks, [&](int64_t ib) {
        const int64_t i = ib / blocks, j0 = ib % blocks * kBlock, w = std::min(kBlock, N - j0);
        float acc[kBlock] = {};
        for (int64_t k = 0; k < K; ++k) {
            const float a = A[i * lda + k];
            const float* b = B + k * ldb + j0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) acc[j] += a * b[j];
        }
        float* c = C + i * ldc + j0;
        for (int64_t j = 0; j < w; ++j) c[j] = alpha * acc[j] + (beta == 0.f ? 0.f : beta * c[j]);
    });
}

// dst[0, n) = src[0, n) as floats; while at it, fetches `ahead` (n halves, or
// null) into L2 a cache line at a time: the rows kFewAhead blocks later.
void halves_to_floats(const uint16_t* src, float* dst, int64_t n, const uint16_t* ahead) {
    int64_t k = 0;
#if defined(__F16C__)
    for (; k + 8 <= n; k += 8) {
        if (ahead && k % 32 == 0) __builtin_prefetch(ahead + k, 0, 2);
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    }
#endif
    for (; k < n; ++k) {
        if (ahead && k % 32 == 0) __builtin_prefetch(ahead + k, 0, 2);
        dst[k] = half_to_float(src[k]);
    }
}

// How many blocks ahead gemm_few_rows_half fetches B's rows. Further than the
// float kernel's kFewAhead: a block's rows are read as one short sequential
// stream each, not interleaved with the fetches ahead, so a fetch must be
// issued long before. GPT-2 small's batch-1 weights on a 2-core EPYC (AVX2,
// 1 thread): 4 blocks 7.4 GB/s of F16 read, 16 blocks 10.5-10.8.
constexpr int64_t kHalfAhead = 16;

// How many blocks ahead the widening path below fetches B's rows: as many
// bytes ahead as the float kernel's kFewAhead blocks.
constexpr int64_t kHalfWidenAhead = 2 * kFewAhead;

// gemm_few_rows' trans_b case with B in binary16. Every dot is summed as
// there: the result is gemm_few_rows' on B converted to float, bit for bit.
// - At most one register block of rows of A (decoding at batch <= 2, <= 4
//   with AVX-512): B's halves are widened as they are loaded, so the weight
//   is read as the float kernel reads it (up to kInTurnRows rows, its rows
//   in turn; else the 4 rows of a block interleaved with the multiply-adds,
//   fetched ahead).
// - More rows: each block's 4 rows of B are converted into a per-thread
//   buffer [4, K] (in L1/L2) once, which few_rows_block then reads for every
//   row block, as it reads a float B.
void gemm_few_rows_half(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const uint16_t* B,
                        int64_t ldb, float beta, float* C, int64_t ldc) {
#if defined(__F16C__)
    if (M <= kBlockRows)
        return few_rows_b_rows(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, kHalfWidenAhead);
#endif
    const int64_t blocks = (N + kFewCols - 1) / kFewCols;
    // A [kFewCols, K] buffer per pool thread, allocated here (an allocation
    // that throws on a pool worker would terminate the process) and left
    // unset: each block writes the rows it reads.
    const auto scratch = std::make_unique_for_overwrite<float[]>(size_t(threads()) * size_t(kFewCols * K));
    pool_ranges(blocks, [&](int64_t first, int64_t last, int thread) {
        float* rows = scratch.get() + size_t(thread) * size_t(kFewCols * K);
        for (int64_t blk = first; blk < last; ++blk) {
            const int64_t j0 = blk * kFewCols, w = std::min(kFewCols, N - j0);
            const float* b[kFewCols];
            for (int64_t c = 0; c < w; ++c) {
                const int64_t ahead_row = j0 + kHalfAhead * kFewCols + c;
                halves_to_floats(B + (j0 + c) * ldb, rows + c * K, K, ahead_row < N ? B + ahead_row * ldb : nullptr);
            }
            for (int64_t c = 0; c < kFewCols; ++c) b[c] = rows + std::min(c, w - 1) * K;
            few_rows_block<float>(M, K, alpha, A, lda, b, nullptr, beta, C + j0, ldc, w);
        }
    });
}
}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    if (K == 0) {  // BLAS may skip the beta scaling when K == 0
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
        return;
    }
    if (takes_few_rows(trans_a, M, N, K))
        return gemm_few_rows(trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#if defined(__AVX512F__)
    return gemm_packed(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(M),
                int(N), int(K), alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

void linear_forward(int64_t R, int64_t outf, int64_t in, const float* x, const float* w, const Tensor& bias, float* y) {
#if defined(__AVX512F__)
    if (R > 0 && outf > 0 && in > 0 && !takes_few_rows(false, R, outf, in)) {  // gemm()'s choice of kernel
        gemm_packed(false, true, R, outf, in, 1.f, x, in, w, in, 0.f, y, outf, bias.defined() ? bias.data() : nullptr);
        if (bias.defined()) flops::add(uint64_t(R * outf));
        return;
    }
#endif
    const float beta = fill_bias_rows(y, bias, R, outf);
    gemm(false, true, R, outf, in, 1.f, x, in, w, in, beta, y, outf);
}

void gemm_half_b(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const uint16_t* B,
                 int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M > 0 && N > 0 && K > 0 && takes_few_rows(false, M, N, K))  // gemm()'s choice of kernel
        return gemm_few_rows_half(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    // Enough rows that converting B once costs little beside the GEMM (or too
    // small a B to matter): convert it and take gemm()'s path.
    std::vector<float> b(size_t(N * K));
    for (int64_t n = 0; n < N; ++n) halves_to_floats(B + n * ldb, b.data() + n * K, K, nullptr);
    gemm(false, true, M, N, K, alpha, A, lda, b.data(), K, beta, C, ldc);
}
}  // namespace detail

namespace {
using detail::kLanes;
using detail::Vec16;

// A decoding step's attention (one query row) as loops of our own: per head
// it is a 1 x Tk x Dh product, less work than a BLAS call's own cost.
//
// One key's dot, q . k over Dh: lanes by t mod 16 summed in order of t into
// `lanes` (then summed by sum_lanes16, 16 dots at a time, whichever 16), or,
// with Dh not a multiple of 16, a plain sum in order. query_scores and
// decode_scores compute every dot through these (or, in AVX2 builds, through
// dot_reduced below, which gives the same bits), so their bits agree.
inline void dot_lanes(const float* q, const float* k, int64_t Dh, Vec16& lanes) {
    Vec16 sum = {};
    for (int64_t t = 0; t < Dh; t += kLanes) sum += *(const Vec16*)(q + t) * *(const Vec16*)(k + t);
    lanes = sum;
}
inline float dot_plain(const float* q, const float* k, int64_t Dh) {
    float dot = 0.f;
    for (int64_t t = 0; t < Dh; ++t) dot += q[t] * k[t];
    return dot;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// AVX2 without AVX-512: a Vec16 is two registers, and GCC kept the 16
// vectors of a sum_lanes16 group on the stack, written in 16-byte halves and
// read back whole (a store-forwarding stall per vector): a decoding step's
// attention ran at ~1.6 G multiply-adds/s. Here one dot at a time in two
// registers, lanes 0-7 and 8-15 of dot_lanes' 16, reduced by sum_lanes16's
// tree (l + l+8, then + 4, + 2, + 1): the same bits.
#define PEFTLAB_DOTS_ONE_AT_A_TIME 1
inline float dot_reduced(const float* q, const float* k, int64_t Dh) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t t = 0; t < Dh; t += kLanes) {
        lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + t), _mm256_loadu_ps(k + t), lo);
        hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + t + 8), _mm256_loadu_ps(k + t + 8), hi);
    }
    const __m256 u = _mm256_add_ps(lo, hi);
    const __m128 w = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
    const __m128 z = _mm_add_ps(w, _mm_movehl_ps(w, w));
    return _mm_cvtss_f32(_mm_add_ss(z, _mm_shuffle_ps(z, z, 1)));
}
// o[t] += p * v[t] for t < n (a multiple of 16), as fused multiply-adds. The
// Vec16 loop below compiled here to stores through the stack and
// general-purpose registers.
inline void axpy_lanes(float* o, float p, const float* v, int64_t n) {
    const __m256 pp = _mm256_set1_ps(p);
    for (int64_t t = 0; t < n; t += 8) _mm256_storeu_ps(o + t, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + t), _mm256_loadu_ps(o + t)));
}
#else
#define PEFTLAB_DOTS_ONE_AT_A_TIME 0
inline void axpy_lanes(float* o, float p, const float* v, int64_t n) {
    for (int64_t t = 0; t < n; t += kLanes) *(Vec16*)(o + t) += p * *(const Vec16*)(v + t);
}
#endif

// s[j] = scale * q . K_j for keys j < n (K's rows ldk apart), one head: 16
// keys at a time, their dots reduced together (AVX2 builds: one at a time);
// a last partial group repeats its last key. (The backward's recomputation of
// P for a single query row.)
void query_scores(float* s, const float* q, const float* K, int64_t ldk, int64_t n, int64_t Dh, float scale) {
    if (Dh % kLanes != 0) {
        for (int64_t j = 0; j < n; ++j) s[j] = scale * dot_plain(q, K + j * ldk, Dh);
        return;
    }
#if PEFTLAB_DOTS_ONE_AT_A_TIME
    for (int64_t j = 0; j < n; ++j) s[j] = scale * dot_reduced(q, K + j * ldk, Dh);
#else
    for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
        Vec16 acc[kLanes];
        for (int64_t c = 0; c < kLanes; ++c) dot_lanes(q, K + std::min(j0 + c, n - 1) * ldk, Dh, acc[c]);
        float dots[kLanes];
        detail::sum_lanes16(acc, dots);
        for (int64_t c = 0; c < std::min(kLanes, n - j0); ++c) s[j0 + c] = scale * dots[c];
    }
#endif
}

// The scores of one query row q [C] for heads [h0, h1) at once: P[h * ldp + j]
// = scale * q_h . K_j,h for keys j < n. The keys are read row by row, all the
// group's heads of a row together: a sequential stream through K [n, C]. One
// head at a time instead reads a 256-byte piece of every 3 KB row (GPT-2
// small), a strided walk across pages that the prefetchers follow poorly: at
// batch 1 that took 6% of a decoding step for 1.4% of its bytes. The (key,
// head) dots are reduced 16 at a time in that order (AVX2 builds: one at a
// time); each dot's bits are query_scores' (dot_lanes, then sum_lanes16's
// tree, which treats each of its 16 vectors alike).
void decode_scores(float* P, int64_t ldp, const float* q, const float* K, int64_t ldk, int64_t n, int64_t h0,
                   int64_t h1, int64_t Dh, float scale) {
    if (Dh % kLanes != 0) {
        for (int64_t j = 0; j < n; ++j)
            for (int64_t h = h0; h < h1; ++h) P[h * ldp + j] = scale * dot_plain(q + h * Dh, K + j * ldk + h * Dh, Dh);
        return;
    }
#if PEFTLAB_DOTS_ONE_AT_A_TIME
    for (int64_t j = 0; j < n; ++j)
        for (int64_t h = h0; h < h1; ++h) P[h * ldp + j] = scale * dot_reduced(q + h * Dh, K + j * ldk + h * Dh, Dh);
#else
    // Pair f is key f / nh, head h0 + f % nh; (j, h) steps along with f (a
    // division per pair cost more than the dot).
    const int64_t pairs = n * (h1 - h0);
    int64_t j = 0, h = h0;
    for (int64_t f0 = 0; f0 < pairs; f0 += kLanes) {
        const int64_t group = std::min(kLanes, pairs - f0);
        Vec16 acc[kLanes];
        float* dst[kLanes];
        for (int64_t c = 0; c < group; ++c) {
            dot_lanes(q + h * Dh, K + j * ldk + h * Dh, Dh, acc[c]);
            dst[c] = P + h * ldp + j;
            if (++h == h1) h = h0, ++j;
        }
        for (int64_t c = group; c < kLanes; ++c) acc[c] = acc[group - 1];  // a last partial group repeats its last pair
        float dots[kLanes];
        detail::sum_lanes16(acc, dots);
        for (int64_t c = 0; c < group; ++c) *dst[c] = scale * dots[c];
    }
#endif
}

// o [C] (heads [h0, h1) of it) = sum over keys j < n of P[h, j] V_j,h, in
// order of j; keys with p = 0 (masked, padding) add nothing and are skipped.
// As decode_scores, V [n, C] is read row by row, all the group's heads of a
// row together; o's columns are the accumulators (in L1: at most C floats).
void decode_values(float* o, const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, int64_t h0,
                   int64_t h1, int64_t Dh) {
    std::fill(o + h0 * Dh, o + h1 * Dh, 0.f);
    const int64_t D16 = Dh - Dh % kLanes;
    for (int64_t j = 0; j < n; ++j) {
        const float* v = V + j * ldv;
        for (int64_t h = h0; h < h1; ++h) {
            const float p = P[h * ldp + j];
            if (p == 0.f) continue;
            float* oh = o + h * Dh;
            const float* vh = v + h * Dh;
            axpy_lanes(oh, p, vh, D16);
            for (int64_t t = D16; t < Dh; ++t) oh[t] += p * vh[t];
        }
    }
}
// dst [Dh, n] = the transpose of src's n rows of Dh (ld apart): one head's
// keys or values as gemm_small's B for products against their transpose.
void transpose_head(float* dst, const float* src, int64_t n, int64_t ld, int64_t Dh) {
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < Dh; ++d) dst[d * n + j] = src[j * ld + d];
}
}  // namespace

void matmul_naive(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a, bool trans_b) {
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double s = 0;
            for (int k = 0; k < K; ++k) {
                float av = trans_a ? a[k * M + i] : a[i * K + k];
                float bv = trans_b ? b[j * K + k] : b[k * N + j];
                s += double(av) * double(bv);
            }
            c[i * N + j] = float(s);
        }
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
    require_defined("matmul", a, "a");
    require_defined("matmul", b, "b");
    if (a.ndim() < 2 || b.ndim() < 2)
        throw std::invalid_argument(fmt::format("matmul: operands must have rank >= 2, got shapes {} and {}",
                                                shape_str(a.shape()), shape_str(b.shape())));
    const int ra = a.ndim(), rb = b.ndim();
    const int64_t M = a.dim(trans_a ? -1 : -2), Ka = a.dim(trans_a ? -2 : -1);
    const int64_t Kb = b.dim(trans_b ? -1 : -2), N = b.dim(trans_b ? -2 : -1);
    if (Ka != Kb)
        throw std::invalid_argument(fmt::format("matmul: shapes {}{} and {}{} do not match ({} != {})",
                                                shape_str(a.shape()), trans_a ? "^T" : "", shape_str(b.shape()),
                                                trans_b ? "^T" : "", Ka, Kb));
    const int64_t K = Ka;
    const int64_t batch = prod(a.shape(), 0, ra - 2);
    const bool shared_b = rb == 2;
    if (!shared_b) {
        Shape ba(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
        if (ba != bb)
            throw std::invalid_argument(fmt::format("matmul: batch dims of {} and {} differ", shape_str(a.shape()),
                                                    shape_str(b.shape())));
    }
    Shape os(a.shape().begin(), a.shape().end() - 2);
    os.push_back(M);
    os.push_back(N);
    Tensor out = make_result(os);
    const int64_t lda = trans_a ? M : K, ldb = trans_b ? K : N;
    const int64_t sa = M * K, sb = shared_b ? 0 : K * N, sc = M * N;
    if (shared_b && !trans_a) {
        // All leading rows of a times one b: one GEMM of batch*M rows.
        gemm(false, trans_b, batch * M, N, K, 1.f, a.data(), lda, b.data(), ldb, 0.f, out.data(), N);
    } else {
        for (int64_t i = 0; i < batch; ++i)
            gemm(trans_a, trans_b, M, N, K, 1.f, a.data() + i * sa, lda, b.data() + i * sb, ldb, 0.f,
                 out.data() + i * sc, N);
    }
    flops::add(uint64_t(2 * batch * M * N * K));

    auto ga = grad_target(a), gb = grad_target(b);
    if (!ga && !gb) return out;
    Tensor save_a = gb ? a : Tensor();  // dB reads A
    Tensor save_b = ga ? b : Tensor();  // dA reads B
    record(out, [=](const float* dc) {
        // With A' = op(A), B' = op(B): dA' = dC B'^T and dB' = A'^T dC.
        if (ga) {
            float beta;
            float* da = ga->gemm_target(beta);
            if (shared_b && !trans_a) {
                gemm(false, !trans_b, batch * M, K, N, 1.f, dc, N, save_b.data(), ldb, beta, da, K);
            } else {
                for (int64_t i = 0; i < batch; ++i) {
                    const float* bi = save_b.data() + i * sb;
                    if (trans_a)  // dA [K, M] = B' dC^T
                        gemm(trans_b, true, K, M, N, 1.f, bi, ldb, dc + i * sc, N, beta, da + i * sa, M);
                    else  // dA [M, K] = dC B'^T
                        gemm(false, !trans_b, M, K, N, 1.f, dc + i * sc, N, bi, ldb, beta, da + i * sa, K);
                }
            }
            flops::add_grad(ga->is_leaf, uint64_t(2 * batch * M * N * K));
        }
        if (gb) {
            float beta;
            float* db = gb->gemm_target(beta);
            if (shared_b && !trans_a) {
                // Over all batch*M rows at once: dB' = A'^T dC.
                if (trans_b) gemm(true, false, N, K, batch * M, 1.f, dc, N, save_a.data(), K, beta, db, K);
                else gemm(true, false, K, N, batch * M, 1.f, save_a.data(), K, dc, N, beta, db, N);
            } else {
                for (int64_t i = 0; i < batch; ++i) {
                    const float* ai = save_a.data() + i * sa;
                    float* dbi = db + i * sb;
                    float bbeta = shared_b && i > 0 ? 1.f : beta;
                    if (trans_b)  // dB [N, K] = dC^T A'
                        gemm(true, trans_a, N, K, M, 1.f, dc + i * sc, N, ai, lda, bbeta, dbi, K);
                    else  // dB [K, N] = A'^T dC
                        gemm(!trans_a, false, K, N, M, 1.f, ai, lda, dc + i * sc, N, bbeta, dbi, N);
                }
            }
            flops::add_grad(gb->is_leaf, uint64_t(2 * batch * M * N * K));
        }
    });
    return out;
}

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
    require_defined("linear", x, "input");
    require_defined("linear", weight, "weight");
    if (weight.ndim() != 2 || x.ndim() < 1 || x.dim(-1) != weight.dim(1))
        throw std::invalid_argument(fmt::format("linear: input {} and weight {} do not match (expected weight [out, {}])",
                                                shape_str(x.shape()), shape_str(weight.shape()),
                                                x.ndim() ? x.dim(-1) : 0));
    const int64_t in = weight.dim(1), outf = weight.dim(0), R = x.numel() / std::max<int64_t>(in, 1);
    if (bias.defined() && (bias.ndim() != 1 || bias.dim(0) != outf))
        throw std::invalid_argument(fmt::format("linear: bias {} does not match weight {}", shape_str(bias.shape()),
                                                shape_str(weight.shape())));
    Shape os = x.shape();
    os.back() = outf;
    Tensor out = make_result(os);
    float* y = out.data();
    linear_forward(R, outf, in, x.data(), weight.data(), bias, y);
    flops::add(uint64_t(2 * R * outf * in));

    auto gx = grad_target(x), gw = grad_target(weight);
    auto gbias = bias.defined() ? grad_target(bias) : nullptr;
    if (!gx && !gw && !gbias) return out;
    Tensor save_x = gw ? x : Tensor();       // dW reads x
    Tensor save_w = gx ? weight : Tensor();  // dx reads W
    record(out, [=](const float* dy) {
        if (gx) {  // dx [R, in] = dy [R, out] W [out, in]
            float beta;
            float* dx = gx->gemm_target(beta);
            gemm(false, false, R, in, outf, 1.f, dy, outf, save_w.data(), in, beta, dx, in);
            flops::add_grad(gx->is_leaf, uint64_t(2 * R * outf * in));
        }
        if (gw) {  // dW [out, in] = dy^T [out, R] x [R, in]
            float beta;
            float* dw = gw->gemm_target(beta);
            gemm(true, false, outf, in, R, 1.f, dy, outf, save_x.data(), in, beta, dw, in);
            flops::add_grad(gw->is_leaf, uint64_t(2 * R * outf * in));
        }
        if (gbias) {  // db [out] = column sums of dy
            add_column_sums(gbias->buffer(), dy, R, outf);
            flops::add_grad(gbias->is_leaf, uint64_t(R * outf));
        }
    });
    return out;
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int n_heads, bool causal,
                 const Tensor& key_valid, int64_t kv_len) {
    require_defined("attention", q, "q");
    require_defined("attention", k, "k");
    require_defined("attention", v, "v");
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 || k.shape() != v.shape() || q.dim(0) != k.dim(0) ||
        q.dim(2) != k.dim(2))
        throw std::invalid_argument(fmt::format(
            "attention: expected q [B, Tq, C] and k, v [B, S, C], got q {}, k {}, v {}", shape_str(q.shape()),
            shape_str(k.shape()), shape_str(v.shape())));
    // S positions are stored per row of k, v and key_valid; the first Tk are keys.
    const int64_t B = q.dim(0), Tq = q.dim(1), S = k.dim(1), C = q.dim(2), H = n_heads;
    const int64_t Tk = kv_len < 0 ? S : kv_len;
    if (H <= 0 || C % H != 0)
        throw std::invalid_argument(fmt::format("attention: n_heads = {} does not divide C = {}", n_heads, C));
    if (Tk > S)
        throw std::invalid_argument(fmt::format("attention: kv_len = {} exceeds the {} positions of k", kv_len, S));
    if (causal && Tq > Tk)
        throw std::invalid_argument(fmt::format("attention: causal with more queries ({}) than keys ({})", Tq, Tk));
    if (key_valid.defined() && key_valid.shape() != Shape{B, S} && key_valid.shape() != Shape{B, Tq, S})
        throw std::invalid_argument(fmt::format("attention: key_valid {} must be [B, S] = [{}, {}] or [B, Tq, S] = [{}, {}, {}]",
                                                shape_str(key_valid.shape()), B, S, B, Tq, S));
    // Row i's mask starts at valid + mask_row(b, i): one row per batch row, or per query.
    const bool per_query = key_valid.defined() && key_valid.ndim() == 3;
    auto mask_row = [=](int64_t b, int64_t i) { return per_query ? (b * Tq + i) * S : b * S; };
    if (Tk < S && (grad_target(k) || grad_target(v)))
        throw std::invalid_argument("attention: gradients for k and v need kv_len = -1 (all positions)");
    const int64_t Dh = C / H;
    const float scale = 1.f / std::sqrt(float(Dh));
    Tensor out = make_result({B, Tq, C});
    float* po = out.data();
    const bool parallel = B * H * 2 * Tq * Tk * Dh > kMacsParallelMin;  // a decoding step often is not
    // Causal attention runs over blocks of query rows, each against only the
    // keys its last row may see: the masked upper triangle of S and P is
    // neither computed nor multiplied (P is zero there). n_blocks row blocks.
    const int64_t n_blocks = causal ? (Tq + kQueryBlock - 1) / kQueryBlock : 1;
    const int64_t rows_per_block = causal ? kQueryBlock : Tq;
    auto key_end = [=](int64_t i1) { return causal ? i1 + (Tk - Tq) : Tk; };  // keys seen by rows < i1
    // P [Tq, Tk] = softmax(Q K^T * scale) of one batch row b and head h (Q, K
    // point at its column block of width Dh; KT is that block of K transposed,
    // [Dh, Tk], when Tq > 1), row block by row block; after each block
    // then(i0, rows, kend) runs. P is not saved for the backward, which
    // recomputes it (the same code, the same bits): B*H*Tq*Tk floats per layer
    // would otherwise be the largest activation of a training step.
    auto probs = [=](float* P, const float* Q, const float* K, const float* KT, const float* valid, int64_t b,
                     auto then) {
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
            const int64_t i0 = blk * rows_per_block, rows = std::min(rows_per_block, Tq - i0);
            const int64_t kend = key_end(i0 + rows);
            if (Tq == 1)
                query_scores(P, Q, K, C, kend, Dh, scale);
            else
                gemm_small(false, rows, kend, Dh, scale, Q + i0 * C, C, KT, Tk, false, P + i0 * Tk, Tk);
            for (int64_t i = i0; i < i0 + rows; ++i) {
                const int64_t limit = causal ? i + (Tk - Tq) + 1 : Tk;
                masked_softmax_row(P + i * Tk, P + i * Tk, Tk, limit, valid ? valid + mask_row(b, i) : nullptr);
            }
            then(i0, rows, kend);
        }
    };
    const float *pq = q.data(), *pk = k.data(), *pv = v.data();
    const float* valid = key_valid.defined() ? key_valid.data() : nullptr;
    if (Tq == 1) {
        // A decoding step: per batch row, its heads in `groups` groups (more
        // than one only to give every thread work when there are fewer rows
        // than threads; the bits do not depend on the grouping). On the
        // worker pool, as the step's GEMVs are: an OpenMP team here would
        // wake libgomp's worker onto the core where the pool's worker spins
        // (at gpt2's shape, batch 8, that cost 5-10% of a generate). P [H, Tk]
        // per thread, allocated here: an allocation that throws on a pool
        // worker would terminate the process.
        const int64_t groups = parallel ? std::min<int64_t>(H, (threads() + B - 1) / B) : 1;
        std::vector<float> scratch(size_t(parallel ? threads() : 1) * size_t(H * Tk));
        const auto heads = [&](int64_t first, int64_t last, int thread) {
            float* P = scratch.data() + size_t(thread) * size_t(H * Tk);
            for (int64_t bg = first; bg < last; ++bg) {
                const int64_t b = bg / groups, g = bg % groups;
                const int64_t h0 = g * H / groups, h1 = (g + 1) * H / groups;
                decode_scores(P, Tk, pq + b * C, pk + b * S * C, C, Tk, h0, h1, Dh, scale);
                for (int64_t h = h0; h < h1; ++h)  // one query row sees all Tk keys, causal or not
                    masked_softmax_row(P + h * Tk, P + h * Tk, Tk, Tk, valid ? valid + mask_row(b, 0) : nullptr);
                decode_values(po + b * C, P, Tk, pv + b * S * C, C, Tk, h0, h1, Dh);
            }
        };
        if (parallel) pool_ranges(B * groups, heads);
        else heads(0, B * groups, 0);
    } else {
        // Per-thread probability rows [Tq, Tk] and transposed keys [Dh, Tk],
        // allocated here (see above).
        const int64_t per_thread = Tq * Tk + Dh * Tk;
        std::vector<float> scratch(size_t(parallel ? omp_get_max_threads() : 1) * size_t(per_thread));
        parallel_region(parallel, [&] {
            float* P = scratch.data() + size_t(omp_get_thread_num()) * size_t(per_thread);
            float* KT = P + Tq * Tk;
#pragma omp for collapse(2) schedule(static)
            for (int64_t b = 0; b < B; ++b)
                for (int64_t h = 0; h < H; ++h) {
                    const float *K = pk + b * S * C + h * Dh, *V = pv + b * S * C + h * Dh;
                    transpose_head(KT, K, Tk, C, Dh);
                    probs(P, pq + b * Tq * C + h * Dh, K, KT, valid, b,
                          [&](int64_t i0, int64_t rows, int64_t kend) {  // out [rows, Dh] = P V
                              gemm_small(false, rows, Dh, kend, 1.f, P + i0 * Tk, Tk, V, C, false,
                                         po + (b * Tq + i0) * C + h * Dh, C);
                          });
                }
        });
    }
    flops::add(uint64_t(B * H * (4 * Tq * Tk * Dh + 5 * Tq * Tk)));

    auto gq = grad_target(q), gk = grad_target(k), gv = grad_target(v);
    if (!gq && !gk && !gv) return out;
    Tensor sq = q, sk = k, sv = gq || gk ? v : Tensor(), svalid = key_valid;  // P is recomputed from q, k
    record(out, [=](const float* dout) {
        // q, k, v may be one tensor (or k and v): then they share a cell and only
        // the first GEMM to write each block may use beta = 0. The loop below
        // writes dV, then dQ, then dK, so the targets are taken in that order.
        float bq = 0, bk = 0, bv = 0;
        float* dv = gv ? gv->gemm_target(bv) : nullptr;
        float* dq = gq ? gq->gemm_target(bq) : nullptr;
        float* dk = gk ? gk->gemm_target(bk) : nullptr;
        const float* kv_valid = svalid.defined() ? svalid.data() : nullptr;
        // Per-thread P and dS [Tq, Tk] each and K, V transposed [Dh, Tk] each,
        // allocated outside the region (see the forward).
        const int64_t per_thread = 2 * Tq * Tk + 2 * Dh * Tk;
        std::vector<float> scratch(size_t(parallel ? omp_get_max_threads() : 1) * size_t(per_thread));
        parallel_region(parallel, [&] {
            float* P = scratch.data() + size_t(omp_get_thread_num()) * size_t(per_thread);
            float* dS = P + Tq * Tk;
            float* KT = dS + Tq * Tk;
            float* VT = KT + Dh * Tk;
#pragma omp for collapse(2) schedule(static)
            for (int64_t b = 0; b < B; ++b)
                for (int64_t h = 0; h < H; ++h) {
                    // Row blocks as in the forward. dV and dK sum over row blocks:
                    // the last block, whose keys are all Tk, goes first with the
                    // target's beta and the others add. dV, then dQ, then dK.
                    const int64_t head = h * Dh;
                    const float *K = sk.data() + b * S * C + head, *Q = sq.data() + b * Tq * C + head;
                    const float* V = dq || dk ? sv.data() + b * S * C + head : nullptr;
                    if (Tq > 1) transpose_head(KT, K, Tk, C, Dh);  // probs reads K itself for one query row
                    if (V) transpose_head(VT, V, Tk, C, Dh);
                    probs(P, Q, K, KT, kv_valid, b, [](int64_t, int64_t, int64_t) {});
                    const float* dO = dout + b * Tq * C + head;
                    for (int64_t blk = n_blocks - 1; blk >= 0; --blk) {
                        const int64_t i0 = blk * rows_per_block, rows = std::min(rows_per_block, Tq - i0);
                        const int64_t kend = key_end(i0 + rows);
                        const bool first = blk == n_blocks - 1;
                        if (dv)  // dV [kend, Dh] += P^T dO
                            gemm_small(true, kend, Dh, rows, 1.f, P + i0 * Tk, Tk, dO + i0 * C, C, !first || bv != 0.f,
                                       dv + b * S * C + head, C);
                        if (!dq && !dk) continue;
                        // dP [rows, kend] = dO V^T, then dS = softmax backward (scale folded in).
                        gemm_small(false, rows, kend, Dh, 1.f, dO + i0 * C, C, VT, Tk, false, dS + i0 * Tk, Tk);
                        for (int64_t i = i0; i < i0 + rows; ++i) {
                            float* ds = dS + i * Tk;
                            softmax_backward_row(ds, ds, P + i * Tk, kend, scale);
                        }
                    }
                    for (int64_t blk = 0; dq && blk < n_blocks; ++blk) {  // dQ [rows, Dh] = dS K
                        const int64_t i0 = blk * rows_per_block, rows = std::min(rows_per_block, Tq - i0);
                        gemm_small(false, rows, Dh, key_end(i0 + rows), 1.f, dS + i0 * Tk, Tk, K, C, bq != 0.f,
                                   dq + (b * Tq + i0) * C + head, C);
                    }
                    for (int64_t blk = n_blocks - 1; dk && blk >= 0; --blk) {  // dK [kend, Dh] += dS^T Q
                        const int64_t i0 = blk * rows_per_block, rows = std::min(rows_per_block, Tq - i0);
                        gemm_small(true, key_end(i0 + rows), Dh, rows, 1.f, dS + i0 * Tk, Tk, Q + i0 * C, C,
                                   blk != n_blocks - 1 || bk != 0.f, dk + b * S * C + head, C);
                    }
                }
        });
        const uint64_t gemm_flops = uint64_t(B * H * 2 * Tq * Tk * Dh);
        if (gv) flops::add_grad(gv->is_leaf, gemm_flops);
        if (gq || gk) flops::add_grad(false, gemm_flops + uint64_t(B * H * 4 * Tq * Tk));
        if (gq) flops::add_grad(gq->is_leaf, gemm_flops);
        if (gk) flops::add_grad(gk->is_leaf, gemm_flops);
    });
    return out;
}

}  // namespace peftlab
