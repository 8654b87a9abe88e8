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
    std::vector<Node>& nodes = tape().nodes;
    // Each backward runs and frees the whole tape. A non-leaf loss whose node is
    // gone was consumed by an earlier backward (its own, or another loss's) or
    // by clear_tape(); going on would silently produce no gradient. (The loss is
    // usually the last node, so the search from the back is short.)
    auto is_loss = [&](const Node& n) { return n.out.get() == &cell; };
    if (!cell.is_leaf && std::none_of(nodes.rbegin(), nodes.rend(), is_loss))
        throw std::logic_error(
            "backward: the loss's graph is no longer on the tape — an earlier backward() ran and freed it "
            "(it runs the whole tape: sum the losses and call backward once) or clear_tape() discarded it");
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
    nodes.clear();
}

size_t tape_size() { return tape().nodes.size(); }
void clear_tape() { tape().nodes.clear(); }

}  // namespace peftlab
