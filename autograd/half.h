#pragma once
// F16 weights for inference: a Linear's weight stored as IEEE 754 binary16
// (1 sign, 5 exponent, 10 mantissa bits; llama.cpp's and PyTorch's float16),
// converted once from float, multiplied with F32 accumulation. Half the bytes
// of an F32 weight, so a decoding step that is bound by reading its weights
// (batch 1) reads half as much. No backward: it serves forwards that record
// no graph (generation, evaluation).
#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "autograd/tensor.h"

namespace peftlab {

// float -> binary16, rounded to nearest, ties to even (IEEE 754 2008,
// section 4.3.1); magnitudes from 65520 up become infinity, below 2^-14 a
// subnormal (or zero), NaN stays a (quiet) NaN.
inline uint16_t float_to_half(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: past the largest half (65504) by half an ulp
    if (ax < 0x38800000u)  // below 2^-14: a subnormal, m * 2^-24 with m = round(|f| * 2^24) (0x400: the smallest normal)
        return uint16_t(sign | uint32_t(std::nearbyint(std::bit_cast<float>(ax) * 0x1p24f)));
    // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to
    // 10 bits; a carry out of the mantissa correctly bumps the exponent.
    const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
    return uint16_t(sign | ((rounded >> 13) - (112u << 10)));
}

// binary16 -> float (exact: every half is a float).
inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
        const float v = float(mant) * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

// The index of the first of x[0, n) that binary16 cannot hold, or n: a NaN,
// an infinity, or a magnitude from 65520 up (float_to_half rounds it to
// infinity; the largest finite half is 65504).
int64_t first_outside_half(const float* x, int64_t n);

// A weight [rows, cols] (a Linear's [out, in]) in binary16, row-major.
struct HalfMatrix {
    int64_t rows = 0, cols = 0;
    // [rows * cols], from mem::alloc_bytes: in huge pages, as a decoding
    // step streams it.
    mem::Buffer<uint16_t> data{nullptr, &std::free};

    // w [rows, cols] rounded element by element (float_to_half). Throws
    // std::invalid_argument naming `name` and the shape unless w is 2-D, and
    // naming the element when one is outside binary16's range
    // (first_outside_half): an infinity there would turn logits into NaN.
    static HalfMatrix from(const Tensor& w, std::string_view name = "weight");
    Tensor to_float() const;  // [rows, cols], exact
};

// x [..., in] @ w^T + bias [out] with w [out, in] in binary16 and F32
// accumulation: bit for bit linear(x, w.to_float(), bias), reading half the
// weight bytes (few-row GEMMs, as in decoding, convert each block of w into
// a small buffer as they go; larger ones convert w once per call). FLOPs
// count as linear's. Throws std::invalid_argument naming the shapes when they
// do not match, and when grad mode is on and x or bias needs a gradient (there
// is no backward: run under NoGradGuard).
Tensor linear_half(const Tensor& x, const HalfMatrix& w, const Tensor& bias = Tensor());

}  // namespace peftlab
