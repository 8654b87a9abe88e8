// Full fine-tuning: the baseline. Every base parameter trains; the "adapter"
// is the whole model (its tensors keep the base's names).
#include "peft/adapter.h"

namespace peftlab::peft {

class FullFineTuning : public Adapter {
public:
    using Adapter::Adapter;
    std::string method() const override { return "full"; }
    bool adapts_linear(const std::string&) const override { return false; }
    ParamFormula formula(const GPTConfig& c) const override {
        const int64_t d = c.d_model, L = c.n_layers, V = c.vocab;
        // per block: 2 LayerNorms (4d), q,k,v,o (4d^2+4d), MLP (2*d*d_ff + d_ff + d)
        int64_t block = 4 * d + 4 * d * d + 4 * d + 2 * d * c.d_ff + c.d_ff + d;
        int64_t count = V * d + c.max_seq * d + L * block + 2 * d + (c.tie_embeddings ? 0 : V * d);
        return {count, "V*d + S*d + L*(4d^2 + 2*d*F + F + 9d) + 2d" +
                           std::string(c.tie_embeddings ? "" : " + V*d (untied head)")};
    }

protected:
    void build(GPT& base) override {
        base.unfreeze();
        params_ = base.named_parameters();
    }
};

std::unique_ptr<Adapter> make_full(const AdapterOptions& o) { return std::make_unique<FullFineTuning>(o); }

}  // namespace peftlab::peft
