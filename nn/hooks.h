#pragma once
// Hook points through which an adapter (peft/) changes the model's forward
// without editing nn code. The model calls them; nn knows nothing of methods.
//
//   1. input_prefix  - vectors prepended to the input embeddings (prompt tuning)
//   2. layer_prefix.hidden - vectors prepended to a layer's input hidden states
//                      (prefix tuning, hidden-state form). Only their keys and
//                      values can reach real tokens and their outputs are
//                      discarded, so the model computes just LN1 -> K, V for them.
//   3. layer_prefix.key/value - key and value vectors prepended in a layer's
//                      attention (prefix tuning, key/value form)
//   4. linear_delta  - a delta added to any Linear's output (LoRA, BitFit)
//      linear_input  - a replacement for a Linear's input, e.g. scaled (IA3 on
//                      the MLP's inner activation)
//      linear_output - a replacement for a Linear's output, seeing its input
//                      and output, e.g. scaled (IA3 on keys and values)
//   5. layer_norm_params - the gain and bias a LayerNorm uses instead of its
//                      own (LN-tuning's trained copies)
//   6. per batch row - every prefix may be [B, n, C] with a validity mask
//                      [B, n], so row i can use adapter a_i or none; or a table
//                      [A, n, C] with `rows` naming each batch row's entry, so
//                      that K/V projections run once per table entry, not per row;
//                      LayerNorm gains and biases likewise, a table [A, C] with
//                      `rows` naming each leading row's entry.
//
// Positions (position_offset): under `keep` (AdapterHub; the default) real
// tokens keep their position ids whatever is prepended and prepended vectors
// get no position embedding; under `hf` (Hugging Face PEFT) a row's prefixes
// take the first n positions. Every real token may attend to all prepended
// vectors, except a layer prefix's with `visible_from` (an infix), which a
// row's tokens before that column do not see. With a KV cache, prefixes enter
// the cache once, at the first forward.
#include <string>
#include <vector>

#include "autograd/tensor.h"

namespace peftlab {

struct ForwardInfo {
    int64_t B = 0;        // batch rows
    int64_t T = 0;        // tokens per row in this call
    bool prefill = true;  // false on cached decoding steps (prefixes already cached)
    bool on_prefix = false;  // true while the model projects hidden-state prefix vectors
    // ModelInput::source_len: [B], row b's first source_len[b] columns are its
    // source (conditioning) and the rest its target; empty: all T columns are
    // source (a prompt), on cached decoding steps too.
    std::vector<int32_t> source_len;
};

// Shapes below: "[n, C]" is shared by all rows; "[B, n, C]" is per row; with
// `rows` set, tensors are tables [A, n, C] (validity [A, n]) and batch row b
// uses entry rows[b].
struct SeqPrefix {
    Tensor embeds;  // [n, C], [B, n, C] or table
    Tensor valid;   // optional 0/1 [B, n] (or [A, n] with rows): rows with fewer or no vectors
    std::vector<int32_t> rows;
};

// Hidden-state vectors and key/value vectors may both be given; the keys
// derived from `hidden` come first.
struct LayerPrefix {
    Tensor hidden, hidden_valid;    // hidden states prepended to the layer input
    Tensor key, value, kv_valid;    // keys and values prepended in attention
    std::vector<int32_t> rows;
    // Empty: every query sees these keys (a prefix). Else [B]: row b's queries
    // in columns >= visible_from[b] (of the model input's T) see them and
    // earlier ones do not, nor do input-prefix vectors, as if the vectors sat
    // just before that column (an infix, Li & Liang 2021, "Prefixing vs
    // Infixing"). Cached decoding steps see them.
    std::vector<int32_t> visible_from;
};

// The gain and bias (nn.LayerNorm's weight and bias) a LayerNorm uses
// instead of its own. Without `rows`: [C] each, for every row; either may be
// undefined (the LayerNorm's own). With `rows`: both given, as tables [A, C],
// and leading row i of the LayerNorm's input (a batch row, or a table entry
// while projecting prefixes: ForwardInfo::on_prefix) uses entry rows[i].
struct NormParams {
    Tensor weight, bias;
    std::vector<int32_t> rows;
};

class ModelHooks {
public:
    virtual ~ModelHooks() = default;
    // Called at the start of every forward, before any other hook (e.g. to
    // run a reparameterization MLP once for all layers).
    virtual void begin_forward(const ForwardInfo&) {}
    virtual SeqPrefix input_prefix(const ForwardInfo&) { return {}; }
    virtual LayerPrefix layer_prefix(int layer, const ForwardInfo&) { return {}; }
    // Position convention per batch row: -1 is `keep` (real tokens at their
    // ModelInput positions, prepended vectors without position embedding);
    // n >= 0 is `hf`, as Hugging Face PEFT on GPT-2: the row's prefixes take
    // positions 0..n-1 (n = its virtual tokens / prefix vectors), its real
    // tokens sit at their positions + n, and its input-prefix vectors get
    // position embeddings 0..n-1 (the j-th valid one gets j). Asked at every
    // forward, decoding steps included. Size B, or 1 for every row; empty: all -1.
    virtual std::vector<int32_t> position_offset(const ForwardInfo&) { return {}; }
    // x [..., in] is the input of the Linear at dotted path `path`
    // ("blocks.2.attn.q_proj"); return a tensor shaped like its output, a
    // bias delta [out] for every row (joined to the Linear's bias before the
    // GEMM adds it: an [out] add, and in backward the bias gradient's column
    // sums, not a pass over the [R, out] output each way), or an undefined
    // tensor for no change.
    virtual Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo&) { return {}; }
    // x [..., in] is the input of the Linear at `path`: return the input it
    // should read instead (same shape), or an undefined tensor for no change.
    // Runs before the GEMM; linear_delta and linear_output then see this input.
    virtual Tensor linear_input(const std::string& path, const Tensor& x, const ForwardInfo&) { return {}; }
    // y [..., out] is the output of the Linear at `path` on input x (its base
    // output plus linear_delta): return the output to use instead (same
    // shape), or an undefined tensor for no change.
    virtual Tensor linear_output(const std::string& path, const Tensor& x, const Tensor& y, const ForwardInfo&) {
        return {};
    }
    // The LayerNorm at dotted path `path` ("blocks.2.ln1", "blocks.2.ln2",
    // "ln_f") normalizes with the returned gain and bias (NormParams); an
    // empty NormParams: its own.
    virtual NormParams layer_norm_params(const std::string& path, const ForwardInfo&) { return {}; }
    // False when the three linear_* hooks change nothing for `path` whatever
    // x is: a caller that must prepare x first (MultiAdapter gathers each
    // adapter's rows) then skips the call. true, the default, is always safe.
    virtual bool adapts_linear(const std::string& path) const { return true; }
    // Observes layer `layer`'s attention on an uncached forward (diagnostics
    // only): h [B, Tq, C] is what its projections read (the LN1 output of the
    // row's own positions, virtual tokens included), q [B, Tq, C] and k
    // [B, Tk, C] the queries and keys, any layer prefix's keys first (the last
    // Tq keys are the row's own positions), key_valid [B, Tk], [B, Tq, Tk] (a
    // mask per query: LayerPrefix::visible_from) or undefined.
    // The probabilities are softmax(q_h k_h^T / sqrt(C / n_heads)) per head h
    // under ops.h's causal rule and key_valid. The default does nothing, so a
    // forward pays one virtual call per layer.
    virtual void observe_attention(int layer, const Tensor& h, const Tensor& q, const Tensor& k,
                                   const Tensor& key_valid, int n_heads, const ForwardInfo&) {}
};

// Passes every hook to `inner` (which may be changed, or null: no change). A
// wrapper that changes one hook derives from this and overrides that one
// only, so a new hook is added here once, not in every wrapper.
class ForwardingHooks : public ModelHooks {
public:
    explicit ForwardingHooks(ModelHooks* inner = nullptr) : inner_(inner) {}
    void set_inner(ModelHooks* inner) { inner_ = inner; }
    void begin_forward(const ForwardInfo& info) override {
        if (inner_) inner_->begin_forward(info);
    }
    SeqPrefix input_prefix(const ForwardInfo& info) override { return inner_ ? inner_->input_prefix(info) : SeqPrefix{}; }
    LayerPrefix layer_prefix(int layer, const ForwardInfo& info) override {
        return inner_ ? inner_->layer_prefix(layer, info) : LayerPrefix{};
    }
    std::vector<int32_t> position_offset(const ForwardInfo& info) override {
        return inner_ ? inner_->position_offset(info) : std::vector<int32_t>{};
    }
    Tensor linear_delta(const std::string& path, const Tensor& x, const ForwardInfo& info) override {
        return inner_ ? inner_->linear_delta(path, x, info) : Tensor();
    }
    Tensor linear_input(const std::string& path, const Tensor& x, const ForwardInfo& info) override {
        return inner_ ? inner_->linear_input(path, x, info) : Tensor();
    }
    Tensor linear_output(const std::string& path, const Tensor& x, const Tensor& y, const ForwardInfo& info) override {
        return inner_ ? inner_->linear_output(path, x, y, info) : Tensor();
    }
    NormParams layer_norm_params(const std::string& path, const ForwardInfo& info) override {
        return inner_ ? inner_->layer_norm_params(path, info) : NormParams{};
    }
    bool adapts_linear(const std::string& path) const override { return inner_ && inner_->adapts_linear(path); }
    void observe_attention(int layer, const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& key_valid,
                           int n_heads, const ForwardInfo& info) override {
        if (inner_) inner_->observe_attention(layer, h, q, k, key_valid, n_heads, info);
    }

protected:
    ModelHooks* inner_;
};

}  // namespace peftlab
