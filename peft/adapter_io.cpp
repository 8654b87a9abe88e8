#include "peft/adapter_io.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/json_limits.h"
#include "nn/safetensors.h"
#include "peft/lora.h"
#include "peft/registry.h"

namespace peftlab::peft {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kHfLoraKeyPrefix = "base_model.model.";  // PeftModel -> LoraModel -> the LM
constexpr const char* kHfBaseNamePrefix = "peftlab:";

std::string in_dir(const std::string& dir, const char* file) { return (fs::path(dir) / file).string(); }

std::runtime_error file_error(const char* fn, const std::string& path, const std::string& what) {
    return std::runtime_error(fmt::format("{}: '{}': {}", fn, path, what));
}

// A parsed JSON config file whose accessors name the file and key in every error.
class JsonFile {
public:
    JsonFile(const char* fn, std::string path) : fn_(fn), path_(std::move(path)) {
        std::ifstream in(path_, std::ios::binary);
        if (!in) throw error(fmt::format("cannot open ({})", std::strerror(errno)));
        std::stringstream text;
        text << in.rdbuf();
        try {
            j_ = parse_json_limited(text.str(), "content");
        } catch (const std::runtime_error& e) {
            throw error(e.what());
        }
        if (!j_.is_object()) throw error(fmt::format("expected a JSON object, got {}", j_.type_name()));
    }

    std::runtime_error error(const std::string& what) const { return file_error(fn_, path_, what); }
    std::runtime_error key_error(const std::string& key, const std::string& what) const {
        return error(fmt::format("key '{}': {}", key, what));
    }

    bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
    const json& at(const std::string& key) const {
        if (!j_.contains(key)) throw error(fmt::format("key '{}' is missing", key));
        return j_.at(key);
    }
    std::string str(const std::string& key) const {
        const json& v = at(key);
        if (!v.is_string()) throw key_error(key, "must be a string, got " + json_excerpt(v));
        return v.get<std::string>();
    }
    bool boolean(const std::string& key) const {
        const json& v = at(key);
        if (!v.is_boolean()) throw key_error(key, "must be true or false, got " + json_excerpt(v));
        return v.get<bool>();
    }
    int64_t integer(const std::string& key) const {
        const json& v = at(key);
        if (!v.is_number_integer()) throw key_error(key, "must be an integer, got " + json_excerpt(v));
        return v.get<int64_t>();
    }
    double number(const std::string& key) const {
        const json& v = at(key);
        if (!v.is_number()) throw key_error(key, "must be a number, got " + json_excerpt(v));
        return v.get<double>();
    }
    // An integer key that must equal the base's value.
    void expect(const std::string& key, int64_t base_value) const {
        int64_t v = integer(key);
        if (v != base_value) throw key_error(key, fmt::format("is {} but the base has {}", v, base_value));
    }

private:
    const char* fn_;
    std::string path_;
    json j_;
};

StFile read_tensors(const char* fn, const std::string& path, const LoadOptions& opts) {
    StFile file;
    try {
        file = load_safetensors(path);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(fmt::format("{}: {}", fn, e.what()));
    }
    check_finite(fn, path, file, opts);
    return file;
}

// Elements a loader may allocate beyond what the weights file holds: attach
// builds the training-time tensors, and an inference file of a reparameterized
// prefix does not store its MLP (built, then replaced by its output). 2^24
// floats = 64 MiB.
constexpr uint64_t kUnstoredAllowance = uint64_t(1) << 24;

// Refuses, before attach allocates anything, options whose tensors could not
// come from this file: a config must not make us allocate more than the file
// holds (plus kUnstoredAllowance). Each size option is bounded first so that
// the adapter's formula (int64 products of sizes) cannot overflow.
void check_sizes(const JsonFile& cfg, const char* options_key, const Adapter& adapter, const GPTConfig& c,
                 const StFile& file) {
    uint64_t in_file = 0;
    for (const auto& [name, t] : file.tensors) in_file += t.data.size();  // bounded by the file size
    const uint64_t limit = in_file + kUnstoredAllowance;
    const AdapterOptions& o = adapter.options();
    for (auto [name, v] : {std::pair<const char*, int64_t>{"n", o.n}, {"lora_rank", o.lora_rank},
                           {"reparam_hidden", o.reparam_hidden}})
        if (uint64_t(v) > limit)
            throw cfg.key_error(options_key, fmt::format("{} = {} is larger than the weights file could hold "
                                                         "({} values in the file)", name, v, in_file));
    ParamFormula needed;
    try {
        needed = adapter.formula(c);
    } catch (const std::invalid_argument&) {
        // Options the method refuses (a layer the base lacks, an unknown LoRA
        // target): attach refuses them too, before allocating, and the callers
        // report that error under its own key.
        return;
    }
    if (needed.count < 0 || uint64_t(needed.count) > limit)
        throw cfg.key_error(options_key, fmt::format("these options make {} parameters ({}) but the weights file "
                                                     "holds {} values", needed.count, needed.text, in_file));
}

// Throws unless the file holds exactly `dest`'s keys with equal shapes. Changes nothing.
void check_tensors(const char* fn, const std::string& path, const StFile& file, const NamedTensors& dest) {
    std::set<std::string> wanted;
    for (const auto& [key, t] : dest) {
        wanted.insert(key);
        auto it = file.tensors.find(key);
        if (it == file.tensors.end())
            throw file_error(fn, path, fmt::format("missing tensor '{}' (the adapter has {} tensors, the file {})",
                                                   key, dest.size(), file.tensors.size()));
        if (it->second.shape != t.shape())
            throw file_error(fn, path, fmt::format("tensor '{}' has shape {} in the file but {} in the adapter", key,
                                                   shape_str(it->second.shape), shape_str(t.shape())));
    }
    for (const auto& [key, st] : file.tensors)
        if (!wanted.count(key)) throw file_error(fn, path, fmt::format("unexpected tensor '{}' (not in the adapter)", key));
}

// After check_tensors: cannot fail.
void copy_tensors(const StFile& file, const NamedTensors& dest) {
    for (const auto& [key, t] : dest) {
        const std::vector<float>& src = file.tensors.at(key).data;
        if (!src.empty()) std::memcpy(Tensor(t).data(), src.data(), src.size() * sizeof(float));
    }
}

void save_tensors(const std::string& path, const NamedTensors& tensors, const std::string& format) {
    std::vector<StTensorRef> refs;
    for (const auto& [name, t] : tensors) refs.push_back(StTensorRef{name, t.shape(), t.data()});
    save_safetensors(path, refs, {{"format", format}});
}

void make_dir(const char* fn, const std::string& dir) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw std::runtime_error(fmt::format("{}: cannot create directory '{}' ({})", fn, dir, ec.message()));
}

// The base's requires_grad flags, put back unless the load commits: attach
// freezes the base (or, for "full", unfreezes it) before the tensors are checked.
class GradFlagsGuard {
public:
    explicit GradFlagsGuard(const GPT& base) {
        for (const auto& [name, t] : base.named_parameters()) saved_.emplace_back(t, t.requires_grad());
    }
    ~GradFlagsGuard() {
        if (committed_) return;
        for (auto& [t, on] : saved_) t.set_requires_grad(on);
    }
    GradFlagsGuard(const GradFlagsGuard&) = delete;
    GradFlagsGuard& operator=(const GradFlagsGuard&) = delete;
    void commit() { committed_ = true; }

private:
    std::vector<std::pair<Tensor, bool>> saved_;
    bool committed_ = false;
};

GPT& attached_base(const char* fn, const Adapter& adapter) {
    if (!adapter.base()) throw std::invalid_argument(fmt::format("{}: the {} adapter is not attached to a model", fn, adapter.method()));
    if (const auto* lora = dynamic_cast<const LoRA*>(&adapter); lora && lora->merged())
        throw std::invalid_argument(fmt::format("{}: the LoRA adapter is merged into its base; unmerge() first", fn));
    return *adapter.base();
}

Tensor find_tensor(const NamedTensors& tensors, const std::string& name) {
    for (const auto& [n, t] : tensors)
        if (n == name) return t;
    throw std::logic_error("adapter_io: the adapter has no tensor '" + name + "'");
}

bool same_names(const NamedTensors& a, const NamedTensors& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].first != b[i].first) return false;
    return true;
}

// Throws unless `base` is the model the adapter was saved for: equal config, then equal weights.
void check_base(const JsonFile& cfg, const json& saved_config, const std::string& saved_hash, const GPT& base) {
    GPTConfig saved;
    try {
        saved = GPTConfig::from_json(saved_config);
    } catch (const std::exception& e) {
        throw cfg.key_error("base_config", e.what());
    }
    if (!(saved == base.config())) {
        const json ours = base.config().to_json(), theirs = saved.to_json();
        for (const auto& [field, value] : ours.items())
            if (theirs.at(field) != value)
                throw cfg.error(fmt::format("base config differs: {} {} != {} (the adapter's base vs this base)", field,
                                            json_excerpt(theirs.at(field)), json_excerpt(value)));
    }
    const std::string hash = base_hash(base);
    if (saved_hash != hash)
        throw cfg.error(fmt::format("base weights differ (hash {} != {}): the adapter was trained on another base",
                                    saved_hash, hash));
}

// PEFT's prefix table [n, 2*L*d] of an adapter on every layer: per layer l, the
// keys in columns [2l*d, (2l+1)*d), then the values. The hidden-state form's
// vectors P go through layer l's ln1 and K/V projections, as the model does.
Tensor hf_prefix_table(const Adapter& adapter, const GPT& base) {
    NoGradGuard no_grad;
    const NamedTensors params = adapter.inference_parameters();
    const bool kv = adapter.method() == "prefix-kv";
    const int64_t n = adapter.options().n, d = base.config().d_model, L = base.config().n_layers;
    Tensor table = Tensor::empty({n, 2 * L * d});
    for (int64_t l = 0; l < L; ++l) {
        Tensor key, value;
        if (kv) {
            key = find_tensor(params, fmt::format("blocks.{}.prefix.key", l));
            value = find_tensor(params, fmt::format("blocks.{}.prefix.value", l));
        } else {
            const Block& blk = *base.blocks[size_t(l)];
            Tensor hn = blk.ln1.forward(find_tensor(params, fmt::format("blocks.{}.prefix.hidden", l)));
            key = linear(hn, blk.attn.k_proj.weight, blk.attn.k_proj.bias);
            value = linear(hn, blk.attn.v_proj.weight, blk.attn.v_proj.bias);
        }
        for (int64_t i = 0; i < n; ++i) {
            float* row = table.data() + i * 2 * L * d;
            std::memcpy(row + 2 * l * d, key.data() + i * d, size_t(d) * sizeof(float));
            std::memcpy(row + (2 * l + 1) * d, value.data() + i * d, size_t(d) * sizeof(float));
        }
    }
    return table;
}

// Fields every PEFT prompt-learning config carries.
void add_prompt_learning_fields(json& cfg, const Adapter& adapter, const GPTConfig& c) {
    cfg["num_virtual_tokens"] = adapter.options().n;
    cfg["token_dim"] = c.d_model;
    cfg["num_transformer_submodules"] = 1;
    cfg["num_attention_heads"] = c.n_heads;
    cfg["num_layers"] = c.n_layers;
    cfg["modules_to_save"] = nullptr;
}

// layers_to_transform as our layer spec: null -> all, k -> "k", [..] -> "a,b" ([] -> none).
std::string hf_layers_spec(const JsonFile& cfg, int L) {
    const char* key = "layers_to_transform";
    if (!cfg.has(key)) return "all";
    const json& v = cfg.at(key);
    std::vector<int64_t> layers;
    if (v.is_number_integer()) layers.push_back(v.get<int64_t>());
    else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_number_integer(); }))
        layers = v.get<std::vector<int64_t>>();
    else throw cfg.key_error(key, "must be null, an integer or a list of integers, got " + json_excerpt(v));
    if (layers.empty()) return "none";
    std::string spec;
    for (int64_t l : layers) {
        if (!spec.empty()) spec += ',';
        spec += std::to_string(l);
    }
    try {
        parse_layers(spec, L);
    } catch (const std::invalid_argument& e) {
        throw cfg.key_error(key, e.what());
    }
    return spec;
}

// The LORA config fields that change the function, checked against what our LoRA computes.
AdapterOptions hf_lora_options(const JsonFile& cfg, int L) {
    AdapterOptions o;
    o.lora_rank = cfg.integer("r");
    if (o.lora_rank < 1) throw cfg.key_error("r", fmt::format("{} must be >= 1", o.lora_rank));
    o.lora_alpha = float(cfg.number("lora_alpha"));
    const json& targets = cfg.at("target_modules");
    if (!targets.is_array() || !std::all_of(targets.begin(), targets.end(), [](const json& t) { return t.is_string(); }))
        throw cfg.key_error("target_modules", "must be a list of module names (regex strings are not supported), got " +
                                                  json_excerpt(targets));
    o.lora_targets = targets.get<std::vector<std::string>>();
    o.layers = hf_layers_spec(cfg, L);
    if (cfg.has("layers_pattern")) {
        const json& p = cfg.at("layers_pattern");
        if (p != json("blocks") && p != json::array({"blocks"}))
            throw cfg.key_error("layers_pattern", "must be null or \"blocks\" (where our layers live), got " + json_excerpt(p));
    }
    for (const char* flag : {"use_rslora", "use_dora", "fan_in_fan_out"})
        if (cfg.has(flag) && cfg.boolean(flag)) throw cfg.key_error(flag, "true is not supported");
    if (cfg.has("bias") && cfg.str("bias") != "none") throw cfg.key_error("bias", "only \"none\" is supported");
    for (const char* pattern : {"rank_pattern", "alpha_pattern"})
        if (cfg.has(pattern) && !cfg.at(pattern).empty()) throw cfg.key_error(pattern, "per-module patterns are not supported");
    if (cfg.has("modules_to_save") && !cfg.at("modules_to_save").empty())
        throw cfg.key_error("modules_to_save", "extra trained modules are not supported");
    return o;
}

}  // namespace

std::string base_hash(const GPT& base) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const auto& [name, t] : base.named_parameters()) {
        const auto* bytes = reinterpret_cast<const unsigned char*>(t.data());
        const size_t n = size_t(t.numel()) * sizeof(float);
        for (size_t i = 0; i < n; ++i) {
            h ^= bytes[i];
            h *= 0x100000001b3ull;
        }
    }
    return fmt::format("{:016x}", h);
}

// ---- own format ---------------------------------------------------------------------------
void save_adapter(const std::string& dir, const Adapter& adapter, bool inference, const std::string& original_base_hash) {
    const char* fn = "save_adapter";
    GPT& base = attached_base(fn, adapter);
    std::string hash;
    if (adapter.method() == "full") {
        if (original_base_hash.empty())
            throw std::invalid_argument(fmt::format("{}: '{}': full fine-tuning changed the base; pass original_base_hash "
                                                    "= base_hash(model) taken before training",
                                                    fn, dir));
        hash = original_base_hash;
    } else {
        hash = base_hash(base);
        if (!original_base_hash.empty() && original_base_hash != hash)
            throw std::invalid_argument(fmt::format("{}: '{}': original_base_hash {} is not the attached base's hash {} "
                                                    "(the {} adapter leaves its base unchanged)",
                                                    fn, dir, original_base_hash, hash, adapter.method()));
    }
    const NamedTensors inference_tensors = adapter.inference_parameters();
    const bool holds_inference = inference || same_names(adapter.parameters(), inference_tensors);
    make_dir(fn, dir);
    save_tensors(in_dir(dir, kAdapterWeightsFile), inference ? inference_tensors : adapter.parameters(), kAdapterFormat);
    const json cfg = {{"format", kAdapterFormat},
                      {"method", adapter.method()},
                      {"options", adapter.options().to_json()},
                      {"layers", adapter.layers()},
                      {"inference", holds_inference},
                      {"base_config", base.config().to_json()},
                      {"base_hash", hash}};
    write_file_atomic(in_dir(dir, kAdapterConfigFile), cfg.dump(2) + "\n");
}

std::unique_ptr<Adapter> load_adapter(const std::string& dir, GPT& base, const LoadOptions& load_opts) {
    const char* fn = "load_adapter";
    const JsonFile cfg(fn, in_dir(dir, kAdapterConfigFile));
    if (cfg.str("format") != kAdapterFormat)
        throw cfg.key_error("format", fmt::format("is '{}', expected '{}'", cfg.str("format"), kAdapterFormat));
    const std::string method = cfg.str("method");
    AdapterOptions opts;
    try {
        opts = AdapterOptions::from_json(cfg.at("options"));
    } catch (const std::invalid_argument& e) {
        throw cfg.key_error("options", e.what());
    }
    const json& layers_json = cfg.at("layers");
    if (!layers_json.is_array() || !std::all_of(layers_json.begin(), layers_json.end(), [](const json& l) { return l.is_number_integer(); }))
        throw cfg.key_error("layers", "must be a list of layer indices, got " + json_excerpt(layers_json));
    const auto layers = layers_json.get<std::vector<int>>();
    const bool inference = cfg.boolean("inference");
    check_base(cfg, cfg.at("base_config"), cfg.str("base_hash"), base);

    const std::string weights = in_dir(dir, kAdapterWeightsFile);
    const StFile file = read_tensors(fn, weights, load_opts);
    std::unique_ptr<Adapter> adapter;
    try {
        adapter = make_adapter(method, opts);
    } catch (const std::invalid_argument& e) {
        throw cfg.key_error("method", e.what());
    }
    check_sizes(cfg, "options", *adapter, base.config(), file);
    GradFlagsGuard grad_flags(base);
    try {
        adapter->attach(base);
    } catch (const std::invalid_argument& e) {
        throw cfg.key_error("options", e.what());
    }
    if (inference) adapter->materialize();  // the file holds inference_parameters()
    if (adapter->layers() != layers)
        throw cfg.key_error("layers", fmt::format("is {} but options.layers '{}' resolve to {}", json_excerpt(layers_json),
                                                  opts.layers, json(adapter->layers()).dump()));
    check_tensors(fn, weights, file, adapter->parameters());
    copy_tensors(file, adapter->parameters());
    grad_flags.commit();
    return adapter;
}

// ---- Hugging Face PEFT layout --------------------------------------------------------------
void export_hf(const std::string& dir, const Adapter& adapter) {
    const char* fn = "export_hf";
    GPT& base = attached_base(fn, adapter);
    const GPTConfig& c = base.config();
    const std::string method = adapter.method();
    json cfg = {{"task_type", "CAUSAL_LM"},
                {"base_model_name_or_path", kHfBaseNamePrefix + base_hash(base)},
                {"revision", nullptr},
                {"inference_mode", true}};
    NamedTensors out;
    if (method == "prompt") {
        cfg["peft_type"] = "PROMPT_TUNING";
        add_prompt_learning_fields(cfg, adapter, c);
        cfg["prompt_tuning_init"] = "RANDOM";  // how it started no longer matters: the values are in the file
        cfg["prompt_tuning_init_text"] = nullptr;
        cfg["tokenizer_name_or_path"] = nullptr;
        cfg["tokenizer_kwargs"] = nullptr;
        out.emplace_back("prompt_embeddings", find_tensor(adapter.inference_parameters(), "prompt_embeddings"));
    } else if (method == "prefix" || method == "prefix-kv") {
        if (int64_t(adapter.layers().size()) != c.n_layers)
            throw std::invalid_argument(fmt::format(
                "{}: '{}': the {} adapter has prefixes on layers {} only, but PEFT's PREFIX_TUNING table covers "
                "every layer (num_layers = {}); train with layers=all to export",
                fn, dir, method, json(adapter.layers()).dump(), c.n_layers));
        cfg["peft_type"] = "PREFIX_TUNING";
        add_prompt_learning_fields(cfg, adapter, c);
        cfg["encoder_hidden_size"] = c.d_model;  // unused without prefix_projection
        cfg["prefix_projection"] = false;        // the file holds the final keys and values
        out.emplace_back("prompt_embeddings", hf_prefix_table(adapter, base));
    } else if (method == "lora") {
        const AdapterOptions& o = adapter.options();
        const bool all_layers = int64_t(adapter.layers().size()) == c.n_layers;
        cfg["peft_type"] = "LORA";
        cfg["r"] = o.lora_rank;
        cfg["lora_alpha"] = o.lora_alpha;
        cfg["lora_dropout"] = 0.0;
        cfg["target_modules"] = o.lora_targets;
        cfg["bias"] = "none";
        cfg["fan_in_fan_out"] = false;  // our weights are [out, in], as nn.Linear's
        cfg["use_rslora"] = false;
        cfg["use_dora"] = false;
        cfg["init_lora_weights"] = true;
        cfg["modules_to_save"] = nullptr;
        cfg["layers_to_transform"] = all_layers ? json(nullptr) : json(adapter.layers());
        cfg["layers_pattern"] = all_layers ? json(nullptr) : json("blocks");
        cfg["rank_pattern"] = json::object();
        cfg["alpha_pattern"] = json::object();
        for (const auto& [name, t] : adapter.inference_parameters()) out.emplace_back(kHfLoraKeyPrefix + name, t);
    } else {
        throw std::invalid_argument(fmt::format("{}: '{}': method '{}' has no Hugging Face PEFT counterpart "
                                                "(exportable: prompt, prefix, prefix-kv, lora)",
                                                fn, dir, method));
    }
    make_dir(fn, dir);
    save_tensors(in_dir(dir, kAdapterWeightsFile), out, "pt");  // "pt": what transformers writes
    write_file_atomic(in_dir(dir, kAdapterConfigFile), cfg.dump(2) + "\n");
}

std::unique_ptr<Adapter> import_hf(const std::string& dir, GPT& base, const LoadOptions& load_opts) {
    const char* fn = "import_hf";
    const JsonFile cfg(fn, in_dir(dir, kAdapterConfigFile));
    const GPTConfig& c = base.config();
    const std::string peft_type = cfg.str("peft_type");
    if (cfg.has("task_type") && cfg.str("task_type") != "CAUSAL_LM")
        throw cfg.key_error("task_type", fmt::format("is '{}', expected 'CAUSAL_LM'", cfg.str("task_type")));
    if (cfg.has("base_model_name_or_path") && cfg.at("base_model_name_or_path").is_string()) {
        const std::string name = cfg.str("base_model_name_or_path");
        const std::string hash = base_hash(base);
        if (name.rfind(kHfBaseNamePrefix, 0) == 0 && name.substr(std::strlen(kHfBaseNamePrefix)) != hash)
            throw cfg.key_error("base_model_name_or_path",
                                fmt::format("base weights differ (hash {} != {}): the adapter was trained on another base",
                                            name.substr(std::strlen(kHfBaseNamePrefix)), hash));
    }

    std::string method;
    AdapterOptions opts;
    opts.init = "random";  // every value is overwritten from the file
    if (peft_type == "PROMPT_TUNING" || peft_type == "PREFIX_TUNING") {
        method = peft_type == "PROMPT_TUNING" ? "prompt" : "prefix-kv";
        cfg.expect("token_dim", c.d_model);
        cfg.expect("num_layers", c.n_layers);
        cfg.expect("num_attention_heads", c.n_heads);
        if (cfg.has("num_transformer_submodules")) cfg.expect("num_transformer_submodules", 1);
        opts.n = cfg.integer("num_virtual_tokens");
        if (opts.n < 0) throw cfg.key_error("num_virtual_tokens", fmt::format("{} must be >= 0", opts.n));
    } else if (peft_type == "LORA") {
        method = "lora";
        opts = hf_lora_options(cfg, c.n_layers);
    } else {
        throw cfg.key_error("peft_type", fmt::format("'{}' is not supported (PROMPT_TUNING, PREFIX_TUNING, LORA)", peft_type));
    }

    const std::string weights = in_dir(dir, kAdapterWeightsFile);
    const StFile file = read_tensors(fn, weights, load_opts);
    std::unique_ptr<Adapter> adapter = make_adapter(method, opts);
    check_sizes(cfg, method == "lora" ? "r" : "num_virtual_tokens", *adapter, c, file);
    GradFlagsGuard grad_flags(base);
    try {
        adapter->attach(base);
    } catch (const std::invalid_argument& e) {  // only LoRA's target names can be wrong here
        throw cfg.key_error("target_modules", e.what());
    }
    const NamedTensors& params = adapter->parameters();
    if (method == "prefix-kv") {
        // The file's table [n, 2*L*d], scattered into per-layer keys and values.
        const int64_t n = opts.n, d = c.d_model, L = c.n_layers;
        check_tensors(fn, weights, file, {{"prompt_embeddings", Tensor::empty({n, 2 * L * d})}});
        const std::vector<float>& table = file.tensors.at("prompt_embeddings").data;
        for (int64_t l = 0; l < L; ++l) {
            Tensor key = find_tensor(params, fmt::format("blocks.{}.prefix.key", l));
            Tensor value = find_tensor(params, fmt::format("blocks.{}.prefix.value", l));
            for (int64_t i = 0; i < n; ++i) {
                const float* row = table.data() + i * 2 * L * d;
                std::memcpy(key.data() + i * d, row + 2 * l * d, size_t(d) * sizeof(float));
                std::memcpy(value.data() + i * d, row + (2 * l + 1) * d, size_t(d) * sizeof(float));
            }
        }
    } else {
        NamedTensors dest;  // file key -> our tensor
        for (const auto& [name, t] : params) dest.emplace_back(method == "lora" ? kHfLoraKeyPrefix + name : name, t);
        check_tensors(fn, weights, file, dest);
        copy_tensors(file, dest);
    }
    grad_flags.commit();
    return adapter;
}

}  // namespace peftlab::peft
