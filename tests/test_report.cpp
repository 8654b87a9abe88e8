// Cost reports (peft/report.h): the analytic FLOP model against one real step
// through the autograd counters, parameter formulas, the per-layer map, and
// the GPT-2 presets (analytic only). Tiny model: V 32, C 16, 3 layers, T 6.
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "peft/registry.h"
#include "nn/presets.h"
#include "peft/report.h"

using namespace peftlab;
using namespace peftlab::peft;
using Catch::Contains;

namespace {

GPTConfig tiny_config() {
    GPTConfig c;
    c.vocab = 32;
    c.d_model = 16;
    c.n_layers = 3;
    c.n_heads = 2;
    c.d_ff = 32;
    c.max_seq = 8;
    return c;
}

ReportSettings tiny_settings() {
    ReportSettings s;
    s.batch = 2;
    s.seq = 6;
    s.seed = 7;
    return s;
}

AdapterOptions tiny_options(const std::string& layers, bool reparam) {
    AdapterOptions o;
    o.n = 3;
    o.layers = layers;
    for (const char* prefix_form : {"prefix", "prefix-kv"})
        o.section(prefix_form) = {{"reparam", reparam}, {"reparam_hidden", 8}};
    o.section("lora") = {{"r", 2}};
    return o;
}

std::string describe(const std::string& method, const AdapterOptions& o, const GPTConfig& c) {
    return fmt::format("{} options={} tied={} dropout={}", method, make_adapter(method, o)->options().to_json().dump(),
                       c.tie_embeddings, c.dropout);
}

// Every phase and the decoding step agree exactly; the parameter count and
// the per-layer layout match the formulas.
void check_agreement(const GPTConfig& cfg, const std::string& method, const AdapterOptions& o) {
    INFO(describe(method, o, cfg));
    MethodReport r = report_method(cfg, tiny_settings(), method, o, true);
    REQUIRE(r.measured);
    for (int p = 0; p < flops::kPhases; ++p) {
        INFO(flops::phase_name(flops::Phase(p)));
        CHECK(r.analytic[size_t(p)] == (*r.measured)[size_t(p)]);
    }
    REQUIRE(r.inference_flops_per_token_measured);
    CHECK(r.inference_flops_per_token == *r.inference_flops_per_token_measured);
    CHECK(r.max_relative_gap() < 0.01);
    CHECK(r.trainable_params == r.formula_params);
    std::vector<LayerGroup> layout = analytic_groups(cfg, method, o);
    REQUIRE(layout.size() == r.per_layer.size());
    for (size_t i = 0; i < layout.size(); ++i) {
        INFO(layout[i].group);
        CHECK(r.per_layer[i].group == layout[i].group);
        CHECK(r.per_layer[i].trainable_params == layout[i].trainable_params);
    }
    // A frozen-base method pays no dW for the base: its dW is at most its own
    // parameters' worth of work, far below full fine-tuning's.
    if (!make_adapter(method, o)->changes_base())
        CHECK(r.analytic[2] < analytic_step_flops(cfg, tiny_settings(), "full", o)[2]);
}

const LayerGroup& group(const MethodReport& r, const std::string& name) {
    for (const LayerGroup& g : r.per_layer)
        if (g.group == name) return g;
    FAIL("no group " << name);
    throw 0;
}

flops::Counts region_sum(const MethodReport& r, const std::string& prefix) {
    flops::Counts c{};
    for (const auto& [name, counts] : r.measured_by_region)
        if (name == prefix || name.rfind(prefix + ".", 0) == 0)
            for (int p = 0; p < flops::kPhases; ++p) c[size_t(p)] += counts[size_t(p)];
    return c;
}

}  // namespace

TEST_CASE("report: analytic step FLOPs equal the measured ones for every method", "[report]") {
    const GPTConfig cfg = tiny_config();
    for (const std::string& method : method_names())  // built-in and registered at run time alike
        for (const std::string layers : {"all", "top:1", "1"}) {
            check_agreement(cfg, method, tiny_options(layers, false));
            // Methods with a reparameterization, in that form too.
            if (make_adapter(method, tiny_options(layers, true))->options().section_or_empty(method).value("reparam", false))
                check_agreement(cfg, method, tiny_options(layers, true));
        }
}

TEST_CASE("report: agreement for P-tuning's LSTM prompt encoder (both directions, stacked layers)", "[report]") {
    const GPTConfig cfg = tiny_config();
    for (int64_t layers : {1, 2}) {
        AdapterOptions o = tiny_options("all", false);
        o.section("p-tuning") = {{"encoder_reparameterization_type", "LSTM"}, {"encoder_hidden_size", 8},
                                 {"encoder_num_layers", layers}};
        check_agreement(cfg, "p-tuning", o);
        o.n = 0;  // no virtual tokens: the encoder runs on no rows, nothing trains
        check_agreement(cfg, "p-tuning", o);
    }
}

TEST_CASE("report: agreement with every LoRA target, tied embeddings and dropout", "[report]") {
    GPTConfig cfg = tiny_config();
    AdapterOptions o = tiny_options("0,2", false);
    o.section("lora")["target_modules"] = {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"};
    check_agreement(cfg, "lora", o);
    cfg.tie_embeddings = true;
    check_agreement(cfg, "full", tiny_options("all", false));
    check_agreement(cfg, "prompt", tiny_options("all", false));
    cfg.dropout = 0.1f;
    check_agreement(cfg, "full", tiny_options("all", false));
    check_agreement(cfg, "prefix", tiny_options("top:2", true));
    check_agreement(cfg, "lora", o);
}

TEST_CASE("report: nothing trainable reaches the loss, so no backward and no update", "[report]") {
    const GPTConfig cfg = tiny_config();
    AdapterOptions o = tiny_options("none", true);  // the MLP exists but feeds no layer
    MethodReport r = report_method(cfg, tiny_settings(), "prefix", o, true);
    CHECK(r.analytic == *r.measured);
    CHECK(r.analytic[1] + r.analytic[2] + r.analytic[3] == 0);
    CHECK(r.backward_blocks.empty());
}

TEST_CASE("report: the backward stops at the lowest trainable layer", "[report]") {
    const GPTConfig cfg = tiny_config();
    MethodReport prefix = report_method(cfg, tiny_settings(), "prefix", tiny_options("top:1", false), true);
    CHECK(prefix.backward_blocks == std::vector<int>{2});
    for (int l : {0, 1}) {
        INFO("blocks." << l);
        flops::Counts c = region_sum(prefix, fmt::format("blocks.{}", l));
        CHECK(c[0] > 0);
        CHECK(c[1] == 0);
        CHECK(c[2] == 0);
    }
    CHECK(region_sum(prefix, "blocks.2")[1] > 0);
    CHECK(region_sum(prefix, "embed")[1] == 0);

    // Prompt tuning trains only the input, so dX flows through every layer.
    MethodReport prompt = report_method(cfg, tiny_settings(), "prompt", tiny_options("all", false), true);
    CHECK(prompt.backward_blocks == std::vector<int>{0, 1, 2});
    for (int l : {0, 1, 2}) CHECK(region_sum(prompt, fmt::format("blocks.{}", l))[1] > 0);
    CHECK(region_sum(prompt, "embed")[1] == 0);  // the frozen embeddings get no gradient
    CHECK(prompt.analytic[2] == 0);  // the prompt's gradient is a copy: no dW work
    CHECK(prompt.backward_to_input);
    CHECK_FALSE(prefix.backward_to_input);
    // P-tuning's trainable tensors are its prompt encoder ("reparam"), not the
    // input's group, but its virtual tokens are prepended there just the same.
    MethodReport p_tuning = report_method(cfg, tiny_settings(), "p-tuning", tiny_options("all", false), false);
    CHECK(p_tuning.backward_to_input);
    CHECK(p_tuning.backward_blocks == std::vector<int>{0, 1, 2});
    // Prefix tuning at every layer reaches block 0, not its input.
    MethodReport prefix_all = report_method(cfg, tiny_settings(), "prefix", tiny_options("all", false), false);
    CHECK(prefix_all.backward_blocks == std::vector<int>{0, 1, 2});
    CHECK_FALSE(prefix_all.backward_to_input);
}

TEST_CASE("report: per-layer map places each method's tensors and gradients", "[report]") {
    const GPTConfig cfg = tiny_config();
    const int64_t n = 3, d = cfg.d_model;

    MethodReport prompt = report_method(cfg, tiny_settings(), "prompt", tiny_options("all", false), true);
    CHECK(group(prompt, "embed").trainable_params == n * d);
    CHECK(*group(prompt, "embed").grad_norm > 0.0);
    for (const LayerGroup& g : prompt.per_layer)
        if (g.group != "embed") {
            CHECK(g.trainable_params == 0);
            CHECK(*g.grad_norm == 0.0);
        }

    MethodReport prefix = report_method(cfg, tiny_settings(), "prefix", tiny_options("1,2", false), true);
    CHECK(group(prefix, "blocks.0").trainable_params == 0);
    for (const char* b : {"blocks.1", "blocks.2"}) {
        INFO(b);
        CHECK(group(prefix, b).trainable_params == n * d);
        CHECK(*group(prefix, b).grad_norm > 0.0);
    }
    CHECK(group(prefix, "embed").trainable_params == 0);
    CHECK(group(prefix, "head").trainable_params == 0);

    MethodReport kv = report_method(cfg, tiny_settings(), "prefix-kv", tiny_options("all", false), true);
    for (int l = 0; l < cfg.n_layers; ++l) {
        const LayerGroup& g = group(kv, fmt::format("blocks.{}", l));
        CHECK(g.trainable_params == 2 * n * d);
        CHECK(*g.grad_norm > 0.0);
    }

    MethodReport reparam = report_method(cfg, tiny_settings(), "prefix", tiny_options("all", true), true);
    CHECK(group(reparam, "reparam").trainable_params == reparam.formula_params);
    CHECK(*group(reparam, "reparam").grad_norm > 0.0);

    MethodReport full = report_method(cfg, tiny_settings(), "full", tiny_options("all", false), true);
    int64_t sum = 0;
    for (const LayerGroup& g : full.per_layer) {
        sum += g.trainable_params;
        CHECK(*g.grad_norm > 0.0);
    }
    CHECK(sum == full.total_params);
    CHECK(full.trainable_pct == Approx(100.0));
}

TEST_CASE("report: memory shrinks with the trainable set", "[report]") {
    const GPTConfig cfg = tiny_config();
    MethodReport full = report_method(cfg, tiny_settings(), "full", tiny_options("all", false), true);
    MethodReport top = report_method(cfg, tiny_settings(), "prefix-kv", tiny_options("top:1", false), true);
    CHECK(full.bytes.optimizer == 8 * full.trainable_params);
    CHECK(top.bytes.optimizer == 8 * top.trainable_params);
    CHECK(*top.bytes.activations_peak > 0);
    // Nothing is saved for backward below the top layer.
    CHECK(*top.bytes.activations_peak < *full.bytes.activations_peak);
}

TEST_CASE("report: GPT-2 presets are priced without allocating", "[report]") {
    const GPTConfig xl = model_preset("gpt2-xl");
    CHECK(xl.d_model == 1600);
    CHECK(xl.n_layers == 48);
    CHECK(xl.d_ff == 6400);
    ReportSettings s;  // B 16, T 128
    AdapterOptions o;  // n 16, LoRA r 8 on q, v
    const int64_t L = 48, n = 16, d = 1600;
    MethodReport full = report_method(xl, s, "full", o, false);
    CHECK(full.trainable_params == 1557611200);  // GPT-2 XL as released (tied head)
    CHECK(report_method(model_preset("gpt2"), s, "full", o, false).trainable_params == 124439808);

    MethodReport prefix = report_method(xl, s, "prefix", o, false);
    CHECK(prefix.trainable_params == L * n * d);
    CHECK(prefix.formula_params == L * n * d);
    CHECK(prefix.formula == "L*n*d");
    CHECK(prefix.total_params == 1557611200 + L * n * d);
    CHECK(prefix.bytes.optimizer == 8 * L * n * d);
    CHECK(!prefix.measured);
    CHECK(!prefix.bytes.activations_peak);
    CHECK(report_method(xl, s, "prefix-kv", o, false).trainable_params == 2 * L * n * d);
    CHECK(report_method(xl, s, "prompt", o, false).trainable_params == n * d);
    CHECK(report_method(xl, s, "lora", o, false).trainable_params == L * 2 * 8 * 2 * d);

    // Forward of the base: 2 FLOPs per weight per token, plus attention.
    const double tokens = double(s.batch * s.seq);
    CHECK(double(full.analytic[0]) > 2.0 * 1.5e9 * tokens);
    // A frozen base saves the dW GEMMs: the prefix's dW is its own LN1 only.
    CHECK(prefix.analytic[2] == uint64_t(L * 12 * n * d));
    CHECK(prefix.analytic[1] > full.analytic[1] / 2);
    CHECK(prefix.inference_flops_per_token > full.inference_flops_per_token);

    CHECK_THROWS_WITH(model_preset("gpt3"), Contains("gpt3") && Contains("gpt2-xl"));
}

TEST_CASE("report: JSON fields and errors", "[report]") {
    MethodReport r = report_method(tiny_config(), tiny_settings(), "lora", tiny_options("all", false), true);
    nlohmann::json j = r.to_json();
    for (const char* k : {"method", "trainable_params", "formula_params", "formula", "total_params", "trainable_pct",
                          "bytes", "flops", "inference_flops_per_token", "per_layer"})
        CHECK(j.contains(k));
    for (const char* k : {"params", "grads", "optimizer", "activations_peak"}) CHECK(j["bytes"].contains(k));
    for (const char* k : {"forward", "backward_dx", "backward_dw", "optimizer"}) {
        CHECK(j["flops"][k]["analytic"] == j["flops"][k]["measured"]);
    }
    CHECK(j["per_layer"][1]["group"] == "blocks.0");
    CHECK(j["per_layer"][1].contains("grad_norm"));

    CHECK_THROWS_WITH(analytic_step_flops(tiny_config(), tiny_settings(), "adapter-x", {}), Contains("adapter-x"));
    ReportSettings bad = tiny_settings();
    bad.seq = 9;
    CHECK_THROWS_WITH(report_method(tiny_config(), bad, "lora", {}, true), Contains("max_seq"));
    bad.seq = 1;
    CHECK_THROWS_WITH(report_method(tiny_config(), bad, "lora", {}, false), Contains("seq = 1"));
    CHECK_THROWS_WITH(group_of("decoder.weight"), Contains("decoder.weight"));
}

TEST_CASE("report: all-reduce bytes per update are the trained floats x 4; ring all-reduce scale model",
          "[report][mpi]") {
    // GPT-2 medium (L 24, d 1024), n = 16: prefix-kv trains 2*L*n*d floats,
    // prefix L*n*d (its hidden-state form), full every base parameter.
    const GPTConfig c = model_preset("gpt2-medium");
    ReportSettings s;
    s.batch = 8, s.seq = 1024;
    AdapterOptions o;
    o.n = 16;
    const MethodReport kv = report_method(c, s, "prefix-kv", o, false);
    const MethodReport pre = report_method(c, s, "prefix", o, false);
    const MethodReport full = report_method(c, s, "full", o, false);
    CHECK(kv.bytes.allreduce == 4 * 2 * 24 * 16 * 1024);
    CHECK(pre.bytes.allreduce == 4 * 24 * 16 * 1024);
    // GPT-2 medium as released: 354,823,168 parameters (tied head; Radford et al. 2019, HF's gpt2-medium).
    CHECK(full.bytes.allreduce == int64_t(4) * 354823168);

    // Ring all-reduce, written out: 2(K-1) steps of bytes/K at the bandwidth, plus a latency each.
    CHECK(ring_allreduce_seconds(1e9, 1, 1.25e9, 1e-5) == 0.0);
    CHECK(ring_allreduce_seconds(1e9, 4, 1.25e9, 1e-5) == Approx(6.0 / 4.0 * 1e9 / 1.25e9 + 6 * 1e-5));
    CHECK(ring_allreduce_seconds(8e6, 64, 12.5e9, 0) == Approx(2.0 * 63 / 64 * 8e6 / 12.5e9));

    // Compute split K ways except the optimizer; comm added on top.
    flops::Counts step{600, 300, 100, 40};
    const ScalePoint p = scale_point(step, 1e9, 4, 100.0, 1.25e9, 0.0);
    CHECK(p.compute_s == Approx((1000.0 / 4 + 40.0) / 100.0));
    CHECK(p.comm_s == Approx(1.2));
    // Where it stops, by hand (latency 0): t(K) = (1000/K + 40)/100 + 2(K-1)/K * bytes/1.25e9.
    // 1e8 bytes: t = 0.56 + 9.84/K, falls all the way to 64; t(1)/(K t(K)) >= 0.5 while K <= 19.57.
    ScaleLimit lim = scale_limit(step, 1e8, 64, 100.0, 1.25e9, 0.0);
    CHECK(lim.fastest_ranks == 64);
    CHECK(lim.half_efficiency_ranks == 19);
    // 5e9 bytes: t = 8.4 + 2/K; efficiency 10.4 / (8.4K + 2) >= 0.5 while K <= 2.24.
    lim = scale_limit(step, 5e9, 64, 100.0, 1.25e9, 0.0);
    CHECK(lim.fastest_ranks == 64);
    CHECK(lim.half_efficiency_ranks == 2);
    // A gradient as large as full fine-tuning's on a slow link: one rank is fastest.
    CHECK(scale_limit(step, 1e12, 64, 100.0, 1.25e9, 1e-5).fastest_ranks == 1);
    CHECK_THROWS_WITH(scale_point(step, 1, 0, 1, 1, 0), Contains("ranks = 0"));
}
