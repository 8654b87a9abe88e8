#include "autograd/tape.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "autograd/flops.h"

namespace peftlab {
namespace {
struct Node {
    std::shared_ptr<GradCell> out;
    BackwardFn fn;
    int region;
};
struct TapeState {
    std::vector<Node> nodes;
    bool grad_on = true;
};
TapeState& tape() {
    static TapeState t;
    return t;
}
}  // namespace

bool grad_enabled() { return tape().grad_on; }

NoGradGuard::NoGradGuard() : saved_(tape().grad_on) { tape().grad_on = false; }
NoGradGuard::~NoGradGuard() { tape().grad_on = saved_; }

void record(Tensor& out, BackwardFn fn) {
    TensorImpl* impl = out.impl();
    impl->requires_grad = true;
    impl->gcell = std::make_shared<GradCell>();
    impl->gcell->numel = out.numel();
    impl->gcell->is_leaf = false;
    tape().nodes.push_back(Node{impl->gcell, std::move(fn), flops::current_region()});
}

void backward(const Tensor& loss, const Tensor* seed) {
    if (!loss.requires_grad())
        throw std::logic_error(
            "backward: the loss does not require grad — no trainable parameter reached it "
            "(are all parameters frozen, or was the forward run under NoGradGuard?)");
    if (seed) {
        if (seed->shape() != loss.shape())
            throw std::invalid_argument("backward: seed shape " + shape_str(seed->shape()) +
                                        " does not match loss shape " + shape_str(loss.shape()));
    } else if (loss.numel() != 1) {
        throw std::invalid_argument("backward: loss of shape " + shape_str(loss.shape()) +
                                    " is not a scalar; pass a seed gradient of that shape");
    }
    GradCell& cell = *loss.impl()->gcell;
    // This backward owns the tape's nodes: a node's closure may record and run
    // a tape of its own (checkpoint's recomputation) on the emptied one.
    std::vector<Node> nodes = std::move(tape().nodes);
    tape().nodes.clear();
    // Each backward runs and frees the whole tape. A non-leaf loss whose node is
    // gone was consumed by an earlier backward (its own, or another loss's) or
    // by clear_tape(); going on would silently produce no gradient. (The loss is
    // usually the last node, so the search from the back is short.)
    auto is_loss = [&](const Node& n) { return n.out.get() == &cell; };
    if (!cell.is_leaf && std::none_of(nodes.rbegin(), nodes.rend(), is_loss)) {
        tape().nodes = std::move(nodes);
        throw std::logic_error(
            "backward: the loss's graph is no longer on the tape — an earlier backward() ran and freed it "
            "(it runs the whole tape: sum the losses and call backward once) or clear_tape() discarded it");
    }
    if (seed) {
        cell.accumulate(seed->data());
    } else {
        float one = 1.f;
        cell.accumulate(&one);
    }
    NoGradGuard no_grad;  // backward closures must not record
    for (size_t i = nodes.size(); i-- > 0;) {
        Node& n = nodes[i];
        if (n.out->grad) {
            flops::Scope scope(flops::Phase::BackwardDx, n.region);
            n.fn(n.out->grad->data);
        }
        n.fn = nullptr;          // frees saved activations
        n.out->grad.reset();     // intermediate gradient fully consumed
    }
}

namespace {
// RAII: sets grad mode to `on` (checkpoint's recomputation runs inside
// backward, whose own guard turned it off).
class GradMode {
public:
    explicit GradMode(bool on) : saved_(tape().grad_on) { tape().grad_on = on; }
    ~GradMode() { tape().grad_on = saved_; }
    GradMode(const GradMode&) = delete;
    GradMode& operator=(const GradMode&) = delete;

private:
    bool saved_;
};

// RAII: sets the tape's nodes aside and gives them back, so that ops run in
// between record onto an empty tape of their own.
class TapeAside {
public:
    TapeAside() : saved_(std::move(tape().nodes)) { tape().nodes.clear(); }
    ~TapeAside() { tape().nodes = std::move(saved_); }
    TapeAside(const TapeAside&) = delete;
    TapeAside& operator=(const TapeAside&) = delete;

private:
    std::vector<Node> saved_;
};

// Tensors sharing the inputs' data, requiring grad where the input does,
// with no graph behind them: the recomputation's backward stops there.
std::vector<Tensor> leaves_like(const std::vector<Tensor>& inputs) {
    std::vector<Tensor> out;
    for (const Tensor& t : inputs) {
        Tensor leaf = t.defined() ? t.detach() : Tensor();
        if (t.defined() && t.requires_grad()) {
            leaf.set_requires_grad(true);
            // It stands in for the input: a gradient into it counts as dX
            // when the input is an activation, as it would without the checkpoint.
            leaf.impl()->gcell->is_leaf = t.is_leaf();
        }
        out.push_back(std::move(leaf));
    }
    return out;
}
}  // namespace

Tensor checkpoint(CheckpointFn fn, const std::vector<Tensor>& inputs) {
    if (!grad_enabled()) return fn(inputs);
    Tensor y;
    {
        // fn on its own tape, discarded at once: the graph tells only whether
        // y needs a gradient. The activations its closures saved go with it.
        TapeAside aside;
        y = fn(inputs);
        if (!y.requires_grad()) {
            // Nothing trainable reached y inside fn: the ops recorded nothing
            // the caller's graph needs (an input requiring grad would have
            // made y require it).
            return y;
        }
        std::vector<std::weak_ptr<GradCell>> made;
        for (const Node& n : tape().nodes)
            if (n.out != y.impl()->gcell) made.push_back(n.out);
        tape().nodes.clear();
        for (const std::weak_ptr<GradCell>& w : made)
            if (!w.expired())
                throw std::logic_error(
                    "checkpoint: a tensor that requires grad, made inside the recomputed function, outlives it (a "
                    "hook caching a per-forward tensor?); its gradient would be lost: make it before the checkpoint "
                    "(ModelHooks::begin_forward)");
    }
    Tensor out = y.detach();
    const Shape out_shape = out.shape();
    std::vector<std::shared_ptr<GradCell>> targets;  // per input; null: no gradient wanted
    for (const Tensor& t : inputs) targets.push_back(t.defined() ? grad_target(t) : nullptr);
    record(out, [fn = std::move(fn), inputs, targets, out_shape](const float* dy) {
        std::vector<Tensor> leaves = leaves_like(inputs);
        Tensor again;
        {
            GradMode grad_on(true);
            TapeAside aside;
            {
                flops::Scope scope(flops::Phase::Recompute);
                again = fn(leaves);
            }
            if (again.shape() != out_shape)
                throw std::logic_error("checkpoint: the recomputed output has shape " + shape_str(again.shape()) +
                                       ", the first call's " + shape_str(out_shape));
            const int64_t n = again.numel();
            Tensor seed = Tensor::from_data(out_shape, std::vector<float>(dy, dy + n));
            if (again.requires_grad()) backward(again, &seed);
        }
        for (size_t i = 0; i < inputs.size(); ++i)
            if (targets[i] && leaves[i].has_grad()) targets[i]->accumulate(leaves[i].impl()->gcell->grad->data);
    });
    return out;
}

size_t tape_size() { return tape().nodes.size(); }
void clear_tape() { tape().nodes.clear(); }

}  // namespace peftlab
