// F16 weights: conversion and linear_half (half.h).
#include "autograd/half.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "autograd/flops.h"
#include "autograd/ops_util.h"
#include "autograd/tape.h"

namespace peftlab {
using namespace detail;

int64_t first_outside_half(const float* x, int64_t n) {
    return std::find_if(x, x + n, [](float v) { return !(std::abs(v) < 65520.f); }) - x;
}

HalfMatrix HalfMatrix::from(const Tensor& w, std::string_view name) {
    require_defined("HalfMatrix::from", w, "weight");
    if (w.ndim() != 2)
        throw std::invalid_argument(
            fmt::format("HalfMatrix::from: {} {} must be 2-D [out, in]", name, shape_str(w.shape())));
    if (const int64_t i = first_outside_half(w.data(), w.numel()); i < w.numel())
        throw std::invalid_argument(fmt::format(
            "HalfMatrix::from: {} {} element ({}, {}) = {} is outside F16's range (|x| < 65520): keep F32 weights",
            name, shape_str(w.shape()), i / w.dim(1), i % w.dim(1), w.data()[i]));
    HalfMatrix h;
    h.rows = w.dim(0);
    h.cols = w.dim(1);
    h.data = mem::alloc_array<uint16_t>(size_t(w.numel()));
    if (!h.data && w.numel())
        throw std::runtime_error(fmt::format("HalfMatrix::from: out of memory for weight {}", shape_str(w.shape())));
    const float* src = w.data();
    uint16_t* dst = h.data.get();
    parallel_for(w.numel(), w.numel() > kParallelMin, [=](int64_t i) { dst[i] = float_to_half(src[i]); });
    return h;
}

Tensor HalfMatrix::to_float() const {
    Tensor t = Tensor::empty({rows, cols});
    float* dst = t.data();
    const uint16_t* src = data.get();
    parallel_for(rows * cols, rows * cols > kParallelMin, [=](int64_t i) { dst[i] = half_to_float(src[i]); });
    return t;
}

Tensor linear_half(const Tensor& x, const HalfMatrix& w, const Tensor& bias) {
    require_defined("linear_half", x, "input");
    if (x.ndim() < 1 || x.dim(-1) != w.cols)
        throw std::invalid_argument(fmt::format("linear_half: input {} and F16 weight [{}, {}] do not match",
                                                shape_str(x.shape()), w.rows, w.cols));
    if (bias.defined() && (bias.ndim() != 1 || bias.dim(0) != w.rows))
        throw std::invalid_argument(fmt::format("linear_half: bias {} does not match F16 weight [{}, {}]",
                                                shape_str(bias.shape()), w.rows, w.cols));
    if (grad_target(x) || (bias.defined() && grad_target(bias)))
        throw std::invalid_argument(fmt::format(
            "linear_half: input {} {} a gradient, and F16 weights have no backward (run under NoGradGuard)",
            shape_str(x.shape()), grad_target(x) ? "needs" : "has a bias that needs"));
    const int64_t in = w.cols, outf = w.rows, R = x.numel() / std::max<int64_t>(in, 1);
    Shape os = x.shape();
    os.back() = outf;
    Tensor out = make_result(os);
    float* y = out.data();
    const float beta = fill_bias_rows(y, bias, R, outf);  // as linear(): the bias rows, then x W^T added
    gemm_half_b(R, outf, in, 1.f, x.data(), in, w.data.get(), in, beta, y, outf);
    flops::add(uint64_t(2 * R * outf * in));
    return out;
}

}  // namespace peftlab
