#include "autograd/tensor.h"

#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <unordered_map>

#include <sys/mman.h>

#include <fmt/format.h>

#include "autograd/threads.h"

namespace peftlab {

std::string shape_str(const Shape& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

int64_t shape_numel(const Shape& s) {
    int64_t n = 1;
    for (int64_t d : s) {
        if (d < 0) throw std::invalid_argument("tensor: negative dimension in shape " + shape_str(s));
        n *= d;
    }
    return n;
}

// ---- allocation: free list by size class, live-byte accounting ---------------
namespace {
struct Pool {
    std::unordered_map<int64_t, std::vector<float*>> free;  // capacity -> buffers
    int64_t live = 0, peak = 0, cached = 0;
};
// Never destroyed: tensors in static objects may outlive any static Pool.
Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}
size_t padded_bytes(int64_t numel) { return (size_t(numel) * sizeof(float) + 63) / 64 * 64; }
// A request of n floats gets a buffer of the smallest capacity m * 2^e >= n
// with m in [8, 16): at most 12.5% more (exact up to 16 floats). A freed
// buffer then serves every request of its class, so sizes that creep up step
// by step (a KV cache growing by a token, batches of varying length) reuse
// buffers instead of each new size calling malloc and faulting in fresh pages.
int64_t capacity_for(int64_t n) {
    if (n <= 16) return n;
    const int64_t step = int64_t(1) << (std::bit_width(uint64_t(n)) - 4);
    return (n + step - 1) / step * step;
}
}  // namespace

std::shared_ptr<Storage> Storage::alloc(int64_t numel) {
    auto s = std::make_shared<Storage>();
    s->numel = numel;
    if (numel == 0) return s;
    Pool& p = pool();
    const int64_t capacity = capacity_for(numel);
    auto it = p.free.find(capacity);
    if (it != p.free.end() && !it->second.empty()) {
        s->data = it->second.back();
        it->second.pop_back();
        p.cached -= int64_t(padded_bytes(capacity));
    } else {
        // A count whose byte size overflows size_t is as impossible as memory that is not there.
        const bool representable = uint64_t(capacity) <= (std::numeric_limits<size_t>::max() - 63) / sizeof(float);
        if (representable) s->data = static_cast<float*>(mem::alloc_bytes(padded_bytes(capacity)));
        if (!s->data && representable && p.cached > 0) {  // cached blocks of other sizes may make room
            mem::release_cache();
            s->data = static_cast<float*>(mem::alloc_bytes(padded_bytes(capacity)));
        }
        if (!s->data)
            throw std::runtime_error(fmt::format("tensor: out of memory allocating {} floats", numel));
    }
    p.live += int64_t(padded_bytes(numel));
    if (p.live > p.peak) p.peak = p.live;
    return s;
}

std::shared_ptr<Storage> Storage::zeros(int64_t numel) {
    auto s = alloc(numel);
    if (numel) std::memset(s->data, 0, size_t(numel) * sizeof(float));
    return s;
}

Storage::~Storage() {
    if (!data) return;
    Pool& p = pool();
    const int64_t capacity = capacity_for(numel);
    p.live -= int64_t(padded_bytes(numel));
    // Caching the block allocates (the free list grows); a destructor must not
    // throw, so when that fails the block goes back to the system instead.
    try {
        p.free[capacity].push_back(data);
        p.cached += int64_t(padded_bytes(capacity));
    } catch (...) {
        std::free(data);
    }
}

namespace mem {
int64_t current_bytes() { return pool().live; }
int64_t peak_bytes() { return pool().peak; }
void reset_peak() { pool().peak = pool().live; }
int64_t cached_bytes() { return pool().cached; }
void release_cache() {
    Pool& p = pool();
    for (auto& [n, v] : p.free)
        for (float* ptr : v) std::free(ptr);
    p.free.clear();
    p.cached = 0;
}

// A decoding step streams every weight once: in 4 KiB pages that is a TLB
// miss and a page walk per 4 KiB read. In 2 MiB pages batch-1 decoding of
// GPT-2 small ran 16-19% faster by median in one interleaved run and from
// 14% slower to 4% faster in two later ones, and training steps 1-7% faster
// in all six rows (README, "Weights in huge pages"): a gain under some
// conditions. madvise is advice: where THP is "never" or the kernel finds no
// free 2 MiB, the buffer gets small pages and nothing else changes. Only the
// buffer's own bytes are marked, so the part past its last whole 2 MiB
// stays in small pages; but once glibc serves buffers this large from its
// heap (its mmap threshold grows after frees), the advice stays on that part
// of the heap for whatever is placed there later. PyTorch's CPU allocator
// does the same under THP_MEM_ALLOC_ENABLE.
void* alloc_bytes(size_t bytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    if (bytes < kHuge) return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (bytes > std::numeric_limits<size_t>::max() - kHuge) return nullptr;
    // aligned_alloc takes a multiple of the alignment; the rounding is never touched.
    void* p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, bytes, MADV_HUGEPAGE);  // its failure changes only the speed
#endif
    return p;
}
}  // namespace mem

void GradCell::accumulate(const float* g) {
    if (!grad) {
        grad = Storage::alloc(numel);
        if (numel) std::memcpy(grad->data, g, size_t(numel) * sizeof(float));  // empty: data is null
        return;
    }
    float* d = grad->data;
    const int64_t n = numel;
    parallel_region(n > 65536, [=] {
#pragma omp for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) d[i] += g[i];
    });
}

float* GradCell::gemm_target(float& beta) {
    beta = grad ? 1.f : 0.f;
    if (!grad) grad = Storage::alloc(numel);
    return grad->data;
}

float* GradCell::target(bool& add) {
    add = grad != nullptr;
    if (!grad) grad = Storage::alloc(numel);
    return grad->data;
}

float* GradCell::buffer() {
    if (!grad) grad = Storage::zeros(numel);
    return grad->data;
}

// ---- Tensor -----------------------------------------------------------------
Tensor make_result(const Shape& shape) {
    auto impl = std::make_shared<TensorImpl>();
    impl->shape = shape;
    impl->storage = Storage::alloc(shape_numel(shape));
    return Tensor(std::move(impl));
}

Tensor Tensor::empty(const Shape& shape) { return make_result(shape); }

Tensor Tensor::zeros(const Shape& shape) { return full(shape, 0.f); }
Tensor Tensor::ones(const Shape& shape) { return full(shape, 1.f); }

Tensor Tensor::full(const Shape& shape, float value) {
    Tensor t = make_result(shape);
    float* d = t.data();
    for (int64_t i = 0; i < t.numel(); ++i) d[i] = value;
    return t;
}

Tensor Tensor::from_data(const Shape& shape, const std::vector<float>& values) {
    if (int64_t(values.size()) != shape_numel(shape))
        throw std::invalid_argument(fmt::format("Tensor::from_data: shape {} needs {} values, got {}",
                                                shape_str(shape), shape_numel(shape), values.size()));
    Tensor t = make_result(shape);
    if (!values.empty()) std::memcpy(t.data(), values.data(), values.size() * sizeof(float));
    return t;
}

Tensor Tensor::arange(int64_t n, float start, float step) {
    Tensor t = make_result({n});
    for (int64_t i = 0; i < n; ++i) t.data()[i] = start + step * float(i);
    return t;
}

Tensor Tensor::uniform(const Shape& shape, Rng& rng, float lo, float hi) {
    Tensor t = make_result(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = rng.uniform(lo, hi);
    return t;
}

Tensor Tensor::normal(const Shape& shape, Rng& rng, float mean, float std) {
    Tensor t = make_result(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = rng.normal(mean, std);
    return t;
}

int64_t Tensor::dim(int axis) const {
    int n = ndim();
    int a = axis < 0 ? axis + n : axis;
    if (a < 0 || a >= n)
        throw std::invalid_argument(
            fmt::format("Tensor::dim: axis {} out of range for shape {}", axis, shape_str(shape())));
    return shape()[a];
}

float Tensor::item() const {
    if (numel() != 1)
        throw std::invalid_argument("Tensor::item: tensor of shape " + shape_str(shape()) +
                                    " has " + std::to_string(numel()) + " elements, not 1");
    return data()[0];
}

std::vector<float> Tensor::to_vector() const { return std::vector<float>(data(), data() + numel()); }

Tensor& Tensor::set_requires_grad(bool on) {
    if (!is_leaf())
        throw std::logic_error("set_requires_grad: '" + name() +
                               "' is the output of a recorded op, not a leaf; detach() it first");
    impl_->requires_grad = on;
    if (on && !impl_->gcell) {
        impl_->gcell = std::make_shared<GradCell>();
        impl_->gcell->numel = numel();
    }
    if (!on) impl_->gcell.reset();
    return *this;
}

Tensor Tensor::grad() const {
    if (!impl_->requires_grad)
        throw std::logic_error("grad: tensor '" + name() + "' of shape " + shape_str(shape()) +
                               " does not require grad");
    auto impl = std::make_shared<TensorImpl>();
    impl->shape = shape();
    impl->storage = impl_->gcell->grad ? impl_->gcell->grad : Storage::zeros(numel());
    return Tensor(std::move(impl));
}

void Tensor::zero_grad() {
    if (impl_->gcell) impl_->gcell->grad.reset();
}

Tensor Tensor::detach() const {
    auto impl = std::make_shared<TensorImpl>();
    impl->shape = shape();
    impl->storage = impl_->storage;
    impl->name = impl_->name;
    return Tensor(std::move(impl));
}

Tensor Tensor::clone() const {
    Tensor t = make_result(shape());
    if (numel()) std::memcpy(t.data(), data(), size_t(numel()) * sizeof(float));
    t.set_name(name());
    return t;
}

void Tensor::copy_from(const Tensor& src) {
    if (src.numel() != numel())
        throw std::invalid_argument(fmt::format("copy_from: shapes {} and {} differ in size",
                                                shape_str(src.shape()), shape_str(shape())));
    if (numel()) std::memcpy(data(), src.data(), size_t(numel()) * sizeof(float));
}

}  // namespace peftlab
