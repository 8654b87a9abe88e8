// (IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
// and Cheaper than In-Context Learning"): learned vectors that rescale
// activations, initialised to ones so training starts from the base. As in
// Hugging Face PEFT's IA3: a target Linear W [out, in] gets l [out] scaling its
// output, y = (x W^T + b) * l (keys and values); a feed-forward target gets
// l [in] scaling its input, y = (x * l) W^T + b (the MLP's inner activation,
// the input of mlp.proj). Default targets k_proj, v_proj, proj with proj
// feed-forward: L*(2d + F) parameters.
//
// Own options ("ia3" section, PEFT's names): target_modules (["k_proj",
// "v_proj", "proj"]; of q_proj, k_proj, v_proj, o_proj, fc, proj),
// feedforward_modules (["proj"], a subset of target_modules).
// Mergeable: W rows (and b) scaled by l, or W columns by l for feed-forward.
// Hugging Face PEFT: IA3, "base_model.model.<module path>.ia3_l" shaped
// [out, 1], or [1, in] for feed-forward modules (all layers only: IA3Config has
// no layers_to_transform).
#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

namespace {
constexpr const char* kHfKeyPrefix = "base_model.model.";  // PeftModel -> IA3Model -> the LM

std::string module_of(const std::string& t) {
    if (t == "q_proj" || t == "k_proj" || t == "v_proj" || t == "o_proj") return "attn." + t;
    if (t == "fc" || t == "proj") return "mlp." + t;
    throw std::invalid_argument(
        fmt::format("ia3 adapter: target '{}' is not one of q_proj, k_proj, v_proj, o_proj, fc, proj", t));
}

bool has(const std::vector<std::string>& v, const std::string& s) { return std::find(v.begin(), v.end(), s) != v.end(); }

// Targets known and not repeated; feed-forward modules among the targets.
void check(const std::vector<std::string>& targets, const std::vector<std::string>& feedforward) {
    for (size_t i = 0; i < targets.size(); ++i) {
        module_of(targets[i]);
        if (std::find(targets.begin(), targets.begin() + long(i), targets[i]) != targets.begin() + long(i))
            throw std::invalid_argument(fmt::format("ia3 adapter: target '{}' is listed twice", targets[i]));
    }
    for (const std::string& f : feedforward)
        if (!has(targets, f))
            throw std::invalid_argument(
                fmt::format("ia3 adapter: feedforward module '{}' is not among the target modules", f));
}
}  // namespace

class IA3 : public Adapter {
public:
    explicit IA3(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "ia3");
        targets_ = own.strings("target_modules", {"k_proj", "v_proj", "proj"});
        feedforward_ = own.strings("feedforward_modules", {"proj"});
        check(targets_, feedforward_);
        set_own_options("ia3", own.finish());
    }
    std::string method() const override { return "ia3"; }

    bool adapts_linear(const std::string& path) const override { return !merged() && scales_.count(path) > 0; }
    Tensor linear_input(const std::string& path, const Tensor& x, const ForwardInfo&) override {
        const Scale* s = find(path);
        return s && s->feedforward ? mul(x, s->l) : Tensor();  // [..., in] * [in]
    }
    Tensor linear_output(const std::string& path, const Tensor&, const Tensor& y, const ForwardInfo&) override {
        const Scale* s = find(path);
        return s && !s->feedforward ? mul(y, s->l) : Tensor();  // [..., out] * [out]
    }

    ParamFormula formula(const GPTConfig& c) const override {
        int64_t per_layer = 0;
        std::string text;
        for (const std::string& t : targets_) {
            const bool ff = has(feedforward_, t), mlp_wide = (t == "fc" && !ff) || (t == "proj" && ff);
            per_layer += mlp_wide ? c.d_ff : c.d_model;
            text += (text.empty() ? "" : " + ") + std::string(mlp_wide ? "F" : "d");
        }
        return {chosen_layers(c) * per_layer, "L*(" + text + ")"};
    }
    // Scales start at 1 and move like prefix vectors; decay would pull them towards 0, not towards the base.
    std::vector<double> lr_grid() const override { return {3e-3, 1e-2, 3e-2}; }
    bool mergeable() const override { return true; }

    cost::Sym cost_linear_input(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t in,
                                cost::Sym x) const override {
        const std::string target = target_of(c, path);
        return !target.empty() && has(feedforward_, target) ? cost::mul(t, R * in, x, cost::kParam) : x;
    }
    cost::Sym cost_linear(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t,
                          int64_t out, cost::Sym, cost::Sym y) const override {
        const std::string target = target_of(c, path);
        return !target.empty() && !has(feedforward_, target) ? cost::mul(t, R * out, y, cost::kParam) : y;
    }
    // Decoding counts the merged model: no extra work.
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        std::vector<cost::ParamGroup> g;
        const int64_t per_layer = formula(c).count / std::max<int64_t>(1, chosen_layers(c));
        if (per_layer)
            for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), per_layer});
        return g;
    }

    std::string hf_peft_type() const override { return "IA3"; }
    std::optional<HfExport> hf_export() const override {
        if (int64_t(layers_.size()) != base_->config().n_layers)
            throw std::invalid_argument(fmt::format(
                "the ia3 adapter scales layers {} only, but PEFT's IA3Config has no layers_to_transform; train "
                "with layers=all to export",
                nlohmann::json(layers_).dump()));
        NoGradGuard no_grad;  // views of the vectors, recorded nowhere
        HfExport e;
        e.config["peft_type"] = "IA3";
        e.config["target_modules"] = targets_;
        e.config["feedforward_modules"] = feedforward_;
        e.config["fan_in_fan_out"] = false;  // our weights are [out, in], as nn.Linear's
        e.config["init_ia3_weights"] = true;
        e.config["modules_to_save"] = nullptr;
        for (const auto& [path, s] : scales_) {
            const int64_t n = s.l.dim(0);
            e.tensors.emplace_back(kHfKeyPrefix + path + ".ia3_l", reshape(s.l, s.feedforward ? Shape{1, n} : Shape{n, 1}));
        }
        return e;
    }
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig&) const override {
        if (cfg.str("peft_type") != "IA3") return std::nullopt;
        AdapterOptions o;
        nlohmann::json& own = o.section("ia3");
        for (const char* key : {"target_modules", "feedforward_modules"}) {
            const nlohmann::json& v = cfg.at(key);
            if (!v.is_array() || !std::all_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_string(); }))
                throw cfg.key_error(key, "must be a list of module names (regex strings are not supported), got " + v.dump());
            own[key] = v;
        }
        try {
            check(own["target_modules"].get<std::vector<std::string>>(), own["feedforward_modules"].get<std::vector<std::string>>());
        } catch (const std::invalid_argument& e) {
            throw cfg.key_error("target_modules", e.what());
        }
        if (cfg.has("fan_in_fan_out") && cfg.boolean("fan_in_fan_out")) throw cfg.key_error("fan_in_fan_out", "true is not supported");
        if (cfg.has("modules_to_save") && !cfg.at("modules_to_save").empty())
            throw cfg.key_error("modules_to_save", "extra trained modules are not supported");
        return o;
    }
    // The file's [out, 1] / [1, in] vectors into ours ([out] / [in]).
    void hf_import_tensors(const std::string& path, const StFile& file) override {
        NoGradGuard no_grad;
        NamedTensors dest;
        for (const auto& [p, s] : scales_) {
            const int64_t n = s.l.dim(0);
            dest.emplace_back(kHfKeyPrefix + p + ".ia3_l", reshape(s.l, s.feedforward ? Shape{1, n} : Shape{n, 1}));
        }
        check_tensors("import_hf", path, file, dest);
        copy_tensors(file, dest);  // a reshape shares its input's storage
    }

protected:
    void build(GPT& base) override {
        for (int l : layers_)
            for (const std::string& t : targets_) {
                const std::string path = fmt::format("blocks.{}.{}", l, module_of(t));
                const Tensor W = base.parameter(path + ".weight");
                Scale s;
                s.feedforward = has(feedforward_, t);
                s.l = add_param(path + ".ia3_l", Tensor::ones({s.feedforward ? W.dim(1) : W.dim(0)}));
                scales_.emplace(path, s);
            }
    }
    // Output scaling: W[o, :] *= l[o], b[o] *= l[o]; input scaling: W[:, i] *= l[i].
    void merge_into_base() override {
        for (auto& [path, s] : scales_) {
            Tensor W = base_->parameter(path + ".weight"), b = base_->parameter(path + ".bias");
            s.weight_copy = W.clone();
            s.bias_copy = b.clone();
            const int64_t out = W.dim(0), in = W.dim(1);
            const float* l = s.l.data();
            for (int64_t o = 0; o < out; ++o)
                for (int64_t i = 0; i < in; ++i) W.data()[o * in + i] *= s.feedforward ? l[i] : l[o];
            if (!s.feedforward)
                for (int64_t o = 0; o < out; ++o) b.data()[o] *= l[o];
        }
    }
    void restore_base() override {
        for (auto& [path, s] : scales_) {
            base_->parameter(path + ".weight").copy_from(s.weight_copy);
            base_->parameter(path + ".bias").copy_from(s.bias_copy);
            s.weight_copy = s.bias_copy = Tensor();
        }
    }

private:
    struct Scale {
        Tensor l;  // [out], or [in] for a feed-forward module
        bool feedforward = false;
        Tensor weight_copy, bias_copy;  // the base's W and b before merge
    };
    const Scale* find(const std::string& path) const {
        if (merged()) return nullptr;
        auto it = scales_.find(path);
        return it == scales_.end() ? nullptr : &it->second;
    }
    // The target name of a Linear path in a chosen layer ("blocks.1.mlp.proj" -> "proj"), "" if none.
    std::string target_of(const GPTConfig& c, const std::string& path) const {
        if (!in_chosen_layer(c, path)) return "";
        for (const std::string& t : targets_) {
            const std::string m = "." + module_of(t);
            if (path.size() >= m.size() && path.compare(path.size() - m.size(), m.size(), m) == 0) return t;
        }
        return "";
    }

    std::vector<std::string> targets_, feedforward_;
    std::map<std::string, Scale> scales_;  // target Linear path -> its vector
};

std::unique_ptr<Adapter> make_ia3(const AdapterOptions& o) { return std::make_unique<IA3>(o); }

}  // namespace peftlab::peft
