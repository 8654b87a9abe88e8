#pragma once
// Layers of the GPT-style LM. Shapes: B batch rows, T tokens, C = d_model,
// H heads, F = d_ff, V vocabulary.
#include <memory>
#include <string>

#include "autograd/half.h"
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

// Initialisation: weights ~ N(0, init_std^2); init_std = 0 gives zeros without
// drawing (for loaders that overwrite every weight: GPT-2 XL draws 1.5B normals
// otherwise).
class Linear : public Module {
public:
    Linear(int64_t in, int64_t out, bool bias, Rng& rng, float init_std = 0.02f);
    // x [..., in] -> [..., out], through the hooks for this path (input,
    // delta, output: nn/hooks.h). With weight_f16 set and grad mode off, the
    // base GEMM reads it instead of `weight` (linear_half); hooks unchanged.
    Tensor forward(const Tensor& x, const ForwardContext& ctx) const;
    // The bias with a linear_delta bias delta [out] joined to it (the delta
    // alone without a bias). Throws std::invalid_argument naming this Linear
    // if the delta is not [out].
    Tensor bias_with(const Tensor& delta) const;
    Tensor weight;  // [out, in]
    Tensor bias;    // [out] or undefined
    // `weight` rounded to binary16 (GPT::set_weights_f16), or null. A copy:
    // it does not follow later changes to `weight`.
    std::shared_ptr<const HalfMatrix> weight_f16;
};

class Embedding : public Module {
public:
    Embedding(int64_t num, int64_t dim, Rng& rng, float init_std = 0.02f);
    Tensor forward(const std::vector<int32_t>& ids) const;  // -> [ids.size(), dim]
    Tensor weight;  // [num, dim]
};

class LayerNorm : public Module {
public:
    explicit LayerNorm(int64_t dim, float eps = 1e-5f);
    // x [..., dim] normalized over its last axis with this module's weight and bias.
    Tensor forward(const Tensor& x) const;
    // The same with the gain and bias the hooks give for this path
    // (ModelHooks::layer_norm_params). Per-row tables: normalized with gain 1
    // and bias 0, then each leading row times its entry's gain plus its bias.
    // Throws std::invalid_argument naming the path and shapes when they do not fit x.
    Tensor forward(const Tensor& x, const ForwardContext& ctx) const;
    Tensor weight, bias;  // [dim]
    float eps;  // added to the variance (HF layer_norm_epsilon)
};

class MLP : public Module {
public:
    // exact_gelu: x * Phi(x) (HF "gelu") instead of the tanh form (HF "gelu_new").
    MLP(int64_t C, int64_t F, int n_layers, Rng& rng, float init_std = 0.02f, bool exact_gelu = false);
    Tensor forward(const Tensor& x, const ForwardContext& ctx) const;
    Linear fc, proj;  // [F, C], [C, F]
    bool exact_gelu;
};

// Per-layer KV cache entry. Row b's keys and values seen so far (prefix
// vectors included) are k[b, :length], v[b, :length], their validity
// valid[b, :length]; the buffers k, v [B, S, C] and valid [B, S] have room for
// S >= length positions, so a decode step writes its column in place and
// attention reads the first `length` (S at least doubles when full: O(T)
// copying over a generation, not O(T^2)). Columns below `length` are never
// written in place, so a tensor taken from them stays as it was. A copy owns
// its buffers: two caches sharing them would append into the same columns.
struct LayerCache {
    Tensor k, v, valid;
    int64_t length = 0;

    LayerCache() = default;
    LayerCache(const LayerCache& other);
    LayerCache& operator=(const LayerCache& other);
    LayerCache(LayerCache&&) = default;
    LayerCache& operator=(LayerCache&&) = default;

    int64_t capacity() const { return k.defined() ? k.dim(1) : 0; }
    // Appends k, v [B, n, C] and valid [B, n] after the held positions.
    void append(const Tensor& k_new, const Tensor& v_new, const Tensor& valid_new);
    // B rows with room for S positions of width C, none held; free room is
    // zeros and invalid.
    static LayerCache with_room(int64_t B, int64_t S, int64_t C);
    // Writes src's held positions from s0 on into rows [r0, r0 + src rows),
    // columns [c0, c0 + src.length - s0); the caller sets `length`.
    void place(const LayerCache& src, int64_t r0, int64_t c0, int64_t s0 = 0);
    // Forgets the first n held positions of every row (fresh buffers, same room).
    void drop_front(int64_t n);
};

class CausalSelfAttention : public Module {
public:
    CausalSelfAttention(int64_t C, int n_heads, int n_layers, int layer, Rng& rng, float init_std = 0.02f);
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
    Block(int64_t C, int n_heads, int64_t F, int n_layers, int layer, Rng& rng, float init_std = 0.02f,
          float ln_eps = 1e-5f, bool exact_gelu = false);
    Tensor forward(const Tensor& x, const Tensor& valid, const ForwardContext& ctx, LayerCache* cache) const;
    LayerNorm ln1;
    CausalSelfAttention attn;
    LayerNorm ln2;
    MLP mlp;
};

}  // namespace peftlab
