// KV-cache generation: equal to greedy decoding by full recomputation (with
// every kind of hook), batch-independent, stop token and length limits,
// seeded sampling, the prefill/decode_step/keep_rows/append_rows API, errors;
// forward_at (the head at the sampled positions only) against forward's logits.
#include <algorithm>
#include <cmath>
#include <map>

#include <catch2/catch.hpp>

#include "autograd/flops.h"
#include "autograd/tape.h"
#include "nn/generate.h"
#include "peft/registry.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::testing;
using Catch::Contains;

namespace {

constexpr int64_t kVocab = 40, kC = kSmallC;

// max_seq 24: the length tests generate up to it exactly.
GPTConfig tiny_config() { return small_gpt(kVocab, 24); }

// A model whose greedy continuations depend on the context: at init (std
// 0.02) attention barely moves the logits, so the next token would mostly
// follow the last one.
std::unique_ptr<GPT> sharp_model(uint64_t seed, float factor = 6.f) {
    return testing::sharp_model(tiny_config(), seed, factor);
}

const std::vector<std::vector<int32_t>> kPrompts = {{3}, {7, 1, 12, 30, 5}, {22, 9, 2}};

// Fixed prefixes and Linear deltas; counts what the model asked for.
struct TestHooks : ModelHooks {
    SeqPrefix input;
    std::map<int, LayerPrefix> layers;
    std::map<std::string, Tensor> deltas;  // Linear path -> [out, in]
    int forwards = 0, input_calls = 0, layer_calls = 0, decode_delta_calls = 0;
    bool prefix_on_decode = false;

    void begin_forward(const ForwardInfo&) override { ++forwards; }
    SeqPrefix input_prefix(const ForwardInfo& info) override {
        ++input_calls;
        prefix_on_decode = prefix_on_decode || !info.prefill;
        return input;
    }
    LayerPrefix layer_prefix(int layer, const ForwardInfo& info) override {
        ++layer_calls;
        prefix_on_decode = prefix_on_decode || !info.prefill;
        auto it = layers.find(layer);
        return it == layers.end() ? LayerPrefix{} : it->second;
    }
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo& info) override {
        auto it = deltas.find(path);
        if (it == deltas.end()) return {};
        if (!info.prefill) ++decode_delta_calls;
        return linear(x, it->second);
    }
};

enum class HookKind { Input, Hidden, KeyValue, PerRow, Table, Delta, All };

// Hooks of one kind for a batch of B rows, filled with seeded random vectors.
std::unique_ptr<TestHooks> make_hooks(HookKind kind, const GPT& model, int64_t B, uint64_t seed) {
    Rng rng(seed);
    auto h = std::make_unique<TestHooks>();
    auto rnd = [&](const Shape& s) { return Tensor::normal(s, rng, 0.f, 1.f); };
    const bool all = kind == HookKind::All;
    if (kind == HookKind::Input || all) h->input.embeds = rnd({3, kC});
    if (kind == HookKind::Hidden || all) h->layers[1].hidden = rnd({2, kC});
    if (kind == HookKind::KeyValue || all) {
        h->layers[0].key = rnd({4, kC});
        h->layers[0].value = rnd({4, kC});
    }
    if (kind == HookKind::PerRow) {
        // Per-row prompt vectors and key/value prefixes; the last row has none.
        Tensor valid = Tensor::ones({B, 2});
        valid.data()[(B - 1) * 2] = valid.data()[(B - 1) * 2 + 1] = 0.f;
        valid.data()[1] = 0.f;
        h->input.embeds = rnd({B, 2, kC});
        h->input.valid = valid;
        h->layers[1].key = rnd({B, 2, kC});
        h->layers[1].value = rnd({B, 2, kC});
        h->layers[1].kv_valid = valid.clone();
    }
    if (kind == HookKind::Table) {
        // Two table entries; rows alternate between them.
        std::vector<int32_t> rows;
        for (int64_t b = 0; b < B; ++b) rows.push_back(int32_t(b % 2));
        h->input.embeds = rnd({2, 3, kC});
        h->input.rows = rows;
        h->layers[0].hidden = rnd({2, 2, kC});
        h->layers[0].rows = rows;
    }
    if (kind == HookKind::Delta || all)
        for (const char* path : {"blocks.0.attn.q_proj", "blocks.1.attn.v_proj", "blocks.1.mlp.fc", "head"}) {
            const Tensor w = model.parameter(std::string(path) + ".weight");
            h->deltas[path] = mul_scalar(rnd(w.shape()), 0.1f);
        }
    return h;
}

// Batch of rows left padded to the longest, real tokens at positions 0..len-1.
ModelInput left_padded(const std::vector<std::vector<int32_t>>& rows) {
    ModelInput in;
    in.B = int64_t(rows.size());
    for (auto& r : rows) in.T = std::max(in.T, int64_t(r.size()));
    const size_t T = size_t(in.T);
    in.tokens.assign(rows.size() * T, 0);
    in.positions.assign(rows.size() * T, 0);
    in.valid.assign(rows.size() * T, 0);
    for (size_t b = 0; b < rows.size(); ++b)
        for (size_t i = 0, start = T - rows[b].size(); i < rows[b].size(); ++i) {
            in.tokens[b * T + start + i] = rows[b][i];
            in.positions[b * T + start + i] = int32_t(i);
            in.valid[b * T + start + i] = 1;
        }
    return in;
}

// The slow oracle: every step re-runs the whole (left padded) batch without a
// cache and takes the argmax at the last column. Each row's prompt is its
// source (ModelInput::source_len), as in a cached generation.
std::vector<std::vector<int32_t>> greedy_by_recompute(GPT& model, const std::vector<std::vector<int32_t>>& prompts,
                                                      int max_new, int32_t stop = -1) {
    NoGradGuard ng;
    auto seqs = prompts;
    std::vector<std::vector<int32_t>> out(prompts.size());
    std::vector<bool> done(prompts.size(), false);
    for (int step = 0; step < max_new; ++step) {
        ModelInput in = left_padded(seqs);
        for (size_t r = 0; r < seqs.size(); ++r)
            in.source_len.push_back(int32_t(in.T - int64_t(seqs[r].size()) + int64_t(prompts[r].size())));
        Tensor logits = model.forward(in);
        const int64_t T = logits.dim(1);
        bool all_done = true;
        for (size_t r = 0; r < seqs.size(); ++r) {
            if (done[r]) continue;
            const float* row = logits.data() + (int64_t(r) * T + T - 1) * kVocab;
            int32_t t = int32_t(std::max_element(row, row + kVocab) - row);
            out[r].push_back(t);
            seqs[r].push_back(t);
            done[r] = t == stop;
            all_done = all_done && done[r];
        }
        if (all_done) break;
    }
    return out;
}

GenerateOptions greedy(int max_new) {
    GenerateOptions o;
    o.max_new_tokens = max_new;
    return o;
}

float max_diff(const Tensor& a, const Tensor& b) {
    REQUIRE(a.shape() == b.shape());
    float m = 0.f;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.data()[i] - b.data()[i]));
    return m;
}

}  // namespace

TEST_CASE("greedy KV-cache generation equals full recomputation, with every kind of hook", "[generate]") {
    auto model = sharp_model(1);
    const int max_new = 8;
    const auto plain = generate(*model, kPrompts, greedy(max_new));
    CHECK(plain == greedy_by_recompute(*model, kPrompts, max_new));
    for (auto& row : plain) CHECK(row.size() == size_t(max_new));
    CHECK(plain[0] != plain[1]);  // continuations depend on the prompt

    for (HookKind kind : {HookKind::Input, HookKind::Hidden, HookKind::KeyValue, HookKind::PerRow, HookKind::Table,
                          HookKind::Delta, HookKind::All}) {
        INFO("hook kind " << int(kind));
        auto hooks = make_hooks(kind, *model, int64_t(kPrompts.size()), 100 + uint64_t(kind));
        model->set_hooks(hooks.get());
        const auto cached = generate(*model, kPrompts, greedy(max_new));
        // Prefixes were requested once, on the prefill call, and entered the cache.
        CHECK(hooks->forwards == max_new);  // prefill + max_new - 1 decode steps
        CHECK(hooks->input_calls == 1);
        CHECK(hooks->layer_calls == 2);
        CHECK_FALSE(hooks->prefix_on_decode);
        if (!hooks->deltas.empty()) CHECK(hooks->decode_delta_calls > 0);  // deltas apply on every step

        const auto recomputed = greedy_by_recompute(*model, kPrompts, max_new);
        CHECK(cached == recomputed);
        CHECK(cached != plain);  // the hook changed the continuations
        model->set_hooks(nullptr);
    }
}

TEST_CASE("cached prefill and decode logits equal full recomputation", "[generate]") {
    auto model = sharp_model(2);
    auto hooks = make_hooks(HookKind::All, *model, 3, 7);
    model->set_hooks(hooks.get());
    auto seqs = kPrompts;
    DecodeBatch batch;
    Tensor logits = prefill(*model, batch, seqs);
    CHECK(logits.shape() == Shape{3, kVocab});
    CHECK(batch.next_position == std::vector<int32_t>{1, 5, 3});
    NoGradGuard ng;
    for (int step = 0; step < 4; ++step) {
        Tensor full = model->forward(left_padded(seqs));
        Tensor last = reshape(slice(full, 1, full.dim(1) - 1, full.dim(1)), {3, kVocab});
        CHECK(max_diff(logits, last) < 1e-4);
        std::vector<int32_t> next = {int32_t(step), int32_t(2 * step + 1), 39};  // any tokens, not just greedy ones
        for (size_t r = 0; r < 3; ++r) seqs[r].push_back(next[r]);
        logits = decode_step(*model, batch, next);
    }
    CHECK(batch.next_position == std::vector<int32_t>{5, 9, 7});
    model->set_hooks(nullptr);
}

TEST_CASE("batched generation equals each prompt generated alone", "[generate]") {
    auto model = sharp_model(3);
    auto hooks = make_hooks(HookKind::Input, *model, 1, 9);  // a shared prefix works for any batch size
    for (ModelHooks* h : {static_cast<ModelHooks*>(nullptr), static_cast<ModelHooks*>(hooks.get())}) {
        model->set_hooks(h);
        const auto batched = generate(*model, kPrompts, greedy(6));
        for (size_t r = 0; r < kPrompts.size(); ++r) CHECK(generate(*model, {kPrompts[r]}, greedy(6))[0] == batched[r]);
    }
    model->set_hooks(nullptr);
}

TEST_CASE("generation stops at the stop token (kept) and after max_new_tokens", "[generate]") {
    auto model = sharp_model(4);
    const auto free_run = generate(*model, kPrompts, greedy(10));
    // Stop at the token row 1 emits third: each row ends at its first occurrence.
    const int32_t stop = free_run[1][2];
    GenerateOptions o = greedy(10);
    o.stop_token = stop;
    const auto stopped = generate(*model, kPrompts, o);
    for (size_t r = 0; r < kPrompts.size(); ++r) {
        auto expected = free_run[r];
        auto it = std::find(expected.begin(), expected.end(), stop);
        if (it != expected.end()) expected.erase(it + 1, expected.end());
        CHECK(stopped[r] == expected);
    }
    CHECK(stopped[1].size() <= 3);
    CHECK(stopped[1].back() == stop);
    CHECK(stopped == greedy_by_recompute(*model, kPrompts, 10, stop));

    // Every row stopping on its first token ends the loop early.
    DecodeBatch batch;
    Tensor first = prefill(*model, batch, {kPrompts[1]});
    o.stop_token = int32_t(std::max_element(first.data(), first.data() + kVocab) - first.data());
    CHECK(generate(*model, {kPrompts[1]}, o) == std::vector<std::vector<int32_t>>{{o.stop_token}});

    CHECK(generate(*model, kPrompts, greedy(0)) == std::vector<std::vector<int32_t>>(3));
    const auto one = generate(*model, kPrompts, greedy(1));
    for (size_t r = 0; r < 3; ++r) CHECK(one[r] == std::vector<int32_t>{free_run[r][0]});
    // Up to max_seq exactly: 5 + 19 = 24.
    CHECK(generate(*model, {kPrompts[1]}, greedy(19))[0].size() == 19);
}

TEST_CASE("seeded sampling is reproducible and per row", "[generate]") {
    auto model = sharp_model(5, 2.f);
    GenerateOptions o = greedy(8);
    o.temperature = 1.5f;
    o.seed = 42;
    const auto a = generate(*model, kPrompts, o);
    CHECK(generate(*model, kPrompts, o) == a);
    o.seed = 43;
    CHECK(generate(*model, kPrompts, o) != a);
    o.seed = 42;
    // Row r draws from its own generator: other rows do not change its tokens.
    CHECK(generate(*model, {kPrompts[0], {11, 11}}, o)[0] == a[0]);

    // top_k = 1 is greedy whatever the temperature.
    o.top_k = 1;
    CHECK(generate(*model, kPrompts, o) == generate(*model, kPrompts, greedy(8)));

    // top_k = 3: every sampled token is among the 3 largest logits of its step.
    o.top_k = 3;
    const auto sampled = generate(*model, kPrompts, o);
    NoGradGuard ng;
    for (size_t r = 0; r < kPrompts.size(); ++r) {
        auto seq = kPrompts[r];
        for (int32_t t : sampled[r]) {
            Tensor logits = model->forward(left_padded({seq}));
            const float* row = logits.data() + (logits.dim(1) - 1) * kVocab;
            int larger = 0;
            for (int64_t v = 0; v < kVocab; ++v) larger += row[v] > row[t];
            CHECK(larger < 3);
            seq.push_back(t);
        }
    }
}

TEST_CASE("sample_token follows softmax(logits / temperature) within the top k", "[generate]") {
    const std::vector<float> logits = {0.f, std::log(3.f), -1.f, 5.f, 5.f};
    Rng rng(1);
    CHECK(sample_token(logits.data(), 5, 0.f, 0, rng) == 3);  // argmax, lower id on ties
    CHECK(rng.state() == Rng(1).state());                     // greedy draws nothing
    auto freq = [&](float temperature, int top_k, int32_t token, const float* l, int64_t V) {
        int hits = 0;
        const int n = 20000;
        for (int i = 0; i < n; ++i) hits += sample_token(l, V, temperature, top_k, rng) == token;
        return double(hits) / n;
    };
    CHECK(freq(1.f, 0, 1, logits.data(), 2) == Approx(0.75).margin(0.015));
    CHECK(freq(2.f, 0, 1, logits.data(), 2) == Approx(std::sqrt(3.0) / (1 + std::sqrt(3.0))).margin(0.015));
    // top_k = 3 of {0, ln3, -1}: ids 1 and 0 (and 2), but with k = 2 never 2.
    CHECK(freq(1.f, 2, 2, logits.data(), 3) == 0.0);
    CHECK(freq(1.f, 2, 1, logits.data(), 3) == Approx(0.75).margin(0.015));
    // Tied logits at the cut: the lower id is kept.
    CHECK(freq(1.f, 1, 3, logits.data(), 5) == 1.0);
    CHECK_THROWS_WITH(sample_token(logits.data(), 5, -1.f, 0, rng), Contains("temperature"));
}

TEST_CASE("continuous batching: append_rows and keep_rows match one batched run", "[generate]") {
    auto model = sharp_model(6);
    // One batch of all three prompts, as the reference.
    DecodeBatch all;
    Tensor ref = prefill(*model, all, kPrompts);
    // Requests arrive one by one: prefill each alone, append to the running batch.
    DecodeBatch running;
    std::vector<Tensor> firsts;
    for (const auto& p : kPrompts) {
        DecodeBatch one;
        firsts.push_back(prefill(*model, one, {p}));
        append_rows(running, one);
    }
    REQUIRE(running.rows() == 3);
    CHECK(running.cache.B == 3);
    CHECK(running.next_position == all.next_position);
    for (size_t r = 0; r < 3; ++r)
        CHECK(max_diff(firsts[r], reshape(slice(ref, 0, int64_t(r), int64_t(r) + 1), {1, kVocab})) < 1e-5);
    std::vector<int32_t> tokens = {4, 8, 15};
    Tensor a = decode_step(*model, all, tokens), b = decode_step(*model, running, tokens);
    CHECK(max_diff(a, b) < 1e-5);

    // Row 0 finishes: keep rows 2 and 1 (reordered).
    keep_rows(running, {2, 1});
    CHECK(running.next_position == std::vector<int32_t>{4, 6});
    Tensor c = decode_step(*model, running, {16, 23});
    Tensor d = decode_step(*model, all, {2, 23, 16});
    CHECK(max_diff(reshape(slice(c, 0, 0, 1), {kVocab}), reshape(slice(d, 0, 2, 3), {kVocab})) < 1e-5);
    CHECK(max_diff(reshape(slice(c, 0, 1, 2), {kVocab}), reshape(slice(d, 0, 1, 2), {kVocab})) < 1e-5);

    // A late request joins a batch whose cache is longer than its own.
    DecodeBatch late;
    Tensor late_first = prefill(*model, late, {{5}});
    append_rows(running, late);
    CHECK(running.next_position == std::vector<int32_t>{5, 7, 1});
    Tensor e = decode_step(*model, running, {1, 2, 3});
    Tensor alone = decode_step(*model, late, {3});
    CHECK(max_diff(reshape(slice(e, 0, 2, 3), {kVocab}), reshape(alone, {kVocab})) < 1e-5);

    keep_rows(running, {});
    CHECK(running.rows() == 0);
    CHECK_THROWS_WITH(decode_step(*model, running, {}), Contains("empty"));
    CHECK_THROWS_WITH(keep_rows(all, {0, 3}), Contains("rows[1] = 3"));
}

TEST_CASE("a copied DecodeBatch decodes on its own: the copy does not share the cache's room", "[generate]") {
    auto model = sharp_model(7);
    DecodeBatch a, ref;
    prefill(*model, a, kPrompts);
    prefill(*model, ref, kPrompts);
    decode_step(*model, a, {1, 2, 3});  // the cache now has free room after its held positions
    decode_step(*model, ref, {1, 2, 3});
    DecodeBatch b = a;
    Tensor from_a = decode_step(*model, a, {4, 5, 6});
    decode_step(*model, b, {7, 8, 9});  // would overwrite a's newest column if they shared buffers
    CHECK(bitwise_equal(from_a, decode_step(*model, ref, {4, 5, 6})));
    CHECK(bitwise_equal(decode_step(*model, a, {10, 11, 12}), decode_step(*model, ref, {10, 11, 12})));
}

TEST_CASE("generate runs in eval mode without recording, and restores the mode", "[generate]") {
    GPTConfig cfg = tiny_config();
    cfg.dropout = 0.3f;
    GPT model(cfg, 7);
    clear_tape();
    REQUIRE(model.training());
    const auto in_train = generate(model, kPrompts, greedy(5));
    CHECK(model.training());
    CHECK(model.blocks[0]->training());
    CHECK(tape_size() == 0);
    model.eval();
    CHECK(generate(model, kPrompts, greedy(5)) == in_train);
    CHECK_FALSE(model.training());
}

TEST_CASE("generate rejects bad prompts and options, naming them", "[generate]") {
    auto model = sharp_model(8);
    const auto opts = greedy(4);
    CHECK_THROWS_WITH(generate(*model, {}, opts), Contains("no prompts"));
    CHECK_THROWS_WITH(generate(*model, {{1}, {}}, opts), Contains("prompt 1 is empty"));
    CHECK_THROWS_WITH(generate(*model, {{1}, {2, kVocab}}, opts),
                      Contains("prompt 1") && Contains("= 40") && Contains("vocabulary"));
    CHECK_THROWS_WITH(generate(*model, {{-3}}, opts), Contains("prompt 0") && Contains("-3"));
    CHECK_THROWS_WITH(generate(*model, {{1}, std::vector<int32_t>(21, 1)}, opts),
                      Contains("prompt 1") && Contains("max_seq"));
    CHECK_THROWS_AS(generate(*model, {{1}, std::vector<int32_t>(21, 1)}, opts), std::invalid_argument);
    auto bad = [&](auto mutate, const char* what) {
        GenerateOptions o = opts;
        mutate(o);
        CHECK_THROWS_WITH(generate(*model, {{1}}, o), Contains(what));
    };
    bad([](GenerateOptions& o) { o.max_new_tokens = -1; }, "max_new_tokens");
    bad([](GenerateOptions& o) { o.temperature = -0.5f; }, "temperature");
    bad([](GenerateOptions& o) { o.temperature = NAN; }, "temperature");
    bad([](GenerateOptions& o) { o.top_k = -2; }, "top_k");
    bad([](GenerateOptions& o) { o.stop_token = kVocab; }, "stop_token");
    bad([](GenerateOptions& o) { o.pad_token = -1; }, "pad_token");

    DecodeBatch batch;
    prefill(*model, batch, kPrompts);
    CHECK_THROWS_WITH(decode_step(*model, batch, {1, 2}), Contains("2 tokens") && Contains("3 rows"));
    CHECK_THROWS_WITH(decode_step(*model, batch, {1, 2, kVocab}), Contains("row 2"));
    CHECK_THROWS_WITH(prefill(*model, batch, {std::vector<int32_t>(25, 1)}), Contains("max_seq"));
}

// ---- forward_at: the LM head at the sampled positions only --------------------------------

namespace {
// Rows of forward(in) [B, T, V] at columns[b] -> [B, V]: the slow path forward_at replaces.
Tensor logits_at(const Tensor& full, const std::vector<int32_t>& columns) {
    const int64_t B = full.dim(0), T = full.dim(1), V = full.dim(2);
    Tensor out = Tensor::zeros({B, V});
    for (int64_t b = 0; b < B; ++b)
        std::copy_n(full.data() + (b * T + columns[size_t(b)]) * V, V, out.data() + b * V);
    return out;
}

// Right padded: real tokens from column 0, padding after.
ModelInput right_padded(const std::vector<std::vector<int32_t>>& rows) {
    ModelInput in = left_padded(rows);
    const size_t T = size_t(in.T);
    std::fill(in.tokens.begin(), in.tokens.end(), 0);
    std::fill(in.positions.begin(), in.positions.end(), 0);
    std::fill(in.valid.begin(), in.valid.end(), uint8_t(0));
    for (size_t b = 0; b < rows.size(); ++b)
        for (size_t i = 0; i < rows[b].size(); ++i) {
            in.tokens[b * T + i] = rows[b][i];
            in.positions[b * T + i] = int32_t(i);
            in.valid[b * T + i] = 1;
        }
    return in;
}

uint64_t head_flops() {
    for (const auto& [name, c] : flops::by_region())
        if (name == "head") return c[0];
    return 0;
}
}  // namespace

TEST_CASE("forward_at gives forward's logits at the chosen columns, with every kind of hook", "[generate][forward_at]") {
    auto model = sharp_model(11);
    NoGradGuard ng;
    const int64_t B = int64_t(kPrompts.size());
    for (int kind = -1; kind <= int(HookKind::All); ++kind) {
        INFO("hook kind " << kind);
        auto hooks = kind < 0 ? nullptr : make_hooks(HookKind(kind), *model, B, 300 + uint64_t(kind));
        model->set_hooks(hooks.get());
        const ModelInput left = left_padded(kPrompts), right = right_padded(kPrompts);
        const std::vector<int32_t> last_left(size_t(B), int32_t(left.T - 1)), last_right = {0, 4, 2},
                                   any = {2, 0, 4};
        CHECK(max_diff(model->forward_at(left, last_left), logits_at(model->forward(left), last_left)) < 1e-5);
        CHECK(max_diff(model->forward_at(right, last_right), logits_at(model->forward(right), last_right)) < 1e-5);
        CHECK(max_diff(model->forward_at(left, any), logits_at(model->forward(left), any)) < 1e-5);
        // With a cache: the same logits, and the same keys and values cached as forward's.
        KVCache at, full;
        Tensor cached = model->forward_at(left, last_left, &at);
        CHECK(max_diff(cached, logits_at(model->forward(left, &full), last_left)) < 1e-5);
        REQUIRE(at.layers.size() == full.layers.size());
        for (size_t l = 0; l < at.layers.size(); ++l) {
            CHECK(at.layers[l].length == full.layers[l].length);
            CHECK(bitwise_equal(at.layers[l].k, full.layers[l].k));
            CHECK(bitwise_equal(at.layers[l].v, full.layers[l].v));
        }
        model->set_hooks(nullptr);
    }
}

TEST_CASE("forward_at runs the final LayerNorm and the head on B positions, not B*T", "[generate][forward_at]") {
    auto model = sharp_model(12);
    NoGradGuard ng;
    const ModelInput in = left_padded(kPrompts);  // B 3, T 5
    flops::reset();
    model->forward(in);
    const uint64_t all = head_flops();
    flops::reset();
    model->forward_at(in, std::vector<int32_t>(3, 4));
    const uint64_t at = head_flops();
    REQUIRE(at > 0);
    CHECK(at * uint64_t(in.T) == all);  // LayerNorm and head cost scale with the rows they see

    // prefill() goes through it: its head region is that of one position per row.
    DecodeBatch batch;
    flops::reset();
    prefill(*model, batch, kPrompts);
    CHECK(head_flops() == at);
}

TEST_CASE("forward_at rejects a wrong column count or a column outside the input", "[generate][forward_at]") {
    auto model = sharp_model(13);
    NoGradGuard ng;
    const ModelInput in = left_padded(kPrompts);
    CHECK_THROWS_WITH(model->forward_at(in, {4, 4}), Contains("2 columns") && Contains("3 rows"));
    CHECK_THROWS_WITH(model->forward_at(in, {4, 5, 4}), Contains("row 1") && Contains("column 5") && Contains("T = 5"));
    CHECK_THROWS_WITH(model->forward_at(in, {-1, 4, 4}), Contains("row 0") && Contains("column -1"));
}

TEST_CASE("every registered method: prefill logits and greedy tokens equal recomputation, batch 1 and padded",
          "[generate][forward_at]") {
    for (const std::string& method : peft::method_names()) {
        DYNAMIC_SECTION(method) {
            auto model = sharp_model(14);
            peft::AdapterOptions o;
            o.n = 2;
            o.init = "random";
            o.seed = 5;
            auto adapter = peft::make_adapter(method, o);
            adapter->activate(*model);
            for (const auto& prompts : {std::vector<std::vector<int32_t>>{kPrompts[1]}, kPrompts}) {
                INFO("rows " << prompts.size());
                DecodeBatch batch;
                Tensor logits = prefill(*model, batch, prompts);
                NoGradGuard ng;
                const ModelInput in = left_padded(prompts);
                const Tensor full = model->forward(in);
                CHECK(max_diff(logits, logits_at(full, std::vector<int32_t>(prompts.size(), int32_t(in.T - 1)))) < 1e-5);
                CHECK(generate(*model, prompts, greedy(5)) == greedy_by_recompute(*model, prompts, 5));
            }
            model->set_hooks(nullptr);
        }
    }
}
