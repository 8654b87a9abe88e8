// P-tuning (Liu et al. 2021, "GPT Understands, Too"), as Hugging Face PEFT's
// P_TUNING: n virtual tokens at the input (like prompt tuning) whose
// embeddings are the output of a prompt encoder run on n trainable vectors
// E [n, d]. The encoder is dropped at inference: materialize() keeps only its
// output, "prompt_embeddings" [n, d].
//
// Own options ("p-tuning" section, PEFT's names): encoder_reparameterization_type
// "MLP" (default) or "LSTM", encoder_hidden_size h (0 = d), encoder_num_layers
// (LSTM layers, 2). The encoders, as PEFT's PromptEncoder builds them:
//   MLP:  Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d)
//   LSTM: a bidirectional LSTM (PyTorch's gates i, f, g, o; zero initial
//         state) of encoder_num_layers layers over the n vectors, hidden h per
//         direction, then Linear(2h, 2h), ReLU, Linear(2h, d).
// sigmoid(x) is computed as 0.5 * tanh(x / 2) + 0.5 (the same function).
// Training parameters n*d + the encoder's; at inference n*d.
// Hugging Face PEFT: P_TUNING, "prompt_embeddings" [n, d] (the encoder output).
#include <cmath>

#include <fmt/format.h>

#include "autograd/tape.h"
#include "peft/adapter.h"
#include "peft/adapter_io.h"

namespace peftlab::peft {

class PTuning : public Adapter {
public:
    explicit PTuning(AdapterOptions o) : Adapter(std::move(o)) {
        MethodOptions own(opts_, "p-tuning");
        lstm_ = own.choice("encoder_reparameterization_type", "MLP", {"MLP", "LSTM"}) == "LSTM";
        hidden_ = own.integer("encoder_hidden_size", 0, 0);
        lstm_layers_ = own.integer("encoder_num_layers", 2, 1);
        set_own_options("p-tuning", own.finish());
    }
    std::string method() const override { return "p-tuning"; }
    int64_t virtual_tokens() const override { return opts_.n; }

    void begin_forward(const ForwardInfo& info) override {
        if (encoder_.empty() || !info.prefill) return;
        out_ = encode();  // once per forward
    }
    bool adapts_linear(const std::string&) const override { return false; }
    SeqPrefix input_prefix(const ForwardInfo&) override {
        if (opts_.n == 0) return {};
        return {encoder_.empty() ? prompt_ : out_, Tensor(), {}};
    }
    NamedTensors inference_parameters() const override {
        if (encoder_.empty()) return params_;
        NoGradGuard no_grad;
        return {{"prompt_embeddings", encode()}};
    }
    void materialize() override {
        if (encoder_.empty()) return;
        Tensor prompt = inference_parameters().front().second;
        params_.clear();
        encoder_.clear();
        out_ = Tensor();
        prompt_ = add_param("prompt_embeddings", prompt);
    }

    ParamFormula formula(const GPTConfig& c) const override {
        const int64_t d = c.d_model, h = h_of(c), n = opts_.n;
        if (!lstm_)
            return {n * d + encoder_params(c), fmt::format("n*d + (d*h + h) + (h*h + h) + (h*d + d)  (MLP encoder, h={})", h)};
        return {n * d + encoder_params(c),
                fmt::format("n*d + LSTM(d -> 2x{0}, {1} layers) + 2h*2h + 2h + 2h*d + d  (h={0})", h, lstm_layers_)};
    }
    ParamFormula inference_formula(const GPTConfig& c) const override { return {opts_.n * c.d_model, "n*d"}; }
    std::vector<double> lr_grid() const override { return {1e-3, 3e-3, 1e-2}; }  // through an encoder, like LoRA's deltas

    // The encoder once per forward, then the prompt expanded to every row.
    void cost_begin_forward(cost::Tally& t, const GPTConfig& c, const cost::StepShape&) const override {
        const int64_t n = opts_.n, d = c.d_model, h = h_of(c);
        using cost::kParam;
        if (!lstm_) {
            cost::Sym x = cost::linear(t, n, d, h, kParam, kParam, &kParam);
            x = cost::unary(t, n * h, 1, 1, x);  // relu
            x = cost::linear(t, n, h, h, x, kParam, &kParam);
            x = cost::unary(t, n * h, 1, 1, x);
            cost::linear(t, n, h, d, x, kParam, &kParam);
            return;
        }
        cost::Sym x = kParam;  // E
        int64_t in = d;
        for (int64_t k = 0; k < lstm_layers_; ++k) {
            for (int dir = 0; dir < 2; ++dir) {
                const cost::Sym xp = cost::linear(t, n, in, 4 * h, x, kParam, &kParam);  // all steps' input projections
                cost::Sym hs = cost::kFrozen, cs = cost::kFrozen;                       // zero initial state
                for (int64_t s = 0; s < n; ++s) {
                    cost::Sym g = cost::add(t, 4 * h, cost::derived(xp.rg), cost::linear(t, 1, h, 4 * h, hs, kParam, &kParam));
                    const cost::Sym i = sigmoid(t, h, g), f = sigmoid(t, h, g), o = sigmoid(t, h, g);
                    const cost::Sym gg = cost::unary(t, h, 1, 2, g);  // tanh
                    cs = cost::add(t, h, cost::mul(t, h, f, cs), cost::mul(t, h, i, gg));
                    hs = cost::mul(t, h, o, cost::unary(t, h, 1, 2, cs));
                }
            }
            x = cost::derived(true);  // both directions concatenated, [n, 2h]
            in = 2 * h;
        }
        x = cost::linear(t, n, 2 * h, 2 * h, x, kParam, &kParam);
        x = cost::unary(t, n * 2 * h, 1, 1, x);
        cost::linear(t, n, 2 * h, d, x, kParam, &kParam);
    }
    int64_t cost_input_prefix(cost::Tally& t, const GPTConfig& c, const cost::StepShape& s, cost::Sym& p) const override {
        if (opts_.n == 0) return 0;
        p = cost::expand(t, s.B * opts_.n * c.d_model, cost::derived(true));
        return opts_.n;
    }
    int64_t cost_decode_keys(int, const GPTConfig&) const override { return opts_.n; }  // cached like a soft prompt
    std::vector<cost::ParamGroup> cost_groups(const GPTConfig& c) const override {
        return {{"reparam", formula(c).count, opts_.n > 0}};
    }

    std::string hf_peft_type() const override { return "P_TUNING"; }
    std::optional<HfExport> hf_export() const override {
        const GPTConfig& c = base_->config();
        HfExport e;
        e.config["peft_type"] = "P_TUNING";
        hf_add_prompt_learning_fields(e.config, opts_.n, c);
        e.config["encoder_reparameterization_type"] = lstm_ ? "LSTM" : "MLP";
        e.config["encoder_hidden_size"] = h_of(c);
        e.config["encoder_num_layers"] = lstm_layers_;
        e.config["encoder_dropout"] = 0.0;
        e.tensors = inference_parameters();  // "prompt_embeddings" [n, d], the encoder's output
        return e;
    }
    std::optional<AdapterOptions> hf_import_options(const ConfigFile& cfg, const GPTConfig& c, const StFile&) const override {
        if (cfg.str("peft_type") != "P_TUNING") return std::nullopt;
        AdapterOptions o;
        o.init = "random";  // every value is overwritten from the file
        o.n = hf_check_prompt_learning(cfg, c);
        return o;  // the file holds the encoder's output only: the encoder's shape does not matter
    }
    // The file's prompt_embeddings into the materialized adapter (inference only, as PEFT loads it).
    void hf_import_tensors(const std::string& path, const StFile& file) override {
        materialize();
        check_tensors("import_hf", path, file, params_);
        copy_tensors(file, params_);
    }

protected:
    void build(GPT& base) override {
        const int64_t n = opts_.n, d = base.config().d_model, h = h_of(base.config());
        Rng rng(opts_.seed);
        Tensor embedding;
        if (opts_.init == "random") embedding = Tensor::uniform({n, d}, rng, -0.5f, 0.5f);
        else if (opts_.init == "vocab" || opts_.init == "text") embedding = embedding_rows(init_token_ids(n, rng));
        else throw std::invalid_argument(fmt::format("p-tuning adapter: init '{}' is not random, vocab or text", opts_.init));
        encoder_.push_back(add_param("prompt_encoder.embedding", embedding));
        // PyTorch's default Linear / LSTM init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LSTM: fan_in = h.
        auto uniform = [&](const std::string& name, Shape shape, int64_t fan_in) {
            const float b = 1.f / std::sqrt(float(fan_in));
            encoder_.push_back(add_param("prompt_encoder." + name, Tensor::uniform(shape, rng, -b, b)));
        };
        auto dense = [&](const std::string& name, int64_t in, int64_t out) {
            uniform(name + ".weight", {out, in}, in);
            uniform(name + ".bias", {out}, in);
        };
        if (!lstm_) {
            dense("mlp_head.0", d, h);
            dense("mlp_head.2", h, h);
            dense("mlp_head.4", h, d);
            return;
        }
        for (int64_t k = 0; k < lstm_layers_; ++k)
            for (const char* sfx : {"", "_reverse"}) {
                const int64_t in = k == 0 ? d : 2 * h;
                uniform(fmt::format("lstm_head.weight_ih_l{}{}", k, sfx), {4 * h, in}, h);
                uniform(fmt::format("lstm_head.weight_hh_l{}{}", k, sfx), {4 * h, h}, h);
                uniform(fmt::format("lstm_head.bias_ih_l{}{}", k, sfx), {4 * h}, h);
                uniform(fmt::format("lstm_head.bias_hh_l{}{}", k, sfx), {4 * h}, h);
            }
        dense("mlp_head.0", 2 * h, 2 * h);
        dense("mlp_head.2", 2 * h, d);
    }

private:
    int64_t h_of(const GPTConfig& c) const { return hidden_ ? hidden_ : c.d_model; }
    int64_t encoder_params(const GPTConfig& c) const {
        const int64_t d = c.d_model, h = h_of(c);
        if (!lstm_) return (d * h + h) + (h * h + h) + (h * d + d);
        int64_t p = 0;
        for (int64_t k = 0; k < lstm_layers_; ++k) p += 2 * (4 * h * (k == 0 ? d : 2 * h) + 4 * h * h + 8 * h);
        return p + (2 * h * 2 * h + 2 * h) + (2 * h * d + d);
    }
    // 0.5 * tanh(x / 2) + 0.5 on h of the gates: mul_scalar, tanh, mul_scalar, add_scalar.
    static cost::Sym sigmoid(cost::Tally& t, int64_t h, cost::Sym g) {
        cost::Sym x = cost::unary(t, h, 1, 1, g);
        x = cost::unary(t, h, 1, 2, x);
        x = cost::unary(t, h, 1, 1, x);
        return cost::unary(t, h, 1, 1, x);
    }
    static Tensor sigmoid(const Tensor& x) { return add_scalar(mul_scalar(tanh(mul_scalar(x, 0.5f)), 0.5f), 0.5f); }

    // One LSTM direction over x [n, in] -> [n, h]; w = {W_ih, W_hh, b_ih, b_hh}.
    Tensor lstm_direction(const Tensor& x, const Tensor* w, bool reverse) const {
        const int64_t n = x.dim(0), h = w[1].dim(1);
        if (n == 0) return Tensor::zeros({0, h});  // no virtual tokens: no steps
        const Tensor xp = linear(x, w[0], w[2]);  // [n, 4h]
        Tensor hs = Tensor::zeros({1, h}), cs = Tensor::zeros({1, h});
        std::vector<Tensor> out(static_cast<size_t>(n));
        for (int64_t s = 0; s < n; ++s) {
            const int64_t t = reverse ? n - 1 - s : s;
            const Tensor g = add(slice(xp, 0, t, t + 1), linear(hs, w[1], w[3]));  // [1, 4h]: i, f, g, o
            const Tensor i = sigmoid(slice(g, 1, 0, h)), f = sigmoid(slice(g, 1, h, 2 * h)),
                         o = sigmoid(slice(g, 1, 3 * h, 4 * h)), gg = tanh(slice(g, 1, 2 * h, 3 * h));
            cs = add(mul(f, cs), mul(i, gg));
            hs = mul(o, tanh(cs));
            out[size_t(t)] = hs;
        }
        return concat(out, 0);
    }
    // The encoder's output [n, d].
    Tensor encode() const {
        if (!lstm_) {
            Tensor x = relu(linear(encoder_[0], encoder_[1], encoder_[2]));
            x = relu(linear(x, encoder_[3], encoder_[4]));
            return linear(x, encoder_[5], encoder_[6]);
        }
        Tensor x = encoder_[0];
        size_t at = 1;
        for (int64_t k = 0; k < lstm_layers_; ++k) {
            const Tensor fwd = lstm_direction(x, &encoder_[at], false);
            const Tensor bwd = lstm_direction(x, &encoder_[at + 4], true);
            at += 8;
            x = concat({fwd, bwd}, 1);  // [n, 2h]
        }
        x = relu(linear(x, encoder_[at], encoder_[at + 1]));
        return linear(x, encoder_[at + 2], encoder_[at + 3]);
    }

    bool lstm_ = false;
    int64_t hidden_ = 0, lstm_layers_ = 2;
    std::vector<Tensor> encoder_;  // embedding, then the encoder's tensors in build order
    Tensor prompt_;                // after materialize: [n, d]
    Tensor out_;                   // this forward's encoder output [n, d]
};

std::unique_ptr<Adapter> make_p_tuning(const AdapterOptions& o) { return std::make_unique<PTuning>(o); }

}  // namespace peftlab::peft
