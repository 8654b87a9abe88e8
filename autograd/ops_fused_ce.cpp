// Fused, chunked linear + cross-entropy (see ops_fused.h).
#include <cmath>
#include <memory>
#include <vector>

#include "autograd/ops_fused.h"
#include "autograd/ops_util.h"

namespace peftlab {
using namespace detail;

int64_t linear_cross_entropy_chunk_rows(int64_t N, int64_t C, int64_t V) {
    const int64_t per = std::max<int64_t>(1, (V + C - 1) / std::max<int64_t>(C, 1));  // ceil(V / C)
    const int64_t want = std::max<int64_t>(256, (N + per - 1) / per);
    int64_t p = 1;
    while (p < want) p *= 2;
    return std::max<int64_t>(1, std::min(p, N));
}

namespace {

// Hands a stored gradient (n floats) to `cell`, scaled by s: moved in when the
// cell holds none yet and s == 1 (no copy), else added.
void hand_over(GradCell& cell, const std::shared_ptr<Storage>& g, int64_t n, float s) {
    if (s != 1.f) {
        float* d = g->data;
        parallel_region(n > kParallelMin, [=] {
#pragma omp for simd schedule(static)
            for (int64_t i = 0; i < n; ++i) d[i] *= s;
        });
    }
    if (!cell.grad) {
        cell.grad = g;
        return;
    }
    cell.accumulate(g->data);
}

}  // namespace

Tensor linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const std::vector<int32_t>& targets,
                            int32_t ignore_index, int64_t chunk_rows) {
    require_defined("linear_cross_entropy", hidden, "hidden");
    require_defined("linear_cross_entropy", weight, "weight");
    if (hidden.ndim() < 1 || weight.ndim() != 2 || hidden.dim(-1) != weight.dim(1) || weight.dim(0) < 1)
        throw std::invalid_argument(fmt::format(
            "linear_cross_entropy: hidden {} and weight {} do not match (expected weight [V, {}])",
            shape_str(hidden.shape()), shape_str(weight.shape()), hidden.ndim() ? hidden.dim(-1) : 0));
    if (chunk_rows < 0)
        throw std::invalid_argument(fmt::format("linear_cross_entropy: chunk_rows = {} must be >= 0", chunk_rows));
    const int64_t C = weight.dim(1), V = weight.dim(0), N = C ? hidden.numel() / C : 0;
    if (int64_t(targets.size()) != N)
        throw std::invalid_argument(fmt::format("linear_cross_entropy: hidden {} holds {} rows but {} targets were given",
                                                shape_str(hidden.shape()), N, targets.size()));
    int64_t count = 0;
    for (int64_t i = 0; i < N; ++i) {
        const int32_t t = targets[size_t(i)];
        if (t == ignore_index) continue;
        if (t < 0 || t >= V)
            throw std::invalid_argument(
                fmt::format("linear_cross_entropy: target[{}] = {} is outside the vocabulary [0, {})", i, t, V));
        ++count;
    }
    if (count == 0)
        throw std::invalid_argument("linear_cross_entropy: every target equals ignore_index; no token to count");

    auto gx = grad_target(hidden), gw = grad_target(weight);
    const bool need_grad = gx || gw;
    const int64_t rows = std::min(N, chunk_rows ? chunk_rows : linear_cross_entropy_chunk_rows(N, C, V));
    auto buf = Storage::alloc(rows * V);  // one chunk's logits -> probabilities -> dlogits
    auto dh = gx ? Storage::alloc(N * C) : nullptr;
    auto dw = gw ? Storage::alloc(V * C) : nullptr;
    std::vector<double> row_loss(size_t(N), 0.0);
    const float *h = hidden.data(), *w = weight.data();
    const float g = 1.f / float(count);  // d mean / d row loss; the upstream gradient is applied in backward
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
        const int64_t m = std::min(rows, N - r0);
        float* lg = buf->data;
        gemm(false, true, m, V, C, 1.f, h + r0 * C, C, w, C, 0.f, lg, V);  // logits [m, V]
        // Softmax and loss per row exactly as cross_entropy computes them.
        parallel_for(m, m * V > kParallelMin, [&](int64_t i) {
            float* pr = lg + i * V;
            const int32_t t = targets[size_t(r0 + i)];
            float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < V; ++j) mx = std::max(mx, pr[j]);
            const float xt = t == ignore_index ? 0.f : pr[t];
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < V; ++j) {
                pr[j] = exp_approx(pr[j] - mx);
                s += pr[j];
            }
            if (t != ignore_index) row_loss[size_t(r0 + i)] = double(mx) + std::log(double(s)) - double(xt);
            if (!need_grad) return;
            // dlogits = g * (p - onehot(t)), p = e * (1 / s) rounded as
            // cross_entropy rounds it; zero for ignored rows.
            if (t == ignore_index) {
                for (int64_t j = 0; j < V; ++j) pr[j] = 0.f;
                return;
            }
            const float inv = 1.f / s;
            const float pt = pr[t] * inv;
#pragma omp simd
            for (int64_t j = 0; j < V; ++j) pr[j] = g * (pr[j] * inv);
            pr[t] = g * (pt - 1.f);
        });
        if (gx) gemm(false, false, m, C, V, 1.f, lg, V, w, C, 0.f, dh->data + r0 * C, C);  // dh = dlogits W
        if (gw) gemm(true, false, V, C, m, 1.f, lg, V, h + r0 * C, C, r0 ? 1.f : 0.f, dw->data, C);  // dW += dl^T h
    }
    buf.reset();
    double total = 0.0;  // summed in row order: deterministic for any thread count
    for (double l : row_loss) total += l;
    Tensor out = make_result({});
    out.data()[0] = float(total / double(count));
    flops::add(uint64_t(2 * N * V * C));
    flops::add(uint64_t(6 * N * V));
    if (!need_grad) return out;
    record(out, [=](const float* dy) {
        flops::add_grad(false, uint64_t(3 * N * V));  // the logits' gradient (logits are never a leaf)
        if (gx) {
            hand_over(*gx, dh, N * C, dy[0]);
            flops::add_grad(gx->is_leaf, uint64_t(2 * N * V * C));
        }
        if (gw) {
            hand_over(*gw, dw, V * C, dy[0]);
            flops::add_grad(gw->is_leaf, uint64_t(2 * N * V * C));
        }
    });
    return out;
}

}  // namespace peftlab
