// LN-tuning (Qi et al. 2022, "Parameter-Efficient Tuning on Layer
// Normalization for Pre-trained Language Models"): only the LayerNorms'
// gains and biases train. As in Hugging Face PEFT's LN_TUNING, each target
// LayerNorm gets a trainable copy of its weight and bias [d] (initialised to
// the base's, so training starts from the base), which the model uses in
// place of the base's through the layer_norm_params hook; the base's own stay
// frozen, so one base serves many adapters, mixed per batch row. Default
// targets ln1, ln2 of every chosen block and the final ln_f (PEFT's GPT-2
// default ln_1, ln_2, ln_f): (2L+1)*2d parameters.
//
// Own options ("ln-tuning" section, PEFT's names): target_modules (["ln1",
// "ln2", "ln_f"]; ln1 and ln2 in the chosen layers, ln_f once).
// Mergeable: the copies are written into the base LayerNorms (the base's kept
// to restore). Hugging Face PEFT: LN_TUNING on GPT2LMHeadModel's names,
// "base_model.model.transformer.h.N.ln_1.ln_tuning_layers.{weight,bias}" [d]
// (ln_2 likewise, "transformer.ln_f" for the final one), target_modules
// ["ln_1", "ln_2", "ln_f"] (all layers only: LNTuningConfig has no
// layers_to_transform).
#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "peft/adapter.h"
#include "nn/hf_gpt2.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

namespace {
constexpr const char* kHfKeyPrefix = "base_model.model.";  // PeftModel -> LNTuningModel -> the LM

// Our LayerNorm names and GPT2LMHeadModel's (modeling_gpt2.py: GPT2Block.ln_1/ln_2, GPT2Model.ln_f).
const std::vector<std::pair<std::string, std::string>> kHfNames = {{"ln1", "ln_1"}, {"ln2", "ln_2"}, {"ln_f", "ln_f"}};

// "blocks.3.ln1" -> "transformer.h.3.ln_1", "ln_f" -> "transformer.ln_f".
std::string hf_module_path(const std::string& path) {
    if (path == "ln_f") return "transformer.ln_f";
    const size_t dot = path.rfind('.');
    const int layer = std::stoi(path.substr(path.find('.') + 1));
    for (const auto& [ours, hf] : kHfNames)
        if (path.substr(dot + 1) == ours) return hf_gpt2_module_key(layer, hf);
    throw std::logic_error("ln-tuning: no GPT-2 name for " + path);
}

// Targets known and not repeated.
void check(const std::vector<std::string>& targets) {
    for (size_t i = 0; i < targets.size(); ++i) {
        const std::string& t = targets[i];
        if (t != "ln1" && t != "ln2" && t != "ln_f")
            throw std::invalid_argument(fmt::format("ln-tuning adapter: target '{}' is not one of ln1, ln2, ln_f", t));
        if (std::find(targets.begin(), targets.begin() + long(i), t) != targets.begin() + long(i))
            throw std::invalid_argument(fmt::format("ln-tuning adapter: target '{}' is listed twice", t));
    }
}
}  // namespace

class LNTuning : public Adapter {
public:
    explicit LNTuning(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "ln-tuning");
        targets_ = own.strings("target_modules", {"ln1", "ln2", "ln_f"});
        check(targets_);
        set_own_options("ln-tuning", own.finish());
    }
    std::string method() const override { return "ln-tuning"; }

    bool adapts_linear(const std::string&) const override { return false; }
    NormParams layer_norm_params(const std::string& path, const ForwardInfo&) override {
        if (merged()) return {};
        auto it = norms_.find(path);
        return it == norms_.end() ? NormParams{} : NormParams{it->second.weight, it->second.bias, {}};
    }

    ParamFormula formula(const GPTConfig& c) const override {
        const int64_t in_blocks = in_block_targets(), f = final_target();
        std::string n = in_blocks ? (in_blocks == 1 ? "L" : "2L") : "";
        if (f) n += in_blocks ? "+1" : "1";
        const bool sum = in_blocks && f;
        return {(in_blocks * chosen_layers(c) + f) * 2 * c.d_model, (sum ? "(" + n + ")" : n) + "*2d"};
    }
    // Gains and biases start at the base's and move like scaling vectors; decay would pull them towards 0.
    std::vector<double> lr_grid() const override { return {1e-3, 3e-3, 1e-2}; }
    bool mergeable() const override { return true; }

    // The same layer_norm op on a trained gain and bias: dgamma and dbeta (dW) are the only new terms.
    void cost_layer_norm(const std::string& path, const GPTConfig& c, cost::Sym& gamma, cost::Sym& beta) const override {
        if (targets(c, path)) gamma = beta = cost::kParam;
    }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        std::vector<cost::ParamGroup> g;
        if (const int64_t n = in_block_targets())
            for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), n * 2 * c.d_model});
        if (final_target()) g.push_back({"head", 2 * c.d_model});
        return g;
    }

    std::string hf_peft_type() const override { return "LN_TUNING"; }
    std::optional<HfExport> hf_export() const override {
        if (in_block_targets() && int64_t(layers_.size()) != base_->config().n_layers)
            throw std::invalid_argument(fmt::format(
                "the ln-tuning adapter tunes layers {} only, but PEFT's LNTuningConfig has no layers_to_transform; "
                "train with layers=all to export",
                nlohmann::json(layers_).dump()));
        HfExport e;
        e.config["peft_type"] = "LN_TUNING";
        nlohmann::json targets = nlohmann::json::array();
        for (const std::string& t : targets_)
            for (const auto& [ours, hf] : kHfNames)
                if (t == ours) targets.push_back(hf);
        e.config["target_modules"] = targets;
        e.config["exclude_modules"] = nullptr;
        e.config["modules_to_save"] = nullptr;
        for (const auto& [path, n] : norms_) {
            e.tensors.emplace_back(kHfKeyPrefix + hf_module_path(path) + ".ln_tuning_layers.weight", n.weight);
            e.tensors.emplace_back(kHfKeyPrefix + hf_module_path(path) + ".ln_tuning_layers.bias", n.bias);
        }
        return e;
    }
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig&, const StFile&) const override {
        if (cfg.str("peft_type") != "LN_TUNING") return std::nullopt;
        const nlohmann::json& v = cfg.at("target_modules");
        if (!v.is_array() || !std::all_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_string(); }))
            throw cfg.key_error("target_modules", "must be a list of module names (regex strings are not supported), got " + v.dump());
        std::vector<std::string> ours;
        for (const nlohmann::json& t : v) {
            auto it = std::find_if(kHfNames.begin(), kHfNames.end(), [&](const auto& n) { return n.second == t; });
            if (it == kHfNames.end())
                throw cfg.key_error("target_modules", fmt::format("'{}' is not one of GPT-2's ln_1, ln_2, ln_f", t.get<std::string>()));
            ours.push_back(it->first);
        }
        try {
            check(ours);
        } catch (const std::invalid_argument& e) {
            throw cfg.key_error("target_modules", e.what());
        }
        for (const char* key : {"exclude_modules", "modules_to_save"})
            if (cfg.has(key) && !cfg.at(key).empty()) throw cfg.key_error(key, "is not supported (must be null)");
        AdapterOptions o;
        o.section("ln-tuning")["target_modules"] = ours;
        return o;
    }

protected:
    void build(GPT& base) override {
        for (const std::string& path : paths(base.config())) {
            Norm n;
            n.weight = add_param(path + ".ln_tuning_layers.weight", base.parameter(path + ".weight").clone());
            n.bias = add_param(path + ".ln_tuning_layers.bias", base.parameter(path + ".bias").clone());
            norms_.emplace(path, n);
        }
    }
    // The base's LayerNorm takes the trained copy (PEFT's LNTuningLayer.merge swaps the two).
    void merge_into_base() override {
        for (auto& [path, n] : norms_) {
            Tensor w = merge_target(path + ".weight"), b = merge_target(path + ".bias");
            w.copy_from(n.weight);
            b.copy_from(n.bias);
        }
    }

private:
    struct Norm {
        Tensor weight, bias;  // [d], trained
    };
    int64_t in_block_targets() const {
        return int64_t(std::count(targets_.begin(), targets_.end(), "ln1") + std::count(targets_.begin(), targets_.end(), "ln2"));
    }
    int64_t final_target() const { return std::count(targets_.begin(), targets_.end(), "ln_f"); }
    // The target LayerNorms' paths in a model of this config, in model order.
    std::vector<std::string> paths(const GPTConfig& c) const {
        std::vector<std::string> p;
        for (int l : chosen_layers_of(c))
            for (const char* t : {"ln1", "ln2"})
                if (std::count(targets_.begin(), targets_.end(), t)) p.push_back(fmt::format("blocks.{}.{}", l, t));
        if (final_target()) p.push_back("ln_f");
        return p;
    }
    bool targets(const GPTConfig& c, const std::string& path) const {
        const std::vector<std::string> p = paths(c);
        return std::find(p.begin(), p.end(), path) != p.end();
    }

    std::vector<std::string> targets_;
    std::map<std::string, Norm> norms_;  // LayerNorm path -> its trained copy
};

std::unique_ptr<Adapter> make_ln_tuning(const AdapterOptions& o) { return std::make_unique<LNTuning>(o); }

}  // namespace peftlab::peft
