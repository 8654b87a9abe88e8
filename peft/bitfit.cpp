// BitFit-style bias tuning (Ben Zaken et al. 2022). Instead of unfreezing the
// base's biases (which would change the shared base), every Linear of the
// chosen layers gets a trainable bias delta [out] through the linear_delta
// hook, which the Linear adds to its own bias (so a step costs an [out] add
// and the bias gradient's column sums per Linear, as unfreezing the bias
// would). L*(5d + F) parameters (q, k, v, o, fc, proj).
#include <fmt/format.h>

#include <map>

#include "peft/adapter.h"

namespace peftlab::peft {

class BitFit : public Adapter {
public:
    explicit BitFit(AdapterOptions o) : Adapter(std::move(o)) {
        set_own_options("bitfit", MethodOptions(opts_, "bitfit").finish());
    }
    std::string method() const override { return "bitfit"; }

    bool adapts_linear(const std::string& path) const override { return deltas_.count(path) > 0; }
    Tensor linear_delta(const std::string& path, const Tensor&, const ForwardInfo&) override {
        auto it = deltas_.find(path);
        return it == deltas_.end() ? Tensor() : it->second;  // [out], broadcast over rows
    }
    ParamFormula formula(const GPTConfig& c) const override {
        return {chosen_layers(c) * (5 * c.d_model + c.d_ff), "L*(5d + F)"};
    }
    std::vector<double> lr_grid() const override { return {1e-3, 3e-3, 1e-2}; }

    bool cost_bias_delta(const std::string& path, const GPTConfig& c) const override { return in_chosen_layer(c, path); }
    int64_t cost_decode_extra(const GPTConfig& c) const override { return chosen_layers(c) * (5 * c.d_model + c.d_ff); }
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        std::vector<cost::ParamGroup> g;
        for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), 5 * c.d_model + c.d_ff});
        return g;
    }

protected:
    void build(GPT& base) override {
        for (int l : layers_)
            for (const char* m : {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc", "mlp.proj"}) {
                std::string path = fmt::format("blocks.{}.{}", l, m);
                int64_t out = base.parameter(path + ".weight").dim(0);
                deltas_[path] = add_param(path + ".bias_delta", Tensor::zeros({out}));
            }
    }

private:
    std::map<std::string, Tensor> deltas_;  // Linear path -> [out]
};

std::unique_ptr<Adapter> make_bitfit(const AdapterOptions& o) { return std::make_unique<BitFit>(o); }

}  // namespace peftlab::peft
