// Indexing and layout: embedding, reshape, transpose, permute, concat, slice, expand, index_rows.
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "autograd/ops_util.h"

namespace peftlab {
using namespace detail;

Tensor embedding(const Tensor& weight, const std::vector<int32_t>& ids) {
    require_defined("embedding", weight, "weight");
    if (weight.ndim() != 2)
        throw std::invalid_argument("embedding: weight must be [V, D], got " + shape_str(weight.shape()));
    const int64_t V = weight.dim(0), D = weight.dim(1), N = int64_t(ids.size());
    for (int64_t i = 0; i < N; ++i)
        if (ids[size_t(i)] < 0 || ids[size_t(i)] >= V)
            throw std::invalid_argument(
                fmt::format("embedding: id[{}] = {} is outside the table [0, {})", i, ids[size_t(i)], V));
    Tensor out = make_result({N, D});
    for (int64_t i = 0; i < N; ++i)
        std::memcpy(out.data() + i * D, weight.data() + int64_t(ids[size_t(i)]) * D, size_t(D) * sizeof(float));
    auto gw = grad_target(weight);
    if (!gw) return out;
    auto saved = std::make_shared<std::vector<int32_t>>(ids);
    record(out, [=](const float* dy) {
        float* dw = gw->buffer();  // scatter-add: repeated ids accumulate, in order
        for (int64_t i = 0; i < N; ++i) {
            float* row = dw + int64_t((*saved)[size_t(i)]) * D;
            for (int64_t j = 0; j < D; ++j) row[j] += dy[i * D + j];
        }
        flops::add_grad(gw->is_leaf, uint64_t(N * D));
    });
    return out;
}

Tensor reshape(const Tensor& a, const Shape& shape) {
    require_defined("reshape", a, "input");
    Shape s = shape;
    int infer = -1;
    int64_t known = 1;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == -1) {
            if (infer >= 0)
                throw std::invalid_argument("reshape: more than one -1 in " + shape_str(shape));
            infer = int(i);
        } else if (s[i] < 0) {
            throw std::invalid_argument("reshape: negative dimension in " + shape_str(shape));
        } else {
            known *= s[i];
        }
    }
    if (infer >= 0) {
        if (known == 0 || a.numel() % known != 0)
            throw std::invalid_argument(fmt::format("reshape: cannot reshape {} into {}", shape_str(a.shape()),
                                                    shape_str(shape)));
        s[size_t(infer)] = a.numel() / known;
    }
    if (shape_numel(s) != a.numel())
        throw std::invalid_argument(fmt::format("reshape: cannot reshape {} ({} elements) into {}",
                                                shape_str(a.shape()), a.numel(), shape_str(shape)));
    auto impl = std::make_shared<TensorImpl>();
    impl->shape = s;
    impl->storage = a.impl()->storage;  // a view: same data
    Tensor out(std::move(impl));
    auto ga = grad_target(a);
    if (ga) record(out, [=](const float* dy) { ga->accumulate(dy); });
    return out;
}

namespace {
// out[perm-index] = in[index] for rank <= 4 via padded strides: out dim i is in dim order[i].
void permute_copy(float* out, const float* in, const Shape& in_shape, const std::vector<int>& order, bool reverse) {
    const int r = int(in_shape.size());
    int64_t in_stride[4] = {0, 0, 0, 0}, out_dims[4] = {1, 1, 1, 1}, src_stride[4] = {0, 0, 0, 0};
    int64_t st = 1;
    for (int i = r - 1; i >= 0; --i) {
        in_stride[i] = st;
        st *= in_shape[size_t(i)];
    }
    const int off = 4 - r;
    for (int i = 0; i < r; ++i) {
        out_dims[off + i] = in_shape[size_t(order[size_t(i)])];
        src_stride[off + i] = in_stride[order[size_t(i)]];
    }
    int64_t o = 0;
    for (int64_t i0 = 0; i0 < out_dims[0]; ++i0)
        for (int64_t i1 = 0; i1 < out_dims[1]; ++i1)
            for (int64_t i2 = 0; i2 < out_dims[2]; ++i2) {
                int64_t base = i0 * src_stride[0] + i1 * src_stride[1] + i2 * src_stride[2];
                for (int64_t i3 = 0; i3 < out_dims[3]; ++i3, ++o) {
                    // forward: out[o] = in[src]; reverse (gradient): in[src] += out[o]
                    if (reverse) out[base + i3 * src_stride[3]] += in[o];
                    else out[o] = in[base + i3 * src_stride[3]];
                }
            }
}
}  // namespace

Tensor permute(const Tensor& a, const std::vector<int>& order) {
    require_defined("permute", a, "input");
    const int r = a.ndim();
    if (r > 4) throw std::invalid_argument("permute: ranks above 4 are not supported, got " + shape_str(a.shape()));
    std::vector<int> ord(order.size());
    std::vector<bool> seen(static_cast<size_t>(r), false);
    if (int(order.size()) != r)
        throw std::invalid_argument(
            fmt::format("permute: order has {} axes but input {} has {}", order.size(), shape_str(a.shape()), r));
    for (size_t i = 0; i < order.size(); ++i) {
        ord[i] = norm_axis("permute", order[i], r, a.shape());
        if (seen[size_t(ord[i])])
            throw std::invalid_argument(fmt::format("permute: axis {} repeated in order", order[i]));
        seen[size_t(ord[i])] = true;
    }
    Shape os(static_cast<size_t>(r));
    for (int i = 0; i < r; ++i) os[size_t(i)] = a.shape()[size_t(ord[size_t(i)])];
    Tensor out = make_result(os);
    permute_copy(out.data(), a.data(), a.shape(), ord, false);
    auto ga = grad_target(a);
    if (!ga) return out;
    Shape in_shape = a.shape();
    record(out, [=](const float* dy) { permute_copy(ga->buffer(), dy, in_shape, ord, true); });
    return out;
}

Tensor transpose(const Tensor& a, int axis0, int axis1) {
    require_defined("transpose", a, "input");
    std::vector<int> order(static_cast<size_t>(a.ndim()));
    std::iota(order.begin(), order.end(), 0);
    int x = norm_axis("transpose", axis0, a.ndim(), a.shape()), y = norm_axis("transpose", axis1, a.ndim(), a.shape());
    std::swap(order[size_t(x)], order[size_t(y)]);
    return permute(a, order);
}

Tensor concat(const std::vector<Tensor>& parts, int axis) {
    if (parts.empty()) throw std::invalid_argument("concat: no tensors given");
    for (const Tensor& p : parts) require_defined("concat", p, "part");
    const Shape& s0 = parts[0].shape();
    const int ax = norm_axis("concat", axis, int(s0.size()), s0);
    Shape os = s0;
    os[size_t(ax)] = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
        const Shape& s = parts[i].shape();
        bool ok = s.size() == s0.size();
        for (size_t d = 0; ok && d < s.size(); ++d) ok = int(d) == ax || s[d] == s0[d];
        if (!ok)
            throw std::invalid_argument(fmt::format("concat: part {} has shape {}, incompatible with {} along axis {}",
                                                    i, shape_str(s), shape_str(s0), axis));
        os[size_t(ax)] += s[size_t(ax)];
    }
    const int64_t outer = prod(s0, 0, ax), inner = prod(s0, ax + 1, int(s0.size()));
    const int64_t out_len = os[size_t(ax)];
    Tensor out = make_result(os);
    int64_t offset = 0;
    std::vector<std::shared_ptr<GradCell>> cells;
    std::vector<int64_t> lens, offsets;
    for (const Tensor& p : parts) {
        const int64_t len = p.shape()[size_t(ax)];
        // An empty part has no data pointer (memcpy from null is undefined even for 0 bytes).
        for (int64_t o = 0; o < outer && len * inner > 0; ++o)
            std::memcpy(out.data() + (o * out_len + offset) * inner, p.data() + o * len * inner,
                        size_t(len * inner) * sizeof(float));
        cells.push_back(grad_target(p));
        lens.push_back(len);
        offsets.push_back(offset);
        offset += len;
    }
    bool any = false;
    for (auto& c : cells) any = any || c;
    if (!any) return out;
    record(out, [=](const float* dy) {
        for (size_t i = 0; i < cells.size(); ++i) {
            if (!cells[i]) continue;
            float* dx = cells[i]->buffer();
            for (int64_t o = 0; o < outer; ++o) {
                const float* src = dy + (o * out_len + offsets[i]) * inner;
                float* dst = dx + o * lens[i] * inner;
                for (int64_t j = 0; j < lens[i] * inner; ++j) dst[j] += src[j];
            }
        }
    });
    return out;
}

Tensor slice(const Tensor& a, int axis, int64_t start, int64_t end) {
    require_defined("slice", a, "input");
    const int ax = norm_axis("slice", axis, a.ndim(), a.shape());
    const int64_t len = a.shape()[size_t(ax)];
    if (start < 0 || end < start || end > len)
        throw std::invalid_argument(fmt::format("slice: range [{}, {}) is out of bounds for axis {} of size {} in {}",
                                                start, end, axis, len, shape_str(a.shape())));
    Shape os = a.shape();
    os[size_t(ax)] = end - start;
    const int64_t outer = prod(a.shape(), 0, ax), inner = prod(a.shape(), ax + 1, a.ndim()), n = end - start;
    Tensor out = make_result(os);
    // An empty slice has no data pointer (memcpy to null is undefined even for 0 bytes).
    for (int64_t o = 0; o < outer && n * inner > 0; ++o)
        std::memcpy(out.data() + o * n * inner, a.data() + (o * len + start) * inner, size_t(n * inner) * sizeof(float));
    auto ga = grad_target(a);
    if (!ga) return out;
    record(out, [=](const float* dy) {
        float* dx = ga->buffer();
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t j = 0; j < n * inner; ++j) dx[(o * len + start) * inner + j] += dy[o * n * inner + j];
    });
    return out;
}

Tensor expand(const Tensor& a, const Shape& shape) {
    require_defined("expand", a, "input");
    bool ok = a.ndim() == int(shape.size()) && a.ndim() <= 4;
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape()[i] == shape[i] || a.shape()[i] == 1;
    if (!ok)
        throw std::invalid_argument(
            fmt::format("expand: cannot expand {} to {} (only size-1 dims repeat, same rank <= 4)",
                        shape_str(a.shape()), shape_str(shape)));
    // Adding a zero tensor of the target shape is exactly a broadcast, and its
    // backward sums over the repeated dims; zeros do not require grad.
    Tensor zeros = Tensor::zeros(shape);
    return add(zeros, a);
}

Tensor index_rows(const Tensor& a, const std::vector<int32_t>& idx) {
    require_defined("index_rows", a, "input");
    if (a.ndim() < 1) throw std::invalid_argument("index_rows: input must have rank >= 1, got []");
    const int64_t N = a.dim(0), row = N ? a.numel() / N : 0, M = int64_t(idx.size());
    for (int64_t i = 0; i < M; ++i)
        if (idx[size_t(i)] < 0 || idx[size_t(i)] >= N)
            throw std::invalid_argument(fmt::format("index_rows: index[{}] = {} is outside [0, {}) for input {}", i,
                                                    idx[size_t(i)], N, shape_str(a.shape())));
    Shape os = a.shape();
    os[0] = M;
    Tensor out = make_result(os);
    for (int64_t i = 0; i < M; ++i)
        std::memcpy(out.data() + i * row, a.data() + int64_t(idx[size_t(i)]) * row, size_t(row) * sizeof(float));
    auto ga = grad_target(a);
    if (!ga) return out;
    auto saved = std::make_shared<std::vector<int32_t>>(idx);
    record(out, [=](const float* dy) {
        float* dx = ga->buffer();
        for (int64_t i = 0; i < M; ++i) {
            float* dst = dx + int64_t((*saved)[size_t(i)]) * row;
            for (int64_t j = 0; j < row; ++j) dst[j] += dy[i * row + j];
        }
    });
    return out;
}

}  // namespace peftlab
