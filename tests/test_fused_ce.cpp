// The fused, chunked LM head + cross-entropy (autograd/ops_fused.h) against the
// unfused path it replaces (linear, then cross_entropy), against a float64
// log-sum-exp written here, and against finite differences; its FLOP counts
// against the unfused path's; GPT::loss against lm_loss(GPT::forward).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/ops_fused.h"
#include "autograd/tape.h"
#include "nn/gpt.h"
#include "nn/hooks.h"
#include "tests/testing.h"

using namespace peftlab;
using Catch::Matchers::Contains;

namespace {

Tensor rand_tensor(const Shape& s, Rng& rng, float scale) { return Tensor::uniform(s, rng, -scale, scale); }

std::vector<int32_t> rand_targets(Rng& rng, int64_t N, int64_t V, int every_ignored) {
    std::vector<int32_t> t(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) t[size_t(i)] = every_ignored && i % every_ignored == 1 ? -1 : int32_t(rng.below(uint32_t(V)));
    return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), size_t(a.numel()) * sizeof(float)) == 0;
}

// max|a - b| / max|b|
double rel_err(const Tensor& a, const Tensor& b) {
    double d = 0, s = 0;
    for (int64_t i = 0; i < b.numel(); ++i) {
        d = std::max(d, double(std::abs(a.data()[i] - b.data()[i])));
        s = std::max(s, double(std::abs(b.data()[i])));
    }
    return d / s;
}

// Loss, gradients and FLOPs per phase of one forward + backward.
struct Run {
    float loss;
    Tensor dh, dw;  // undefined when not computed
    flops::Counts counts;
};

// hidden = 1 * h (a non-leaf, as the model's final LayerNorm output is) unless leaf_hidden.
Run run(bool fused, const Tensor& h0, const Tensor& w0, const std::vector<int32_t>& targets, bool train_w,
        int64_t chunk = 0, bool leaf_hidden = false) {
    Tensor h = h0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(train_w);
    flops::reset();
    Tensor x = leaf_hidden ? h : mul_scalar(h, 1.f);
    Tensor loss = fused ? linear_cross_entropy(x, w, targets, -1, chunk) : cross_entropy(linear(x, w), targets, -1);
    backward(loss);
    Run r{loss.item(), h.grad().clone(), train_w ? w.grad().clone() : Tensor(), flops::totals()};
    CHECK(w.has_grad() == train_w);  // a frozen weight gets no gradient buffer at all
    return r;
}

// mean over counted rows of logsumexp(h W^T) - (h W^T)[t], all in float64.
double loss_f64(const Tensor& h, const Tensor& w, const std::vector<int32_t>& t) {
    const int64_t C = w.dim(1), V = w.dim(0), N = h.numel() / C;
    double total = 0;
    int64_t count = 0;
    std::vector<double> z(static_cast<size_t>(V));
    for (int64_t i = 0; i < N; ++i) {
        if (t[size_t(i)] == -1) continue;
        double mx = -INFINITY;
        for (int64_t v = 0; v < V; ++v) {
            double s = 0;
            for (int64_t c = 0; c < C; ++c) s += double(h.data()[i * C + c]) * double(w.data()[v * C + c]);
            z[size_t(v)] = s;
            mx = std::max(mx, s);
        }
        double se = 0;
        for (double s : z) se += std::exp(s - mx);
        total += mx + std::log(se) - z[size_t(t[size_t(i)])];
        ++count;
    }
    return total / double(count);
}

}  // namespace

TEST_CASE("linear_cross_entropy equals linear + cross_entropy, for every chunk size", "[fused_ce]") {
    Rng rng(17);
    const int64_t N = 37, C = 24, V = 101;  // 37 rows: no chunk size below divides it evenly
    Tensor h = rand_tensor({N, C}, rng, 1.f), w = rand_tensor({V, C}, rng, 0.5f);
    const auto targets = rand_targets(rng, N, V, 5);
    const Run ref = run(false, h, w, targets, true);
    for (int64_t chunk : {0, 1, 7, 16, 36, 37, 1000}) {
        INFO("chunk_rows " << chunk);
        const Run f = run(true, h, w, targets, true, chunk);
        // Same logits per row, same per-row loss arithmetic, same row-order sum.
        CHECK(f.loss == ref.loss);
        // dHidden: each row's GEMM over V is the same with fewer rows; stated
        // to 1e-6 in case a BLAS kernel's order depends on the row count.
        CHECK(rel_err(f.dh, ref.dh) <= 1e-6);
        // dW: the chunks' partial sums over rows are added chunk by chunk.
        CHECK(rel_err(f.dw, ref.dw) <= 1e-5);
        CHECK(f.counts == ref.counts);
    }
    // With one chunk the fused op does the unfused op's GEMMs exactly.
    const Run one = run(true, h, w, targets, true, N);
    CHECK(same_bits(one.dh, ref.dh));
    CHECK(same_bits(one.dw, ref.dw));
    // And the loss is the float64 reference's.
    CHECK(std::abs(ref.loss - loss_f64(h, w, targets)) <= 1e-5 * std::abs(loss_f64(h, w, targets)));
}

TEST_CASE("linear_cross_entropy: gradients match finite differences", "[fused_ce]") {
    Rng rng(5);
    const int64_t N = 6, C = 5, V = 9;
    Tensor h = rand_tensor({N, C}, rng, 1.f), w = rand_tensor({V, C}, rng, 1.f);
    const auto targets = rand_targets(rng, N, V, 4);  // rows 1 and 5 ignored
    const Run f = run(true, h, w, targets, true, 4, true);  // chunks of 4 and 2
    const double eps = 1e-3;
    auto check = [&](Tensor& x, const Tensor& grad) {
        for (int64_t i = 0; i < x.numel(); ++i) {
            const float x0 = x.data()[i];
            x.data()[i] = float(x0 + eps);
            const double lp = loss_f64(h, w, targets);
            x.data()[i] = float(x0 - eps);
            const double lm = loss_f64(h, w, targets);
            x.data()[i] = x0;
            const double num = (lp - lm) / (double(float(x0 + eps)) - double(float(x0 - eps)));
            INFO("element " << i);
            CHECK(std::abs(grad.data()[i] - num) <= 1e-4 + 1e-3 * std::abs(num));
        }
    };
    check(h, f.dh);
    check(w, f.dw);
    for (int64_t c = 0; c < C; ++c) {  // ignored rows get exactly zero gradient
        CHECK(f.dh.data()[1 * C + c] == 0.f);
        CHECK(f.dh.data()[5 * C + c] == 0.f);
    }
}

TEST_CASE("linear_cross_entropy: a frozen weight costs no dW, and FLOPs match the unfused path", "[fused_ce]") {
    Rng rng(9);
    const int64_t N = 20, C = 8, V = 30;
    Tensor h = rand_tensor({N, C}, rng, 1.f), w = rand_tensor({V, C}, rng, 0.5f);
    const auto targets = rand_targets(rng, N, V, 3);
    using P = flops::Phase;
    for (bool train_w : {false, true})
        for (bool leaf : {false, true}) {
            INFO("trainable weight " << train_w << ", leaf hidden " << leaf);
            const Run f = run(true, h, w, targets, train_w, 6, leaf), u = run(false, h, w, targets, train_w, 0, leaf);
            CHECK(f.counts == u.counts);
            CHECK(rel_err(f.dh, u.dh) <= 1e-6);
            const uint64_t gemm = uint64_t(2 * N * V * C), scale = leaf ? 0 : uint64_t(N * C);
            CHECK(f.counts[int(P::Forward)] == gemm + uint64_t(6 * N * V) + scale);
            // dX work: the logits' gradient always, dHidden's GEMM unless hidden is a leaf
            // (then it counts as dW, as mul_scalar's backward into the leaf h does).
            CHECK(f.counts[int(P::BackwardDx)] == uint64_t(3 * N * V) + (leaf ? 0 : gemm));
            CHECK(f.counts[int(P::BackwardDw)] == (train_w ? gemm : 0) + (leaf ? gemm : scale));
        }
}

TEST_CASE("linear_cross_entropy: upstream gradient, accumulation, [B, T, C] input, no-grad", "[fused_ce]") {
    Rng rng(3);
    const int64_t B = 2, T = 5, C = 6, V = 11;
    Tensor h0 = rand_tensor({B, T, C}, rng, 1.f), w0 = rand_tensor({V, C}, rng, 1.f);
    const auto targets = rand_targets(rng, B * T, V, 3);
    Tensor h = h0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(true);
    // 3 * loss, then loss once more: gradients 4x the loss's, accumulated.
    backward(mul_scalar(linear_cross_entropy(h, w, targets, -1, 3), 3.f));
    backward(linear_cross_entropy(h, w, targets, -1, 4));
    Tensor hr = h0.clone().set_requires_grad(true), wr = w0.clone().set_requires_grad(true);
    backward(mul_scalar(cross_entropy(linear(hr, wr), targets), 4.f));
    CHECK(rel_err(h.grad(), hr.grad()) <= 1e-6);
    CHECK(rel_err(w.grad(), wr.grad()) <= 1e-5);
    {
        NoGradGuard ng;
        const size_t tape = tape_size();
        Tensor l = linear_cross_entropy(h, w, targets);
        CHECK(!l.requires_grad());
        CHECK(tape_size() == tape);
        CHECK(l.item() == cross_entropy(linear(h, w), targets).item());
    }
}

TEST_CASE("linear_cross_entropy: bad input names what is wrong", "[fused_ce]") {
    Tensor h = Tensor::zeros({4, 3}), w = Tensor::zeros({5, 3});
    CHECK_THROWS_WITH(linear_cross_entropy(h, Tensor::zeros({5, 2}), {0, 1, 2, 3}),
                      Contains("linear_cross_entropy") && Contains("[4, 3]") && Contains("[5, 2]"));
    CHECK_THROWS_WITH(linear_cross_entropy(h, w, {0, 1, 2}), Contains("4 rows") && Contains("3 targets"));
    CHECK_THROWS_WITH(linear_cross_entropy(h, w, {0, 1, 5, 3}), Contains("target[2] = 5") && Contains("[0, 5)"));
    CHECK_THROWS_WITH(linear_cross_entropy(h, w, {-1, -1, -1, -1}), Contains("ignore_index"));
    CHECK_THROWS_WITH(linear_cross_entropy(h, w, {0, 1, 2, 3}, -1, -2), Contains("chunk_rows = -2"));
    CHECK_THROWS_WITH(linear_cross_entropy(Tensor(), w, {}), Contains("hidden is undefined"));
}

namespace {
// Adds D x to the head's output: a trainable delta on `head` (as LoRA on the head would).
struct HeadDelta : ModelHooks {
    Tensor d;
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) override {
        return path == "head" ? linear(x, d) : Tensor();
    }
};
}  // namespace

TEST_CASE("GPT::loss equals lm_loss(forward) with less memory: tied, untied, head delta", "[fused_ce]") {
    Rng rng(11);
    for (bool tied : {true, false})
        for (bool delta : {false, true}) {
            if (tied && delta) continue;
            INFO("tied " << tied << ", head delta " << delta);
            GPTConfig cfg = testing::small_gpt(/*vocab=*/3000, /*max_seq=*/64);
            cfg.tie_embeddings = tied;
            GPT a(cfg, 2), b(cfg, 2);
            HeadDelta ha, hb;
            if (delta) {
                ha.d = rand_tensor({cfg.vocab, cfg.d_model}, rng, 0.1f).set_requires_grad(true);
                hb.d = ha.d.clone().set_requires_grad(true);
                a.set_hooks(&ha);
                b.set_hooks(&hb);
            }
            ModelInput in;
            in.B = 2;
            in.T = 48;
            in.tokens = testing::random_tokens(rng, in.B * in.T, cfg.vocab);
            auto targets = rand_targets(rng, in.B * in.T, cfg.vocab, 7);
            auto step = [&](GPT& m, bool fused, flops::Counts& c) {
                mem::reset_peak();
                const int64_t before = mem::current_bytes();
                flops::reset();
                Tensor loss = fused ? m.loss(in, targets) : lm_loss(m.forward(in), targets);
                backward(loss);
                c = flops::totals();
                return std::make_pair(loss.item(), mem::peak_bytes() - before);
            };
            flops::Counts ca, cb;
            const auto [la, peak_a] = step(a, true, ca);
            const auto [lb, peak_b] = step(b, false, cb);
            CHECK(la == lb);
            CHECK(ca == cb);
            auto pa = a.named_parameters(), pb = b.named_parameters();
            for (size_t i = 0; i < pa.size(); ++i) {
                // 0 in exact arithmetic: both hold rounding noise (see test_parity.cpp).
                if (pa[i].first.ends_with("attn.k_proj.bias")) continue;
                INFO(pa[i].first);
                CHECK(rel_err(pa[i].second.grad(), pb[i].second.grad()) <= 1e-4);
            }
            // The unfused step holds logits and probabilities [96, 3000] (1.15 MB each)
            // at once; the fused one a single buffer of that size (96 rows are one
            // chunk: at least 256 rows per chunk), so it must save at least half of one.
            const int64_t logits_bytes = 96 * 3000 * 4;
            if (!delta) CHECK(peak_b - peak_a >= logits_bytes / 2);
            if (delta) CHECK(rel_err(ha.d.grad(), hb.d.grad()) <= 1e-5);
        }
}
