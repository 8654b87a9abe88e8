#pragma once
// Layers of the GPT-style LM. Shapes: B batch rows, T tokens, C = d_model,
// H heads, F = d_ff, V vocabulary.
#include <string>

#include "autograd/ops.h"
#include "nn/hooks.h"
#include "nn/module.h"

namespace peftlab {

// Passed down a forward: the hooks (may be null), what they are told, and the
// dropout generator.
struct ForwardContext {
    ModelHooks* hooks = nullptr;
    ForwardInfo info;
    Rng* rng = nullptr;
    float dropout = 0.f;  // applied only in training mode
};

// A prefix tensor in per-row form [B, n, C]: a shared [n, C] is expanded (its
// projections ran once for the batch); a table [A, n, C] is gathered by rows.
Tensor prefix_per_row(const Tensor& t, int64_t B, const std::vector<int32_t>& rows);
// Its validity [B, n]: all ones if undefined, else as given or gathered by rows.
Tensor prefix_valid_per_row(const Tensor& valid, int64_t B, int64_t n, const std::vector<int32_t>& rows);

class Linear : public Module {
public:
    Linear(int64_t in, int64_t out, bool bias, Rng& rng, float init_std = 0.02f);
    // x [..., in] -> [..., out], plus the hooks' delta for this path.
    Tensor forward(const Tensor& x, const ForwardContext& ctx) const;
    Tensor weight;  // [out, in]
    Tensor bias;    // [out] or undefined
};

class Embedding : public Module {
public:
    Embedding(int64_t num, int64_t dim, Rng& rng, float init_std = 0.02f);
    Tensor forward(const std::vector<int32_t>& ids) const;  // -> [ids.size(), dim]
    Tensor weight;  // [num, dim]
};

class LayerNorm : public Module {
public:
    explicit LayerNorm(int64_t dim);
    Tensor forward(const Tensor& x) const;
    Tensor weight, bias;  // [dim]
};

class MLP : public Module {
public:
    MLP(int64_t C, int64_t F, int n_layers, Rng& rng);
    Tensor forward(const Tensor& x, const ForwardContext& ctx) const;  // GELU (tanh form)
    Linear fc, proj;  // [F, C], [C, F]
};

// Per-layer KV cache entry: keys/values seen so far, [B, Tk, C], and their
// validity [B, Tk] (prefix vectors included).
struct LayerCache {
    Tensor k, v, valid;
};

class CausalSelfAttention : public Module {
public:
    CausalSelfAttention(int64_t C, int n_heads, int n_layers, int layer, Rng& rng);
    // x: the layer input [B, T, C] (its LN1 is applied by the caller as h);
    // h: LN1(x) [B, T, C]; valid [B, T] 0/1 for h's positions.
    // The layer's prefix (from the hooks) is prepended to keys and values;
    // with a cache, keys and values are appended to it.
    Tensor forward(const Tensor& h, const Tensor& valid, const class LayerNorm& ln1, const ForwardContext& ctx,
                   LayerCache* cache) const;
    Linear q_proj, k_proj, v_proj, o_proj;
    int n_heads;
    int layer;
};

class Block : public Module {
public:
    Block(int64_t C, int n_heads, int64_t F, int n_layers, int layer, Rng& rng);
    Tensor forward(const Tensor& x, const Tensor& valid, const ForwardContext& ctx, LayerCache* cache) const;
    LayerNorm ln1;
    CausalSelfAttention attn;
    LayerNorm ln2;
    MLP mlp;
};

}  // namespace peftlab
