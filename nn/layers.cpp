#include "nn/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/flops.h"
#include "autograd/tape.h"

namespace peftlab {

namespace {
Tensor maybe_dropout(const Tensor& x, const ForwardContext& ctx, bool training) {
    if (!training || ctx.dropout == 0.f || !ctx.rng) return x;
    return dropout(x, ctx.dropout, *ctx.rng);
}

}  // namespace

// Brings a prefix tensor to per-row form [B, n, C]: a shared [n, C] is
// expanded (its projections were computed once for the batch); a table
// [A, n, C] is gathered by `rows`. Validity follows the same rule, defaulting
// to all ones.
Tensor prefix_per_row(const Tensor& t, int64_t B, const std::vector<int32_t>& rows) {
    if (!rows.empty()) return index_rows(t, rows);
    if (t.ndim() == 3) return t;
    return expand(reshape(t, {1, t.dim(0), t.dim(1)}), {B, t.dim(0), t.dim(1)});
}
Tensor prefix_valid_per_row(const Tensor& valid, int64_t B, int64_t n, const std::vector<int32_t>& rows) {
    if (!valid.defined()) return Tensor::ones({B, n});
    return rows.empty() ? valid : index_rows(valid, rows);
}

namespace {
// key_valid [B, S] as a mask per query [B, Tq, S] in which row b's queries in
// columns < n_input + visible_from[b] do not see keys [0, n_gated): a layer
// prefix placed as an infix (LayerPrefix::visible_from, which counts the
// model input's T columns; the n_input = Tq - T input-prefix vectors before
// them, e.g. another row's soft prompt in a mixed batch, precede every source).
Tensor gate_prefix_keys(const Tensor& key_valid, int64_t Tq, int64_t T, int64_t n_gated,
                        const std::vector<int32_t>& visible_from, int layer) {
    const int64_t B = key_valid.dim(0), S = key_valid.dim(1), n_input = Tq - T;
    if (int64_t(visible_from.size()) != B)
        throw std::invalid_argument(fmt::format("layer_prefix (layer {}): visible_from has {} entries for {} batch rows",
                                                layer, visible_from.size(), B));
    Tensor mask = Tensor::empty({B, Tq, S});
    for (int64_t b = 0; b < B; ++b) {
        const int32_t from = visible_from[size_t(b)];
        if (from < 0 || from > T)
            throw std::invalid_argument(fmt::format(
                "layer_prefix (layer {}): visible_from[{}] = {} is outside [0, T = {}]", layer, b, from, T));
        for (int64_t i = 0; i < Tq; ++i) {
            float* m = mask.data() + (b * Tq + i) * S;
            std::memcpy(m, key_valid.data() + b * S, size_t(S) * sizeof(float));
            if (i < n_input + from) std::fill_n(m, n_gated, 0.f);
        }
    }
    return mask;
}
}  // namespace

namespace {
// dst[r0 + i, c0 + j] = src[i, s0 + j] for every row i of src and j < n; both
// [B, S, W] (or [B, S], W = 1) with the same W.
void copy_positions(Tensor& dst, int64_t r0, int64_t c0, const Tensor& src, int64_t s0, int64_t n) {
    const int64_t Bs = src.dim(0), Ss = src.dim(1), Sd = dst.dim(1), W = src.ndim() == 3 ? src.dim(2) : 1;
    for (int64_t b = 0; b < Bs; ++b)
        std::memcpy(dst.data() + ((r0 + b) * Sd + c0) * W, src.data() + (b * Ss + s0) * W,
                    size_t(n * W) * sizeof(float));
}
}  // namespace

LayerCache::LayerCache(const LayerCache& other) { *this = other; }

LayerCache& LayerCache::operator=(const LayerCache& other) {
    if (this == &other) return *this;
    if (!other.k.defined()) return *this = LayerCache{};
    LayerCache c = with_room(other.k.dim(0), other.capacity(), other.k.dim(2));
    c.place(other, 0, 0);
    c.length = other.length;
    return *this = std::move(c);
}

LayerCache LayerCache::with_room(int64_t B, int64_t S, int64_t C) {
    LayerCache c;
    c.k = Tensor::zeros({B, S, C});
    c.v = Tensor::zeros({B, S, C});
    c.valid = Tensor::zeros({B, S});
    return c;
}

void LayerCache::place(const LayerCache& src, int64_t r0, int64_t c0, int64_t s0) {
    const int64_t n = src.length - s0;
    if (n <= 0) return;  // also an empty cache, whose buffers are undefined
    copy_positions(k, r0, c0, src.k, s0, n);
    copy_positions(v, r0, c0, src.v, s0, n);
    copy_positions(valid, r0, c0, src.valid, s0, n);
}

void LayerCache::append(const Tensor& k_new, const Tensor& v_new, const Tensor& valid_new) {
    LayerCache added;
    added.k = k_new;
    added.v = v_new;
    added.valid = valid_new;
    added.length = k_new.dim(1);
    if (length + added.length > capacity()) {
        LayerCache grown = with_room(k_new.dim(0), std::max(length + added.length, 2 * capacity()), k_new.dim(2));
        grown.place(*this, 0, 0);
        grown.length = length;
        *this = std::move(grown);
    }
    place(added, 0, length);
    length += added.length;
}

void LayerCache::drop_front(int64_t n) {
    LayerCache c = with_room(k.dim(0), capacity(), k.dim(2));
    c.place(*this, 0, 0, n);
    c.length = length - n;
    *this = std::move(c);
}

Linear::Linear(int64_t in, int64_t out, bool with_bias, Rng& rng, float init_std) {
    weight = register_parameter("weight", init_std == 0.f ? Tensor::zeros({out, in})
                                                          : Tensor::normal({out, in}, rng, 0.f, init_std));
    if (with_bias) bias = register_parameter("bias", Tensor::zeros({out}));
}

Tensor Linear::forward(const Tensor& x_in, const ForwardContext& ctx) const {
    auto base = [&](const Tensor& x, const Tensor& b) {
        return weight_f16 && !grad_enabled() ? linear_half(x, *weight_f16, b) : linear(x, weight, b);
    };
    if (!ctx.hooks) return base(x_in, bias);
    Tensor x = ctx.hooks->linear_input(path(), x_in, ctx.info);
    if (!x.defined()) x = x_in;
    Tensor delta = ctx.hooks->linear_delta(path(), x, ctx.info);
    Tensor y;
    if (delta.defined() && delta.ndim() == 1) {  // a bias delta [out] (BitFit's): joins the bias
        y = base(x, bias_with(delta));
    } else {
        y = base(x, bias);
        if (delta.defined()) y = add(y, delta);
    }
    Tensor out = ctx.hooks->linear_output(path(), x, y, ctx.info);
    return out.defined() ? out : y;
}

Tensor Linear::bias_with(const Tensor& delta) const {
    if (delta.ndim() != 1 || delta.dim(0) != weight.dim(0))
        throw std::invalid_argument(fmt::format("linear_delta ({}): a bias delta must be [{}], got {}", path(),
                                                weight.dim(0), shape_str(delta.shape())));
    return bias.defined() ? add(bias, delta) : delta;
}

Embedding::Embedding(int64_t num, int64_t dim, Rng& rng, float init_std) {
    weight = register_parameter("weight", init_std == 0.f ? Tensor::zeros({num, dim})
                                                          : Tensor::normal({num, dim}, rng, 0.f, init_std));
}

Tensor Embedding::forward(const std::vector<int32_t>& ids) const { return embedding(weight, ids); }

LayerNorm::LayerNorm(int64_t dim, float eps_) : eps(eps_) {
    weight = register_parameter("weight", Tensor::ones({dim}));
    bias = register_parameter("bias", Tensor::zeros({dim}));
}

Tensor LayerNorm::forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps); }

Tensor LayerNorm::forward(const Tensor& x, const ForwardContext& ctx) const {
    if (!ctx.hooks) return forward(x);
    const NormParams p = ctx.hooks->layer_norm_params(path(), ctx.info);
    const int64_t C = weight.dim(0);
    auto bad = [&](const std::string& why) {
        auto shape_of = [](const Tensor& t) { return t.defined() ? shape_str(t.shape()) : "none"; };
        return std::invalid_argument(fmt::format("layer_norm_params ({}): weight {}, bias {} with {} rows for input {}: {}",
                                                 path(), shape_of(p.weight), shape_of(p.bias), p.rows.size(),
                                                 shape_str(x.shape()), why));
    };
    if (p.rows.empty()) {
        for (const Tensor* t : {&p.weight, &p.bias})
            if (t->defined() && t->shape() != Shape{C}) throw bad(fmt::format("must be [{}]", C));
        return layer_norm(x, p.weight.defined() ? p.weight : weight, p.bias.defined() ? p.bias : bias, eps);
    }
    if (!p.weight.defined() || !p.bias.defined() || p.weight.ndim() != 2 || p.weight.dim(1) != C ||
        p.bias.shape() != p.weight.shape())
        throw bad(fmt::format("per-row tables must both be [A, {}]", C));
    if (x.ndim() < 2 || int64_t(p.rows.size()) != x.dim(0)) throw bad("one table entry per leading row of the input");
    for (int32_t r : p.rows)
        if (r < 0 || r >= p.weight.dim(0)) throw bad(fmt::format("entry {} is outside the table", r));
    // Gains and biases [N, 1, ..., C], broadcast over each row's tokens.
    Shape s(size_t(x.ndim()), 1);
    s.front() = x.dim(0);
    s.back() = C;
    const Tensor n = layer_norm(x, Tensor::ones({C}), Tensor::zeros({C}), eps);
    return add(mul(n, reshape(index_rows(p.weight, p.rows), s)), reshape(index_rows(p.bias, p.rows), s));
}

// GPT-2 scales the init of projections into the residual stream by 1/sqrt(2L).
MLP::MLP(int64_t C, int64_t F, int n_layers, Rng& rng, float init_std, bool exact)
    : fc(C, F, true, rng, init_std),
      proj(F, C, true, rng, init_std / std::sqrt(2.f * float(n_layers))),
      exact_gelu(exact) {
    register_module("fc", fc);
    register_module("proj", proj);
}

Tensor MLP::forward(const Tensor& x, const ForwardContext& ctx) const {
    Tensor h = fc.forward(x, ctx);
    return proj.forward(exact_gelu ? gelu_erf(h) : gelu(h), ctx);
}

CausalSelfAttention::CausalSelfAttention(int64_t C, int heads, int n_layers, int layer_index, Rng& rng,
                                         float init_std)
    : q_proj(C, C, true, rng, init_std),
      k_proj(C, C, true, rng, init_std),
      v_proj(C, C, true, rng, init_std),
      o_proj(C, C, true, rng, init_std / std::sqrt(2.f * float(n_layers))),
      n_heads(heads),
      layer(layer_index) {
    register_module("q_proj", q_proj);
    register_module("k_proj", k_proj);
    register_module("v_proj", v_proj);
    register_module("o_proj", o_proj);
}

Tensor CausalSelfAttention::forward(const Tensor& h, const Tensor& valid, const LayerNorm& ln1,
                                    const ForwardContext& ctx, LayerCache* cache) const {
    const int64_t B = h.dim(0);
    Tensor q = q_proj.forward(h, ctx), k = k_proj.forward(h, ctx), v = v_proj.forward(h, ctx);
    Tensor kv_valid = valid;
    LayerPrefix p;
    if (ctx.hooks && ctx.info.prefill) {
        p = ctx.hooks->layer_prefix(layer, ctx.info);
        std::vector<Tensor> ks, vs, valids;
        if (p.hidden.defined()) {
            // Hidden-state prefix: only LN1 and the K/V projections of the
            // prefix vectors reach real tokens; their outputs would be discarded.
            ForwardContext pctx = ctx;
            pctx.info.on_prefix = true;
            Tensor hp = ln1.forward(p.hidden, pctx);
            ks.push_back(prefix_per_row(k_proj.forward(hp, pctx), B, p.rows));
            vs.push_back(prefix_per_row(v_proj.forward(hp, pctx), B, p.rows));
            valids.push_back(prefix_valid_per_row(p.hidden_valid, B, ks.back().dim(1), p.rows));
        }
        if (p.key.defined() != p.value.defined() || (p.key.defined() && p.key.shape() != p.value.shape())) {
            auto shape_of = [](const Tensor& t) { return t.defined() ? shape_str(t.shape()) : "none"; };
            throw std::invalid_argument(
                fmt::format("layer_prefix (layer {}): key {} and value {} must both be given, with equal shapes",
                            layer, shape_of(p.key), shape_of(p.value)));
        }
        if (p.key.defined()) {
            ks.push_back(prefix_per_row(p.key, B, p.rows));
            vs.push_back(prefix_per_row(p.value, B, p.rows));
            valids.push_back(prefix_valid_per_row(p.kv_valid, B, ks.back().dim(1), p.rows));
        }
        if (ks.empty() && !p.visible_from.empty())
            throw std::invalid_argument(
                fmt::format("layer_prefix (layer {}): visible_from is given without keys to place", layer));
        if (!ks.empty()) {
            ks.push_back(k);
            vs.push_back(v);
            valids.push_back(kv_valid);
            k = concat(ks, 1);
            v = concat(vs, 1);
            kv_valid = concat(valids, 1);
        }
    }
    if (cache) {
        // The cache keeps no graph: keys and values enter it as plain copies.
        if (grad_enabled() && (k.requires_grad() || v.requires_grad()))
            throw std::invalid_argument(fmt::format(
                "attention (layer {}): a cached forward keeps no gradient for keys and values; use NoGradGuard", layer));
        // A prefill writes the prefix at cache columns [0, n): later decoding
        // steps see it whatever its visible_from.
        const int64_t n_prefix = k.dim(1) - h.dim(1);
        cache->append(k, v, kv_valid);
        const Tensor mask = p.visible_from.empty()
                                ? cache->valid
                                : gate_prefix_keys(cache->valid, h.dim(1), ctx.info.T, n_prefix, p.visible_from, layer);
        Tensor a = attention(q, cache->k, cache->v, n_heads, /*causal=*/true, mask, cache->length);
        return o_proj.forward(a, ctx);
    }
    if (!p.visible_from.empty())
        kv_valid = gate_prefix_keys(kv_valid, h.dim(1), ctx.info.T, k.dim(1) - h.dim(1), p.visible_from, layer);
    if (ctx.hooks) ctx.hooks->observe_attention(layer, h, q, k, kv_valid, n_heads, ctx.info);
    Tensor a = attention(q, k, v, n_heads, /*causal=*/true, kv_valid);
    return o_proj.forward(a, ctx);
}

Block::Block(int64_t C, int heads, int64_t F, int n_layers, int layer, Rng& rng, float init_std, float ln_eps,
             bool exact_gelu)
    : ln1(C, ln_eps),
      attn(C, heads, n_layers, layer, rng, init_std),
      ln2(C, ln_eps),
      mlp(C, F, n_layers, rng, init_std, exact_gelu) {
    register_module("ln1", ln1);
    register_module("attn", attn);
    register_module("ln2", ln2);
    register_module("mlp", mlp);
}

Tensor Block::forward(const Tensor& x, const Tensor& valid, const ForwardContext& ctx, LayerCache* cache) const {
    Tensor a;
    {
        flops::Region r("attn");
        a = attn.forward(ln1.forward(x, ctx), valid, ln1, ctx, cache);
    }
    Tensor x1 = add(x, maybe_dropout(a, ctx, training()));
    flops::Region r("mlp");
    Tensor m = mlp.forward(ln2.forward(x1, ctx), ctx);
    return add(x1, maybe_dropout(m, ctx, training()));
}

}  // namespace peftlab
