#include "nn/gguf.h"

#include <bit>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/half.h"
#include "nn/atomic_file.h"

namespace peftlab {
namespace {

static_assert(std::endian::native == std::endian::little, "GGUF is written little-endian from host memory");

// gguf_type (ggml's gguf.h).
enum : uint32_t {
    kU32 = 4,
    kI32 = 5,
    kF32 = 6,
    kBool = 7,
    kString = 8,
    kArray = 9,
};

template <class T>
void put(std::string& out, T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

void put_string(std::string& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    out.append(s);
}

uint64_t pad_to(uint64_t n, uint64_t align) { return (n + align - 1) / align * align; }

}  // namespace

void GgufWriter::begin_key(const std::string& key, uint32_t type) {
    if (key.empty()) throw std::invalid_argument("GgufWriter: empty metadata key");
    if (key.size() > 65535) throw std::invalid_argument(fmt::format("GgufWriter: key '{}...' is over 65535 bytes", key.substr(0, 40)));
    for (const std::string& k : keys_)
        if (k == key) throw std::invalid_argument(fmt::format("GgufWriter: duplicate metadata key '{}'", key));
    keys_.push_back(key);
    put_string(kv_, key);
    put<uint32_t>(kv_, type);
    ++n_kv_;
}

void GgufWriter::set_u32(const std::string& key, uint32_t v) {
    if (key == "general.alignment") {
        if (v == 0 || (v & (v - 1)) != 0 || v % 8 != 0)
            throw std::invalid_argument(fmt::format("GgufWriter: general.alignment {} is not a power of two >= 8", v));
        alignment_ = v;
    }
    begin_key(key, kU32);
    put<uint32_t>(kv_, v);
}
void GgufWriter::set_i32(const std::string& key, int32_t v) {
    begin_key(key, kI32);
    put<int32_t>(kv_, v);
}
void GgufWriter::set_f32(const std::string& key, float v) {
    begin_key(key, kF32);
    put<float>(kv_, v);
}
void GgufWriter::set_bool(const std::string& key, bool v) {
    begin_key(key, kBool);
    put<uint8_t>(kv_, v ? 1 : 0);
}
void GgufWriter::set_string(const std::string& key, const std::string& v) {
    begin_key(key, kString);
    put_string(kv_, v);
}
void GgufWriter::set_strings(const std::string& key, const std::vector<std::string>& v) {
    begin_key(key, kArray);
    put<uint32_t>(kv_, kString);
    put<uint64_t>(kv_, v.size());
    for (const std::string& s : v) put_string(kv_, s);
}
void GgufWriter::set_i32s(const std::string& key, const std::vector<int32_t>& v) {
    begin_key(key, kArray);
    put<uint32_t>(kv_, kI32);
    put<uint64_t>(kv_, v.size());
    kv_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(int32_t));
}

void GgufWriter::add_tensor(const std::string& name, std::vector<int64_t> shape, GgmlType type, const float* data) {
    if (!data) throw std::invalid_argument(fmt::format("GgufWriter: tensor '{}': data is null", name));
    add(name, std::move(shape), type, data, nullptr);
}

void GgufWriter::add_tensor(const std::string& name, std::vector<int64_t> shape, GgmlType type,
                            std::function<void(float*)> fill) {
    if (!fill) throw std::invalid_argument(fmt::format("GgufWriter: tensor '{}': no fill function", name));
    add(name, std::move(shape), type, nullptr, std::move(fill));
}

void GgufWriter::add(const std::string& name, std::vector<int64_t> shape, GgmlType type, const float* data,
                     std::function<void(float*)> fill) {
    if (name.empty()) throw std::invalid_argument("GgufWriter: empty tensor name");
    if (name.size() > 64)  // GGML_MAX_NAME: the spec caps tensor names at 64 bytes
        throw std::invalid_argument(fmt::format("GgufWriter: tensor name '{}' is over 64 bytes", name));
    if (shape.empty() || shape.size() > 4)
        throw std::invalid_argument(fmt::format("GgufWriter: tensor '{}': {} dimensions (ggml holds 1 to 4)", name,
                                                shape.size()));
    for (int64_t d : shape)
        if (d < 1)
            throw std::invalid_argument(fmt::format("GgufWriter: tensor '{}': dimension {} < 1", name, d));
    for (const Tensor& t : tensors_)
        if (t.name == name) throw std::invalid_argument(fmt::format("GgufWriter: duplicate tensor name '{}'", name));
    tensors_.push_back({name, std::move(shape), type, data, std::move(fill)});
}

void GgufWriter::write(const std::string& path) const {
    std::string head;
    head.append("GGUF", 4);
    put<uint32_t>(head, 3);
    put<uint64_t>(head, tensors_.size());
    put<uint64_t>(head, n_kv_);
    head.append(kv_);
    std::vector<uint64_t> bytes;
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
        put_string(head, t.name);
        put<uint32_t>(head, uint32_t(t.shape.size()));
        for (size_t i = t.shape.size(); i-- > 0;) put<uint64_t>(head, uint64_t(t.shape[i]));  // ne[0] innermost
        put<uint32_t>(head, uint32_t(t.type));
        put<uint64_t>(head, offset);
        uint64_t n = 1;
        for (int64_t d : t.shape) n *= uint64_t(d);
        bytes.push_back(n);
        offset = pad_to(offset + n * (t.type == GgmlType::F32 ? 4 : 2), alignment_);
    }
    head.append(pad_to(head.size(), alignment_) - head.size(), '\0');

    AtomicFile f("save_gguf", path);
    f.write(head.data(), head.size());
    const std::string zeros(alignment_, '\0');
    std::vector<float> scratch;
    std::vector<uint16_t> half;
    for (size_t i = 0; i < tensors_.size(); ++i) {
        const Tensor& t = tensors_[i];
        const float* src = t.data;
        if (!src) {
            scratch.assign(bytes[i], 0.f);
            t.fill(scratch.data());
            src = scratch.data();
        }
        size_t n_bytes;
        if (t.type == GgmlType::F32) {
            n_bytes = bytes[i] * sizeof(float);
            f.write(src, n_bytes);
        } else {
            // An element F16 cannot hold would be written as infinity (or NaN):
            // refused, naming it, before the file is committed.
            if (const int64_t j = first_outside_half(src, int64_t(bytes[i])); uint64_t(j) < bytes[i])
                throw std::invalid_argument(fmt::format(
                    "save_gguf: '{}': tensor '{}' element {} = {} is outside F16's range (|x| < 65520): write F32",
                    path, t.name, j, src[j]));
            half.resize(bytes[i]);
            for (uint64_t j = 0; j < bytes[i]; ++j) half[j] = float_to_half(src[j]);
            n_bytes = bytes[i] * sizeof(uint16_t);
            f.write(half.data(), n_bytes);
        }
        f.write(zeros.data(), pad_to(n_bytes, alignment_) - n_bytes);
    }
    f.commit();
}

void save_gguf_gpt2(const GPT& model, const std::string& path, const GgufVocab& vocab, const GgufGpt2Options& opts) {
    const GPTConfig& c = model.config();
    const auto bad = [&](const std::string& what) {
        return std::invalid_argument(fmt::format("save_gguf_gpt2: '{}': {}", path, what));
    };
    if (c.activation != "gelu_new")
        throw bad(fmt::format("activation '{}' cannot be exported: llama.cpp's gpt2 graph uses the tanh GELU "
                              "(\"gelu_new\")",
                              c.activation));
    if (int64_t(vocab.tokens.size()) > c.vocab)
        throw bad(fmt::format("the tokenizer has {} tokens, more than the model's vocab {}", vocab.tokens.size(),
                              c.vocab));
    if (vocab.token_type.size() != vocab.tokens.size())
        throw bad(fmt::format("{} token types for {} tokens", vocab.token_type.size(), vocab.tokens.size()));
    for (const auto& [what, id] : {std::pair{"bos", vocab.bos}, std::pair{"eos", vocab.eos}})
        if (id && (*id < 0 || *id >= c.vocab)) throw bad(fmt::format("{} id {} outside the vocab [0, {})", what, *id, c.vocab));

    const GgmlType wtype = opts.type;  // 2-D weights; 1-D tensors stay F32 as llama.cpp's converter keeps them
    GgufWriter w;
    w.set_string("general.architecture", "gpt2");
    w.set_string("general.name", opts.name);
    w.set_u32("general.file_type", wtype == GgmlType::F32 ? 0 : 1);  // llama_ftype: ALL_F32, MOSTLY_F16
    w.set_u32("general.alignment", 32);
    w.set_u32("gpt2.context_length", uint32_t(c.max_seq));
    w.set_u32("gpt2.embedding_length", uint32_t(c.d_model));
    w.set_u32("gpt2.feed_forward_length", uint32_t(c.d_ff));
    w.set_u32("gpt2.block_count", uint32_t(c.n_layers));
    w.set_u32("gpt2.attention.head_count", uint32_t(c.n_heads));
    w.set_f32("gpt2.attention.layer_norm_epsilon", c.ln_eps);
    w.set_u32("gpt2.vocab_size", uint32_t(c.vocab));
    if (vocab.tokens.empty()) {
        w.set_string("tokenizer.ggml.model", "no_vocab");
    } else {
        std::vector<std::string> tokens = vocab.tokens;
        std::vector<int32_t> types = vocab.token_type;
        for (int64_t i = int64_t(tokens.size()); i < c.vocab; ++i) {
            tokens.push_back(fmt::format("[PAD{}]", i));
            types.push_back(kGgufTokenUnused);
        }
        w.set_string("tokenizer.ggml.model", vocab.model);
        if (!vocab.pre.empty()) w.set_string("tokenizer.ggml.pre", vocab.pre);
        w.set_strings("tokenizer.ggml.tokens", tokens);
        w.set_i32s("tokenizer.ggml.token_type", types);
        w.set_strings("tokenizer.ggml.merges", vocab.merges);
        if (vocab.bos) w.set_u32("tokenizer.ggml.bos_token_id", uint32_t(*vocab.bos));
        if (vocab.eos) w.set_u32("tokenizer.ggml.eos_token_id", uint32_t(*vocab.eos));
    }

    const auto vec = [&](const std::string& name, const Tensor& t) {
        if (!t.defined()) throw bad(fmt::format("'{}' has no tensor (a Linear without bias?)", name));
        w.add_tensor(name, t.shape(), GgmlType::F32, t.data());
    };
    const auto mat = [&](const std::string& name, const Tensor& t) { w.add_tensor(name, t.shape(), wtype, t.data()); };
    const int64_t C = c.d_model;
    mat("token_embd.weight", model.wte.weight);
    mat("position_embd.weight", model.wpe.weight);
    for (int l = 0; l < c.n_layers; ++l) {
        const Block& b = *model.blocks[size_t(l)];
        const std::string p = fmt::format("blk.{}.", l);
        vec(p + "attn_norm.weight", b.ln1.weight);
        vec(p + "attn_norm.bias", b.ln1.bias);
        // Fused QKV: rows [0, C) q, [C, 2C) k, [2C, 3C) v, as llama.cpp's gpt2 graph splits them.
        const Linear* qkv[3] = {&b.attn.q_proj, &b.attn.k_proj, &b.attn.v_proj};
        for (const Linear* lin : qkv)
            if (!lin->bias.defined()) throw bad(fmt::format("layer {}: q/k/v projection without bias", l));
        w.add_tensor(p + "attn_qkv.weight", {3 * C, C}, wtype, [qkv, C](float* dst) {
            for (int i = 0; i < 3; ++i) std::memcpy(dst + i * C * C, qkv[i]->weight.data(), size_t(C * C) * sizeof(float));
        });
        w.add_tensor(p + "attn_qkv.bias", {3 * C}, GgmlType::F32, [qkv, C](float* dst) {
            for (int i = 0; i < 3; ++i) std::memcpy(dst + i * C, qkv[i]->bias.data(), size_t(C) * sizeof(float));
        });
        mat(p + "attn_output.weight", b.attn.o_proj.weight);
        vec(p + "attn_output.bias", b.attn.o_proj.bias);
        vec(p + "ffn_norm.weight", b.ln2.weight);
        vec(p + "ffn_norm.bias", b.ln2.bias);
        mat(p + "ffn_up.weight", b.mlp.fc.weight);
        vec(p + "ffn_up.bias", b.mlp.fc.bias);
        mat(p + "ffn_down.weight", b.mlp.proj.weight);
        vec(p + "ffn_down.bias", b.mlp.proj.bias);
    }
    vec("output_norm.weight", model.ln_f.weight);
    vec("output_norm.bias", model.ln_f.bias);
    if (model.head) mat("output.weight", model.head->weight);
    w.write(path);
}

std::string gguf_gpt2_linear_name(int layer, const std::string& linear) {
    const char* t = linear == "attn.q_proj" || linear == "attn.k_proj" || linear == "attn.v_proj" ? "attn_qkv"
                    : linear == "attn.o_proj"                                                   ? "attn_output"
                    : linear == "mlp.fc"                                                        ? "ffn_up"
                    : linear == "mlp.proj"                                                      ? "ffn_down"
                                                                                                : nullptr;
    if (!t)
        throw std::invalid_argument(fmt::format("gguf_gpt2_linear_name: '{}' is none of a block's Linears "
                                                "(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc, mlp.proj)",
                                                linear));
    return fmt::format("blk.{}.{}.weight", layer, t);
}

void save_gguf_lora(const std::string& path, const GPTConfig& c, const GgufLora& lora, const std::string& name) {
    const auto bad = [&](const std::string& what) {
        return std::invalid_argument(fmt::format("save_gguf_lora: '{}': {}", path, what));
    };
    if (lora.pairs.empty()) throw bad("the adapter has no LoRA pairs");
    // The [out, in] shape of every 2-D gpt2 tensor a LoRA can adapt.
    const int64_t C = c.d_model, F = c.d_ff;
    const auto base_shape = [&](const std::string& t) -> std::optional<std::pair<int64_t, int64_t>> {
        int layer = -1, used = 0;
        char rest[32] = {};
        if (std::sscanf(t.c_str(), "blk.%d.%31[a-z_.]%n", &layer, rest, &used) != 2 || size_t(used) != t.size() ||
            layer < 0 || layer >= c.n_layers)
            return std::nullopt;
        const std::string r = rest;
        if (r == "attn_qkv.weight") return std::pair{3 * C, C};
        if (r == "attn_output.weight") return std::pair{C, C};
        if (r == "ffn_up.weight") return std::pair{F, C};
        if (r == "ffn_down.weight") return std::pair{C, F};
        return std::nullopt;
    };
    std::vector<std::string> seen;
    bool one_alpha = true;
    const float alpha0 = lora.pairs[0].scale * float(lora.pairs[0].A.dim(0));
    for (const GgufLoraPair& p : lora.pairs) {
        const auto shape = base_shape(p.base_tensor);
        if (!shape) throw bad(fmt::format("'{}' is no 2-D tensor of a {}-layer gpt2", p.base_tensor, c.n_layers));
        for (const std::string& s : seen)
            if (s == p.base_tensor) throw bad(fmt::format("'{}' adapted twice", p.base_tensor));
        seen.push_back(p.base_tensor);
        if (p.A.ndim() != 2 || p.B.ndim() != 2 || p.A.dim(0) != p.B.dim(1) || p.A.dim(1) != shape->second ||
            p.B.dim(0) != shape->first)
            throw bad(fmt::format("'{}' [{}, {}]: A {} and B {} do not fit (want A [r, {}], B [{}, r])", p.base_tensor,
                                  shape->first, shape->second, shape_str(p.A.shape()), shape_str(p.B.shape()),
                                  shape->second, shape->first));
        one_alpha = one_alpha && p.scale * float(p.A.dim(0)) == alpha0;
    }
    GgufWriter w;
    w.set_string("general.architecture", "gpt2");
    w.set_string("general.type", "adapter");
    w.set_string("general.name", name);
    w.set_u32("general.alignment", 32);
    w.set_string("adapter.type", "lora");  // method-names: the GGUF format's adapter.type value, not a peftlab method
    w.set_f32("adapter.lora.alpha", one_alpha ? alpha0 : 0.f);
    for (const GgufLoraPair& p : lora.pairs) {
        w.add_tensor(p.base_tensor + ".lora_a", p.A.shape(), GgmlType::F32, p.A.data());
        if (one_alpha) {
            w.add_tensor(p.base_tensor + ".lora_b", p.B.shape(), GgmlType::F32, p.B.data());
        } else {
            const float* b = p.B.data();
            const int64_t n = p.B.numel();
            const float scale = p.scale;
            w.add_tensor(p.base_tensor + ".lora_b", p.B.shape(), GgmlType::F32, [b, n, scale](float* dst) {
                for (int64_t i = 0; i < n; ++i) dst[i] = b[i] * scale;
            });
        }
    }
    w.write(path);
}

}  // namespace peftlab
