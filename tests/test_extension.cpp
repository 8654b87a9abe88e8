// Extending peftlab from outside peft/: a toy method defined in this file and
// registered at run time goes through the cost report, MultiAdapter, the
// Server, adapter save/load and a fine-tuning run with no edit anywhere else.
// Because it is registered when the test binary starts, every test that
// iterates the registry (counts = formulas, base bitwise frozen, analytic =
// measured FLOPs, save/load round trip, adapts_linear) runs it as well.
#include <algorithm>
#include <filesystem>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "autograd/tape.h"
#include "experiments/lib/harness.h"
#include "nn/generate.h"
#include "nn/optim.h"
#include "peft/adapter_io.h"
#include "peft/multi.h"
#include "peft/registry.h"
#include "peft/report.h"
#include "peft/serve.h"
#include "tests/peft_testing.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::testing;
using Catch::Contains;

namespace {

// "toy-shift": per chosen layer a trainable vector s_l [d] added to the
// attention output projection's output through the linear_output hook:
// o_proj(x) + s_l. L*d parameters. Own option: init_std (s_l ~ N(0, init_std)).
class ToyShift : public Adapter {
public:
    explicit ToyShift(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "toy-shift");
        init_std_ = own.number("init_std", 0.0);
        set_own_options("toy-shift", own.finish());
    }
    std::string method() const override { return "toy-shift"; }

    bool adapts_linear(const std::string& path) const override { return shifts_.count(path) > 0; }
    Tensor linear_output(const std::string& path, const Tensor&, const Tensor& y, const ForwardInfo&) override {
        auto it = shifts_.find(path);
        return it == shifts_.end() ? Tensor() : add(y, it->second);  // [..., d] + [d]
    }
    ParamFormula formula(const GPTConfig& c) const override { return {chosen_layers(c) * c.d_model, "L*d"}; }
    std::vector<double> lr_grid() const override { return {2e-2, 5e-2}; }
    double weight_decay() const override { return 0.5; }

    cost::Sym cost_linear(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t,
                          int64_t out, cost::Sym, cost::Sym y) const override {
        const bool o_proj = path.size() > 12 && path.compare(path.size() - 12, 12, ".attn.o_proj") == 0;
        return o_proj && in_chosen_layer(c, path) ? cost::add(t, R * out, y, cost::kParam) : y;
    }
    int64_t cost_decode_extra(const GPTConfig& c) const override { return chosen_layers(c) * c.d_model; }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        std::vector<cost::ParamGroup> g;
        for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), c.d_model});
        return g;
    }

protected:
    void build(GPT& base) override {
        Rng rng(opts_.seed);
        for (int l : layers_) {
            const std::string path = fmt::format("blocks.{}.attn.o_proj", l);
            shifts_[path] = add_param(path + ".toy_shift", Tensor::normal({base.config().d_model}, rng, 0.f, float(init_std_)));
        }
    }

private:
    double init_std_ = 0.0;
    std::map<std::string, Tensor> shifts_;  // o_proj path -> [d]
};

// Registered when the test binary starts, before any test runs.
const bool kRegistered = [] {
    register_method({"toy-shift", "test-only: a vector added to each attention output (linear_output hook), L*d",
                     [](const AdapterOptions& o) { return std::make_unique<ToyShift>(o); }});
    return true;
}();

AdapterOptions toy_options(const std::string& layers, uint64_t seed) {
    AdapterOptions o;
    o.layers = layers;
    o.seed = seed;
    o.section("toy-shift")["init_std"] = 0.5;
    return o;
}

// A mergeable method whose merge fails half-way: it has changed one base
// tensor (taken with merge_target) when it throws, as a merge running out of
// memory on its second weight would.
class HalfMerge : public Adapter {
public:
    HalfMerge() : Adapter(AdapterOptions{}) {}
    std::string method() const override { return "half-merge"; }
    ParamFormula formula(const GPTConfig&) const override { return {0, "0"}; }
    std::vector<double> lr_grid() const override { return {1e-3}; }
    bool mergeable() const override { return true; }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig&) const override { return {}; }

    // merge_target outside merge_into_base: refused.
    Tensor take_outside_merge() { return merge_target("blocks.0.attn.q_proj.weight"); }

protected:
    void build(GPT&) override {}
    void merge_into_base() override {
        Tensor W = merge_target("blocks.0.attn.q_proj.weight");
        std::fill(W.data(), W.data() + W.numel(), 7.f);
        // Taken again, changed again: the first copy (the value before the merge) must be the one restored.
        Tensor again = merge_target("blocks.0.attn.q_proj.weight");
        std::fill(again.data(), again.data() + again.numel(), 9.f);
        merge_target("blocks.0.attn.k_proj.weight");
        throw std::runtime_error("out of memory on the second weight");
    }
};

std::unique_ptr<GPT> sharp() { return testing::sharp_model(small_gpt(40, 32), 3, 6.f); }

}  // namespace

TEST_CASE("extension: a merge that throws half-way leaves the base bitwise as it was", "[extension]") {
    GPT base(small_gpt(40, 16), 3);
    std::vector<std::vector<float>> before;
    for (const auto& [name, t] : base.named_parameters()) before.push_back(t.to_vector());
    HalfMerge a;
    a.attach(base);
    CHECK_THROWS_WITH(a.merge(), "out of memory on the second weight");
    CHECK_FALSE(a.merged());
    CHECK_THROWS_WITH(a.take_outside_merge(), Contains("outside merge_into_base"));
    size_t i = 0;
    for (const auto& [name, t] : base.named_parameters()) {
        INFO(name);
        CHECK(t.to_vector() == before[i++]);
    }
}

TEST_CASE("extension: a method registered at run time is available everywhere by name", "[extension]") {
    REQUIRE(kRegistered);
    const auto names = method_names();
    CHECK(std::find(names.begin(), names.end(), "toy-shift") != names.end());
    CHECK(make_adapter("toy-shift")->method() == "toy-shift");
    CHECK_THROWS_WITH(register_method({"toy-shift", "again", [](const AdapterOptions& o) { return std::make_unique<ToyShift>(o); }}),
                      Contains("'toy-shift' is already registered"));
    // Its own options are parsed and validated by it, also through AdapterOptions JSON.
    const AdapterOptions back = AdapterOptions::from_json(toy_options("all", 1).to_json());
    CHECK(make_adapter("toy-shift", back)->options().section_or_empty("toy-shift").at("init_std") == 0.5);
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"toy-shift", {{"init", 1}}}}),
                      Contains("toy-shift options: key 'init' is unknown (known: init_std)"));
    // The harness asks the adapter for its learning-rate grid.
    CHECK(harness::default_lr_grid("toy-shift") == std::vector<double>{2e-2, 5e-2});
}

TEST_CASE("extension: the toy method's cost report: analytic FLOPs equal the measured ones", "[extension]") {
    const GPTConfig cfg = small_gpt(40, 8, 3);
    ReportSettings s;
    s.batch = 2;
    s.seq = 6;
    for (const char* layers : {"all", "top:1"}) {
        INFO(layers);
        const MethodReport r = report_method(cfg, s, "toy-shift", toy_options(layers, 2), true);
        REQUIRE(r.measured);
        for (int p = 0; p < flops::kPhases; ++p) CHECK(r.analytic[size_t(p)] == (*r.measured)[size_t(p)]);
        CHECK(r.inference_flops_per_token == *r.inference_flops_per_token_measured);
        CHECK(r.trainable_params == r.formula_params);
        CHECK(r.formula_params == int64_t(parse_layers(layers, 3).size()) * cfg.d_model);
        // dX flows from the loss down to the lowest shifted layer only.
        CHECK(r.backward_blocks.front() == parse_layers(layers, 3).front());
    }
}

TEST_CASE("extension: the toy method mixes with others in one batch, serves, saves and loads", "[extension]") {
    auto model = sharp();
    GPT& base = *model;
    auto toy = make_adapter("toy-shift", toy_options("all", 4));
    toy->attach(base);
    AdapterOptions po;
    po.n = 2;
    po.init = "random";
    auto prompt = make_adapter("prompt", po);
    prompt->attach(base);
    const std::vector<int32_t> tokens = {3, 1, 4, 1, 5};

    // MultiAdapter: a toy row, a prompt row and a base row equal their solo forwards.
    ModelInput in;
    in.B = 3;
    in.T = int64_t(tokens.size());
    for (int r = 0; r < 3; ++r) in.tokens.insert(in.tokens.end(), tokens.begin(), tokens.end());
    ModelInput one;
    one.B = 1;
    one.T = in.T;
    one.tokens = tokens;
    auto logits = [&](ModelHooks* h, const ModelInput& x) {
        NoGradGuard no_grad;
        base.set_hooks(h);
        Tensor l = base.forward(x);
        base.set_hooks(nullptr);
        return l;
    };
    MultiAdapter multi({toy.get(), prompt.get()});
    multi.set_rows({0, 1, -1});
    const Tensor mixed = logits(&multi, in);
    const int64_t V = mixed.dim(2), row = in.T * V;
    const Tensor solo_toy = logits(toy.get(), one), solo_prompt = logits(prompt.get(), one), solo_base = logits(nullptr, one);
    auto row_diff = [&](int r, const Tensor& solo) {
        float m = 0.f;
        for (int64_t i = 0; i < row; ++i) m = std::max(m, std::fabs(mixed.data()[r * row + i] - solo.data()[i]));
        return m;
    };
    CHECK(row_diff(0, solo_toy) < 1e-5f);
    CHECK(row_diff(1, solo_prompt) < 1e-5f);
    CHECK(row_diff(2, solo_base) < 1e-5f);
    float toy_effect = 0.f;
    for (int64_t i = 0; i < row; ++i) toy_effect = std::max(toy_effect, std::fabs(solo_toy.data()[i] - solo_base.data()[i]));
    CHECK(toy_effect > 1e-2f);  // the shift changes the logits: the row equalities are not trivial

    // Server: the toy tenant's greedy continuation equals generate() with the toy alone.
    Server server(base);
    server.add_adapter("toy", *toy);
    server.add_adapter("prompt", *prompt);
    const std::vector<Result> served = server.run({{"a", "toy", tokens, 6, -1}, {"b", "prompt", tokens, 6, -1}});
    REQUIRE(served[0].ok());
    toy->activate(base);
    GenerateOptions g;
    g.max_new_tokens = 6;
    CHECK(served[0].tokens == generate(base, {tokens}, g)[0]);
    base.set_hooks(nullptr);

    // Save and load: same method, options and tensors, same logits on a fresh copy of the base.
    TempDir tmp;
    save_adapter(tmp.path("toy"), *toy);
    auto fresh = sharp();
    auto loaded = load_adapter(tmp.path("toy"), *fresh);
    CHECK(loaded->method() == "toy-shift");
    CHECK(loaded->options().to_json() == toy->options().to_json());
    NoGradGuard no_grad;
    fresh->set_hooks(loaded.get());
    CHECK(bitwise_equal(fresh->forward(one), solo_toy));
    fresh->set_hooks(nullptr);
    // No Hugging Face form: export is refused by name.
    CHECK_THROWS_WITH(export_hf(tmp.path("hf"), *toy), Contains("'toy-shift' has no Hugging Face PEFT counterpart"));
}

TEST_CASE("extension: a short fine-tuning run trains only the toy's tensors, with its own LR and decay", "[extension]") {
    auto model = sharp();
    GPT& base = *model;
    const NamedTensors before = base.named_parameters();
    std::vector<std::vector<float>> base_values;
    for (const auto& [n, t] : before) base_values.push_back(t.to_vector());
    AdapterOptions o = toy_options("all", 5);
    o.section("toy-shift")["init_std"] = 0.0;
    auto toy = make_adapter("toy-shift", o);
    toy->activate(base);
    AdamWOptions ao;
    ao.lr = toy->lr_grid().front();
    ao.weight_decay = toy->weight_decay();
    AdamW opt(toy->parameters(), ao);
    ModelInput in;
    in.B = 2;
    in.T = 8;
    std::vector<int32_t> targets;
    Rng rng(6);
    for (int64_t i = 0; i < in.B * in.T; ++i) {
        in.tokens.push_back(int32_t(rng.below(40)));
        targets.push_back(int32_t(rng.below(40)));
    }
    const std::vector<float> losses = peft_testing::losses_of_steps(base, opt, in, targets, 8);
    base.set_hooks(nullptr);
    CHECK(losses.back() < losses.front());
    for (size_t i = 0; i < before.size(); ++i) CHECK(before[i].second.to_vector() == base_values[i]);  // base frozen
}
