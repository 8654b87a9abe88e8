#include "peft/adapter_io.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "nn/safetensors.h"
#include "peft/registry.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using peftlab::testing::TempDir;
using Catch::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

GPTConfig tiny_config(int layers = 2, int64_t d = 16) {
    GPTConfig c;
    c.vocab = 32;
    c.d_model = d;
    c.n_layers = layers;
    c.n_heads = 2;
    c.d_ff = 32;
    c.max_seq = 16;
    return c;
}

// Logits [2, 5, V] of `model` with `hooks` installed (null: the bare model).
std::vector<float> logits(GPT& model, ModelHooks* hooks) {
    ModelInput in;
    in.B = 2;
    in.T = 5;
    for (int i = 0; i < 10; ++i) in.tokens.push_back(int32_t((7 * i + 3) % 32));
    NoGradGuard no_grad;
    model.eval();
    model.set_hooks(hooks);
    std::vector<float> out = model.forward(in).to_vector();
    model.set_hooks(nullptr);
    return out;
}

// Moves every tensor away from its initialisation (LoRA's B starts at zero,
// BitFit's deltas too), so that a lost or misplaced value changes the logits.
void perturb(const NamedTensors& tensors, uint64_t seed) {
    Rng rng(seed);
    for (const auto& [name, t] : tensors) {
        Tensor noise = Tensor::normal(t.shape(), rng, 0.f, 0.3f);
        float* p = Tensor(t).data();
        for (int64_t i = 0; i < t.numel(); ++i) p[i] += noise.data()[i];
    }
}

void require_bitwise_equal(const NamedTensors& a, const NamedTensors& b) {
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) {
        INFO(a[i].first);
        REQUIRE(a[i].first == b[i].first);
        REQUIRE(a[i].second.shape() == b[i].second.shape());
        CHECK(std::memcmp(a[i].second.data(), b[i].second.data(), size_t(a[i].second.numel()) * sizeof(float)) == 0);
    }
}

void check_close(const std::vector<float>& a, const std::vector<float>& b, float tol) {
    REQUIRE(a.size() == b.size());
    float worst = 0.f;
    for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
    CHECK(worst <= tol);
}

json read_json(const std::string& path) {
    std::ifstream in(path);
    return json::parse(in);
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

AdapterOptions small_options() {
    AdapterOptions o;
    o.n = 3;
    o.section("lora") = {{"r", 2}, {"lora_alpha", 4.0}};
    o.section("prefix") = {{"reparam_hidden", 8}};
    o.section("prefix-kv") = {{"reparam_hidden", 8}};
    o.seed = 11;
    o.positions = "hf";  // what Hugging Face PEFT computes: export_hf refuses "keep" with virtual tokens
    return o;
}

std::string load_error(const std::string& dir, GPT& base) {
    try {
        load_adapter(dir, base);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "(no error)";
}

std::string import_error(const std::string& dir, GPT& base) {
    try {
        import_hf(dir, base);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST_CASE("adapter_io: base_hash is FNV-1a 64 of the weights in parameter order", "[adapter_io]") {
    GPT a(tiny_config(), 1), b(tiny_config(), 1), c(tiny_config(), 2);
    const std::string h = base_hash(a);
    CHECK(h.size() == 16);
    CHECK(h == base_hash(b));
    CHECK(h != base_hash(c));

    // The documented definition, computed independently over one concatenated buffer.
    std::string bytes;
    for (const auto& [name, t] : a.named_parameters())
        bytes.append(reinterpret_cast<const char*>(t.data()), size_t(t.numel()) * sizeof(float));
    uint64_t ref = 0xcbf29ce484222325ull;
    for (unsigned char ch : bytes) ref = (ref ^ ch) * 0x100000001b3ull;
    CHECK(h == fmt::format("{:016x}", ref));

    a.blocks[1]->ln2.bias.data()[3] += 1e-6f;  // one weight, barely changed
    CHECK(base_hash(a) != h);
}

TEST_CASE("adapter_io: own format round trip for every registered method", "[adapter_io]") {
    for (const std::string& method : method_names()) {
        DYNAMIC_SECTION(method) {
            TempDir tmp;
            GPT base(tiny_config(), 1);
            const std::string original_hash = base_hash(base);
            AdapterOptions o = small_options();
            if (!make_adapter(method, o)->changes_base()) o.layers = "top:1";  // layers resolve to [1]
            auto a = make_adapter(method, o);
            a->attach(base);
            perturb(a->parameters(), 3);
            const std::vector<float> expected = logits(base, a.get());
            save_adapter(tmp.path("a"), *a, false, a->changes_base() ? original_hash : "");

            const json cfg = read_json(tmp.path("a/adapter_config.json"));
            CHECK(cfg.at("format") == kAdapterFormat);
            CHECK(cfg.at("method") == method);
            // The common options and the method's own section only, defaults filled in.
            json own = o.to_json();
            for (const std::string& m : method_names()) own.erase(m);
            own[method] = o.section_or_empty(method);
            const json filled = a->options().section_or_empty(method);
            for (const auto& [key, value] : filled.items())
                if (!own[method].contains(key)) own[method][key] = value;
            CHECK(cfg.at("options") == own);
            CHECK(cfg.at("layers") == json(a->layers()));
            // An inference file unless the method has a training-only form (an encoder dropped at inference).
            std::vector<std::string> train_names, infer_names;
            for (const auto& [name, t] : a->parameters()) train_names.push_back(name);
            for (const auto& [name, t] : a->inference_parameters()) infer_names.push_back(name);
            CHECK(cfg.at("inference") == (train_names == infer_names));
            CHECK(cfg.at("base_config") == tiny_config().to_json());
            CHECK(cfg.at("base_hash") == original_hash);

            GPT fresh(tiny_config(), 1);
            auto b = load_adapter(tmp.path("a"), fresh);
            CHECK(b->method() == method);
            CHECK(b->layers() == a->layers());
            CHECK(b->base() == &fresh);
            require_bitwise_equal(a->parameters(), b->parameters());
            CHECK(logits(fresh, b.get()) == expected);
            CHECK(b->options().to_json() == a->options().to_json());
            if (!a->changes_base()) CHECK(base_hash(fresh) == original_hash);  // the base is never written
        }
    }
}

TEST_CASE("adapter_io: full fine-tuning needs the base's hash from before training", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("full", small_options());
    a->attach(base);
    REQUIRE_THROWS_WITH(save_adapter(tmp.path("a"), *a), Contains("original_base_hash"));
    CHECK_FALSE(fs::exists(tmp.path("a/adapter_config.json")));

    GPT other(tiny_config(), 1);
    auto p = make_adapter("prompt", small_options());
    p->attach(other);
    REQUIRE_THROWS_WITH(save_adapter(tmp.path("p"), *p, false, "0123456789abcdef"), Contains("not the attached base's hash"));
}

TEST_CASE("adapter_io: reparameterized prefixes, training state and inference file", "[adapter_io]") {
    for (const char* method : {"prefix", "prefix-kv"}) {
        DYNAMIC_SECTION(method) {
            TempDir tmp;
            GPT base(tiny_config(), 1);
            AdapterOptions o = small_options();
            o.section(method)["reparam"] = true;
            auto a = make_adapter(method, o);
            a->attach(base);
            perturb(a->parameters(), 4);
            const std::vector<float> expected = logits(base, a.get());

            save_adapter(tmp.path("train"), *a);
            CHECK(read_json(tmp.path("train/adapter_config.json")).at("inference") == false);
            GPT fresh(tiny_config(), 1);
            auto b = load_adapter(tmp.path("train"), fresh);
            REQUIRE(b->parameters().front().first == "prefix_mlp.embedding");
            require_bitwise_equal(a->parameters(), b->parameters());
            CHECK(logits(fresh, b.get()) == expected);

            save_adapter(tmp.path("infer"), *a, /*inference=*/true);
            CHECK(read_json(tmp.path("infer/adapter_config.json")).at("inference") == true);
            GPT fresh2(tiny_config(), 1);
            auto c = load_adapter(tmp.path("infer"), fresh2);
            CHECK(c->options().section_or_empty(method).at("reparam") == true);
            require_bitwise_equal(a->inference_parameters(), c->parameters());
            check_close(logits(fresh2, c.get()), expected, 1e-6f);

            // A materialized adapter's file is an inference file whatever was asked.
            a->materialize();
            save_adapter(tmp.path("mat"), *a);
            CHECK(read_json(tmp.path("mat/adapter_config.json")).at("inference") == true);
            GPT fresh3(tiny_config(), 1);
            require_bitwise_equal(a->parameters(), load_adapter(tmp.path("mat"), fresh3)->parameters());
        }
    }
}

TEST_CASE("adapter_io: loading onto an incompatible base names what differs", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(2, 16), 1);
    auto a = make_adapter("prefix-kv", small_options());
    a->attach(base);
    save_adapter(tmp.path("a"), *a);
    const std::string dir = tmp.path("a");

    GPT deeper(tiny_config(3, 16), 1);
    std::string e = load_error(dir, deeper);
    CHECK_THAT(e, Contains("adapter_config.json") && Contains("base config differs: n_layers 2 != 3"));
    GPT wider(tiny_config(2, 24), 1);
    CHECK_THAT(load_error(dir, wider), Contains("base config differs: d_model 16 != 24"));
    GPT other_weights(tiny_config(2, 16), 2);
    e = load_error(dir, other_weights);
    CHECK_THAT(e, Contains("adapter_config.json") && Contains("base weights differ (hash " + base_hash(base) + " != " +
                                                              base_hash(other_weights)));
    CHECK(other_weights.hooks() == nullptr);
    CHECK(other_weights.num_trainable() == other_weights.num_params());  // not frozen by a failed load
}

TEST_CASE("adapter_io: damaged adapter_config.json fails naming the file and key", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("lora", small_options());
    a->attach(base);
    save_adapter(tmp.path("a"), *a);
    const std::string cfg_path = tmp.path("a/adapter_config.json");
    const json good = read_json(cfg_path);
    GPT fresh(tiny_config(), 1);

    write_text(cfg_path, "{\"method\": \"lora\",");
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("adapter_config.json") && Contains("not valid JSON"));

    json j = good;
    j["method"] = "nope";
    write_text(cfg_path, j.dump());
    CHECK_THAT(load_error(tmp.path("a"), fresh),
               Contains("adapter_config.json") && Contains("key 'method'") && Contains("unknown PEFT method 'nope'"));

    for (const char* key : {"base_hash", "options", "layers", "inference", "base_config", "format"}) {
        j = good;
        j.erase(key);
        write_text(cfg_path, j.dump());
        CHECK_THAT(load_error(tmp.path("a"), fresh),
                   Contains("adapter_config.json") && Contains(fmt::format("key '{}' is missing", key)));
    }

    j = good;
    j["options"]["lora_rnak"] = 3;
    write_text(cfg_path, j.dump());
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("key 'options'") && Contains("unknown key 'lora_rnak'"));

    j = good;
    j["inference"] = "yes";
    write_text(cfg_path, j.dump());
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("key 'inference': must be true or false"));

    j = good;
    j["layers"] = {0};
    write_text(cfg_path, j.dump());
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("key 'layers'") && Contains("resolve to [0,1]"));
    for (const json& wrapped : {json::parse("[4294967296, 1]"), json::parse("[-1, 1]")}) {  // once read as [0, 1]
        j["layers"] = wrapped;
        write_text(cfg_path, j.dump());
        CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("key 'layers': must be a list of layer indices"));
    }
    CHECK(fresh.num_trainable() == fresh.num_params());  // attach's freeze undone
}

TEST_CASE("adapter_io: tensor file that does not match the adapter leaves the base untouched", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("full", small_options());
    a->attach(base);
    const std::string h = base_hash(base);
    save_adapter(tmp.path("a"), *a, false, h);
    const std::string weights = tmp.path("a/adapter_model.safetensors");

    // Drop one tensor, then reshape one: the load stops before writing the base.
    StFile file = load_safetensors(weights);
    std::vector<StTensorRef> refs;
    for (const auto& [name, t] : file.tensors)
        if (name != "ln_f.bias") refs.push_back({name, t.shape, t.data.data()});
    save_safetensors(weights, refs);
    GPT fresh(tiny_config(), 1);
    const std::string fresh_hash = base_hash(fresh);
    fresh.freeze();
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("adapter_model.safetensors") && Contains("missing tensor 'ln_f.bias'"));
    CHECK(base_hash(fresh) == fresh_hash);
    CHECK(fresh.num_trainable() == 0);  // "full" unfroze it on attach; put back

    std::vector<float> bias(16 * 2, 0.f);
    refs.push_back({"ln_f.bias", {32}, bias.data()});
    save_safetensors(weights, refs);
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("tensor 'ln_f.bias' has shape [32] in the file but [16]"));
    refs.back() = {"ln_f.bias", {16}, bias.data()};
    refs.push_back({"extra", {2}, bias.data()});
    save_safetensors(weights, refs);
    CHECK_THAT(load_error(tmp.path("a"), fresh), Contains("unexpected tensor 'extra'"));
    CHECK(base_hash(fresh) == fresh_hash);
}

TEST_CASE("adapter_io: merged LoRA is refused", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("lora", small_options());
    a->attach(base);
    a->merge();
    CHECK_THROWS_WITH(save_adapter(tmp.path("a"), *a), Contains("unmerge"));
    CHECK_THROWS_WITH(export_hf(tmp.path("a"), *a), Contains("unmerge"));
}

TEST_CASE("adapter_io: Hugging Face export/import round trip", "[adapter_io]") {
    struct Case {
        std::string method;
        std::string imported_as;
        float tol;
    };
    std::vector<Case> cases = {Case{"prompt", "prompt", 0.f}, Case{"prefix-kv", "prefix-kv", 0.f},
                               Case{"prefix", "prefix-kv", 1e-5f}, Case{"lora", "lora", 0.f}};
    // Every other registered method with a PEFT form reads back as itself, up to float rounding.
    for (const std::string& m : method_names()) {
        const bool listed = std::any_of(cases.begin(), cases.end(), [&](const Case& c) { return c.method == m; });
        if (!listed && !make_adapter(m)->hf_peft_type().empty()) cases.push_back({m, m, 1e-5f});
    }
    for (const Case& k : cases) {
        DYNAMIC_SECTION(k.method) {
            TempDir tmp;
            GPT base(tiny_config(), 1);
            auto a = make_adapter(k.method, small_options());
            a->attach(base);
            perturb(a->parameters(), 5);
            const std::vector<float> expected = logits(base, a.get());
            REQUIRE(expected != logits(base, nullptr));
            export_hf(tmp.path("hf"), *a);

            GPT fresh(tiny_config(), 1);
            auto b = import_hf(tmp.path("hf"), fresh);
            CHECK(b->method() == k.imported_as);
            check_close(logits(fresh, b.get()), expected, k.tol);
            if (k.tol == 0.f) require_bitwise_equal(a->parameters(), b->parameters());
        }
    }
}

// Both layouts name their files adapter_config.json and adapter_model.safetensors:
// a reader tells them apart by the config, a writer never replaces the other one.
TEST_CASE("adapter_io: the two layouts are told apart, and neither writer replaces the other", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("lora", small_options());
    a->attach(base);
    perturb(a->parameters(), 9);
    const std::vector<float> expected = logits(base, a.get());
    save_adapter(tmp.path("own"), *a);
    export_hf(tmp.path("hf"), *a);
    CHECK(adapter_layout(tmp.path("own")) == AdapterLayout::peftlab);
    CHECK(adapter_layout(tmp.path("hf")) == AdapterLayout::hugging_face);
    CHECK(adapter_layout(tmp.path("nothing")) == AdapterLayout::none);

    // load_any_adapter reads either, to the same logits.
    for (const char* dir : {"own", "hf"}) {
        GPT fresh(tiny_config(), 1);
        auto b = load_any_adapter(tmp.path(dir), fresh);
        CHECK(logits(fresh, b.get()) == expected);
    }
    CHECK_THROWS_WITH(load_any_adapter(tmp.path("nothing"), base), Contains("no adapter_config.json"));

    // The reader for one layout, given the other, says which it found.
    GPT other(tiny_config(), 1);
    CHECK_THROWS_WITH(load_adapter(tmp.path("hf"), other), Contains("holds a Hugging Face PEFT adapter") &&
                                                               Contains("import_hf"));
    CHECK_THROWS_WITH(import_hf(tmp.path("own"), other), Contains("holds a peftlab adapter") &&
                                                             Contains("load_adapter"));

    // `export-hf DIR DIR` and `import-hf DIR DIR` would destroy DIR: refused, files unchanged.
    auto bytes = [&](const char* dir) {
        std::string all;
        for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
            std::ifstream in(fs::path(tmp.path(dir)) / f, std::ios::binary);
            all += std::string(std::istreambuf_iterator<char>(in), {});
        }
        return all;
    };
    const std::string own = bytes("own"), hf = bytes("hf");
    CHECK_THROWS_WITH(export_hf(tmp.path("own"), *a),
                      Contains("already holds a peftlab adapter") && Contains("choose another directory"));
    CHECK_THROWS_WITH(save_adapter(tmp.path("hf"), *a), Contains("already holds a Hugging Face PEFT adapter"));
    CHECK(bytes("own") == own);
    CHECK(bytes("hf") == hf);
    // Rewriting the same layout is allowed (a rerun saves over its own adapter).
    save_adapter(tmp.path("own"), *a);
    export_hf(tmp.path("hf"), *a);

    // A config with neither key is named as such.
    fs::create_directories(tmp.path("odd"));
    std::ofstream(fs::path(tmp.path("odd")) / "adapter_config.json") << "{\"r\": 8}";
    CHECK_THROWS_WITH(adapter_layout(tmp.path("odd")), Contains("adapter_config.json") &&
                                                          Contains("neither a peftlab adapter"));
}

TEST_CASE("adapter_io: Hugging Face prefix table holds layer l's keys then values", "[adapter_io]") {
    TempDir tmp;
    GPTConfig cfg = tiny_config(3, 16);
    GPT base(cfg, 1);
    auto a = make_adapter("prefix-kv", small_options());
    a->attach(base);
    perturb(a->parameters(), 6);
    export_hf(tmp.path("hf"), *a);

    const StFile file = load_safetensors(tmp.path("hf/adapter_model.safetensors"));
    REQUIRE(file.tensors.size() == 1);
    const StTensor& table = file.tensors.at("prompt_embeddings");
    const int64_t n = 3, d = 16, L = 3;
    REQUIRE(table.shape == Shape{n, 2 * L * d});
    CHECK(file.metadata.at("format") == "pt");
    for (int64_t l = 0; l < L; ++l) {
        Tensor key = a->parameters()[size_t(2 * l)].second, value = a->parameters()[size_t(2 * l + 1)].second;
        REQUIRE(a->parameters()[size_t(2 * l)].first == fmt::format("blocks.{}.prefix.key", l));
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < d; ++j) {
                CHECK(table.data[size_t(i * 2 * L * d + 2 * l * d + j)] == key.data()[i * d + j]);
                CHECK(table.data[size_t(i * 2 * L * d + (2 * l + 1) * d + j)] == value.data()[i * d + j]);
            }
    }

    const json j = read_json(tmp.path("hf/adapter_config.json"));
    CHECK(j.at("peft_type") == "PREFIX_TUNING");
    CHECK(j.at("task_type") == "CAUSAL_LM");
    CHECK(j.at("num_virtual_tokens") == 3);
    CHECK(j.at("token_dim") == 16);
    CHECK(j.at("num_layers") == 3);
    CHECK(j.at("num_attention_heads") == 2);
    CHECK(j.at("num_transformer_submodules") == 1);
    CHECK(j.at("prefix_projection") == false);
    CHECK(j.at("encoder_hidden_size") == 16);
    CHECK(j.at("inference_mode") == true);
    CHECK(j.at("base_model_name_or_path") == "peftlab:" + base_hash(base));
}

TEST_CASE("adapter_io: Hugging Face prompt and LoRA files have PEFT's keys and fields", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto p = make_adapter("prompt", small_options());
    p->attach(base);
    export_hf(tmp.path("prompt"), *p);
    StFile file = load_safetensors(tmp.path("prompt/adapter_model.safetensors"));
    REQUIRE(file.tensors.size() == 1);
    CHECK(file.tensors.at("prompt_embeddings").shape == Shape{3, 16});
    json j = read_json(tmp.path("prompt/adapter_config.json"));
    CHECK(j.at("peft_type") == "PROMPT_TUNING");
    CHECK(j.at("task_type") == "CAUSAL_LM");
    CHECK(j.at("num_virtual_tokens") == 3);
    CHECK(j.at("token_dim") == 16);
    CHECK(j.at("num_layers") == 2);
    CHECK(j.at("num_attention_heads") == 2);
    CHECK(j.at("num_transformer_submodules") == 1);
    CHECK(j.at("inference_mode") == true);

    // LoRA on layer 1 only, on an attention and an MLP projection: keys, shapes, layers_to_transform.
    AdapterOptions o = small_options();
    o.layers = "1";
    o.section("lora")["target_modules"] = {"q_proj", "fc"};
    auto a = make_adapter("lora", o);
    GPT base2(tiny_config(), 1);
    a->attach(base2);
    perturb(a->parameters(), 7);
    export_hf(tmp.path("lora"), *a);
    file = load_safetensors(tmp.path("lora/adapter_model.safetensors"));
    std::map<std::string, Shape> shapes;
    for (const auto& [name, t] : file.tensors) shapes[name] = t.shape;
    // GPT-2 module names: q alone is a c_attn LoRA of rank 2 with zero k and v rows; fc is c_fc.
    const std::map<std::string, Shape> expected = {
        {"base_model.model.transformer.h.1.attn.c_attn.lora_A.weight", {2, 16}},
        {"base_model.model.transformer.h.1.attn.c_attn.lora_B.weight", {48, 2}},
        {"base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight", {2, 16}},
        {"base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight", {32, 2}}};
    CHECK(shapes == expected);
    const std::vector<float>& fused_b = file.tensors.at("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight").data;
    for (size_t i = 16 * 2; i < fused_b.size(); ++i) CHECK(fused_b[i] == 0.f);  // k and v rows
    j = read_json(tmp.path("lora/adapter_config.json"));
    CHECK(j.at("peft_type") == "LORA");
    CHECK(j.at("task_type") == "CAUSAL_LM");
    CHECK(j.at("r") == 2);
    CHECK(j.at("lora_alpha") == 4.0);
    CHECK(j.at("target_modules") == json({"c_attn", "c_fc"}));
    CHECK(j.at("lora_dropout") == 0.0);
    CHECK(j.at("bias") == "none");
    CHECK(j.at("fan_in_fan_out") == true);
    CHECK(j.at("inference_mode") == true);
    CHECK(j.at("layers_to_transform") == json({1}));
    CHECK(j.at("layers_pattern") == "h");
    CHECK(j.at("base_model_name_or_path") == "peftlab:" + base_hash(base2));

    GPT fresh(tiny_config(), 1);
    auto b = import_hf(tmp.path("lora"), fresh);
    CHECK(b->layers() == std::vector<int>{1});
    CHECK(b->options().section_or_empty("lora").at("target_modules") == json({"q_proj", "fc"}));
    CHECK(b->options().section_or_empty("lora").at("lora_alpha") == 4.0);
    CHECK(logits(fresh, b.get()) == logits(base2, a.get()));
}

TEST_CASE("adapter_io: Hugging Face export refusals and import validation", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    AdapterOptions o = small_options();
    o.layers = "1";
    auto chosen = make_adapter("prefix-kv", o);
    chosen->attach(base);
    CHECK_THROWS_WITH(export_hf(tmp.path("x"), *chosen), Contains("every layer") && Contains("layers=all"));
    auto bitfit = make_adapter("bitfit", small_options());
    GPT base2(tiny_config(), 1);
    bitfit->attach(base2);
    CHECK_THROWS_WITH(export_hf(tmp.path("x"), *bitfit), Contains("'bitfit' has no Hugging Face PEFT counterpart"));

    GPT base3(tiny_config(), 1);
    auto p = make_adapter("prompt", small_options());
    p->attach(base3);
    export_hf(tmp.path("hf"), *p);
    const std::string cfg_path = tmp.path("hf/adapter_config.json");
    const json good = read_json(cfg_path);
    GPT fresh(tiny_config(), 1);
    auto with = [&](const char* key, const json& value) {
        json j = good;
        if (value.is_discarded()) j.erase(key);
        else j[key] = value;
        write_text(cfg_path, j.dump());
        return import_error(tmp.path("hf"), fresh);
    };
    CHECK_THAT(with("token_dim", 24), Contains("adapter_config.json") && Contains("key 'token_dim': is 24 but the base has 16"));
    CHECK_THAT(with("num_layers", 4), Contains("key 'num_layers': is 4 but the base has 2"));
    // A peft_type no registered method reads (a made-up one: real types may gain a method).
    CHECK_THAT(with("peft_type", "NO_SUCH_TYPE"), Contains("key 'peft_type'") && Contains("'NO_SUCH_TYPE' is not supported"));
    CHECK_THAT(with("task_type", "SEQ_2_SEQ_LM"), Contains("key 'task_type'"));
    CHECK_THAT(with("num_virtual_tokens", 4),
               Contains("adapter_model.safetensors") && Contains("'prompt_embeddings' has shape [3, 16] in the file but [4, 16]"));
    CHECK_THAT(with("num_virtual_tokens", json::value_t::discarded), Contains("key 'num_virtual_tokens' is missing"));
    CHECK_THAT(with("num_virtual_tokens", tiny_config().max_seq),
               Contains(fmt::format("key 'num_virtual_tokens': {} leaves no position", tiny_config().max_seq)));
    CHECK_THAT(with("base_model_name_or_path", "peftlab:0000000000000000"), Contains("base weights differ"));
    // A file from elsewhere (no peftlab hash) is checked by its dimensions only.
    CHECK(with("base_model_name_or_path", "gpt2") == "(no error)");
    CHECK(fresh.num_trainable() == 0);  // the successful import attached (froze) it

    GPT other(tiny_config(), 2);
    write_text(cfg_path, good.dump());
    CHECK_THAT(import_error(tmp.path("hf"), other), Contains("base weights differ"));
    CHECK(other.num_trainable() == other.num_params());
}

TEST_CASE("adapter_io: Hugging Face LoRA features we do not implement are refused", "[adapter_io]") {
    TempDir tmp;
    GPT base(tiny_config(), 1);
    auto a = make_adapter("lora", small_options());
    a->attach(base);
    export_hf(tmp.path("hf"), *a);
    const std::string cfg_path = tmp.path("hf/adapter_config.json");
    const json good = read_json(cfg_path);
    GPT fresh(tiny_config(), 1);
    auto with = [&](const char* key, const json& value) {
        json j = good;
        j[key] = value;
        write_text(cfg_path, j.dump());
        return import_error(tmp.path("hf"), fresh);
    };
    CHECK_THAT(with("use_rslora", true), Contains("key 'use_rslora'"));
    CHECK_THAT(with("use_dora", true), Contains("key 'use_dora'"));
    CHECK_THAT(with("bias", "all"), Contains("key 'bias'"));
    CHECK_THAT(with("target_modules", ".*proj"), Contains("key 'target_modules'") && Contains("regex"));
    // Our names are not GPT-2's: q_proj lives in the fused c_attn.
    CHECK_THAT(with("target_modules", json({"q_proj"})), Contains("key 'target_modules'") && Contains("'q_proj' names no Conv1D"));
    CHECK_THAT(with("rank_pattern", json({{"q_proj", 4}})), Contains("key 'rank_pattern'"));
    CHECK_THAT(with("layers_to_transform", json({5})), Contains("key 'layers_to_transform'") && Contains("layer 5"));
    // 2^64 - 1 once wrapped to "layer -1".
    CHECK_THAT(with("layers_to_transform", json({18446744073709551615ull})),
               Contains("key 'layers_to_transform'") && Contains("layer indices") && Contains("18446744073709551615"));
    CHECK_THAT(with("layers_to_transform", -1), Contains("key 'layers_to_transform'") && Contains("layer -1"));
    CHECK_THAT(with("layers_pattern", "blocks"), Contains("key 'layers_pattern'") && Contains("\"h\""));
    // r 3 is odd: no q/v split, so q, k and v of rank 3 sharing A; the file holds rank 4.
    CHECK_THAT(with("r", 3), Contains("c_attn.lora_A.weight' has shape [4, 16] in the file but [3, 16]"));
    CHECK(fresh.num_trainable() == fresh.num_params());
}
