#pragma once
// FLOP counters, scoped by phase and by named region.
//
// Every op adds its FLOPs here as it runs (forward) and as its backward runs.
// Backward FLOPs go to `backward_dw` when the gradient being computed belongs
// to a leaf (a trainable parameter) and to `backward_dx` otherwise (gradients
// flowing to activations). Optimizer updates count under `optimizer`.
//
// Counting convention (the one place it is written down; peft/report mirrors it):
//   GEMM [M,K]x[K,N]            2*M*N*K (forward, and again for each of dA, dB computed)
//   linear bias                 M*N forward; its gradient M*N (a column sum)
//   add/sub/mul/div, scalar ops 1 per output element; backward 1 per element per
//                               input gradient (div: 3 for the divisor)
//   neg, relu, masked_fill      1 per element; backward 1 per element
//   exp, log, tanh, sqrt        1 per element; backward 2 per element
//   gelu (tanh form, erf form)  8 per element; backward 16 per element
//   sum/mean over an axis       1 per input element; backward 1 per input element
//   softmax / log_softmax       5 per element; backward 4 per element
//   layer_norm                  8 per element; backward 12 per element for dx
//                               (+ 2 per element each for dgamma, dbeta)
//   attention (fused)           per batch row and head: 2*Tq*Tk*Dh for Q K^T and
//                               2*Tq*Tk*Dh for P V; softmax 5*Tq*Tk; backward:
//                               dV, dP, dQ, dK GEMMs 2*Tq*Tk*Dh each when
//                               computed, softmax backward 4*Tq*Tk. Model FLOPs:
//                               the causal triangle the kernel skips is counted,
//                               the backward's recomputation of P is not
//   cross_entropy               6 per logit forward; 3 per logit backward
//   embedding                   0 forward (a gather); backward 1 per gathered element
//   dropout                     2 per element; backward 1 per element
//   concat, slice, reshape, transpose, permute, index_rows: 0 (memory only)
//   expand                      1 per output element (a broadcast add); backward 1
//   AdamW                       12 per trainable parameter; SGD+momentum 4
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace peftlab::flops {

// Recompute: forward ops run again during backward by activation
// recomputation (autograd/tape.h checkpoint), on top of the forward's own.
enum class Phase { Forward = 0, BackwardDx = 1, BackwardDw = 2, Optimizer = 3, Recompute = 4 };
inline constexpr int kPhases = 5;
const char* phase_name(Phase p);  // "forward", "backward_dx", "backward_dw", "optimizer", "recompute"

using Counts = std::array<uint64_t, kPhases>;

// Adds n FLOPs to the current phase and region.
void add(uint64_t n);
// Adds n backward FLOPs: dW if the gradient's target is a leaf, else dX.
void add_grad(bool target_is_leaf, uint64_t n);

Counts totals();
uint64_t sum(const Counts& c);  // over every phase
// Per region: full dotted name (e.g. "blocks.3.attn") -> counts. Region "" is
// everything outside any named region. Only regions with counts appear.
std::vector<std::pair<std::string, Counts>> by_region();
void reset();

int current_region();
Phase current_phase();

// RAII: nests a named region ("blocks.3" then "attn" -> "blocks.3.attn").
class Region {
public:
    explicit Region(const std::string& name);
    ~Region();
    Region(const Region&) = delete;
    Region& operator=(const Region&) = delete;

private:
    int saved_;
};

// RAII: sets the phase and, optionally, the region (the tape uses this to
// replay a node's backward in the region where its forward ran).
class Scope {
public:
    explicit Scope(Phase phase);
    Scope(Phase phase, int region_id);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

private:
    Phase saved_phase_;
    int saved_region_;
};

}  // namespace peftlab::flops
