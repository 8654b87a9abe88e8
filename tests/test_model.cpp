// Behaviour of the GPT model: config validation, parameter names and init,
// determinism, padding invariance, hook prefixes (checked against a naive
// double-precision forward), freezing and train/eval.
#include <cmath>
#include <cstring>
#include <map>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "nn/gpt.h"
#include "tests/testing.h"

using namespace peftlab;
using namespace peftlab::testing;
using Catch::Contains;

namespace {

GPTConfig tiny_config(bool tied = false) {
    GPTConfig c = small_gpt(48, 24);
    c.tie_embeddings = tied;
    return c;
}

float max_diff(const Tensor& a, const Tensor& b) {
    REQUIRE(a.shape() == b.shape());
    float m = 0.f;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.data()[i] - b.data()[i]));
    return m;
}

// Returns fixed prefixes, whatever it is told; counts calls and keeps what it was told.
struct FixedHooks : ModelHooks {
    SeqPrefix input;
    std::map<int, LayerPrefix> layers;
    int input_calls = 0;
    std::vector<ForwardInfo> infos;

    SeqPrefix input_prefix(const ForwardInfo& info) override {
        ++input_calls;
        infos.push_back(info);
        return input;
    }
    LayerPrefix layer_prefix(int layer, const ForwardInfo&) override {
        auto it = layers.find(layer);
        return it == layers.end() ? LayerPrefix{} : it->second;
    }
};

// Rows `idx` of row b of a [B, n, C] tensor -> [idx.size(), C].
Tensor pick(const Tensor& t, int64_t b, const std::vector<int>& idx) {
    const int64_t n = t.dim(1), C = t.dim(2);
    Tensor out = Tensor::zeros({int64_t(idx.size()), C});
    for (size_t i = 0; i < idx.size(); ++i)
        std::memcpy(out.data() + int64_t(i) * C, t.data() + (b * n + idx[i]) * C, size_t(C) * sizeof(float));
    return out;
}

// ---- naive reference forward: one row, double precision, plain loops ---------

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

Mat to_mat(const Tensor& t) {  // [n, C]
    Mat m(size_t(t.dim(0)), std::vector<double>(size_t(t.dim(1))));
    for (int64_t i = 0; i < t.dim(0); ++i)
        for (int64_t j = 0; j < t.dim(1); ++j) m[size_t(i)][size_t(j)] = t.data()[i * t.dim(1) + j];
    return m;
}

Mat ref_linear(const Mat& x, const Tensor& w, const Tensor& b) {  // w [out, in]
    const int64_t out = w.dim(0), in = w.dim(1);
    Mat y(x.size(), std::vector<double>(size_t(out)));
    for (size_t i = 0; i < x.size(); ++i)
        for (int64_t o = 0; o < out; ++o) {
            double s = b.defined() ? b.data()[o] : 0.0;
            for (int64_t k = 0; k < in; ++k) s += x[i][size_t(k)] * w.data()[o * in + k];
            y[i][size_t(o)] = s;
        }
    return y;
}

Mat ref_layer_norm(const Mat& x, const LayerNorm& ln) {
    Mat y = x;
    for (auto& row : y) {
        double mu = 0, var = 0;
        for (double v : row) mu += v;
        mu /= double(row.size());
        for (double v : row) var += (v - mu) * (v - mu);
        var /= double(row.size());
        for (size_t j = 0; j < row.size(); ++j)
            row[j] = (row[j] - mu) / std::sqrt(var + 1e-5) * ln.weight.data()[j] + ln.bias.data()[j];
    }
    return y;
}

void add_into(Mat& x, const Mat& y) {
    for (size_t i = 0; i < x.size(); ++i)
        for (size_t j = 0; j < x[i].size(); ++j) x[i][j] += y[i][j];
}

struct RefPrefixes {
    Mat input;                                   // [n0, C] prompt vectors
    std::map<int, Mat> hidden;                   // layer -> [n, C]
    std::map<int, std::pair<Mat, Mat>> kv;       // layer -> keys, values [n, C]
};

// Logits [T][V] of one unpadded row, written from the model's definition:
// prompt vectors without positions, then tokens at positions 0..T-1; each
// layer's prefix keys/values are visible to every query, the rest is causal.
Mat reference_logits(const GPT& m, const std::vector<int32_t>& tokens, const RefPrefixes& p) {
    const GPTConfig& cfg = m.config();
    const size_t C = size_t(cfg.d_model), H = size_t(cfg.n_heads), Dh = C / H;
    Mat x = p.input;
    const size_t n0 = x.size();
    for (size_t t = 0; t < tokens.size(); ++t) {
        std::vector<double> row(C);
        for (size_t c = 0; c < C; ++c)
            row[c] = double(m.wte.weight.data()[size_t(tokens[t]) * C + c]) + m.wpe.weight.data()[t * C + c];
        x.push_back(row);
    }
    const size_t N = x.size();
    for (int l = 0; l < cfg.n_layers; ++l) {
        const Block& blk = *m.blocks[size_t(l)];
        const auto& at = blk.attn;
        Mat h = ref_layer_norm(x, blk.ln1);
        Mat q = ref_linear(h, at.q_proj.weight, at.q_proj.bias);
        Mat k = ref_linear(h, at.k_proj.weight, at.k_proj.bias);
        Mat v = ref_linear(h, at.v_proj.weight, at.v_proj.bias);
        Mat pk, pv;
        if (p.hidden.count(l)) {
            Mat hp = ref_layer_norm(p.hidden.at(l), blk.ln1);
            pk = ref_linear(hp, at.k_proj.weight, at.k_proj.bias);
            pv = ref_linear(hp, at.v_proj.weight, at.v_proj.bias);
        }
        if (p.kv.count(l)) {
            pk.insert(pk.end(), p.kv.at(l).first.begin(), p.kv.at(l).first.end());
            pv.insert(pv.end(), p.kv.at(l).second.begin(), p.kv.at(l).second.end());
        }
        const size_t np = pk.size();
        pk.insert(pk.end(), k.begin(), k.end());
        pv.insert(pv.end(), v.begin(), v.end());
        Mat a(N, std::vector<double>(C, 0.0));
        for (size_t i = 0; i < N; ++i)
            for (size_t hh = 0; hh < H; ++hh) {
                const size_t keys = np + i + 1;
                std::vector<double> s(keys);
                double mx = -1e300, total = 0;
                for (size_t j = 0; j < keys; ++j) {
                    double d = 0;
                    for (size_t e = 0; e < Dh; ++e) d += q[i][hh * Dh + e] * pk[j][hh * Dh + e];
                    s[j] = d / std::sqrt(double(Dh));
                    mx = std::max(mx, s[j]);
                }
                for (auto& e : s) total += (e = std::exp(e - mx));
                for (size_t j = 0; j < keys; ++j)
                    for (size_t e = 0; e < Dh; ++e) a[i][hh * Dh + e] += s[j] / total * pv[j][hh * Dh + e];
            }
        add_into(x, ref_linear(a, at.o_proj.weight, at.o_proj.bias));
        Mat f = ref_linear(ref_layer_norm(x, blk.ln2), blk.mlp.fc.weight, blk.mlp.fc.bias);
        for (auto& row : f)
            for (auto& e : row) e = 0.5 * e * (1 + std::tanh(std::sqrt(2 / M_PI) * (e + 0.044715 * e * e * e)));
        add_into(x, ref_linear(f, blk.mlp.proj.weight, blk.mlp.proj.bias));
    }
    Mat real(x.begin() + long(n0), x.end());
    Mat hf = ref_layer_norm(real, m.ln_f);
    return m.head ? ref_linear(hf, m.head->weight, Tensor()) : ref_linear(hf, m.wte.weight, Tensor());
}

// Largest |logits[0, t, v] - ref[t][v]|.
double ref_diff(const Tensor& logits, const Mat& ref) {
    const int64_t V = logits.dim(2);
    REQUIRE(int64_t(ref.size()) == logits.dim(1));
    double m = 0;
    for (size_t t = 0; t < ref.size(); ++t)
        for (int64_t v = 0; v < V; ++v) m = std::max(m, std::fabs(logits.data()[int64_t(t) * V + v] - ref[t][size_t(v)]));
    return m;
}

}  // namespace

TEST_CASE("GPTConfig rejects bad fields and names them", "[model]") {
    auto expect_bad = [](auto mutate, const char* field) {
        GPTConfig c = tiny_config();
        mutate(c);
        REQUIRE_THROWS_WITH(c.validate(), Contains(field));
        REQUIRE_THROWS_AS(GPT(c, 1), std::invalid_argument);
    };
    expect_bad([](GPTConfig& c) { c.n_heads = 5; }, "n_heads");  // 5 does not divide 32
    expect_bad([](GPTConfig& c) { c.n_heads = 0; }, "n_heads");
    expect_bad([](GPTConfig& c) { c.vocab = 0; }, "vocab");
    expect_bad([](GPTConfig& c) { c.d_model = 0; }, "d_model");
    expect_bad([](GPTConfig& c) { c.n_layers = 0; }, "n_layers");
    expect_bad([](GPTConfig& c) { c.d_ff = -1; }, "d_ff");
    expect_bad([](GPTConfig& c) { c.max_seq = 0; }, "max_seq");
    expect_bad([](GPTConfig& c) { c.dropout = 1.f; }, "dropout");
    expect_bad([](GPTConfig& c) { c.dropout = -0.1f; }, "dropout");
    expect_bad([](GPTConfig& c) { c.dropout = NAN; }, "dropout");
    REQUIRE_NOTHROW(tiny_config().validate());

    // JSON round trip; a missing key is named.
    GPTConfig c = tiny_config(true);
    REQUIRE(GPTConfig::from_json(c.to_json()) == c);
    nlohmann::json j = c.to_json();
    j.erase("d_ff");
    REQUIRE_THROWS_WITH(GPTConfig::from_json(j), Contains("d_ff"));
    j = c.to_json();
    j["n_heads"] = 3;
    REQUIRE_THROWS_WITH(GPTConfig::from_json(j), Contains("n_heads"));
}

TEST_CASE("GPT parameters have PyTorch-style dotted names, shapes and count", "[model]") {
    for (bool tied : {false, true}) {
        GPTConfig cfg = tiny_config(tied);
        GPT model(cfg, 7);
        const int64_t V = cfg.vocab, C = cfg.d_model, F = cfg.d_ff, S = cfg.max_seq, L = cfg.n_layers;
        std::vector<std::pair<std::string, Shape>> expected = {{"wte.weight", {V, C}}, {"wpe.weight", {S, C}}};
        for (int l = 0; l < L; ++l) {
            const std::string b = fmt::format("blocks.{}.", l);
            expected.push_back({b + "ln1.weight", {C}});
            expected.push_back({b + "ln1.bias", {C}});
            for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
                expected.push_back({b + "attn." + proj + ".weight", {C, C}});
                expected.push_back({b + "attn." + proj + ".bias", {C}});
            }
            expected.push_back({b + "ln2.weight", {C}});
            expected.push_back({b + "ln2.bias", {C}});
            expected.push_back({b + "mlp.fc.weight", {F, C}});
            expected.push_back({b + "mlp.fc.bias", {F}});
            expected.push_back({b + "mlp.proj.weight", {C, F}});
            expected.push_back({b + "mlp.proj.bias", {C}});
        }
        expected.push_back({"ln_f.weight", {C}});
        expected.push_back({"ln_f.bias", {C}});
        if (!tied) expected.push_back({"head.weight", {V, C}});

        auto named = model.named_parameters();
        REQUIRE(named.size() == expected.size());
        for (size_t i = 0; i < named.size(); ++i) {
            INFO(expected[i].first);
            CHECK(named[i].first == expected[i].first);
            CHECK(named[i].second.name() == expected[i].first);  // tensors carry their names for errors
            CHECK(named[i].second.shape() == expected[i].second);
            CHECK(named[i].second.requires_grad());
        }
        CHECK((model.head == nullptr) == tied);
        CHECK(model.parameter("blocks.1.attn.q_proj.weight").impl() == model.blocks[1]->attn.q_proj.weight.impl());
        REQUIRE_THROWS_WITH(model.parameter("blocks.9.attn.q_proj.weight"), Contains("blocks.9.attn.q_proj.weight"));
        // Sub-module paths are dotted from the root.
        CHECK(model.blocks[1]->attn.k_proj.path() == "blocks.1.attn.k_proj");
        CHECK(model.blocks[0]->mlp.named_parameters()[0].first == "blocks.0.mlp.fc.weight");

        const int64_t per_block = 2 * (2 * C) + 4 * (C * C + C) + (C * F + F) + (F * C + C);
        const int64_t expected_count = V * C + S * C + L * per_block + 2 * C + (tied ? 0 : V * C);
        CHECK(model.num_params() == expected_count);
        CHECK(model.num_trainable() == expected_count);
    }
}

TEST_CASE("GPT init: std 0.02, residual projections scaled by 1/sqrt(2L), LayerNorm identity", "[model]") {
    GPTConfig cfg = tiny_config();
    cfg.d_model = 64;
    cfg.d_ff = 128;
    GPT model(cfg, 3);
    // Pools matrices by kind so the sample std is within a few percent.
    std::map<std::string, std::vector<float>> pooled;
    for (auto& [name, t] : model.named_parameters()) {
        const auto v = t.to_vector();
        if (t.ndim() == 2) {
            const bool residual = name.find("o_proj") != std::string::npos || name.find("mlp.proj") != std::string::npos;
            auto& p = pooled[residual ? "residual" : "other"];
            p.insert(p.end(), v.begin(), v.end());
        } else if (name.find("ln") != std::string::npos && name.ends_with(".weight")) {
            for (float x : v) REQUIRE(x == 1.f);
        } else {
            for (float x : v) REQUIRE(x == 0.f);  // biases, LayerNorm shifts
        }
    }
    auto stats = [](const std::vector<float>& v) {
        double mu = 0, var = 0;
        for (float x : v) mu += x;
        mu /= double(v.size());
        for (float x : v) var += (x - mu) * (x - mu);
        return std::pair{mu, std::sqrt(var / double(v.size()))};
    };
    auto [mu, sd] = stats(pooled["other"]);
    CHECK(std::fabs(mu) < 1e-3);
    CHECK(sd == Approx(0.02).epsilon(0.03));
    auto [rmu, rsd] = stats(pooled["residual"]);
    CHECK(std::fabs(rmu) < 1e-3);
    CHECK(rsd == Approx(0.02 / std::sqrt(2.0 * cfg.n_layers)).epsilon(0.04));
}

TEST_CASE("GPT: same seed gives bitwise identical weights and logits", "[model]") {
    GPT a(tiny_config(), 11), b(tiny_config(), 11), c(tiny_config(), 12);
    auto pa = a.named_parameters(), pb = b.named_parameters(), pc = c.named_parameters();
    bool any_differs = false;
    for (size_t i = 0; i < pa.size(); ++i) {
        REQUIRE(bitwise_equal(pa[i].second, pb[i].second));
        if (pa[i].second.ndim() == 2) any_differs = any_differs || !bitwise_equal(pa[i].second, pc[i].second);
    }
    CHECK(any_differs);
    Rng rng(5);
    ModelInput in = padded_batch({random_tokens(rng, 9, 48), random_tokens(rng, 4, 48)}, true);
    NoGradGuard ng;
    Tensor la = a.forward(in), lb = b.forward(in);
    CHECK(la.shape() == Shape{2, 9, 48});
    CHECK(bitwise_equal(la, lb));
    CHECK(bitwise_equal(la, a.forward(in)));  // and the same twice
}

TEST_CASE("GPT matches a naive double-precision forward, with and without prefixes", "[model]") {
    for (bool tied : {false, true}) {
        GPT model(tiny_config(tied), 21);
        sharpen(model);
        const int64_t C = 32;
        Rng rng(8);
        const auto tokens = random_tokens(rng, 7, 48);
        NoGradGuard ng;
        FixedHooks hooks;
        model.set_hooks(&hooks);

        Tensor base = model.forward(single_row(tokens));
        CHECK(ref_diff(base, reference_logits(model, tokens, {})) < 1e-4);

        // Prompt vectors: no positions, real tokens keep 0..T-1.
        hooks.input.embeds = Tensor::normal({3, C}, rng, 0.f, 0.5f);
        RefPrefixes rp;
        rp.input = to_mat(hooks.input.embeds);
        Tensor prompted = model.forward(single_row(tokens));
        CHECK(prompted.shape() == base.shape());  // prompt vectors are not in the output
        CHECK(ref_diff(prompted, reference_logits(model, tokens, rp)) < 1e-4);
        CHECK(max_diff(prompted, base) > 1e-2);  // the prefix matters
        CHECK(hooks.input_calls == 2);
        CHECK(hooks.infos.back().B == 1);
        CHECK(hooks.infos.back().T == 7);
        CHECK(hooks.infos.back().prefill);

        // Hidden-state prefix at layer 1, key/value prefix at layer 0, both
        // at layer 0, on top of the prompt vectors.
        hooks.layers[1].hidden = Tensor::normal({2, C}, rng, 0.f, 1.f);
        hooks.layers[0].hidden = Tensor::normal({1, C}, rng, 0.f, 1.f);
        hooks.layers[0].key = Tensor::normal({4, C}, rng, 0.f, 1.f);
        hooks.layers[0].value = Tensor::normal({4, C}, rng, 0.f, 1.f);
        rp.hidden[1] = to_mat(hooks.layers[1].hidden);
        rp.hidden[0] = to_mat(hooks.layers[0].hidden);
        rp.kv[0] = {to_mat(hooks.layers[0].key), to_mat(hooks.layers[0].value)};
        Tensor all = model.forward(single_row(tokens));
        CHECK(ref_diff(all, reference_logits(model, tokens, rp)) < 1e-4);
        CHECK(max_diff(all, prompted) > 1e-2);

        hooks.input = {};
        rp.input.clear();
        CHECK(ref_diff(model.forward(single_row(tokens)), reference_logits(model, tokens, rp)) < 1e-4);
        model.set_hooks(nullptr);
    }
}

TEST_CASE("GPT: logits at position t ignore later tokens (causality)", "[model]") {
    GPT model(tiny_config(), 4);
    sharpen(model);
    Rng rng(1);
    auto tokens = random_tokens(rng, 8, 48);
    NoGradGuard ng;
    Tensor a = model.forward(single_row(tokens));
    tokens[5] = (tokens[5] + 1) % 48;
    Tensor b = model.forward(single_row(tokens));
    CHECK(max_diff_rows(a, 0, 0, b, 0, 0, 5) == 0.f);
    CHECK(max_diff_rows(a, 0, 5, b, 0, 5, 3) > 1e-2);
}

TEST_CASE("GPT: padding on the right or left leaves real positions unchanged", "[model]") {
    GPT model(tiny_config(), 9);
    sharpen(model);
    Rng rng(2);
    std::vector<std::vector<int32_t>> rows = {random_tokens(rng, 6, 48), random_tokens(rng, 3, 48),
                                              random_tokens(rng, 1, 48)};
    NoGradGuard ng;
    std::vector<Tensor> alone;
    for (auto& r : rows) alone.push_back(model.forward(single_row(r)));
    for (bool left : {false, true}) {
        INFO((left ? "left" : "right") << " padding");
        ModelInput in = padded_batch(rows, left, /*extra=*/2);
        Tensor batched = model.forward(in);
        for (size_t b = 0; b < rows.size(); ++b) {
            const int64_t len = int64_t(rows[b].size());
            const int64_t start = left ? in.T - len : 0;
            CHECK(max_diff_rows(batched, int64_t(b), start, alone[b], 0, 0, len) < 1e-5);
        }
        for (float x : batched.to_vector()) REQUIRE(std::isfinite(x));  // padding rows too
    }
}

TEST_CASE("GPT: an empty prefix or no hook gives exactly the base logits", "[model]") {
    GPT model(tiny_config(), 5);
    sharpen(model);
    Rng rng(3);
    ModelInput in = padded_batch({random_tokens(rng, 5, 48), random_tokens(rng, 2, 48)}, true);
    NoGradGuard ng;
    Tensor base = model.forward(in);
    FixedHooks hooks;
    model.set_hooks(&hooks);
    CHECK(bitwise_equal(model.forward(in), base));  // hooks that return nothing
    hooks.input.embeds = Tensor::zeros({0, 32});
    hooks.layers[0].hidden = Tensor::zeros({0, 32});
    hooks.layers[1].key = Tensor::zeros({2, 0, 32});
    hooks.layers[1].value = Tensor::zeros({2, 0, 32});
    CHECK(bitwise_equal(model.forward(in), base));
    model.set_hooks(nullptr);
    CHECK(bitwise_equal(model.forward(in), base));
}

TEST_CASE("GPT: a hidden-state prefix equals the key/value prefix computed from it", "[model]") {
    GPT model(tiny_config(), 6);
    sharpen(model);
    Rng rng(4);
    ModelInput in = padded_batch({random_tokens(rng, 5, 48), random_tokens(rng, 3, 48)}, true);
    NoGradGuard ng;
    const int layer = 1;
    const Block& blk = *model.blocks[layer];
    Tensor hidden = Tensor::normal({3, 32}, rng, 0.f, 1.f);
    FixedHooks hooks;
    model.set_hooks(&hooks);
    hooks.layers[layer].hidden = hidden;
    Tensor via_hidden = model.forward(in);

    Tensor h = layer_norm(hidden, blk.ln1.weight, blk.ln1.bias);
    hooks.layers[layer] = LayerPrefix{};
    hooks.layers[layer].key = linear(h, blk.attn.k_proj.weight, blk.attn.k_proj.bias);
    hooks.layers[layer].value = linear(h, blk.attn.v_proj.weight, blk.attn.v_proj.bias);
    Tensor via_kv = model.forward(in);
    CHECK(max_diff(via_hidden, via_kv) < 1e-6);
    model.set_hooks(nullptr);
    CHECK(max_diff(via_hidden, model.forward(in)) > 1e-2);
}

TEST_CASE("GPT: per-row prefixes equal each row run alone with its own prefix", "[model]") {
    GPT model(tiny_config(), 10);
    sharpen(model);
    Rng rng(6);
    const int64_t B = 3, n = 3, C = 32;
    std::vector<std::vector<int32_t>> rows = {random_tokens(rng, 5, 48), random_tokens(rng, 4, 48),
                                              random_tokens(rng, 5, 48)};
    // Row 0 uses all its vectors, row 1 its first and last, row 2 none.
    const std::vector<std::vector<int>> used = {{0, 1, 2}, {0, 2}, {}};
    Tensor valid = Tensor::zeros({B, n});
    for (int64_t b = 0; b < B; ++b)
        for (int i : used[size_t(b)]) valid.data()[b * n + i] = 1.f;
    ModelInput in = padded_batch(rows, true);
    NoGradGuard ng;

    enum Kind { Input, Hidden, KeyValue };
    for (Kind kind : {Input, Hidden, KeyValue}) {
        INFO("prefix kind " << int(kind));
        Tensor e1 = Tensor::normal({B, n, C}, rng, 0.f, 1.f), e2 = Tensor::normal({B, n, C}, rng, 0.f, 1.f);
        auto set = [&](FixedHooks& h, const Tensor& a, const Tensor& b, const Tensor& v) {
            if (kind == Input) {
                h.input.embeds = a;
                h.input.valid = v;
            } else if (kind == Hidden) {
                h.layers[0].hidden = a;
                h.layers[0].hidden_valid = v;
            } else {
                h.layers[1].key = a;
                h.layers[1].value = b;
                h.layers[1].kv_valid = v;
            }
        };
        FixedHooks hooks;
        set(hooks, e1, e2, valid);
        model.set_hooks(&hooks);
        Tensor batched = model.forward(in);
        for (int64_t b = 0; b < B; ++b) {
            FixedHooks own;
            if (!used[size_t(b)].empty())
                set(own, pick(e1, b, used[size_t(b)]), pick(e2, b, used[size_t(b)]), Tensor());
            model.set_hooks(&own);  // row 2: a hook with no prefix, i.e. the base model
            Tensor alone = model.forward(single_row(rows[size_t(b)]));
            const int64_t len = int64_t(rows[size_t(b)].size());
            CHECK(max_diff_rows(batched, b, in.T - len, alone, 0, 0, len) < 1e-5);
            if (b == 0) {
                model.set_hooks(nullptr);
                CHECK(max_diff_rows(batched, b, in.T - len, model.forward(single_row(rows[0])), 0, 0, len) > 1e-2);
            }
        }
        model.set_hooks(nullptr);
    }
}

TEST_CASE("GPT: freeze and unfreeze per subtree; gradients reach only trainable parameters", "[model]") {
    GPT model(tiny_config(), 12);
    const int64_t total = model.num_params();
    model.blocks[0]->freeze();
    for (auto& [name, t] : model.named_parameters()) {
        INFO(name);
        CHECK(t.requires_grad() == !name.starts_with("blocks.0."));
    }
    CHECK(model.num_trainable() == total - model.blocks[0]->num_params());
    CHECK(model.trainable_parameters().size() == model.parameters().size() - model.blocks[0]->parameters().size());

    model.freeze();
    CHECK(model.num_trainable() == 0);
    model.blocks[1]->attn.unfreeze();
    CHECK(model.num_trainable() == model.blocks[1]->attn.num_params());

    Rng rng(1);
    ModelInput in = single_row(random_tokens(rng, 6, 48));
    std::vector<int32_t> targets = random_tokens(rng, 6, 48);
    Tensor loss = lm_loss(model.forward(in), targets);
    backward(loss);
    for (auto& [name, t] : model.named_parameters()) {
        INFO(name);
        if (name.starts_with("blocks.1.attn.")) {
            CHECK(t.has_grad());
        } else {
            CHECK_FALSE(t.requires_grad());
            CHECK_FALSE(t.has_grad());
        }
    }
    // Nothing trainable: the loss cannot be differentiated, and says so.
    model.freeze();
    Tensor frozen_loss = lm_loss(model.forward(in), targets);
    CHECK_FALSE(frozen_loss.requires_grad());
    CHECK_THROWS_AS(backward(frozen_loss), std::exception);
    clear_tape();
    model.unfreeze();
    CHECK(model.num_trainable() == total);
}

TEST_CASE("GPT: dropout only in training mode", "[model]") {
    GPTConfig cfg = tiny_config();
    cfg.dropout = 0.2f;
    GPT model(cfg, 13);
    GPT no_dropout(tiny_config(), 13);  // dropout does not change the init
    Rng rng(2);
    ModelInput in = single_row(random_tokens(rng, 6, 48));
    NoGradGuard ng;
    REQUIRE(model.training());
    Tensor t1 = model.forward(in), t2 = model.forward(in);
    CHECK(max_diff(t1, t2) > 1e-4);  // a fresh mask each call

    model.eval();
    CHECK_FALSE(model.training());
    CHECK_FALSE(model.blocks[1]->mlp.training());  // the mode reaches every submodule
    Tensor e1 = model.forward(in);
    CHECK(bitwise_equal(e1, model.forward(in)));
    CHECK(bitwise_equal(e1, no_dropout.forward(in)));
    CHECK(max_diff(e1, t1) > 1e-4);

    model.train();
    CHECK(model.blocks[0]->attn.training());
    // With dropout 0, training mode changes nothing.
    CHECK(bitwise_equal(no_dropout.forward(in), e1));
}

TEST_CASE("GPT::forward rejects bad input and caches of the wrong batch size", "[model]") {
    GPT model(tiny_config(), 14);
    NoGradGuard ng;
    ModelInput in = single_row({1, 2, 48});
    REQUIRE_THROWS_WITH(model.forward(in), Contains("48") && Contains("vocabulary"));
    in = single_row({1, 2, 3});
    in.positions = {0, 1, 24};
    REQUIRE_THROWS_WITH(model.forward(in), Contains("max_seq"));
    KVCache cache;
    model.forward(padded_batch({{1, 2}, {3}}, true), &cache);
    REQUIRE_THROWS_WITH(model.forward(single_row({4}), &cache), Contains("cache holds 2 rows"));
}

TEST_CASE("GPT: malformed hook prefixes raise errors naming the layer and shapes", "[model]") {
    GPT model(tiny_config(), 15);
    Rng rng(7);
    ModelInput in = padded_batch({random_tokens(rng, 4, 48), random_tokens(rng, 2, 48)}, true);
    NoGradGuard ng;
    FixedHooks hooks;
    model.set_hooks(&hooks);
    hooks.layers[1].key = Tensor::zeros({2, 32});  // no value
    CHECK_THROWS_WITH(model.forward(in), Contains("layer 1") && Contains("value"));
    hooks.layers[1].value = Tensor::zeros({3, 32});  // shape differs from key
    CHECK_THROWS_WITH(model.forward(in), Contains("layer 1") && Contains("[2, 32]") && Contains("[3, 32]"));
    hooks.layers[1] = LayerPrefix{};
    hooks.layers[1].value = Tensor::zeros({2, 32});  // value without key
    CHECK_THROWS_WITH(model.forward(in), Contains("layer 1") && Contains("key"));
    hooks.layers[1] = LayerPrefix{};
    hooks.layers[0].key = Tensor::zeros({3, 2, 32});  // 3 rows for a batch of 2
    hooks.layers[0].value = Tensor::zeros({3, 2, 32});
    CHECK_THROWS_AS(model.forward(in), std::invalid_argument);
    hooks.layers.clear();
    hooks.input.embeds = Tensor::zeros({2, 31});  // wrong width
    CHECK_THROWS_AS(model.forward(in), std::invalid_argument);
    hooks.input.embeds = Tensor::zeros({2, 32});
    hooks.input.valid = Tensor::ones({2, 3});  // validity for 3 vectors, 2 given
    CHECK_THROWS_AS(model.forward(in), std::invalid_argument);
    model.set_hooks(nullptr);
}

namespace {
// A delta on one Linear: [out] (a bias delta) or the same values on every row [..., out].
struct BiasDelta : ModelHooks {
    std::string target;
    Tensor d;          // [out]
    bool rows = false;  // give it as [..., out] instead
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) override {
        if (path != target) return Tensor();
        if (!rows) return d;
        Shape shape = x.shape();
        shape.back() = d.dim(0);
        return add(Tensor::zeros(shape), d);  // [..., out], each row d
    }
};
}  // namespace

TEST_CASE("a Linear's bias delta [out] from linear_delta acts as the delta on every row; a wrong length names the Linear",
          "[model]") {
    Rng rng(5);
    const GPTConfig cfg = small_gpt(/*vocab=*/40, /*max_seq=*/16);
    ModelInput in;
    in.B = 2;
    in.T = 8;
    in.tokens = random_tokens(rng, in.B * in.T, cfg.vocab);
    const std::vector<int32_t> targets = random_tokens(rng, in.B * in.T, cfg.vocab);
    for (const std::string target : {"blocks.1.attn.v_proj", "blocks.0.mlp.fc"}) {
        INFO(target);
        GPT model(cfg, 3);
        const int64_t out = model.parameter(target + ".weight").dim(0);
        std::vector<float> loss(2);
        std::vector<Tensor> grad(2);
        for (int rows = 0; rows < 2; ++rows) {
            BiasDelta h;
            h.target = target;
            h.rows = rows == 1;
            Rng same(9);  // the same delta both ways
            h.d = Tensor::normal({out}, same, 0.f, 0.5f).set_requires_grad(true);
            model.set_hooks(&h);
            clear_tape();
            Tensor l = model.loss(in, targets);
            backward(l);
            loss[size_t(rows)] = l.item();
            grad[size_t(rows)] = h.d.grad().clone();
            model.set_hooks(nullptr);
        }
        CHECK(std::fabs(loss[0] - loss[1]) < 1e-5f * std::fabs(loss[1]));
        float worst = 0.f, scale = 0.f;
        for (int64_t j = 0; j < out; ++j) {
            worst = std::max(worst, std::fabs(grad[0].data()[j] - grad[1].data()[j]));
            scale = std::max(scale, std::fabs(grad[1].data()[j]));
        }
        CHECK(scale > 0.f);
        CHECK(worst <= 1e-4f * scale);
    }
    GPT model(cfg, 3);
    BiasDelta wrong;
    wrong.target = "blocks.0.attn.q_proj";
    wrong.d = Tensor::zeros({cfg.d_model + 1});
    model.set_hooks(&wrong);
    CHECK_THROWS_WITH(model.loss(in, targets), Contains("linear_delta (blocks.0.attn.q_proj): a bias delta must be [" +
                                                        std::to_string(cfg.d_model) + "]"));
    model.set_hooks(nullptr);
}
