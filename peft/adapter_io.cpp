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
#include "peft/registry.h"

namespace peftlab::peft {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kHfBaseNamePrefix = "peftlab:";

std::string in_dir(const std::string& dir, const char* file) { return (fs::path(dir) / file).string(); }

std::runtime_error file_error(const char* fn, const std::string& path, const std::string& what) {
    return std::runtime_error(fmt::format("{}: '{}': {}", fn, path, what));
}

// Elements a loader may allocate beyond what the weights file holds: attach
// builds the training-time tensors, and an inference file of a reparameterized
// prefix does not store its MLP (built, then replaced by its output). 2^24
// floats = 64 MiB.
constexpr uint64_t kUnstoredAllowance = uint64_t(1) << 24;

}  // namespace

void check_sizes(const ConfigFile& cfg, const char* options_key, const Adapter& adapter, const GPTConfig& c,
                 const StFile& file) {
    uint64_t in_file = 0;
    for (const auto& [name, t] : file.tensors) in_file += t.data.size();  // bounded by the file size
    const uint64_t limit = in_file + kUnstoredAllowance;
    const AdapterOptions& o = adapter.options();
    std::vector<std::pair<std::string, int64_t>> sizes = {{"n", o.n}};
    const json own = o.section_or_empty(adapter.method());
    for (const auto& [key, v] : own.items())
        if (v.is_number_integer()) sizes.emplace_back(key, v.get<int64_t>());
    for (const auto& [name, v] : sizes)
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

namespace {

void save_tensors(const std::string& path, const NamedTensors& tensors, const std::string& format) {
    std::vector<StTensorRef> refs;
    for (const auto& [name, t] : tensors) refs.push_back(StTensorRef{name, t.shape(), t.data()});
    save_safetensors(path, refs, {{"format", format}});
}

// Creates dir (and its missing parents), then runs write(). When write()
// throws, the directories this call created are removed again, so a save that
// fails on its first write (disk full, a file size limit) leaves no empty
// adapter directory behind; in a directory that existed, each file is written
// atomically and the old one stays until its replacement is complete.
template <class Write>
void write_in_dir(const char* fn, const std::string& dir, Write write) {
    std::error_code ec;
    fs::path created;  // the outermost directory on dir's path that does not exist yet
    for (fs::path p = fs::path(dir); !p.empty() && fs::symlink_status(p, ec).type() == fs::file_type::not_found;
         p = p.parent_path()) {
        created = p;
        if (p == p.parent_path()) break;
    }
    fs::create_directories(dir, ec);
    if (ec) throw std::runtime_error(fmt::format("{}: cannot create directory '{}' ({})", fn, dir, ec.message()));
    try {
        write();
    } catch (...) {
        if (!created.empty()) fs::remove_all(created, ec);  // best effort: the write's error is the one to report
        throw;
    }
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
    if (adapter.merged())
        throw std::invalid_argument(
            fmt::format("{}: the {} adapter is merged into its base; unmerge() first", fn, adapter.method()));
    return *adapter.base();
}

bool same_names(const NamedTensors& a, const NamedTensors& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].first != b[i].first) return false;
    return true;
}

// Throws unless `base` is the model the adapter was saved for: equal config, then equal weights.
void check_base(const AdapterConfig& saved, const GPT& base) {
    if (!(saved.base_config == base.config())) {
        const json ours = base.config().to_json(), theirs = saved.base_config.to_json();
        for (const auto& [field, value] : ours.items())
            if (theirs.at(field) != value)
                throw saved.file.error(fmt::format("base config differs: {} {} != {} (the adapter's base vs this base)",
                                                   field, json_excerpt(theirs.at(field)), json_excerpt(value)));
    }
    const std::string hash = base_hash(base);
    if (saved.base_hash != hash)
        throw saved.file.error(fmt::format(
            "base weights differ (hash {} != {}): the adapter was trained on another base", saved.base_hash, hash));
}

// PEFT's prefix table [n, 2*L*d] of an adapter on every layer: per layer l, the
// keys in columns [2l*d, (2l+1)*d), then the values. The hidden-state form's
// vectors P go through layer l's ln1 and K/V projections, as the model does.
}  // namespace

// ---- ConfigFile, tensor checks, PEFT prompt-learning fields ----------------------------------
ConfigFile::ConfigFile(const char* fn, std::string path) : fn_(fn), path_(std::move(path)) {
    const std::string text = read_small_file(path_, kMaxConfigFileBytes, fn_);
    try {
        j_ = parse_json_limited(text, "content");
    } catch (const std::runtime_error& e) {  // syntax errors, numbers too large for a double, nesting
        throw error(e.what());
    }
    if (!j_.is_object()) throw error(fmt::format("expected a JSON object, got {}", j_.type_name()));
}

std::runtime_error ConfigFile::error(const std::string& what) const { return file_error(fn_, path_, what); }
std::runtime_error ConfigFile::key_error(const std::string& key, const std::string& what) const {
    return error(fmt::format("key '{}': {}", key, what));
}
bool ConfigFile::has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
const json& ConfigFile::at(const std::string& key) const {
    if (!j_.contains(key)) throw error(fmt::format("key '{}' is missing", key));
    return j_.at(key);
}
std::string ConfigFile::str(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_string()) throw key_error(key, "must be a string, got " + json_excerpt(v));
    return v.get<std::string>();
}
bool ConfigFile::boolean(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_boolean()) throw key_error(key, "must be true or false, got " + json_excerpt(v));
    return v.get<bool>();
}
int64_t ConfigFile::integer(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_number_integer()) throw key_error(key, "must be an integer, got " + json_excerpt(v));
    return v.get<int64_t>();
}
double ConfigFile::number(const std::string& key) const {
    const json& v = at(key);
    if (!v.is_number()) throw key_error(key, "must be a number, got " + json_excerpt(v));
    return v.get<double>();
}
void ConfigFile::expect(const std::string& key, int64_t base_value) const {
    int64_t v = integer(key);
    if (v != base_value) throw key_error(key, fmt::format("is {} but the base has {}", v, base_value));
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


void hf_add_prompt_learning_fields(json& cfg, int64_t n, const GPTConfig& c) {
    cfg["num_virtual_tokens"] = n;
    cfg["token_dim"] = c.d_model;
    cfg["num_transformer_submodules"] = 1;
    cfg["num_attention_heads"] = c.n_heads;
    cfg["num_layers"] = c.n_layers;
    cfg["modules_to_save"] = nullptr;
}

int64_t hf_check_prompt_learning(const ConfigFile& cfg, const GPTConfig& c) {
    cfg.expect("token_dim", c.d_model);
    cfg.expect("num_layers", c.n_layers);
    cfg.expect("num_attention_heads", c.n_heads);
    if (cfg.has("num_transformer_submodules")) cfg.expect("num_transformer_submodules", 1);
    const int64_t n = cfg.integer("num_virtual_tokens");
    if (n < 0) throw cfg.key_error("num_virtual_tokens", fmt::format("{} must be >= 0", n));
    // HF PEFT's real tokens take positions n, n+1, ...: with n >= n_positions
    // none is left, and every forward would fail without naming this file.
    if (n >= c.max_seq)
        throw cfg.key_error("num_virtual_tokens",
                            fmt::format("{} leaves no position for a token: the base's n_positions is {} and the "
                                        "virtual tokens take positions 0..{}", n, c.max_seq, n - 1));
    return n;
}

// The default: the file holds hf_export()'s keys, whose tensors are the adapter's own.
void Adapter::hf_import_tensors(const std::string& path, const StFile& file) {
    const std::optional<HfExport> e = hf_export();
    if (!e) throw std::logic_error(fmt::format("import_hf: the {} adapter has no Hugging Face PEFT form", method()));
    check_tensors("import_hf", path, file, e->tensors);
    copy_tensors(file, e->tensors);
}

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

// ---- layouts ------------------------------------------------------------------------------
AdapterLayout adapter_layout(const std::string& dir) {
    const std::string path = in_dir(dir, kAdapterConfigFile);
    if (!fs::exists(path)) return AdapterLayout::none;
    const ConfigFile cfg("adapter_layout", path);
    if (cfg.has("format")) return AdapterLayout::peftlab;
    if (cfg.has("peft_type")) return AdapterLayout::hugging_face;
    throw cfg.error("neither a peftlab adapter (no key 'format') nor a Hugging Face PEFT one (no key 'peft_type')");
}

std::unique_ptr<Adapter> load_any_adapter(const std::string& dir, GPT& base, const LoadOptions& opts) {
    switch (adapter_layout(dir)) {
        case AdapterLayout::peftlab: return load_adapter(dir, base, opts);
        case AdapterLayout::hugging_face: return import_hf(dir, base, opts);
        case AdapterLayout::none: break;
    }
    throw std::runtime_error(fmt::format("load_any_adapter: '{}': no {} (not an adapter directory)", dir,
                                         kAdapterConfigFile));
}

namespace {
// A writer of one layout must not replace an adapter of the other: both use
// the same file names, so `export-hf A A` would destroy A.
void refuse_other_layout(const char* fn, const std::string& dir, AdapterLayout writing) {
    const AdapterLayout found = adapter_layout(dir);
    if (found == AdapterLayout::none || found == writing) return;
    throw std::invalid_argument(fmt::format("{}: '{}' already holds a {} adapter; writing the {} layout there would "
                                            "replace it: choose another directory",
                                            fn, dir, found == AdapterLayout::peftlab ? "peftlab" : "Hugging Face PEFT",
                                            writing == AdapterLayout::peftlab ? "peftlab" : "Hugging Face PEFT"));
}

// A reader given the other layout names the one it found and the reader that fits.
void expect_layout(const char* fn, const std::string& dir, AdapterLayout expected) {
    AdapterLayout found = AdapterLayout::none;
    try {
        found = adapter_layout(dir);
    } catch (const std::runtime_error&) {  // damaged: the reader names the file and key
    }
    if (found == expected || found == AdapterLayout::none) return;  // none: the reader's own "cannot open"
    throw std::runtime_error(fmt::format(
        "{}: '{}' holds a {} adapter; {}", fn, in_dir(dir, kAdapterConfigFile),
        found == AdapterLayout::peftlab ? "peftlab" : "Hugging Face PEFT",
        found == AdapterLayout::peftlab ? "read it with load_adapter (`adapter eval`, `adapter export-hf`)"
                                        : "read it with import_hf (`adapter import-hf`)"));
}
}  // namespace

// ---- own format ---------------------------------------------------------------------------
void save_adapter(const std::string& dir, const Adapter& adapter, bool inference, const std::string& original_base_hash,
                  const json& trained_on) {
    const char* fn = "save_adapter";
    refuse_other_layout(fn, dir, AdapterLayout::peftlab);
    GPT& base = attached_base(fn, adapter);
    std::string hash;
    if (adapter.changes_base()) {
        if (original_base_hash.empty())
            throw std::invalid_argument(fmt::format("{}: '{}': the {} adapter changed the base; pass original_base_hash "
                                                    "= base_hash(model) taken before training",
                                                    fn, dir, adapter.method()));
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
    json cfg = {{"format", kAdapterFormat},
                {"method", adapter.method()},
                {"options", adapter.options().to_json()},
                {"layers", adapter.layers()},
                {"inference", holds_inference},
                {"base_config", base.config().to_json()},
                {"base_hash", hash}};
    if (!trained_on.is_null()) cfg["trained_on"] = trained_on;
    write_in_dir(fn, dir, [&] {
        save_tensors(in_dir(dir, kAdapterWeightsFile), inference ? inference_tensors : adapter.parameters(),
                     kAdapterFormat);
        write_file_atomic(in_dir(dir, kAdapterConfigFile), cfg.dump(2) + "\n");
    });
}

json trained_on(const std::string& dir) {
    expect_layout("trained_on", dir, AdapterLayout::peftlab);
    const ConfigFile cfg("trained_on", in_dir(dir, kAdapterConfigFile));
    return cfg.has("trained_on") ? cfg.at("trained_on") : json();
}

AdapterConfig read_adapter_config(const char* fn, const std::string& dir) {
    expect_layout(fn, dir, AdapterLayout::peftlab);
    ConfigFile cfg(fn, in_dir(dir, kAdapterConfigFile));
    if (cfg.str("format") != kAdapterFormat)
        throw cfg.key_error("format", fmt::format("is '{}', expected '{}'", cfg.str("format"), kAdapterFormat));
    const std::string method = cfg.str("method");
    // A parser's std::invalid_argument becomes an error naming the file and key.
    const auto parsed = [&](const char* key, auto from_json) {
        try {
            return from_json(cfg.at(key));
        } catch (const std::invalid_argument& e) {
            throw cfg.key_error(key, e.what());
        }
    };
    const AdapterOptions opts = parsed("options", AdapterOptions::from_json);
    const json& layers_json = cfg.at("layers");
    // Indices in [0, 2^31 - 1]: 4294967296 would wrap to layer 0 in an int.
    auto index = [](const json& l) { return l.is_number_unsigned() && l.get<uint64_t>() <= uint64_t(INT32_MAX); };
    if (!layers_json.is_array() || !std::all_of(layers_json.begin(), layers_json.end(), index))
        throw cfg.key_error("layers", "must be a list of layer indices, got " + json_excerpt(layers_json));
    std::vector<int> layers = layers_json.get<std::vector<int>>();
    const bool inference = cfg.boolean("inference");
    GPTConfig base_config = parsed("base_config", GPTConfig::from_json);
    std::string hash = cfg.str("base_hash");
    std::unique_ptr<Adapter> adapter;
    try {
        adapter = make_adapter(method, opts);
    } catch (const std::invalid_argument& e) {  // not registered, or options the method refuses
        throw cfg.key_error("method", e.what());
    }
    return AdapterConfig{std::move(cfg), std::move(adapter), std::move(layers), inference, base_config, std::move(hash)};
}

std::unique_ptr<Adapter> load_adapter(const std::string& dir, GPT& base, const LoadOptions& load_opts) {
    const char* fn = "load_adapter";
    AdapterConfig saved = read_adapter_config(fn, dir);
    const ConfigFile& cfg = saved.file;
    check_base(saved, base);
    const std::string weights = in_dir(dir, kAdapterWeightsFile);
    const StFile file = load_safetensors_checked(fn, weights, load_opts);
    std::unique_ptr<Adapter> adapter = std::move(saved.adapter);
    check_sizes(cfg, "options", *adapter, base.config(), file);
    GradFlagsGuard grad_flags(base);
    try {
        adapter->attach(base);
    } catch (const std::invalid_argument& e) {
        throw cfg.key_error("options", e.what());
    }
    if (saved.inference) adapter->materialize();  // the file holds inference_parameters()
    if (adapter->layers() != saved.layers)
        throw cfg.key_error("layers", fmt::format("is {} but options.layers '{}' resolve to {}", json(saved.layers).dump(),
                                                  adapter->options().layers, json(adapter->layers()).dump()));
    check_tensors(fn, weights, file, adapter->parameters());
    copy_tensors(file, adapter->parameters());
    grad_flags.commit();
    return adapter;
}

// ---- Hugging Face PEFT layout --------------------------------------------------------------
void export_hf(const std::string& dir, const Adapter& adapter) {
    const char* fn = "export_hf";
    refuse_other_layout(fn, dir, AdapterLayout::hugging_face);
    GPT& base = attached_base(fn, adapter);
    // HF PEFT puts real tokens at n..n+T-1 after n virtual tokens; under "keep" they sit at
    // 0..T-1, so the same tensors would compute other logits there.
    if (adapter.virtual_tokens() > 0 && adapter.options().positions != "hf")
        throw std::invalid_argument(fmt::format(
            "{}: '{}': the {} adapter uses positions '{}' (real tokens at 0..T-1 after its {} virtual tokens), but "
            "Hugging Face PEFT places them at {}..T+{} (positions 'hf'), so its logits would differ there: train "
            "with positions hf (--positions hf) to export",
            fn, dir, adapter.method(), adapter.options().positions, adapter.virtual_tokens(), adapter.virtual_tokens(),
            adapter.virtual_tokens() - 1));
    std::optional<HfExport> e;
    try {
        e = adapter.hf_export();
    } catch (const std::invalid_argument& err) {
        throw std::invalid_argument(fmt::format("{}: '{}': {}", fn, dir, err.what()));
    }
    if (!e) {
        std::string exportable;
        for (const MethodInfo& m : methods())
            if (!make_adapter(m.name)->hf_peft_type().empty()) exportable += (exportable.empty() ? "" : ", ") + m.name;
        throw std::invalid_argument(fmt::format("{}: '{}': method '{}' has no Hugging Face PEFT counterpart "
                                                "(exportable: {})",
                                                fn, dir, adapter.method(), exportable));
    }
    json cfg = {{"task_type", "CAUSAL_LM"},
                {"base_model_name_or_path", kHfBaseNamePrefix + base_hash(base)},
                {"revision", nullptr},
                {"inference_mode", true}};
    for (const auto& [key, value] : e->config.items()) cfg[key] = value;
    write_in_dir(fn, dir, [&] {
        save_tensors(in_dir(dir, kAdapterWeightsFile), e->tensors, "pt");  // "pt": what transformers writes
        write_file_atomic(in_dir(dir, kAdapterConfigFile), cfg.dump(2) + "\n");
    });
}

std::unique_ptr<Adapter> import_hf(const std::string& dir, GPT& base, const LoadOptions& load_opts) {
    const char* fn = "import_hf";
    expect_layout(fn, dir, AdapterLayout::hugging_face);
    const ConfigFile cfg(fn, in_dir(dir, kAdapterConfigFile));
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

    // The weights first: a method may need them to choose its options (see Adapter::hf_import_options).
    const std::string weights = in_dir(dir, kAdapterWeightsFile);
    const StFile file = load_safetensors_checked(fn, weights, load_opts);
    // The method that reads this peft_type: each is asked in registry order.
    std::string method;
    std::optional<AdapterOptions> opts;
    std::string supported;
    for (const MethodInfo& m : methods()) {
        std::unique_ptr<Adapter> probe = make_adapter(m.name);
        const std::string type = probe->hf_peft_type();
        if (!type.empty() && supported.find(type) == std::string::npos) supported += (supported.empty() ? "" : ", ") + type;
        if (opts) continue;
        opts = probe->hf_import_options(cfg, c, file);
        if (opts) method = m.name;
    }
    if (!opts)
        throw cfg.key_error("peft_type", fmt::format("'{}' is not supported ({})",
                                                     peft_type, supported));
    opts->positions = "hf";  // PEFT's convention: real tokens follow the virtual tokens

    std::unique_ptr<Adapter> adapter;
    try {
        adapter = make_adapter(method, *opts);
    } catch (const std::invalid_argument& e) {
        throw cfg.error(e.what());
    }
    // The HF PEFT config field that sizes the tensors: prompt learning's num_virtual_tokens, or a rank.
    check_sizes(cfg, cfg.has("num_virtual_tokens") ? "num_virtual_tokens" : "r", *adapter, c, file);
    GradFlagsGuard grad_flags(base);
    try {
        adapter->attach(base);
    } catch (const std::invalid_argument& e) {
        throw cfg.error(e.what());
    }
    adapter->hf_import_tensors(weights, file);
    grad_flags.commit();
    return adapter;
}

}  // namespace peftlab::peft
