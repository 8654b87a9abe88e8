// Fused kernels: layer_norm, softmax (with causal / padding masks), log_softmax, cross_entropy.
#include <cmath>
#include <memory>
#include <vector>

#include "autograd/ops_util.h"

namespace peftlab {
using namespace detail;

Tensor layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) {
    require_defined("layer_norm", x, "input");
    const int64_t D = x.ndim() ? x.dim(-1) : 0;
    if (x.ndim() < 1 || !gamma.defined() || !beta.defined() || gamma.shape() != Shape{D} || beta.shape() != Shape{D})
        throw std::invalid_argument(fmt::format("layer_norm: input {} needs gamma and beta of shape [{}], got {} and {}",
                                                shape_str(x.shape()), D,
                                                gamma.defined() ? shape_str(gamma.shape()) : "undefined",
                                                beta.defined() ? shape_str(beta.shape()) : "undefined"));
    const int64_t R = D ? x.numel() / D : 0;
    Tensor out = make_result(x.shape());
    auto stats = Storage::alloc(2 * R);  // [R] mean then [R] rstd
    const float *px = x.data(), *g = gamma.data(), *bt = beta.data();
    float* py = out.data();
    float *mean = stats->data, *rstd = stats->data + R;
    parallel_for(R, R * D > kParallelMin, [&](int64_t r) {
        const float* xr = px + r * D;
        const float m = lane_sum(D, [=](int64_t j) { return xr[j]; }) / float(D);
        const float var = lane_sum(D, [=](int64_t j) { return (xr[j] - m) * (xr[j] - m); });
        float rs = 1.f / std::sqrt(var / float(D) + eps);
        mean[r] = m;
        rstd[r] = rs;
        float* yr = py + r * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) yr[j] = (xr[j] - m) * rs * g[j] + bt[j];
    });
    flops::add(uint64_t(8 * R * D));

    auto gx = grad_target(x), gg = grad_target(gamma), gb = grad_target(beta);
    if (!gx && !gg && !gb) return out;
    Tensor sx = x, sg = gamma;
    record(out, [=](const float* dy) {
        const float* xs = sx.data();
        const float* gm = sg.data();
        const float *mu = stats->data, *rs = stats->data + R;
        if (gx) {
            bool add;
            float* dx = gx->target(add);
            parallel_for(R, R * D > kParallelMin, [&](int64_t r) {
                const float *xr = xs + r * D, *dyr = dy + r * D;
                // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gamma
                const float m = mu[r], s = rs[r];
                const float sum_d = lane_sum(D, [=](int64_t j) { return dyr[j] * gm[j]; }) / float(D);
                const float sum_dx =
                    lane_sum(D, [=](int64_t j) { return dyr[j] * gm[j] * ((xr[j] - m) * s); }) / float(D);
                assign_or_add(dx + r * D, add, 0, D,
                              [=](int64_t j) { return s * (dyr[j] * gm[j] - sum_d - (xr[j] - m) * s * sum_dx); });
            });
            flops::add_grad(gx->is_leaf, uint64_t(12 * R * D));
        }
        if (gg || gb) {
            float* dg = gg ? gg->buffer() : nullptr;
            float* db = gb ? gb->buffer() : nullptr;
            // Column sums over rows, added in row order (deterministic); rows
            // are read contiguously in column blocks, threads take whole blocks.
            constexpr int64_t kBlock = 64;
            const int64_t blocks = (D + kBlock - 1) / kBlock;
            parallel_for(blocks, R * D > kParallelMin, [&](int64_t blk) {
                const int64_t j0 = blk * kBlock, w = std::min(kBlock, D - j0);
                float sg_[kBlock] = {}, sb_[kBlock] = {};
                for (int64_t r = 0; r < R; ++r) {
                    const float *dyr = dy + r * D + j0, *xr = xs + r * D + j0;
                    for (int64_t j = 0; j < w; ++j) {
                        sg_[j] += dyr[j] * (xr[j] - mu[r]) * rs[r];
                        sb_[j] += dyr[j];
                    }
                }
                for (int64_t j = 0; j < w; ++j) {
                    if (dg) dg[j0 + j] += sg_[j];
                    if (db) db[j0 + j] += sb_[j];
                }
            });
            if (gg) flops::add_grad(gg->is_leaf, uint64_t(2 * R * D));
            if (gb) flops::add_grad(gb->is_leaf, uint64_t(2 * R * D));
        }
    });
    return out;
}

Tensor softmax(const Tensor& x, bool causal, const Tensor& key_valid) {
    require_defined("softmax", x, "input");
    if (x.ndim() < 1) throw std::invalid_argument("softmax: input must have rank >= 1, got []");
    const int64_t Tk = x.dim(-1), R = Tk ? x.numel() / Tk : 0;
    const int64_t Tq = causal || key_valid.defined() ? (x.ndim() >= 2 ? x.dim(-2) : 1) : 1;
    if (causal && (x.ndim() < 2 || Tq > Tk))
        throw std::invalid_argument(fmt::format("softmax: causal needs [..., Tq, Tk] with Tq <= Tk, got {}",
                                                shape_str(x.shape())));
    const int64_t B = x.dim(0);
    if (key_valid.defined() && (x.ndim() < 2 || key_valid.shape() != Shape{B, Tk}))
        throw std::invalid_argument(fmt::format("softmax: key_valid {} must be [B, Tk] = [{}, {}] for input {}",
                                                shape_str(key_valid.shape()), B, Tk, shape_str(x.shape())));
    Tensor out = make_result(x.shape());
    const float* px = x.data();
    const float* valid = key_valid.defined() ? key_valid.data() : nullptr;
    float* py = out.data();
    const int64_t rows_per_b = B ? R / B : 0;
    parallel_for(R, R * Tk > kParallelMin, [&](int64_t r) {
        int64_t i = r % Tq;
        int64_t limit = causal ? i + (Tk - Tq) + 1 : Tk;
        masked_softmax_row(py + r * Tk, px + r * Tk, Tk, limit, valid ? valid + (r / rows_per_b) * Tk : nullptr);
    });
    flops::add(uint64_t(5 * R * Tk));
    auto gx = grad_target(x);
    if (!gx) return out;
    Tensor sy = out.detach();
    record(out, [=](const float* dy) {
        float* dx = gx->buffer();
        std::vector<float> row(static_cast<size_t>(Tk));
        for (int64_t r = 0; r < R; ++r) {
            softmax_backward_row(row.data(), dy + r * Tk, sy.data() + r * Tk, Tk, 1.f);
            for (int64_t j = 0; j < Tk; ++j) dx[r * Tk + j] += row[size_t(j)];
        }
        flops::add_grad(gx->is_leaf, uint64_t(4 * R * Tk));
    });
    return out;
}

Tensor log_softmax(const Tensor& x) {
    require_defined("log_softmax", x, "input");
    if (x.ndim() < 1) throw std::invalid_argument("log_softmax: input must have rank >= 1, got []");
    const int64_t V = x.dim(-1), R = V ? x.numel() / V : 0;
    Tensor out = make_result(x.shape());
    const float* px = x.data();
    float* py = out.data();
    parallel_for(R, R * V > kParallelMin, [&](int64_t r) {
        const float* xr = px + r * V;
        float mx = -INFINITY;
        for (int64_t j = 0; j < V; ++j) mx = std::max(mx, xr[j]);
        float s = 0.f;
        for (int64_t j = 0; j < V; ++j) s += std::exp(xr[j] - mx);
        float lse = mx + std::log(s);
        for (int64_t j = 0; j < V; ++j) py[r * V + j] = xr[j] - lse;
    });
    flops::add(uint64_t(5 * R * V));
    auto gx = grad_target(x);
    if (!gx) return out;
    Tensor sy = out.detach();
    record(out, [=](const float* dy) {
        float* dx = gx->buffer();
        for (int64_t r = 0; r < R; ++r) {
            float s = 0.f;
            for (int64_t j = 0; j < V; ++j) s += dy[r * V + j];
            for (int64_t j = 0; j < V; ++j) dx[r * V + j] += dy[r * V + j] - std::exp(sy.data()[r * V + j]) * s;
        }
        flops::add_grad(gx->is_leaf, uint64_t(4 * R * V));
    });
    return out;
}

Tensor cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets, int32_t ignore_index) {
    require_defined("cross_entropy", logits, "logits");
    if (logits.ndim() < 2)
        throw std::invalid_argument("cross_entropy: logits must be [N, V] or [B, T, V], got " +
                                    shape_str(logits.shape()));
    const int64_t V = logits.dim(-1), N = V ? logits.numel() / V : 0;
    if (int64_t(targets.size()) != N)
        throw std::invalid_argument(fmt::format("cross_entropy: logits {} hold {} rows but {} targets were given",
                                                shape_str(logits.shape()), N, targets.size()));
    int64_t count = 0;
    for (int64_t i = 0; i < N; ++i) {
        int32_t t = targets[size_t(i)];
        if (t == ignore_index) continue;
        if (t < 0 || t >= V)
            throw std::invalid_argument(
                fmt::format("cross_entropy: target[{}] = {} is outside the vocabulary [0, {})", i, t, V));
        ++count;
    }
    if (count == 0)
        throw std::invalid_argument("cross_entropy: every target equals ignore_index; no token to count");
    // probs [N, V] are computed here anyway and are all the backward needs.
    auto probs = Storage::alloc(N * V);
    std::vector<double> row_loss(size_t(N), 0.0);
    const float* px = logits.data();
    float* pp = probs->data;
    parallel_for(N, N * V > kParallelMin, [&](int64_t r) {
        const float* xr = px + r * V;
        float* pr = pp + r * V;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < V; ++j) mx = std::max(mx, xr[j]);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) {
            pr[j] = exp_approx(xr[j] - mx);
            s += pr[j];
        }
        float inv = 1.f / s;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) pr[j] *= inv;
        int32_t t = targets[size_t(r)];
        if (t != ignore_index) row_loss[size_t(r)] = double(mx) + std::log(double(s)) - double(xr[t]);
    });
    double total = 0.0;  // summed in row order: deterministic for any thread count
    for (double l : row_loss) total += l;
    Tensor out = make_result({});
    out.data()[0] = float(total / double(count));
    flops::add(uint64_t(6 * N * V));
    auto gx = grad_target(logits);
    if (!gx) return out;
    auto tgt = std::make_shared<std::vector<int32_t>>(targets);
    record(out, [=](const float* dy) {
        bool add;
        float* dx = gx->target(add);
        const float g = dy[0] / float(count);
        const float* p = probs->data;
        parallel_for(N, N * V > kParallelMin, [&](int64_t r) {
            const int32_t t = (*tgt)[size_t(r)];
            const float* pr = p + r * V;
            float* dr = dx + r * V;
            for (int64_t j = 0; j < V; ++j) {
                const float d = t == ignore_index ? 0.f : g * (pr[j] - (j == t ? 1.f : 0.f));
                dr[j] = add ? dr[j] + d : d;
            }
        });
        flops::add_grad(gx->is_leaf, uint64_t(3 * N * V));
    });
    return out;
}

}  // namespace peftlab
