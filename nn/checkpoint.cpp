#include "nn/checkpoint.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <optional>
#include <cstring>
#include <set>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nn/json_limits.h"
#include "nn/safetensors.h"

namespace peftlab {
namespace {

using nlohmann::json;

std::runtime_error file_error(const char* fn, const std::string& path, const std::string& what) {
    return std::runtime_error(fmt::format("{}: '{}': {}", fn, path, what));
}

const std::string& require_meta(const char* fn, const std::string& path, const StFile& file, const std::string& key) {
    auto it = file.metadata.find(key);
    if (it == file.metadata.end()) throw file_error(fn, path, fmt::format("metadata key '{}' is missing", key));
    return it->second;
}

void require_format(const char* fn, const std::string& path, const StFile& file, const char* format) {
    auto it = file.metadata.find("format");
    if (it == file.metadata.end())
        throw file_error(fn, path, fmt::format("metadata key 'format' is missing (expected '{}')", format));
    if (it->second != format)
        throw file_error(fn, path, fmt::format("metadata key 'format' is '{}', expected '{}'", it->second, format));
}

// A file key and the tensor it must be copied into.
using Destinations = std::vector<std::pair<std::string, Tensor>>;

// Throws unless the file's tensors are exactly `dest`'s keys with equal shapes;
// `owner` says whose tensors they are ("the model"). Changes nothing.
void check_tensors(const char* fn, const std::string& path, const StFile& file, const Destinations& dest,
                   const char* owner) {
    std::set<std::string> wanted;
    for (auto& [key, t] : dest) {
        if (!wanted.insert(key).second)
            throw std::invalid_argument(fmt::format("{}: '{}': {} names tensor '{}' twice", fn, path, owner, key));
        auto it = file.tensors.find(key);
        if (it == file.tensors.end())
            throw file_error(fn, path,
                             fmt::format("missing tensor '{}' ({}: {} tensors, the file: {})", key, owner,
                                         dest.size(), file.tensors.size()));
        if (it->second.shape != t.shape())
            throw file_error(fn, path,
                             fmt::format("tensor '{}' has shape {} in the file but {} in {}", key,
                                         shape_str(it->second.shape), shape_str(t.shape()), owner));
    }
    for (auto& [key, st] : file.tensors)
        if (!wanted.count(key))
            throw file_error(fn, path, fmt::format("unexpected tensor '{}' (not in {})", key, owner));
}

// After check_tensors: cannot fail.
void copy_tensors(const StFile& file, const Destinations& dest) {
    for (auto& [key, t] : dest) {
        const std::vector<float>& src = file.tensors.at(key).data;
        if (!src.empty()) std::memcpy(Tensor(t).data(), src.data(), src.size() * sizeof(float));
    }
}

std::vector<StTensorRef> refs(const char* fn, const std::string& path, const Destinations& tensors) {
    std::vector<StTensorRef> out;
    for (auto& [name, t] : tensors) {
        if (!t.defined()) throw std::invalid_argument(fmt::format("{}: '{}': tensor '{}' is undefined", fn, path, name));
        out.push_back(StTensorRef{name, t.shape(), t.data()});
    }
    return out;
}

// The config of a model file (after checking its format tag).
GPTConfig file_config(const char* fn, const std::string& path, const StFile& file) {
    require_format(fn, path, file, kModelFormat);
    const std::string& text = require_meta(fn, path, file, "config");  // its error names fn and path already
    try {
        return GPTConfig::from_json(parse_json_limited(text, "metadata key 'config'"));
    } catch (const std::invalid_argument& e) {
        throw file_error(fn, path, fmt::format("metadata key 'config': {}", e.what()));
    } catch (const std::runtime_error& e) {
        throw file_error(fn, path, e.what());
    }
}

// Parameters of a GPT of this config, or nullopt when the count does not fit in
// 64 bits: V*d (wte) + T*d (wpe) + L*(4d^2 + 2dF + F + 9d) (blocks: q, k, v, o
// with biases; fc, proj with biases; ln1, ln2) + 2d (ln_f) + V*d (head, untied).
// Known before anything is allocated, so a file's config cannot make us build a
// model larger than the tensors the file holds (a test checks this against
// GPT::named_parameters()).
std::optional<uint64_t> parameter_count(const GPTConfig& c) {
    const uint64_t V = uint64_t(c.vocab), d = uint64_t(c.d_model), L = uint64_t(c.n_layers), F = uint64_t(c.d_ff),
                   T = uint64_t(c.max_seq);
    uint64_t dd, dF, block, blocks, vd, td, n = 0;
    // d*d not overflowing bounds d below 2^32, so 9d and 2d cannot overflow.
    if (__builtin_mul_overflow(d, d, &dd) || __builtin_mul_overflow(d, F, &dF) || dF > UINT64_MAX / 2 ||
        __builtin_mul_overflow(dd, uint64_t(4), &block) || __builtin_add_overflow(block, 2 * dF, &block) ||
        __builtin_add_overflow(block, F + 9 * d, &block) ||
        __builtin_mul_overflow(block, L, &blocks) || __builtin_mul_overflow(V, d, &vd) ||
        __builtin_mul_overflow(T, d, &td) || __builtin_add_overflow(blocks, vd, &n) || __builtin_add_overflow(n, td, &n) ||
        __builtin_add_overflow(n, 2 * d, &n) || (!c.tie_embeddings && __builtin_add_overflow(n, vd, &n)))
        return std::nullopt;
    return n;
}

// Model files: config must equal the model's, then exactly the model's parameters.
Metadata load_model_checked(const char* fn, const std::string& path, const StFile& file, GPT& model) {
    const GPTConfig cfg = file_config(fn, path, file);
    if (!(cfg == model.config())) {
        const json in_file = cfg.to_json(), in_model = model.config().to_json();
        for (auto& [field, value] : in_model.items())
            if (in_file[field] != value)
                throw file_error(fn, path,
                                 fmt::format("metadata key 'config': field '{}' is {} in the file but {} in the model",
                                             field, in_file[field].dump(), value.dump()));
    }
    check_tensors(fn, path, file, model.named_parameters(), "the model");
    copy_tensors(file, model.named_parameters());
    return file.metadata;
}

bool is_reserved_train_key(const std::string& key) {
    return key == "format" || key == "step" || key.rfind("rng.", 0) == 0;
}

template <class Int>
Int parse_int(const char* fn, const std::string& path, const std::string& key, const std::string& text) {
    Int v{};
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || text.empty())
        throw file_error(fn, path, fmt::format("metadata key '{}' = '{}' is not a valid integer", key, text));
    return v;
}

}  // namespace

StFile load_safetensors_checked(const char* fn, const std::string& path, const LoadOptions& opts) {
    StFile file;
    try {
        file = load_safetensors(path);
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(fmt::format("{}: {}", fn, e.what()));
    }
    if (opts.allow_nonfinite) return file;
    for (const auto& [name, t] : file.tensors) {
        const auto bad = std::find_if(t.data.begin(), t.data.end(), [](float v) { return !std::isfinite(v); });
        if (bad != t.data.end())
            throw file_error(fn, path,
                             fmt::format("tensor '{}' holds {} at element {} (of {}); refusing non-finite weights "
                                         "(LoadOptions::allow_nonfinite accepts them)",
                                         name, *bad, bad - t.data.begin(), t.data.size()));
    }
    return file;
}

// ---- named tensors --------------------------------------------------------------------
void save_named(const std::string& path, const NamedTensors& tensors, const Metadata& metadata) {
    save_safetensors(path, refs("save_named", path, tensors), metadata);
}

Metadata load_named_into(const std::string& path, const NamedTensors& into, const LoadOptions& opts) {
    const StFile file = load_safetensors_checked("load_named_into", path, opts);
    check_tensors("load_named_into", path, file, into, "the destination tensors");
    copy_tensors(file, into);
    return file.metadata;
}

// ---- models -----------------------------------------------------------------------------
void save_model(const std::string& path, const GPT& model, const Metadata& extra) {
    Metadata meta = extra;
    for (const char* key : {"format", "config"})
        if (meta.count(key))
            throw std::invalid_argument(
                fmt::format("save_model: '{}': extra metadata may not set reserved key '{}'", path, key));
    meta["format"] = kModelFormat;
    meta["config"] = model.config().to_json().dump();
    save_safetensors(path, refs("save_model", path, model.named_parameters()), meta);
}

Metadata load_model(const std::string& path, GPT& model, const LoadOptions& opts) {
    return load_model_checked("load_model", path, load_safetensors_checked("load_model", path, opts), model);
}

std::unique_ptr<GPT> load_model_new(const std::string& path, const LoadOptions& opts) {
    const char* fn = "load_model_new";
    const StFile file = load_safetensors_checked(fn, path, opts);
    const GPTConfig cfg = file_config(fn, path, file);
    uint64_t in_file = 0;
    for (const auto& [name, t] : file.tensors) in_file += t.data.size();  // bounded by the file size
    const std::optional<uint64_t> needed = parameter_count(cfg);
    // The count is checked before a model of the config's size is allocated.
    // Within twice the file's floats the model is built anyway, so that the
    // error names the missing, extra or misshapen tensor (check_tensors).
    if (needed && *needed != in_file && *needed <= 2 * in_file)
        check_tensors(fn, path, file, GPT(cfg, 0).named_parameters(), "the model");
    if (!needed || *needed != in_file)
        throw file_error(fn, path,
                         fmt::format("metadata key 'config' describes a model of {} parameters but the file holds {}",
                                     needed ? fmt::format("{}", *needed) : std::string("more than 2^64"), in_file));
    auto model = std::make_unique<GPT>(cfg, 0);  // initial values are overwritten
    load_model_checked(fn, path, file, *model);
    return model;
}

// ---- training state ------------------------------------------------------------------------
void save_training_state(const std::string& path, const NamedTensors& tensors, const Optimizer& opt,
                         const NamedRngs& rngs, const TrainingState& state) {
    Metadata meta;
    for (auto& [key, value] : state.extra) {
        if (is_reserved_train_key(key))
            throw std::invalid_argument(fmt::format(
                "save_training_state: '{}': extra metadata key '{}' is reserved (format, step, rng.*)", path, key));
        meta[key] = value;
    }
    meta["format"] = kTrainStateFormat;
    meta["step"] = std::to_string(state.step);
    for (auto& [name, rng] : rngs) meta["rng." + name] = std::to_string(rng->state());

    Destinations all;
    for (auto& [name, t] : tensors) all.emplace_back("params." + name, t);
    for (auto& [key, t] : opt.state_dict()) all.emplace_back("optim." + key, t);
    save_safetensors(path, refs("save_training_state", path, all), meta);
}

TrainingState load_training_state(const std::string& path, const NamedTensors& tensors, Optimizer& opt,
                                  const NamedRngs& rngs, const LoadOptions& opts) {
    const char* fn = "load_training_state";
    const StFile file = load_safetensors_checked(fn, path, opts);
    require_format(fn, path, file, kTrainStateFormat);

    TrainingState state;
    state.step = parse_int<int64_t>(fn, path, "step", require_meta(fn, path, file, "step"));
    if (state.step < 0) throw file_error(fn, path, fmt::format("metadata key 'step' = {} is negative", state.step));
    std::vector<uint64_t> rng_states;
    for (auto& [name, rng] : rngs) {
        const std::string key = "rng." + name;
        rng_states.push_back(parse_int<uint64_t>(fn, path, key, require_meta(fn, path, file, key)));
    }
    for (auto& [key, value] : file.metadata)
        if (!is_reserved_train_key(key)) state.extra[key] = value;

    Destinations params, optim;
    for (auto& [name, t] : tensors) params.emplace_back("params." + name, t);
    for (auto& [key, t] : opt.state_dict()) optim.emplace_back("optim." + key, t);
    Destinations all = params;
    all.insert(all.end(), optim.begin(), optim.end());
    check_tensors(fn, path, file, all, "the given tensors and optimizer state");

    // The optimizer validates its state (e.g. step counts) and loads all or nothing,
    // so it goes first: after it succeeds nothing below can fail.
    NamedTensors opt_state;
    for (auto& [key, t] : optim) {
        const StTensor& st = file.tensors.at(key);
        opt_state.emplace_back(key.substr(std::strlen("optim.")), Tensor::from_data(st.shape, st.data));
    }
    try {
        opt.load_state_dict(opt_state);
    } catch (const std::invalid_argument& e) {
        throw file_error(fn, path, e.what());
    }
    copy_tensors(file, params);
    for (size_t i = 0; i < rngs.size(); ++i) rngs[i].second->set_state(rng_states[i]);
    return state;
}

}  // namespace peftlab
