#pragma once
// Fused ops that trade generality for memory (kept out of ops.h so that the
// many files including ops.h do not depend on them).
#include <cstdint>
#include <vector>

#include "autograd/tensor.h"

namespace peftlab {

// Fused, chunked linear + cross-entropy (the LM head and its loss): the value
// of cross_entropy(linear(hidden, weight), targets, ignore_index) without ever
// holding the [N, V] logits or probabilities (the idea of Liger Kernel's fused
// linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989).
//
// hidden [..., C] (N = numel / C rows), weight [V, C] (PyTorch's Linear layout,
// no bias), targets [N] int ids in [0, V) or ignore_index (not counted).
// Returns the scalar mean of -log softmax(hidden W^T)[target] over counted rows.
//
// The rows are processed in chunks of `chunk_rows` (0: automatic, about as
// many logits per chunk as hidden holds values, Liger's rule): per chunk the
// logits [rows, V] are one GEMM, their softmax and loss are taken in place,
// and, when hidden or weight needs a gradient, the same buffer becomes
// d loss / d logits and the gradients are computed right away: dHidden rows
// = dlogits W, dW += dlogits^T hidden (only when weight requires grad: a
// frozen head costs no dW GEMM). They are stored until backward, which scales
// them by the upstream gradient (a no-op for the usual 1) and hands them over.
// Storing rather than recomputing in backward saves the logits GEMM a second
// time (+1/3 of the head's FLOPs) for N*C (+ V*C when W is trainable) floats
// held between forward and backward; neither hidden nor weight is saved.
//
// FLOPs are counted as the unfused path counts them (flops.h): forward GEMM
// 2*N*V*C and cross_entropy 6*N*V; in backward (counted when backward runs,
// in the backward phases) 3*N*V for the logits' gradient, 2*N*V*C for dHidden
// and 2*N*V*C for dW, each only when computed. The loss is bitwise the
// unfused loss when OpenBLAS computes each logit in the same order whatever
// the row count (true of its sgemm kernels); dHidden likewise; dW sums the
// chunks in row order, so it differs from the one-GEMM dW by rounding only.
//
// Errors (std::invalid_argument): undefined tensors, weight not [V, C] for
// hidden [..., C], targets.size() != N, a target outside [0, V) other than
// ignore_index, no counted target, chunk_rows < 0.
Tensor linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const std::vector<int32_t>& targets,
                            int32_t ignore_index = -1, int64_t chunk_rows = 0);

// The automatic chunk size above for N rows, C features, V classes: the power
// of two nearest above N / ceil(V / C), at least 256 (on a CPU, each chunk
// GEMM packs all of weight again: 64-row chunks made the GPT-2 head 1.35x
// slower than one GEMM) and at most N.
int64_t linear_cross_entropy_chunk_rows(int64_t N, int64_t C, int64_t V);

}  // namespace peftlab
