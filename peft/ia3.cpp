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
// Hugging Face PEFT: IA3 on GPT-2's module names,
// "base_model.model.transformer.h.N.<module>.ia3_l" shaped [out, 1], or [1, in]
// for feed-forward modules (all layers only: IA3Config has no
// layers_to_transform); q/k/v share c_attn's [3d, 1] (see hf_export).
#include <algorithm>
#include <map>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/hf_gpt2.h"
#include "nn/safetensors.h"
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
    // GPT-2 module names (nn/hf_gpt2.h): PEFT's IA3 on a Conv1D holds ia3_l
    // [out, 1] (output scaling) or [1, in] (feed-forward: input scaling).
    // Our vectors on q_proj / k_proj / v_proj become one c_attn vector [3d, 1]
    // whose untargeted projections' rows are 1 (a scale of 1 is no change);
    // o_proj, fc and proj are attn.c_proj, c_fc and mlp.c_proj. c_attn has one
    // input for q, k and v, so a feed-forward q/k/v target has no GPT-2 form
    // and is refused.
    std::optional<HfExport> hf_export() const override {
        const GPTConfig& c = base_->config();
        if (int64_t(layers_.size()) != c.n_layers)
            throw std::invalid_argument(fmt::format(
                "the ia3 adapter scales layers {} only, but PEFT's IA3Config has no layers_to_transform; train "
                "with layers=all to export",
                nlohmann::json(layers_).dump()));
        NoGradGuard no_grad;
        HfExport e;
        e.config["peft_type"] = "IA3";
        e.config["target_modules"] = nlohmann::json::array();
        e.config["feedforward_modules"] = nlohmann::json::array();
        e.config["fan_in_fan_out"] = true;  // GPT-2's Conv1D weights are [in, out]
        e.config["init_ia3_weights"] = true;
        e.config["modules_to_save"] = nullptr;
        for (const HfGpt2Module& m : hf_gpt2_block_modules()) {
            std::vector<std::string> members;
            for (const std::string& lin : m.linears)
                for (const std::string& t : targets_)
                    if (module_of(t) == lin) members.push_back(t);
            if (members.empty()) continue;
            const bool ff = has(feedforward_, members[0]);
            for (const std::string& t : members)
                if (m.linears.size() > 1 && has(feedforward_, t))
                    throw std::invalid_argument(fmt::format(
                        "the ia3 adapter scales the input of {} (feed-forward), but GPT-2's c_attn has one input for "
                        "q, k and v: no PEFT form on GPT-2",
                        t));
            e.config["target_modules"].push_back(m.target);
            if (ff) e.config["feedforward_modules"].push_back(m.target);
            for (int l : layers_) {
                int64_t total = 0;
                for (const std::string& lin : m.linears)
                    total += ff ? 0 : base_->parameter(fmt::format("blocks.{}.{}.weight", l, lin)).dim(0);
                Tensor v;
                if (ff) {
                    const Tensor& src = scales_.at(fmt::format("blocks.{}.{}", l, m.linears[0])).l;
                    v = reshape(src.clone(), {1, src.dim(0)});
                } else {
                    v = Tensor::ones({total, 1});
                    int64_t row = 0;
                    for (const std::string& lin : m.linears) {
                        const std::string path = fmt::format("blocks.{}.{}", l, lin);
                        const int64_t out = base_->parameter(path + ".weight").dim(0);
                        auto it = scales_.find(path);
                        if (it != scales_.end())
                            std::copy(it->second.l.data(), it->second.l.data() + out, v.data() + row);
                        row += out;
                    }
                }
                e.tensors.emplace_back(kHfKeyPrefix + hf_gpt2_module_key(l, m.name) + ".ia3_l", v);
            }
        }
        return e;
    }
    // target_modules / feedforward_modules on GPT-2 names, mapped back; a
    // c_attn vector scales the projections whose rows are not all 1 in some
    // layer (all 1: k and v, the paper's choice; the function is the same).
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c,
                                                    const StFile& file) const override {
        if (cfg.str("peft_type") != "IA3") return std::nullopt;
        auto modules = [&](const char* key) {
            const nlohmann::json& v = cfg.at(key);
            if (!v.is_array() || !std::all_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_string(); }))
                throw cfg.key_error(key, "must be a list of module names (regex strings are not supported), got " + v.dump());
            std::vector<const HfGpt2Module*> out;
            for (const auto& t : v) {
                const auto sel = hf_gpt2_select(t.get<std::string>());
                if (sel.empty())
                    throw cfg.key_error(key, fmt::format("'{}' names no Conv1D module of a GPT-2 block (c_attn, "
                                                         "c_proj, c_fc, attn.c_proj, mlp.c_proj)",
                                                         t.get<std::string>()));
                for (const HfGpt2Module* m : sel)
                    if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
            }
            return out;
        };
        const auto targets = modules("target_modules"), feedforward = modules("feedforward_modules");
        if (cfg.has("modules_to_save") && !cfg.at("modules_to_save").empty())
            throw cfg.key_error("modules_to_save", "extra trained modules are not supported");
        std::vector<std::string> ours, ours_ff;
        for (const HfGpt2Module& m : hf_gpt2_block_modules()) {
            if (std::find(targets.begin(), targets.end(), &m) == targets.end()) {
                if (std::find(feedforward.begin(), feedforward.end(), &m) != feedforward.end())
                    throw cfg.key_error("feedforward_modules", fmt::format("'{}' is not among target_modules", m.target));
                continue;
            }
            const bool ff = std::find(feedforward.begin(), feedforward.end(), &m) != feedforward.end();
            if (m.linears.size() == 1) {
                ours.push_back(m.linears[0].substr(m.linears[0].find('.') + 1));
                if (ff) ours_ff.push_back(ours.back());
                continue;
            }
            if (ff)
                throw cfg.key_error("feedforward_modules",
                                    fmt::format("'{}' scales c_attn's input for q, k and v together; peftlab's ia3 has "
                                                "no such scale",
                                                m.target));
            std::vector<bool> used(m.linears.size(), false);
            for (int l = 0; l < c.n_layers; ++l) {
                auto it = file.tensors.find(kHfKeyPrefix + hf_gpt2_module_key(l, m.name) + ".ia3_l");
                if (it == file.tensors.end() || int64_t(it->second.data.size()) != 3 * c.d_model) continue;
                for (size_t j = 0; j < used.size(); ++j)
                    for (int64_t i = 0; i < c.d_model; ++i) used[j] = used[j] || it->second.data[size_t(int64_t(j) * c.d_model + i)] != 1.f;
            }
            if (std::none_of(used.begin(), used.end(), [](bool b) { return b; })) used = {false, true, true};
            for (size_t j = 0; j < used.size(); ++j)
                if (used[j]) ours.push_back(m.linears[j].substr(m.linears[j].find('.') + 1));
        }
        if (ours.empty()) throw cfg.key_error("target_modules", "is empty");
        AdapterOptions o;
        nlohmann::json& own = o.section("ia3");
        own["target_modules"] = ours;
        own["feedforward_modules"] = ours_ff;
        return o;
    }
    // The file's GPT-2 vectors into ours ([out] / [in]); rows of a c_attn
    // projection we do not scale must be 1.
    void hf_import_tensors(const std::string& path, const StFile& file) override {
        NoGradGuard no_grad;
        NamedTensors expected;
        std::vector<std::pair<const HfGpt2Module*, int>> keys;  // per expected tensor: module, layer
        for (const HfGpt2Module& m : hf_gpt2_block_modules())
            for (int l : layers_) {
                bool any = false, ff = false;
                int64_t total = 0;
                for (const std::string& lin : m.linears) {
                    auto it = scales_.find(fmt::format("blocks.{}.{}", l, lin));
                    if (it != scales_.end()) any = true, ff = it->second.feedforward;
                    total += base_->parameter(fmt::format("blocks.{}.{}.weight", l, lin)).dim(0);
                }
                if (!any) continue;
                const int64_t in = base_->parameter(fmt::format("blocks.{}.{}.weight", l, m.linears[0])).dim(1);
                expected.emplace_back(kHfKeyPrefix + hf_gpt2_module_key(l, m.name) + ".ia3_l",
                                      Tensor::empty(ff ? Shape{1, in} : Shape{total, 1}));
                keys.emplace_back(&m, l);
            }
        check_tensors("import_hf", path, file, expected);
        for (size_t k = 0; k < keys.size(); ++k) {
            const auto [m, l] = keys[k];
            const std::vector<float>& v = file.tensors.at(expected[k].first).data;
            int64_t row = 0;
            for (const std::string& lin : m->linears) {
                const std::string p = fmt::format("blocks.{}.{}", l, lin);
                auto it = scales_.find(p);
                const int64_t n = it != scales_.end() ? it->second.l.dim(0) : base_->parameter(p + ".weight").dim(0);
                if (it != scales_.end()) std::copy(v.begin() + row, v.begin() + row + n, it->second.l.data());
                else
                    for (int64_t i = row; i < row + n; ++i)
                        if (v[size_t(i)] != 1.f)
                            throw std::runtime_error(fmt::format(
                                "import_hf: '{}': tensor '{}': rows {}..{} ({}) scale by {} at row {}, but the "
                                "adapter's target_modules do not scale {}",
                                path, expected[k].first, row, row + n - 1, lin, v[size_t(i)], i, lin));
                row += n;
            }
        }
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
            Tensor W = merge_target(path + ".weight"), b = merge_target(path + ".bias");
            const int64_t out = W.dim(0), in = W.dim(1);
            const float* l = s.l.data();
            for (int64_t o = 0; o < out; ++o)
                for (int64_t i = 0; i < in; ++i) W.data()[o * in + i] *= s.feedforward ? l[i] : l[o];
            if (!s.feedforward)
                for (int64_t o = 0; o < out; ++o) b.data()[o] *= l[o];
        }
    }

private:
    struct Scale {
        Tensor l;  // [out], or [in] for a feed-forward module
        bool feedforward = false;
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
            if (path.ends_with(fmt::format(".{}", module_of(t)))) return t;
        }
        return "";
    }

    std::vector<std::string> targets_, feedforward_;
    std::map<std::string, Scale> scales_;  // target Linear path -> its vector
};

std::unique_ptr<Adapter> make_ia3(const AdapterOptions& o) { return std::make_unique<IA3>(o); }

}  // namespace peftlab::peft
