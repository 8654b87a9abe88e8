// Finite-difference gradient checks for every differentiable op in autograd/ops.h.
//
// Method. For an op y = f(x_1, ..., x_n) we check the gradient of the scalar
//   L = sum(y * W),   W fixed N(0, 1) weights of y's shape,
// so that every output element contributes with a different weight (a plain
// sum would hide errors that cancel, e.g. in softmax, whose rows sum to 1).
//   analytic: loss = sum(mul(f(x), W)); backward(loss); x_i.grad()
//   numeric:  central differences on clones of the inputs (which require no
//             grad, so nothing is recorded), L accumulated in double:
//             dL/dx[j] ~ (L(x[j] + eps) - L(x[j] - eps)) / (x+ - x-),
//             the denominator being the float difference actually applied.
// Tolerances (float32 forward): eps = 1e-3 moves a value by ~1e-3, so float
// rounding of L (relative ~1e-7 per term, summed over a few dozen outputs)
// contributes ~1e-4 absolute error to the quotient and the O(eps^2)
// truncation term is ~1e-6 * |f'''|. The default accepts
//   |analytic - numeric| <= 2e-3 + 2e-2 * |numeric|;
// ops that are linear in their input (no truncation error at all) use 5e-4 + 5e-3.
// Non-smooth points are avoided by construction (relu inputs kept >= 0.1 from
// the kink; masks fixed), and every check also requires the analytic gradient
// to be non-zero somewhere, so a backward that writes nothing cannot pass.
#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "autograd/tape.h"
#include "autograd/threads.h"

using namespace peftlab;

namespace {

struct Tol {
    double eps = 1e-3;
    double atol = 2e-3;
    double rtol = 2e-2;
};
constexpr Tol kLinearTol{1e-3, 5e-4, 5e-3};

using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

Tensor uniform(const Shape& s, uint64_t seed, float lo = -1.f, float hi = 1.f) {
    Rng rng(seed);
    return Tensor::uniform(s, rng, lo, hi);
}
// Uniform magnitude in [lo, hi] with a random sign: keeps values away from 0
// (divisors, relu's kink).
Tensor away_from_zero(const Shape& s, uint64_t seed, float lo, float hi) {
    Rng rng(seed);
    Tensor t = Tensor::uniform(s, rng, lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i)
        if (rng.uniform() < 0.5f) t.data()[i] = -t.data()[i];
    return t;
}
Tensor param(Tensor t) {
    t.set_requires_grad(true);
    return t;
}

double weighted_sum(const Tensor& y, const Tensor& w) {
    double s = 0;
    for (int64_t i = 0; i < y.numel(); ++i) s += double(y.data()[i]) * double(w.data()[i]);
    return s;
}

// Checks every input that requires grad; inputs that do not (masks, constants)
// are passed through unchanged and must not receive a gradient.
void check_grads(const std::string& what, const std::vector<Tensor>& inputs, const OpFn& op, Tol tol = {}) {
    INFO("op: " << what);
    clear_tape();
    for (const Tensor& t : inputs)
        if (t.requires_grad()) Tensor(t).zero_grad();

    // Analytic.
    Tensor y = op(inputs);
    REQUIRE(y.requires_grad());
    Rng wrng(0xC0FFEE);
    Tensor W = Tensor::normal(y.shape(), wrng, 0.f, 1.f);
    Tensor loss = sum(mul(y, W));
    backward(loss);
    REQUIRE(tape_size() == 0);
    std::vector<std::vector<float>> analytic(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i].requires_grad()) analytic[i] = inputs[i].grad().to_vector();

    // Numeric, on clones that require no grad. Thousands of tiny forwards: run
    // them on one thread (forking a team per call costs more than the work, and
    // much more on a busy machine); the analytic pass above used the configured count.
    const int saved_threads = threads();
    set_threads(1);
    struct Restore {
        int n;
        ~Restore() { set_threads(n); }
    } restore{saved_threads};
    std::vector<Tensor> copies;
    for (const Tensor& t : inputs) copies.push_back(t.requires_grad() ? t.clone() : t);
    auto L = [&] { return weighted_sum(op(copies), W); };
    REQUIRE_FALSE(op(copies).requires_grad());
    const double base = L();
    CHECK(std::abs(base - weighted_sum(y, W)) <= 1e-5 * (1 + std::abs(base)));  // same forward both ways
    REQUIRE(tape_size() == 0);  // nothing recorded without a grad-requiring input

    for (size_t i = 0; i < inputs.size(); ++i) {
        if (!inputs[i].requires_grad()) continue;
        float* x = copies[i].data();
        int fails = 0;
        double worst = -1, worst_a = 0, worst_n = 0, max_abs = 0;
        int64_t worst_j = -1;
        for (int64_t j = 0; j < copies[i].numel(); ++j) {
            const float x0 = x[j];
            const float xp = float(double(x0) + tol.eps), xm = float(double(x0) - tol.eps);
            x[j] = xp;
            const double lp = L();
            x[j] = xm;
            const double lm = L();
            x[j] = x0;
            const double num = (lp - lm) / (double(xp) - double(xm));
            const double ana = analytic[i][size_t(j)];
            const double err = std::abs(ana - num), allowed = tol.atol + tol.rtol * std::abs(num);
            max_abs = std::max(max_abs, std::abs(ana));
            if (err > allowed) ++fails;
            if (err - allowed > worst) {
                worst = err - allowed;
                worst_j = j;
                worst_a = ana;
                worst_n = num;
            }
        }
        INFO(fmt::format("input {} {}: {} of {} elements off; worst at {}: analytic {:.6g} numeric {:.6g}", i,
                         shape_str(inputs[i].shape()), fails, inputs[i].numel(), worst_j, worst_a, worst_n));
        CHECK(fails == 0);
        CHECK(max_abs > 0);  // a backward that writes nothing must not pass
    }
    for (const Tensor& t : inputs)
        if (t.requires_grad()) Tensor(t).zero_grad();
}

}  // namespace

// ---- element-wise binary ops with broadcasting ---------------------------------

TEST_CASE("gradcheck: add/sub/mul/div with broadcasting", "[autograd][gradcheck]") {
    struct Case {
        Shape a, b;
        const char* what;
    };
    const std::vector<Case> cases = {
        {{3, 4}, {3, 4}, "same shape"},
        {{3, 4}, {4}, "bias over rows"},
        {{4}, {3, 4}, "bias over rows, broadcast on the left"},
        {{3, 4}, {3, 1}, "per-row scalars [N, 1]"},
        {{2, 3, 4, 2}, {1, 3, 1, 1}, "per-head scalars [1, H, 1, 1]"},
        {{2, 3, 4}, {2, 1, 4}, "rank 3, middle dim"},
        {{2, 1, 3, 2}, {1, 2, 1, 2}, "rank 4, both sides broadcast"},
        {{3, 4}, {}, "rank-0 scalar"},
        {{3, 1}, {}, "rank-0 scalar, a of one column"},
        {{1}, {}, "rank-0 scalar, a of one element"},
        {{2, 3, 1}, {3, 4}, "rank 3 x rank 2, both sides"},
    };
    const std::vector<std::pair<const char*, Tensor (*)(const Tensor&, const Tensor&)>> ops = {
        {"add", &peftlab::add}, {"sub", &peftlab::sub}, {"mul", &peftlab::mul}, {"div", &peftlab::div}};
    uint64_t seed = 1;
    for (const auto& [name, fn] : ops) {
        const bool is_div = std::string(name) == "div";
        const bool linear_op = std::string(name) == "add" || std::string(name) == "sub";
        for (const Case& c : cases) {
            Tensor a = param(uniform(c.a, seed++));
            Tensor b = param(is_div ? away_from_zero(c.b, seed++, 0.5f, 2.f) : uniform(c.b, seed++));
            auto f = fn;
            check_grads(
                fmt::format("{} {} {} ({})", name, shape_str(c.a), shape_str(c.b), c.what), {a, b},
                [f](const std::vector<Tensor>& in) { return f(in[0], in[1]); }, linear_op ? kLinearTol : Tol{});
        }
    }
}

TEST_CASE("gradcheck: binary ops with one frozen operand and with aliased operands", "[autograd][gradcheck]") {
    Tensor a = param(uniform({3, 4}, 11));
    Tensor frozen = away_from_zero({4}, 12, 0.5f, 2.f);
    check_grads("mul a * frozen", {a, frozen}, [](auto& in) { return mul(in[0], in[1]); });
    check_grads("div frozen / a", {away_from_zero({3, 4}, 13, 0.5f, 2.f), param(away_from_zero({3, 4}, 14, 0.5f, 2.f))},
                [](auto& in) { return div(in[0], in[1]); });
    // The same tensor on both sides: both gradient paths land in one cell.
    check_grads("mul x * x", {a}, [](auto& in) { return mul(in[0], in[0]); });
    check_grads(
        "add x + x", {a}, [](auto& in) { return add(in[0], in[0]); }, kLinearTol);
    check_grads("sub x - x*x", {a}, [](auto& in) { return sub(in[0], mul(in[0], in[0])); });
    Tensor d = param(away_from_zero({3, 4}, 15, 0.5f, 2.f));
    check_grads("div (x + 3) / x", {d}, [](auto& in) { return div(add_scalar(in[0], 3.f), in[0]); });
}

// ---- unary maps ------------------------------------------------------------------

TEST_CASE("gradcheck: unary element-wise ops", "[autograd][gradcheck]") {
    const Shape s{2, 3, 4};
    check_grads(
        "add_scalar", {param(uniform(s, 21))}, [](auto& in) { return add_scalar(in[0], 2.5f); }, kLinearTol);
    check_grads(
        "mul_scalar", {param(uniform(s, 22))}, [](auto& in) { return mul_scalar(in[0], -1.75f); }, kLinearTol);
    check_grads(
        "neg", {param(uniform(s, 23))}, [](auto& in) { return neg(in[0]); }, kLinearTol);
    check_grads("exp", {param(uniform(s, 24, -2.f, 2.f))}, [](auto& in) { return exp(in[0]); });
    check_grads("log (inputs in [0.2, 3])", {param(uniform(s, 25, 0.2f, 3.f))}, [](auto& in) { return log(in[0]); });
    check_grads("tanh", {param(uniform(s, 26, -2.f, 2.f))}, [](auto& in) { return tanh(in[0]); });
    check_grads("sqrt (inputs in [0.2, 3])", {param(uniform(s, 27, 0.2f, 3.f))}, [](auto& in) { return sqrt(in[0]); });
    check_grads(
        "relu (|x| >= 0.1)", {param(away_from_zero(s, 28, 0.1f, 2.f))}, [](auto& in) { return relu(in[0]); },
        kLinearTol);
    check_grads("gelu", {param(uniform(s, 29, -3.f, 3.f))}, [](auto& in) { return gelu(in[0]); });
    check_grads("gelu_erf", {param(uniform(s, 30, -3.f, 3.f))}, [](auto& in) { return gelu_erf(in[0]); });
}

TEST_CASE("relu: gradient at exactly 0 is 0, and forward values", "[autograd][gradcheck]") {
    Tensor x = param(Tensor::from_data({5}, {-1.f, 0.f, 2.f, -0.f, 1e-30f}));
    Tensor y = relu(x);
    CHECK(y.to_vector() == std::vector<float>{0.f, 0.f, 2.f, 0.f, 1e-30f});
    backward(sum(y));
    CHECK(x.grad().to_vector() == std::vector<float>{0.f, 0.f, 1.f, 0.f, 1.f});
}

TEST_CASE("gelu and gelu_erf: forward values against closed forms", "[autograd][gradcheck]") {
    // GELU(1) = Phi(1) = 0.841344746..., tanh form 0.841191990...
    Tensor x = Tensor::from_data({3}, {-1.f, 0.f, 1.f});
    auto e = gelu_erf(x).to_vector();
    auto t = gelu(x).to_vector();
    CHECK(e[2] == Approx(0.8413447).epsilon(1e-6));
    CHECK(e[0] == Approx(-0.1586553).epsilon(1e-5));
    CHECK(e[1] == 0.f);
    CHECK(t[2] == Approx(0.8411920).epsilon(1e-6));
    CHECK(t[0] == Approx(-0.1588080).epsilon(1e-5));
}

// ---- masked_fill, dropout ----------------------------------------------------------

TEST_CASE("gradcheck: masked_fill with broadcast masks", "[autograd][gradcheck]") {
    Tensor a = param(uniform({2, 3, 4}, 31));
    Tensor m1 = Tensor::from_data({3, 1}, {1.f, 0.f, 1.f});              // whole rows
    Tensor m2 = Tensor::from_data({2, 1, 4}, {0, 1, 0, 0, 1, 1, 0, 0});  // per batch, per column
    check_grads(
        "masked_fill mask [3, 1]", {a}, [m1](auto& in) { return masked_fill(in[0], m1, -7.f); }, kLinearTol);
    check_grads(
        "masked_fill mask [2, 1, 4]", {a}, [m2](auto& in) { return masked_fill(in[0], m2, 0.5f); }, kLinearTol);

    // Masked elements take the value and receive exactly zero gradient.
    clear_tape();
    Tensor y = masked_fill(a, m1, -7.f);
    backward(sum(mul_scalar(y, 3.f)));
    auto g = a.grad().to_vector();
    for (int64_t b = 0; b < 2; ++b)
        for (int64_t r = 0; r < 3; ++r)
            for (int64_t c = 0; c < 4; ++c) {
                int64_t i = (b * 3 + r) * 4 + c;
                bool masked = r != 1;
                CHECK(y.data()[i] == (masked ? -7.f : a.data()[i]));
                CHECK(g[size_t(i)] == (masked ? 0.f : 3.f));
            }
    a.zero_grad();
}

TEST_CASE("gradcheck: dropout with a reseeded Rng", "[autograd][gradcheck]") {
    Tensor a = param(uniform({4, 6}, 41));
    check_grads(
        "dropout p=0.3", {a},
        [](auto& in) {
            Rng rng(77);  // the same mask for every evaluation
            return dropout(in[0], 0.3f, rng);
        },
        kLinearTol);

    // Inverted dropout: kept elements scaled by 1/(1-p), the rest zero; same seed, same mask.
    Rng r1(5), r2(5);
    Tensor big = Tensor::ones({4000});
    Tensor y1 = dropout(big, 0.25f, r1), y2 = dropout(big, 0.25f, r2);
    CHECK(y1.to_vector() == y2.to_vector());
    int64_t kept = 0;
    for (float v : y1.to_vector()) {
        CHECK((v == 0.f || v == Approx(1.f / 0.75f)));
        kept += v != 0.f;
    }
    CHECK(kept > 2800);  // expected 3000, sd ~27
    CHECK(kept < 3200);
    // p == 0 is the identity and draws nothing.
    Rng r3(9);
    Tensor same = dropout(a, 0.f, r3);
    CHECK(same.impl() == a.impl());
    CHECK(r3.state() == Rng(9).state());
}

// ---- reductions ----------------------------------------------------------------------

TEST_CASE("gradcheck: sum and mean, all and per axis, keepdim both", "[autograd][gradcheck]") {
    Tensor a = param(uniform({2, 3, 4}, 51));
    check_grads(
        "sum all", {a}, [](auto& in) { return sum(in[0]); }, kLinearTol);
    check_grads(
        "mean all", {a}, [](auto& in) { return mean(in[0]); }, kLinearTol);
    for (int axis : {0, 1, 2, -1, -3})
        for (bool keep : {false, true}) {
            check_grads(
                fmt::format("sum axis {} keepdim {}", axis, keep), {a},
                [=](auto& in) { return sum(in[0], axis, keep); }, kLinearTol);
            check_grads(
                fmt::format("mean axis {} keepdim {}", axis, keep), {a},
                [=](auto& in) { return mean(in[0], axis, keep); }, kLinearTol);
        }
    CHECK(sum(a, 1, true).shape() == Shape{2, 1, 4});
    CHECK(sum(a, 1).shape() == Shape{2, 4});
    CHECK(mean(a, -1).shape() == Shape{2, 3});
    CHECK(sum(a).shape() == Shape{});
    // Values against a direct loop.
    Tensor m = mean(a, 1);
    for (int64_t b = 0; b < 2; ++b)
        for (int64_t c = 0; c < 4; ++c) {
            double s = 0;
            for (int64_t r = 0; r < 3; ++r) s += a.data()[(b * 3 + r) * 4 + c];
            CHECK(m.data()[b * 4 + c] == Approx(s / 3).margin(1e-6));
        }
    clear_tape();
}

// ---- matmul, linear --------------------------------------------------------------------

TEST_CASE("gradcheck: matmul, all transpose combinations and batching", "[autograd][gradcheck]") {
    const int64_t M = 3, K = 4, N = 2;
    uint64_t seed = 100;
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            auto shape_a = [&](Shape lead) {
                lead.push_back(ta ? K : M);
                lead.push_back(ta ? M : K);
                return lead;
            };
            auto shape_b = [&](Shape lead) {
                lead.push_back(tb ? N : K);
                lead.push_back(tb ? K : N);
                return lead;
            };
            auto mm = [=](auto& in) { return matmul(in[0], in[1], ta, tb); };
            std::string tr = fmt::format("trans_a={} trans_b={}", ta, tb);
            check_grads("matmul 2-D x 2-D " + tr,
                        {param(uniform(shape_a({}), seed++)), param(uniform(shape_b({}), seed++))}, mm, kLinearTol);
            check_grads("matmul batched [2, 2, ...] x shared 2-D " + tr,
                        {param(uniform(shape_a({2, 2}), seed++)), param(uniform(shape_b({}), seed++))}, mm, kLinearTol);
            check_grads("matmul batched x batched " + tr,
                        {param(uniform(shape_a({2}), seed++)), param(uniform(shape_b({2}), seed++))}, mm, kLinearTol);
            check_grads("matmul rank 4 batched x batched " + tr,
                        {param(uniform(shape_a({2, 2}), seed++)), param(uniform(shape_b({2, 2}), seed++))}, mm,
                        kLinearTol);
            // One side frozen: only the other gradient is computed.
            check_grads("matmul batched x shared, b frozen " + tr,
                        {param(uniform(shape_a({2}), seed++)), uniform(shape_b({}), seed++)}, mm, kLinearTol);
            check_grads("matmul batched x shared, a frozen " + tr,
                        {uniform(shape_a({2}), seed++), param(uniform(shape_b({}), seed++))}, mm, kLinearTol);
        }
    // x x^T: both operands are the same tensor.
    check_grads("matmul x x^T (aliased)", {param(uniform({3, 4}, seed++))},
                [](auto& in) { return matmul(in[0], in[0], false, true); });
    check_grads("matmul x^T x batched (aliased)", {param(uniform({2, 3, 4}, seed++))},
                [](auto& in) { return matmul(in[0], in[0], true, false); });
}

TEST_CASE("gradcheck: linear with and without bias", "[autograd][gradcheck]") {
    Tensor x = param(uniform({2, 3, 5}, 201));
    Tensor w = param(uniform({4, 5}, 202));
    Tensor b = param(uniform({4}, 203));
    check_grads(
        "linear with bias", {x, w, b}, [](auto& in) { return linear(in[0], in[1], in[2]); }, kLinearTol);
    check_grads(
        "linear without bias", {x, w}, [](auto& in) { return linear(in[0], in[1]); }, kLinearTol);
    check_grads(
        "linear 2-D input, frozen weight, trainable bias", {uniform({6, 5}, 204), uniform({4, 5}, 205), b},
        [](auto& in) { return linear(in[0], in[1], in[2]); }, kLinearTol);
    check_grads(
        "linear frozen x and bias, trainable weight", {uniform({6, 5}, 206), w, uniform({4}, 207)},
        [](auto& in) { return linear(in[0], in[1], in[2]); }, kLinearTol);
}

// ---- layer_norm, softmax, log_softmax, cross_entropy -------------------------------------

TEST_CASE("gradcheck: layer_norm (x, gamma, beta)", "[autograd][gradcheck]") {
    Tensor x = param(uniform({2, 3, 6}, 301, -2.f, 2.f));
    Tensor g = param(uniform({6}, 302, 0.5f, 1.5f));
    Tensor b = param(uniform({6}, 303));
    check_grads("layer_norm", {x, g, b}, [](auto& in) { return layer_norm(in[0], in[1], in[2]); });
    check_grads("layer_norm, frozen gamma and beta", {x, g.detach(), b.detach()},
                [](auto& in) { return layer_norm(in[0], in[1], in[2]); });
    check_grads(
        "layer_norm, only beta", {x.detach(), g.detach(), b}, [](auto& in) { return layer_norm(in[0], in[1], in[2]); },
        kLinearTol);
    // Output rows have mean beta-weighted 0 and unit variance before the affine part.
    Tensor y = layer_norm(x.detach(), Tensor::ones({6}), Tensor::zeros({6}));
    for (int64_t r = 0; r < 6; ++r) {
        double m = 0, v = 0;
        for (int64_t j = 0; j < 6; ++j) m += y.data()[r * 6 + j];
        m /= 6;
        for (int64_t j = 0; j < 6; ++j) v += (y.data()[r * 6 + j] - m) * (y.data()[r * 6 + j] - m);
        CHECK(m == Approx(0).margin(1e-6));
        CHECK(v / 6 == Approx(1).epsilon(1e-4));
    }
}

TEST_CASE("gradcheck: softmax plain, causal, padding masks", "[autograd][gradcheck]") {
    check_grads("softmax plain [3, 5]", {param(uniform({3, 5}, 401, -2.f, 2.f))},
                [](auto& in) { return softmax(in[0]); });
    check_grads("softmax causal Tq=5=Tk", {param(uniform({2, 5, 5}, 402, -2.f, 2.f))},
                [](auto& in) { return softmax(in[0], true); });
    check_grads("softmax causal Tq=3 < Tk=5 (prefix)", {param(uniform({2, 3, 5}, 403, -2.f, 2.f))},
                [](auto& in) { return softmax(in[0], true); });
    // [B, H, Tq, Tk]; batch 1 has every key masked: its rows are all zero.
    Tensor kv = Tensor::from_data({2, 5}, {1, 1, 0, 1, 0, 0, 0, 0, 0, 0});
    check_grads("softmax key_valid [B, Tk], fully masked batch", {param(uniform({2, 2, 3, 5}, 404, -2.f, 2.f))},
                [kv](auto& in) { return softmax(in[0], false, kv); });
    // Causal + left padding: row 0 of batch 0 may only see keys 0..2, all padding.
    Tensor kv2 = Tensor::from_data({2, 5}, {0, 0, 0, 1, 1, 1, 1, 1, 1, 0});
    check_grads("softmax causal + key_valid, a fully masked row", {param(uniform({2, 3, 5}, 405, -2.f, 2.f))},
                [kv2](auto& in) { return softmax(in[0], true, kv2); });

    // Mask semantics in the values.
    Tensor x = uniform({2, 3, 5}, 406);
    Tensor p = softmax(x, true, kv2);
    for (int64_t b = 0; b < 2; ++b)
        for (int64_t i = 0; i < 3; ++i) {
            double total = 0;
            bool any = false;
            for (int64_t j = 0; j < 5; ++j) {
                float v = p.data()[(b * 3 + i) * 5 + j];
                bool allowed = j <= i + 2 && kv2.data()[b * 5 + j] != 0.f;
                if (!allowed) CHECK(v == 0.f);
                any = any || allowed;
                total += v;
            }
            CHECK(total == Approx(any ? 1.0 : 0.0).margin(1e-6));
        }
    CHECK(p.data()[0 * 5 + 3] == 0.f);  // batch 0, row 0: fully masked -> zeros
}

TEST_CASE("gradcheck: log_softmax", "[autograd][gradcheck]") {
    check_grads("log_softmax [3, 5]", {param(uniform({3, 5}, 501, -3.f, 3.f))},
                [](auto& in) { return log_softmax(in[0]); });
    check_grads("log_softmax [2, 3, 4]", {param(uniform({2, 3, 4}, 502, -3.f, 3.f))},
                [](auto& in) { return log_softmax(in[0]); });
    // exp(log_softmax) == softmax
    Tensor x = uniform({3, 5}, 503, -3.f, 3.f);
    auto a = exp(log_softmax(x)).to_vector(), b = softmax(x).to_vector();
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(b[i]).margin(1e-6));
}

TEST_CASE("gradcheck: cross_entropy with ignored targets", "[autograd][gradcheck]") {
    check_grads("cross_entropy [6, 5] with ignore_index -1", {param(uniform({6, 5}, 601, -2.f, 2.f))}, [](auto& in) {
        return cross_entropy(in[0], {0, -1, 4, 2, -1, 2});
    });
    check_grads("cross_entropy [2, 3, 5] with ignore_index -100", {param(uniform({2, 3, 5}, 602, -2.f, 2.f))},
                [](auto& in) {
                    return cross_entropy(in[0], {1, -100, 3, 3, 0, -100}, -100);
                });
    // Value: mean over counted rows of logsumexp - logit[target]; ignored rows get zero grad.
    Tensor x = param(uniform({3, 4}, 603, -2.f, 2.f));
    Tensor loss = cross_entropy(x, {2, -1, 0});
    double expect = 0;
    for (int r : {0, 2}) {
        double s = 0;
        for (int j = 0; j < 4; ++j) s += std::exp(double(x.data()[r * 4 + j]));
        expect += std::log(s) - x.data()[r * 4 + (r == 0 ? 2 : 0)];
    }
    CHECK(loss.item() == Approx(expect / 2).epsilon(1e-6));
    backward(loss);
    auto g = x.grad().to_vector();
    for (int j = 0; j < 4; ++j) CHECK(g[size_t(4 + j)] == 0.f);
    x.zero_grad();
}

// ---- attention -----------------------------------------------------------------------------

TEST_CASE("gradcheck: fused attention", "[autograd][gradcheck]") {
    const int64_t B = 2, C = 8;
    const int H = 2;
    auto qkv = [&](int64_t Tq, int64_t Tk, uint64_t seed) {
        return std::vector<Tensor>{param(uniform({B, Tq, C}, seed, -1.5f, 1.5f)),
                                   param(uniform({B, Tk, C}, seed + 1, -1.5f, 1.5f)),
                                   param(uniform({B, Tk, C}, seed + 2))};
    };
    check_grads("attention causal Tq=Tk=4", qkv(4, 4, 701),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, true); });
    check_grads("attention non-causal Tq=3, Tk=5", qkv(3, 5, 704),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, false); });
    check_grads("attention causal Tq=2 < Tk=5 (prefix keys)", qkv(2, 5, 707),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, true); });
    // Padding on the left in batch 0 (row 0 then sees only padding: fully masked),
    // on the right in batch 1.
    Tensor kv = Tensor::from_data({B, 5}, {0, 0, 0, 1, 1, 1, 1, 1, 0, 0});
    check_grads("attention causal Tq=3 < Tk=5, key_valid padding both sides", qkv(3, 5, 710),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, true, kv); });
    check_grads("attention non-causal, key_valid padding", qkv(3, 5, 713),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, false, kv); });
    // A mask per query [B, Tq, Tk] (an infix's keys): query rows see different key sets.
    Tensor per_query = Tensor::from_data({B, 3, 5}, {0, 0, 1, 0, 0,  1, 0, 1, 1, 0,  1, 1, 1, 1, 1,
                                                     1, 1, 0, 1, 0,  0, 0, 1, 1, 1,  1, 0, 1, 1, 1});
    check_grads("attention causal Tq=3 < Tk=5, key_valid per query", qkv(3, 5, 725),
                [=](auto& in) { return attention(in[0], in[1], in[2], H, true, per_query); });
    check_grads("attention 4 heads of Dh=2", qkv(3, 3, 716),
                [=](auto& in) { return attention(in[0], in[1], in[2], 4, true); });
    // Partly frozen: only the gradients that are needed.
    auto p = qkv(3, 3, 719);
    check_grads("attention, only q trainable", {p[0], p[1].detach(), p[2].detach()},
                [=](auto& in) { return attention(in[0], in[1], in[2], H, true); });
    check_grads(
        "attention, only v trainable", {p[0].detach(), p[1].detach(), p[2]},
        [=](auto& in) { return attention(in[0], in[1], in[2], H, true); }, kLinearTol);
    check_grads("attention, only k trainable", {p[0].detach(), p[1], p[2].detach()},
                [=](auto& in) { return attention(in[0], in[1], in[2], H, false); });
    // Aliased inputs: one tensor as q, k and v; one as k and v.
    check_grads("attention(x, x, x)", {param(uniform({B, 4, C}, 722))},
                [=](auto& in) { return attention(in[0], in[0], in[0], H, true); });
    check_grads("attention(q, m, m)", {param(uniform({B, 3, C}, 723)), param(uniform({B, 4, C}, 724))},
                [=](auto& in) { return attention(in[0], in[1], in[1], H, false); });
}

TEST_CASE("attention equals softmax(QK^T/sqrt(Dh)) V per head", "[autograd][gradcheck]") {
    const int64_t B = 2, Tq = 3, Tk = 5, C = 8, H = 2, Dh = C / H;
    Tensor q = uniform({B, Tq, C}, 801), k = uniform({B, Tk, C}, 802), v = uniform({B, Tk, C}, 803);
    Tensor kv = Tensor::from_data({B, Tk}, {0, 1, 1, 1, 1, 1, 1, 1, 1, 0});
    Tensor out = attention(q, k, v, int(H), true, kv);
    // Reference built from the unfused ops: split heads, matmul, masked softmax, matmul.
    auto heads = [&](const Tensor& t) { return permute(reshape(t, {B, t.dim(1), H, Dh}), {0, 2, 1, 3}); };
    Tensor s = mul_scalar(matmul(heads(q), heads(k), false, true), 1.f / std::sqrt(float(Dh)));
    Tensor ref = matmul(softmax(s, true, kv), heads(v));  // [B, H, Tq, Dh]
    ref = reshape(permute(ref, {0, 2, 1, 3}), {B, Tq, C});
    auto a = out.to_vector(), r = ref.to_vector();
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(r[i]).margin(1e-5));
}

TEST_CASE("attention with a mask per query equals each query alone under its own row of the mask",
          "[autograd][gradcheck][infix]") {
    const int64_t B = 2, Tq = 4, Tk = 7, C = 8, H = 2;
    Tensor q = uniform({B, Tq, C}, 811), k = uniform({B, Tk, C}, 812), v = uniform({B, Tk, C}, 813);
    Rng rng(814);
    Tensor mask = Tensor::empty({B, Tq, Tk});
    for (int64_t i = 0; i < mask.numel(); ++i) mask.data()[i] = rng.below(3) ? 1.f : 0.f;
    const Tensor out = attention(q, k, v, int(H), true, mask);
    for (int64_t i = 0; i < Tq; ++i) {
        // Query i alone is the last of the Tk - Tq + i + 1 keys it may see (the causal rule).
        const int64_t keys = Tk - Tq + i + 1;
        const Tensor row_mask = reshape(slice(slice(mask, 1, i, i + 1), 2, 0, keys), {B, keys});
        const Tensor alone = attention(slice(q, 1, i, i + 1), slice(k, 1, 0, keys), slice(v, 1, 0, keys), int(H),
                                       true, row_mask);
        const std::vector<float> a = alone.to_vector(), b = slice(out, 1, i, i + 1).to_vector();
        INFO("query " << i);
        for (size_t j = 0; j < a.size(); ++j) CHECK(a[j] == Approx(b[j]).margin(1e-6));
    }
    CHECK_THROWS_WITH(attention(q, k, v, int(H), true, Tensor::ones({B, Tq + 1, Tk})),
                      Catch::Contains("key_valid [2, 5, 7]") && Catch::Contains("[B, Tq, S] = [2, 4, 7]"));
}

TEST_CASE("attention over the first kv_len positions of larger buffers equals attention over exactly those",
          "[autograd][gradcheck]") {
    // A KV cache with room to grow: k, v [B, S, C], key_valid [B, S], of which
    // the first Tk positions are keys; the rest hold junk that must not be read.
    const int64_t B = 2, Tq = 2, Tk = 5, S = 8, C = 8, H = 2;
    Tensor q = param(uniform({B, Tq, C}, 811)), big_k = uniform({B, S, C}, 812), big_v = uniform({B, S, C}, 813);
    Tensor big_valid = Tensor::full({B, S}, 1.f);
    big_valid.data()[1] = 0.f;  // row 0, key 1 is padding
    Tensor k = slice(big_k, 1, 0, Tk), v = slice(big_v, 1, 0, Tk), valid = slice(big_valid, 1, 0, Tk);
    for (bool causal : {true, false}) {
        // The same bits, and the same gradient for q (one backward at a time:
        // a backward runs every node on the tape).
        Tensor exact = attention(q, k, v, int(H), causal, valid);
        backward(sum(exact));
        Tensor gq = q.grad().clone();
        q.zero_grad();
        Tensor viewed = attention(q, big_k, big_v, int(H), causal, big_valid, Tk);
        CHECK(viewed.to_vector() == exact.to_vector());
        backward(sum(viewed));
        CHECK(q.grad().to_vector() == gq.to_vector());
        q.zero_grad();
    }
    CHECK_THROWS_WITH(attention(q, big_k, big_v, int(H), true, big_valid, S + 1), Catch::Contains("kv_len = 9"));
    CHECK_THROWS_WITH(attention(q, param(big_k.clone()), big_v, int(H), true, big_valid, Tk),
                      Catch::Contains("gradients for k and v"));
}

// A decoding step's attention (Tq = 1) has loops of its own that read the
// keys and values row by row, every head of a row together, and split heads
// into groups across threads when there are fewer rows than threads.
TEST_CASE("attention with one query row (a decoding step) equals the unfused reference, the same bits at any "
          "thread count", "[autograd][gradcheck]") {
    auto reference = [](const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, const Tensor& kv) {
        const int64_t B = q.dim(0), C = q.dim(2), Dh = C / H;
        auto heads = [&](const Tensor& t) { return permute(reshape(t, {B, t.dim(1), H, Dh}), {0, 2, 1, 3}); };
        Tensor s = mul_scalar(matmul(heads(q), heads(k), false, true), 1.f / std::sqrt(float(Dh)));
        return reshape(permute(matmul(softmax(s, true, kv), heads(v)), {0, 2, 1, 3}), {B, 1, C});
    };
    // Dh 16 and 64: the vector dots; Dh 5: the plain ones. 3 heads and 37 keys:
    // the (key, head) dots do not fill their last group of 16.
    for (const int64_t Dh : {16, 64, 5}) {
        const int64_t B = 2, H = 3, C = H * Dh, Tk = 37;
        Tensor q = uniform({B, 1, C}, 831), k = uniform({B, Tk, C}, 832), v = uniform({B, Tk, C}, 833);
        Tensor kv = Tensor::ones({B, Tk});
        kv.data()[0] = kv.data()[5] = kv.data()[Tk + 36] = 0.f;  // padding, the last key of row 1 among it
        for (bool causal : {true, false}) {
            INFO("Dh " << Dh << (causal ? " causal" : " non-causal"));
            const std::vector<float> got = attention(q, k, v, int(H), causal, kv).to_vector();
            const std::vector<float> want = reference(q, k, v, H, kv).to_vector();
            for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Approx(want[i]).margin(1e-5));
        }
    }
    // Its backward recomputes the probabilities one head at a time.
    check_grads("attention, one query row, Dh 16", {param(uniform({2, 1, 32}, 834)), param(uniform({2, 6, 32}, 835)),
                                                   param(uniform({2, 6, 32}, 836))},
                [](auto& in) { return attention(in[0], in[1], in[2], 2, true); });
    // One row long enough to run in parallel: its heads are split across threads.
    const int64_t H = 3, C = 48, Tk = 11000;
    Tensor q = uniform({1, 1, C}, 837), k = uniform({1, Tk, C}, 838), v = uniform({1, Tk, C}, 839);
    const int before = threads();
    set_threads(1);
    const std::vector<float> one = attention(q, k, v, int(H), true).to_vector();
    set_threads(2);
    const std::vector<float> two = attention(q, k, v, int(H), true).to_vector();
    set_threads(before);
    CHECK(one == two);
    const std::vector<float> want = reference(q, k, v, H, Tensor::ones({1, Tk})).to_vector();
    for (size_t i = 0; i < one.size(); ++i) CHECK(one[i] == Approx(want[i]).margin(1e-5));
}

// ---- indexing and layout ---------------------------------------------------------------------

TEST_CASE("gradcheck: embedding with repeated ids", "[autograd][gradcheck]") {
    Tensor w = param(uniform({5, 3}, 901));
    check_grads(
        "embedding", {w},
        [](auto& in) {
            return embedding(in[0], {1, 3, 1, 1, 4, 0});
        },
        kLinearTol);
    // Rows never looked up get exactly zero gradient; repeated ones the sum.
    backward(sum(embedding(w, {1, 3, 1})));
    auto g = w.grad().to_vector();
    CHECK(g == std::vector<float>{0, 0, 0, 2, 2, 2, 0, 0, 0, 1, 1, 1, 0, 0, 0});
    w.zero_grad();
}

TEST_CASE("gradcheck: reshape, transpose, permute", "[autograd][gradcheck]") {
    Tensor a = param(uniform({2, 3, 4}, 1001));
    check_grads(
        "reshape [6, -1]", {a},
        [](auto& in) {
            return reshape(in[0], {6, -1});
        },
        kLinearTol);
    check_grads("reshape then mul (view feeds a second op)", {a}, [](auto& in) {
        return mul(reshape(in[0], {4, 6}), reshape(in[0], {4, 6}));
    });
    check_grads(
        "transpose 0, 2", {a}, [](auto& in) { return transpose(in[0], 0, 2); }, kLinearTol);
    check_grads(
        "transpose -1, -2", {a}, [](auto& in) { return transpose(in[0], -1, -2); }, kLinearTol);
    check_grads(
        "permute {2, 0, 1}", {a},
        [](auto& in) {
            return permute(in[0], {2, 0, 1});
        },
        kLinearTol);
    Tensor a4 = param(uniform({2, 3, 2, 4}, 1002));
    check_grads(
        "permute rank 4 {0, 2, 1, 3}", {a4},
        [](auto& in) {
            return permute(in[0], {0, 2, 1, 3});
        },
        kLinearTol);
    check_grads(
        "permute rank 4 {3, 1, 0, 2}", {a4},
        [](auto& in) {
            return permute(in[0], {3, 1, 0, -2});
        },
        kLinearTol);
    // Values: permute moves element (i, j, k) to (k, i, j).
    Tensor p = permute(a.detach(), {2, 0, 1});
    CHECK(p.shape() == Shape{4, 2, 3});
    for (int64_t i = 0; i < 2; ++i)
        for (int64_t j = 0; j < 3; ++j)
            for (int64_t k = 0; k < 4; ++k) CHECK(p.data()[(k * 2 + i) * 3 + j] == a.data()[(i * 3 + j) * 4 + k]);
}

TEST_CASE("gradcheck: concat, slice, expand, index_rows", "[autograd][gradcheck]") {
    Tensor a = param(uniform({2, 3, 4}, 1101));
    Tensor b0 = param(uniform({1, 3, 4}, 1102)), b1 = param(uniform({2, 2, 4}, 1103)),
           b2 = param(uniform({2, 3, 1}, 1104));
    check_grads(
        "concat axis 0", {a, b0},
        [](auto& in) {
            return concat({in[0], in[1]}, 0);
        },
        kLinearTol);
    check_grads(
        "concat axis 1", {b1, a},
        [](auto& in) {
            return concat({in[0], in[1]}, 1);
        },
        kLinearTol);
    check_grads(
        "concat axis -1, three parts, one frozen", {a, b2, uniform({2, 3, 2}, 1105)},
        [](auto& in) {
            return concat({in[0], in[1], in[2]}, -1);
        },
        kLinearTol);
    check_grads(
        "concat of a tensor with itself", {b1},
        [](auto& in) {
            return concat({in[0], in[0]}, 1);
        },
        kLinearTol);
    for (int axis : {0, 1, 2, -1})
        check_grads(
            fmt::format("slice axis {}", axis), {a},
            [axis](auto& in) { return slice(in[0], axis, 1, 2 + (axis == 0 ? 0 : 1)); }, kLinearTol);
    check_grads(
        "slice to empty", {a},
        [](auto& in) {
            return concat({slice(in[0], 1, 2, 2), in[0]}, 1);
        },
        kLinearTol);
    Tensor e = param(uniform({1, 3, 1}, 1106));
    check_grads(
        "expand [1, 3, 1] -> [2, 3, 4]", {e},
        [](auto& in) {
            return expand(in[0], {2, 3, 4});
        },
        kLinearTol);
    check_grads(
        "expand no-op", {a},
        [](auto& in) {
            return expand(in[0], {2, 3, 4});
        },
        kLinearTol);
    check_grads(
        "index_rows with repeats", {a},
        [](auto& in) {
            return index_rows(in[0], {1, 0, 1, 1});
        },
        kLinearTol);
    Tensor c = concat({a.detach(), b1.detach()}, 1);
    CHECK(c.shape() == Shape{2, 5, 4});
    CHECK(c.data()[(1 * 5 + 3) * 4 + 2] == b1.data()[(1 * 2 + 0) * 4 + 2]);
    CHECK(c.data()[(1 * 5 + 2) * 4 + 1] == a.data()[(1 * 3 + 2) * 4 + 1]);
}

TEST_CASE("gradcheck: layout ops add into a gradient that already holds one", "[autograd][gradcheck]") {
    // Each op's backward must add (+=), not assign: the same input feeds it twice.
    Tensor a = param(uniform({2, 3, 4}, 1151));
    Tensor w = param(uniform({5, 3}, 1152));
    Tensor e = param(uniform({1, 3, 1}, 1153));
    auto twice = [](auto f) { return [f](auto& in) { return add(f(in[0]), mul_scalar(f(in[0]), 2.f)); }; };
    check_grads("permute twice", {a}, twice([](const Tensor& x) { return permute(x, {2, 0, 1}); }), kLinearTol);
    check_grads("transpose twice", {a}, twice([](const Tensor& x) { return transpose(x, 0, 1); }), kLinearTol);
    check_grads("reshape twice", {a}, twice([](const Tensor& x) { return reshape(x, {4, 6}); }), kLinearTol);
    check_grads("slice twice", {a}, twice([](const Tensor& x) { return slice(x, 1, 1, 3); }), kLinearTol);
    check_grads("concat twice", {a}, twice([](const Tensor& x) { return concat({x, x}, 0); }), kLinearTol);
    check_grads("index_rows twice", {a}, twice([](const Tensor& x) { return index_rows(x, {1, 1, 0}); }), kLinearTol);
    check_grads("embedding twice", {w}, twice([](const Tensor& x) { return embedding(x, {4, 0, 4}); }), kLinearTol);
    check_grads("expand twice", {e}, twice([](const Tensor& x) { return expand(x, {2, 3, 4}); }), kLinearTol);
    check_grads("masked_fill twice", {a}, twice([](const Tensor& x) {
                    return masked_fill(x, Tensor::from_data({4}, {0, 1, 0, 1}), 3.f);
                }),
                kLinearTol);
    check_grads("sum axis twice", {a}, twice([](const Tensor& x) { return sum(x, 1, true); }), kLinearTol);
    check_grads("softmax twice", {a}, twice([](const Tensor& x) { return softmax(x); }));
    check_grads("log_softmax twice", {a}, twice([](const Tensor& x) { return log_softmax(x); }));
    check_grads("layer_norm twice", {a},
                twice([](const Tensor& x) { return layer_norm(x, Tensor::full({4}, 1.5f), Tensor::full({4}, 0.1f)); }));
    check_grads("cross_entropy twice", {a}, twice([](const Tensor& x) {
                    return cross_entropy(x, {0, 1, 2, 3, -1, 1});
                }));
    check_grads("attention twice", {a}, twice([](const Tensor& x) { return attention(x, x, x, 2, true); }));
    check_grads("linear twice", {a}, twice([](const Tensor& x) {
                    return linear(x, Tensor::full({2, 4}, 0.3f));
                }),
                kLinearTol);
}

// ---- a composite graph ------------------------------------------------------------------------

TEST_CASE("gradcheck: a small transformer block end to end", "[autograd][gradcheck]") {
    // embedding -> layer_norm -> q,k,v projections -> attention (prefix keys, padding)
    // -> residual -> gelu MLP -> cross_entropy. Checks how the ops compose on one tape.
    const int64_t B = 2, T = 3, C = 4, V = 5, P = 1;
    Tensor kv = Tensor::from_data({B, P + T}, {1, 1, 1, 1, 1, 0, 1, 1});
    std::vector<Tensor> in = {param(uniform({V, C}, 1201)),    param(uniform({C}, 1202, 0.5f, 1.5f)),
                              param(uniform({C}, 1203)),       param(uniform({3 * C, C}, 1204)),
                              param(uniform({1, P, C}, 1205)), param(uniform({V, C}, 1206)),
                              param(uniform({V}, 1207))};
    check_grads("block", in, [=](const std::vector<Tensor>& p) {
        Tensor x = reshape(embedding(p[0], {1, 2, 3, 4, 0, 1}), {B, T, C});
        Tensor h = layer_norm(x, p[1], p[2]);
        Tensor qkv = linear(h, p[3]);
        Tensor q = slice(qkv, -1, 0, C), k = slice(qkv, -1, C, 2 * C), v = slice(qkv, -1, 2 * C, 3 * C);
        Tensor prefix = expand(p[4], {B, P, C});
        k = concat({prefix, k}, 1);
        v = concat({prefix, v}, 1);
        Tensor a = add(x, attention(q, k, v, 2, true, kv));
        Tensor logits = linear(gelu(a), p[5], p[6]);
        return cross_entropy(logits, {1, 2, -1, 3, 4, 0});
    });
}
