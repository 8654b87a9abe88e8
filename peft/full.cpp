// Full fine-tuning: the baseline. Every base parameter trains; the "adapter"
// is the whole model (its tensors keep the base's names).
#include "peft/adapter.h"

namespace peftlab::peft {

class FullFineTuning : public Adapter {
public:
    explicit FullFineTuning(AdapterOptions o) : Adapter(std::move(o)) {
        set_own_options("full", MethodOptions(opts_, "full").finish());
    }
    std::string method() const override { return "full"; }
    bool adapts_linear(const std::string&) const override { return false; }
    bool changes_base() const override { return true; }
    std::vector<double> lr_grid() const override { return {3e-4, 1e-3, 3e-3}; }
    double weight_decay() const override { return 0.01; }

    ParamFormula formula(const GPTConfig& c) const override {
        const int64_t d = c.d_model, L = c.n_layers, V = c.vocab;
        int64_t count = V * d + c.max_seq * d + L * block_params(c) + 2 * d + (c.tie_embeddings ? 0 : V * d);
        return {count, "V*d + P*d + L*(4d^2 + 2*d*F + F + 9d) + 2d" +
                           std::string(c.tie_embeddings ? "" : " + V*d (untied head)")};
    }
    // The base's weights are the parameters (report.cpp walks them as such).
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        const int64_t d = c.d_model, V = c.vocab;
        std::vector<cost::ParamGroup> g{{"embed", V * d + c.max_seq * d}};
        for (int l = 0; l < c.n_layers; ++l) g.push_back({"blocks." + std::to_string(l), block_params(c)});
        g.push_back({"head", 2 * d + (c.tie_embeddings ? 0 : V * d)});
        return g;
    }

protected:
    void build(GPT& base) override {
        base.unfreeze();
        params_ = base.named_parameters();
    }

private:
    // per block: 2 LayerNorms (4d), q,k,v,o (4d^2+4d), MLP (2*d*d_ff + d_ff + d)
    static int64_t block_params(const GPTConfig& c) {
        const int64_t d = c.d_model;
        return 4 * d + 4 * d * d + 4 * d + 2 * d * c.d_ff + c.d_ff + d;
    }
};

std::unique_ptr<Adapter> make_full(const AdapterOptions& o) { return std::make_unique<FullFineTuning>(o); }

}  // namespace peftlab::peft
