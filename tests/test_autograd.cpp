// Autograd layer: GEMMs against the naive oracle, FLOP accounting and
// requires-grad pruning, tape semantics and errors, shape errors,
// determinism, Rng stability, memory accounting. Gradient values are checked
// by finite differences in test_autograd_gradcheck.cpp.
#include <fmt/format.h>
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <limits>
#include <stdexcept>
#include <string>
#include <numeric>
#include <thread>
#include <vector>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/ops_util.h"
#include "autograd/tape.h"
#include "autograd/threads.h"

using namespace peftlab;
using Catch::Contains;

namespace {

Tensor uniform(const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) {
    Rng rng(seed);
    return Tensor::uniform(s, rng, lo, hi);
}
Tensor param(Tensor t) {
    t.set_requires_grad(true);
    return t;
}

flops::Counts region_counts(const std::string& name) {
    for (const auto& [n, c] : flops::by_region())
        if (n == name) return c;
    return flops::Counts{};
}
constexpr size_t kFwd = size_t(flops::Phase::Forward), kDx = size_t(flops::Phase::BackwardDx),
                 kDw = size_t(flops::Phase::BackwardDw);

// Tracked bytes of one buffer of n floats (includes the allocator's padding).
int64_t bytes_of(int64_t n) {
    int64_t before = mem::current_bytes();
    Tensor t = Tensor::empty({n});
    return mem::current_bytes() - before;
}

// |c - ref| per element, with a bound that grows with K (float accumulation
// of K products of values in [-1, 1]; the oracle accumulates in double).
void expect_close_gemm(const float* c, const float* ref, int64_t n, int64_t K, const std::string& what) {
    const double tol = 1e-6 * double(K) + 1e-6;
    int64_t bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
        double e = std::abs(double(c[i]) - double(ref[i]));
        worst = std::max(worst, e);
        bad += e > tol;
    }
    INFO(what << ": worst error " << worst << " (tolerance " << tol << ")");
    CHECK(bad == 0);
}

}  // namespace

// ---- matmul and linear against matmul_naive ------------------------------------------

TEST_CASE("matmul equals matmul_naive for all transposes and sizes", "[autograd][matmul]") {
    const int sizes[] = {1, 7, 33, 129};
    uint64_t seed = 1;
    for (int M : sizes)
        for (int N : sizes)
            for (int K : sizes)
                for (bool ta : {false, true})
                    for (bool tb : {false, true}) {
                        Tensor a = uniform(ta ? Shape{K, M} : Shape{M, K}, seed++);
                        Tensor b = uniform(tb ? Shape{N, K} : Shape{K, N}, seed++);
                        Tensor c = matmul(a, b, ta, tb);
                        REQUIRE(c.shape() == Shape{M, N});
                        std::vector<float> ref(size_t(M) * size_t(N));
                        matmul_naive(ref.data(), a.data(), b.data(), M, N, K, ta, tb);
                        expect_close_gemm(c.data(), ref.data(), c.numel(), K,
                                          fmt::format("M={} N={} K={} ta={} tb={}", M, N, K, ta, tb));
                    }
}

TEST_CASE("batched matmul equals matmul_naive per batch", "[autograd][matmul]") {
    const int64_t B0 = 2, B1 = 3;
    uint64_t seed = 5000;
    for (auto [M, N, K] : {std::tuple<int, int, int>{7, 33, 5}, {33, 1, 129}, {1, 7, 33}, {5, 5, 1}})
        for (bool ta : {false, true})
            for (bool tb : {false, true})
                for (bool shared_b : {false, true}) {
                    Shape sa = ta ? Shape{B0, B1, K, M} : Shape{B0, B1, M, K};
                    Shape sb = tb ? Shape{N, K} : Shape{K, N};
                    if (!shared_b) sb.insert(sb.begin(), {B0, B1});
                    Tensor a = uniform(sa, seed++), b = uniform(sb, seed++);
                    Tensor c = matmul(a, b, ta, tb);
                    REQUIRE(c.shape() == Shape{B0, B1, M, N});
                    for (int64_t i = 0; i < B0 * B1; ++i) {
                        std::vector<float> ref(size_t(M) * size_t(N));
                        matmul_naive(ref.data(), a.data() + i * M * K, b.data() + (shared_b ? 0 : i * K * N), M, N, K,
                                     ta, tb);
                        expect_close_gemm(c.data() + i * M * N, ref.data(), M * N, K,
                                          fmt::format("batch {} M={} N={} K={} ta={} tb={} shared_b={}", i, M, N, K, ta,
                                                      tb, shared_b));
                    }
                }
}

// A decoding step multiplies a few rows (one per sequence) by a weight; such
// GEMMs (at most 16 rows, B of at least 2^16 elements) skip BLAS for a kernel
// of ours that blocks 4 rows by 4 columns of B with AVX-512, 2 rows by 4 with
// AVX2, and up to 2 rows reads B's rows one after another (ops_matmul.cpp). The
// shapes have N not a multiple of 4 and K not a multiple of 16 or 8 (partial
// blocks, tails).
TEST_CASE("few-row GEMMs equal matmul_naive, and a row's result does not depend on the other rows",
          "[autograd][matmul]") {
    uint64_t seed = 9000;
    // {1030, 520}: a weight over 2 MiB, whose batch-1 and batch-2 GEMVs share
    // their groups with stealing (pool_for_balanced).
    for (auto [N, K] : {std::pair<int, int>{303, 259}, {256, 256}, {1030, 64}, {1030, 520}}) {
        for (bool tb : {true, false}) {
            Tensor a = uniform({17, K}, seed++), b = uniform(tb ? Shape{N, K} : Shape{K, N}, seed++);
            Tensor all16 = matmul(slice(a, 0, 0, 16), b, false, tb);
            for (int M = 1; M <= 17; ++M) {
                Tensor am = slice(a, 0, 0, M);
                Tensor c = matmul(am, b, false, tb);
                std::vector<float> ref(size_t(M) * size_t(N));
                matmul_naive(ref.data(), am.data(), b.data(), M, N, K, false, tb);
                expect_close_gemm(c.data(), ref.data(), c.numel(), K, fmt::format("M={} N={} K={} tb={}", M, N, K, tb));
                // Bitwise: the first M rows of the 16-row product (other block positions, other partners).
                if (M <= 16) {
                    const std::vector<float> got = c.to_vector();
                    const std::vector<float> want(all16.data(), all16.data() + int64_t(M) * N);
                    INFO("M=" << M << " N=" << N << " K=" << K << " tb=" << tb);
                    CHECK(got == want);
                }
            }
            // Each row alone (first in its block) equals its row in the 16-row product.
            for (int r = 0; r < 16; ++r) {
                Tensor row = matmul(slice(a, 0, r, r + 1), b, false, tb);
                INFO("row " << r << " N=" << N << " K=" << K << " tb=" << tb);
                CHECK(row.to_vector() == std::vector<float>(all16.data() + int64_t(r) * N, all16.data() + int64_t(r + 1) * N));
            }
        }
    }
    // Threads split B's columns: the same bits at 1 and 2 threads, for 16 rows
    // and for 2 and 1 (the kernel for up to 2 rows, which reads B's rows in turn).
    const int before = threads();
    for (int64_t K : {259, 520})  // 520: B over 2 MiB, shared with stealing at 1 and 2 rows
        for (int64_t M : {16, 2, 1}) {
            Tensor a = uniform({M, K}, 1), b = uniform({K == 259 ? 303 : 1030, K}, 2);
            set_threads(1);
            const std::vector<float> one = matmul(a, b, false, true).to_vector();
            set_threads(2);
            const std::vector<float> two = matmul(a, b, false, true).to_vector();
            INFO("M=" << M << " K=" << K);
            CHECK(one == two);
        }
    set_threads(before);
}

// Attention's per-head products (ops_matmul.cpp) run on detail::gemm_small:
// tiles of 6 rows of C by one strip of columns (16 with AVX2, 32 with
// AVX-512), masked at C's last columns. The shapes cover every remainder of
// rows (M 1..13) and columns (N 1..40, 64, 144), and K = 0; A, B and C have
// leading dimensions beyond their widths, whose padding must stay untouched.
TEST_CASE("gemm_small equals a double-precision product, written or accumulated, and an element's bits do not "
          "depend on the tile around it",
          "[autograd][matmul]") {
    std::vector<int> widths;
    for (int n = 1; n <= 40; ++n) widths.push_back(n);
    widths.insert(widths.end(), {64, 144});
    uint64_t seed = 7100;
    for (bool ta : {false, true})
        for (int K : {0, 1, 7, 64})
            for (int M = 1; M <= 13; ++M)
                for (int N : widths)
                    for (bool accumulate : {false, true}) {
                        const int64_t lda = (ta ? M : K) + 3, ldb = N + 2, ldc = N + 5;
                        const std::vector<float> a = uniform({(ta ? K : M) * lda + 1}, seed++).to_vector();
                        const std::vector<float> b = uniform({K * ldb + 1}, seed++).to_vector();
                        const std::vector<float> c0 = uniform({M * ldc}, seed++).to_vector();
                        std::vector<float> c = c0;
                        const float alpha = 0.125f;
                        detail::gemm_small(ta, M, N, K, alpha, a.data(), lda, b.data(), ldb, accumulate, c.data(), ldc);
                        int64_t bad = 0, padding_changed = 0;
                        for (int i = 0; i < M; ++i) {
                            for (int j = 0; j < N; ++j) {
                                double ref = accumulate ? c0[size_t(i * ldc + j)] : 0.0, dot = 0;
                                for (int k = 0; k < K; ++k)
                                    dot += double(a[size_t(ta ? k * lda + i : i * lda + k)]) * b[size_t(k * ldb + j)];
                                ref += alpha * dot;
                                bad += std::abs(c[size_t(i * ldc + j)] - ref) > 1e-6 * (K + 2);
                            }
                            for (int j = N; j < ldc; ++j) padding_changed += c[size_t(i * ldc + j)] != c0[size_t(i * ldc + j)];
                        }
                        INFO("ta=" << ta << " M=" << M << " N=" << N << " K=" << K << " accumulate=" << accumulate);
                        CHECK(bad == 0);
                        CHECK(padding_changed == 0);
                    }
#if defined(__AVX2__) && defined(__FMA__)  // gemm_small's own tiles (else gemm())
    // Bitwise: C [13, 144] at once, and its block at rows 5.., columns 19..
    // (other tile rows, other strip columns, masked lanes) computed alone.
    const int64_t M = 13, N = 144, K = 64;
    for (bool ta : {false, true}) {
        const std::vector<float> a = uniform({M * K}, 7001).to_vector(), b = uniform({K * N}, 7002).to_vector();
        std::vector<float> whole(size_t(M * N)), part(size_t(M * N), 0.f);
        const int64_t lda = ta ? M : K;
        detail::gemm_small(ta, M, N, K, 1.f, a.data(), lda, b.data(), N, false, whole.data(), N);
        const int64_t r0 = 5, c0 = 19;
        detail::gemm_small(ta, M - r0, N - c0, K, 1.f, a.data() + (ta ? r0 : r0 * K), lda, b.data() + c0, N, false,
                           part.data(), N);
        int64_t differ = 0;
        for (int64_t i = r0; i < M; ++i)
            for (int64_t j = c0; j < N; ++j) differ += part[size_t((i - r0) * N + j - c0)] != whole[size_t(i * N + j)];
        INFO("ta=" << ta);
        CHECK(differ == 0);
    }
#endif
}

// The Linear layers' GEMMs (detail::gemm above the few-row kernel): with
// AVX-512 our packed tiles (gemm_packed.cpp: blocks of 384 in K, 3072 columns,
// 168 rows per thread block, 14 x 32 tiles), else cblas_sgemm. The shapes
// cross each block size and leave partial tiles; C's padding between rows
// must stay untouched; beta 0 must not read C (NaN there).
TEST_CASE("gemm equals a double-precision product across its blocks; a row's bits do not depend on the batch or "
          "the thread count",
          "[autograd][matmul]") {
    struct Case {
        int64_t M, N, K;
    };
    uint64_t seed = 7300;
    for (const Case& s : {Case{17, 45, 385}, Case{200, 33, 800}, Case{350, 70, 40}, Case{31, 3100, 20}})
        for (bool ta : {false, true})
            for (bool tb : {false, true})
                for (float beta : {0.f, 1.f, 0.5f}) {
                    const int64_t lda = (ta ? s.M : s.K) + 3, ldb = (tb ? s.K : s.N) + 2, ldc = s.N + 5;
                    const std::vector<float> a = uniform({(ta ? s.K : s.M) * lda}, seed++).to_vector();
                    const std::vector<float> b = uniform({(tb ? s.N : s.K) * ldb}, seed++).to_vector();
                    std::vector<float> c0 = uniform({s.M * ldc}, seed++).to_vector();
                    if (beta == 0.f)
                        for (int64_t i = 0; i < s.M; ++i)
                            for (int64_t j = 0; j < s.N; ++j) c0[size_t(i * ldc + j)] = std::nanf("");
                    std::vector<float> c = c0;
                    const float alpha = 0.25f;
                    detail::gemm(ta, tb, s.M, s.N, s.K, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
                    int64_t bad = 0, padding_changed = 0;
                    for (int64_t i = 0; i < s.M; ++i) {
                        for (int64_t j = 0; j < s.N; ++j) {
                            double dot = 0;
                            for (int64_t k = 0; k < s.K; ++k)
                                dot += double(a[size_t(ta ? k * lda + i : i * lda + k)]) *
                                       b[size_t(tb ? j * ldb + k : k * ldb + j)];
                            const double ref = alpha * dot + (beta == 0.f ? 0.0 : beta * c0[size_t(i * ldc + j)]);
                            bad += !(std::abs(c[size_t(i * ldc + j)] - ref) <= 1e-6 * double(s.K + 2));
                        }
                        for (int64_t j = s.N; j < ldc; ++j)
                            padding_changed += c[size_t(i * ldc + j)] != c0[size_t(i * ldc + j)];
                    }
                    INFO("M=" << s.M << " N=" << s.N << " K=" << s.K << " ta=" << ta << " tb=" << tb << " beta=" << beta);
                    CHECK(bad == 0);
                    CHECK(padding_changed == 0);
                }
#if defined(__AVX512F__)  // gemm_packed's promise; OpenBLAS makes none
    // Bitwise: a Linear layer's x W^T at 1 and 2 threads, C split by rows
    // (400 rows, several row blocks; 3 column panels) and by B's column panels
    // (200 rows, 10 panels); rows computed alone, at 17 and 100 rows (above
    // the few-row kernel's 16, and at most 128: gemm_weight_as_a, the weight
    // read in place and C^T's tiles transposed), at 1 and 2 threads, equal
    // their rows in the batch.
    struct Split {
        int64_t M, N, K, rows[2];
    };
    uint64_t wseed = 7401;
    for (const Split& sp : {Split{400, 96, 500, {37, 399}}, Split{200, 300, 500, {5, 199}}}) {
        const int64_t M = sp.M, N = sp.N, K = sp.K;
        const std::vector<float> x = uniform({M * K}, wseed++).to_vector(), w = uniform({N * K}, wseed++).to_vector();
        const int before = threads();
        std::vector<float> by_threads[2];
        for (int t : {1, 2}) {
            set_threads(t);
            by_threads[t - 1].assign(size_t(M * N), 0.f);
            detail::gemm(false, true, M, N, K, 1.f, x.data(), K, w.data(), K, 0.f, by_threads[t - 1].data(), N);
        }
        set_threads(before);
        INFO("M=" << M << " N=" << N);
        CHECK(by_threads[0] == by_threads[1]);
        // 17 rows: one x panel, below the parallel threshold at N = 96; 100
        // rows: four panels, on both threads at N = 300.
        for (int64_t r : sp.rows)
            for (int64_t n_rows : {17, 100})
                for (int t : {1, 2}) {
                    std::vector<float> rows(size_t(n_rows * K)), out(size_t(n_rows * N));
                    for (int64_t i = 0; i < n_rows; ++i)
                        std::copy_n(x.data() + ((r + i) % M) * K, K, rows.data() + i * K);
                    set_threads(t);
                    detail::gemm(false, true, n_rows, N, K, 1.f, rows.data(), K, w.data(), K, 0.f, out.data(), N);
                    set_threads(before);
                    int64_t differ = 0;
                    for (int64_t i = 0; i < n_rows; ++i)
                        differ += !std::equal(out.begin() + i * N, out.begin() + (i + 1) * N,
                                              by_threads[1].begin() + ((r + i) % M) * N);
                    INFO("rows from " << r << ": " << n_rows << " at " << t << " threads");
                    CHECK(differ == 0);
                }
    }
#endif
}

TEST_CASE("matmul with K = 0 gives zeros", "[autograd][matmul]") {
    Tensor c = matmul(Tensor::zeros({2, 0}), Tensor::zeros({0, 3}));
    CHECK(c.shape() == Shape{2, 3});
    CHECK(c.to_vector() == std::vector<float>(6, 0.f));
}

TEST_CASE("empty tensors go through forward and backward", "[autograd][tape]") {
    // Zero-element tensors have no data pointer; no op may hand it to memcpy (UB
    // even for 0 bytes; run under -fsanitize=undefined to see it).
    clear_tape();
    Tensor x = param(uniform({2, 3}, 1));
    Tensor e = param(Tensor::zeros({2, 0}));
    Tensor empty_slice = slice(x, 1, 1, 1);
    CHECK(empty_slice.shape() == Shape{2, 0});
    Tensor y = concat({reshape(e, {2, 0}), mul_scalar(empty_slice, 2.f), x, e}, 1);
    CHECK(y.shape() == Shape{2, 3});
    CHECK(sum(mul_scalar(e, 3.f)).item() == 0.f);
    backward(add(sum(y), sum(reshape(mul(e, e), {0}))));
    CHECK(x.grad().to_vector() == std::vector<float>(6, 1.f));
    CHECK(e.grad().numel() == 0);
    CHECK(tape_size() == 0);
    x.zero_grad();
    e.zero_grad();
}

// Rows 6 and 40 (above gemm_few_rows' 16: with AVX-512 the bias is added in
// gemm_packed's epilogue), in 400 crossing its 384-deep blocks, out 45 its
// 32-column tiles.
TEST_CASE("linear equals x W^T + b by the naive kernel", "[autograd][matmul]") {
    for (int64_t rows : {3, 20})
        for (auto [in, out] : {std::pair<int, int>{7, 33}, {33, 7}, {129, 1}, {1, 5}, {400, 45}}) {
            const int64_t R = 2 * rows;
            Tensor x = uniform({2, rows, in}, 7 + in), w = uniform({out, in}, 8 + out), b = uniform({out}, 9);
            Tensor y = linear(x, w, b), y0 = linear(x, w);
            REQUIRE(y.shape() == Shape{2, rows, out});
            std::vector<float> ref(size_t(R * out));
            matmul_naive(ref.data(), x.data(), w.data(), R, out, in, false, true);
            expect_close_gemm(y0.data(), ref.data(), y0.numel(), in,
                              fmt::format("linear no bias R={} in={} out={}", R, in, out));
            for (int64_t r = 0; r < R; ++r)
                for (int64_t j = 0; j < out; ++j) ref[size_t(r * out + j)] += b.data()[j];
            expect_close_gemm(y.data(), ref.data(), y.numel(), in,
                              fmt::format("linear with bias R={} in={} out={}", R, in, out));
        }
}

// ---- FLOP accounting and requires-grad pruning ----------------------------------------------

TEST_CASE("GEMM forward counts exactly 2*M*N*K", "[autograd][flops]") {
    clear_tape();
    flops::reset();
    Tensor c = matmul(uniform({5, 7}, 1), uniform({7, 3}, 2));
    CHECK(flops::totals()[kFwd] == 2u * 5 * 3 * 7);
    flops::reset();
    c = matmul(uniform({2, 4, 7, 5}, 1), uniform({3, 7}, 2), true, true);  // [2,4] x [5, 3]
    CHECK(c.shape() == Shape{2, 4, 5, 3});
    CHECK(flops::totals()[kFwd] == 2u * 8 * 5 * 3 * 7);
    flops::reset();
    c = linear(uniform({6, 7}, 1), uniform({3, 7}, 2));
    CHECK(flops::totals() == flops::Counts{2u * 6 * 3 * 7, 0, 0, 0});
    CHECK(tape_size() == 0);
}

TEST_CASE("linear with frozen weight: backward computes dx only", "[autograd][flops]") {
    const uint64_t M = 4, K = 6, N = 5;
    clear_tape();
    flops::reset();
    Tensor x0 = param(uniform({int64_t(M), int64_t(K)}, 1));
    Tensor W = uniform({int64_t(N), int64_t(K)}, 2);  // frozen
    Tensor x = mul_scalar(x0, 1.f);                   // an activation (non-leaf) that requires grad
    Tensor y;
    {
        flops::Region r("proj");
        y = linear(x, W);
    }
    CHECK(y.requires_grad());
    backward(sum(y));
    const flops::Counts proj = region_counts("proj");
    CHECK(proj[kFwd] == 2 * M * N * K);
    CHECK(proj[kDx] == 2 * M * N * K);
    CHECK(proj[kDw] == 0);
    // Totals: mul_scalar M*K forward and M*K backward (to the leaf x0: dW by the
    // convention), sum M*N forward and M*N backward (to y, an activation).
    CHECK(flops::totals() == flops::Counts{M * K + 2 * M * N * K + M * N, M * N + 2 * M * N * K, M * K, 0});
    CHECK_FALSE(W.requires_grad());
}

TEST_CASE("linear with a trainable leaf input counts its gradient as dW (flops.h convention)", "[autograd][flops]") {
    // flops.h: backward FLOPs go to backward_dw when the target is a leaf. A
    // leaf that requires grad is a trainable parameter (prompt embeddings, say).
    const uint64_t M = 3, K = 4, N = 2;
    clear_tape();
    flops::reset();
    Tensor x = param(uniform({int64_t(M), int64_t(K)}, 1));
    Tensor W = uniform({int64_t(N), int64_t(K)}, 2);
    Tensor seed = Tensor::ones({int64_t(M), int64_t(N)});
    backward(linear(x, W), &seed);
    CHECK(flops::totals() == flops::Counts{2 * M * N * K, 0, 2 * M * N * K, 0});
}

TEST_CASE("linear with trainable weight and frozen input: no dx GEMM", "[autograd][flops]") {
    const uint64_t M = 4, K = 6, N = 5;
    clear_tape();
    flops::reset();
    Tensor x = uniform({int64_t(M), int64_t(K)}, 1);  // frozen input
    Tensor W = param(uniform({int64_t(N), int64_t(K)}, 2)), b = param(uniform({int64_t(N)}, 3));
    Tensor y;
    {
        flops::Region r("proj");
        y = linear(x, W, b);
    }
    backward(sum(y));
    const flops::Counts proj = region_counts("proj");
    CHECK(proj[kFwd] == 2 * M * N * K + M * N);
    CHECK(proj[kDx] == 0);
    CHECK(proj[kDw] == 2 * M * N * K + M * N);  // dW GEMM + bias column sums
    CHECK_FALSE(x.has_grad());
    // Without the bias trainable: the bias pass disappears from backward.
    flops::reset();
    Tensor b_frozen = b.detach();
    {
        flops::Region r("proj");
        y = linear(x, W, b_frozen);
    }
    backward(sum(y));
    CHECK(region_counts("proj")[kDw] == 2 * M * N * K);
    W.zero_grad();
    b.zero_grad();
}

TEST_CASE("frozen subgraphs record nothing", "[autograd][flops]") {
    clear_tape();
    Tensor x = uniform({2, 3, 8}, 1), w = uniform({8, 8}, 2), g = Tensor::ones({8}), be = Tensor::zeros({8});
    Tensor h = layer_norm(gelu(linear(x, w)), g, be);
    Tensor a = attention(h, h, h, 2, true);
    Tensor l = cross_entropy(a, {0, 1, 2, 3, 4, 5});
    CHECK(tape_size() == 0);
    CHECK_FALSE(a.requires_grad());
    CHECK_FALSE(l.requires_grad());
    CHECK_THROWS_AS(backward(l), std::logic_error);

    // Attention with frozen q, k, v after a trainable branch elsewhere: still no node.
    Tensor p = param(uniform({3}, 3));
    Tensor unrelated = mul(p, p);
    size_t before = tape_size();
    flops::reset();
    Tensor o = attention(x, x, x, 4, false);
    CHECK(tape_size() == before);
    CHECK_FALSE(o.requires_grad());
    CHECK(flops::totals()[kFwd] == uint64_t(2 * 4 * (4 * 3 * 3 * 2 + 5 * 3 * 3)));
    clear_tape();
}

TEST_CASE("attention backward computes only the gradients that are needed", "[autograd][flops]") {
    const uint64_t B = 2, Tq = 3, Tk = 5, C = 8, H = 2, Dh = C / H;
    const uint64_t gemm = B * H * 2 * Tq * Tk * Dh, smax_bwd = B * H * 4 * Tq * Tk;
    auto run = [&](bool q_on, bool k_on, bool v_on) {
        clear_tape();
        flops::reset();
        Tensor q = uniform({int64_t(B), int64_t(Tq), int64_t(C)}, 1);
        Tensor k = uniform({int64_t(B), int64_t(Tk), int64_t(C)}, 2);
        Tensor v = uniform({int64_t(B), int64_t(Tk), int64_t(C)}, 3);
        if (q_on) q.set_requires_grad(true);
        if (k_on) k.set_requires_grad(true);
        if (v_on) v.set_requires_grad(true);
        Tensor o;
        {
            flops::Region r("attn");
            o = attention(q, k, v, int(H), true);
        }
        Tensor seed = Tensor::ones(o.shape());
        backward(o, &seed);
        CHECK(q.has_grad() == q_on);
        CHECK(k.has_grad() == k_on);
        CHECK(v.has_grad() == v_on);
        return region_counts("attn");
    };
    const uint64_t fwd = B * H * (4 * Tq * Tk * Dh + 5 * Tq * Tk);
    // Leaves' gradients count as dW; dP and the softmax backward as dX.
    CHECK(run(false, false, true) == flops::Counts{fwd, 0, gemm, 0});
    CHECK(run(true, false, false) == flops::Counts{fwd, gemm + smax_bwd, gemm, 0});
    CHECK(run(false, true, false) == flops::Counts{fwd, gemm + smax_bwd, gemm, 0});
    CHECK(run(true, true, true) == flops::Counts{fwd, gemm + smax_bwd, 3 * gemm, 0});
}

TEST_CASE("FLOP counts follow the convention in flops.h", "[autograd][flops]") {
    // All inputs are leaves, so every backward FLOP lands in backward_dw; the
    // backward is seeded with ones so no extra op is counted.
    struct Case {
        const char* what;
        std::function<Tensor()> build;
        uint64_t fwd, bwd_dw, bwd_dx = 0;
    };
    auto P = [](const Shape& s, uint64_t seed = 1) { return param(uniform(s, seed, 0.5f, 1.5f)); };
    const std::vector<Case> cases = {
        {"add with broadcast",
         [&] {
             return add(P({3, 4}), P({4}));
         },
         12, 24},
        {"sub",
         [&] {
             return sub(P({3, 4}), P({3, 4}));
         },
         12, 24},
        {"mul",
         [&] {
             return mul(P({3, 4}), P({3, 1}));
         },
         12, 24},
        {"div (3 for the divisor)",
         [&] {
             return div(P({3, 4}), P({3, 4}));
         },
         12, 12 + 36},
        {"add_scalar",
         [&] {
             return add_scalar(P({3, 4}), 1.f);
         },
         12, 12},
        {"mul_scalar",
         [&] {
             return mul_scalar(P({3, 4}), 2.f);
         },
         12, 12},
        {"neg",
         [&] {
             return neg(P({3, 4}));
         },
         12, 12},
        {"relu",
         [&] {
             return relu(P({3, 4}));
         },
         12, 12},
        {"masked_fill",
         [&] {
             return masked_fill(P({3, 4}), Tensor::ones({4}), 0.f);
         },
         12, 12},
        {"exp",
         [&] {
             return exp(P({3, 4}));
         },
         12, 24},
        {"log",
         [&] {
             return log(P({3, 4}));
         },
         12, 24},
        {"tanh",
         [&] {
             return tanh(P({3, 4}));
         },
         12, 24},
        {"sqrt",
         [&] {
             return sqrt(P({3, 4}));
         },
         12, 24},
        {"gelu",
         [&] {
             return gelu(P({3, 4}));
         },
         96, 192},
        {"gelu_erf",
         [&] {
             return gelu_erf(P({3, 4}));
         },
         96, 192},
        {"dropout",
         [&] {
             Rng r(1);
             return dropout(P({3, 4}), 0.5f, r);
         },
         24, 12},
        // sum() and mean() of everything reduce a reshape of their input: the
        // reshape's output is not a leaf, so the gradient counts as dX (as for
        // expand of a reshaped prompt; peft/report.cpp mirrors this).
        {"sum all",
         [&] {
             return sum(P({3, 4}));
         },
         12, 0, 12},
        {"mean all",
         [&] {
             return mean(P({3, 4}));
         },
         12, 0, 12},
        {"sum axis",
         [&] {
             return sum(P({3, 4}), 1);
         },
         12, 12},
        {"mean axis keepdim",
         [&] {
             return mean(P({3, 4}), 0, true);
         },
         12, 12},
        {"matmul batched x shared",
         [&] {
             return matmul(P({2, 3, 4}), P({4, 5}));
         },
         240, 480},
        {"linear with bias",
         [&] {
             return linear(P({6, 4}), P({5, 4}), P({5}));
         },
         240 + 30, 480 + 30},
        {"layer_norm",
         [&] {
             return layer_norm(P({3, 4}), P({4}), P({4}));
         },
         96, 144 + 24 + 24},
        {"softmax",
         [&] {
             return softmax(P({3, 4}));
         },
         60, 48},
        {"softmax causal",
         [&] {
             return softmax(P({3, 4}), true);
         },
         60, 48},
        {"log_softmax",
         [&] {
             return log_softmax(P({3, 4}));
         },
         60, 48},
        {"cross_entropy",
         [&] {
             return cross_entropy(P({3, 4}), {0, -1, 3});
         },
         72, 36},
        {"embedding",
         [&] {
             return embedding(P({5, 3}), {0, 4, 4, 1});
         },
         0, 12},
        {"expand",
         [&] {
             return expand(P({1, 3}), {4, 3});
         },
         12, 12},
        {"reshape",
         [&] {
             return reshape(P({3, 4}), {2, 6});
         },
         0, 0},
        {"transpose",
         [&] {
             return transpose(P({3, 4}), 0, 1);
         },
         0, 0},
        {"permute",
         [&] {
             return permute(P({2, 3, 4}), {2, 0, 1});
         },
         0, 0},
        {"concat",
         [&] {
             return concat({P({3, 4}), P({3, 2})}, 1);
         },
         0, 0},
        {"slice",
         [&] {
             return slice(P({3, 4}), 1, 1, 3);
         },
         0, 0},
        {"index_rows",
         [&] {
             return index_rows(P({3, 4}), {2, 2, 0});
         },
         0, 0},
        // B=2, H=2, Tq=Tk=3, Dh=4: forward B*H*(4*9*4 + 5*9); backward dV, dQ,
        // dK to the leaves, dP + softmax backward to activations.
        {"attention",
         [&] {
             return attention(P({2, 3, 8}, 1), P({2, 3, 8}, 2), P({2, 3, 8}, 3), 2, true);
         },
         756, 3 * 288, 288 + 144},
    };
    for (const Case& c : cases) {
        INFO(c.what);
        clear_tape();
        flops::reset();
        Tensor y = c.build();
        CHECK(flops::totals() == flops::Counts{c.fwd, 0, 0, 0});
        Tensor seed = Tensor::ones(y.shape());
        backward(y, &seed);
        CHECK(flops::totals() == flops::Counts{c.fwd, c.bwd_dx, c.bwd_dw, 0});
    }
}

TEST_CASE("FLOPs land in named regions, backward replayed in the forward's region", "[autograd][flops]") {
    clear_tape();
    flops::reset();
    const uint64_t R = 6, C = 4, F = 8;
    Tensor x = uniform({int64_t(R), int64_t(C)}, 1);
    Tensor w1 = param(uniform({int64_t(F), int64_t(C)}, 2)), w2 = param(uniform({int64_t(C), int64_t(F)}, 3));
    Tensor y;
    {
        flops::Region outer("blocks.0");
        Tensor h;
        {
            flops::Region inner("mlp");
            h = gelu(linear(x, w1));
            CHECK(flops::current_region() != 0);
        }
        {
            flops::Region inner("proj");
            y = linear(h, w2);
        }
    }
    CHECK(flops::current_region() == 0);
    Tensor loss = mean(y);
    backward(loss);  // outside every region
    CHECK(flops::current_phase() == flops::Phase::Forward);
    CHECK(region_counts("blocks.0.mlp") == flops::Counts{2 * R * F * C + 8 * R * F, 16 * R * F, 2 * R * F * C, 0});
    // proj: dW to the leaf w2, dX to h (an activation).
    CHECK(region_counts("blocks.0.proj") == flops::Counts{2 * R * F * C, 2 * R * F * C, 2 * R * F * C, 0});
    CHECK(region_counts("") == flops::Counts{R * C, R * C, 0, 0});  // the mean
    CHECK(region_counts("blocks.0") == flops::Counts{});            // nothing ran directly in the parent
    flops::Counts sum_regions{};
    for (const auto& [name, c] : flops::by_region())
        for (size_t i = 0; i < c.size(); ++i) sum_regions[i] += c[i];
    CHECK(sum_regions == flops::totals());
    CHECK(std::string(flops::phase_name(flops::Phase::BackwardDw)) == "backward_dw");
    flops::reset();
    CHECK(flops::by_region().empty());
    w1.zero_grad();
    w2.zero_grad();
}

TEST_CASE("NoGradGuard records nothing", "[autograd][tape]") {
    clear_tape();
    Tensor x = param(uniform({3, 4}, 1)), w = param(uniform({2, 4}, 2));
    Tensor keep = mul(x, x);  // one node from before
    const size_t before = tape_size();
    REQUIRE(before == 1);
    flops::reset();
    {
        NoGradGuard ng;
        CHECK_FALSE(grad_enabled());
        Tensor y = linear(x, w);
        Tensor z = attention(reshape(x, {1, 3, 4}), reshape(x, {1, 3, 4}), reshape(x, {1, 3, 4}), 2, true);
        CHECK_FALSE(y.requires_grad());
        CHECK_FALSE(z.requires_grad());
        CHECK(tape_size() == before);
        { NoGradGuard nested; }
        CHECK_FALSE(grad_enabled());  // the nested guard restores "off", not "on"
    }
    CHECK(grad_enabled());
    CHECK(flops::totals()[kFwd] == 2u * 3 * 2 * 4 + 1 * 2 * (4 * 3 * 3 * 2 + 5 * 3 * 3));  // forward still counted
    CHECK(linear(x, w).requires_grad());
    clear_tape();
}

// ---- tape semantics and errors ------------------------------------------------------------------

TEST_CASE("tape: errors on misuse", "[autograd][tape]") {
    clear_tape();
    Tensor frozen = uniform({2, 3}, 1);
    CHECK_THROWS_AS(frozen.grad(), std::logic_error);
    CHECK_THROWS_WITH(frozen.set_name("w_frozen").grad(), Contains("w_frozen") && Contains("does not require grad"));

    Tensor w = param(uniform({2, 3}, 2));
    Tensor y = mul(w, frozen);
    CHECK_THROWS_AS(backward(y), std::invalid_argument);
    CHECK_THROWS_WITH(backward(y), Contains("not a scalar") && Contains("[2, 3]"));
    Tensor bad_seed = Tensor::ones({3, 2});
    CHECK_THROWS_WITH(backward(y, &bad_seed), Contains("seed") && Contains("[3, 2]") && Contains("[2, 3]"));
    CHECK(tape_size() == 1);  // a failed backward leaves the tape alone
    CHECK_FALSE(w.has_grad());

    Tensor no_trainable = sum(mul(frozen, frozen));
    CHECK_THROWS_AS(backward(no_trainable), std::logic_error);
    CHECK_THROWS_WITH(backward(no_trainable), Contains("does not require grad"));

    // Only leaves may change requires_grad.
    CHECK_THROWS_AS(y.set_requires_grad(false), std::logic_error);
    CHECK_FALSE(y.is_leaf());
    CHECK(w.is_leaf());
    clear_tape();
    CHECK(tape_size() == 0);
}

TEST_CASE("tape: seeded backward of a non-scalar", "[autograd][tape]") {
    clear_tape();
    Tensor w = param(uniform({2, 3}, 1));
    Tensor c = uniform({2, 3}, 2);
    Tensor y = mul(w, c);
    Tensor seed = uniform({2, 3}, 3);
    backward(y, &seed);
    auto g = w.grad().to_vector();
    for (size_t i = 0; i < 6; ++i) CHECK(g[i] == c.data()[i] * seed.data()[i]);
}

TEST_CASE("tape: gradients accumulate into leaves until zero_grad", "[autograd][tape]") {
    clear_tape();
    Tensor x = param(uniform({4, 3}, 1));
    Tensor w = uniform({2, 3}, 2);
    auto step = [&] {
        backward(sum(mul_scalar(linear(x, w), 0.5f)));
        CHECK(tape_size() == 0);
        return x.grad().to_vector();
    };
    auto g1 = step();
    auto g2 = step();
    for (size_t i = 0; i < g1.size(); ++i) CHECK(g2[i] == 2.f * g1[i]);  // exact: doubling
    x.zero_grad();
    CHECK_FALSE(x.has_grad());
    CHECK(x.grad().to_vector() == std::vector<float>(12, 0.f));
    CHECK(step() == g1);
    // The gradient of a leaf that nothing reached is zeros, not an error.
    Tensor unused = param(uniform({2}, 3));
    CHECK(unused.grad().to_vector() == std::vector<float>{0.f, 0.f});
    x.zero_grad();
}

TEST_CASE("tape: a graph is consumed by its backward", "[autograd][tape]") {
    clear_tape();
    Tensor w = param(uniform({3}, 1));
    Tensor loss = sum(mul(w, w));
    backward(loss);
    auto g = w.grad().to_vector();
    // A second backward through the same graph would silently do nothing: it is an error.
    CHECK_THROWS_AS(backward(loss), std::logic_error);
    CHECK(w.grad().to_vector() == g);

    // Two losses on one tape: the first backward runs (and frees) the whole
    // tape, so the second must fail loudly instead of leaving gradients out.
    w.zero_grad();
    Tensor l1 = sum(w), l2 = sum(mul(w, w));
    backward(add(l1, l2));  // the supported way: one backward of the sum
    for (size_t i = 0; i < 3; ++i) CHECK(w.grad().data()[i] == Approx(1.f + 2.f * w.data()[i]));
    w.zero_grad();
    l1 = sum(w);
    l2 = sum(mul(w, w));
    backward(l1);
    CHECK_THROWS_WITH(backward(l2), Contains("backward"));
    // clear_tape() discards recorded nodes without running them.
    Tensor l3 = sum(w);
    clear_tape();
    CHECK_THROWS_AS(backward(l3), std::logic_error);
    w.zero_grad();
}

TEST_CASE("tape: backward of a leaf loss", "[autograd][tape]") {
    clear_tape();
    Tensor s = param(Tensor::full({}, 3.f));
    backward(s);
    CHECK(s.grad().item() == 1.f);
}

TEST_CASE("tape: intermediate gradients and saved activations are freed by backward", "[autograd][tape][mem]") {
    clear_tape();
    Tensor x = uniform({8, 16}, 1);
    Tensor w1 = param(uniform({32, 16}, 2)), g = param(Tensor::ones({32})), be = Tensor::zeros({32});
    Tensor w2 = param(uniform({5, 32}, 3));
    const int64_t leaf_grads = bytes_of(w1.numel()) + bytes_of(g.numel()) + bytes_of(w2.numel());
    const int64_t base = mem::current_bytes();
    {
        Tensor h = gelu(linear(x, w1));
        Tensor hn = layer_norm(h, g, be);
        Tensor logits = linear(hn, w2);
        Tensor loss = cross_entropy(logits, {0, 1, 2, 3, 4, 0, 1, -1});
        const int64_t after_forward = mem::current_bytes();
        CHECK(after_forward > base);
        backward(loss);
        // Only the leaves' gradients are new; saved statistics and
        // probabilities held by the closures are gone.
        CHECK(mem::current_bytes() < after_forward + leaf_grads);
        CHECK_FALSE(h.has_grad());
        CHECK_FALSE(hn.has_grad());
        CHECK_FALSE(logits.has_grad());
        CHECK_FALSE(loss.has_grad());
        CHECK(w1.has_grad());
        CHECK(g.has_grad());
        CHECK(w2.has_grad());
    }
    CHECK(mem::current_bytes() == base + leaf_grads);
    w1.zero_grad();
    g.zero_grad();
    w2.zero_grad();
    CHECK(mem::current_bytes() == base);
}

TEST_CASE("tape: detach and clone", "[autograd][tape]") {
    clear_tape();
    Tensor w = param(uniform({2, 2}, 1));
    Tensor d = w.detach(), c = w.clone();
    CHECK_FALSE(d.requires_grad());
    CHECK_FALSE(c.requires_grad());
    CHECK(d.data() == w.data());
    CHECK(c.data() != w.data());
    CHECK(c.to_vector() == w.to_vector());
    Tensor y = mul(d, d);
    CHECK_FALSE(y.requires_grad());
    CHECK(tape_size() == 0);
}

// ---- shape and axis errors -------------------------------------------------------------------

#define CHECK_INVALID(expr, matcher)                  \
    do {                                              \
        CHECK_THROWS_AS(expr, std::invalid_argument); \
        CHECK_THROWS_WITH(expr, matcher);             \
    } while (0)

TEST_CASE("shape errors name the op and both shapes", "[autograd][errors]") {
    clear_tape();
    auto T = [](const Shape& s) { return Tensor::zeros(s); };
    CHECK_INVALID(add(T({2, 3}), T({4})), Contains("add") && Contains("[2, 3]") && Contains("[4]"));
    CHECK_INVALID(sub(T({2, 3}), T({3, 3})), Contains("sub") && Contains("[2, 3]") && Contains("[3, 3]"));
    CHECK_INVALID(mul(T({2, 3, 4}), T({2, 4})), Contains("mul") && Contains("[2, 3, 4]") && Contains("[2, 4]"));
    CHECK_INVALID(div(T({5}), T({6})), Contains("div") && Contains("[5]") && Contains("[6]"));
    CHECK_INVALID(add(T({1, 1, 1, 1, 2}), T({2})), Contains("add") && Contains("[1, 1, 1, 1, 2]"));
    CHECK_INVALID(matmul(T({4, 8}), T({7, 3})), Contains("matmul") && Contains("[4, 8]") && Contains("[7, 3]"));
    CHECK_INVALID(matmul(T({4, 8}), T({7, 8}), false, false), Contains("matmul") && Contains("8 != 7"));
    CHECK_INVALID(matmul(T({4, 8}), T({3, 7}), false, true), Contains("matmul") && Contains("[3, 7]"));
    CHECK_INVALID(matmul(T({2, 4, 8}), T({3, 8, 2})),
                  Contains("matmul") && Contains("[2, 4, 8]") && Contains("[3, 8, 2]"));
    CHECK_INVALID(matmul(T({4, 8}), T({2, 8, 2})), Contains("matmul") && Contains("[4, 8]") && Contains("[2, 8, 2]"));
    CHECK_INVALID(matmul(T({8}), T({8, 2})), Contains("matmul") && Contains("[8]"));
    CHECK_INVALID(linear(T({4, 8}), T({3, 7})), Contains("linear") && Contains("[4, 8]") && Contains("[3, 7]"));
    CHECK_INVALID(linear(T({4, 8}), T({8})), Contains("linear") && Contains("[4, 8]") && Contains("[8]"));
    CHECK_INVALID(linear(T({4, 8}), T({3, 8}), T({4})), Contains("linear") && Contains("[4]") && Contains("[3, 8]"));
    CHECK_INVALID(layer_norm(T({2, 8}), T({7}), T({8})),
                  Contains("layer_norm") && Contains("[2, 8]") && Contains("[7]"));
    CHECK_INVALID(layer_norm(T({2, 8}), T({8}), T({2, 8})), Contains("layer_norm") && Contains("[2, 8]"));
    CHECK_INVALID(layer_norm(T({2, 8}), Tensor(), T({8})), Contains("layer_norm") && Contains("undefined"));
    CHECK_INVALID(attention(T({2, 3, 8}), T({2, 4, 8}), T({2, 5, 8}), 2, false),
                  Contains("attention") && Contains("[2, 3, 8]") && Contains("[2, 4, 8]") && Contains("[2, 5, 8]"));
    CHECK_INVALID(attention(T({2, 3, 8}), T({2, 4, 6}), T({2, 4, 6}), 2, false),
                  Contains("attention") && Contains("[2, 3, 8]") && Contains("[2, 4, 6]"));
    CHECK_INVALID(attention(T({2, 3, 8}), T({1, 3, 8}), T({1, 3, 8}), 2, false),
                  Contains("attention") && Contains("[1, 3, 8]"));
    CHECK_INVALID(attention(T({3, 8}), T({3, 8}), T({3, 8}), 2, false), Contains("attention") && Contains("[3, 8]"));
    CHECK_INVALID(attention(T({2, 3, 8}), T({2, 3, 8}), T({2, 3, 8}), 3, false),
                  Contains("attention") && Contains("n_heads = 3") && Contains("8"));
    CHECK_INVALID(attention(T({2, 5, 8}), T({2, 3, 8}), T({2, 3, 8}), 2, true),
                  Contains("attention") && Contains("causal"));
    CHECK_INVALID(attention(T({2, 3, 8}), T({2, 5, 8}), T({2, 5, 8}), 2, true, T({2, 4})),
                  Contains("attention") && Contains("key_valid") && Contains("[2, 4]"));
    CHECK_INVALID(softmax(T({2, 3, 5}), false, T({2, 4})),
                  Contains("softmax") && Contains("[2, 4]") && Contains("[2, 3, 5]"));
    CHECK_INVALID(softmax(T({2, 5, 3}), true), Contains("softmax") && Contains("[2, 5, 3]"));
    CHECK_INVALID(softmax(T({}), false), Contains("softmax"));
    CHECK_INVALID(log_softmax(T({})), Contains("log_softmax"));
    CHECK_INVALID(concat({T({2, 3}), T({3, 3})}, 1), Contains("concat") && Contains("[2, 3]") && Contains("[3, 3]"));
    CHECK_INVALID(concat({T({2, 3}), T({2, 3, 1})}, 0), Contains("concat") && Contains("[2, 3, 1]"));
    CHECK_INVALID(concat({}, 0), Contains("concat"));
    CHECK_INVALID(cross_entropy(T({4, 5}), {0, 1, 2}),
                  Contains("cross_entropy") && Contains("[4, 5]") && Contains("3"));
    CHECK_INVALID(cross_entropy(T({5}), {0}), Contains("cross_entropy") && Contains("[5]"));
    CHECK_INVALID(reshape(T({2, 3}), {4, 2}), Contains("reshape") && Contains("[2, 3]") && Contains("[4, 2]"));
    CHECK_INVALID(reshape(T({2, 3}), {-1, 4}), Contains("reshape") && Contains("[2, 3]") && Contains("[-1, 4]"));
    CHECK_INVALID(reshape(T({2, 3}), {-1, -1}), Contains("reshape"));
    CHECK_INVALID(expand(T({2, 3}), {4, 3}), Contains("expand") && Contains("[2, 3]") && Contains("[4, 3]"));
    CHECK_INVALID(expand(T({3}), {2, 3}), Contains("expand") && Contains("[3]") && Contains("[2, 3]"));
    CHECK_INVALID(masked_fill(T({2, 4}), T({3}), 0.f),
                  Contains("masked_fill") && Contains("[2, 4]") && Contains("[3]"));
    CHECK_INVALID(masked_fill(T({4}), T({2, 4}), 0.f), Contains("masked_fill") && Contains("[2, 4]"));
    CHECK_INVALID(embedding(T({5}), {0}), Contains("embedding") && Contains("[5]"));
    CHECK_INVALID(Tensor::from_data({2, 2}, {1.f, 2.f, 3.f}), Contains("[2, 2]") && Contains("3"));
    CHECK_INVALID(Tensor::zeros({2, -1}), Contains("[2, -1]"));
    CHECK_INVALID(T({2, 3}).item(), Contains("item") && Contains("[2, 3]"));
    CHECK_INVALID(T({2, 3}).copy_from(T({5})), Contains("copy_from"));
    CHECK(tape_size() == 0);
}

TEST_CASE("out-of-range axes, slices, ids and targets throw", "[autograd][errors]") {
    auto T = [](const Shape& s) { return Tensor::zeros(s); };
    CHECK_INVALID(sum(T({2, 3, 4}), 3), Contains("sum") && Contains("axis 3") && Contains("[2, 3, 4]"));
    CHECK_INVALID(mean(T({2, 3, 4}), -4), Contains("mean") && Contains("axis -4") && Contains("[2, 3, 4]"));
    CHECK_INVALID(transpose(T({2, 3}), 0, 2), Contains("transpose") && Contains("[2, 3]"));
    CHECK_INVALID(permute(T({2, 3}), {0}), Contains("permute") && Contains("[2, 3]"));
    CHECK_INVALID(permute(T({2, 3}), {1, 1}), Contains("permute") && Contains("repeated"));
    CHECK_INVALID(permute(T({2, 3}), {0, 2}), Contains("permute") && Contains("axis 2"));
    CHECK_INVALID(permute(T({1, 1, 1, 1, 1}), {0, 1, 2, 3, 4}), Contains("permute"));
    CHECK_INVALID(concat({T({2, 3}), T({2, 3})}, 2), Contains("concat") && Contains("axis 2"));
    CHECK_INVALID(slice(T({2, 4}), 1, 2, 5), Contains("slice") && Contains("[2, 5)") && Contains("[2, 4]"));
    CHECK_INVALID(slice(T({2, 4}), 1, -1, 2), Contains("slice") && Contains("[2, 4]"));
    CHECK_INVALID(slice(T({2, 4}), 1, 3, 2), Contains("slice"));
    CHECK_INVALID(slice(T({2, 4}), 2, 0, 1), Contains("slice") && Contains("axis 2"));
    CHECK_INVALID(embedding(T({5, 3}), {0, 5}), Contains("embedding") && Contains("id[1] = 5") && Contains("[0, 5)"));
    CHECK_INVALID(embedding(T({5, 3}), {-1}), Contains("embedding") && Contains("-1"));
    CHECK_INVALID(index_rows(T({3, 2}), {0, 3}), Contains("index_rows") && Contains("3") && Contains("[3, 2]"));
    CHECK_INVALID(index_rows(T({3, 2}), {-1}), Contains("index_rows"));
    CHECK_INVALID(cross_entropy(T({2, 5}), {0, 5}), Contains("cross_entropy") && Contains("target[1] = 5"));
    CHECK_INVALID(cross_entropy(T({2, 5}), {-2, 0}), Contains("cross_entropy") && Contains("target[0] = -2"));
    CHECK_INVALID(cross_entropy(T({2, 5}), {-1, -1}), Contains("cross_entropy") && Contains("ignore_index"));
    CHECK_NOTHROW(cross_entropy(T({2, 5}), {-1, 4}));
    Rng rng(1);
    CHECK_INVALID(dropout(T({3}), 1.f, rng), Contains("dropout"));
    CHECK_INVALID(dropout(T({3}), -0.1f, rng), Contains("dropout"));
    CHECK_INVALID(dropout(T({3}), std::numeric_limits<float>::quiet_NaN(), rng), Contains("dropout"));
    CHECK_INVALID(T({2, 3}).dim(2), Contains("[2, 3]"));
    CHECK(T({2, 3}).dim(-1) == 3);
}

TEST_CASE("undefined inputs throw instead of crashing", "[autograd][errors]") {
    Tensor u, x = Tensor::ones({2, 3});
    Rng rng(1);
    CHECK_INVALID(add(u, x), Contains("add"));
    CHECK_INVALID(mul(x, u), Contains("mul"));
    CHECK_INVALID(matmul(u, x), Contains("matmul"));
    CHECK_INVALID(linear(x, u), Contains("linear"));
    CHECK_INVALID(exp(u), Contains("exp"));
    CHECK_INVALID(relu(u), Contains("relu"));
    CHECK_INVALID(gelu(u), Contains("gelu"));
    CHECK_INVALID(mul_scalar(u, 2.f), Contains("mul_scalar"));
    CHECK_INVALID(masked_fill(u, x, 0.f), Contains("masked_fill"));
    CHECK_INVALID(dropout(u, 0.5f, rng), Contains("dropout"));
    CHECK_INVALID(sum(u), Contains("sum"));
    CHECK_INVALID(mean(u, 0), Contains("mean"));
    CHECK_INVALID(softmax(u), Contains("softmax"));
    CHECK_INVALID(cross_entropy(u, {0}), Contains("cross_entropy"));
    CHECK_INVALID(attention(u, x, x, 1, false), Contains("attention"));
    CHECK_INVALID(embedding(u, {0}), Contains("embedding"));
    CHECK_INVALID(reshape(u, {1}), Contains("reshape"));
    CHECK_INVALID(concat({x, u}, 0), Contains("concat"));
    CHECK_INVALID(index_rows(u, {0}), Contains("index_rows"));
}

// ---- determinism and Rng -----------------------------------------------------------------------

namespace {
struct RunResult {
    float loss;
    std::vector<std::vector<float>> grads;
};

// attention + layer_norm + linear + cross_entropy, sized so that the
// element-wise kernels take their parallel paths (> 32768 elements).
RunResult run_small_model(uint64_t seed) {
    clear_tape();
    const int64_t B = 4, T = 80, C = 128, V = 64;
    const int H = 4;
    Rng rng(seed);
    std::vector<Tensor> p = {param(Tensor::normal({3 * C, C}, rng, 0.f, 0.05f)),
                             param(Tensor::normal({C}, rng, 1.f, 0.1f)), param(Tensor::normal({C}, rng, 0.f, 0.1f)),
                             param(Tensor::normal({V, C}, rng, 0.f, 0.05f)),
                             param(Tensor::normal({V}, rng, 0.f, 0.1f))};
    Tensor x = Tensor::normal({B, T, C}, rng, 0.f, 1.f);
    std::vector<int32_t> targets(size_t(B * T));
    for (auto& t : targets) t = int32_t(rng.below(uint32_t(V)));
    targets[3] = -1;
    Tensor valid = Tensor::ones({B, T});
    valid.data()[T - 1] = 0.f;
    Tensor h = layer_norm(x, p[1], p[2]);
    Tensor qkv = linear(h, p[0]);
    Tensor a = attention(slice(qkv, -1, 0, C), slice(qkv, -1, C, 2 * C), slice(qkv, -1, 2 * C, 3 * C), H, true, valid);
    Rng drop(seed + 1);
    Tensor r = add(x, dropout(gelu(a), 0.1f, drop));
    Tensor loss = cross_entropy(linear(r, p[3], p[4]), targets);
    backward(loss);
    RunResult out{loss.item(), {}};
    for (Tensor& t : p) {
        out.grads.push_back(t.grad().to_vector());
        t.zero_grad();
    }
    return out;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST_CASE("same seed and thread count give bitwise identical loss and gradients", "[autograd][determinism]") {
    INFO("threads: " << threads());
    RunResult r1 = run_small_model(7), r2 = run_small_model(7);
    CHECK(std::memcmp(&r1.loss, &r2.loss, sizeof(float)) == 0);
    CHECK(std::isfinite(r1.loss));
    REQUIRE(r1.grads.size() == r2.grads.size());
    for (size_t i = 0; i < r1.grads.size(); ++i) {
        INFO("parameter " << i);
        CHECK(bitwise_equal(r1.grads[i], r2.grads[i]));
    }
    RunResult r3 = run_small_model(8);  // and a different seed does change them
    CHECK(r3.loss != r1.loss);
}

// b [C] across the rows of a [R, C] (a per-column bias or scale) takes its
// own path: rows in parallel, b's gradient summed by columns in place. The
// output and a's gradient are the element-wise definition's exactly, b's
// gradient a double-precision sum's to float rounding (the compiler may fuse
// a product into the running sum), and none depends on the thread count.
TEST_CASE("binary ops with b [C] across the rows of a [..., C]: exact, and the bits do not depend on the threads",
          "[autograd][determinism]") {
    const int before = threads();
    constexpr int64_t R = 600, C = 70;
    static_assert(R * C > kParallelMin);  // rows and column blocks split across threads
    const std::vector<std::pair<const char*, Tensor (*)(const Tensor&, const Tensor&)>> ops = {
        {"add", &peftlab::add}, {"sub", &peftlab::sub}, {"mul", &peftlab::mul}, {"div", &peftlab::div}};
    for (const auto& [name, fn] : ops) {
        INFO(name);
        const std::string op = name;
        std::vector<std::vector<float>> runs;
        for (int t : {1, 2}) {
            set_threads(t);
            Tensor a = param(uniform({3, R / 3, C}, 1)), b = param(uniform({1, 1, C}, 2, 0.5f, 1.5f));
            Tensor dy = uniform({3, R / 3, C}, 3);
            clear_tape();
            Tensor y = fn(a, b);
            backward(y, &dy);
            const float *pa = a.data(), *pb = b.data(), *py = y.data(), *pd = dy.data();
            const float *ga = a.grad().data(), *gb = b.grad().data();
            int64_t wrong = 0;
            std::vector<double> want_gb(C, 0.0), scale(C, 0.0);
            for (int64_t r = 0; r < R; ++r)
                for (int64_t j = 0; j < C; ++j) {
                    const int64_t i = r * C + j;
                    const float x = pa[i], z = pb[j], d = pd[i];
                    const float out = op == "add" ? x + z : op == "sub" ? x - z : op == "mul" ? x * z : x / z;
                    const float da = op == "add" || op == "sub" ? d : op == "mul" ? d * z : d / z;
                    const double term = op == "add" ? d : op == "sub" ? -d : op == "mul" ? double(d) * x : -double(d) * out / z;
                    want_gb[size_t(j)] += term;
                    scale[size_t(j)] += std::fabs(term);
                    wrong += py[i] != out || ga[i] != da;
                }
            CHECK(wrong == 0);
            int64_t off = 0;  // float sums of R terms: within R ulps of the terms' magnitude
            for (int64_t j = 0; j < C; ++j) off += std::fabs(gb[j] - want_gb[size_t(j)]) > 1e-7 * R * scale[size_t(j)];
            CHECK(off == 0);
            std::vector<float> bits(py, py + R * C);
            bits.insert(bits.end(), ga, ga + R * C);
            bits.insert(bits.end(), gb, gb + C);
            runs.push_back(bits);
        }
        CHECK(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0);
    }
    set_threads(before);
}

// Softmax and LayerNorm sum their rows in vector lanes (detail::lane_sum). A
// row's bits must not depend on where it sits: rows of odd width start at
// every alignment, so a vectorizer that peeled to align would fail here.
TEST_CASE("softmax and layer_norm rows: the same bits alone as in a batch, close to a double reference",
          "[autograd][determinism]") {
    for (const int64_t D : {1, 7, 37, 129}) {
        INFO("row width " << D);
        const int64_t R = 9;
        const Tensor x = uniform({R, D}, 40 + uint64_t(D), -6.f, 6.f);
        Tensor valid = Tensor::ones({R, D});
        for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < D; ++j)
                if ((r + 2 * j) % 5 == 0 && j > 0) valid.data()[r * D + j] = 0.f;  // key 0 always allowed
        const Tensor gamma = uniform({D}, 3), beta = uniform({D}, 4);
        const Tensor sm = softmax(x), ln = layer_norm(x, gamma, beta, 1e-5f);
        // softmax's key_valid is [B, Tk] per leading row: rows of x as batch rows [R, 1, D].
        const Tensor msm = softmax(reshape(x, {R, 1, D}), false, valid);
        for (int64_t r = 0; r < R; ++r) {
            INFO("row " << r);
            const float* xr = x.data() + r * D;
            const Tensor row = Tensor::from_data({1, D}, std::vector<float>(xr, xr + D));
            const Tensor vrow = Tensor::from_data({1, D}, std::vector<float>(valid.data() + r * D, valid.data() + (r + 1) * D));
            const Tensor sm1 = softmax(row), ln1 = layer_norm(row, gamma, beta, 1e-5f);
            const Tensor msm1 = softmax(reshape(row, {1, 1, D}), false, vrow);
            CHECK(std::memcmp(sm1.data(), sm.data() + r * D, size_t(D) * sizeof(float)) == 0);
            CHECK(std::memcmp(ln1.data(), ln.data() + r * D, size_t(D) * sizeof(float)) == 0);
            CHECK(std::memcmp(msm1.data(), msm.data() + r * D, size_t(D) * sizeof(float)) == 0);
            // Against double precision: softmax over the allowed keys, LayerNorm with the biased variance.
            double mx = -1e300, mean = 0, var = 0, total = 0, mtotal = 0;
            for (int64_t j = 0; j < D; ++j) mx = std::max(mx, double(xr[j]));
            for (int64_t j = 0; j < D; ++j) {
                total += std::exp(double(xr[j]) - mx);
                mtotal += valid.data()[r * D + j] != 0.f ? std::exp(double(xr[j]) - mx) : 0.0;
                mean += double(xr[j]) / double(D);
            }
            for (int64_t j = 0; j < D; ++j) var += (double(xr[j]) - mean) * (double(xr[j]) - mean) / double(D);
            for (int64_t j = 0; j < D; ++j) {
                const double e = std::exp(double(xr[j]) - mx);
                CHECK(std::abs(sm.data()[r * D + j] - e / total) < 1e-6);
                CHECK(std::abs(msm.data()[r * D + j] - (valid.data()[r * D + j] != 0.f ? e / mtotal : 0.0)) < 1e-6);
                const double y = (double(xr[j]) - mean) / std::sqrt(var + 1e-5) * gamma.data()[j] + beta.data()[j];
                CHECK(std::abs(ln.data()[r * D + j] - y) < 1e-5);
            }
        }
    }
}

TEST_CASE("Rng sequences are pinned", "[autograd][determinism]") {
    // splitmix64; a change of the generator changes every seeded experiment.
    Rng r(42);
    CHECK(r.next_u64() == 0xBDD732262FEB6E95ull);
    CHECK(r.next_u64() == 0x28EFE333B266F103ull);
    CHECK(r.next_u64() == 0x47526757130F9F52ull);
    Rng u(7);
    CHECK(u.uniform() == 0.389829695f);
    CHECK(u.uniform() == 0.0167882442f);
    CHECK(u.uniform() == 0.900760651f);
    Rng n(7);
    CHECK(n.normal() == 1.36499226f);
    CHECK(n.normal() == -0.396523982f);
    Rng b(1);
    std::vector<uint32_t> draws;
    for (int i = 0; i < 6; ++i) draws.push_back(b.below(10));
    CHECK(draws == std::vector<uint32_t>{5, 7, 9, 4, 4, 7});
    // State round-trips.
    Rng s(3);
    s.next_u64();
    Rng s2(0);
    s2.set_state(s.state());
    CHECK(s.next_u64() == s2.next_u64());
    // Tensor::normal / uniform draw in element order from the same stream.
    Rng t1(11), t2(11);
    Tensor tn = Tensor::normal({3}, t1, 2.f, 0.5f);
    for (int i = 0; i < 3; ++i) CHECK(tn.data()[i] == 2.f + 0.5f * t2.normal());
}

TEST_CASE("threads: setting and reading the count", "[autograd][threads]") {
    const int before = threads();
    set_threads(1);
    CHECK(threads() == 1);
    set_threads(before);
    CHECK(threads() == before);
    const char* old = std::getenv("PEFTLAB_THREADS");
    std::string saved = old ? old : "";
    setenv("PEFTLAB_THREADS", "two", 1);
    CHECK_THROWS_AS(init_threads_from_env(), std::invalid_argument);
    CHECK_THROWS_WITH(init_threads_from_env(), Contains("PEFTLAB_THREADS") && Contains("two"));
    setenv("PEFTLAB_THREADS", "-3", 1);
    CHECK_THROWS_AS(init_threads_from_env(), std::invalid_argument);
    setenv("PEFTLAB_THREADS", "1", 1);
    CHECK(init_threads_from_env() == 1);
    if (old)
        setenv("PEFTLAB_THREADS", saved.c_str(), 1);
    else
        unsetenv("PEFTLAB_THREADS");
    set_threads(before);
    CHECK(threads() == before);
    CHECK(blas_core_name() != nullptr);
}

// ---- memory accounting ----------------------------------------------------------------------------

TEST_CASE("mem: live bytes and peak follow tensor lifetimes", "[autograd][mem]") {
    const int64_t base = mem::current_bytes();
    mem::reset_peak();
    CHECK(mem::peak_bytes() == base);
    int64_t one;
    {
        Tensor a = Tensor::zeros({100});
        one = mem::current_bytes() - base;
        CHECK(one >= 400);
        CHECK(one < 400 + 64);  // 64-byte aligned buffers
        {
            Tensor b = Tensor::ones({10, 10});
            CHECK(mem::current_bytes() == base + 2 * one);
            Tensor view = reshape(b, {100});  // a view: no new storage
            Tensor view2 = b.detach();
            CHECK(mem::current_bytes() == base + 2 * one);
        }
        CHECK(mem::current_bytes() == base + one);
        CHECK(mem::peak_bytes() == base + 2 * one);
        // A freed buffer goes to the cache and is reused for the same size.
        const int64_t cached = mem::cached_bytes();
        CHECK(cached >= one);
        Tensor c = Tensor::empty({100});
        CHECK(mem::cached_bytes() == cached - one);
        CHECK(mem::current_bytes() == base + 2 * one);
    }
    CHECK(mem::current_bytes() == base);
    mem::reset_peak();
    CHECK(mem::peak_bytes() == base);
    mem::release_cache();
    CHECK(mem::cached_bytes() == 0);
    CHECK(mem::current_bytes() == base);  // the cache is not live memory

    // Gradients are tracked too; zero_grad returns them.
    Tensor w = param(Tensor::ones({100}));
    const int64_t with_w = mem::current_bytes();
    backward(sum(mul_scalar(w, 2.f)));
    CHECK(mem::current_bytes() == with_w + one);
    w.zero_grad();
    CHECK(mem::current_bytes() == with_w);
}

namespace {
// The VmFlags line of the mapping in /proc/self/smaps that holds address p
// ("rd wr mr mw me ac hg": hg is MADV_HUGEPAGE), or "" if none does.
std::string vm_flags_at(const void* p) {
    std::ifstream smaps("/proc/self/smaps");
    const auto a = reinterpret_cast<uintptr_t>(p);
    bool inside = false;
    for (std::string line; std::getline(smaps, line);) {
        uintptr_t lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " ", &lo, &hi) == 2 && line.find('-') < line.find(' '))
            inside = lo <= a && a < hi;
        else if (inside && line.rfind("VmFlags:", 0) == 0)
            return line;
    }
    return "";
}
}  // namespace

TEST_CASE("mem: buffers from 2 MiB on start on a 2 MiB boundary and are advised into huge pages", "[autograd][mem]") {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    // A tensor's buffer holds its size class (capacity_for): 1.875 MiB stays
    // small, 6.5 MiB is large; alloc_bytes takes exact byte counts.
    const Tensor small = Tensor::zeros({int64_t(kHuge / 4) * 15 / 16}), large = Tensor::zeros({int64_t(kHuge / 4) * 3 + 5});
    CHECK(reinterpret_cast<uintptr_t>(small.data()) % 64 == 0);
    CHECK(reinterpret_cast<uintptr_t>(large.data()) % kHuge == 0);
    const auto below = mem::alloc_array<char>(kHuge - 64), at = mem::alloc_array<char>(kHuge),
               raw = mem::alloc_array<char>(5 * kHuge + 100);
    REQUIRE((below && at && raw));
    CHECK(reinterpret_cast<uintptr_t>(below.get()) % 64 == 0);
    CHECK(reinterpret_cast<uintptr_t>(at.get()) % kHuge == 0);
    CHECK(reinterpret_cast<uintptr_t>(raw.get()) % kHuge == 0);
    CHECK(mem::alloc_bytes(std::numeric_limits<size_t>::max() - 10) == nullptr);  // no wrap-around when rounding
    // Where the kernel has transparent huge pages and reports VmFlags, madvise
    // marks the mapping ("hg"), whatever THP's mode.
    if (std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled") && !vm_flags_at(raw.get()).empty()) {
        CHECK_THAT(vm_flags_at(large.data()), Catch::Contains(" hg"));
        CHECK_THAT(vm_flags_at(at.get()), Catch::Contains(" hg"));
        CHECK_THAT(vm_flags_at(raw.get()), Catch::Contains(" hg"));
    }
}

TEST_CASE("parallel_for: serial work stays outside OpenMP, parallel work splits statically", "[autograd][threads]") {
    // omp_get_level() counts every enclosing parallel region, inactive ones
    // (a team of one, as `#pragma omp parallel if (false)` starts) included:
    // 0 means the body ran in no region at all.
    const int before = threads();
    constexpr int64_t n = 1000;
    for (int t : {1, 2}) {
        set_threads(t);
        for (bool parallel : {false, true}) {
            INFO("threads " << t << ", parallel " << parallel);
            std::vector<int> level(n, -1), thread(n, -1), runs(n, 0);
            parallel_for(n, parallel, [&](int64_t i) {
                level[size_t(i)] = omp_get_level();
                thread[size_t(i)] = omp_get_thread_num();
                ++runs[size_t(i)];  // each i by one thread: no race
            });
            CHECK(std::count(runs.begin(), runs.end(), 1) == n);
            const bool team = parallel && t > 1;
            CHECK(std::count(level.begin(), level.end(), team ? 1 : 0) == n);
            // schedule(static) with 2 threads: the first half on thread 0, the rest on thread 1.
            CHECK(std::count(thread.begin(), thread.begin() + n / 2, 0) == n / 2);
            CHECK(std::count(thread.begin() + n / 2, thread.end(), team ? 1 : 0) == n / 2);
            // A region's body runs once per team thread; a worksharing loop inside splits.
            std::atomic<int> bodies{0};
            std::vector<int> covered(n, 0);
            parallel_region(parallel, [&] {
                ++bodies;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < n; ++i) ++covered[size_t(i)];
            });
            CHECK(bodies == (team ? 2 : 1));
            CHECK(std::count(covered.begin(), covered.end(), 1) == n);
        }
    }
    // Called inside a running team, serial work still runs the whole loop on
    // each calling thread (an orphaned `omp for` there would split it).
    set_threads(2);
    std::vector<int> per_thread(2, 0);
#pragma omp parallel num_threads(2)
    {
        int count = 0;
        parallel_for(n, false, [&](int64_t) { ++count; });
        per_thread[size_t(omp_get_thread_num())] = count;
    }
    if (omp_get_max_threads() > 1) CHECK(per_thread == std::vector<int>{int(n), int(n)});
    set_threads(before);
}

// Waits until pred() holds or 10 s have passed (a loaded machine may
// schedule a worker late; a test must not depend on how late); whether it held.
template <class P>
bool wait_until(const P& pred) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!pred() && std::chrono::steady_clock::now() < give_up) std::this_thread::sleep_for(std::chrono::microseconds(100));
    return pred();
}

TEST_CASE("pool_for: static split on the worker pool, thread 0 is the caller, serial where it must be", "[autograd][threads]") {
    const int before = threads();
    const auto caller = std::this_thread::get_id();
    constexpr int64_t n = 1001;
    for (int t : {1, 2, 3}) {
        set_threads(t);
        INFO("threads " << t);
        // Ranges as schedule(static) gives them: n / t each, the first n % t
        // one more. The caller's range waits until the workers have started
        // theirs (a range no worker has started when the caller is done is
        // the caller's to run: tested below).
        std::vector<int> thread(n, -1), runs(n, 0);
        std::vector<std::thread::id> id(n);
        std::atomic<int> started{0};
        bool all_started = false;  // (set on the caller: no assertion inside a range)
        pool_ranges(n, [&](int64_t begin, int64_t end, int th) {
            if (th == 0) all_started = wait_until([&] { return started == t - 1; });
            else ++started;
            for (int64_t i = begin; i < end; ++i) {
                thread[size_t(i)] = th;
                id[size_t(i)] = std::this_thread::get_id();
                ++runs[size_t(i)];
            }
        });
        REQUIRE(all_started);
        CHECK(std::count(runs.begin(), runs.end(), 1) == n);
        for (int64_t i = 0, th = 0; th < t; ++th) {
            const int64_t size = n / t + (th < n % t ? 1 : 0);
            CHECK(std::count(thread.begin() + i, thread.begin() + i + size, int(th)) == size);
            // Thread 0 is the caller; every other range runs elsewhere.
            CHECK(std::count(id.begin() + i, id.begin() + i + size, caller) == (th == 0 ? size : 0));
            i += size;
        }
        // Many small jobs in a row, jobs after the workers went to sleep
        // (longer than their 100 us spin) and around the moment they do:
        // every index once each time. Consecutive jobs differ in n and body,
        // so a worker that ran a range with another job's fields (one whose
        // range the caller took over) would miss or add indices.
        std::vector<int64_t> sum(n, 0), count(n, 0), want_sum(n, 0), want_count(n, 0);
        for (int rep = 0; rep < 2000; ++rep) {
            if (rep % 500 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
            if (rep % 20 == 10) std::this_thread::sleep_for(std::chrono::microseconds(50 + rep % 200));
            const int64_t m = n - rep % 7;
            if (rep % 2) pool_for(m, [&](int64_t i) { sum[size_t(i)] += i; });
            else pool_for(m, [&](int64_t i) { count[size_t(i)] += 1; });
            for (int64_t i = 0; i < m; ++i) (rep % 2 ? want_sum[size_t(i)] += i : want_count[size_t(i)] += 1);
        }
        CHECK(sum == want_sum);
        CHECK(count == want_count);
    }
    // A range its worker has not claimed when the caller is done with its own
    // runs on the caller, after it, with its own thread number, once. A
    // worker asleep (after its 100 us spin) takes microseconds to wake, so
    // with an empty range 0 the caller takes some of the 200 jobs' ranges.
    // The counts live past the loop: a worker that also ran a range taken
    // over would do so after its job returned, and be counted by the end.
    set_threads(2);
    constexpr int jobs = 200;
    std::vector<std::array<std::atomic<int>, 2>> job_runs(jobs);
    std::vector<std::array<std::thread::id, 2>> job_ids(jobs);
    for (int rep = 0; rep < jobs; ++rep) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        pool_ranges(2, [&](int64_t begin, int64_t, int th) {
            ++job_runs[size_t(rep)][size_t(th)];
            job_ids[size_t(rep)][size_t(begin)] = std::this_thread::get_id();
        });
    }
    // One more job whose caller waits for the worker: any late run is done by its end.
    std::atomic<bool> worker_in{false};
    bool worker_came = false;
    pool_ranges(2, [&](int64_t, int64_t, int th) {
        if (th == 0) worker_came = wait_until([&] { return worker_in.load(); });
        else worker_in = true;
    });
    REQUIRE(worker_came);
    int taken_over = 0, wrong_runs = 0;
    for (int rep = 0; rep < jobs; ++rep) {
        wrong_runs += job_runs[size_t(rep)][0] != 1 || job_runs[size_t(rep)][1] != 1 ||
                      job_ids[size_t(rep)][0] != caller;
        taken_over += job_ids[size_t(rep)][1] == caller;
    }
    CHECK(wrong_runs == 0);
    if (omp_get_max_threads() > 1) CHECK(taken_over > 0);
    // Inside a pool range, or an OpenMP team, the caller runs the whole range as thread 0.
    std::vector<int64_t> inner(2, -1);
    pool_ranges(2, [&](int64_t, int64_t, int th) {
        int64_t count = 0;
        pool_ranges(10, [&](int64_t b, int64_t e, int inner_th) { count += inner_th == 0 ? e - b : -1000; });
        inner[size_t(th)] = count;
    });
    CHECK(inner == std::vector<int64_t>{10, 10});
    std::vector<int64_t> in_team(2, -1);
#pragma omp parallel num_threads(2)
    {
        int64_t count = 0;
        pool_ranges(10, [&](int64_t b, int64_t e, int th) { count += th == 0 ? e - b : -1000; });
        in_team[size_t(omp_get_thread_num())] = count;
    }
    if (omp_get_max_threads() > 1) CHECK(in_team == std::vector<int64_t>{10, 10});
    // Two callers at once: one holds the pool, the other runs alone; both complete.
    std::vector<int64_t> a(n, 0), b(n, 0);
    std::thread other([&] {
        for (int rep = 0; rep < 300; ++rep) pool_for(n, [&](int64_t i) { a[size_t(i)] += 1; });
    });
    for (int rep = 0; rep < 300; ++rep) pool_for(n, [&](int64_t i) { b[size_t(i)] += 1; });
    other.join();
    CHECK(std::count(a.begin(), a.end(), 300) == n);
    CHECK(std::count(b.begin(), b.end(), 300) == n);
    // The caller's exception comes back after the workers' ranges are done.
    std::atomic<int64_t> worker_done{0};
    CHECK_THROWS_WITH(pool_ranges(n,
                                  [&](int64_t begin, int64_t end, int th) {
                                      if (th == 0) throw std::runtime_error("range 0 failed");
                                      std::this_thread::sleep_for(std::chrono::milliseconds(20));
                                      worker_done += end - begin;
                                  }),
                      "range 0 failed");
    CHECK(worker_done == n - (n + 1) / 2);
    // ... and leaves the pool free: the next call runs on the workers again.
    std::vector<std::thread::id> after(2);
    std::atomic<bool> worker_started{false};
    bool started_in_time = false;
    pool_ranges(2, [&](int64_t begin, int64_t, int th) {
        if (th == 0) started_in_time = wait_until([&] { return worker_started.load(); });
        else worker_started = true;
        after[size_t(begin)] = std::this_thread::get_id();
    });
    REQUIRE(started_in_time);
    CHECK(after[1] != caller);
    // A forked child, which has none of the workers, starts its own.
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::alarm(20);  // a child that waits for the parent's workers hangs: SIGALRM ends it
        std::vector<int> runs(n, 0);
        std::vector<std::thread::id> id(n);
        std::atomic<bool> worker_started{false};
        pool_ranges(n, [&](int64_t begin, int64_t end, int th) {
            if (th == 0) wait_until([&] { return worker_started.load(); });
            else worker_started = true;
            for (int64_t i = begin; i < end; ++i) ++runs[size_t(i)], id[size_t(i)] = std::this_thread::get_id();
        });
        const bool elsewhere = id[size_t(n - 1)] != std::this_thread::get_id();
        ::_exit(std::count(runs.begin(), runs.end(), 1) == n && elsewhere ? 0 : 1);
    }
    REQUIRE(pid > 0);
    int status = 0;
    ::waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    set_threads(before);
}

TEST_CASE("pool_for_balanced: every index once; a thread done with its range takes the others' from their ends",
          "[autograd][threads]") {
    const int before = threads();
    const auto caller = std::this_thread::get_id();
    for (int t : {1, 2, 3}) {
        set_threads(t);
        INFO("threads " << t);
        for (int64_t n : {0, 1, 2, 5, 1001}) {
            std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
            for (int rep = 0; rep < 200; ++rep) pool_for_balanced(n, [&](int64_t i) { ++runs[size_t(i)]; });
            int64_t wrong = 0;
            for (const auto& r : runs) wrong += r != 200;
            INFO("n " << n);
            CHECK(wrong == 0);
        }
    }
    // The caller's range is [0, 20) of 40 (schedule(static)'s split); at its
    // first index it waits (up to 10 s) until the worker has run more than
    // its own [20, 40), i.e. has stolen, so the steal does not depend on how
    // fast a loaded machine schedules the worker; then it takes its next
    // index while the worker sleeps on the stolen one.
    set_threads(2);
    constexpr int64_t n = 40, half = 20;
    std::vector<std::thread::id> id(n);
    std::vector<int64_t> caller_order;
    std::atomic<int64_t> by_worker{0};
    pool_for_balanced(n, [&](int64_t i) {
        id[size_t(i)] = std::this_thread::get_id();
        if (id[size_t(i)] != caller) {
            ++by_worker;
            // Slow on what it steals, so the caller, let go, claims next.
            if (i < half) std::this_thread::sleep_for(std::chrono::milliseconds(1));
            return;
        }
        caller_order.push_back(i);
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (caller_order.size() == 1 && by_worker <= half && std::chrono::steady_clock::now() < give_up)
            std::this_thread::sleep_for(std::chrono::microseconds(200));
    });
    if (omp_get_max_threads() > 1) {  // (without a worker the caller runs them all)
        // In each range the owner's indices come first and the thief's last,
        // whatever the timing; the caller took its own in order, then any of
        // the worker's from the end.
        const int64_t own = std::count(id.begin(), id.begin() + half, caller);
        const int64_t stolen = std::count(id.begin() + half, id.end(), caller);
        CHECK(std::count(id.begin(), id.begin() + own, caller) == own);
        CHECK(std::count(id.end() - stolen, id.end(), caller) == stolen);
        std::vector<int64_t> expected(static_cast<size_t>(own));
        std::iota(expected.begin(), expected.end(), int64_t(0));
        for (int64_t i = n - 1; i >= n - stolen; --i) expected.push_back(i);
        CHECK(caller_order == expected);
        CHECK(own < half);  // the worker stole
    }
    // Inside a pool range (the pool is busy) the caller runs every index.
    std::vector<int64_t> inner(2, -1);
    pool_ranges(2, [&](int64_t, int64_t, int th) {
        const auto me = std::this_thread::get_id();
        int64_t mine = 0;
        pool_for_balanced(10, [&](int64_t) { mine += std::this_thread::get_id() == me; });
        inner[size_t(th)] = mine;
    });
    CHECK(inner == std::vector<int64_t>{10, 10});
    set_threads(before);
}

TEST_CASE("mem: a frozen forward keeps no activations alive", "[autograd][mem]") {
    clear_tape();
    Tensor x = uniform({4, 8, 16}, 1), w = uniform({16, 16}, 2);
    const int64_t base = mem::current_bytes();
    mem::reset_peak();
    {
        Tensor y = attention(linear(x, w), x, x, 2, true);
        // Only y itself survives: the projection, the probabilities and the
        // scratch of every op are freed when the op returns.
        CHECK(mem::current_bytes() == base + bytes_of(y.numel()));
    }
    CHECK(mem::current_bytes() == base);
}
