#pragma once
// The analytic FLOP model's vocabulary: symbolic tensors and the cost of each
// op as autograd/flops.h counts it. peft/report.cpp walks the base model's
// training step with these ops; a method adds its own terms at the points
// where GPT::forward calls its hooks (Adapter's cost_* functions), using the
// same ops. Nothing here runs a tensor: it is the second, independent
// computation that the measured counters are checked against.
//
// A gradient is computed only for an input that requires grad (a trainable
// parameter, or something computed from one); it counts as dW when that input
// is a trainable leaf and as dX otherwise. So a frozen weight costs no dW
// GEMM, and dX is paid in a layer exactly when something below it, or in it,
// is trainable.
#include <cstdint>
#include <string>

#include "autograd/flops.h"

namespace peftlab::peft::cost {

// What the model needs to know of a tensor: whether its gradient is computed
// (it requires grad) and whether it is a trainable leaf (that gradient is dW).
struct Sym {
    bool rg = false;
    bool leaf = false;
};
inline constexpr Sym kFrozen{false, false};
inline constexpr Sym kParam{true, true};
inline Sym derived(bool rg) { return {rg, false}; }  // an op's output

// FLOPs by phase (flops::Phase order).
struct Tally {
    flops::Counts c{};
    void fwd(int64_t n) { c[0] += uint64_t(n); }
    // Backward term for the gradient of `to`, if it is computed.
    void grad(Sym to, int64_t n) {
        if (to.rg) c[to.leaf ? 2 : 1] += uint64_t(n);
    }
    void dx(int64_t n) { c[1] += uint64_t(n); }
};

// ---- ops, costs as in flops.h ----
// linear x [R, in] @ W[out, in]^T (+ b[out]): 2*R*in*out (+ R*out); backward
// dX and dW GEMMs 2*R*in*out each, db R*out.
inline Sym linear(Tally& t, int64_t R, int64_t in, int64_t out, Sym x, Sym w, const Sym* bias) {
    const int64_t gemm = 2 * R * in * out;
    t.fwd(gemm + (bias ? R * out : 0));
    t.grad(x, gemm);
    t.grad(w, gemm);
    if (bias) t.grad(*bias, R * out);
    return derived(x.rg || w.rg || (bias && bias->rg));
}
// add / mul with broadcasting: 1 per output element, backward 1 per output
// element per input whose gradient is computed.
inline Sym add(Tally& t, int64_t n_out, Sym a, Sym b) {
    t.fwd(n_out);
    t.grad(a, n_out);
    t.grad(b, n_out);
    return derived(a.rg || b.rg);
}
inline Sym mul(Tally& t, int64_t n_out, Sym a, Sym b) { return add(t, n_out, a, b); }
// element-wise map: mul_scalar (1, 1), tanh (1, 2), gelu (8, 16), dropout (2, 1).
inline Sym unary(Tally& t, int64_t n, int fwd_cost, int bwd_cost, Sym a) {
    t.fwd(fwd_cost * n);
    t.grad(a, bwd_cost * n);
    return derived(a.rg);
}
// layer_norm over rows of D: 8 per element; backward dx 12, dgamma 2, dbeta 2.
inline Sym layer_norm(Tally& t, int64_t R, int64_t D, Sym x, Sym gamma, Sym beta) {
    t.fwd(8 * R * D);
    t.grad(x, 12 * R * D);
    t.grad(gamma, 2 * R * D);
    t.grad(beta, 2 * R * D);
    return derived(x.rg || gamma.rg || beta.rg);
}
// Fused attention, per row and head: QK^T and PV 2*Tq*Tk*Dh each, softmax
// 5*Tq*Tk; backward dV, dQ, dK 2*Tq*Tk*Dh each as needed, and dP (2*Tq*Tk*Dh)
// plus softmax backward (4*Tq*Tk) once if dQ or dK is.
inline Sym attention(Tally& t, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t Dh, Sym q, Sym k, Sym v) {
    const int64_t gemm = 2 * B * H * Tq * Tk * Dh, soft = B * H * Tq * Tk;
    t.fwd(2 * gemm + 5 * soft);
    t.grad(v, gemm);
    if (q.rg || k.rg) t.dx(gemm + 4 * soft);
    t.grad(q, gemm);
    t.grad(k, gemm);
    return derived(q.rg || k.rg || v.rg);
}
// embedding: a gather (0); backward scatter-add 1 per gathered element.
inline Sym embedding(Tally& t, int64_t N, int64_t D, Sym w) {
    t.grad(w, N * D);
    return derived(w.rg);
}
// expand [1, n, C] -> [B, n, C] is add(zeros, reshape(a)); the reshape makes
// its input's gradient a dX term even for a parameter.
inline Sym expand(Tally& t, int64_t n_out, Sym a) { return add(t, n_out, kFrozen, derived(a.rg)); }
// cross_entropy: 6 per logit; backward 3 per logit.
inline Sym cross_entropy(Tally& t, int64_t N, int64_t V, Sym logits) {
    t.fwd(6 * N * V);
    t.grad(logits, 3 * N * V);
    return derived(logits.rg);
}
// concat, slice, reshape, index_rows: memory only.

// The shape of the walked training step: B rows of T real tokens.
struct StepShape {
    int64_t B = 0, T = 0;
};

// A prefix a method puts in layer l's attention: n key/value vectors per row
// (0: none) and whether their gradients are computed.
struct KeyValueCost {
    int64_t n = 0;
    Sym k, v;
};

// One trainable-parameter group of the per-layer map ("embed", "blocks.<l>",
// "head", "reparam" or a method's own) and whether AdamW updates it (false
// for tensors the loss cannot reach, e.g. a prefix MLP whose prefixes are empty).
struct ParamGroup {
    std::string group;
    int64_t params = 0;
    bool updated = true;
};

}  // namespace peftlab::peft::cost
