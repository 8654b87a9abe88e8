// Regression tests for what fuzzing (fuzz/*.cpp, `make fuzz`) and reading the
// readers for sizes taken on trust found, one test per kind of missing check:
// each feeds the reader the kind of input that got through and asserts the
// clear error it must now give. Also: every committed seed input loads (the
// checks refuse no file our own writers make).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "datasets/gpt2_tokenizer.h"
#include "datasets/tokenizer.h"
#include "fuzz/fuzz.h"
#include "nn/checkpoint.h"
#include "nn/hf_gpt2.h"
#include "nn/json_limits.h"
#include "nn/optim.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"
#include "tests/testing.h"

using namespace peftlab;
using Catch::Contains;
using nlohmann::json;
using peftlab::testing::TempDir;
namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

// A safetensors file with this header text (padded) and `data` bytes after it.
std::string safetensors_bytes(std::string header, const std::string& data = "") {
    header.append((8 - header.size() % 8) % 8, ' ');
    const uint64_t n = header.size();
    return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

// Writes the packed adapter-target input's two files into dir.
void unpack_to(const std::string& packed, const fs::path& dir) {
    const auto files = fuzz::unpack(reinterpret_cast<const uint8_t*>(packed.data()), packed.size(), 2);
    fs::create_directories(dir);
    std::ofstream(dir / peft::kAdapterConfigFile, std::ios::binary) << files[0];
    std::ofstream(dir / peft::kAdapterWeightsFile, std::ios::binary) << files[1];
}

}  // namespace

TEST_CASE("JSON from files: nesting depth bounded, values quoted briefly", "[fuzz][safetensors]") {
    // dump() and comparisons recurse over a value: a million '[' would overflow the stack.
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    CHECK_THROWS_WITH(parse_json_limited(deep, "x"), Contains("nested deeper than 64 levels"));
    CHECK_NOTHROW(parse_json_limited(std::string(60, '[') + std::string(60, ']'), "x"));
    CHECK_THROWS_WITH(parse_json_limited("{\"a\": ", "header"), Contains("header: not valid JSON"));
    // Duplicate keys at any depth are refused; equal keys in sibling objects are not duplicates.
    CHECK_THROWS_WITH(parse_json_limited(R"({"a": 1, "b": {"c": 2, "c": 3}})", "x"), Contains("x: duplicate key \"c\""));
    CHECK_THROWS_WITH(parse_json_limited(R"([{"a": 1, "a": 1}])", "x"), Contains("duplicate key \"a\""));
    CHECK(parse_json_limited(R"({"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]})", "x")["c"][1]["k"] == 4);

    TempDir tmp;
    const std::string header = "{\"t\":{\"dtype\":\"F32\",\"shape\":" + deep + ",\"data_offsets\":[0,4]}}";
    CHECK_THROWS_WITH(load_safetensors(tmp.file("deep.safetensors", safetensors_bytes(header, "abcd"))),
                      Contains("nested deeper than 64 levels"));
    // A long non-integer shape is quoted cut short, not whole.
    std::string shape = "[1.5";
    for (int i = 0; i < 10000; ++i) shape += ",1";
    shape += "]";
    const std::string h2 = "{\"t\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":[0,4]}}";
    try {
        load_safetensors(tmp.file("long.safetensors", safetensors_bytes(h2, "abcd")));
        FAIL("loaded");
    } catch (const std::runtime_error& e) {
        CHECK_THAT(e.what(), Contains("non-integer element 1.5"));
        CHECK(std::string(e.what()).size() < 400);
    }
    CHECK(json_excerpt(json(std::string(1000, 'a'))).size() == 83);
}

TEST_CASE("GPTConfig::from_json refuses values that do not fit their field", "[fuzz][model]") {
    const json good = GPTConfig{}.to_json();
    CHECK(GPTConfig::from_json(good) == GPTConfig{});
    auto with = [&](const char* key, json v) {
        json j = good;
        j[key] = std::move(v);
        return j;
    };
    // Before: 2.5 truncated to 2, 2^40 wrapped into an int, 1e300 converted to float with undefined behaviour.
    CHECK_THROWS_WITH(GPTConfig::from_json(with("d_model", 2.5)), Contains("key 'd_model' has a bad value 2.5"));
    CHECK_THROWS_WITH(GPTConfig::from_json(with("n_layers", int64_t(1) << 40)),
                      Contains("key 'n_layers' has a bad value 1099511627776"));
    CHECK_THROWS_WITH(GPTConfig::from_json(with("dropout", 1e300)), Contains("key 'dropout' has a bad value"));
    CHECK_THROWS_WITH(GPTConfig::from_json(with("tie_embeddings", 1)), Contains("key 'tie_embeddings'"));
    CHECK_THROWS_WITH(GPTConfig::from_json(json::array()), Contains("expected a JSON object"));
}

TEST_CASE("load_model_new: the file's config cannot size a model beyond the file's tensors", "[fuzz][model]") {
    TempDir tmp;
    // The parameter count is checked before the model is built; it must agree with
    // the model GPT actually builds, tied or not, for any dimensions.
    for (bool tie : {false, true}) {
        GPTConfig c = fuzz::base_config();
        c.d_model = 12, c.n_heads = 3, c.d_ff = 20, c.vocab = 11, c.max_seq = 5, c.n_layers = 3, c.tie_embeddings = tie;
        GPT model(c, 4);
        save_model(tmp.path("m.safetensors"), model);
        CHECK(load_model_new(tmp.path("m.safetensors"))->config() == c);
    }
    // A file whose config claims a 10^12-token vocabulary (before: a 4 TB allocation attempt).
    const std::unique_ptr<GPT> model = fuzz::make_base();
    save_model(tmp.path("m.safetensors"), *model);
    StFile f = load_safetensors(tmp.path("m.safetensors"));
    json cfg = json::parse(f.metadata["config"]);
    cfg["vocab"] = int64_t(1000000000000);
    f.metadata["config"] = cfg.dump();
    std::vector<StTensorRef> refs;
    for (auto& [name, t] : f.tensors) refs.push_back({name, t.shape, t.data.data()});
    save_safetensors(tmp.path("huge.safetensors"), refs, f.metadata);
    CHECK_THROWS_WITH(load_model_new(tmp.path("huge.safetensors")),
                      Contains("huge.safetensors") && Contains("describes a model of") &&
                          Contains("but the file holds 1536"));
    cfg["vocab"] = int64_t(1) << 62;  // the count itself overflows
    f.metadata["config"] = cfg.dump();
    save_safetensors(tmp.path("huge.safetensors"), refs, f.metadata);
    CHECK_THROWS_WITH(load_model_new(tmp.path("huge.safetensors")), Contains("more than 2^64"));
    // A tensor missing or extra: named, not only counted (the count check came first once).
    const auto save_without = [&](const std::string& drop, const std::string& add) {
        std::vector<StTensorRef> kept;
        for (auto& [name, t] : f.tensors)
            if (name != drop) kept.push_back({name, t.shape, t.data.data()});
        if (!add.empty()) kept.push_back({add, f.tensors.at("ln_f.bias").shape, f.tensors.at("ln_f.bias").data.data()});
        f.metadata["config"] = model->config().to_json().dump();
        save_safetensors(tmp.path("odd.safetensors"), kept, f.metadata);
    };
    save_without("ln_f.bias", "");
    CHECK_THROWS_WITH(load_model_new(tmp.path("odd.safetensors")), Contains("odd.safetensors") && Contains("ln_f.bias"));
    save_without("", "extra.weight");
    CHECK_THROWS_WITH(load_model_new(tmp.path("odd.safetensors")), Contains("extra.weight"));
    // A missing config is named once (its error was once wrapped in itself).
    f.metadata.erase("config");
    save_safetensors(tmp.path("odd.safetensors"), refs, f.metadata);
    try {
        load_model_new(tmp.path("odd.safetensors"));
        FAIL("loaded a model file without a config");
    } catch (const std::runtime_error& e) {
        const std::string what = e.what();
        CHECK_THAT(what, Contains("metadata key 'config' is missing"));
        CHECK(what.find("load_model_new") == what.rfind("load_model_new"));
    }
}

TEST_CASE("Adapter loaders: sizes in the config are bounded by the weights file before allocating",
          "[fuzz][adapter_io]") {
    TempDir tmp;
    const std::unique_ptr<GPT> base = fuzz::make_base();
    const fs::path seeds = "fuzz/corpus";
    SECTION("own layout: options.n") {
        unpack_to(read_all(seeds / "adapter" / "prompt"), tmp.dir / "a");
        json cfg = json::parse(read_all(tmp.dir / "a" / peft::kAdapterConfigFile));
        cfg["options"]["n"] = int64_t(1) << 30;  // before: attach allocated n*d floats (32 GB)
        std::ofstream(tmp.dir / "a" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::load_adapter((tmp.dir / "a").string(), *base),
                          Contains("adapter_config.json") && Contains("key 'options'") &&
                              Contains("n = 1073741824 is larger than the weights file could hold"));
        cfg["options"]["n"] = int64_t(1) << 40;  // beyond int positions: refused by AdapterOptions itself
        std::ofstream(tmp.dir / "a" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::load_adapter((tmp.dir / "a").string(), *base),
                          Contains("key 'options'") && Contains("n = 1099511627776 must be in [0, 2147483647]"));
        cfg["options"]["n"] = 5000000;  // fits the allowance per option, not the formula (n*d)
        std::ofstream(tmp.dir / "a" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::load_adapter((tmp.dir / "a").string(), *base),
                          Contains("these options make 40000000 parameters (n*d)"));
    }
    SECTION("own layout: reparam_hidden") {
        unpack_to(read_all(seeds / "adapter" / "prefix_reparam"), tmp.dir / "a");
        json cfg = json::parse(read_all(tmp.dir / "a" / peft::kAdapterConfigFile));
        cfg["options"]["prefix"]["reparam_hidden"] = int64_t(1) << 50;
        std::ofstream(tmp.dir / "a" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::load_adapter((tmp.dir / "a").string(), *base), Contains("reparam_hidden = "));
    }
    SECTION("Hugging Face layout: num_virtual_tokens and r") {
        unpack_to(read_all(seeds / "adapter_hf" / "prefix-kv"), tmp.dir / "h");
        json cfg = json::parse(read_all(tmp.dir / "h" / peft::kAdapterConfigFile));
        cfg["num_virtual_tokens"] = int64_t(1) << 45;  // before: a [n, 2*L*d] table was allocated to compare shapes
        std::ofstream(tmp.dir / "h" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::import_hf((tmp.dir / "h").string(), *base),
                          Contains("key 'num_virtual_tokens'") && Contains("leaves no position"));
        unpack_to(read_all(seeds / "adapter_hf" / "lora"), tmp.dir / "l");
        cfg = json::parse(read_all(tmp.dir / "l" / peft::kAdapterConfigFile));
        cfg["r"] = 100000000;  // q and v of rank r/2 each in the fused c_attn: still far beyond the file
        std::ofstream(tmp.dir / "l" / peft::kAdapterConfigFile) << cfg.dump();
        CHECK_THROWS_WITH(peft::import_hf((tmp.dir / "l").string(), *base),
                          Contains("key 'r'") && Contains("larger than the weights file"));
    }
}

TEST_CASE("AdapterOptions::from_json: numbers must fit their field", "[fuzz][adapter_io]") {
    json j = peft::AdapterOptions{}.to_json();
    j["lora"] = {{"lora_alpha", 1e300}};  // before: converted to float with undefined behaviour
    CHECK_THROWS_WITH(peft::make_adapter("lora", peft::AdapterOptions::from_json(j)),
                      Contains("lora_alpha") && Contains("within float range"));
    j = peft::AdapterOptions{}.to_json();
    j["init_tokens"] = json::array({1, int64_t(1) << 40});  // before: wrapped into an int32 token id
    CHECK_THROWS_WITH(peft::AdapterOptions::from_json(j), Contains("key 'init_tokens' has a bad value"));
    j = peft::AdapterOptions{}.to_json();
    j["n"] = uint64_t(1) << 63;  // before: wrapped to n = -9223372036854775808
    CHECK_THROWS_WITH(peft::AdapterOptions::from_json(j), "AdapterOptions: key 'n' has a bad value 9223372036854775808");
    j["n"] = int64_t(1) << 31;
    CHECK_THROWS_WITH(peft::AdapterOptions::from_json(j), "AdapterOptions: n = 2147483648 must be in [0, 2147483647]");
}

TEST_CASE("Every committed fuzz seed is a valid input for its reader", "[fuzz]") {
    const fs::path seeds = "fuzz/corpus";
    REQUIRE(fs::is_directory(seeds));
    TempDir tmp;
    int n = 0;
    for (const auto& e : fs::directory_iterator(seeds / "safetensors")) {
        CHECK_NOTHROW(load_safetensors(e.path().string()));
        ++n;
    }
    for (const auto& e : fs::directory_iterator(seeds / "checkpoint")) {
        const std::unique_ptr<GPT> m = load_model_new(e.path().string());
        CHECK(m->config() == fuzz::base_config());
        ++n;
    }
    for (const auto& e : fs::directory_iterator(seeds / "training_state")) {
        const std::unique_ptr<GPT> m = fuzz::make_base();
        AdamW opt(trainable_named_parameters(*m));
        Rng a(0), b(0);
        CHECK(load_training_state(e.path().string(), trainable_named_parameters(*m), opt, {{"data", &a}, {"dropout", &b}})
                  .step == 7);
        ++n;
    }
    for (const char* target : {"adapter", "adapter_hf"})
        for (const auto& e : fs::directory_iterator(seeds / target)) {
            INFO(e.path());
            const fs::path d = tmp.dir / (std::string(target) + "_" + e.path().filename().string());
            unpack_to(read_all(e.path()), d);
            const std::unique_ptr<GPT> m = fuzz::make_base();
            CHECK_NOTHROW(std::string(target) == "adapter" ? peft::load_adapter(d.string(), *m)
                                                           : peft::import_hf(d.string(), *m));
            ++n;
        }
    for (const auto& e : fs::directory_iterator(seeds / "tokenizer_json")) {
        const std::string packed = read_all(e.path());
        const auto in = fuzz::unpack(reinterpret_cast<const uint8_t*>(packed.data()), packed.size(), 2);
        const std::unique_ptr<data::Tokenizer> tok = data::tokenizer_from_json(json::parse(in[0]));
        CHECK_FALSE(tok->encode(in[1]).empty());
        ++n;
    }
    for (const auto& e : fs::directory_iterator(seeds / "gpt2_tokenizer")) {
        const std::string packed = read_all(e.path());
        const auto in = fuzz::unpack(reinterpret_cast<const uint8_t*>(packed.data()), packed.size(), 3);
        const data::GPT2Tokenizer tok = data::GPT2Tokenizer::from_strings(in[0], in[1]);
        CHECK(tok.decode(tok.encode(in[2]), true) == in[2]);
        ++n;
    }
    // HF GPT-2 directories (fuzz/hf_gpt2.cpp's five records): single file and
    // sharded both give make_base()'s weights back bitwise.
    for (const auto& e : fs::directory_iterator(seeds / "hf_gpt2")) {
        INFO(e.path());
        const std::string packed = read_all(e.path());
        const char* const names[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
        const auto in = fuzz::unpack(reinterpret_cast<const uint8_t*>(packed.data()), packed.size(), std::size(names));
        const fs::path d = tmp.dir / ("hf_gpt2_" + e.path().filename().string());
        fs::create_directories(d);
        for (size_t i = 0; i < in.size(); ++i)
            if (!in[i].empty()) std::ofstream(d / names[i], std::ios::binary) << in[i];
        const std::unique_ptr<GPT> m = load_hf_gpt2(d.string());
        const std::unique_ptr<GPT> want = fuzz::make_base();
        auto got_p = m->named_parameters(), want_p = want->named_parameters();
        REQUIRE(got_p.size() == want_p.size());
        for (size_t i = 0; i < got_p.size(); ++i) {
            INFO(got_p[i].first);
            REQUIRE(got_p[i].second.numel() == want_p[i].second.numel());
            CHECK(std::memcmp(got_p[i].second.data(), want_p[i].second.data(),
                              size_t(got_p[i].second.numel()) * sizeof(float)) == 0);
        }
        ++n;
    }
    CHECK(n >= 19);
    // One adapter seed per registered method (tools/write_fuzz_seeds writes them;
    // `make fuzz-seeds`): once, two methods had been registered without theirs,
    // so the adapter fuzzer never started from their files.
    for (const peft::MethodInfo& m : peft::methods()) {
        INFO(m.name);
        if (m.builtin) CHECK(fs::exists(seeds / "adapter" / m.name));  // not the tests' own (test_extension)
    }
}
