// LoRA (Hu et al. 2021): for each target Linear W [out, in] of the chosen
// layers, trainable A [r, in] and B [out, r]; the output gains
// (alpha / r) * x A^T B^T. B starts at zero, so training starts from the base.
// Own options ("lora" section, Hugging Face PEFT's names): r (8), lora_alpha
// (16), target_modules (["q_proj", "v_proj"]; of q_proj, k_proj, v_proj,
// o_proj, fc, proj). Mergeable: W += (alpha/r) B A.
// Hugging Face PEFT: LORA on GPT-2's module names,
// "base_model.model.transformer.h.N.attn.c_attn.lora_A.weight" [r', C] and
// ".lora_B.weight" [3C, r'] (q, k, v fused; see hf_export for the mapping).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/hf_gpt2.h"
#include "nn/json_limits.h"
#include "nn/safetensors.h"
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

// Our target name of a block Linear path ("attn.q_proj" -> "q_proj", "mlp.fc" -> "fc").
std::string short_name(const std::string& linear) { return linear.substr(linear.find('.') + 1); }

// Whether lora_B [rows, R] of the fused c_attn (rows = 3C, our q, k, v blocks of C) is zero
// outside the block pattern that hf_export writes for `members`: projection
// members[j]'s rows nonzero only in columns [j*R/m, (j+1)*R/m), other projections' rows zero.
bool fits_split(const std::vector<float>& B, int64_t C, int64_t R, const std::vector<int>& members) {
    const int64_t m = int64_t(members.size()), w = R / m;
    for (int p = 0; p < 3; ++p) {
        const auto it = std::find(members.begin(), members.end(), p);
        const int64_t j = it == members.end() ? -1 : int64_t(it - members.begin());
        for (int64_t o = p * C; o < (p + 1) * C; ++o)
            for (int64_t k = 0; k < R; ++k)
                if (B[size_t(o * R + k)] != 0.f && (j < 0 || k / w != j)) return false;
    }
    return true;
}

// The lora_B tensors of module m over the chosen layers that have the shape [3C, R]
// (the others are refused later by hf_import_tensors).
std::vector<const std::vector<float>*> c_attn_bs(const StFile& file, const GPTConfig& c, const HfGpt2Module& m,
                                                 const std::string& layers, int64_t R) {
    std::vector<const std::vector<float>*> bs;
    for (int l : parse_layers(layers, c.n_layers)) {
        auto it = file.tensors.find(std::string(kHfKeyPrefix) + hf_gpt2_module_key(l, m.name) + ".lora_B.weight");
        if (it != file.tensors.end() && it->second.shape == Shape{3 * c.d_model, R} &&
            int64_t(it->second.data.size()) == 3 * c.d_model * R)
            bs.push_back(&it->second.data);
    }
    return bs;
}

// How a fused c_attn pair of rank R maps onto our q/k/v LoRAs: which of
// q, k, v (0, 1, 2) it holds, and whether they share the file's A.
struct CAttnSplit {
    std::vector<int> members;
    bool shared = false;
};
// The first of (q,v), (q,k,v), (q), (k), (v), (q,k), (k,v) into whose block
// pattern (fits_split) R divides and every layer's lora_B fits -- what
// hf_export writes, so an export reads back as the same LoRAs, rank R/m each --
// else all three of rank R with the file's A shared: B = [B_q; B_k; B_v] gives
// dW_q = B_q A, dW_k = B_k A, dW_v = B_v A, the fused pair's update. Either
// way the function is exactly the file's.
CAttnSplit split_c_attn(const StFile& file, const GPTConfig& c, const HfGpt2Module& m, const std::string& layers,
                        int64_t R) {
    const std::vector<std::vector<int>> candidates = {{0, 2}, {0, 1, 2}, {0}, {1}, {2}, {0, 1}, {1, 2}};
    const auto bs = c_attn_bs(file, c, m, layers, R);
    for (const auto& members : candidates) {
        if (R % int64_t(members.size()) != 0) continue;
        if (std::all_of(bs.begin(), bs.end(), [&](const std::vector<float>* B) { return fits_split(*B, c.d_model, R, members); }))
            return {members, false};
    }
    return {{0, 1, 2}, true};
}

// layers_to_transform as our layer spec: null -> all, k -> "k", [..] -> "a,b" ([] -> none).
std::string hf_layers_spec(const ConfigFile& cfg, int L) {
    const char* key = "layers_to_transform";
    if (!cfg.has(key)) return "all";
    const nlohmann::json& v = cfg.at(key);
    // Read as int64, 2^64 - 1 would wrap to layer -1: entries are checked as written.
    auto index = [](const nlohmann::json& e) {
        return e.is_number_integer() && (!e.is_number_unsigned() || e.get<uint64_t>() <= uint64_t(INT32_MAX));
    };
    std::vector<int64_t> layers;
    if (index(v)) layers.push_back(v.get<int64_t>());
    else if (v.is_array() && std::all_of(v.begin(), v.end(), index)) layers = v.get<std::vector<int64_t>>();
    else
        throw cfg.key_error(key, "must be null, an integer or a list of integers (layer indices), got " +
                                     json_excerpt(v));
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
        // x [..., in] -> [..., r] -> [..., out]; HF PEFT scales the output,
        // lora_B(lora_A(x)) * scaling; scaling the [..., r] activation instead
        // is the same product at r/out of the element-wise work.
        return linear(mul_scalar(linear(x, it->second.A), scale()), it->second.B);
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

    // ((alpha/r) * x A^T) B^T, then added: A [r, in], B [out, r].
    cost::Sym cost_linear(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t in,
                          int64_t out, cost::Sym x, cost::Sym y) const override {
        if (!in_chosen_layer(c, path) || !targets(path)) return y;
        cost::Sym u = cost::linear(t, R, in, rank_, x, cost::kParam, nullptr);
        u = cost::unary(t, R * rank_, 1, 1, u);
        u = cost::linear(t, R, rank_, out, u, cost::kParam, nullptr);
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
    // GPT-2 module names (nn/hf_gpt2.h). Our LoRAs on q_proj / k_proj / v_proj
    // of a layer become one LoRA on the fused c_attn [C, 3C] of rank r' = m*r
    // (m of them targeted): lora_A [m*r, C] stacks their A's in q, k, v order;
    // lora_B [3C, m*r] holds the j-th one's B in its projection's C rows and
    // columns [j*r, (j+1)*r), zeros elsewhere (an untargeted projection's rows
    // are all zero); lora_alpha' = m*alpha keeps alpha'/r' = alpha/r, so
    // (alpha'/r') B' A' = (alpha/r) [B_q A_q; 0; B_v A_v], exactly our update.
    // o_proj, fc and proj keep rank r as attn.c_proj, c_fc and mlp.c_proj.
    // The top-level r / lora_alpha are the first exported module's (c_attn
    // when targeted); modules with another rank get rank_pattern /
    // alpha_pattern entries. fan_in_fan_out is true (Conv1D stores [in, out]);
    // lora_A [r, in] and lora_B [out, r] are nn.Linear weights either way.
    std::optional<HfExport> hf_export() const override {
        const GPTConfig& c = base_->config();
        const bool all_layers = int64_t(layers_.size()) == c.n_layers;
        const std::vector<Group> groups = export_groups();
        const int64_t top = groups.empty() ? rank_ : rank_ * int64_t(groups[0].members.size());
        HfExport e;
        nlohmann::json& cfg = e.config;
        cfg["peft_type"] = "LORA";
        cfg["r"] = top;
        cfg["lora_alpha"] = double(alpha_) * double(top / rank_);
        cfg["lora_dropout"] = 0.0;
        cfg["bias"] = "none";
        cfg["fan_in_fan_out"] = true;  // GPT-2's Conv1D weights are [in, out]
        cfg["use_rslora"] = false;
        cfg["use_dora"] = false;
        cfg["init_lora_weights"] = true;
        cfg["modules_to_save"] = nullptr;
        cfg["layers_to_transform"] = all_layers ? nlohmann::json(nullptr) : nlohmann::json(layers_);
        cfg["layers_pattern"] = all_layers ? nlohmann::json(nullptr) : nlohmann::json(kHfGpt2LayersPattern);
        cfg["target_modules"] = nlohmann::json::array();
        cfg["rank_pattern"] = nlohmann::json::object();
        cfg["alpha_pattern"] = nlohmann::json::object();
        for (const Group& g : groups) {
            const int64_t m = int64_t(g.members.size());
            cfg["target_modules"].push_back(g.module->target);
            if (rank_ * m != top) {
                cfg["rank_pattern"][g.module->target] = rank_ * m;
                cfg["alpha_pattern"][g.module->target] = double(alpha_) * double(m);
            }
        }
        for (int l : layers_)
            for (const Group& g : groups) {
                auto [A, B] = fused_pair(l, g);
                const std::string key = kHfKeyPrefix + hf_gpt2_module_key(l, g.module->name);
                e.tensors.emplace_back(key + ".lora_A.weight", A);
                e.tensors.emplace_back(key + ".lora_B.weight", B);
            }
        return e;
    }
    // llama.cpp's LoRA: the same fused pairs as hf_export (llama.cpp's gpt2 has
    // GPT-2's fused attn_qkv), each with our scale alpha/r (its rank m*r and
    // alpha m*alpha give the same ratio), on the gguf tensor names (nn/gguf.h).
    std::optional<GgufLora> gguf_lora() const override {
        GgufLora out;
        for (int l : layers_)
            for (const Group& g : export_groups()) {
                auto [A, B] = fused_pair(l, g);
                out.pairs.push_back({gguf_gpt2_linear_name(l, g.module->linears[0]), A, B, scale()});
            }
        return out;
    }
    // A LORA config on GPT-2 module names, mapped back: each module's rank and
    // alpha (r / lora_alpha, or their rank_pattern / alpha_pattern entry); a
    // c_attn pair splits into q/k/v LoRAs as split_c_attn finds it in the
    // file. The result must have one rank and one alpha/r across modules (ours
    // has one of each), else it is refused naming the key.
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c,
                                                    const StFile& file) const override {
        if (cfg.str("peft_type") != "LORA") return std::nullopt;
        const int64_t r = cfg.integer("r");
        if (r < 1) throw cfg.key_error("r", fmt::format("{} must be >= 1", r));
        const double alpha = cfg.number("lora_alpha");
        // The modules each target_modules entry selects, as PEFT matches names.
        const nlohmann::json& targets = cfg.at("target_modules");
        if (!targets.is_array() ||
            !std::all_of(targets.begin(), targets.end(), [](const nlohmann::json& t) { return t.is_string(); }))
            throw cfg.key_error("target_modules",
                                "must be a list of module names (regex strings are not supported), got " + targets.dump());
        std::vector<const HfGpt2Module*> modules;  // in block order
        for (const auto& t : targets) {
            const std::vector<const HfGpt2Module*> sel = hf_gpt2_select(t.get<std::string>());
            if (sel.empty())
                throw cfg.key_error("target_modules",
                                    fmt::format("'{}' names no Conv1D module of a GPT-2 block (c_attn, c_proj, c_fc, "
                                                "attn.c_proj, mlp.c_proj; q, k and v are the fused c_attn)",
                                                t.get<std::string>()));
            for (const HfGpt2Module* m : sel)
                if (std::find(modules.begin(), modules.end(), m) == modules.end()) modules.push_back(m);
        }
        const auto& order = hf_gpt2_block_modules();
        std::sort(modules.begin(), modules.end(), [&](auto* a, auto* b) { return a - order.data() < b - order.data(); });
        // Per-module rank and alpha: PEFT takes a pattern entry that names the module, else r / lora_alpha.
        auto pattern = [&](const char* key, const HfGpt2Module& m, double fallback) {
            if (!cfg.has(key)) return fallback;
            const nlohmann::json& p = cfg.at(key);
            if (!p.is_object()) throw cfg.key_error(key, "must be an object, got " + p.dump());
            for (const auto& [name, v] : p.items()) {
                const std::vector<const HfGpt2Module*> sel = hf_gpt2_select(name);
                if (sel.empty())
                    throw cfg.key_error(key, fmt::format("'{}' names no Conv1D module of a GPT-2 block", name));
                if (!v.is_number()) throw cfg.key_error(key, fmt::format("'{}' must be a number, got {}", name, v.dump()));
                if (std::find(sel.begin(), sel.end(), &m) != sel.end()) return v.get<double>();
            }
            return fallback;
        };
        const std::string layers = hf_layers_spec(cfg, c.n_layers);
        if (cfg.has("layers_pattern")) {
            const nlohmann::json& p = cfg.at("layers_pattern");
            if (p != nlohmann::json(kHfGpt2LayersPattern) && p != nlohmann::json::array({kHfGpt2LayersPattern}))
                throw cfg.key_error("layers_pattern",
                                    "must be null or \"h\" (GPT-2's blocks, transformer.h), got " + p.dump());
        }
        for (const char* flag : {"use_rslora", "use_dora"})
            if (cfg.has(flag) && cfg.boolean(flag)) throw cfg.key_error(flag, "true is not supported");
        // fan_in_fan_out either way: PEFT sets it true for GPT-2's Conv1D, and lora_A / lora_B are laid out alike.
        if (cfg.has("fan_in_fan_out")) cfg.boolean("fan_in_fan_out");
        if (cfg.has("bias") && cfg.str("bias") != "none") throw cfg.key_error("bias", "only \"none\" is supported");
        if (cfg.has("modules_to_save") && !cfg.at("modules_to_save").empty())
            throw cfg.key_error("modules_to_save", "extra trained modules are not supported");

        std::vector<std::string> ours;
        int64_t rank = 0;
        double scale = 0;
        std::string seen;  // "c_attn rank 8 per projection, alpha/r 2" of the first module, for the error
        const char* rank_key = cfg.has("rank_pattern") && !cfg.at("rank_pattern").empty() ? "rank_pattern" : "r";
        for (const HfGpt2Module* m : modules) {
            const double rm = pattern("rank_pattern", *m, double(r)), am = pattern("alpha_pattern", *m, alpha);
            if (rm < 1 || rm != std::floor(rm) || rm > double(int64_t(1) << 40))
                throw cfg.key_error("rank_pattern", fmt::format("{}: {} is not a rank", m->target, rm));
            const int64_t R = int64_t(rm);
            CAttnSplit split{{0}, false};
            if (m->linears.size() > 1) split = split_c_attn(file, c, *m, layers, R);
            const std::vector<int>& members = split.members;
            const int64_t per = split.shared ? R : R / int64_t(members.size());
            const std::string what = fmt::format("{} rank {}{}, alpha/r {}", m->target, per,
                                                 members.size() > 1 ? " per projection" : "", am / rm);
            if (rank == 0) {
                rank = per;
                scale = am / rm;
                seen = what;
            } else if (per != rank || am / rm != scale) {
                throw cfg.key_error(per != rank ? rank_key : "alpha_pattern",
                                    fmt::format("peftlab's LoRA has one rank and one alpha/r for all modules, but this "
                                                "file maps to {} and {}",
                                                seen, what));
            }
            for (int i : members) ours.push_back(short_name(m->linears[size_t(i)]));
        }
        if (ours.empty()) throw cfg.key_error("target_modules", "is empty");
        AdapterOptions o;
        nlohmann::json& own = o.section("lora");
        own["r"] = rank;
        own["lora_alpha"] = scale * double(rank);
        own["target_modules"] = ours;
        o.layers = layers;
        return o;
    }
    // The file's GPT-2 module pairs into ours, as hf_import_options mapped them.
    void hf_import_tensors(const std::string& path, const StFile& file) override {
        NoGradGuard no_grad;
        const std::vector<Group> groups = export_groups();
        // The shapes each module's pair has in the file: a c_attn holding all
        // three projections has rank r (shared A) or 3r (split), as the file says.
        NamedTensors expected;
        std::vector<bool> shared(groups.size(), false);
        for (size_t gi = 0; gi < groups.size(); ++gi) {
            const Group& g = groups[gi];
            int64_t R = rank_ * int64_t(g.members.size());
            if (g.members.size() == 3 && !layers_.empty()) {
                auto it = file.tensors.find(kHfKeyPrefix + hf_gpt2_module_key(layers_[0], g.module->name) + ".lora_A.weight");
                if (it != file.tensors.end() && !it->second.shape.empty() && it->second.shape[0] == rank_) {
                    R = rank_;
                    shared[gi] = true;
                }
            }
            for (int l : layers_) {
                const Shape outs = module_rows(l, *g.module);
                int64_t total = 0;
                for (int64_t o : outs) total += o;
                const std::string key = kHfKeyPrefix + hf_gpt2_module_key(l, g.module->name);
                const int64_t in = pair_of(l, g.module->linears[size_t(g.members[0])]).A.dim(1);
                expected.emplace_back(key + ".lora_A.weight", Tensor::empty({R, in}));
                expected.emplace_back(key + ".lora_B.weight", Tensor::empty({total, R}));
            }
        }
        check_tensors("import_hf", path, file, expected);
        for (size_t gi = 0; gi < groups.size(); ++gi) {
            const Group& g = groups[gi];
            const int64_t R = shared[gi] ? rank_ : rank_ * int64_t(g.members.size());
            for (int l : layers_) {
                const Shape outs = module_rows(l, *g.module);
                const std::string key = kHfKeyPrefix + hf_gpt2_module_key(l, g.module->name);
                const std::vector<float>& A = file.tensors.at(key + ".lora_A.weight").data;
                const std::vector<float>& B = file.tensors.at(key + ".lora_B.weight").data;
                for (size_t j = 0; j < g.members.size(); ++j) {
                    const int i = g.members[j];
                    Pair& p = pair_of(l, g.module->linears[size_t(i)]);
                    const int64_t in = p.A.dim(1), col0 = shared[gi] ? 0 : int64_t(j) * rank_;
                    std::memcpy(p.A.data(), A.data() + col0 * in, size_t(rank_ * in) * sizeof(float));
                    int64_t row0 = 0;
                    for (int k = 0; k < i; ++k) row0 += outs[size_t(k)];
                    for (int64_t o = 0; o < outs[size_t(i)]; ++o)
                        for (int64_t k = 0; k < rank_; ++k)
                            p.B.data()[o * rank_ + k] = B[size_t((row0 + o) * R + col0 + k)];
                }
            }
        }
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
            Tensor W = merge_target(path + ".weight");
            Tensor delta = mul_scalar(matmul(p.B, p.A), scale());  // [out, in]
            for (int64_t i = 0; i < W.numel(); ++i) W.data()[i] += delta.data()[i];
        }
    }

private:
    struct Pair {
        Tensor A, B;  // [r, in], [out, r]
    };
    float scale() const { return alpha_ / float(rank_); }
    // A GPT-2 module and the indices (into module->linears) of our targets it holds.
    struct Group {
        const HfGpt2Module* module;
        std::vector<int> members;
    };
    std::vector<Group> export_groups() const {
        std::vector<Group> groups;
        for (const HfGpt2Module& m : hf_gpt2_block_modules()) {
            Group g{&m, {}};
            for (size_t i = 0; i < m.linears.size(); ++i)
                for (const std::string& t : targets_)
                    if (target_module(t) == m.linears[i]) g.members.push_back(int(i));
            if (!g.members.empty()) groups.push_back(g);
        }
        return groups;
    }
    // One LoRA pair on the GPT-2 module of `g` in layer l (hf_export's comment):
    // A [m*r, in] stacks the members' A's, B [sum of outs, m*r] is block-diagonal.
    std::pair<Tensor, Tensor> fused_pair(int l, const Group& g) const {
        NoGradGuard no_grad;
        const Shape outs = module_rows(l, *g.module);
        const int64_t R = rank_ * int64_t(g.members.size()), in = pair_of(l, g.module->linears[0]).A.dim(1);
        int64_t total = 0;
        for (int64_t o : outs) total += o;
        Tensor A = Tensor::zeros({R, in}), B = Tensor::zeros({total, R});
        for (size_t j = 0; j < g.members.size(); ++j) {
            const int i = g.members[j];
            const Pair& p = pair_of(l, g.module->linears[size_t(i)]);
            std::memcpy(A.data() + int64_t(j) * rank_ * in, p.A.data(), size_t(rank_ * in) * sizeof(float));
            int64_t row0 = 0;
            for (int k = 0; k < i; ++k) row0 += outs[size_t(k)];
            for (int64_t o = 0; o < outs[size_t(i)]; ++o)
                for (int64_t k = 0; k < rank_; ++k)
                    B.data()[(row0 + o) * R + int64_t(j) * rank_ + k] = p.B.data()[o * rank_ + k];
        }
        return {A, B};
    }
    // Output rows of each of the module's Linears in layer l (c_attn: C, C, C).
    Shape module_rows(int l, const HfGpt2Module& m) const {
        Shape rows;
        for (const std::string& lin : m.linears) rows.push_back(base_->parameter(fmt::format("blocks.{}.{}.weight", l, lin)).dim(0));
        return rows;
    }
    Pair& pair_of(int l, const std::string& linear) { return pairs_.at(fmt::format("blocks.{}.{}", l, linear)); }
    const Pair& pair_of(int l, const std::string& linear) const { return pairs_.at(fmt::format("blocks.{}.{}", l, linear)); }
    bool targets(const std::string& path) const {
        for (const std::string& t : targets_) {
            // "blocks.0.attn.q_proj" ends with ".attn.q_proj"
            if (path.ends_with(fmt::format(".{}", target_module(t)))) return true;
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
