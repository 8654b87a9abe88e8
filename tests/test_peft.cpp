// Behaviour of the PEFT methods on a tiny GPT: the base stays bitwise frozen,
// trainable counts equal the formulas, gradients reach exactly the tensors
// each method places, the equivalences between forms hold (hidden vs
// key/value prefixes, n = 0, LoRA merge, materialized reparameterization,
// zero BitFit deltas), backprop matches finite differences, and the registry
// and option parsers name what is wrong.
#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nn/optim.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::peft_testing;
using Catch::Contains;

namespace {

// A fixed batch of two left-padded rows (lengths 6 and 4) with random
// next-token targets (-1 at padding).
struct Batch {
    ModelInput in;
    std::vector<int32_t> targets;
};
Batch make_batch(uint64_t seed, const std::vector<int64_t>& row_lengths = {6, 4}) {
    const int64_t vocab = 48;
    Rng rng(seed);
    Batch b;
    std::vector<std::vector<int32_t>> rows;
    for (int64_t len : row_lengths) rows.push_back(random_tokens(rng, len, vocab));
    b.in = padded_batch(rows, /*left=*/true);
    for (size_t i = 0; i < b.in.tokens.size(); ++i)
        b.targets.push_back(b.in.valid[i] ? int32_t(rng.below(uint32_t(vocab))) : -1);
    return b;
}

// AdamW steps on the adapter's tensors over a fixed batch; returns the losses.
std::vector<float> train(GPT& base, Adapter& adapter, int steps) {
    adapter.activate(base);
    AdamWOptions o;
    o.lr = 1e-2;
    AdamW opt(adapter.parameters(), o);
    Batch b = make_batch(99);
    const std::vector<float> losses = losses_of_steps(base, opt, b.in, b.targets, steps);
    base.set_hooks(nullptr);
    return losses;
}

Tensor find(const NamedTensors& tensors, const std::string& name) {
    for (const auto& [n, t] : tensors)
        if (n == name) return t;
    FAIL("no tensor named " << name);
    return {};
}

std::unique_ptr<Adapter> attached(GPT& base, const std::string& method, const AdapterOptions& o) {
    auto a = make_adapter(method, o);
    a->attach(base);
    return a;
}

AdapterOptions options(int64_t n, const std::string& layers, bool reparam = false, const std::string& init = "vocab") {
    AdapterOptions o;
    o.n = n;
    o.layers = layers;
    for (const char* prefix_form : {"prefix", "prefix-kv"}) o.section(prefix_form) = {{"reparam", reparam}, {"reparam_hidden", 24}};
    o.init = init;
    o.seed = uint64_t(n) * 31 + layers.size();
    return o;
}

}  // namespace

TEST_CASE("peft: the registry makes every listed method and names unknown ones with the known list", "[peft]") {
    std::vector<std::string> names = method_names();
    REQUIRE(names.size() >= 6);  // the built-ins first, then any registered later
    CHECK(std::vector<std::string>(names.begin(), names.begin() + 6) ==
          std::vector<std::string>{"full", "prompt", "prefix", "prefix-kv", "lora", "bitfit"});
    for (size_t i = 0; i < names.size(); ++i)
        for (size_t j = 0; j < i; ++j) CHECK(names[i] != names[j]);
    for (const MethodInfo& m : methods()) {
        CHECK(!m.description.empty());
        CHECK(make_adapter(m.name)->method() == m.name);
    }
    CHECK_THROWS_WITH(make_adapter("nope"), Contains("'nope'") && Contains("full") && Contains("prompt") &&
                                                Contains("prefix-kv") && Contains("lora") && Contains("bitfit"));
}

TEST_CASE("peft: parse_layers resolves specs and its errors name the spec", "[peft]") {
    using V = std::vector<int>;
    CHECK(parse_layers("all", 3) == V{0, 1, 2});
    CHECK(parse_layers("none", 3) == V{});
    CHECK(parse_layers("top:1", 3) == V{2});
    CHECK(parse_layers("top:3", 3) == V{0, 1, 2});
    CHECK(parse_layers("bottom:2", 3) == V{0, 1});
    CHECK(parse_layers("2,0", 3) == V{0, 2});
    for (const char* bad : {"foo", "0,x", "1,,2", "top:", "top:x", "bottom:1.5"})
        CHECK_THROWS_WITH(parse_layers(bad, 3), Contains(fmt::format("'{}'", bad)) && Contains("not a number"));
    CHECK_THROWS_WITH(parse_layers("0,3", 3), Contains("'0,3'") && Contains("layer 3 does not exist"));
    CHECK_THROWS_WITH(parse_layers("-1", 3), Contains("'-1'") && Contains("layer -1 does not exist"));
    CHECK_THROWS_WITH(parse_layers("top:4", 3), Contains("'top:4'") && Contains("k = 4"));
    CHECK_THROWS_WITH(parse_layers("bottom:-1", 3), Contains("'bottom:-1'"));
    // An adapter resolves its spec on attach and reports it the same way.
    GPT base(tiny_config(), 1);
    auto a = make_adapter("prefix", options(2, "top:9"));
    CHECK_THROWS_WITH(a->attach(base), Contains("'top:9'"));
}

TEST_CASE("peft: AdapterOptions round-trip JSON and reject unknown keys and bad values by name", "[peft]") {
    AdapterOptions o = options(7, "0,2", true, "random");
    o.section("lora") = {{"r", 3}, {"lora_alpha", 5.0}, {"target_modules", {"fc", "proj"}}};
    o.init_tokens = {1, 2, 3};
    AdapterOptions back = AdapterOptions::from_json(o.to_json());
    CHECK(back.to_json() == o.to_json());
    CHECK(back.n == 7);
    CHECK(back.section("lora").at("target_modules") == nlohmann::json({"fc", "proj"}));
    // An adapter keeps its own section only, with the defaults it used filled in.
    auto lora = make_adapter("lora", back);
    CHECK(lora->options().sections.size() == 1);
    CHECK(lora->options().section_or_empty("lora") == o.section("lora"));
    CHECK(make_adapter("prompt", back)->options().sections == nlohmann::json({{"prompt", nlohmann::json::object()}}));
    CHECK(make_adapter("lora")->options().section_or_empty("lora") ==
          nlohmann::json({{"r", 8}, {"lora_alpha", 16.0}, {"target_modules", {"q_proj", "v_proj"}}}));

    CHECK_THROWS_WITH(AdapterOptions::from_json({{"n", 4}, {"lora_rnk", 2}}), Contains("unknown key 'lora_rnk'"));
    // Each method validates its own section: unknown keys and bad values by name.
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"lora", {{"rank", 2}}}}),
                      Contains("lora options") && Contains("'rank'") && Contains("unknown"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"lora", {{"r", 0}}}}), Contains("lora options: key 'r' = 0 must be >= 1"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"lora", {{"r", "big"}}}}), Contains("'r' must be an integer"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"prefix", {{"reparam_hidden", 0}}}}), Contains("reparam_hidden"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"bitfit", {{"x", 1}}}}), Contains("bitfit options") && Contains("'x'"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"lora", 3}}), Contains("'lora' options must be a JSON object"));
    AdapterOptions typo;
    typo.section("lora")["alpha"] = 1;  // PEFT's name is lora_alpha
    CHECK_THROWS_WITH(make_adapter("lora", typo), Contains("'alpha' is unknown") && Contains("lora_alpha"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"n", "many"}}), Contains("'n'") && Contains("\"many\""));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"layers", 3}}), Contains("'layers'"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"n", 2.5}}), Contains("'n'") && Contains("2.5"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"seed", -1}}), Contains("'seed'") && Contains("-1"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"init_tokens", {1, 2.5}}}), Contains("'init_tokens'"));
    CHECK_THROWS_WITH(AdapterOptions::from_json({{"n", -1}}), Contains("n = -1"));
    CHECK_THROWS_WITH(AdapterOptions::from_json(nlohmann::json::array()), Contains("JSON object"));
}

TEST_CASE("peft: trainable counts equal each method's formula; frozen-base methods train only their tensors",
          "[peft]") {
    std::vector<AdapterOptions> combos = {options(4, "all"),         options(3, "top:1"),
                                          options(5, "bottom:1"),    options(2, "0,2"),
                                          options(3, "all", true),   options(2, "0,2", true),
                                          options(1, "top:1", true)};
    auto lora = [](int64_t r, std::vector<std::string> targets, const std::string& layers) {
        AdapterOptions o = options(1, layers);
        o.section("lora") = {{"r", r}, {"target_modules", targets}};
        return o;
    };
    combos.push_back(lora(2, {"q_proj"}, "all"));
    combos.push_back(lora(4, {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}, "all"));
    combos.push_back(lora(3, {"fc", "proj"}, "top:1"));
    combos.push_back(lora(1, {"v_proj", "proj"}, "0,2"));

    for (bool tied : {false, true}) {
        GPTConfig cfg = tiny_config();
        cfg.tie_embeddings = tied;
        for (const std::string& method : method_names())
            for (const AdapterOptions& o : combos) {
                INFO(method << " " << o.to_json().dump() << " tied=" << tied);
                GPT base(cfg, 2);
                auto a = make_adapter(method, o);
                const ParamFormula before_attach = a->formula(cfg);  // needs no base
                a->attach(base);
                CHECK(before_attach.count == a->formula(cfg).count);
                CHECK(!a->formula(cfg).text.empty());
                CHECK(total_numel(a->parameters()) == a->formula(cfg).count);
                for (const auto& [name, t] : a->parameters()) CHECK(t.requires_grad());
                if (a->changes_base()) {
                    CHECK(base.num_trainable() == base.num_params());
                    CHECK(a->formula(cfg).count == base.num_params());
                } else {
                    CHECK(base.num_trainable() == 0);
                }
                CHECK(total_numel(a->inference_parameters()) == a->inference_formula(cfg).count);
                // Whether the method has a training-only form (an encoder dropped at inference).
                std::vector<std::string> train_names, infer_names;
                for (const auto& [name, t] : a->parameters()) train_names.push_back(name);
                for (const auto& [name, t] : a->inference_parameters()) infer_names.push_back(name);
                const bool training_only_form = train_names != infer_names;
                a->materialize();
                CHECK(total_numel(a->parameters()) == a->inference_formula(cfg).count);
                CHECK(total_numel(a->inference_parameters()) == a->inference_formula(cfg).count);
                // Only a training-only form makes the two differ.
                if (!training_only_form) CHECK(a->inference_formula(cfg).count == a->formula(cfg).count);
                if (o.section_or_empty(method).value("reparam", false)) CHECK(training_only_form);
            }
    }
    // Repeated or unknown LoRA targets are refused when the adapter is made.
    CHECK_THROWS_WITH(make_adapter("lora", lora(2, {"q_proj", "v_proj", "q_proj"}, "all")),
                      Contains("'q_proj' is listed twice"));
    CHECK_THROWS_WITH(make_adapter("lora", lora(2, {"q_proj", "mlp"}, "all")), Contains("target 'mlp'"));
    // Hand-computed values for one config, in case formula and build agree on a wrong count.
    GPTConfig cfg = tiny_config();  // d 32, F 64, L 3
    CHECK(make_adapter("prompt", options(4, "all"))->formula(cfg).count == 4 * 32);
    CHECK(make_adapter("prefix", options(4, "0,2"))->formula(cfg).count == 2 * 4 * 32);
    CHECK(make_adapter("prefix-kv", options(4, "top:1"))->formula(cfg).count == 2 * 4 * 32);
    CHECK(make_adapter("bitfit", options(1, "all"))->formula(cfg).count == 3 * (5 * 32 + 64));
    CHECK(make_adapter("lora", lora(2, {"q_proj", "fc"}, "all"))->formula(cfg).count == 3 * (2 * 64 + 2 * 96));
}

TEST_CASE("peft: training changes no base weight, bitwise, except under full fine-tuning", "[peft]") {
    for (const std::string& method : method_names()) {
        INFO(method);
        GPT base(tiny_config(), 3);
        sharpen(base);
        const NamedTensors before = clones(base.named_parameters());
        AdapterOptions o = options(3, "all");
        o.section("lora")["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"};
        auto a = make_adapter(method, o);
        a->attach(base);
        const NamedTensors adapter_before = clones(a->parameters());
        std::vector<float> losses = train(base, *a, 4);
        CHECK(losses.back() < losses.front());  // the steps did train something
        int adapter_changed = 0;
        for (size_t i = 0; i < adapter_before.size(); ++i)
            adapter_changed += !bitwise_equal(adapter_before[i].second, a->parameters()[i].second);
        CHECK(adapter_changed == int(adapter_before.size()));

        const NamedTensors after = base.named_parameters();
        REQUIRE(after.size() == before.size());
        for (size_t i = 0; i < before.size(); ++i) {
            INFO(before[i].first);
            if (a->changes_base()) CHECK_FALSE(bitwise_equal(before[i].second, after[i].second));
            else CHECK(bitwise_equal(before[i].second, after[i].second));
        }
        if (!a->changes_base()) CHECK(base.num_trainable() == 0);
    }
}

TEST_CASE("peft: prompt tuning's one tensor sits at the input and receives a gradient", "[peft]") {
    GPT base(tiny_config(), 4);
    sharpen(base);
    auto a = attached(base, "prompt", options(4, "all"));
    REQUIRE(a->parameters().size() == 1);
    const Tensor prompt = a->parameters()[0].second;
    CHECK(a->parameters()[0].first == "prompt_embeddings");
    CHECK(prompt.shape() == Shape{4, 32});
    ForwardInfo info{2, 6, true, false, {}};
    CHECK(a->input_prefix(info).embeds.impl() == prompt.impl());  // the tensor itself, unprojected
    for (int l = 0; l < 3; ++l) {
        LayerPrefix p = a->layer_prefix(l, info);
        CHECK((!p.hidden.defined() && !p.key.defined()));
    }
    Batch b = make_batch(5);
    a->activate(base);
    backward(lm_loss(base.forward(b.in), b.targets));
    base.set_hooks(nullptr);
    REQUIRE(prompt.has_grad());
    const Tensor g = prompt.grad();
    for (int64_t v = 0; v < 4; ++v) {  // every virtual token is read
        float m = 0.f;
        for (int64_t j = 0; j < 32; ++j) m = std::max(m, std::fabs(g.data()[v * 32 + j]));
        CHECK(m > 1e-4f);
    }
    for (const auto& [name, t] : base.named_parameters()) CHECK(!t.has_grad());
}

TEST_CASE("peft: prefix gradients reach every chosen layer's prefix and no other layer has one", "[peft]") {
    Batch b = make_batch(6);
    for (bool kv : {false, true})
        for (const char* spec : {"all", "top:1", "0,2"})
            for (bool reparam : {false, true}) {
                const std::string method = kv ? "prefix-kv" : "prefix";
                INFO(method << " layers=" << spec << " reparam=" << reparam);
                GPT base(tiny_config(), 7);
                sharpen(base);
                auto a = attached(base, method, options(3, spec, reparam));
                const std::vector<int> chosen = parse_layers(spec, 3);
                CHECK(a->layers() == chosen);

                std::set<std::string> expected;
                if (reparam) {
                    for (const char* t : {"embedding", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})
                        expected.insert(std::string("prefix_mlp.") + t);
                } else {
                    for (int l : chosen)
                        for (const char* t : kv ? std::vector<const char*>{"key", "value"}
                                                : std::vector<const char*>{"hidden"})
                            expected.insert(fmt::format("blocks.{}.prefix.{}", l, t));
                }
                std::set<std::string> names;
                for (const auto& [name, t] : a->parameters()) names.insert(name);
                CHECK(names == expected);

                ForwardInfo info{2, 6, true, false, {}};
                a->begin_forward(info);
                for (int l = 0; l < 3; ++l) {
                    INFO("layer " << l);
                    const bool is_chosen = std::count(chosen.begin(), chosen.end(), l) > 0;
                    LayerPrefix p = a->layer_prefix(l, info);
                    CHECK(p.hidden.defined() == (is_chosen && !kv));
                    CHECK(p.key.defined() == (is_chosen && kv));
                    CHECK(p.value.defined() == (is_chosen && kv));
                    if (is_chosen) CHECK((kv ? p.key : p.hidden).shape() == Shape{3, 32});
                }
                CHECK(!a->input_prefix(info).embeds.defined());
                clear_tape();  // the probe's MLP forward above

                a->activate(base);
                backward(lm_loss(base.forward(b.in), b.targets));
                base.set_hooks(nullptr);
                for (const auto& [name, t] : a->parameters()) {
                    INFO(name);
                    CHECK(max_abs(t.grad()) > 1e-5f);
                }
                if (reparam) {
                    // Each slot's rows of fc2 [S*d, h] (slot s feeds layer chosen[s / (kv ? 2 : 1)]) get a gradient.
                    const Tensor g = find(a->parameters(), "prefix_mlp.fc2.weight").grad();
                    const int64_t S = int64_t(chosen.size()) * (kv ? 2 : 1), h = 24, d = 32;
                    REQUIRE(g.shape() == Shape{S * d, h});
                    for (int64_t s = 0; s < S; ++s) {
                        float m = 0.f;
                        for (int64_t i = s * d * h; i < (s + 1) * d * h; ++i) m = std::max(m, std::fabs(g.data()[i]));
                        CHECK(m > 1e-6f);
                    }
                }
                for (const auto& [name, t] : base.named_parameters()) CHECK(!t.has_grad());
            }
}

TEST_CASE("peft: a key/value prefix computed from a hidden-state prefix gives the same logits", "[peft]") {
    GPT base(tiny_config(), 8);
    sharpen(base);
    auto hidden = attached(base, "prefix", options(3, "0,2", false, "random"));
    auto kv = attached(base, "prefix-kv", options(3, "0,2", false, "random"));
    NoGradGuard no_grad;
    std::map<std::string, Tensor> kv_params(kv->parameters().begin(), kv->parameters().end());
    for (const auto& [name, h] : hidden->parameters()) {
        const int l = name[7] - '0';  // "blocks.L.prefix.hidden"
        const Block& blk = *base.blocks[size_t(l)];
        Tensor hn = layer_norm(h, blk.ln1.weight, blk.ln1.bias);
        kv_params.at(fmt::format("blocks.{}.prefix.key", l)).copy_from(linear(hn, blk.attn.k_proj.weight, blk.attn.k_proj.bias));
        kv_params.at(fmt::format("blocks.{}.prefix.value", l)).copy_from(linear(hn, blk.attn.v_proj.weight, blk.attn.v_proj.bias));
    }
    const ModelInput in = make_batch(8).in;
    Tensor via_hidden = logits_of(base, hidden.get(), in), via_kv = logits_of(base, kv.get(), in);
    const float diff = max_diff(via_hidden, via_kv);
    WARN(fmt::format("hidden vs key/value prefix: max |logit diff| = {:.3g}", diff));
    CHECK(diff < 1e-5f);
    CHECK(max_diff(via_hidden, logits_of(base, nullptr, in)) > 1e-2f);  // the prefix matters
}

TEST_CASE("peft: n = 0 prompt and prefixes give exactly the base logits", "[peft]") {
    GPT base(tiny_config(), 9);
    sharpen(base);
    const ModelInput in = make_batch(9).in;
    const Tensor reference = logits_of(base, nullptr, in);
    for (const char* method : {"prompt", "prefix", "prefix-kv"})
        for (bool reparam : {false, true}) {
            if (reparam && std::string(method) == "prompt") continue;
            INFO(method << " reparam=" << reparam);
            auto a = attached(base, method, options(0, "all", reparam));
            CHECK(bitwise_equal(logits_of(base, a.get(), in), reference));
            // And the same adapter with vectors does change them.
            auto b = attached(base, method, options(2, "all", reparam));
            CHECK(max_diff(logits_of(base, b.get(), in), reference) > 1e-3f);
        }
}

TEST_CASE("peft: LoRA starts at the base; merged equals unmerged; unmerge restores the base bitwise", "[peft]") {
    GPT base(tiny_config(), 10);
    sharpen(base);
    const ModelInput in = make_batch(10).in;
    const Tensor reference = logits_of(base, nullptr, in);
    AdapterOptions o = options(1, "all");
    o.section("lora") = {{"r", 4}, {"target_modules", {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}}};
    auto a = make_adapter("lora", o);
    a->attach(base);
    Adapter& lora = *a;
    CHECK(lora.mergeable());
    CHECK(lora.parameters().size() == 2 * 18);  // A and B on 6 targets in 3 layers
    CHECK(max_diff(logits_of(base, &lora, in), reference) == 0.f);  // B = 0

    const NamedTensors base_before = clones(base.named_parameters());
    train(base, lora, 5);
    const Tensor unmerged = logits_of(base, &lora, in);
    CHECK(max_diff(unmerged, reference) > 1e-3f);

    lora.merge();
    CHECK(lora.merged());
    const Tensor merged = logits_of(base, &lora, in);
    const float diff = max_diff(merged, unmerged);
    WARN(fmt::format("LoRA merged vs unmerged: max |logit diff| = {:.3g}", diff));
    CHECK(diff < 1e-5f);
    CHECK(max_diff(logits_of(base, nullptr, in), unmerged) < 1e-5f);  // merged weights need no hook
    const std::string fc = "blocks.1.mlp.fc.weight";
    CHECK_FALSE(bitwise_equal(base.parameter(fc), find(base_before, fc)));

    lora.unmerge();
    CHECK(!lora.merged());
    const NamedTensors after = base.named_parameters();
    for (size_t i = 0; i < after.size(); ++i) {
        INFO(after[i].first);
        CHECK(bitwise_equal(after[i].second, base_before[i].second));
    }
    CHECK(bitwise_equal(logits_of(base, &lora, in), unmerged));
}

TEST_CASE("peft: two merges into one base unmerge in reverse order only, leaving the base bitwise original", "[peft]") {
    // Before the fix: merge A, merge B, unmerge A, unmerge B left A's delta in the base, both reporting unmerged
    // (each unmerge restored its own snapshot).
    GPT base(tiny_config(), 15);
    const NamedTensors original = clones(base.named_parameters());
    AdapterOptions o = options(1, "all");
    o.section("lora") = {{"r", 2}, {"target_modules", {"q_proj", "fc"}}};
    auto a = attached(base, "lora", o);
    o.seed = 77;
    auto b = attached(base, "lora", o);
    perturb(a->parameters(), 1);
    perturb(b->parameters(), 2);
    auto base_is_original = [&] {
        const NamedTensors now = base.named_parameters();
        for (size_t i = 0; i < now.size(); ++i)
            if (!bitwise_equal(now[i].second, original[i].second)) return false;
        return true;
    };
    a->merge();
    b->merge();
    CHECK_THROWS_WITH(a->unmerge(), Contains("out of order") && Contains("unmerge it first"));
    CHECK(a->merged());  // refused: nothing changed
    b->unmerge();
    a->unmerge();
    CHECK(!a->merged());
    CHECK(!b->merged());
    CHECK(base_is_original());
    // In order it works whichever adapter goes first.
    b->merge();
    a->merge();
    a->unmerge();
    b->unmerge();
    CHECK(base_is_original());
    // A method that cannot merge says so.
    CHECK_THROWS_WITH(attached(base, "prompt", o)->merge(), Contains("prompt adapter: cannot be merged"));
}

TEST_CASE("peft: materializing a reparameterized prefix keeps the logits and drops the MLP", "[peft]") {
    for (const char* method : {"prefix", "prefix-kv"}) {
        INFO(method);
        GPT base(tiny_config(), 11);
        sharpen(base);
        const GPTConfig cfg = base.config();
        auto a = attached(base, method, options(3, "0,2", true));
        train(base, *a, 3);  // move away from the init
        const ModelInput in = make_batch(11).in;
        const Tensor before = logits_of(base, a.get(), in);
        const NamedTensors inference = a->inference_parameters();
        a->materialize();
        const Tensor after = logits_of(base, a.get(), in);
        const float diff = max_diff(before, after);
        WARN(fmt::format("{} reparameterized vs materialized: max |logit diff| = {:.3g}", method, diff));
        CHECK(diff < 1e-5f);
        CHECK(max_diff(before, logits_of(base, nullptr, in)) > 1e-3f);
        for (const auto& [name, t] : a->parameters()) {
            CHECK(name.find("prefix_mlp") == std::string::npos);
            CHECK(t.requires_grad());
        }
        CHECK(total_numel(a->parameters()) == a->inference_formula(cfg).count);
        REQUIRE(a->parameters().size() == inference.size());
        for (size_t i = 0; i < inference.size(); ++i) {
            CHECK(a->parameters()[i].first == inference[i].first);
            CHECK(max_diff(a->parameters()[i].second, inference[i].second) == 0.f);
        }
        // The materialized prefix trains on its own.
        const NamedTensors snapshot = clones(a->parameters());
        train(base, *a, 1);
        CHECK_FALSE(bitwise_equal(snapshot[0].second, a->parameters()[0].second));
    }
}

TEST_CASE("peft: BitFit with zero deltas is exactly the base", "[peft]") {
    GPT base(tiny_config(), 12);
    sharpen(base);
    const ModelInput in = make_batch(12).in;
    auto a = attached(base, "bitfit", options(1, "all"));
    const Tensor reference = logits_of(base, nullptr, in);
    CHECK(max_diff(logits_of(base, a.get(), in), reference) == 0.f);
    perturb(a->parameters(), 3, 0.1f);
    CHECK(max_diff(logits_of(base, a.get(), in), reference) > 1e-3f);
}

TEST_CASE("peft: backprop through the whole model matches central differences", "[peft]") {
    struct Case {
        std::string method;
        AdapterOptions opts;
    };
    AdapterOptions lora = options(1, "0,2");
    lora.section("lora") = {{"r", 2}, {"target_modules", {"q_proj", "v_proj", "fc", "proj"}}};
    std::vector<Case> cases = {{"prompt", options(3, "all", false, "random")},
                               {"prefix", options(2, "0,2", false, "random")},
                               {"prefix-kv", options(2, "all", false, "random")},
                               {"prefix", options(2, "top:1", true)},
                               {"lora", lora}};
    AdapterOptions lstm = options(3, "all", false, "random");
    lstm.section("p-tuning") = {{"encoder_reparameterization_type", "LSTM"}, {"encoder_hidden_size", 4}, {"encoder_num_layers", 1}};
    cases.push_back({"p-tuning", lstm});
    // Every other registered method that leaves the base frozen, with its default options.
    for (const std::string& m : method_names()) {
        const bool listed = std::any_of(cases.begin(), cases.end(), [&](const Case& c) { return c.method == m; });
        if (!listed && !make_adapter(m)->changes_base()) cases.push_back({m, options(2, "top:2", false, "random")});
    }
    const Batch b = make_batch(13);
    for (const Case& c : cases) {
        INFO(c.method << " " << c.opts.to_json().dump());
        GPT base(tiny_config(), 14);
        sharpen(base, 4.f);
        // Sharper attention: gradients of prefix keys then stand well above
        // the float32 rounding of the loss differences.
        for (auto& blk : base.blocks)
            for (int64_t i = 0; i < blk->attn.q_proj.weight.numel(); ++i) blk->attn.q_proj.weight.data()[i] *= 3.f;
        auto a = attached(base, c.method, c.opts);
        // Away from the init: LoRA's B = 0 would zero A's gradient; deltas and scales start at 0 or 1.
        if (c.method != "prompt" && c.method != "prefix" && c.method != "prefix-kv") perturb(a->parameters(), 5, 0.2f);
        a->activate(base);
        backward(lm_loss(base.forward(b.in), b.targets));
        // The finite differences read the loss in double from the float32
        // logits: the float32 loss itself rounds to ~5e-7, as large as a
        // small LoRA A gradient times eps.
        auto loss = [&] {
            NoGradGuard no_grad;
            return mean_cross_entropy_in_double(base.forward(b.in), b.targets);
        };
        Rng rng(21);
        for (const auto& [name, t] : a->parameters()) {
            const Tensor g = t.grad().clone();
            const float scale = max_abs(g);
            float* p = Tensor(t).data();
            const std::vector<float> saved(p, p + t.numel());
            // Central difference along a unit direction u of this tensor:
            // (L(w + eps u) - L(w - eps u)) / 2 eps, which backprop predicts as g.u.
            auto central = [&](const std::vector<double>& u, double eps) {
                for (int64_t i = 0; i < t.numel(); ++i) p[i] = float(saved[i] + eps * u[i]);
                const double up = loss();
                for (int64_t i = 0; i < t.numel(); ++i) p[i] = float(saved[i] - eps * u[i]);
                const double down = loss();
                std::copy(saved.begin(), saved.end(), p);
                return (up - down) / (2.0 * eps);
            };
            if (scale <= 1e-4f) {
                // A zero gradient (a key bias: softmax ignores a shift shared by
                // every key) must be zero by finite differences too.
                std::vector<double> u(size_t(t.numel()));
                for (double& v : u) v = rng.normal(0.f, 1.f);
                INFO(name << ": backprop gives a zero gradient");
                CHECK(std::fabs(central(u, 4e-3)) < 1e-5);
                continue;
            }
            // Richardson extrapolation of two step sizes cancels the eps^2
            // curvature term (the loss bends sharply along some directions:
            // LayerNorm of a small prefix, LoRA's product B A).
            auto check_direction = [&](const std::vector<double>& u, const std::string& what) {
                double analytic = 0;
                for (int64_t i = 0; i < t.numel(); ++i) analytic += double(g.data()[i]) * u[i];
                const double fd = central(u, 4e-3), fd_half = central(u, 2e-3);
                const double extrapolated = (4.0 * fd_half - fd) / 3.0;
                INFO(name << " along " << what << ": backprop " << analytic << ", central differences " << fd
                          << " (eps 4e-3), " << fd_half << " (eps 2e-3), extrapolated " << extrapolated);
                // 5e-6: the float32 logits make the loss rough at ~1e-7, which the
                // difference quotients at these steps turn into a few 1e-6. Where
                // that roughness dominates the curvature (an LSTM encoder's
                // weights, at -O1 rounding), extrapolation amplifies it and the
                // plain quotient at the larger step is the better estimate: the
                // closer of the two is checked (a wrong gradient misses both).
                const double err = std::min(std::fabs(extrapolated - analytic), std::fabs(fd - analytic));
                CHECK(err <= 2e-2 * std::fabs(analytic) + 1e-3 * scale + 5e-6);
            };
            // The gradient's own direction (the whole tensor at once: the
            // largest signal), then single coordinates among those whose
            // gradient is at least a tenth of the largest and well above the
            // rounding floor.
            std::vector<double> along_g(size_t(t.numel()));
            double norm = 0;
            for (int64_t i = 0; i < t.numel(); ++i) norm += double(g.data()[i]) * g.data()[i];
            for (int64_t i = 0; i < t.numel(); ++i) along_g[size_t(i)] = g.data()[i] / std::sqrt(norm);
            check_direction(along_g, "its gradient");
            std::vector<int64_t> candidates;
            for (int64_t i = 0; i < g.numel(); ++i)
                if (std::fabs(g.data()[i]) >= std::max(0.1f * scale, 1e-3f)) candidates.push_back(i);
            for (int k = 0; k < 3 && !candidates.empty(); ++k) {
                const int64_t i = candidates[rng.below(uint32_t(candidates.size()))];
                std::vector<double> unit(size_t(t.numel()), 0.0);
                unit[size_t(i)] = 1.0;
                check_direction(unit, "coordinate " + std::to_string(i));
            }
        }
        base.set_hooks(nullptr);
    }
}
