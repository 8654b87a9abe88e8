#include "nn/hf_gpt2.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/tape.h"
#include "nn/json_limits.h"
#include "nn/safetensors.h"

namespace peftlab {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::runtime_error fail(const std::string& path, const std::string& what) {
    return std::runtime_error(fmt::format("load_hf_gpt2: '{}': {}", path, what));
}

std::string shape_text(const std::vector<int64_t>& s) {
    std::string t = "[";
    for (size_t i = 0; i < s.size(); ++i) t += fmt::format("{}{}", i ? ", " : "", s[i]);
    return t + "]";
}

json read_json(const std::string& path) {
    const std::string text = read_small_file(path, kMaxConfigFileBytes, "load_hf_gpt2");
    try {
        return parse_json_limited(text, "content");
    } catch (const std::runtime_error& e) {  // syntax errors, numbers too large for a double, nesting
        throw fail(path, e.what());
    }
}

// GPTConfig from config.json, refusing what our GPT does not compute.
GPTConfig parse_config(const std::string& path) {
    const json j = read_json(path);
    if (!j.is_object()) throw fail(path, fmt::format("is a JSON {}, not an object", j.type_name()));
    // Every size is at most 2^31 - 1: layer and head counts are ints, and d_ff's
    // default 4 * n_embd and the checks on shapes multiply sizes in int64.
    auto integer = [&](const char* key) -> int64_t {
        const json& v = j.at(key);
        if (!v.is_number_integer() || v.get<int64_t>() < 1 ||
            (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int>::max())) ||
            v.get<int64_t>() > std::numeric_limits<int>::max())
            throw fail(path, fmt::format("field \"{}\" = {} is not a positive integer below 2^31", key, json_excerpt(v)));
        return v.get<int64_t>();
    };
    auto need = [&](const char* key) {
        if (!j.contains(key)) throw fail(path, fmt::format("missing field \"{}\"", key));
        return integer(key);
    };
    auto flag = [&](const char* key, bool dflt) {
        if (!j.contains(key) || j[key].is_null()) return dflt;
        if (!j[key].is_boolean()) throw fail(path, fmt::format("field \"{}\" = {} is not a boolean", key, json_excerpt(j[key])));
        return j[key].get<bool>();
    };
    if (j.contains("model_type") && j["model_type"] != "gpt2")
        throw fail(path, fmt::format("model_type {} is not \"gpt2\"", json_excerpt(j["model_type"])));
    GPTConfig c;
    c.d_model = need("n_embd");
    c.n_layers = int(need("n_layer"));
    c.n_heads = int(need("n_head"));
    c.vocab = need("vocab_size");
    if (j.contains("n_positions")) c.max_seq = integer("n_positions");
    else if (j.contains("n_ctx")) c.max_seq = integer("n_ctx");
    else throw fail(path, "missing field \"n_positions\" (or \"n_ctx\")");
    c.d_ff = j.contains("n_inner") && !j["n_inner"].is_null() ? integer("n_inner") : 4 * c.d_model;
    if (j.contains("layer_norm_epsilon")) {
        if (!j["layer_norm_epsilon"].is_number())
            throw fail(path, fmt::format("field \"layer_norm_epsilon\" = {} is not a number", json_excerpt(j["layer_norm_epsilon"])));
        c.ln_eps = j["layer_norm_epsilon"].get<float>();
    }
    if (j.contains("activation_function")) {
        const json& a = j["activation_function"];
        if (a != "gelu_new" && a != "gelu")
            throw fail(path, fmt::format("activation_function {} is not implemented (gelu_new or gelu)", json_excerpt(a)));
        c.activation = a.get<std::string>();
    }
    if (flag("scale_attn_by_inverse_layer_idx", false))
        throw fail(path, "scale_attn_by_inverse_layer_idx = true is not implemented");
    if (flag("add_cross_attention", false)) throw fail(path, "add_cross_attention = true is not implemented");
    if (!flag("scale_attn_weights", true)) throw fail(path, "scale_attn_weights = false is not implemented");
    c.tie_embeddings = flag("tie_word_embeddings", true);
    c.dropout = 0.f;
    try {
        c.validate();
    } catch (const std::invalid_argument& e) {
        throw fail(path, e.what());
    }
    return c;
}

// The tensor names an HF GPT-2 checkpoint of this config holds (without the
// "transformer." prefix; lm_head.weight only when untied), with their shapes.
std::map<std::string, std::vector<int64_t>> expected_shapes(const GPTConfig& c) {
    const int64_t C = c.d_model, F = c.d_ff;
    std::map<std::string, std::vector<int64_t>> s;
    s["wte.weight"] = {c.vocab, C};
    s["wpe.weight"] = {c.max_seq, C};
    for (int l = 0; l < c.n_layers; ++l) {
        const std::string h = fmt::format("h.{}.", l);
        for (const char* ln : {"ln_1", "ln_2"}) {
            s[h + ln + ".weight"] = {C};
            s[h + ln + ".bias"] = {C};
        }
        s[h + "attn.c_attn.weight"] = {C, 3 * C};
        s[h + "attn.c_attn.bias"] = {3 * C};
        s[h + "attn.c_proj.weight"] = {C, C};
        s[h + "attn.c_proj.bias"] = {C};
        s[h + "mlp.c_fc.weight"] = {C, F};
        s[h + "mlp.c_fc.bias"] = {F};
        s[h + "mlp.c_proj.weight"] = {F, C};
        s[h + "mlp.c_proj.bias"] = {C};
    }
    s["ln_f.weight"] = {C};
    s["ln_f.bias"] = {C};
    if (!c.tie_embeddings) s["lm_head.weight"] = {c.vocab, C};
    return s;
}

// h.N.attn.bias / h.N.attn.masked_bias: causal-mask buffers, not parameters.
bool is_mask_buffer(const std::string& key) {
    if (key.rfind("h.", 0) != 0) return false;
    const size_t dot = key.find('.', 2);
    if (dot == std::string::npos || dot == 2) return false;
    for (size_t i = 2; i < dot; ++i)
        if (key[i] < '0' || key[i] > '9') return false;
    const std::string rest = key.substr(dot);
    return rest == ".attn.bias" || rest == ".attn.masked_bias";
}

// Copies the [in, out] Conv1D block columns [c0, c0 + rows) of src (in x out)
// into dst [rows, in] (our Linear layout).
void transpose_block(const float* src, int64_t in, int64_t out, int64_t c0, int64_t rows, float* dst) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < in; ++i) dst[r * in + i] = src[i * out + c0 + r];
}

}  // namespace

GPTConfig load_hf_gpt2_config(const std::string& dir) {
    const std::string path = (fs::path(dir) / "config.json").string();
    if (!fs::exists(path)) throw fail(path, "missing (a GPT-2 checkpoint directory holds config.json)");
    return parse_config(path);
}

std::unique_ptr<GPT> load_hf_gpt2(const std::string& dir) {
    const fs::path root(dir);
    if (!fs::is_directory(root)) throw fail(dir, "not a directory");
    const std::string config_path = (root / "config.json").string();
    if (!fs::exists(config_path)) throw fail(config_path, "missing (a GPT-2 checkpoint directory holds config.json)");
    GPTConfig cfg = parse_config(config_path);

    // Files to open: model.safetensors, or the shards the index names.
    std::vector<std::unique_ptr<StMapped>> files;
    std::map<std::string, std::string> index_map;  // key -> shard file name (sharded only)
    std::string index_path;
    const fs::path single = root / "model.safetensors", index = root / "model.safetensors.index.json";
    if (fs::exists(single)) {
        files.push_back(std::make_unique<StMapped>(single.string()));
    } else if (fs::exists(index)) {
        index_path = index.string();
        const json j = read_json(index_path);
        if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
            throw fail(index_path, "has no \"weight_map\" object");
        std::map<std::string, StMapped*> by_name;
        for (const auto& [key, v] : j["weight_map"].items()) {
            if (!v.is_string()) throw fail(index_path, fmt::format("weight_map[\"{}\"] is not a file name", key));
            const std::string name = v.get<std::string>();
            // A path from a file is never trusted: shards sit beside the index.
            if (name.empty() || name.find('/') != std::string::npos || name.find('\\') != std::string::npos ||
                name == "." || name == "..")
                throw fail(index_path, fmt::format("weight_map[\"{}\"] = \"{}\" is not a plain file name", key, name));
            index_map[key] = name;
            if (!by_name.count(name)) {
                const fs::path shard = root / name;
                if (!fs::exists(shard))
                    throw fail(index_path, fmt::format("shard \"{}\" (for \"{}\") does not exist", name, key));
                files.push_back(std::make_unique<StMapped>(shard.string()));
                by_name[name] = files.back().get();
            }
        }
        if (files.empty()) throw fail(index_path, "weight_map is empty");
    } else {
        throw fail(dir, "holds neither model.safetensors nor model.safetensors.index.json");
    }

    // Every tensor, by its name without "transformer.", with the file it is in.
    struct Source {
        const StMapped* file;
        std::string key;  // as stored
    };
    std::map<std::string, Source> found;
    const auto expected = expected_shapes(cfg);
    const std::string lm_head = "lm_head.weight";
    for (const auto& file : files) {
        for (const auto& [key, info] : file->tensors()) {
            if (!index_map.empty()) {
                auto it = index_map.find(key);
                if (it == index_map.end() || (root / it->second).string() != file->path())
                    throw fail(file->path(), fmt::format("tensor '{}' is not listed for this shard in '{}'", key,
                                                         index_path));
            }
            std::string name = key.rfind("transformer.", 0) == 0 ? key.substr(12) : key;
            if (is_mask_buffer(name)) continue;
            if (!expected.count(name) && name != lm_head)
                throw fail(file->path(), fmt::format("unknown tensor '{}' (not part of GPT-2)", key));
            if (found.count(name))
                throw fail(file->path(), fmt::format("tensor '{}' appears twice (as '{}' and '{}')", name,
                                                     found[name].key, key));
            found[name] = Source{file.get(), key};
        }
    }
    for (const auto& [key, name] : index_map) {
        bool present = false;
        for (const auto& file : files)
            if ((root / name).string() == file->path()) present = file->tensors().count(key) > 0;
        if (!present) throw fail((root / name).string(), fmt::format("tensor '{}' listed in the index is missing", key));
    }
    for (const auto& [name, shape] : expected) {
        auto it = found.find(name);
        if (it == found.end())
            throw fail(files.size() == 1 ? files[0]->path() : index_path, fmt::format("missing tensor '{}'", name));
        const auto& have = it->second.file->tensors().at(it->second.key).shape;
        if (have != shape)
            throw fail(it->second.file->path(),
                       fmt::format("tensor '{}' has shape {} but config.json (n_embd = {}, n_layer = {}, n_inner = {}, "
                                   "vocab_size = {}, n_positions = {}) needs {}",
                                   it->second.key, shape_text(have), cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.vocab,
                                   cfg.max_seq, shape_text(shape)));
    }
    const bool check_tied = cfg.tie_embeddings && found.count(lm_head);
    if (check_tied) {
        const Source& s = found[lm_head];
        const auto& have = s.file->tensors().at(s.key).shape;
        if (have != std::vector<int64_t>{cfg.vocab, cfg.d_model})
            throw fail(s.file->path(), fmt::format("tensor '{}' has shape {} but config.json needs [{}, {}]", s.key,
                                                   shape_text(have), cfg.vocab, cfg.d_model));
    }

    // Everything checked: allocate (zeros, no random draws) and convert.
    auto model = std::make_unique<GPT>(cfg, 0, 0.f);
    NoGradGuard no_grad;
    // A diverged run's NaN or Inf would turn every forward into NaN without a
    // word: refused as peftlab's own checkpoints refuse them (nn/checkpoint.h).
    auto require_finite = [&](const Source& s, const float* v, int64_t n) {
        const float* bad = std::find_if(v, v + n, [](float x) { return !std::isfinite(x); });
        if (bad != v + n)
            throw fail(s.file->path(), fmt::format("tensor '{}' holds {} at element {} (of {}); refusing non-finite "
                                                   "weights",
                                                   s.key, *bad, bad - v, n));
    };
    auto read_into = [&](const std::string& name, Tensor& t) {
        found[name].file->read(found[name].key, t.data());
        require_finite(found[name], t.data(), t.numel());
    };
    std::vector<float> scratch;
    auto read_scratch = [&](const std::string& name) {
        const Source& s = found[name];
        int64_t n = 1;
        for (int64_t d : s.file->tensors().at(s.key).shape) n *= d;
        scratch.resize(size_t(n));
        s.file->read(s.key, scratch.data());
        require_finite(s, scratch.data(), n);
        return scratch.data();
    };
    const int64_t C = cfg.d_model, F = cfg.d_ff;
    read_into("wte.weight", model->wte.weight);
    read_into("wpe.weight", model->wpe.weight);
    for (int l = 0; l < cfg.n_layers; ++l) {
        Block& b = *model->blocks[size_t(l)];
        const std::string h = fmt::format("h.{}.", l);
        read_into(h + "ln_1.weight", b.ln1.weight);
        read_into(h + "ln_1.bias", b.ln1.bias);
        read_into(h + "ln_2.weight", b.ln2.weight);
        read_into(h + "ln_2.bias", b.ln2.bias);
        const float* w = read_scratch(h + "attn.c_attn.weight");
        Linear* qkv[3] = {&b.attn.q_proj, &b.attn.k_proj, &b.attn.v_proj};
        for (int i = 0; i < 3; ++i) transpose_block(w, C, 3 * C, i * C, C, qkv[i]->weight.data());
        const float* bias = read_scratch(h + "attn.c_attn.bias");
        for (int i = 0; i < 3; ++i) std::memcpy(qkv[i]->bias.data(), bias + i * C, size_t(C) * sizeof(float));
        transpose_block(read_scratch(h + "attn.c_proj.weight"), C, C, 0, C, b.attn.o_proj.weight.data());
        read_into(h + "attn.c_proj.bias", b.attn.o_proj.bias);
        transpose_block(read_scratch(h + "mlp.c_fc.weight"), C, F, 0, F, b.mlp.fc.weight.data());
        read_into(h + "mlp.c_fc.bias", b.mlp.fc.bias);
        transpose_block(read_scratch(h + "mlp.c_proj.weight"), F, C, 0, C, b.mlp.proj.weight.data());
        read_into(h + "mlp.c_proj.bias", b.mlp.proj.bias);
    }
    read_into("ln_f.weight", model->ln_f.weight);
    read_into("ln_f.bias", model->ln_f.bias);
    if (model->head) read_into(lm_head, model->head->weight);
    if (check_tied) {
        const float* head = read_scratch(lm_head);
        if (std::memcmp(head, model->wte.weight.data(), size_t(cfg.vocab * C) * sizeof(float)) != 0)
            throw fail(found[lm_head].file->path(),
                       "lm_head.weight differs from wte.weight, but config.json ties them (tie_word_embeddings)");
    }
    std::vector<float>().swap(scratch);
    return model;
}

void save_hf_gpt2(const GPT& model, const std::string& dir) {
    const GPTConfig& c = model.config();
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw std::runtime_error(fmt::format("save_hf_gpt2: cannot create '{}': {}", dir, ec.message()));
    const int64_t C = c.d_model;
    std::vector<StTensorRef> refs;
    auto direct = [&](const std::string& name, const Tensor& t) {
        refs.push_back({"transformer." + name, t.shape(), t.data(), {}});
    };
    // Conv1D [in, out] from our Linear [out, in].
    auto conv1d = [&](const std::string& name, const Linear& lin) {
        const int64_t out = lin.weight.dim(0), in = lin.weight.dim(1);
        const float* w = lin.weight.data();
        refs.push_back({"transformer." + name, {in, out}, nullptr, [w, in, out](float* dst) {
                            for (int64_t i = 0; i < in; ++i)
                                for (int64_t o = 0; o < out; ++o) dst[i * out + o] = w[o * in + i];
                        }});
    };
    direct("wte.weight", model.wte.weight);
    direct("wpe.weight", model.wpe.weight);
    for (int l = 0; l < c.n_layers; ++l) {
        const Block& b = *model.blocks[size_t(l)];
        const std::string h = fmt::format("h.{}.", l);
        direct(h + "ln_1.weight", b.ln1.weight);
        direct(h + "ln_1.bias", b.ln1.bias);
        direct(h + "ln_2.weight", b.ln2.weight);
        direct(h + "ln_2.bias", b.ln2.bias);
        const float* q = b.attn.q_proj.weight.data();
        const float* k = b.attn.k_proj.weight.data();
        const float* v = b.attn.v_proj.weight.data();
        refs.push_back({"transformer." + h + "attn.c_attn.weight", {C, 3 * C}, nullptr, [q, k, v, C](float* dst) {
                            const float* part[3] = {q, k, v};
                            for (int64_t i = 0; i < C; ++i)
                                for (int p = 0; p < 3; ++p)
                                    for (int64_t o = 0; o < C; ++o) dst[i * 3 * C + p * C + o] = part[p][o * C + i];
                        }});
        const float* qb = b.attn.q_proj.bias.data();
        const float* kb = b.attn.k_proj.bias.data();
        const float* vb = b.attn.v_proj.bias.data();
        refs.push_back({"transformer." + h + "attn.c_attn.bias", {3 * C}, nullptr, [qb, kb, vb, C](float* dst) {
                            std::memcpy(dst, qb, size_t(C) * sizeof(float));
                            std::memcpy(dst + C, kb, size_t(C) * sizeof(float));
                            std::memcpy(dst + 2 * C, vb, size_t(C) * sizeof(float));
                        }});
        conv1d(h + "attn.c_proj.weight", b.attn.o_proj);
        direct(h + "attn.c_proj.bias", b.attn.o_proj.bias);
        conv1d(h + "mlp.c_fc.weight", b.mlp.fc);
        direct(h + "mlp.c_fc.bias", b.mlp.fc.bias);
        conv1d(h + "mlp.c_proj.weight", b.mlp.proj);
        direct(h + "mlp.c_proj.bias", b.mlp.proj.bias);
    }
    direct("ln_f.weight", model.ln_f.weight);
    direct("ln_f.bias", model.ln_f.bias);
    if (model.head) refs.push_back({"lm_head.weight", model.head->weight.shape(), model.head->weight.data(), {}});

    const json config = {{"architectures", {"GPT2LMHeadModel"}},
                         {"model_type", "gpt2"},
                         {"vocab_size", c.vocab},
                         {"n_positions", c.max_seq},
                         {"n_ctx", c.max_seq},
                         {"n_embd", c.d_model},
                         {"n_layer", c.n_layers},
                         {"n_head", c.n_heads},
                         {"n_inner", c.d_ff},
                         {"layer_norm_epsilon", c.ln_eps},
                         {"activation_function", c.activation},
                         {"tie_word_embeddings", c.tie_embeddings},
                         {"scale_attn_weights", true},
                         {"scale_attn_by_inverse_layer_idx", false},
                         {"reorder_and_upcast_attn", false},
                         {"add_cross_attention", false},
                         {"resid_pdrop", c.dropout},
                         {"embd_pdrop", c.dropout},
                         {"attn_pdrop", 0.0},
                         {"bos_token_id", 50256},
                         {"eos_token_id", 50256}};
    // Weights first: a directory whose config.json is new always has its weights.
    save_safetensors((fs::path(dir) / "model.safetensors").string(), refs, {{"format", "pt"}});
    write_file_atomic((fs::path(dir) / "config.json").string(), config.dump(2) + "\n");
}

// ---- GPT-2 module names --------------------------------------------------------------------
const std::vector<HfGpt2Module>& hf_gpt2_block_modules() {
    static const std::vector<HfGpt2Module> modules = {
        {"attn.c_attn", "c_attn", {"attn.q_proj", "attn.k_proj", "attn.v_proj"}},
        {"attn.c_proj", "attn.c_proj", {"attn.o_proj"}},
        {"mlp.c_fc", "c_fc", {"mlp.fc"}},
        {"mlp.c_proj", "mlp.c_proj", {"mlp.proj"}},
    };
    return modules;
}

std::pair<const HfGpt2Module*, int> hf_gpt2_module_of(const std::string& linear) {
    for (const HfGpt2Module& m : hf_gpt2_block_modules())
        for (size_t i = 0; i < m.linears.size(); ++i)
            if (m.linears[i] == linear) return {&m, int(i)};
    throw std::invalid_argument(fmt::format("hf_gpt2_module_of: '{}' is not a Linear of a GPT-2 block (attn.q_proj, "
                                            "attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc, mlp.proj)",
                                            linear));
}

std::vector<const HfGpt2Module*> hf_gpt2_select(const std::string& target) {
    std::vector<const HfGpt2Module*> out;
    for (const HfGpt2Module& m : hf_gpt2_block_modules()) {
        const std::string& n = m.name;
        const bool suffix = n.size() > target.size() && n.compare(n.size() - target.size(), target.size(), target) == 0 &&
                            n[n.size() - target.size() - 1] == '.';
        if (target == n || suffix) out.push_back(&m);
    }
    return out;
}

std::string hf_gpt2_module_key(int layer, const std::string& module) {
    return fmt::format("transformer.h.{}.{}", layer, module);
}

}  // namespace peftlab
