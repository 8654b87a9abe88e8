// LN-tuning (peft/ln_tuning.cpp) beyond the generic per-method tests (counts,
// frozen base, finite differences, mixed batches, save/load, HF round trip,
// analytic = measured FLOPs, which every registered method goes through):
// hand-computed parameter counts, an independent reference (the same model
// with its LayerNorm weights overwritten, as PEFT's LNTuningLayer.merge does),
// merge/unmerge, per-row LayerNorms mixed with hidden-state prefixes, and the
// file PEFT's LN_TUNING writes (keys, shapes, config fields).
#include <fstream>
#include <map>

#include <catch2/catch.hpp>

#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/multi.h"
#include "peft/registry.h"
#include "tests/peft_testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::peft_testing;
using Catch::Contains;
using nlohmann::json;

namespace {

AdapterOptions ln_options(const std::string& layers, std::vector<std::string> targets = {"ln1", "ln2", "ln_f"}) {
    AdapterOptions o;
    o.layers = layers;
    o.section("ln-tuning") = {{"target_modules", targets}};
    return o;
}

ModelInput two_rows() { return padded_batch({{1, 5, 9, 2, 7}, {3, 4, 11}}, false); }

}  // namespace

TEST_CASE("ln_tuning: parameter counts by hand: 2d per LayerNorm, (2L+1)*2d by default", "[ln_tuning]") {
    const GPTConfig c = tiny_config();  // d 32, L 3
    CHECK(make_adapter("ln-tuning")->formula(c).count == (2 * 3 + 1) * 2 * 32);
    CHECK(make_adapter("ln-tuning")->formula(c).text == "(2L+1)*2d");
    CHECK(make_adapter("ln-tuning", ln_options("all", {"ln_f"}))->formula(c).count == 2 * 32);
    CHECK(make_adapter("ln-tuning", ln_options("0,2", {"ln1"}))->formula(c).count == 2 * 2 * 32);
    CHECK(make_adapter("ln-tuning", ln_options("top:1", {"ln2", "ln_f"}))->formula(c).count == 2 * 2 * 32);
    GPT base(c, 1);
    auto a = make_adapter("ln-tuning");
    a->attach(base);
    std::vector<std::string> names;
    for (const auto& [name, t] : a->parameters()) names.push_back(name);
    CHECK(names.front() == "blocks.0.ln1.ln_tuning_layers.weight");
    CHECK(names.back() == "ln_f.ln_tuning_layers.bias");
    CHECK_THROWS_WITH(make_adapter("ln-tuning", ln_options("all", {"ln1", "mlp"})), Contains("target 'mlp'"));
    CHECK_THROWS_WITH(make_adapter("ln-tuning", ln_options("all", {"ln1", "ln1"})), Contains("'ln1' is listed twice"));
}

TEST_CASE("ln_tuning: logits equal the base with its LayerNorm weights replaced; merge does that, unmerge restores",
          "[ln_tuning]") {
    GPT base(tiny_config(), 4);
    sharpen(base);
    const NamedTensors original = clones(base.named_parameters());
    auto a = make_adapter("ln-tuning", ln_options("0,2"));
    a->attach(base);
    perturb(a->parameters(), 8, 0.3f);
    const ModelInput in = two_rows();
    const Tensor adapted = logits_of(base, a.get(), in);
    CHECK(max_diff(adapted, logits_of(base, nullptr, in)) > 1e-3f);

    // The reference: a second model with the same weights whose LayerNorms hold the trained copies.
    GPT ref(tiny_config(), 4);
    sharpen(ref);
    for (const auto& [name, t] : a->parameters()) {
        const std::string module = name.substr(0, name.find(".ln_tuning_layers."));
        const std::string field = name.substr(name.rfind('.') + 1);  // weight | bias
        ref.parameter(module + "." + field).copy_from(t);
    }
    CHECK(bitwise_equal(adapted, logits_of(ref, nullptr, in)));
    CHECK(bitwise_equal(ref.parameter("blocks.1.ln1.weight"), base.parameter("blocks.1.ln1.weight")));  // layer 1 untouched

    a->merge();
    CHECK(bitwise_equal(logits_of(base, nullptr, in), adapted));  // the merged base needs no hook
    CHECK(bitwise_equal(logits_of(base, a.get(), in), adapted));
    a->unmerge();
    const NamedTensors now = base.named_parameters();
    for (size_t i = 0; i < now.size(); ++i) {
        INFO(now[i].first);
        CHECK(bitwise_equal(now[i].second, original[i].second));
    }
}

TEST_CASE("ln_tuning: rows mixing LN-tuning, hidden-state prefixes and no adapter equal their solo runs", "[ln_tuning]") {
    // Hidden-state prefix vectors pass through LN1 as a table (one entry per
    // adapter): the per-row LayerNorm must give each entry its own adapter's
    // gain, and each batch row its row's.
    GPT base(tiny_config(), 6);
    sharpen(base);
    std::vector<std::unique_ptr<Adapter>> owned;
    AdapterOptions p;
    p.n = 2;
    p.init = "random";
    owned.push_back(make_adapter("ln-tuning", ln_options("all")));
    owned.push_back(make_adapter("prefix", p));
    owned.push_back(make_adapter("ln-tuning", ln_options("1", {"ln1"})));
    std::vector<Adapter*> adapters;
    for (size_t i = 0; i < owned.size(); ++i) {
        owned[i]->attach(base);
        perturb(owned[i]->parameters(), 30 + i, 0.3f);
        adapters.push_back(owned[i].get());
    }
    const std::vector<std::vector<int32_t>> tokens = {{1, 2, 3, 4}, {5, 6, 7}, {8, 9, 10, 11, 12}, {13, 14}, {2, 4}};
    const std::vector<int32_t> rows = {0, 1, -1, 2, 0};
    const ModelInput in = padded_batch(tokens, true);
    MultiAdapter multi(adapters);
    multi.set_rows(rows);
    const Tensor mixed = logits_of(base, &multi, in);
    for (size_t b = 0; b < rows.size(); ++b) {
        INFO("row " << b << " adapter " << rows[b]);
        const ModelInput alone_in = single_row(tokens[b]);
        const Tensor alone = logits_of(base, rows[b] < 0 ? nullptr : adapters[size_t(rows[b])], alone_in);
        const int64_t len = alone_in.T;
        CHECK(max_diff_rows(mixed, int64_t(b), in.T - len, alone, 0, 0, len) < 1e-5f);
        if (rows[b] >= 0)
            CHECK(max_diff_rows(mixed, int64_t(b), in.T - len, logits_of(base, nullptr, alone_in), 0, 0, len) > 1e-3f);
    }
}

TEST_CASE("ln_tuning: the Hugging Face file has PEFT's LN_TUNING keys, shapes and fields", "[ln_tuning]") {
    TempDir tmp;
    GPT base(tiny_config(2), 1);
    auto a = make_adapter("ln-tuning");
    a->attach(base);
    perturb(a->parameters(), 2);
    export_hf(tmp.path("hf"), *a);
    // PEFT's LNTuningLayer holds the copy in ln_tuning_layers[adapter]; the
    // saved state dict drops the adapter name: <module>.ln_tuning_layers.{weight,bias},
    // <module> named as in transformers' GPT2LMHeadModel.
    std::map<std::string, Shape> shapes, expected;
    const StFile file = load_safetensors(tmp.path("hf/adapter_model.safetensors"));
    for (const auto& [name, t] : file.tensors) shapes[name] = t.shape;
    for (const char* m : {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                          "transformer.ln_f"})
        for (const char* f : {"weight", "bias"})
            expected[std::string("base_model.model.") + m + ".ln_tuning_layers." + f] = Shape{32};
    CHECK(shapes == expected);
    std::ifstream cfg_file(tmp.path("hf/adapter_config.json"));
    const json j = json::parse(cfg_file);
    CHECK(j.at("peft_type") == "LN_TUNING");
    CHECK(j.at("task_type") == "CAUSAL_LM");
    CHECK(j.at("target_modules") == json({"ln_1", "ln_2", "ln_f"}));
    CHECK(j.at("exclude_modules").is_null());
    CHECK(j.at("modules_to_save").is_null());
    CHECK(j.at("inference_mode") == true);

    // Only all layers export (LNTuningConfig has no layers_to_transform); ln_f alone needs none.
    GPT base2(tiny_config(2), 1);
    auto top = make_adapter("ln-tuning", ln_options("top:1"));
    top->attach(base2);
    CHECK_THROWS_WITH(export_hf(tmp.path("top"), *top), Contains("layers_to_transform"));
    auto final_only = make_adapter("ln-tuning", ln_options("top:1", {"ln_f"}));
    final_only->attach(base2);
    CHECK_NOTHROW(export_hf(tmp.path("final"), *final_only));

    // Import refuses what we do not implement, naming the file and key.
    json bad = j;
    bad["exclude_modules"] = {"ln_f"};
    {
        std::ofstream out(tmp.path("hf/adapter_config.json"));
        out << bad.dump();
    }
    GPT fresh(tiny_config(2), 1);
    CHECK_THROWS_WITH(import_hf(tmp.path("hf"), fresh), Contains("adapter_config.json") && Contains("exclude_modules"));
    bad = j;
    bad["target_modules"] = {"ln1"};  // our name, not GPT-2's
    {
        std::ofstream out(tmp.path("hf/adapter_config.json"));
        out << bad.dump();
    }
    CHECK_THROWS_WITH(import_hf(tmp.path("hf"), fresh), Contains("target_modules") && Contains("'ln1'"));
}
