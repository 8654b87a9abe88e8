#include "peft/lora.h"

#include <cmath>

#include <fmt/format.h>

#include "autograd/tape.h"

namespace peftlab::peft {

namespace {
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
}  // namespace

void LoRA::build(GPT& base) {
    const int64_t r = opts_.lora_rank;
    check_targets(opts_.lora_targets);
    Rng rng(opts_.seed);
    for (int l : layers_)
        for (const std::string& t : opts_.lora_targets) {
            std::string path = fmt::format("blocks.{}.{}", l, target_module(t));
            Tensor W = base.parameter(path + ".weight");
            const int64_t out = W.dim(0), in = W.dim(1);
            // A as PyTorch's kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
            float bound = 1.f / std::sqrt(float(in));
            Pair p;
            p.A = add_param(path + ".lora_A.weight", Tensor::uniform({r, in}, rng, -bound, bound));
            p.B = add_param(path + ".lora_B.weight", Tensor::zeros({out, r}));
            targets_.emplace(path, p);
        }
}

Tensor LoRA::linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) {
    if (merged_) return {};
    auto it = targets_.find(path);
    if (it == targets_.end()) return {};
    // x [..., in] -> [..., r] -> [..., out]
    return mul_scalar(linear(linear(x, it->second.A), it->second.B), scale());
}

ParamFormula LoRA::formula(const GPTConfig& c) const {
    const int64_t r = opts_.lora_rank, d = c.d_model, F = c.d_ff;
    check_targets(opts_.lora_targets);
    int64_t per_layer = 0;
    std::string text;
    for (const std::string& t : opts_.lora_targets) {
        bool mlp_in = t == "fc", mlp_out = t == "proj";
        per_layer += r * (d + (mlp_in || mlp_out ? F : d));
        text += (text.empty() ? "" : " + ") + std::string(mlp_in || mlp_out ? "r*(d+F)" : "r*2d");
    }
    return {chosen_layers(c) * per_layer,
            "L*(" + text + ")"};
}

void LoRA::merge() {
    if (merged_) return;
    NoGradGuard no_grad;
    for (auto& [path, p] : targets_) {
        Tensor W = base_->parameter(path + ".weight");
        p.base_copy = W.clone();
        Tensor delta = mul_scalar(matmul(p.B, p.A), scale());  // [out, in]
        for (int64_t i = 0; i < W.numel(); ++i) W.data()[i] += delta.data()[i];
    }
    merged_ = true;
}

void LoRA::unmerge() {
    if (!merged_) return;
    for (auto& [path, p] : targets_) {
        base_->parameter(path + ".weight").copy_from(p.base_copy);
        p.base_copy = Tensor();
    }
    merged_ = false;
}

std::vector<std::string> LoRA::target_paths() const {
    std::vector<std::string> out;
    for (auto& [path, p] : targets_) out.push_back(path);
    return out;
}

std::unique_ptr<Adapter> make_lora(const AdapterOptions& o) { return std::make_unique<LoRA>(o); }

}  // namespace peftlab::peft
