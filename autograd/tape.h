#pragma once
// The tape: a list of backward closures in the order their forward ops ran.
//
// An op records a node only when grad mode is on and some input requires
// grad; the output then requires grad too. backward(loss) seeds d(loss) = 1,
// walks the tape in reverse, and after running each node drops its closure
// (and with it the activations it saved) and the now-consumed gradient of its
// output. Gradients of leaves stay in their GradCell for the optimizer.
#include <functional>
#include <memory>

#include "autograd/tensor.h"

namespace peftlab {

bool grad_enabled();

// RAII: ops record nothing while one is alive (evaluation, generation).
class NoGradGuard {
public:
    NoGradGuard();
    ~NoGradGuard();
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

private:
    bool saved_;
};

// The gradient cell of t if an op must compute t's gradient, else null.
inline std::shared_ptr<GradCell> grad_target(const Tensor& t) {
    return t.requires_grad() && grad_enabled() ? t.impl()->gcell : nullptr;
}

// dy: the output's gradient (same numel as the output), complete when called.
using BackwardFn = std::function<void(const float* dy)>;

// Marks `out` as a non-leaf that requires grad and appends its backward.
// Call only when some input had a grad_target.
void record(Tensor& out, BackwardFn fn);

// Runs the tape backwards from `loss`. A non-scalar loss needs a seed of the
// same shape. Errors: loss does not require grad (nothing trainable reached
// it), non-scalar without seed, seed of the wrong shape, a loss whose graph is
// no longer on the tape. Every node runs and is freed, whichever loss it
// belongs to: for several losses, backward their sum once.
void backward(const Tensor& loss, const Tensor* seed = nullptr);

// Activation recomputation (gradient checkpointing: Chen et al. 2016,
// "Training Deep Nets with Sublinear Memory Cost"; torch.utils.checkpoint in
// its reentrant form): y = fn(inputs), but the tape keeps only `inputs` and y,
// not the activations fn's ops would save. In backward, fn runs again on the
// same inputs (its ops' FLOPs count under the phase `recompute`) and its own
// graph is back-propagated at once, a backward nested in the node's: the
// parameters fn reaches get the same gradients, in the same order, as without
// the checkpoint. An input that is also used outside fn gets the same gradient
// to rounding (fn's part is summed first, then added).
//
// fn must compute the same values when called again: pure in its inputs and
// the leaves it reads (a random draw must replay its generator's state), and
// it must not let a tensor it creates escape (a cache filled inside fn): that
// tensor's graph is discarded after the first call, so fn's result is checked
// and an escaped tensor that requires grad throws std::logic_error.
// Without grad mode, or when nothing fn reaches requires grad, it is fn(inputs).
// fn and what it captures must stay valid until backward.
using CheckpointFn = std::function<Tensor(const std::vector<Tensor>& inputs)>;
Tensor checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs);

size_t tape_size();
void clear_tape();  // discards recorded nodes without running them

}  // namespace peftlab
