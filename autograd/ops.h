#pragma once
// Differentiable ops. Each op validates its inputs (std::invalid_argument naming
// the op and the shapes), computes its output, counts its FLOPs (conventions in
// flops.h), and — only if some input needs a gradient — records a backward that
// computes exactly the gradients that are needed and saves only what that
// backward reads. Axes may be negative (counted from the end).
#include <cstdint>
#include <optional>
#include <vector>

#include "autograd/tensor.h"

namespace peftlab {

// ---- element-wise, with numpy broadcasting (ranks <= 4) ----------------------
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& a, float s);
Tensor mul_scalar(const Tensor& a, float s);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor relu(const Tensor& a);            // gradient at exactly 0 is 0
Tensor gelu(const Tensor& a);            // tanh approximation (GPT-2)
Tensor gelu_erf(const Tensor& a);        // exact: x * Phi(x)
// Elements where mask != 0 become value; mask (uint8 values as float 0/1)
// broadcasts to a. No gradient flows to masked elements.
Tensor masked_fill(const Tensor& a, const Tensor& mask, float value);
Tensor dropout(const Tensor& a, float p, Rng& rng);  // inverted dropout; identity if p == 0

// ---- reductions --------------------------------------------------------------
Tensor sum(const Tensor& a);                              // all elements -> scalar []
Tensor sum(const Tensor& a, int axis, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, int axis, bool keepdim = false);

// ---- matrix products (cblas_sgemm; transposes are flags, never copies) --------
// a: [..., M, K] (or [..., K, M] with trans_a), b: [K, N] (or [N, K] with
// trans_b) or batched [..., K, N] with the same leading dims as a.
// A 2-D b multiplies all leading rows of a in one GEMM.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// PyTorch's Linear: x [..., in] @ weight[out, in]^T + bias[out]. No dW GEMM
// when weight is frozen; no bias pass when bias is undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());

// ---- normalisation, softmax, losses -------------------------------------------
Tensor layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps = 1e-5f);
// Softmax over the last axis. x: [..., Tq, Tk]; with causal, element (i, j) of
// each [Tq, Tk] matrix is masked when j > i + (Tk - Tq) (queries are the last Tq
// key positions); key_valid [B, Tk] (0/1) masks padding keys, x's leading dim
// being B. A fully masked row yields zeros.
Tensor softmax(const Tensor& x, bool causal = false, const Tensor& key_valid = Tensor());
Tensor log_softmax(const Tensor& x);
// Mean over counted tokens of -log softmax(logits)[target]. logits [N, V] (or
// [B, T, V]); targets: int ids, ignore_index entries are not counted.
Tensor cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets, int32_t ignore_index = -1);

// ---- attention ----------------------------------------------------------------
// Fused multi-head attention. q [B, Tq, C], k and v [B, Tk, C], C = H * Dh.
// Scores Q K^T / sqrt(Dh) per head, softmax with the causal rule above and
// key_valid (optional, 0/1) [B, Tk], or [B, Tq, Tk] for a mask per query (an
// infix: keys that only later queries see), then P V -> [B, Tq, C]. Heads are strided
// views into C: no permute copies. k, v [B, S, C] and key_valid [B, (Tq,) S] may
// hold more positions than are keys: only the first kv_len are read (-1: all
// S), so a KV cache with room to grow is attended without a copy. Gradients
// for k and v need kv_len = -1.
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int n_heads, bool causal,
                 const Tensor& key_valid = Tensor(), int64_t kv_len = -1);

// ---- indexing and layout -------------------------------------------------------
// weight [V, D]; ids in [0, V) -> [ids.size(), D] (then reshape as needed).
Tensor embedding(const Tensor& weight, const std::vector<int32_t>& ids);
Tensor reshape(const Tensor& a, const Shape& shape);  // a view; one dim may be -1
Tensor transpose(const Tensor& a, int axis0, int axis1);  // copies
Tensor permute(const Tensor& a, const std::vector<int>& order);  // copies
Tensor concat(const std::vector<Tensor>& parts, int axis);
Tensor slice(const Tensor& a, int axis, int64_t start, int64_t end);  // [start, end), copies
// Repeats size-1 dims to `shape` (e.g. a shared prefix [1, n, C] -> [B, n, C]).
Tensor expand(const Tensor& a, const Shape& shape);
// Rows of a [N, ...] picked by index (repeats allowed) -> [idx.size(), ...].
Tensor index_rows(const Tensor& a, const std::vector<int32_t>& idx);

// ---- reference kernels (test oracles, documentation) ----------------------------
// C[M,N] = op(A) op(B) with plain loops, double accumulation.
void matmul_naive(float* c, const float* a, const float* b, int M, int N, int K, bool trans_a,
                  bool trans_b);

}  // namespace peftlab
