#pragma once
// Optimizers (SGD, AdamW), global-norm gradient clipping and the learning-rate schedule.
//
// An optimizer is built from the named tensors it trains — usually
// trainable_named_parameters(model), or an adapter's tensors — and holds state
// for exactly those: frozen weights cost no optimizer memory. State lives in
// Tensors, so mem:: accounting sees it, and is allocated at construction, so
// state_bytes() and mem::current_bytes() are final before the first step.
//
// Updates follow torch.optim (1.13, foreach=False) operation by operation, in
// float with scalars prepared in double, so that runs can be compared with
// PyTorch. As there, a parameter with no gradient at a step is skipped and
// its own step count does not advance (bias correction is per parameter).
//
// Gradient accumulation: the Trainer (nn/trainer.h) sums micro-batches'
// token-sum gradients and divides by the global token count, so micro-batches
// with different numbers of counted tokens weigh as one big batch.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "autograd/tensor.h"
#include "nn/module.h"

namespace peftlab {

// The parameters of `m` that require grad, with their full dotted names.
NamedTensors trainable_named_parameters(const Module& m);

class Optimizer {
public:
    // Every tensor must require grad and every name must be unique
    // (std::invalid_argument naming the offender).
    explicit Optimizer(NamedTensors params, double lr);
    virtual ~Optimizer() = default;
    Optimizer(const Optimizer&) = delete;
    Optimizer& operator=(const Optimizer&) = delete;

    // One update of every parameter that has a gradient, at the current lr.
    void step();
    // Drops the parameters' gradient buffers (the next backward starts from zero).
    void zero_grad();

    double lr() const { return lr_; }
    void set_lr(double lr) { lr_ = lr; }
    const NamedTensors& params() const { return params_; }
    // Updates applied to params()[i] so far.
    int64_t param_steps(size_t i) const { return steps_[i]; }
    // Bytes of optimizer state (moments), e.g. 2 * 4 * numel for AdamW.
    int64_t state_bytes() const;

    // "<param>.<slot>" for every state slot (AdamW: exp_avg, exp_avg_sq; SGD
    // with momentum: momentum_buffer), sharing the live buffers, plus
    // "<param>.step", a fresh scalar [] holding that parameter's step count
    // (float, as PyTorch stores it; exact up to 2^24).
    NamedTensors state_dict() const;
    // Copies a state_dict back. Checks everything first — every key present,
    // none unexpected, shapes equal, steps whole numbers >= 0 — and throws
    // std::invalid_argument naming the key, leaving the state untouched.
    void load_state_dict(const NamedTensors& state);

protected:
    // Names of the per-parameter state slots, in state_dict order.
    virtual std::vector<std::string> slot_names() const = 0;
    // Whether slot k can never hold a negative value (a second moment): a
    // checkpoint that says otherwise is damaged, and is refused on load.
    virtual bool slot_nonnegative(size_t k) const { return false; }
    // Updates one parameter p (gradient g, n elements) at its update number
    // t >= 1; slots[k] is slot k's buffer for this parameter.
    virtual void update(float* p, const float* g, int64_t n, int64_t t, float* const* slots) = 0;
    virtual uint64_t flops_per_element() const = 0;
    // Allocates zeroed slot buffers; derived constructors call it once.
    void allocate_slots();

private:
    NamedTensors params_;
    std::vector<int64_t> steps_;             // per parameter
    std::vector<std::vector<Tensor>> slots_;  // [param][slot], each shaped like the param
    double lr_;
};

// torch.optim.SGD without dampening or Nesterov: d = g + wd * p;
// buf = d on the first update, else momentum * buf + d; p -= lr * buf (or d
// when momentum is 0, which keeps no state). FLOPs: 4 per element with
// momentum (flops.h), 2 without.
struct SGDOptions {
    double lr = 1e-2;
    double momentum = 0.0;
    double weight_decay = 0.0;
};

class SGD : public Optimizer {
public:
    SGD(NamedTensors params, const SGDOptions& opts = {});

protected:
    std::vector<std::string> slot_names() const override;
    void update(float* p, const float* g, int64_t n, int64_t t, float* const* slots) override;
    uint64_t flops_per_element() const override { return opts_.momentum != 0.0 ? 4 : 2; }

private:
    SGDOptions opts_;
};

// torch.optim.AdamW: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
// p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
// FLOPs: 12 per element (flops.h).
struct AdamWOptions {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.01;
};

class AdamW : public Optimizer {
public:
    AdamW(NamedTensors params, const AdamWOptions& opts = {});

protected:
    std::vector<std::string> slot_names() const override { return {"exp_avg", "exp_avg_sq"}; }
    bool slot_nonnegative(size_t k) const override { return k == 1; }  // exp_avg_sq: a mean of g^2
    void update(float* p, const float* g, int64_t n, int64_t t, float* const* slots) override;
    uint64_t flops_per_element() const override { return 12; }

private:
    AdamWOptions opts_;
};

// Global L2 norm of the gradients of `params` (those with no gradient count as
// zero), summed in double over fixed-size chunks in a fixed order, so the result
// does not depend on the thread count.
double grad_norm(const NamedTensors& params);
// As torch.nn.utils.clip_grad_norm_: if norm > max_norm, scales every gradient
// by max_norm / (norm + 1e-6). Returns the norm before clipping. A non-finite
// norm leaves the gradients as they are (the caller decides what to do).
double clip_grad_norm(const NamedTensors& params, double max_norm);

// Learning rate at update `step` (0-based): linear warmup over warmup_steps
// (peak * (step+1) / warmup_steps), then decay from peak at step warmup_steps
// towards peak * min_ratio, reached at step total_steps (one past the last
// update, as in Hugging Face's schedules) and held afterwards.
struct LRSchedule {
    enum class Decay { Constant, Linear, Cosine };
    double peak_lr = 1e-3;
    int64_t warmup_steps = 0;
    int64_t total_steps = 1;
    Decay decay = Decay::Cosine;
    double min_ratio = 0.0;

    // Throws std::invalid_argument naming the bad field and value.
    void validate() const;
    double at(int64_t step) const;
};

}  // namespace peftlab
