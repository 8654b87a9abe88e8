// LoRA (Hu et al. 2021): for each target Linear W [out, in] of the chosen
// layers, trainable A [r, in] and B [out, r]; the output gains
// (alpha / r) * x A^T B^T. B starts at zero, so training starts from the base.
// Own options ("lora" section, Hugging Face PEFT's names): r (8), lora_alpha
// (16), target_modules (["q_proj", "v_proj"]; of q_proj, k_proj, v_proj,
// o_proj, fc, proj). Mergeable: W += (alpha/r) B A.
// Hugging Face PEFT: LORA, "base_model.model.<module path>.lora_A.weight"
// [r, in] and ".lora_B.weight" [out, r], module paths as ours.
#include <cmath>
#include <map>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

namespace {
constexpr const char* kHfKeyPrefix = "base_model.model.";  // PeftModel -> LoraModel -> the LM

// Where each target name lives inside a block.
std::string target_module(const std::string& t) {
    if (t == "q_proj" || t == "k_proj" || t == "v_proj" || t == "o_proj") return "attn." + t;
    if (t == "fc" || t == "proj") return "mlp." + t;
    throw std::invalid_argument(
        fmt::format("lora adapter: target '{}' is not one of q_proj, k_proj, v_proj, o_proj, fc, proj", t));
}

// Unknown and repeated targets are errors: a repeat would add a second, never
// used A/B pair under the same names and double the parameter count.
void check_targets(const std::vector<std::string>& targets) {
    for (size_t i = 0; i < targets.size(); ++i) {
        target_module(targets[i]);
        for (size_t j = 0; j < i; ++j)
            if (targets[j] == targets[i])
                throw std::invalid_argument(fmt::format("lora adapter: target '{}' is listed twice", targets[i]));
    }
}

// layers_to_transform as our layer spec: null -> all, k -> "k", [..] -> "a,b" ([] -> none).
std::string hf_layers_spec(const ConfigFile& cfg, int L) {
    const char* key = "layers_to_transform";
    if (!cfg.has(key)) return "all";
    const nlohmann::json& v = cfg.at(key);
    std::vector<int64_t> layers;
    if (v.is_number_integer()) layers.push_back(v.get<int64_t>());
    else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_number_integer(); }))
        layers = v.get<std::vector<int64_t>>();
    else throw cfg.key_error(key, "must be null, an integer or a list of integers, got " + v.dump());
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
}  // namespace

class LoRA : public Adapter {
public:
    explicit LoRA(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "lora");
        rank_ = own.integer("r", 8, 1);
        alpha_ = float(own.number("lora_alpha", 16.0));
        targets_ = own.strings("target_modules", {"q_proj", "v_proj"});
        check_targets(targets_);
        set_own_options("lora", own.finish());
    }
    std::string method() const override { return "lora"; }

    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) override {
        if (merged()) return {};
        auto it = pairs_.find(path);
        if (it == pairs_.end()) return {};
        // x [..., in] -> [..., r] -> [..., out]
        return mul_scalar(linear(linear(x, it->second.A), it->second.B), scale());
    }
    bool adapts_linear(const std::string& path) const override { return !merged() && pairs_.count(path) > 0; }

    ParamFormula formula(const GPTConfig& c) const override {
        int64_t per_layer = 0;
        std::string text;
        for (const std::string& t : targets_) {
            const bool mlp = target_module(t).rfind("mlp.", 0) == 0;
            per_layer += per_target(c, t);
            text += (text.empty() ? "" : " + ") + std::string(mlp ? "r*(d+F)" : "r*2d");
        }
        return {chosen_layers(c) * per_layer, "L*(" + text + ")"};
    }
    std::vector<double> lr_grid() const override { return {1e-3, 3e-3, 1e-2}; }
    bool mergeable() const override { return true; }

    // (alpha/r) * (x A^T) B^T, then added: A [r, in], B [out, r].
    cost::Sym cost_linear(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t in,
                          int64_t out, cost::Sym x, cost::Sym y) const override {
        if (!in_chosen_layer(c, path) || !targets(path)) return y;
        cost::Sym u = cost::linear(t, R, in, rank_, x, cost::kParam, nullptr);
        u = cost::linear(t, R, rank_, out, u, cost::kParam, nullptr);
        u = cost::unary(t, R * out, 1, 1, u);
        return cost::add(t, R * out, y, u);
    }
    // Decoding counts the merged model (W + BA): no extra work.
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        int64_t per_layer = 0;
        for (const std::string& t : targets_) per_layer += per_target(c, t);
        std::vector<cost::ParamGroup> g;
        if (per_layer)
            for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), per_layer});
        return g;
    }

    std::string hf_peft_type() const override { return "LORA"; }
    std::optional<HfExport> hf_export() const override {
        const bool all_layers = int64_t(layers_.size()) == base_->config().n_layers;
        HfExport e;
        nlohmann::json& cfg = e.config;
        cfg["peft_type"] = "LORA";
        cfg["r"] = rank_;
        cfg["lora_alpha"] = alpha_;
        cfg["lora_dropout"] = 0.0;
        cfg["target_modules"] = targets_;
        cfg["bias"] = "none";
        cfg["fan_in_fan_out"] = false;  // our weights are [out, in], as nn.Linear's
        cfg["use_rslora"] = false;
        cfg["use_dora"] = false;
        cfg["init_lora_weights"] = true;
        cfg["modules_to_save"] = nullptr;
        cfg["layers_to_transform"] = all_layers ? nlohmann::json(nullptr) : nlohmann::json(layers_);
        cfg["layers_pattern"] = all_layers ? nlohmann::json(nullptr) : nlohmann::json("blocks");
        cfg["rank_pattern"] = nlohmann::json::object();
        cfg["alpha_pattern"] = nlohmann::json::object();
        for (const auto& [name, t] : params_) e.tensors.emplace_back(kHfKeyPrefix + name, t);
        return e;
    }
    // The LORA config fields that change the function, checked against what this LoRA computes.
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c) const override {
        if (cfg.str("peft_type") != "LORA") return std::nullopt;
        AdapterOptions o;
        nlohmann::json& own = o.section("lora");
        const int64_t r = cfg.integer("r");
        if (r < 1) throw cfg.key_error("r", fmt::format("{} must be >= 1", r));
        own["r"] = r;
        own["lora_alpha"] = cfg.number("lora_alpha");
        const nlohmann::json& targets = cfg.at("target_modules");
        if (!targets.is_array() ||
            !std::all_of(targets.begin(), targets.end(), [](const nlohmann::json& t) { return t.is_string(); }))
            throw cfg.key_error("target_modules",
                                "must be a list of module names (regex strings are not supported), got " + targets.dump());
        try {
            check_targets(targets.get<std::vector<std::string>>());
        } catch (const std::invalid_argument& e) {
            throw cfg.key_error("target_modules", e.what());
        }
        own["target_modules"] = targets;
        o.layers = hf_layers_spec(cfg, c.n_layers);
        if (cfg.has("layers_pattern")) {
            const nlohmann::json& p = cfg.at("layers_pattern");
            if (p != nlohmann::json("blocks") && p != nlohmann::json::array({"blocks"}))
                throw cfg.key_error("layers_pattern", "must be null or \"blocks\" (where our layers live), got " + p.dump());
        }
        for (const char* flag : {"use_rslora", "use_dora", "fan_in_fan_out"})
            if (cfg.has(flag) && cfg.boolean(flag)) throw cfg.key_error(flag, "true is not supported");
        if (cfg.has("bias") && cfg.str("bias") != "none") throw cfg.key_error("bias", "only \"none\" is supported");
        for (const char* pattern : {"rank_pattern", "alpha_pattern"})
            if (cfg.has(pattern) && !cfg.at(pattern).empty())
                throw cfg.key_error(pattern, "per-module patterns are not supported");
        if (cfg.has("modules_to_save") && !cfg.at("modules_to_save").empty())
            throw cfg.key_error("modules_to_save", "extra trained modules are not supported");
        return o;
    }

protected:
    void build(GPT& base) override {
        Rng rng(opts_.seed);
        for (int l : layers_)
            for (const std::string& t : targets_) {
                std::string path = fmt::format("blocks.{}.{}", l, target_module(t));
                Tensor W = base.parameter(path + ".weight");
                const int64_t out = W.dim(0), in = W.dim(1);
                // A as PyTorch's kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
                float bound = 1.f / std::sqrt(float(in));
                Pair p;
                p.A = add_param(path + ".lora_A.weight", Tensor::uniform({rank_, in}, rng, -bound, bound));
                p.B = add_param(path + ".lora_B.weight", Tensor::zeros({out, rank_}));
                pairs_.emplace(path, p);
            }
    }
    // W += (alpha/r) B A; restore puts the saved W back bitwise.
    void merge_into_base() override {
        NoGradGuard no_grad;
        for (auto& [path, p] : pairs_) {
            Tensor W = base_->parameter(path + ".weight");
            p.base_copy = W.clone();
            Tensor delta = mul_scalar(matmul(p.B, p.A), scale());  // [out, in]
            for (int64_t i = 0; i < W.numel(); ++i) W.data()[i] += delta.data()[i];
        }
    }
    void restore_base() override {
        for (auto& [path, p] : pairs_) {
            base_->parameter(path + ".weight").copy_from(p.base_copy);
            p.base_copy = Tensor();
        }
    }

private:
    struct Pair {
        Tensor A, B;       // [r, in], [out, r]
        Tensor base_copy;  // W before merge
    };
    float scale() const { return alpha_ / float(rank_); }
    bool targets(const std::string& path) const {
        for (const std::string& t : targets_) {
            const std::string m = "." + target_module(t);  // "blocks.0.attn.q_proj" ends with ".attn.q_proj"
            if (path.size() >= m.size() && path.compare(path.size() - m.size(), m.size(), m) == 0) return true;
        }
        return false;
    }
    int64_t per_target(const GPTConfig& c, const std::string& t) const {
        const bool mlp = target_module(t).rfind("mlp.", 0) == 0;
        return rank_ * (c.d_model + (mlp ? c.d_ff : c.d_model));
    }

    int64_t rank_ = 8;
    float alpha_ = 16.f;
    std::vector<std::string> targets_;
    std::map<std::string, Pair> pairs_;  // target Linear path -> its pair
};

std::unique_ptr<Adapter> make_lora(const AdapterOptions& o) { return std::make_unique<LoRA>(o); }

}  // namespace peftlab::peft
