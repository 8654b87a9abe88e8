// VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation"),
// as Hugging Face PEFT's VERA computes it: one pair of frozen random matrices
// A [r, in_max] and B [out_max, r], SHARED by every adapted Linear of every
// layer (sized for the largest in / out among the targets and sliced per
// Linear: A[:, :in], B[:out, :]), and per adapted Linear W [out, in] two
// trainable vectors lambda_d [r] and lambda_b [out]:
//     h = W x + b + lambda_b * (B[:out, :] (lambda_d * (A[:, :in] x))).
// lambda_b starts at 0 (training starts from the base), lambda_d at d_initial.
// A and B are Kaiming-uniform with gain sqrt(2) (U(-sqrt(6/fan_in),
// sqrt(6/fan_in)); fan_in = in_max for A, r for B), drawn A first, then B, from
// peftlab's Rng seeded with projection_prng_key: they are not parameters,
// never saved, and rebuilt bitwise from the key (which the saved options record).
// (Torch's generator differs, so the draws are not PEFT's own: same
// distribution, other numbers.)
//
// Own options ("vera" section, PEFT's names): r (8 here; PEFT's default 256
// is larger than the toy models' widths), d_initial (0.1),
// projection_prng_key (0), target_modules (["q_proj", "v_proj"]; of q_proj,
// k_proj, v_proj, o_proj, fc, proj). Trainable: per adapted Linear r + out,
// L*(2r + 2d) by default (PEFT: vera_lambda_d [r] + vera_lambda_b [out]).
// Mergeable: W += (lambda_b * B[:out, :]) (lambda_d * A[:, :in]).
// No Hugging Face export: PEFT's VERA on GPT-2 adapts the fused c_attn (one
// lambda_d for q, k and v together: L*(r + 3d) by default there), which
// separate q and v adapters cannot be written as in general. Not offered
// (refused as unknown keys): vera_dropout, bias, init_weights, fan_in_fan_out
// and save_projection; A and B are never stored (PEFT's default
// save_projection=True writes them into the adapter file).
#include <algorithm>
#include <cmath>
#include <map>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter.h"

namespace peftlab::peft {

namespace {

// Where each target name lives inside a block.
std::string vera_module(const std::string& t) {
    if (t == "q_proj" || t == "k_proj" || t == "v_proj" || t == "o_proj") return "attn." + t;
    if (t == "fc" || t == "proj") return "mlp." + t;
    throw std::invalid_argument(
        fmt::format("vera adapter: target '{}' is not one of q_proj, k_proj, v_proj, o_proj, fc, proj", t));
}

// Input and output widths of a target Linear in a model of this config.
std::pair<int64_t, int64_t> in_out(const GPTConfig& c, const std::string& t) {
    if (t == "fc") return {c.d_model, c.d_ff};
    if (t == "proj") return {c.d_ff, c.d_model};
    return {c.d_model, c.d_model};
}

// The largest rank we accept: A and B are allocated at r * (in_max + out_max) floats.
constexpr int64_t kMaxRank = int64_t(1) << 20;

}  // namespace

class VeRA : public Adapter {
public:
    explicit VeRA(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "vera");
        rank_ = own.integer("r", 8, 1);
        if (rank_ > kMaxRank)
            throw std::invalid_argument(fmt::format("vera options: key 'r' = {} must be <= {}", rank_, kMaxRank));
        d_initial_ = float(own.number("d_initial", 0.1));
        prng_key_ = uint64_t(own.integer("projection_prng_key", 0, 0));
        targets_ = own.strings("target_modules", {"q_proj", "v_proj"});
        for (size_t i = 0; i < targets_.size(); ++i) {
            vera_module(targets_[i]);
            for (size_t j = 0; j < i; ++j)
                if (targets_[j] == targets_[i])
                    throw std::invalid_argument(fmt::format("vera adapter: target '{}' is listed twice", targets_[i]));
        }
        set_own_options("vera", own.finish());
    }
    std::string method() const override { return "vera"; }

    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) override {
        if (merged()) return {};
        auto it = vecs_.find(path);
        if (it == vecs_.end()) return {};
        const Vectors& v = it->second;
        // x [..., in] -> A x [..., r] -> * lambda_d -> B (.) [..., out] -> * lambda_b
        return mul(linear(mul(linear(x, v.A), v.lambda_d), v.B), v.lambda_b);
    }
    bool adapts_linear(const std::string& path) const override { return !merged() && vecs_.count(path) > 0; }

    ParamFormula formula(const GPTConfig& c) const override {
        int64_t per_layer = 0, n_d = 0, n_f = 0;
        for (const std::string& t : targets_) {
            const int64_t out = in_out(c, t).second;
            per_layer += rank_ + out;
            (t == "fc" ? n_f : n_d) += 1;
        }
        std::string text;
        auto term = [&](int64_t k, const char* sym) {
            if (k == 0) return;
            text += (text.empty() ? "" : " + ") + (k == 1 ? std::string(sym) : fmt::format("{}{}", k, sym));
        };
        term(int64_t(targets_.size()), "r");
        term(n_d, "d");
        term(n_f, "F");
        return {chosen_layers(c) * per_layer, "L*(" + (text.empty() ? std::string("0") : text) + ")"};
    }
    // The vectors scale a fixed random basis; like (IA)^3's scales they need larger steps than LoRA's matrices.
    std::vector<double> lr_grid() const override { return {3e-3, 1e-2, 3e-2}; }
    bool mergeable() const override { return true; }

    // linear_delta's ops: x A^T (A frozen), * lambda_d, (.) B^T (B frozen), * lambda_b, added to y.
    cost::Sym cost_linear(const std::string& path, cost::Tally& t, const GPTConfig& c, int64_t R, int64_t in,
                          int64_t out, cost::Sym x, cost::Sym y) const override {
        if (target_of(c, path).empty()) return y;
        cost::Sym u = cost::linear(t, R, in, rank_, x, cost::kFrozen, nullptr);
        u = cost::mul(t, R * rank_, u, cost::kParam);
        u = cost::linear(t, R, rank_, out, u, cost::kFrozen, nullptr);
        u = cost::mul(t, R * out, u, cost::kParam);
        return cost::add(t, R * out, y, u);
    }
    // Decoding counts the merged model: no extra work.
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        int64_t per_layer = 0;
        for (const std::string& t : targets_) per_layer += rank_ + in_out(c, t).second;
        std::vector<cost::ParamGroup> g;
        if (per_layer)
            for (int l : chosen_layers_of(c)) g.push_back({fmt::format("blocks.{}", l), per_layer});
        return g;
    }

protected:
    void build(GPT& base) override {
        // The shared pair, sized for the largest adapted Linear (PEFT's _find_dim).
        int64_t in_max = 0, out_max = 0;
        std::vector<std::pair<std::string, Tensor>> adapted;  // path, W
        for (int l : layers_)
            for (const std::string& t : targets_) {
                const std::string path = fmt::format("blocks.{}.{}", l, vera_module(t));
                const Tensor W = base.parameter(path + ".weight");
                in_max = std::max(in_max, W.dim(1));
                out_max = std::max(out_max, W.dim(0));
                adapted.emplace_back(path, W);
            }
        if (adapted.empty()) return;
        Rng rng(prng_key_);
        const float bound_a = std::sqrt(6.f / float(in_max)), bound_b = std::sqrt(6.f / float(rank_));
        shared_A_ = Tensor::uniform({rank_, in_max}, rng, -bound_a, bound_a);  // frozen: no grad, not a parameter
        shared_B_ = Tensor::uniform({out_max, rank_}, rng, -bound_b, bound_b);
        // One contiguous slice per width, shared by every Linear of that width (the full pair itself at the max).
        std::map<int64_t, Tensor> a_of, b_of;
        for (const auto& [path, W] : adapted) {
            const int64_t out = W.dim(0), in = W.dim(1);
            if (!a_of.count(in)) a_of[in] = in == in_max ? shared_A_ : slice(shared_A_, 1, 0, in);
            if (!b_of.count(out)) b_of[out] = out == out_max ? shared_B_ : slice(shared_B_, 0, 0, out);
            Vectors v;
            v.A = a_of[in];
            v.B = b_of[out];
            v.lambda_d = add_param(path + ".vera_lambda_d", Tensor::full({rank_}, d_initial_));
            v.lambda_b = add_param(path + ".vera_lambda_b", Tensor::zeros({out}));
            vecs_.emplace(path, v);
        }
    }
    // W += (lambda_b * B) (lambda_d * A); unmerge() puts the saved W back bitwise.
    void merge_into_base() override {
        NoGradGuard no_grad;
        for (auto& [path, v] : vecs_) {
            Tensor W = merge_target(path + ".weight");
            const int64_t out = W.dim(0), in = W.dim(1);
            // (lambda_b * B) [out, r] and (lambda_d * A) [r, in], then their product.
            Tensor bs = Tensor::empty({out, rank_}), as = Tensor::empty({rank_, in});
            for (int64_t o = 0; o < out; ++o)
                for (int64_t k = 0; k < rank_; ++k) bs.data()[o * rank_ + k] = v.lambda_b.data()[o] * v.B.data()[o * rank_ + k];
            for (int64_t k = 0; k < rank_; ++k)
                for (int64_t i = 0; i < in; ++i) as.data()[k * in + i] = v.lambda_d.data()[k] * v.A.data()[k * in + i];
            const Tensor delta = matmul(bs, as);  // [out, in]
            for (int64_t i = 0; i < W.numel(); ++i) W.data()[i] += delta.data()[i];
        }
    }

private:
    struct Vectors {
        Tensor A, B;                // frozen slices of the shared pair: [r, in], [out, r]
        Tensor lambda_d, lambda_b;  // trainable: [r], [out]
    };
    // The target name of a Linear path in a chosen layer ("blocks.1.attn.v_proj" -> "v_proj"), "" if none.
    std::string target_of(const GPTConfig& c, const std::string& path) const {
        if (!in_chosen_layer(c, path)) return "";
        for (const std::string& t : targets_)
            if (path.ends_with(fmt::format(".{}", vera_module(t)))) return t;
        return "";
    }

    int64_t rank_ = 8;
    float d_initial_ = 0.1f;
    uint64_t prng_key_ = 0;
    std::vector<std::string> targets_;
    Tensor shared_A_, shared_B_;           // [r, in_max], [out_max, r]; frozen
    std::map<std::string, Vectors> vecs_;  // adapted Linear path -> its vectors and slices
};

std::unique_ptr<Adapter> make_vera(const AdapterOptions& o) { return std::make_unique<VeRA>(o); }

}  // namespace peftlab::peft
