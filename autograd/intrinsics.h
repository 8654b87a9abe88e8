// <immintrin.h> for the x86 kernels (gemm_packed.cpp, gemm_small.cpp,
// ops_matmul.cpp). GCC 12's AVX-512 intrinsics that take a pass-through
// operand (_mm512_cvtph_ps, _mm512_unpacklo_ps, _mm512_shuffle_f32x4, ...)
// start from _mm512_undefined_ps(), which -Wuninitialized and
// -Wmaybe-uninitialized report inside the header at every inlined use (GCC
// bug 105593, fixed in GCC 13); the warnings are silenced for the header only
// (GCC only: clang, which builds the fuzz targets, has no -Wmaybe-uninitialized).
#pragma once
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
