#include "nn/gpt.h"

#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/flops.h"
#include "autograd/ops_fused.h"

namespace peftlab {

void GPTConfig::validate() const {
    auto bad = [](const char* field, auto value, const char* why) {
        throw std::invalid_argument(fmt::format("GPTConfig: {} = {} {}", field, value, why));
    };
    if (vocab < 1) bad("vocab", vocab, "must be >= 1");
    if (d_model < 1) bad("d_model", d_model, "must be >= 1");
    if (n_layers < 1) bad("n_layers", n_layers, "must be >= 1");
    if (n_heads < 1) bad("n_heads", n_heads, "must be >= 1");
    if (d_model % n_heads != 0)
        throw std::invalid_argument(
            fmt::format("GPTConfig: n_heads = {} does not divide d_model = {}", n_heads, d_model));
    if (d_ff < 1) bad("d_ff", d_ff, "must be >= 1");
    if (max_seq < 1) bad("max_seq", max_seq, "must be >= 1");
    if (!(dropout >= 0.f && dropout < 1.f)) bad("dropout", dropout, "must be in [0, 1)");
}

nlohmann::json GPTConfig::to_json() const {
    return {{"vocab", vocab},     {"d_model", d_model}, {"n_layers", n_layers}, {"n_heads", n_heads},
            {"d_ff", d_ff},       {"max_seq", max_seq}, {"dropout", dropout},   {"tie_embeddings", tie_embeddings}};
}

GPTConfig GPTConfig::from_json(const nlohmann::json& j) {
    GPTConfig c;
    auto get = [&](const char* key, auto& field) {
        if (!j.contains(key)) throw std::invalid_argument(fmt::format("GPTConfig: missing key '{}'", key));
        try {
            j.at(key).get_to(field);
        } catch (const nlohmann::json::exception& e) {
            throw std::invalid_argument(fmt::format("GPTConfig: key '{}' has a bad value: {}", key, e.what()));
        }
    };
    get("vocab", c.vocab);
    get("d_model", c.d_model);
    get("n_layers", c.n_layers);
    get("n_heads", c.n_heads);
    get("d_ff", c.d_ff);
    get("max_seq", c.max_seq);
    get("dropout", c.dropout);
    get("tie_embeddings", c.tie_embeddings);
    c.validate();
    return c;
}

void ModelInput::validate(const GPTConfig& cfg) const {
    const size_t n = size_t(B * T);
    if (B < 1 || T < 1) throw std::invalid_argument(fmt::format("ModelInput: B = {}, T = {} must be >= 1", B, T));
    if (tokens.size() != n)
        throw std::invalid_argument(fmt::format("ModelInput: {} tokens for B*T = {}", tokens.size(), n));
    if (!positions.empty() && positions.size() != n)
        throw std::invalid_argument(fmt::format("ModelInput: {} positions for B*T = {}", positions.size(), n));
    if (!valid.empty() && valid.size() != n)
        throw std::invalid_argument(fmt::format("ModelInput: {} valid flags for B*T = {}", valid.size(), n));
    for (size_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= cfg.vocab)
            throw std::invalid_argument(
                fmt::format("ModelInput: token[{}] = {} is outside the vocabulary [0, {})", i, tokens[i], cfg.vocab));
        int64_t pos = positions.empty() ? int64_t(i) % T : positions[i];
        if (pos < 0 || pos >= cfg.max_seq)
            throw std::invalid_argument(
                fmt::format("ModelInput: position {} at index {} is outside [0, max_seq = {})", pos, i, cfg.max_seq));
    }
}

GPT::GPT(const GPTConfig& cfg, uint64_t seed)
    : cfg_((cfg.validate(), cfg)),
      init_rng_(seed),
      wte(cfg.vocab, cfg.d_model, init_rng_),
      wpe(cfg.max_seq, cfg.d_model, init_rng_),
      ln_f(cfg.d_model),
      dropout_rng_(seed ^ 0xD5A3C1E7ull) {
    register_module("wte", wte);
    register_module("wpe", wpe);
    for (int l = 0; l < cfg.n_layers; ++l) {
        blocks.push_back(std::make_unique<Block>(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, l, init_rng_));
        register_module("blocks." + std::to_string(l), *blocks.back());
    }
    register_module("ln_f", ln_f);
    if (!cfg.tie_embeddings) {
        head = std::make_unique<Linear>(cfg.d_model, cfg.vocab, false, init_rng_);
        register_module("head", *head);
    }
    name_parameters();
}

Tensor GPT::forward(const ModelInput& in, KVCache* cache) { return run(in, cache, nullptr); }

Tensor GPT::loss(const ModelInput& in, const std::vector<int32_t>& targets) { return run(in, nullptr, &targets); }

Tensor GPT::run(const ModelInput& in, KVCache* cache, const std::vector<int32_t>* targets) {
    in.validate(cfg_);
    const int64_t B = in.B, T = in.T, C = cfg_.d_model;
    const bool prefill = !cache || cache->empty();
    if (cache && !prefill && cache->B != B)
        throw std::invalid_argument(fmt::format("GPT::forward: cache holds {} rows, input has {}", cache->B, B));
    ForwardContext ctx{hooks_, ForwardInfo{B, T, prefill, false}, &dropout_rng_, cfg_.dropout};
    if (hooks_) hooks_->begin_forward(ctx.info);

    Tensor x, valid;
    {
        flops::Region r("embed");
        std::vector<int32_t> pos = in.positions;
        if (pos.empty()) {
            pos.resize(size_t(B * T));
            for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
        }
        x = reshape(add(wte.forward(in.tokens), wpe.forward(pos)), {B, T, C});
        if (training() && cfg_.dropout > 0.f) x = dropout(x, cfg_.dropout, dropout_rng_);
        valid = Tensor::ones({B, T});
        for (size_t i = 0; i < in.valid.size(); ++i) valid.data()[i] = in.valid[i] ? 1.f : 0.f;
    }
    int64_t n_prompt = 0;
    if (hooks_ && prefill) {
        SeqPrefix sp = hooks_->input_prefix(ctx.info);
        if (sp.embeds.defined()) {
            Tensor pe = prefix_per_row(sp.embeds, B, sp.rows);
            n_prompt = pe.dim(1);
            x = concat({pe, x}, 1);
            valid = concat({prefix_valid_per_row(sp.valid, B, n_prompt, sp.rows), valid}, 1);
        }
    }
    if (cache && prefill) {
        cache->layers.assign(blocks.size(), LayerCache{});
        cache->B = B;
    }
    for (size_t l = 0; l < blocks.size(); ++l) {
        flops::Region r("blocks." + std::to_string(l));
        x = blocks[l]->forward(x, valid, ctx, cache ? &cache->layers[l] : nullptr);
    }
    flops::Region r("head");
    if (n_prompt) x = slice(x, 1, n_prompt, n_prompt + T);
    x = ln_f.forward(x);
    if (!targets) return head ? head->forward(x, ctx) : linear(x, wte.weight);
    Tensor delta = head && hooks_ && hooks_->adapts_linear(head->path())
                       ? hooks_->linear_delta(head->path(), x, ctx.info) : Tensor();
    if (delta.defined()) return lm_loss(add(linear(x, head->weight), delta), *targets);
    // The head and the loss fused: both count in this region ("head").
    return linear_cross_entropy(x, head ? head->weight : wte.weight, *targets, -1);
}

Tensor lm_loss(const Tensor& logits, const std::vector<int32_t>& targets) {
    flops::Region r("loss");
    return cross_entropy(logits, targets, -1);
}

}  // namespace peftlab
