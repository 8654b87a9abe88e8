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
// MLP by its output for inference.
#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter.h"

namespace peftlab::peft {

class PrefixTuning : public Adapter {
public:
    PrefixTuning(AdapterOptions o, bool kv) : Adapter(std::move(o)), kv_(kv) {}
    std::string method() const override { return kv_ ? "prefix-kv" : "prefix"; }

    void begin_forward(const ForwardInfo& info) override {
        if (mlp_.empty() || !info.prefill) return;
        reparam_out_ = mlp_forward();  // once per forward, for all layers
    }

    bool adapts_linear(const std::string&) const override { return false; }
    LayerPrefix layer_prefix(int layer, const ForwardInfo&) override {
        int slot = slot_of(layer);
        if (slot < 0 || opts_.n == 0) return {};
        LayerPrefix p;
        if (kv_) {
            p.key = matrix(2 * slot);
            p.value = matrix(2 * slot + 1);
        } else {
            p.hidden = matrix(slot);
        }
        return p;
    }

    int64_t virtual_tokens() const override { return layers_.empty() ? 0 : opts_.n; }

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
        if (!opts_.reparam) return inference_formula(c);
        const int64_t n = opts_.n, d = c.d_model, h = opts_.reparam_hidden, S = slots(c);
        return {n * d + h * d + h + S * d * h + S * d,
                fmt::format("n*d + d*h + h + h*({0}) + {0}  (MLP reparameterization, h={1})",
                            kv_ ? "2*L*d" : "L*d", h)};
    }
    ParamFormula inference_formula(const GPTConfig& c) const override {
        return {slots(c) * opts_.n * c.d_model, kv_ ? "2*L*n*d" : "L*n*d"};
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
        if (opts_.reparam) {
            const int64_t h = opts_.reparam_hidden, S = slots(base.config());
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
    std::vector<std::string> names_;  // one per slot
    std::vector<Tensor> matrices_;    // [n, d] per slot, without reparameterization
    std::vector<Tensor> mlp_;         // embedding, fc1.w, fc1.b, fc2.w, fc2.b
    Tensor reparam_out_;              // this forward's MLP output [n, S*d]
};

std::unique_ptr<Adapter> make_prefix(const AdapterOptions& o) { return std::make_unique<PrefixTuning>(o, false); }
std::unique_ptr<Adapter> make_prefix_kv(const AdapterOptions& o) { return std::make_unique<PrefixTuning>(o, true); }

}  // namespace peftlab::peft
