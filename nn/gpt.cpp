#include "nn/gpt.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/flops.h"
#include "autograd/ops_fused.h"
#include "autograd/tape.h"

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
    if (!(ln_eps > 0.f && ln_eps < 1.f)) bad("ln_eps", ln_eps, "must be in (0, 1)");
    if (activation != "gelu_new" && activation != "gelu")
        bad("activation", activation, "is not gelu_new (tanh form) or gelu (exact)");
}

nlohmann::json GPTConfig::to_json() const {
    return {{"vocab", vocab},     {"d_model", d_model}, {"n_layers", n_layers}, {"n_heads", n_heads},
            {"d_ff", d_ff},       {"max_seq", max_seq}, {"dropout", dropout},   {"tie_embeddings", tie_embeddings},
            {"ln_eps", ln_eps},       {"activation", activation}};
}

GPTConfig GPTConfig::from_json(const nlohmann::json& j) {
    GPTConfig c;
    if (!j.is_object()) throw std::invalid_argument(fmt::format("GPTConfig: expected a JSON object, got a {}", j.type_name()));
    // get_to alone would truncate 2.5 to 2, wrap 2^40 into an int, and (for a
    // double outside the target's range) convert with undefined behaviour.
    auto get = [&](const char* key, auto& field) {
        using T = std::decay_t<decltype(field)>;
        if (!j.contains(key)) throw std::invalid_argument(fmt::format("GPTConfig: missing key '{}'", key));
        const nlohmann::json& v = j.at(key);
        bool ok = false;
        if constexpr (std::is_same_v<T, bool>) {
            ok = v.is_boolean();
        } else if constexpr (std::is_same_v<T, std::string>) {
            ok = v.is_string();
        } else if constexpr (std::is_integral_v<T>) {
            ok = v.is_number_integer() &&
                 (v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(std::numeric_limits<T>::max())
                                         : v.get<int64_t>() >= int64_t(std::numeric_limits<T>::min()) &&
                                               v.get<int64_t>() <= int64_t(std::numeric_limits<T>::max()));
        } else {
            ok = v.is_number() && std::abs(v.get<double>()) <= double(std::numeric_limits<T>::max());
        }
        if (!ok) {
            std::string text = v.dump();
            if (text.size() > 40) text = text.substr(0, 40) + "...";
            throw std::invalid_argument(fmt::format("GPTConfig: key '{}' has a bad value {}", key, text));
        }
        v.get_to(field);
    };
    get("vocab", c.vocab);
    get("d_model", c.d_model);
    get("n_layers", c.n_layers);
    get("n_heads", c.n_heads);
    get("d_ff", c.d_ff);
    get("max_seq", c.max_seq);
    get("dropout", c.dropout);
    get("tie_embeddings", c.tie_embeddings);
    if (j.contains("ln_eps")) get("ln_eps", c.ln_eps);
    if (j.contains("activation")) get("activation", c.activation);
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
    if (!source_len.empty() && int64_t(source_len.size()) != B)
        throw std::invalid_argument(fmt::format("ModelInput: {} source lengths for B = {}", source_len.size(), B));
    for (size_t b = 0; b < source_len.size(); ++b)
        if (source_len[b] < 0 || source_len[b] > T)
            throw std::invalid_argument(
                fmt::format("ModelInput: source_len[{}] = {} is outside [0, T = {}]", b, source_len[b], T));
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

GPT::GPT(const GPTConfig& cfg, uint64_t seed, float init_std)
    : cfg_((cfg.validate(), cfg)),
      init_rng_(seed),
      wte(cfg.vocab, cfg.d_model, init_rng_, init_std),
      wpe(cfg.max_seq, cfg.d_model, init_rng_, init_std),
      ln_f(cfg.d_model, cfg.ln_eps),
      dropout_rng_(seed ^ 0xD5A3C1E7ull) {
    register_module("wte", wte);
    register_module("wpe", wpe);
    for (int l = 0; l < cfg.n_layers; ++l) {
        blocks.push_back(std::make_unique<Block>(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, l, init_rng_,
                                                 init_std, cfg.ln_eps, cfg.activation == "gelu"));
        register_module("blocks." + std::to_string(l), *blocks.back());
    }
    register_module("ln_f", ln_f);
    if (!cfg.tie_embeddings) {
        head = std::make_unique<Linear>(cfg.d_model, cfg.vocab, false, init_rng_, init_std);
        register_module("head", *head);
    }
    name_parameters();
}

namespace {
// block.forward(x) under checkpoint: the recomputation in backward replays the
// dropout generator from the state the first call started at, and the model's
// generator moves on as if the block had run once.
Tensor recomputed_block(const Block& block, const Tensor& x, const Tensor& valid, const ForwardContext& ctx) {
    const std::optional<Rng> start = ctx.rng ? std::optional<Rng>(*ctx.rng) : std::nullopt;
    auto end = std::make_shared<std::optional<Rng>>();
    Tensor y = checkpoint(
        [&block, valid, ctx, start, end](const std::vector<Tensor>& in) {
            ForwardContext c = ctx;
            std::optional<Rng> rng = start;
            c.rng = rng ? &*rng : nullptr;
            Tensor out = block.forward(in[0], valid, c, nullptr);
            *end = rng;
            return out;
        },
        {x});
    if (ctx.rng && *end) *ctx.rng = **end;
    return y;
}
}  // namespace

void GPT::set_recompute(const std::vector<int>& layers) {
    std::vector<bool> on(size_t(cfg_.n_layers), false);
    for (int l : layers) {
        if (l < 0 || l >= cfg_.n_layers)
            throw std::invalid_argument(
                fmt::format("GPT::set_recompute: layer {} is outside [0, n_layers = {})", l, cfg_.n_layers));
        if (on[size_t(l)])
            throw std::invalid_argument(fmt::format("GPT::set_recompute: layer {} is given twice", l));
        on[size_t(l)] = true;
    }
    recompute_ = layers.empty() ? std::vector<bool>() : on;
}

std::vector<int> GPT::recompute() const {
    std::vector<int> layers;
    for (size_t l = 0; l < recompute_.size(); ++l)
        if (recompute_[l]) layers.push_back(int(l));
    return layers;
}

Tensor GPT::forward(const ModelInput& in, KVCache* cache) { return run(in, cache, nullptr); }

Tensor GPT::forward_at(const ModelInput& in, const std::vector<int32_t>& columns, KVCache* cache) {
    return run(in, cache, nullptr, &columns);
}

Tensor GPT::loss(const ModelInput& in, const std::vector<int32_t>& targets) { return run(in, nullptr, &targets); }

void GPT::set_weights_f16(bool on) {
    std::vector<std::pair<Linear*, std::string>> linears;  // with their parameter names, for errors
    for (size_t i = 0; i < blocks.size(); ++i) {
        Block& b = *blocks[i];
        for (auto [l, name] : {std::pair{&b.attn.q_proj, "attn.q_proj"}, std::pair{&b.attn.k_proj, "attn.k_proj"},
                               std::pair{&b.attn.v_proj, "attn.v_proj"}, std::pair{&b.attn.o_proj, "attn.o_proj"},
                               std::pair{&b.mlp.fc, "mlp.fc"}, std::pair{&b.mlp.proj, "mlp.proj"}})
            linears.emplace_back(l, fmt::format("blocks.{}.{}.weight", i, name));
    }
    if (head) linears.emplace_back(&*head, "head.weight");
    // Every copy is made before any is installed: a weight outside F16's
    // range throws (naming it) and leaves the model as it was.
    std::vector<std::shared_ptr<const HalfMatrix>> copies(linears.size());
    std::shared_ptr<const HalfMatrix> wte_copy;
    if (on) {
        for (size_t k = 0; k < linears.size(); ++k)
            copies[k] = std::make_shared<const HalfMatrix>(HalfMatrix::from(linears[k].first->weight, linears[k].second));
        if (!head) wte_copy = std::make_shared<const HalfMatrix>(HalfMatrix::from(wte.weight, "wte.weight"));
    }
    for (size_t k = 0; k < linears.size(); ++k) linears[k].first->weight_f16 = copies[k];
    wte_f16_ = wte_copy;
    weights_f16_ = on;
}

Tensor GPT::run(const ModelInput& in, KVCache* cache, const std::vector<int32_t>* targets,
                const std::vector<int32_t>* columns) {
    in.validate(cfg_);
    if (weights_f16_ && grad_enabled())
        throw std::logic_error(
            "GPT::forward: F16 weights are on (set_weights_f16) and grad mode is on; the F16 copies have no "
            "backward and would not follow trained weights: run under NoGradGuard, or call set_weights_f16(false)");
    const int64_t B = in.B, T = in.T, C = cfg_.d_model;
    if (columns) {
        if (int64_t(columns->size()) != B)
            throw std::invalid_argument(
                fmt::format("GPT::forward_at: {} columns given for a batch of {} rows", columns->size(), B));
        for (int64_t b = 0; b < B; ++b)
            if ((*columns)[size_t(b)] < 0 || (*columns)[size_t(b)] >= T)
                throw std::invalid_argument(fmt::format("GPT::forward_at: row {} column {} is outside [0, T = {})", b,
                                                        (*columns)[size_t(b)], T));
    }
    const bool prefill = !cache || cache->empty();
    if (cache && !prefill && cache->B != B)
        throw std::invalid_argument(fmt::format("GPT::forward: cache holds {} rows, input has {}", cache->B, B));
    ForwardContext ctx{hooks_, ForwardInfo{B, T, prefill, false, in.source_len}, &dropout_rng_, cfg_.dropout};
    if (hooks_) hooks_->begin_forward(ctx.info);

    // Position convention per row (ModelHooks::position_offset): -1 keep, n >= 0 hf.
    std::vector<int32_t> offset(size_t(B), -1);
    if (hooks_) {
        std::vector<int32_t> o = hooks_->position_offset(ctx.info);
        if (o.size() == 1) offset.assign(size_t(B), o[0]);
        else if (int64_t(o.size()) == B) offset = std::move(o);
        else if (!o.empty())
            throw std::invalid_argument(
                fmt::format("GPT::forward: position_offset gave {} entries for {} rows", o.size(), B));
    }
    Tensor x, valid;
    {
        flops::Region r("embed");
        std::vector<int32_t> pos = in.positions;
        if (pos.empty()) {
            pos.resize(size_t(B * T));
            for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
        }
        for (int64_t i = 0; i < B * T; ++i) {
            const int32_t shift = std::max(offset[size_t(i / T)], 0);
            if (int64_t(pos[size_t(i)]) + shift >= cfg_.max_seq)
                throw std::invalid_argument(fmt::format(
                    "GPT::forward: row {} position {} + {} prefix positions is outside [0, max_seq = {})", i / T,
                    pos[size_t(i)], shift, cfg_.max_seq));
            pos[size_t(i)] += shift;
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
            Tensor pvalid = prefix_valid_per_row(sp.valid, B, n_prompt, sp.rows);  // [B, n]
            const bool all_hf = std::all_of(offset.begin(), offset.end(), [](int32_t o) { return o >= 0; });
            const bool all_valid = std::all_of(pvalid.data(), pvalid.data() + pvalid.numel(), [](float v) { return v != 0.f; });
            if (all_hf && all_valid) {
                // hf, one prompt per row: position embeddings 0..n-1, shared by the rows.
                if (n_prompt > cfg_.max_seq)
                    throw std::invalid_argument(
                        fmt::format("GPT::forward: {} prompt vectors exceed max_seq = {}", n_prompt, cfg_.max_seq));
                std::vector<int32_t> ppos(static_cast<size_t>(n_prompt));
                for (int64_t j = 0; j < n_prompt; ++j) ppos[size_t(j)] = int32_t(j);
                Tensor pw = reshape(wpe.forward(ppos), {1, n_prompt, C});
                pe = add(pe, expand(pw, {B, n_prompt, C}));
            } else if (std::any_of(offset.begin(), offset.end(), [](int32_t o) { return o >= 0; })) {
                // hf: the j-th valid vector of a row gets position embedding j;
                // keep rows (and invalid vectors) get none.
                std::vector<int32_t> ppos(size_t(B * n_prompt), 0);
                Tensor on = Tensor::zeros({B, n_prompt, 1});
                for (int64_t b = 0; b < B; ++b) {
                    int32_t next = 0;
                    for (int64_t j = 0; j < n_prompt; ++j) {
                        if (offset[size_t(b)] < 0 || pvalid.data()[b * n_prompt + j] == 0.f) continue;
                        if (next >= cfg_.max_seq)
                            throw std::invalid_argument(fmt::format(
                                "GPT::forward: row {} has more prompt vectors than max_seq = {}", b, cfg_.max_seq));
                        ppos[size_t(b * n_prompt + j)] = next++;
                        on.data()[b * n_prompt + j] = 1.f;
                    }
                }
                Tensor pw = reshape(wpe.forward(ppos), {B, n_prompt, C});
                pe = add(pe, mul(pw, expand(on, {B, n_prompt, C})));
            }
            x = concat({pe, x}, 1);
            valid = concat({pvalid, valid}, 1);
        }
    }
    if (cache && prefill) {
        cache->layers.assign(blocks.size(), LayerCache{});
        cache->B = B;
    }
    for (size_t l = 0; l < blocks.size(); ++l) {
        flops::Region r("blocks." + std::to_string(l));
        if (!recompute_.empty() && recompute_[l] && !cache && grad_enabled())
            x = recomputed_block(*blocks[l], x, valid, ctx);
        else
            x = blocks[l]->forward(x, valid, ctx, cache ? &cache->layers[l] : nullptr);
    }
    flops::Region r("head");
    if (columns) {
        // x [B, S, C] -> the selected positions [B, 1, C] (S = n_prompt + T).
        const int64_t S = x.dim(1);
        std::vector<int32_t> rows(static_cast<size_t>(B));
        for (int64_t b = 0; b < B; ++b) rows[size_t(b)] = int32_t(b * S + n_prompt + (*columns)[size_t(b)]);
        x = reshape(index_rows(reshape(x, {B * S, C}), rows), {B, 1, C});
    } else if (n_prompt) {
        x = slice(x, 1, n_prompt, n_prompt + T);
    }
    x = ln_f.forward(x, ctx);
    auto logits_of = [&](const Tensor& h) {
        return head ? head->forward(h, ctx) : wte_f16_ ? linear_half(h, *wte_f16_) : linear(h, wte.weight);
    };
    if (!targets) {
        Tensor logits = logits_of(x);
        return columns ? reshape(logits, {B, cfg_.vocab}) : logits;
    }
    // F16 (no graph here): the logits, then the loss; linear_cross_entropy reads F32 weights.
    if (weights_f16_) return lm_loss(logits_of(x), *targets);
    Tensor delta = head && hooks_ && hooks_->adapts_linear(head->path())
                       ? hooks_->linear_delta(head->path(), x, ctx.info) : Tensor();
    if (delta.defined() && delta.ndim() == 1)  // a bias delta, joined to the bias
        return lm_loss(linear(x, head->weight, head->bias_with(delta)), *targets);
    if (delta.defined()) return lm_loss(add(linear(x, head->weight), delta), *targets);
    // The head and the loss fused: both count in this region ("head").
    return linear_cross_entropy(x, head ? head->weight : wte.weight, *targets, -1);
}

Tensor lm_loss(const Tensor& logits, const std::vector<int32_t>& targets) {
    flops::Region r("loss");
    return cross_entropy(logits, targets, -1);
}

}  // namespace peftlab
