// Multi-tenant serving: every request of a mixed, continuously batched stream
// equals that request generated alone (every method, mixes, left and right
// padding, joins mid-stream); the prefix cache equals recomputing the prefixes
// (tokens, logits, and the cached keys/values themselves) and removes the soft
// prompt's pass through the model; bad requests are answered with errors and
// leave the others' outputs unchanged.
#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"
#include "peft/serve.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::peft;
using namespace peftlab::testing;
using Catch::Contains;

namespace {

constexpr int64_t kVocab = 40, kC = kSmallC;

// max_seq 32: the length errors are tested against it.
GPTConfig tiny_config() { return small_gpt(kVocab, 32); }

// Weights scaled up so that greedy continuations depend on the context (and
// on the adapter) instead of mostly repeating the last token.
std::unique_ptr<GPT> sharp_model(uint64_t seed) { return testing::sharp_model(tiny_config(), seed, 6.f); }

// A randomly initialised adapter whose every tensor is non-zero (LoRA's B and
// BitFit's deltas start at zero, which would make them the base).
std::unique_ptr<Adapter> random_adapter(const std::string& method, GPT& model, uint64_t seed, int64_t n = 3,
                                        const std::string& positions = "keep") {
    AdapterOptions o;
    o.n = n;
    o.positions = positions;
    o.seed = seed;
    o.init = "random";
    o.section("lora") = {{"r", 4}, {"lora_alpha", 8.0}};
    auto a = make_adapter(method, o);
    a->attach(model);
    Rng rng(seed + 99);
    for (auto& [name, t] : a->parameters()) {
        const std::vector<float> v = t.to_vector();
        if (std::all_of(v.begin(), v.end(), [](float x) { return x == 0.f; }))
            Tensor(t).copy_from(Tensor::normal(t.shape(), rng, 0.f, 0.5f));
    }
    return a;
}

// The request generated alone by nn's generate() with only its adapter on the base.
std::vector<int32_t> alone(GPT& model, Adapter* adapter, const Request& r) {
    if (adapter) adapter->activate(model);
    GenerateOptions o;
    o.max_new_tokens = r.max_new_tokens;
    o.stop_token = r.stop_token;
    auto out = generate(model, {r.prompt}, o)[0];
    model.set_hooks(nullptr);
    return out;
}

// Requests of varied prompt lengths and budgets, tenants taken in turn from `names` ("" = base).
std::vector<Request> mixed_requests(const std::vector<std::string>& names, int count, uint64_t seed) {
    Rng rng(seed);
    std::vector<Request> rs;
    for (int i = 0; i < count; ++i) {
        Request r;
        r.id = fmt::format("r{}", i);
        r.adapter = names[size_t(i) % names.size()];
        const int len = 1 + (i * 5) % 9;  // 1..9, in no order
        for (int j = 0; j < len; ++j) r.prompt.push_back(int32_t(rng.below(uint32_t(kVocab))));
        r.max_new_tokens = 2 + (i * 3) % 6;
        rs.push_back(r);
    }
    return rs;
}

struct Tenants {
    std::vector<std::unique_ptr<Adapter>> adapters;
    std::vector<std::string> names;  // names[i] serves adapters[i]; then "" (base)
    Adapter* find(const std::string& name) const {
        for (size_t i = 0; i < adapters.size(); ++i)
            if (names[i] == name) return adapters[i].get();
        return nullptr;
    }
};

// Two tenants per method (one per method in a mix), then the base alone.
Tenants make_tenants(GPT& model, const std::vector<std::string>& methods) {
    Tenants t;
    const int per_method = methods.size() == 1 ? 2 : 1;
    uint64_t seed = 10;
    for (const std::string& m : methods)
        for (int i = 0; i < per_method; ++i) {
            // Different prefix lengths per tenant: rows of one batch are padded to the longest.
            t.adapters.push_back(random_adapter(m, model, seed, 2 + int64_t(seed % 3)));
            t.names.push_back(fmt::format("{}-{}", m, seed++));
        }
    t.names.push_back("");
    return t;
}

void add_all(Server& server, const Tenants& t) {
    for (size_t i = 0; i < t.adapters.size(); ++i) server.add_adapter(t.names[i], *t.adapters[i]);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    float m = 0.f;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
}

}  // namespace

TEST_CASE("serve: every request of a mixed stream equals the request run alone", "[serve]") {
    std::vector<std::vector<std::string>> method_sets = {
        {"prompt"}, {"prefix"}, {"prefix-kv"}, {"lora"}, {"prompt", "prefix", "prefix-kv", "lora", "bitfit"}};
    method_sets.emplace_back();  // every registered method the server mixes (LayerNorm hooks included)
    for (const std::string& m : method_names())
        if (!make_adapter(m)->changes_base()) method_sets.back().push_back(m);
    for (const auto& methods : method_sets) {
        auto model = sharp_model(1);
        Tenants tenants = make_tenants(*model, methods);
        const std::vector<Request> requests = mixed_requests(tenants.names, 10, 7);
        std::vector<std::vector<int32_t>> expected;
        int changed = 0;  // requests whose adapter changes the output: the adapters are not no-ops
        for (const Request& r : requests) {
            expected.push_back(alone(*model, tenants.find(r.adapter), r));
            if (!r.adapter.empty()) changed += expected.back() != alone(*model, nullptr, r);
        }
        CHECK(changed >= 3);
        // Padding budget 1: every admitted group is prefilled in one forward, padded to its longest prompt.
        for (Padding padding : {Padding::Left, Padding::Right})
            for (bool cache : {true, false})
                for (double budget : {1.0, ServerOptions{}.max_prefill_padding}) {
                if (cache && std::any_of(tenants.adapters.begin(), tenants.adapters.end(), [](const std::unique_ptr<Adapter>& a) {
                        return a && places_prefix_inside_prompt(*a);
                    }))
                    continue;  // refused (test_infix.cpp); the run without the cache covers it
                INFO(fmt::format("{} {} padding, prefix cache {}, padding budget {}", fmt::join(methods, "+"),
                                 padding == Padding::Left ? "left" : "right", cache ? "on" : "off", budget));
                {
                    // Three rows for ten requests: most join while others decode.
                    ServerOptions o;
                    o.max_batch = 3;
                    o.padding = padding;
                    o.prefix_cache = cache;
                    o.max_prefill_padding = budget;
                    Server server(*model, o);
                    add_all(server, tenants);
                    std::vector<Result> results = server.run(requests);
                    REQUIRE(results.size() == requests.size());
                    for (size_t i = 0; i < requests.size(); ++i) {
                        INFO("request " << requests[i].id << " adapter '" << requests[i].adapter << "'");
                        REQUIRE(results[i].ok());
                        CHECK(results[i].id == requests[i].id);
                        CHECK(results[i].tokens == expected[i]);
                        CHECK(results[i].token_ms.size() == results[i].tokens.size());
                    }
                    CHECK(server.stats().prefills >= 4);
                    CHECK(server.idle());
                }
            }
    }
}

TEST_CASE("serve: positions hf (Hugging Face PEFT) and keep tenants mixed equal each request alone", "[serve][hf]") {
    // Under hf a tenant's real tokens sit at positions n..n+T-1 after its n
    // virtual tokens (prefill and every decoding step), its cached prefix was
    // computed with position embeddings 0..n-1, and the length rule counts n.
    auto model = sharp_model(11);
    Tenants t;
    uint64_t seed = 30;
    for (const std::string m : {"prompt", "prefix", "prefix-kv", "p-tuning"})
        for (const std::string positions : {"hf", "keep"}) {
            t.adapters.push_back(random_adapter(m, *model, seed, 2 + int64_t(seed % 3), positions));
            t.names.push_back(fmt::format("{}-{}-{}", m, positions, seed++));
        }
    t.names.push_back("");
    const std::vector<Request> requests = mixed_requests(t.names, 12, 5);
    std::vector<std::vector<int32_t>> expected;
    int differs = 0;  // hf requests whose tokens differ from the same adapter under keep
    for (const Request& r : requests) {
        Adapter* a = t.find(r.adapter);
        expected.push_back(alone(*model, a, r));
        if (a && a->options().positions == "hf") {
            CHECK(a->prefix_positions() == a->virtual_tokens());
            AdapterOptions o = a->options();
            o.positions = "keep";
            auto k = make_adapter(a->method(), o);
            k->attach(*model);
            for (size_t i = 0; i < k->parameters().size(); ++i)
                Tensor(k->parameters()[i].second).copy_from(a->parameters()[i].second);
            differs += alone(*model, k.get(), r) != expected.back();
        }
    }
    CHECK(differs >= 2);  // the convention changes outputs: the test can tell them apart
    for (Padding padding : {Padding::Left, Padding::Right})
        for (bool cache : {true, false}) {
            INFO(fmt::format("{} padding, prefix cache {}", padding == Padding::Left ? "left" : "right", cache));
            ServerOptions o;
            o.max_batch = 3;
            o.padding = padding;
            o.prefix_cache = cache;
            Server server(*model, o);
            add_all(server, t);
            const std::vector<Result> results = server.run(requests);
            for (size_t i = 0; i < requests.size(); ++i) {
                INFO("request " << requests[i].id << " adapter '" << requests[i].adapter << "'");
                REQUIRE(results[i].ok());
                CHECK(results[i].tokens == expected[i]);
            }
        }
    // The length rule counts an hf tenant's virtual tokens: max_seq 32 = 20 prompt + 2 virtual + 10 new.
    Adapter* hf = t.find("prompt-hf-30");
    REQUIRE(hf);
    REQUIRE(hf->prefix_positions() == 2);
    Server server(*model);
    server.add_adapter("hf", *hf);
    Request fits{"a", "hf", std::vector<int32_t>(20, 1), 10, -1}, over{"b", "hf", std::vector<int32_t>(21, 1), 10, -1};
    const std::vector<Result> rs = server.run({fits, over});
    CHECK(rs[0].ok());
    CHECK_THAT(rs[1].error, Contains("2 adapter positions"));
}

TEST_CASE("serve: requests admitted together are prefilled in groups by prompt length, within the padding budget",
          "[serve]") {
    auto model = sharp_model(4);
    Tenants tenants = make_tenants(*model, {"prefix-kv", "lora"});
    // Eight prompts of 1..15 tokens, all admitted in the first step.
    std::vector<Request> requests;
    Rng rng(21);
    for (int i = 0; i < 8; ++i) {
        Request r;
        r.id = fmt::format("r{}", i);
        r.adapter = tenants.names[size_t(i) % tenants.names.size()];
        for (int j = 0; j < 1 + (i * 9) % 15; ++j) r.prompt.push_back(int32_t(rng.below(uint32_t(kVocab))));
        r.max_new_tokens = 3;
        requests.push_back(r);
    }
    int64_t real = 0, longest = 0;
    std::set<size_t> lengths;
    for (const Request& r : requests) {
        lengths.insert(r.prompt.size());
        real += int64_t(r.prompt.size());
        longest = std::max(longest, int64_t(r.prompt.size()));
    }
    std::vector<std::vector<int32_t>> expected;
    for (const Request& r : requests) expected.push_back(alone(*model, tenants.find(r.adapter), r));
    for (double budget : {1.0, 0.125, 0.0}) {
        INFO("padding budget " << budget);
        ServerOptions o;
        o.max_batch = 8;
        o.max_prefill_padding = budget;
        Server server(*model, o);
        add_all(server, tenants);
        std::vector<Result> results = server.run(requests);
        for (size_t i = 0; i < requests.size(); ++i) CHECK(results[i].tokens == expected[i]);
        const ServerStats& st = server.stats();
        CHECK(st.prompt_tokens == real);
        if (budget == 1.0) {  // one forward, every prompt padded to the longest
            CHECK(st.prefills == 1);
            CHECK(st.prefill_slots == 8 * longest);
        } else {  // each group's padding within the budget; budget 0: one group per prompt length, no padding
            CHECK(st.prefills > 1);
            CHECK(double(st.prefill_slots - real) <= budget * double(st.prefill_slots));
            if (budget == 0.0) {
                CHECK(st.prefills == int64_t(lengths.size()));
                CHECK(st.prefill_slots == real);
            }
        }
    }
    ServerOptions bad;
    bad.max_prefill_padding = 1.5;
    CHECK_THROWS_WITH(Server(*model, bad), Contains("max_prefill_padding") && Contains("1.5"));
}

TEST_CASE("serve: requests submitted while others decode join mid-stream and match alone", "[serve]") {
    auto model = sharp_model(2);
    Tenants tenants = make_tenants(*model, {"prompt", "prefix-kv", "lora"});
    const std::vector<Request> requests = mixed_requests(tenants.names, 8, 3);
    ServerOptions o;
    o.max_batch = 8;
    Server server(*model, o);
    add_all(server, tenants);
    // One arrival per step: each new request is prefilled and appended to a batch already decoding.
    std::map<std::string, std::vector<int32_t>> got;
    size_t next = 0;
    int joins_while_running = 0;
    while (next < requests.size() || !server.idle()) {
        if (next < requests.size()) {
            joins_while_running += server.running() > 0;
            server.submit(requests[next++]);
        }
        for (Result& r : server.step()) {
            REQUIRE(r.ok());
            got[r.id] = r.tokens;
        }
    }
    CHECK(joins_while_running >= 5);
    for (const Request& r : requests) CHECK(got[r.id] == alone(*model, tenants.find(r.adapter), r));
}

TEST_CASE("serve: cached prefixes equal recomputed ones (tokens, logits within 1e-5)", "[serve]") {
    auto model = sharp_model(3);
    Tenants tenants = make_tenants(*model, {"prompt", "prefix", "prefix-kv", "lora"});
    const std::vector<Request> requests = mixed_requests(tenants.names, 9, 11);
    std::vector<std::vector<Result>> runs;
    for (bool cache : {true, false}) {
        ServerOptions o;
        o.max_batch = 4;
        o.prefix_cache = cache;
        o.keep_logits = true;
        Server server(*model, o);
        add_all(server, tenants);
        runs.push_back(server.run(requests));
    }
    for (size_t i = 0; i < requests.size(); ++i) {
        INFO("request " << requests[i].id << " adapter '" << requests[i].adapter << "'");
        CHECK(runs[0][i].tokens == runs[1][i].tokens);
        CHECK(max_abs_diff(runs[0][i].logits, runs[1][i].logits) <= 1e-5f);
    }
}

TEST_CASE("serve: the cached keys and values are each method's prefix", "[serve]") {
    auto model = sharp_model(4);
    auto prompt = random_adapter("prompt", *model, 1, 3);
    auto prefix = random_adapter("prefix", *model, 2, 2);
    auto kv = random_adapter("prefix-kv", *model, 3, 4);
    auto lora = random_adapter("lora", *model, 4);
    Server server(*model);
    server.add_adapter("p", *prompt);
    server.add_adapter("h", *prefix);
    server.add_adapter("kv", *kv);
    server.add_adapter("lora", *lora);
    NoGradGuard no_grad;
    auto close = [](const Tensor& a, const Tensor& b) {
        REQUIRE(a.shape() == b.shape());
        return max_abs_diff(a.to_vector(), b.to_vector()) <= 1e-6f;
    };
    for (int l = 0; l < 2; ++l) {
        const Block& blk = *model->blocks[size_t(l)];
        // prefix-kv: its parameters, bitwise.
        auto [k_kv, v_kv] = server.cached_prefix("kv", l);
        CHECK(k_kv.to_vector() == kv->parameters()[size_t(2 * l)].second.to_vector());
        CHECK(v_kv.to_vector() == kv->parameters()[size_t(2 * l + 1)].second.to_vector());
        // hidden-state prefix: K, V projections of LN1 of its vectors.
        auto [k_h, v_h] = server.cached_prefix("h", l);
        Tensor hn = blk.ln1.forward(prefix->parameters()[size_t(l)].second);
        CHECK(close(k_h, linear(hn, blk.attn.k_proj.weight, blk.attn.k_proj.bias)));
        CHECK(close(v_h, linear(hn, blk.attn.v_proj.weight, blk.attn.v_proj.bias)));
        // soft prompt: n entries in every layer.
        CHECK(server.cached_prefix("p", l).first.shape() == Shape{3, kC});
        CHECK_FALSE(server.cached_prefix("lora", l).first.defined());
    }
    // Layer 0 sees the soft prompt itself (no position embedding).
    Tensor hn = model->blocks[0]->ln1.forward(prompt->parameters()[0].second);
    CHECK(close(server.cached_prefix("p", 0).first,
                linear(hn, model->blocks[0]->attn.k_proj.weight, model->blocks[0]->attn.k_proj.bias)));
    CHECK(server.prefix_cache_bytes() == int64_t(sizeof(float)) * 2 * kC * (2 * 3 + 2 * 2 + 2 * 4));
    CHECK_THROWS_WITH(server.cached_prefix("nope", 0), Contains("unknown adapter 'nope'"));
}

TEST_CASE("serve: with the cache, a soft prompt costs exactly what an equal prefix-kv costs", "[serve]") {
    auto model = sharp_model(5);
    auto prompt = random_adapter("prompt", *model, 1, 6);
    auto kv = random_adapter("prefix-kv", *model, 2, 6);  // every layer, as the soft prompt's K/V
    Request r{"x", "", {1, 2, 3, 4}, 3, -1};
    auto flops_of = [&](const std::string& name, bool cache) {
        ServerOptions o;
        o.prefix_cache = cache;
        Server server(*model, o);
        server.add_adapter("p", *prompt);
        server.add_adapter("kv", *kv);
        Request q = r;
        q.adapter = name;
        flops::reset();
        REQUIRE(server.run({q})[0].ok());
        return flops::totals()[0];
    };
    const uint64_t prompt_cached = flops_of("p", true), kv_cached = flops_of("kv", true);
    CHECK(prompt_cached == kv_cached);
    CHECK(flops_of("p", false) > prompt_cached + 6 * 2 * 2 * uint64_t(kC * kC));  // soft prompt through the layers
}

TEST_CASE("serve: one sequence-length rule for every method: prepended vectors take no positions", "[serve]") {
    // Before the fix the server refused this prompt-tuning request (it counted the 3 soft tokens against
    // max_seq) while generate() and an equal prefix-kv tenant served it.
    auto model = sharp_model(12);
    Tenants tenants = make_tenants(*model, {"prompt", "prefix-kv"});
    Rng rng(4);
    std::vector<int32_t> prompt;
    for (int i = 0; i < 27; ++i) prompt.push_back(int32_t(rng.below(uint32_t(kVocab))));
    for (size_t t = 0; t < tenants.adapters.size(); ++t) {
        INFO(tenants.adapters[t]->method());
        CHECK(tenants.adapters[t]->prefix_positions() == 0);
        const Request fits{"fits", tenants.names[t], prompt, 5, -1};  // 27 + 5 = 32 = max_seq
        Server server(*model);
        add_all(server, tenants);
        const std::vector<Result> r = server.run({fits, {"over", tenants.names[t], prompt, 6, -1}});
        REQUIRE(r[0].ok());
        CHECK(r[0].tokens == alone(*model, tenants.adapters[t].get(), fits));
        CHECK_THAT(r[1].error, Contains("prompt of 27 tokens + max_new_tokens 6 = 33 exceeds max_seq = 32"));
    }
}

TEST_CASE("serve: bad requests get errors and leave the others unchanged", "[serve]") {
    auto model = sharp_model(6);
    Tenants tenants = make_tenants(*model, {"prompt", "prefix-kv", "lora"});
    const std::vector<Request> good = mixed_requests(tenants.names, 7, 5);
    const std::string soft = tenants.names[0];  // prompt tuning with 3 soft tokens
    REQUIRE(tenants.adapters[0]->method() == "prompt");
    std::vector<Request> bad = {
        {"unknown", "nope", {1, 2}, 3, -1},
        {"empty", soft, {}, 3, -1},
        {"token", tenants.names[1], {1, 40, 2}, 3, -1},
        {"negative", "", {5}, -2, -1},
        {"stop", "", {1, 2}, 3, 77},
        // 25 + 8 = 33 does not fit max_seq = 32 (the 3 soft tokens take no positions).
        {"long", soft, std::vector<int32_t>(25, 1), 8, -1},
        {"long-base", "", std::vector<int32_t>(30, 1), 3, -1},
    };
    // Bad requests interleaved with the good ones, so they arrive between admissions.
    std::vector<Request> all;
    for (size_t i = 0; i < std::max(good.size(), bad.size()); ++i) {
        if (i < bad.size()) all.push_back(bad[i]);
        if (i < good.size()) all.push_back(good[i]);
    }
    ServerOptions o;
    o.max_batch = 3;
    Server clean(*model, o), mixed(*model, o);
    add_all(clean, tenants);
    add_all(mixed, tenants);
    std::vector<Result> expected = clean.run(good), results = mixed.run(all);
    std::map<std::string, Result> by_id;
    for (Result& r : results) by_id[r.id] = r;
    CHECK_THAT(by_id["unknown"].error, Contains("request 'unknown': unknown adapter 'nope' (known: prompt-10"));
    CHECK_THAT(by_id["empty"].error, Contains("empty prompt"));
    CHECK_THAT(by_id["token"].error, Contains("prompt token 1 = 40 is outside the vocabulary [0, 40)"));
    CHECK_THAT(by_id["negative"].error, Contains("max_new_tokens = -2 must be >= 0"));
    CHECK_THAT(by_id["stop"].error, Contains("stop_token = 77 is outside the vocabulary"));
    CHECK_THAT(by_id["long"].error,
               Contains("prompt of 25 tokens + max_new_tokens 8 = 33 exceeds max_seq = 32"));
    CHECK_THAT(by_id["long-base"].error, Contains("prompt of 30 tokens + max_new_tokens 3 = 33 exceeds max_seq = 32"));
    for (const Request& b : bad) CHECK(by_id[b.id].tokens.empty());
    for (const Result& e : expected) {
        INFO("request " << e.id);
        REQUIRE(e.ok());
        CHECK(by_id[e.id].ok());
        CHECK(by_id[e.id].tokens == e.tokens);
    }
    // Results come back in request order.
    for (size_t i = 0; i < all.size(); ++i) CHECK(results[i].id == all[i].id);
}

TEST_CASE("serve: stop tokens, empty budgets, and adapters loaded from files", "[serve]") {
    auto model = sharp_model(7);
    auto kv = random_adapter("prefix-kv", *model, 1, 3);
    auto lora = random_adapter("lora", *model, 2);
    // Greedy continuation of a prompt, then the same request stopping at its third token.
    Request r{"a", "kv", {3, 1, 4}, 6, -1};
    const std::vector<int32_t> full = alone(*model, kv.get(), r);
    REQUIRE(full.size() == 6);
    Request stopped = r;
    stopped.id = "b";
    stopped.stop_token = full[2];
    const size_t stop_at = size_t(std::find(full.begin(), full.end(), full[2]) - full.begin());
    Request none = r;
    none.id = "c";
    none.max_new_tokens = 0;

    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / fmt::format("peftlab_serve_{}", ::getpid());
    save_adapter((dir / "kv").string(), *kv);
    save_adapter((dir / "lora").string(), *lora);
    Server server(*model);
    server.load_adapter("kv", (dir / "kv").string());
    server.load_adapter("lora", (dir / "lora").string());
    fs::remove_all(dir);
    Request lr = r;
    lr.id = "d";
    lr.adapter = "lora";
    std::vector<Result> out = server.run({r, stopped, none, lr});
    CHECK(out[0].tokens == full);
    CHECK(out[1].tokens == std::vector<int32_t>(full.begin(), full.begin() + long(stop_at) + 1));
    CHECK(out[2].ok());
    CHECK(out[2].tokens.empty());
    CHECK(out[3].tokens == alone(*model, lora.get(), lr));
    CHECK(server.tenants() == std::vector<std::string>{"kv", "lora"});
}

TEST_CASE("serve: adapters the server cannot mix are refused, naming why", "[serve]") {
    auto model = sharp_model(8);
    auto kv = random_adapter("prefix-kv", *model, 1);
    auto lora = random_adapter("lora", *model, 2);
    auto full = make_adapter("full");
    Server server(*model);
    server.add_adapter("kv", *kv);
    CHECK_THROWS_WITH(server.add_adapter("kv", *lora), Contains("cannot add adapter 'kv' (lora): the name is taken"));
    CHECK_THROWS_WITH(server.add_adapter("", *lora), Contains("the empty name means the base"));
    CHECK_THROWS_WITH(server.add_adapter("f", *full), Contains("(full): it trains the base itself"));
    lora->merge();
    CHECK_THROWS_WITH(server.add_adapter("m", *lora), Contains("(lora): it is merged into the base"));
    lora->unmerge();
    GPT other(tiny_config(), 9);
    auto foreign = random_adapter("prompt", other, 3);
    CHECK_THROWS_WITH(server.add_adapter("o", *foreign), Contains("attached to another model"));
    server.submit({"q", "kv", {1}, 2, -1});
    CHECK_THROWS_WITH(server.add_adapter("late", *lora), Contains("add adapters before serving"));
    ServerOptions zero_rows;
    zero_rows.max_batch = 0;
    CHECK_THROWS_WITH(Server(*model, zero_rows), Contains("max_batch = 0 must be >= 1"));
}
