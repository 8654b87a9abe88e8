// Activation recomputation (gradient checkpointing): autograd's checkpoint()
// and GPT::set_recompute. The claim under test is exact: the same loss and the
// same gradients, bit for bit, with less memory held between forward and
// backward, and the recomputed FLOPs counted under their own phase.
#include <catch2/catch.hpp>

#include "autograd/flops.h"
#include "autograd/ops.h"
#include "autograd/tape.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::testing;
using namespace peftlab::peft_testing;
using Catch::Matchers::Contains;

namespace {

// A two-GEMM MLP block with a residual: x [N, C] -> x + W2 gelu(W1 x).
Tensor mlp_block(const Tensor& x, const Tensor& w1, const Tensor& w2) {
    return add(x, linear(gelu(linear(x, w1)), w2));
}

struct Grads {
    float loss = 0;
    NamedTensors grads;  // name -> gradient clone, in the order given
};

Grads grads_of(const NamedTensors& params, const std::function<Tensor()>& loss_fn) {
    for (const auto& [name, t] : params) Tensor(t).zero_grad();
    Tensor loss = loss_fn();
    backward(loss);
    Grads g;
    g.loss = loss.item();
    for (const auto& [name, t] : params) g.grads.emplace_back(name, t.has_grad() ? t.grad().clone() : Tensor());
    return g;
}

void check_same(const Grads& a, const Grads& b) {
    CHECK(a.loss == b.loss);
    REQUIRE(a.grads.size() == b.grads.size());
    for (size_t i = 0; i < a.grads.size(); ++i) {
        INFO(a.grads[i].first);
        REQUIRE(a.grads[i].second.defined() == b.grads[i].second.defined());
        if (a.grads[i].second.defined()) CHECK(bitwise_equal(a.grads[i].second, b.grads[i].second));
    }
}

peft::AdapterOptions every_target(int n) {
    peft::AdapterOptions o;
    o.n = n;
    o.layers = "all";
    o.init = "random";
    o.seed = 3;
    o.section("lora")["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"};
    return o;
}

ModelInput ragged_rows() { return padded_batch({{1, 5, 9, 2, 7, 3, 8}, {3, 4, 11, 6}}, true); }

std::vector<int32_t> targets_for(const ModelInput& in) {
    std::vector<int32_t> t(in.tokens.size(), -1);
    for (size_t i = 0; i < t.size(); ++i)
        if (in.valid.empty() || in.valid[i]) t[i] = int32_t((in.tokens[i] * 7 + 3) % 48);
    return t;
}

}  // namespace

TEST_CASE("checkpoint: same value and gradients, bit for bit, as the function on the tape", "[recompute]") {
    Rng rng(1);
    Tensor x = Tensor::normal({6, 8}, rng, 0.f, 1.f).set_requires_grad(true).set_name("x");
    Tensor w1 = Tensor::normal({16, 8}, rng, 0.f, 0.5f).set_requires_grad(true).set_name("w1");
    Tensor w2 = Tensor::normal({8, 16}, rng, 0.f, 0.5f).set_requires_grad(true).set_name("w2");
    const NamedTensors params{{"x", x}, {"w1", w1}, {"w2", w2}};
    auto block = [&](const std::vector<Tensor>& in) { return mlp_block(in[0], w1, w2); };
    const Grads a = grads_of(params, [&] {
        Tensor h = mlp_block(mlp_block(x, w1, w2), w1, w2);
        return sum(mul(h, h));
    });
    const Grads b = grads_of(params, [&] {
        Tensor h = checkpoint(block, {checkpoint(block, {x})});
        return sum(mul(h, h));
    });
    check_same(a, b);
    CHECK(tape_size() == 0);

    SECTION("an input also used outside: its gradient sums both paths (in another order: equal to rounding)") {
        const Grads p = grads_of(params, [&] { return sum(mul(mlp_block(x, w1, w2), x)); });
        const Grads q = grads_of(params, [&] { return sum(mul(checkpoint(block, {x}), x)); });
        CHECK(p.loss == q.loss);
        CHECK(max_diff(p.grads[0].second, q.grads[0].second) <= 1e-5f * max_abs(p.grads[0].second));
        CHECK(max_abs(p.grads[0].second) > 0.f);
        for (size_t i = 1; i < p.grads.size(); ++i) CHECK(bitwise_equal(p.grads[i].second, q.grads[i].second));
    }

    SECTION("an input that requires no grad gets none; the weights still do") {
        Tensor c = x.detach();
        const NamedTensors ws{{"w1", w1}, {"w2", w2}};
        const Grads p = grads_of(ws, [&] { return sum(mlp_block(c, w1, w2)); });
        const Grads q = grads_of(ws, [&] {
            return sum(checkpoint([&](const std::vector<Tensor>& in) { return mlp_block(in[0], w1, w2); }, {c}));
        });
        check_same(p, q);
    }
    SECTION("nothing trainable inside: the function's plain result, nothing recorded") {
        Tensor c = x.detach();
        Tensor y = checkpoint([](const std::vector<Tensor>& in) { return gelu(in[0]); }, {c});
        CHECK_FALSE(y.requires_grad());
        CHECK(tape_size() == 0);
        CHECK(bitwise_equal(y, gelu(c)));
    }
}

TEST_CASE("checkpoint: the recomputed forward counts under phase recompute, the rest as without", "[recompute]") {
    Rng rng(2);
    Tensor x = Tensor::normal({5, 8}, rng, 0.f, 1.f);
    Tensor w1 = Tensor::normal({16, 8}, rng, 0.f, 0.5f).set_requires_grad(true);
    Tensor w2 = Tensor::normal({8, 16}, rng, 0.f, 0.5f).set_requires_grad(true);
    auto counts = [&](bool ckpt) {
        flops::reset();
        Tensor y = ckpt ? checkpoint([&](const std::vector<Tensor>& in) { return mlp_block(in[0], w1, w2); }, {x})
                        : mlp_block(x, w1, w2);
        backward(sum(y));
        return flops::totals();
    };
    const flops::Counts plain = counts(false), ckpt = counts(true);
    const auto F = size_t(flops::Phase::Forward), R = size_t(flops::Phase::Recompute);
    CHECK(plain[R] == 0);
    CHECK(ckpt[R] == plain[F] - 5 * 8);  // the block once more, not the sum() outside it
    for (size_t p = 0; p < R; ++p) CHECK(ckpt[p] == plain[p]);
    CHECK(std::string(flops::phase_name(flops::Phase::Recompute)) == "recompute");
}

TEST_CASE("checkpoint: holds only the input between forward and backward", "[recompute]") {
    Rng rng(3);
    const int64_t N = 64, C = 32, F = 256, depth = 6;
    Tensor x = Tensor::normal({N, C}, rng, 0.f, 1.f);
    std::vector<std::pair<Tensor, Tensor>> w;
    for (int i = 0; i < depth; ++i)
        w.emplace_back(Tensor::normal({F, C}, rng, 0.f, 0.1f).set_requires_grad(true),
                       Tensor::normal({C, F}, rng, 0.f, 0.1f).set_requires_grad(true));
    auto held_after_forward = [&](bool ckpt) {
        mem::release_cache();
        const int64_t before = mem::current_bytes();
        Tensor h = x;
        for (auto& [a, b] : w)
            h = ckpt ? checkpoint([a = a, b = b](const std::vector<Tensor>& in) { return mlp_block(in[0], a, b); }, {h})
                     : mlp_block(h, a, b);
        const int64_t held = mem::current_bytes() - before;
        clear_tape();
        return held;
    };
    const int64_t plain = held_after_forward(false), ckpt = held_after_forward(true);
    // Without: per block the [N, F] pre-activation and GELU output and the [N, C]
    // input (at least 2·N·F floats). With: the [N, C] outputs only.
    CHECK(plain >= depth * 2 * N * F * 4);
    CHECK(ckpt <= depth * (N * C * 4 + 64));
}

TEST_CASE("checkpoint: a tensor made inside and kept outside is refused, not silently cut off", "[recompute]") {
    Rng rng(4);
    Tensor w = Tensor::normal({4, 4}, rng, 0.f, 1.f).set_requires_grad(true);
    Tensor kept;
    auto leaky = [&](const std::vector<Tensor>& in) {
        kept = mul(w, w);  // a per-forward cache filled inside the function
        return matmul(in[0], kept);
    };
    CHECK_THROWS_WITH(checkpoint(leaky, {Tensor::ones({2, 4})}), Contains("outlives") && Contains("begin_forward"));
    CHECK(tape_size() == 0);  // the caller's tape is as it was
}

TEST_CASE("GPT::set_recompute: every method's loss and gradients bit for bit, dropout included", "[recompute]") {
    GPTConfig cfg = tiny_config();
    cfg.dropout = 0.1f;
    const ModelInput in = ragged_rows();
    const std::vector<int32_t> targets = targets_for(in);
    for (const std::string& method : peft::method_names()) {
        for (const std::vector<int>& layers : {std::vector<int>{0, 1, 2}, std::vector<int>{1}}) {
            INFO(method << " recompute layers " << layers.size());
            auto run = [&](bool recompute) {
                GPT base(cfg, 7);
                sharpen(base);
                base.train();
                auto a = peft::make_adapter(method, every_target(3));
                a->activate(base);
                perturb(a->parameters(), 11, 0.1f);
                if (recompute) base.set_recompute(layers);
                NamedTensors params = a->parameters();
                for (const auto& [name, t] : base.named_parameters()) params.emplace_back("base." + name, t);
                Grads g = grads_of(params, [&] { return base.loss(in, targets); });
                g.grads.emplace_back("dropout_rng_after", Tensor::full({1}, float(base.dropout_rng().next_u64() % 1000)));
                return g;
            };
            check_same(run(false), run(true));
        }
    }
}

TEST_CASE("GPT::set_recompute: the prefix-tuning step holds less and counts one more forward of the blocks",
          "[recompute]") {
    GPTConfig cfg = small_gpt(48, 64, 4);
    GPT base(cfg, 9);
    auto a = peft::make_adapter("prefix", every_target(4));
    a->activate(base);
    Rng rng(5);
    std::vector<std::vector<int32_t>> rows;
    for (int b = 0; b < 8; ++b) rows.push_back(random_tokens(rng, 60, 48));
    const ModelInput in = padded_batch(rows, true);
    const std::vector<int32_t> targets = targets_for(in);
    auto step = [&](const std::vector<int>& layers) {
        base.set_recompute(layers);
        for (const auto& [name, t] : a->parameters()) Tensor(t).zero_grad();
        mem::release_cache();
        mem::reset_peak();
        flops::reset();
        const int64_t before = mem::current_bytes();
        backward(base.loss(in, targets));
        return std::make_pair(mem::peak_bytes() - before, flops::totals());
    };
    const auto [plain_peak, plain] = step({});
    const auto [ckpt_peak, ckpt] = step({0, 1, 2, 3});
    const auto F = size_t(flops::Phase::Forward), R = size_t(flops::Phase::Recompute);
    for (size_t p = 0; p < R; ++p) CHECK(ckpt[p] == plain[p]);  // dX stays dX: the block's input is an activation
    CHECK(ckpt[R] > 0);
    CHECK(ckpt[R] < plain[F]);  // the blocks again, not the head and loss
    CHECK(ckpt_peak < plain_peak * 0.6);
}

TEST_CASE("GPT::set_recompute: not used without a graph; bad layers named", "[recompute]") {
    GPT base(tiny_config(), 12);
    sharpen(base);
    const ModelInput in = ragged_rows();
    const Tensor plain = logits_of(base, nullptr, in);
    base.set_recompute({0, 2});
    CHECK(base.recompute() == std::vector<int>{0, 2});
    CHECK(bitwise_equal(logits_of(base, nullptr, in), plain));
    CHECK(tape_size() == 0);
    CHECK_THROWS_WITH(base.set_recompute({3}), Contains("layer 3") && Contains("n_layers = 3"));
    CHECK_THROWS_WITH(base.set_recompute({1, 1}), Contains("layer 1 is given twice"));
    CHECK(base.recompute() == std::vector<int>{0, 2});  // unchanged by a refused call
    base.set_recompute({});
    CHECK(base.recompute().empty());
}
