// Prefix tuning in both forms.
//
// Hidden-state form ("prefix"): for each chosen layer l, P^l [n, d] prepended
// to the hidden states that are layer l's input. Their outputs are discarded,
// so only LN1 and the K/V projections of P^l matter; nn computes exactly
// those, once per batch. L*n*d parameters.
// Key/value form ("prefix-kv", Li & Liang 2021; HF PEFT): per chosen layer,
// K^l and V^l [n, d] prepended in attention. 2*L*n*d parameters.
//
// Reparameterization (Li & Liang): during training the S prefix matrices
// (S = L for hidden, 2L for key/value) are the output of an MLP,
// P = fc2(tanh(fc1(P'))), P' [n, d] -> [n, S*d]; materialize() replaces the
// MLP by its output for inference. Own options ("prefix" / "prefix-kv"
// section): reparam (false), reparam_hidden (h, 512).
//
// Infix ("infix", Li & Liang 2021, "Prefixing vs Infixing": [x; INFIX; y]):
// the hidden-state form's L*n*d vectors, placed between each row's source and
// target instead of before the source. A row's source tokens do not see them;
// its last source token (the separator, which predicts the first target
// token) and every later one do, so the sequence reads [x; INFIX; sep; y]
// (LayerPrefix::visible_from = source_len - 1). Source lengths come from
// ModelInput::source_len; a prompt without them is all source (generation).
// No position ids under either convention, and no PEFT counterpart.
//
// Hugging Face PEFT: PREFIX_TUNING, "prompt_embeddings" [n, 2*L*d] whose
// columns [2l*d, (2l+1)*d) are layer l's keys and [(2l+1)*d, (2l+2)*d) its
// values (PrefixEncoder layout). The hidden-state form has no PEFT counterpart
// and is exported as key/value prefixes (each layer's frozen ln1 and K/V
// projections applied to its vectors), which is exact for the model's attention.
#include <cstring>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/safetensors.h"
#include "peft/adapter.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

class PrefixTuning : public Adapter {
public:
    PrefixTuning(AdapterOptions o, bool kv, bool infix = false) : Adapter(std::move(o)), kv_(kv), infix_(infix) {
        MethodOptions own(opts_, method());
        reparam_ = own.boolean("reparam", false);
        reparam_hidden_ = own.integer("reparam_hidden", 512, 1);
        set_own_options(method(), own.finish());
    }
    std::string method() const override { return kv_ ? "prefix-kv" : infix_ ? "infix" : "prefix"; }
    std::vector<double> lr_grid() const override { return {3e-3, 1e-2, 3e-2}; }  // vectors move further per step

    void begin_forward(const ForwardInfo& info) override {
        if (mlp_.empty() || !info.prefill) return;
        reparam_out_ = mlp_forward();  // once per forward, for all layers
    }

    bool adapts_linear(const std::string&) const override { return false; }
    LayerPrefix layer_prefix(int layer, const ForwardInfo& info) override {
        int slot = slot_of(layer);
        if (slot < 0 || opts_.n == 0) return {};
        LayerPrefix p;
        if (kv_) {
            p.key = matrix(2 * slot);
            p.value = matrix(2 * slot + 1);
        } else {
            p.hidden = matrix(slot);
        }
        if (infix_) {
            // Seen from the last source column on (the whole call is source without source_len).
            p.visible_from.assign(size_t(info.B), int32_t(std::max<int64_t>(info.T - 1, 0)));
            for (size_t b = 0; b < info.source_len.size() && b < p.visible_from.size(); ++b)
                p.visible_from[b] = std::max(info.source_len[b] - 1, 0);
        }
        return p;
    }

    // An infix takes no positions (nothing precedes the source).
    int64_t virtual_tokens() const override { return layers_.empty() || infix_ ? 0 : opts_.n; }

    NamedTensors inference_parameters() const override {
        if (mlp_.empty()) return params_;
        NamedTensors out;
        NoGradGuard no_grad;
        Tensor all = mlp_forward();
        for (size_t s = 0; s < names_.size(); ++s) out.emplace_back(names_[s], slot_slice(all, int(s)));
        return out;
    }

    void materialize() override {
        if (mlp_.empty()) return;
        NamedTensors inference = inference_parameters();
        params_.clear();
        mlp_.clear();
        reparam_out_ = Tensor();
        for (auto& [name, t] : inference) matrices_.push_back(add_param(name, t));
    }

    ParamFormula formula(const GPTConfig& c) const override {
        if (!reparam_) return inference_formula(c);
        const int64_t h = reparam_hidden_;
        return {mlp_params(c),
                fmt::format("n*d + d*h + h + h*({0}) + {0}  (MLP reparameterization, h={1})",
                            kv_ ? "2*L*d" : "L*d", h)};
    }
    ParamFormula inference_formula(const GPTConfig& c) const override {
        return {slots(c) * opts_.n * c.d_model, kv_ ? "2*L*n*d" : "L*n*d"};
    }

    // Reparameterization MLP, once per forward: P = fc2(tanh(fc1(P'))),
    // P' [n, C] -> [n, S*C]. Its backward runs only if a prefix uses it.
    void cost_begin_forward(cost::Tally& t, const GPTConfig& c, const cost::StepShape&) const override {
        if (!reparam_) return;
        const int64_t n = opts_.n, C = c.d_model, h = reparam_hidden_;
        cost::Tally mlp;
        cost::Sym u = cost::linear(mlp, n, C, h, cost::kParam, cost::kParam, &cost::kParam);
        u = cost::unary(mlp, n * h, 1, 2, u);  // tanh
        cost::linear(mlp, n, h, slots(c) * C, u, cost::kParam, &cost::kParam);
        t.c[0] += mlp.c[0];
        if (used(c)) {
            t.c[1] += mlp.c[1];
            t.c[2] += mlp.c[2];
        }
    }
    cost::KeyValueCost cost_layer_prefix(int layer, cost::Tally& t, const GPTConfig& c, const cost::StepShape& s,
                                         cost::Sym base) const override {
        if (opts_.n == 0 || !in_chosen_layer(c, fmt::format("blocks.{}", layer))) return {};
        const int64_t n = opts_.n, C = c.d_model;
        // The prefix matrix [n, C]: a parameter, or a slice of the MLP output.
        const cost::Sym p = reparam_ ? cost::derived(true) : cost::kParam;
        cost::Sym pk = p, pv = p;
        if (!kv_) {
            // LN1 and the K/V projections of the n vectors, once per batch.
            cost::Sym hp = cost::layer_norm(t, n, C, p, base, base);
            pk = cost::linear(t, n, C, C, hp, base, &base);
            pv = cost::linear(t, n, C, C, hp, base, &base);
        }
        return {n, cost::expand(t, s.B * n * C, pk), cost::expand(t, s.B * n * C, pv)};
    }
    int64_t cost_decode_keys(int layer, const GPTConfig& c) const override {
        return in_chosen_layer(c, fmt::format("blocks.{}", layer)) ? opts_.n : 0;
    }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        if (reparam_) return {{"reparam", mlp_params(c), used(c)}};
        std::vector<cost::ParamGroup> g;
        for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), (kv_ ? 2 : 1) * opts_.n * c.d_model});
        return g;
    }

    std::string hf_peft_type() const override { return infix_ ? "" : "PREFIX_TUNING"; }
    std::optional<HfExport> hf_export() const override {
        if (infix_) return std::nullopt;  // PEFT places every prompt-learning vector before the input
        const GPTConfig& c = base_->config();
        if (int64_t(layers_.size()) != c.n_layers)
            throw std::invalid_argument(fmt::format(
                "the {} adapter has prefixes on layers {} only, but PEFT's PREFIX_TUNING table covers every layer "
                "(num_layers = {}); train with layers=all to export",
                method(), nlohmann::json(layers_).dump(), c.n_layers));
        HfExport e;
        e.config["peft_type"] = "PREFIX_TUNING";
        hf_add_prompt_learning_fields(e.config, opts_.n, c);
        e.config["encoder_hidden_size"] = c.d_model;  // unused without prefix_projection
        e.config["prefix_projection"] = false;        // the file holds the final keys and values
        e.tensors.emplace_back("prompt_embeddings", hf_table());
        return e;
    }
    // PREFIX_TUNING is read as key/value prefixes on every layer.
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c, const StFile&) const override {
        if (!kv_ || cfg.str("peft_type") != "PREFIX_TUNING") return std::nullopt;
        AdapterOptions o;
        o.init = "random";  // every value is overwritten from the file
        o.n = hf_check_prompt_learning(cfg, c);
        return o;
    }
    // The file's table [n, 2*L*d], scattered into per-layer keys and values.
    void hf_import_tensors(const std::string& path, const StFile& file) override {
        const int64_t n = opts_.n, d = base_->config().d_model, L = base_->config().n_layers;
        check_tensors("import_hf", path, file, {{"prompt_embeddings", Tensor::empty({n, 2 * L * d})}});
        const std::vector<float>& table = file.tensors.at("prompt_embeddings").data;
        for (int64_t l = 0; l < L; ++l) {
            Tensor key = matrices_[size_t(2 * l)], value = matrices_[size_t(2 * l + 1)];
            for (int64_t i = 0; i < n; ++i) {
                const float* row = table.data() + i * 2 * L * d;
                std::memcpy(key.data() + i * d, row + 2 * l * d, size_t(d) * sizeof(float));
                std::memcpy(value.data() + i * d, row + (2 * l + 1) * d, size_t(d) * sizeof(float));
            }
        }
    }

protected:
    void build(GPT& base) override {
        const int64_t n = opts_.n, d = base.config().d_model;
        if (opts_.init != "random" && opts_.init != "vocab" && opts_.init != "text")
            throw std::invalid_argument(fmt::format("{} adapter: init '{}' is not random, vocab or text", method(), opts_.init));
        for (int l : layers_) {
            if (kv_) {
                names_.push_back(fmt::format("blocks.{}.prefix.key", l));
                names_.push_back(fmt::format("blocks.{}.prefix.value", l));
            } else {
                names_.push_back(fmt::format("blocks.{}.prefix.hidden", l));
            }
        }
        Rng rng(opts_.seed);
        if (reparam_) {
            const int64_t h = reparam_hidden_, S = slots(base.config());
            mlp_.push_back(add_param("prefix_mlp.embedding", embedding_rows(init_token_ids(n, rng))));
            mlp_.push_back(add_param("prefix_mlp.fc1.weight", Tensor::normal({h, d}, rng, 0.f, 1.f / std::sqrt(float(d)))));
            mlp_.push_back(add_param("prefix_mlp.fc1.bias", Tensor::zeros({h})));
            mlp_.push_back(add_param("prefix_mlp.fc2.weight", Tensor::normal({S * d, h}, rng, 0.f, 0.02f)));
            mlp_.push_back(add_param("prefix_mlp.fc2.bias", Tensor::zeros({S * d})));
            return;
        }
        for (int l : layers_) {
            // "vocab"/"text": the prefix starts as real token embeddings; in the
            // key/value form, as their keys and values through layer l (so both
            // forms start from the same function).
            Tensor hidden = opts_.init == "random" ? Tensor::normal({n, d}, rng, 0.f, 1.f)
                                                   : embedding_rows(init_token_ids(n, rng));
            if (!kv_) {
                matrices_.push_back(add_param(names_[matrices_.size()], hidden));
                continue;
            }
            NoGradGuard no_grad;
            const Block& blk = *base.blocks[size_t(l)];
            Tensor hn = blk.ln1.forward(hidden);
            Tensor key = linear(hn, blk.attn.k_proj.weight, blk.attn.k_proj.bias);
            Tensor value = linear(hn, blk.attn.v_proj.weight, blk.attn.v_proj.bias);
            matrices_.push_back(add_param(names_[matrices_.size()], key.detach()));
            matrices_.push_back(add_param(names_[matrices_.size()], value.detach()));
        }
    }

private:
    int64_t slots(const GPTConfig& c) const { return chosen_layers(c) * (kv_ ? 2 : 1); }
    bool used(const GPTConfig& c) const { return slots(c) > 0 && opts_.n > 0; }
    int64_t mlp_params(const GPTConfig& c) const {
        const int64_t n = opts_.n, d = c.d_model, h = reparam_hidden_, S = slots(c);
        return n * d + h * d + h + S * d * h + S * d;
    }
    // PEFT's table [n, 2*L*d] from the inference matrices (all layers chosen).
    Tensor hf_table() const {
        NoGradGuard no_grad;
        const NamedTensors params = inference_parameters();
        const int64_t n = opts_.n, d = base_->config().d_model, L = base_->config().n_layers;
        Tensor table = Tensor::empty({n, 2 * L * d});
        for (int64_t l = 0; l < L; ++l) {
            Tensor key, value;
            if (kv_) {
                key = params[size_t(2 * l)].second;
                value = params[size_t(2 * l + 1)].second;
            } else {
                const Block& blk = *base_->blocks[size_t(l)];
                Tensor hn = blk.ln1.forward(params[size_t(l)].second);
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
    int slot_of(int layer) const {
        for (size_t i = 0; i < layers_.size(); ++i)
            if (layers_[i] == layer) return int(i);
        return -1;
    }
    Tensor mlp_forward() const {  // [n, S*d]
        Tensor h = tanh(linear(mlp_[0], mlp_[1], mlp_[2]));
        return linear(h, mlp_[3], mlp_[4]);
    }
    Tensor slot_slice(const Tensor& all, int s) const {
        const int64_t d = base_->config().d_model;
        return slice(all, 1, s * d, (s + 1) * d);
    }
    // Prefix matrix number s ([n, d]), from the parameters or the MLP output.
    Tensor matrix(int s) const { return mlp_.empty() ? matrices_[size_t(s)] : slot_slice(reparam_out_, s); }

    bool kv_;
    bool infix_;                  // placed between source and target
    bool reparam_ = false;        // train through the MLP reparameterization
    int64_t reparam_hidden_ = 0;  // its hidden width h
    std::vector<std::string> names_;  // one per slot
    std::vector<Tensor> matrices_;    // [n, d] per slot, without reparameterization
    std::vector<Tensor> mlp_;         // embedding, fc1.w, fc1.b, fc2.w, fc2.b
    Tensor reparam_out_;              // this forward's MLP output [n, S*d]
};

std::unique_ptr<Adapter> make_prefix(const AdapterOptions& o) { return std::make_unique<PrefixTuning>(o, false); }
std::unique_ptr<Adapter> make_prefix_kv(const AdapterOptions& o) { return std::make_unique<PrefixTuning>(o, true); }
std::unique_ptr<Adapter> make_infix(const AdapterOptions& o) { return std::make_unique<PrefixTuning>(o, false, true); }

}  // namespace peftlab::peft
