// VeRA (peft/vera.cpp) beyond the generic per-method tests (counts = formula,
// frozen base, finite differences, mixed batches, serving, save/load,
// analytic = measured FLOPs, which every registered method goes through):
// the parameter count against Hugging Face PEFT's rule counted from the base,
// option errors, the start at the base, an independent reference of the delta
// with the shared pair rebuilt from projection_prng_key (slicing included),
// the pair shared across layers and frozen by training, gradients against
// finite differences, and merge/unmerge.
#include <cmath>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "nn/optim.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::peft_testing;
using Catch::Contains;

namespace {

AdapterOptions vera_options(const std::string& layers, nlohmann::json own = nlohmann::json::object()) {
    AdapterOptions o;
    o.layers = layers;
    o.section("vera") = std::move(own);
    return o;
}

Tensor param(const Adapter& a, const std::string& name) {
    for (const auto& [n, t] : a.parameters())
        if (n == name) return t;
    FAIL("no tensor named " << name);
    return {};
}

// Hugging Face PEFT's count, from the base itself: every targeted Linear of a
// chosen layer holds vera_lambda_d [r] and vera_lambda_b [out_features].
int64_t hf_count(GPT& base, const std::vector<int>& layers, const std::vector<std::string>& modules, int64_t r) {
    int64_t n = 0;
    for (int l : layers)
        for (const std::string& m : modules) n += r + base.parameter(fmt::format("blocks.{}.{}.weight", l, m)).dim(0);
    return n;
}

ModelInput two_rows() { return padded_batch({{1, 5, 9, 2, 7, 3}, {3, 4, 11, 6}}, true); }

std::vector<int32_t> targets_for(const ModelInput& in, uint64_t seed) {
    Rng rng(seed);
    std::vector<int32_t> t;
    for (size_t i = 0; i < in.tokens.size(); ++i) t.push_back(in.valid[i] ? int32_t(rng.below(48)) : -1);
    return t;
}

// The delta of the Linear at `path`, as linear_delta computes it, for input x [1, in].
Tensor delta_of(Adapter& a, const std::string& path, const Tensor& x) {
    NoGradGuard no_grad;
    ForwardInfo info;
    info.B = 1;
    return a.linear_delta(path, x, info);
}

}  // namespace

TEST_CASE("vera: parameter counts against Hugging Face PEFT's rule (r + out per adapted Linear)", "[vera]") {
    const GPTConfig c = tiny_config();  // d 32, F 64, L 3
    GPT base(c, 1);
    auto a = make_adapter("vera");
    CHECK(a->formula(c).text == "L*(2r + 2d)");
    CHECK(a->formula(c).count == 3 * (2 * 8 + 2 * 32));
    a->attach(base);
    CHECK(total_numel(a->parameters()) == hf_count(base, {0, 1, 2}, {"attn.q_proj", "attn.v_proj"}, 8));
    for (const auto& [name, t] : a->parameters()) {
        INFO(name);
        CHECK((name.ends_with(".vera_lambda_d") || name.ends_with(".vera_lambda_b")));
        CHECK(t.requires_grad());
    }
    CHECK(param(*a, "blocks.1.attn.v_proj.vera_lambda_d").numel() == 8);
    CHECK(param(*a, "blocks.1.attn.v_proj.vera_lambda_b").numel() == 32);

    const nlohmann::json own = {{"r", 4}, {"target_modules", {"q_proj", "fc", "proj"}}};
    auto b = make_adapter("vera", vera_options("0,2", own));
    CHECK(b->formula(c).text == "L*(3r + 2d + F)");
    CHECK(b->formula(c).count == 2 * (3 * 4 + 2 * 32 + c.d_ff));
    GPT base2(c, 1);
    b->attach(base2);
    CHECK(total_numel(b->parameters()) == hf_count(base2, {0, 2}, {"attn.q_proj", "mlp.fc", "mlp.proj"}, 4));
    CHECK(make_adapter("vera", vera_options("none"))->formula(c).count == 0);
}

TEST_CASE("vera: options are checked, naming the key", "[vera]") {
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"r", 0}})), Contains("vera options: key 'r'"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"r", int64_t(1) << 40}})), Contains("key 'r'"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"d_initial", "big"}})), Contains("key 'd_initial'"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"projection_prng_key", -1}})),
                      Contains("key 'projection_prng_key'"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"target_modules", {"q_proj", "mlp"}}})),
                      Contains("target 'mlp'"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"target_modules", {"v_proj", "v_proj"}}})),
                      Contains("'v_proj' is listed twice"));
    CHECK_THROWS_WITH(make_adapter("vera", vera_options("all", {{"vera_dropout", 0.1}})),
                      Contains("key 'vera_dropout' is unknown"));
    // Defaults are filled in, so a saved adapter records what it ran with.
    const nlohmann::json own = make_adapter("vera")->options().section_or_empty("vera");
    CHECK(own["r"] == 8);
    CHECK(own["d_initial"] == 0.1);
    CHECK(own["projection_prng_key"] == 0);
    CHECK(own["target_modules"] == nlohmann::json({"q_proj", "v_proj"}));
}

TEST_CASE("vera: starts at the base (lambda_b = 0, lambda_d = d_initial)", "[vera]") {
    GPT base(tiny_config(), 2);
    sharpen(base);
    auto a = make_adapter("vera", vera_options("all", {{"d_initial", 0.25}}));
    a->attach(base);
    for (const auto& [name, t] : a->parameters())
        for (int64_t i = 0; i < t.numel(); ++i) CHECK(t.data()[i] == (name.ends_with("_d") ? 0.25f : 0.f));
    const ModelInput in = two_rows();
    CHECK(bitwise_equal(logits_of(base, a.get(), in), logits_of(base, nullptr, in)));
}

TEST_CASE("vera: the delta equals an independent reference with the shared pair rebuilt from the key", "[vera]") {
    const GPTConfig c = tiny_config();
    const int64_t d = c.d_model, F = c.d_ff, r = 4;
    const uint64_t key = 1234;
    GPT base(c, 3);
    auto a = make_adapter("vera", vera_options("all", {{"r", r}, {"projection_prng_key", key},
                                                      {"target_modules", {"q_proj", "v_proj", "fc"}}}));
    a->attach(base);
    perturb(a->parameters(), 9, 0.5f);
    // PEFT's _find_dim and _kaiming_init (gain sqrt(2), fan_in): A [r, max in] then B [max out, r].
    Rng rng(key);
    const float ba = std::sqrt(6.f / float(d)), bb = std::sqrt(6.f / float(r));
    const Tensor A = Tensor::uniform({r, d}, rng, -ba, ba), B = Tensor::uniform({F, r}, rng, -bb, bb);
    auto reference = [&](const std::string& path, const Tensor& x) {
        const Tensor ld = param(*a, path + ".vera_lambda_d"), lb = param(*a, path + ".vera_lambda_b");
        const int64_t out = lb.numel();
        std::vector<double> u(size_t(r), 0.0), y(size_t(out), 0.0);
        for (int64_t k = 0; k < r; ++k) {
            for (int64_t i = 0; i < d; ++i) u[size_t(k)] += double(A.data()[k * d + i]) * x.data()[i];
            u[size_t(k)] *= ld.data()[k];
        }
        for (int64_t o = 0; o < out; ++o) {  // B[:out, :]
            for (int64_t k = 0; k < r; ++k) y[size_t(o)] += double(B.data()[o * r + k]) * u[size_t(k)];
            y[size_t(o)] *= lb.data()[o];
        }
        return y;
    };
    Rng xr(4);
    const Tensor x = Tensor::normal({1, d}, xr, 0.f, 1.f);
    for (int l = 0; l < c.n_layers; ++l)
        for (const char* m : {"attn.q_proj", "attn.v_proj", "mlp.fc"}) {
            const std::string path = fmt::format("blocks.{}.{}", l, m);
            INFO(path);
            const Tensor got = delta_of(*a, path, x);
            const std::vector<double> want = reference(path, x);
            REQUIRE(got.numel() == int64_t(want.size()));
            double err = 0, mag = 0;
            for (size_t i = 0; i < want.size(); ++i) {
                err = std::max(err, std::fabs(double(got.data()[i]) - want[i]));
                mag = std::max(mag, std::fabs(want[i]));
            }
            CHECK(mag > 1e-2);
            CHECK(err <= 1e-5 * (1.0 + mag));
        }
    CHECK_FALSE(delta_of(*a, "blocks.0.attn.k_proj", x).defined());
    CHECK_FALSE(delta_of(*a, "blocks.0.mlp.proj", x).defined());

    // Shared across layers and modules: equal vectors give bitwise equal deltas.
    for (const char* m : {"attn.v_proj", "attn.q_proj"})
        for (const char* v : {".vera_lambda_d", ".vera_lambda_b"})
            Tensor(param(*a, fmt::format("blocks.2.{}{}", m, v))).copy_from(param(*a, std::string("blocks.0.attn.q_proj") + v));
    const Tensor q0 = delta_of(*a, "blocks.0.attn.q_proj", x);
    CHECK(bitwise_equal(q0, delta_of(*a, "blocks.2.attn.q_proj", x)));
    CHECK(bitwise_equal(q0, delta_of(*a, "blocks.2.attn.v_proj", x)));

    // Another key, another pair.
    GPT base2(c, 3);
    auto b = make_adapter("vera", vera_options("all", {{"r", r}, {"projection_prng_key", key + 1},
                                                      {"target_modules", {"q_proj", "v_proj", "fc"}}}));
    b->attach(base2);
    for (size_t i = 0; i < a->parameters().size(); ++i) Tensor(b->parameters()[i].second).copy_from(a->parameters()[i].second);
    CHECK(max_diff(q0, delta_of(*b, "blocks.0.attn.q_proj", x)) > 1e-3f);
}

TEST_CASE("vera: training moves only the vectors: base and shared pair bitwise unchanged", "[vera]") {
    GPT base(tiny_config(), 5);
    sharpen(base);
    const NamedTensors original = clones(base.named_parameters());
    auto a = make_adapter("vera", vera_options("all", {{"target_modules", {"q_proj", "v_proj", "proj"}}}));
    a->activate(base);
    const NamedTensors start = clones(a->parameters());
    // The shared pair, probed through linear_delta with fixed vectors, before and after training.
    auto probe = [&] {
        const NamedTensors trained = clones(a->parameters());
        for (const auto& [name, t] : a->parameters()) Tensor(t).copy_from(Tensor::full(t.shape(), 0.7f));
        Rng xr(6);
        std::vector<Tensor> out;
        for (const std::string path : {"blocks.0.attn.q_proj", "blocks.1.attn.v_proj", "blocks.2.mlp.proj"}) {
            const int64_t in = base.parameter(path + ".weight").dim(1);
            out.push_back(delta_of(*a, path, Tensor::normal({1, in}, xr, 0.f, 1.f)));
        }
        for (size_t i = 0; i < trained.size(); ++i) Tensor(a->parameters()[i].second).copy_from(trained[i].second);
        return out;
    };
    const std::vector<Tensor> before = probe();

    const ModelInput in = two_rows();
    const std::vector<int32_t> targets = targets_for(in, 7);
    AdamWOptions o;
    o.lr = 3e-2;
    AdamW opt(a->parameters(), o);
    const std::vector<float> losses = losses_of_steps(base, opt, in, targets, 8);
    base.set_hooks(nullptr);
    CHECK(losses.back() < losses.front());
    for (size_t i = 0; i < original.size(); ++i) {
        INFO(original[i].first);
        CHECK(bitwise_equal(original[i].second, base.named_parameters()[i].second));
        CHECK_FALSE(base.named_parameters()[i].second.requires_grad());
    }
    for (size_t i = 0; i < start.size(); ++i) {
        INFO(start[i].first);
        CHECK(max_diff(start[i].second, a->parameters()[i].second) > 0.f);  // both vectors of every Linear train
    }
    const std::vector<Tensor> after = probe();
    for (size_t i = 0; i < before.size(); ++i) CHECK(bitwise_equal(before[i], after[i]));
}

TEST_CASE("vera: gradients of lambda_d and lambda_b match finite differences", "[vera]") {
    GPT base(tiny_config(), 8);
    sharpen(base, 3.f);
    auto a = make_adapter("vera", vera_options("0,2", {{"r", 4}, {"target_modules", {"q_proj", "v_proj", "fc"}}}));
    a->attach(base);
    perturb(a->parameters(), 10, 0.3f);  // away from lambda_b = 0, where lambda_d's gradient vanishes
    a->activate(base);
    const ModelInput in = two_rows();
    const std::vector<int32_t> targets = targets_for(in, 11);
    backward(lm_loss(base.forward(in), targets));
    auto loss = [&] {
        NoGradGuard no_grad;
        return mean_cross_entropy_in_double(base.forward(in), targets);
    };
    for (const auto& [name, t] : a->parameters()) {
        const Tensor g = t.grad().clone();
        float* p = Tensor(t).data();
        // The three largest coordinates of the gradient.
        std::vector<int64_t> idx(size_t(t.numel()));
        for (int64_t i = 0; i < t.numel(); ++i) idx[size_t(i)] = i;
        std::partial_sort(idx.begin(), idx.begin() + std::min<int64_t>(3, t.numel()), idx.end(),
                          [&](int64_t x, int64_t y) { return std::fabs(g.data()[x]) > std::fabs(g.data()[y]); });
        for (int k = 0; k < std::min<int64_t>(3, t.numel()); ++k) {
            const int64_t i = idx[size_t(k)];
            const float saved = p[i];
            auto central = [&](double eps) {
                p[i] = float(saved + eps);
                const double up = loss();
                p[i] = float(saved - eps);
                const double down = loss();
                p[i] = saved;
                return (up - down) / (2 * eps);
            };
            const double fd = central(4e-3), fd_half = central(2e-3), ex = (4 * fd_half - fd) / 3;
            const double analytic = g.data()[i];
            INFO(name << "[" << i << "]: backprop " << analytic << ", finite differences " << fd << " / " << ex);
            CHECK(std::fabs(analytic) > 1e-5);
            CHECK(std::min(std::fabs(ex - analytic), std::fabs(fd - analytic)) <= 2e-2 * std::fabs(analytic) + 5e-6);
        }
    }
    base.set_hooks(nullptr);
}

TEST_CASE("vera: merge folds the delta into W; unmerge restores it bitwise", "[vera]") {
    GPT base(tiny_config(), 12);
    sharpen(base);
    const NamedTensors original = clones(base.named_parameters());
    auto a = make_adapter("vera", vera_options("1,2", {{"target_modules", {"q_proj", "v_proj", "fc"}}}));
    a->attach(base);
    perturb(a->parameters(), 13, 0.5f);
    const ModelInput in = two_rows();
    const Tensor adapted = logits_of(base, a.get(), in);
    CHECK(max_diff(adapted, logits_of(base, nullptr, in)) > 1e-2f);
    a->merge();
    CHECK_FALSE(a->adapts_linear("blocks.1.attn.q_proj"));
    CHECK(max_diff(logits_of(base, nullptr, in), adapted) < 1e-4f);
    a->unmerge();
    for (size_t i = 0; i < original.size(); ++i) CHECK(bitwise_equal(original[i].second, base.named_parameters()[i].second));
    CHECK(bitwise_equal(logits_of(base, a.get(), in), adapted));
}
