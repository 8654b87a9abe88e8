// Element-wise ops with broadcasting, unary maps, masked_fill, dropout, reductions.
#include <cmath>
#include <cstring>

#include "autograd/ops_util.h"

namespace peftlab {
using namespace detail;

namespace {

// Shapes padded on the left to rank 4, and element strides that are 0 along
// broadcast dims, so one 4-deep loop serves every broadcast pattern.
struct Broadcast {
    Shape out;
    int64_t o[4], sa[4], sb[4];
};

void pad4(const Shape& s, int64_t dims[4]) {
    int off = 4 - int(s.size());
    for (int i = 0; i < 4; ++i) dims[i] = i < off ? 1 : s[size_t(i - off)];
}

void strides_for(const Shape& in, const int64_t out[4], int64_t st[4]) {
    int64_t d[4];
    pad4(in, d);
    int64_t stride = 1;
    for (int i = 3; i >= 0; --i) {
        st[i] = d[i] == 1 && out[i] != 1 ? 0 : stride;
        stride *= d[i];
    }
}

Broadcast broadcast(const char* op, const Shape& a, const Shape& b) {
    if (a.size() > 4 || b.size() > 4)
        throw std::invalid_argument(
            fmt::format("{}: ranks above 4 are not supported (shapes {} and {})", op, shape_str(a), shape_str(b)));
    Broadcast bc;
    size_t n = std::max(a.size(), b.size());
    bc.out.assign(n, 1);
    for (size_t i = 0; i < n; ++i) {
        int64_t da = i + a.size() >= n ? a[i + a.size() - n] : 1;
        int64_t db = i + b.size() >= n ? b[i + b.size() - n] : 1;
        if (da != db && da != 1 && db != 1)
            throw std::invalid_argument(fmt::format("{}: shapes {} and {} cannot be broadcast (dim {}: {} vs {})", op,
                                                    shape_str(a), shape_str(b), i, da, db));
        bc.out[i] = da == 1 ? db : da;
    }
    pad4(bc.out, bc.o);
    strides_for(a, bc.o, bc.sa);
    strides_for(b, bc.o, bc.sb);
    return bc;
}

// Calls f(out_index, a_index, b_index) over the broadcast output.
template <class F>
void for_each_bc(const Broadcast& bc, F f) {
    int64_t i = 0;
    for (int64_t i0 = 0; i0 < bc.o[0]; ++i0)
        for (int64_t i1 = 0; i1 < bc.o[1]; ++i1)
            for (int64_t i2 = 0; i2 < bc.o[2]; ++i2) {
                int64_t a = i0 * bc.sa[0] + i1 * bc.sa[1] + i2 * bc.sa[2];
                int64_t b = i0 * bc.sb[0] + i1 * bc.sb[1] + i2 * bc.sb[2];
                for (int64_t i3 = 0; i3 < bc.o[3]; ++i3, ++i) f(i, a + i3 * bc.sa[3], b + i3 * bc.sb[3]);
            }
}

// Adds g (output-shaped) into dst (shaped like one operand, whose strides are
// `st`), summing over broadcast dims.
void reduce_into(float* dst, const float* g, const Broadcast& bc, const int64_t st[4]) {
    int64_t i = 0;
    for (int64_t i0 = 0; i0 < bc.o[0]; ++i0)
        for (int64_t i1 = 0; i1 < bc.o[1]; ++i1)
            for (int64_t i2 = 0; i2 < bc.o[2]; ++i2) {
                int64_t base = i0 * st[0] + i1 * st[1] + i2 * st[2];
                for (int64_t i3 = 0; i3 < bc.o[3]; ++i3, ++i) dst[base + i3 * st[3]] += g[i];
            }
}

enum class BinOp { Add, Sub, Mul, Div };

Tensor binary(const char* name, BinOp op, const Tensor& a, const Tensor& b) {
    require_defined(name, a, "a");
    require_defined(name, b, "b");
    Broadcast bc = broadcast(name, a.shape(), b.shape());
    Tensor out = make_result(bc.out);
    const float *pa = a.data(), *pb = b.data();
    float* po = out.data();
    bool same = a.shape() == b.shape();
    auto apply = [op](float x, float y) {
        switch (op) {
            case BinOp::Add: return x + y;
            case BinOp::Sub: return x - y;
            case BinOp::Mul: return x * y;
            case BinOp::Div: return x / y;
        }
        return 0.f;
    };
    const int64_t n = out.numel();
    // b [C] (any leading dims of 1) across the rows of a [..., C]: a per-column
    // bias or scale (IA3's scales). The general broadcast below runs
    // on one thread through an index per element and, in backward, an
    // output-sized temporary; this path runs rows in parallel and sums
    // columns in place.
    const int64_t C = a.ndim() > 0 ? a.shape().back() : 0;
    const bool by_row = !same && a.shape() == bc.out && C > 0 && b.ndim() > 0 && b.numel() == C && b.shape().back() == C;
    const int64_t rows = by_row ? n / C : 0;
    if (same || by_row) {
        // One loop per op: a switch inside the loop keeps it from vectorizing.
        auto each = [=](auto f) {
            if (same) {
                parallel_region(n > kParallelMin, [=] {
#pragma omp for simd schedule(static)
                    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], pb[i]);
                });
                return;
            }
            parallel_for(rows, n > kParallelMin, [=](int64_t r) {
#pragma omp simd
                for (int64_t j = 0; j < C; ++j) po[r * C + j] = f(pa[r * C + j], pb[j]);
            });
        };
        switch (op) {
            case BinOp::Add: each([](float x, float y) { return x + y; }); break;
            case BinOp::Sub: each([](float x, float y) { return x - y; }); break;
            case BinOp::Mul: each([](float x, float y) { return x * y; }); break;
            case BinOp::Div: each([](float x, float y) { return x / y; }); break;
        }
    } else {
        for_each_bc(bc, [&](int64_t i, int64_t ia, int64_t ib) { po[i] = apply(pa[ia], pb[ib]); });
    }
    flops::add(uint64_t(n));

    auto ga = grad_target(a), gb = grad_target(b);
    if (!ga && !gb) return out;
    // Save an operand only if the other one's gradient reads it (mul, div).
    Tensor sa = (op == BinOp::Mul && gb) || (op == BinOp::Div && gb) ? a : Tensor();
    Tensor sb = (op == BinOp::Mul && ga) || op == BinOp::Div ? b : Tensor();
    Tensor so = op == BinOp::Div && gb ? out.detach() : Tensor();
    record(out, [=](const float* dy) {
        // Raw pointers, captured by value below, so that the loops load them once.
        const float* pa = sa.defined() ? sa.data() : nullptr;
        const float* pb = sb.defined() ? sb.data() : nullptr;
        const float* pout = so.defined() ? so.data() : nullptr;
        std::vector<float> tmp;  // output-shaped, only for a broadcast operand
        // term(dy, i, ia, ib): the gradient's term at output index i, whose
        // operands are a[ia] and b[ib].
        auto grad_to = [&](const std::shared_ptr<GradCell>& g, const int64_t* st, bool is_a, auto term) {
            int64_t cost = op == BinOp::Div && !is_a ? 3 : 1;
            flops::add_grad(g->is_leaf, uint64_t(cost * n));
            if (same) {  // every index is the output's
                store_grad(*g, n, [=](int64_t i) { return term(dy[i], i, i, i); });
                return;
            }
            if (by_row) {  // a's indices are the output's, b's its column
                if (!is_a) {
                    add_column_sums_of(g->buffer(), rows, C, [=](int64_t i, int64_t j) { return term(dy[i], i, i, j); });
                    return;
                }
                bool add;
                float* d = g->target(add);
                parallel_for(rows, n > kParallelMin, [=](int64_t r) {
                    const int64_t i0 = r * C;
                    assign_or_add(d, add, i0, i0 + C, [=](int64_t i) { return term(dy[i], i, i, i - i0); });
                });
                return;
            }
            tmp.resize(size_t(n));
            for_each_bc(bc, [&](int64_t i, int64_t ia, int64_t ib) { tmp[size_t(i)] = term(dy[i], i, ia, ib); });
            if (g->numel == n) g->accumulate(tmp.data());
            else reduce_into(g->buffer(), tmp.data(), bc, st);
        };
        if (ga) {
            switch (op) {
                case BinOp::Add:
                case BinOp::Sub: grad_to(ga, bc.sa, true, [](float d, int64_t, int64_t, int64_t) { return d; }); break;
                case BinOp::Mul:
                    grad_to(ga, bc.sa, true, [=](float d, int64_t, int64_t, int64_t ib) { return d * pb[ib]; });
                    break;
                case BinOp::Div:
                    grad_to(ga, bc.sa, true, [=](float d, int64_t, int64_t, int64_t ib) { return d / pb[ib]; });
                    break;
            }
        }
        if (gb) {
            switch (op) {
                case BinOp::Add: grad_to(gb, bc.sb, false, [](float d, int64_t, int64_t, int64_t) { return d; }); break;
                case BinOp::Sub: grad_to(gb, bc.sb, false, [](float d, int64_t, int64_t, int64_t) { return -d; }); break;
                case BinOp::Mul:
                    grad_to(gb, bc.sb, false, [=](float d, int64_t, int64_t ia, int64_t) { return d * pa[ia]; });
                    break;
                case BinOp::Div:  // d(a/b)/db = -(a/b)/b = -out/b, per output element
                    grad_to(gb, bc.sb, false, [=](float d, int64_t i, int64_t, int64_t ib) { return -d * pout[i] / pb[ib]; });
                    break;
            }
        }
    });
    return out;
}

// y = f(x) element-wise; backward dx = dy * df(x, y). Saves x and/or y only if
// the derivative reads them.
template <class F, class DF>
Tensor unary(const char* name, const Tensor& a, int fwd_cost, int bwd_cost, bool needs_x, bool needs_y, F f, DF df) {
    require_defined(name, a, "input");
    Tensor out = make_result(a.shape());
    const float* x = a.data();
    float* y = out.data();
    const int64_t n = a.numel();
    parallel_region(n > kParallelMin, [=] {
        const F fn = f;  // each thread's own copy: inlined into a loop that vectorizes (see store_grad)
#pragma omp for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = fn(x[i]);
    });
    flops::add(uint64_t(fwd_cost) * uint64_t(n));
    auto ga = grad_target(a);
    if (!ga) return out;
    Tensor sx = needs_x ? a : Tensor();
    Tensor sy = needs_y ? out.detach() : Tensor();
    record(out, [=](const float* dy) {
        // An operand df does not read points at dy instead of null, so that the
        // loads are unconditional and the loop vectorizes.
        const float* px = needs_x ? sx.data() : dy;
        const float* py = needs_y ? sy.data() : dy;
        store_grad(*ga, n, [=](int64_t i) { return dy[i] * df(px[i], py[i]); });
        flops::add_grad(ga->is_leaf, uint64_t(bwd_cost) * uint64_t(n));
    });
    return out;
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) { return binary("add", BinOp::Add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary("sub", BinOp::Sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary("mul", BinOp::Mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary("div", BinOp::Div, a, b); }

Tensor add_scalar(const Tensor& a, float s) {
    return unary("add_scalar", a, 1, 1, false, false, [s](float x) { return x + s; }, [](float, float) { return 1.f; });
}
Tensor mul_scalar(const Tensor& a, float s) {
    return unary("mul_scalar", a, 1, 1, false, false, [s](float x) { return x * s; }, [s](float, float) { return s; });
}
Tensor neg(const Tensor& a) {
    return unary("neg", a, 1, 1, false, false, [](float x) { return -x; }, [](float, float) { return -1.f; });
}
Tensor exp(const Tensor& a) {
    return unary("exp", a, 1, 2, false, true, [](float x) { return std::exp(x); }, [](float, float y) { return y; });
}
Tensor log(const Tensor& a) {
    return unary("log", a, 1, 2, true, false, [](float x) { return std::log(x); },
                 [](float x, float) { return 1.f / x; });
}
Tensor tanh(const Tensor& a) {
    return unary("tanh", a, 1, 2, false, true, [](float x) { return std::tanh(x); },
                 [](float, float y) { return 1.f - y * y; });
}
Tensor sqrt(const Tensor& a) {
    return unary("sqrt", a, 1, 2, false, true, [](float x) { return std::sqrt(x); },
                 [](float, float y) { return 0.5f / y; });
}
Tensor relu(const Tensor& a) {
    return unary("relu", a, 1, 1, true, false, [](float x) { return x > 0.f ? x : 0.f; },
                 [](float x, float) { return x > 0.f ? 1.f : 0.f; });
}
// 0.5 x (1 + tanh u) with u = sqrt(2/pi) (x + 0.044715 x^3) is x * s, where
// s = sigmoid(2u) = 1 / (1 + e) and e = exp(-2u): the same function without
// the cancellation in 1 + tanh u for x << 0, and vectorizable (exp_approx).
// Its derivative s + 0.5 x (1 - tanh^2 u) u' = s + 2 x u' e s^2, with e s <= 1
// taken first so that nothing overflows where e is huge.
Tensor gelu(const Tensor& a) {
    return unary(
        "gelu", a, 8, 16, true, false,
        [](float x) { return x / (1.f + exp_approx(-2.f * kSqrt2OverPi * (x + kGeluC * x * x * x))); },
        [](float x, float) {
            const float e = exp_approx(-2.f * kSqrt2OverPi * (x + kGeluC * x * x * x));
            const float s = 1.f / (1.f + e);
            const float du = kSqrt2OverPi * (1.f + 3.f * kGeluC * x * x);
            return s + 2.f * x * du * (e * s) * s;
        });
}
Tensor gelu_erf(const Tensor& a) {
    return unary(
        "gelu_erf", a, 8, 16, true, false, [](float x) { return 0.5f * x * (1.f + std::erf(x * 0.7071067811865476f)); },
        [](float x, float) {
            float cdf = 0.5f * (1.f + std::erf(x * 0.7071067811865476f));
            float pdf = 0.3989422804014327f * std::exp(-0.5f * x * x);
            return cdf + x * pdf;
        });
}

Tensor masked_fill(const Tensor& a, const Tensor& mask, float value) {
    require_defined("masked_fill", a, "input");
    require_defined("masked_fill", mask, "mask");
    Broadcast bc = broadcast("masked_fill", a.shape(), mask.shape());
    if (bc.out != a.shape())
        throw std::invalid_argument(fmt::format("masked_fill: mask {} does not broadcast to the input {}",
                                                shape_str(mask.shape()), shape_str(a.shape())));
    Tensor out = make_result(a.shape());
    const float *pa = a.data(), *pm = mask.data();
    float* po = out.data();
    for_each_bc(bc, [&](int64_t i, int64_t ia, int64_t im) { po[i] = pm[im] != 0.f ? value : pa[ia]; });
    flops::add(uint64_t(a.numel()));
    auto ga = grad_target(a);
    if (!ga) return out;
    Tensor m = mask;
    record(out, [=](const float* dy) {
        std::vector<float> dx(static_cast<size_t>(bc.o[0] * bc.o[1] * bc.o[2] * bc.o[3]));
        const float* pm2 = m.data();
        for_each_bc(bc, [&](int64_t i, int64_t, int64_t im) { dx[size_t(i)] = pm2[im] != 0.f ? 0.f : dy[i]; });
        flops::add_grad(ga->is_leaf, dx.size());
        ga->accumulate(dx.data());
    });
    return out;
}

Tensor dropout(const Tensor& a, float p, Rng& rng) {
    require_defined("dropout", a, "input");
    if (!(p >= 0.f && p < 1.f)) throw std::invalid_argument(fmt::format("dropout: p = {} is not in [0, 1)", p));
    if (p == 0.f) return a;
    const int64_t n = a.numel();
    // The keep-mask is drawn sequentially so the result does not depend on threads.
    auto keep = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(n));
    const float scale = 1.f / (1.f - p);
    Tensor out = make_result(a.shape());
    for (int64_t i = 0; i < n; ++i) {
        (*keep)[size_t(i)] = rng.uniform() >= p;
        out.data()[i] = (*keep)[size_t(i)] ? a.data()[i] * scale : 0.f;
    }
    flops::add(uint64_t(2 * n));
    auto ga = grad_target(a);
    if (!ga) return out;
    record(out, [=](const float* dy) {
        const uint8_t* kept = keep->data();
        store_grad(*ga, n, [=](int64_t i) { return kept[i] ? dy[i] * scale : 0.f; });
        flops::add_grad(ga->is_leaf, uint64_t(n));
    });
    return out;
}

// ---- reductions ---------------------------------------------------------------
namespace {
Tensor reduce_axis(const char* name, const Tensor& a, int axis, bool keepdim, float scale) {
    require_defined(name, a, "input");
    int ax = norm_axis(name, axis, a.ndim(), a.shape());
    const int64_t outer = prod(a.shape(), 0, ax), len = a.shape()[size_t(ax)],
                  inner = prod(a.shape(), ax + 1, a.ndim());
    Shape os = a.shape();
    if (keepdim) os[size_t(ax)] = 1;
    else os.erase(os.begin() + ax);
    Tensor out = make_result(os);
    const float* x = a.data();
    float* y = out.data();
    for (int64_t o = 0; o < outer; ++o)
        for (int64_t i = 0; i < inner; ++i) {
            double s = 0;
            for (int64_t l = 0; l < len; ++l) s += x[(o * len + l) * inner + i];
            y[o * inner + i] = float(s) * scale;
        }
    flops::add(uint64_t(a.numel()));
    auto ga = grad_target(a);
    if (!ga) return out;
    record(out, [=](const float* dy) {
        float* dx = ga->buffer();
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t l = 0; l < len; ++l)
                for (int64_t i = 0; i < inner; ++i) dx[(o * len + l) * inner + i] += dy[o * inner + i] * scale;
        flops::add_grad(ga->is_leaf, uint64_t(outer * len * inner));
    });
    return out;
}
}  // namespace

Tensor sum(const Tensor& a) {
    require_defined("sum", a, "input");
    return reduce_axis("sum", reshape(a, {a.numel()}), 0, false, 1.f);
}
Tensor sum(const Tensor& a, int axis, bool keepdim) { return reduce_axis("sum", a, axis, keepdim, 1.f); }
Tensor mean(const Tensor& a) {
    require_defined("mean", a, "input");
    if (a.numel() == 0) throw std::invalid_argument("mean: empty tensor " + shape_str(a.shape()));
    return reduce_axis("mean", reshape(a, {a.numel()}), 0, false, 1.f / float(a.numel()));
}
Tensor mean(const Tensor& a, int axis, bool keepdim) {
    require_defined("mean", a, "input");
    int ax = norm_axis("mean", axis, a.ndim(), a.shape());
    if (a.shape()[size_t(ax)] == 0) throw std::invalid_argument("mean: empty axis in " + shape_str(a.shape()));
    return reduce_axis("mean", a, ax, keepdim, 1.f / float(a.shape()[size_t(ax)]));
}

}  // namespace peftlab
