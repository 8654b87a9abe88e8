#pragma once
// LoRA (Hu et al. 2021): for each target Linear W [out, in] of the chosen
// layers, trainable A [r, in] and B [out, r]; the output gains
// (alpha / r) * x A^T B^T. B starts at zero, so training starts from the base.
#include <map>

#include "peft/adapter.h"

namespace peftlab::peft {

class LoRA : public Adapter {
public:
    using Adapter::Adapter;
    std::string method() const override { return "lora"; }
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) override;
    bool adapts_linear(const std::string& path) const override { return !merged_ && targets_.count(path) > 0; }
    ParamFormula formula(const GPTConfig& c) const override;

    // W += (alpha/r) B A for inference without the extra path; unmerge restores
    // the saved base weights bitwise. Merged weights serve one tenant only.
    void merge();
    void unmerge();
    bool merged() const { return merged_; }
    // Target Linear paths, e.g. "blocks.0.attn.q_proj".
    std::vector<std::string> target_paths() const;
    float scale() const { return opts_.lora_alpha / float(opts_.lora_rank); }

protected:
    void build(GPT& base) override;

private:
    struct Pair {
        Tensor A, B;        // [r, in], [out, r]
        Tensor base_copy;   // W before merge
    };
    std::map<std::string, Pair> targets_;
    bool merged_ = false;
};

}  // namespace peftlab::peft
