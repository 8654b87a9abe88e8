#pragma once
// Tensor: float32, contiguous, row-major, reference-counted storage.
//
// A Tensor is a cheap handle (shared_ptr) to a TensorImpl. Views (reshape,
// detach) share the Storage; every op that changes the layout (transpose,
// permute, slice, concat) writes a new contiguous tensor and says so.
// Gradients live in a GradCell shared between the tensor and the tape nodes
// that read or write its gradient, so a node can hold a tensor's gradient
// without keeping its data alive.
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "autograd/rng.h"

namespace peftlab {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);  // "[4, 8]"
int64_t shape_numel(const Shape& s);

// Tracked, 64-byte aligned float buffer. Released buffers go to a free list
// keyed by size class (capacities at most 12.5% above the request), so a
// training loop that allocates the same shapes every step stops calling
// malloc after the first step, and so does a KV cache that grows by a token.
struct Storage {
    float* data = nullptr;
    int64_t numel = 0;
    static std::shared_ptr<Storage> alloc(int64_t numel);         // uninitialized
    static std::shared_ptr<Storage> zeros(int64_t numel);
    Storage(const Storage&) = delete;
    Storage& operator=(const Storage&) = delete;
    Storage() = default;
    ~Storage();
};

// Live-tensor memory accounting: bytes held by storages that are alive (data,
// gradients, saved activations, optimizer state) as requested, padded to 64
// bytes; not the free-list cache, which counts whole buffer capacities.
namespace mem {
int64_t current_bytes();
int64_t peak_bytes();
void reset_peak();      // peak := current
int64_t cached_bytes();  // held by the free list, reusable
void release_cache();   // give the free list back to the system

// `bytes` from the system, uninitialized, or null if refused; free with
// std::free. 64-byte aligned; from 2 MiB on, 2 MiB aligned and advised into
// transparent huge pages (tensor.cpp says why). Tensor storages, F16 weights
// and the packed GEMM's panels come from here; per-call scratch (attention's,
// gemm_half_b's widened copy for many rows) does not.
void* alloc_bytes(size_t bytes);
// An owner of alloc_bytes' memory, and n elements of T from it (null if refused).
template <class T>
using Buffer = std::unique_ptr<T, decltype(&std::free)>;
template <class T>
Buffer<T> alloc_array(size_t n) {
    return Buffer<T>(static_cast<T*>(alloc_bytes(n * sizeof(T))), &std::free);
}
}  // namespace mem

struct GradCell {
    std::shared_ptr<Storage> grad;  // null until some gradient arrives
    int64_t numel = 0;
    bool is_leaf = true;
    // Adds n floats of g into the gradient, allocating it on first use
    // (first arrival copies instead of adding).
    void accumulate(const float* g);
    // Returns the gradient buffer, zero-filled on first use, to accumulate into.
    float* buffer();
    // For GEMMs that write the gradient as C = alpha*op(A)op(B) + beta*C:
    // returns the buffer and sets beta to 0 if it was just allocated (no
    // memset needed), else 1.
    float* gemm_target(float& beta);
    // For kernels that write the gradient element by element: returns the
    // buffer and sets `add` to whether it already holds a gradient to add to
    // (false: just allocated, so write instead; no memset, no temporary).
    float* target(bool& add);
};

struct TensorImpl {
    std::shared_ptr<Storage> storage;
    Shape shape;
    bool requires_grad = false;
    std::shared_ptr<GradCell> gcell;  // set iff requires_grad
    std::string name;                 // optional, for error messages and reports
};

class Tensor {
public:
    Tensor() = default;
    explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

    // Creation. Shapes may have rank 0 (scalar) up to any rank; ops support rank <= 4.
    static Tensor empty(const Shape& shape);  // uninitialized
    static Tensor zeros(const Shape& shape);
    static Tensor ones(const Shape& shape);
    static Tensor full(const Shape& shape, float value);
    static Tensor from_data(const Shape& shape, const std::vector<float>& values);
    static Tensor arange(int64_t n, float start = 0.f, float step = 1.f);
    static Tensor uniform(const Shape& shape, Rng& rng, float lo, float hi);
    static Tensor normal(const Shape& shape, Rng& rng, float mean, float std);

    bool defined() const { return impl_ != nullptr; }
    const Shape& shape() const { return impl_->shape; }
    int ndim() const { return int(impl_->shape.size()); }
    int64_t dim(int axis) const;  // negative axes count from the end
    int64_t numel() const { return impl_->storage->numel; }
    float* data() { return impl_->storage->data; }
    const float* data() const { return impl_->storage->data; }
    float item() const;  // the value of a one-element tensor
    std::vector<float> to_vector() const;

    bool requires_grad() const { return impl_->requires_grad; }
    // Only leaves (tensors not produced by a recorded op) may change this.
    Tensor& set_requires_grad(bool on);
    bool is_leaf() const { return !impl_->gcell || impl_->gcell->is_leaf; }
    // The gradient, viewed as a tensor of this shape. Error if this tensor
    // does not require grad; zeros if no gradient has arrived yet.
    Tensor grad() const;
    bool has_grad() const { return impl_->gcell && impl_->gcell->grad; }
    void zero_grad();  // drops the gradient buffer

    const std::string& name() const { return impl_->name; }
    Tensor& set_name(std::string n) { impl_->name = std::move(n); return *this; }

    Tensor detach() const;  // shares data, records nothing, requires no grad
    Tensor clone() const;   // copies data, records nothing, requires no grad
    void copy_from(const Tensor& src);  // same numel; data only

    TensorImpl* impl() const { return impl_.get(); }
    const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

private:
    std::shared_ptr<TensorImpl> impl_;
};

// Result tensor of an op: fresh storage, no grad.
Tensor make_result(const Shape& shape);

}  // namespace peftlab
