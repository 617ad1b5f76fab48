// x as 24-bit fixed point per lane of 8 consecutive k, the first step of the int8-slice
// kernels at M = 1 (int4_mm: weight_only_slices.cpp; sparse24_int4_mm:
// sparse24_int4_slices.cpp). Each kernel then cuts X into the byte slices its vpdpbusd
// reads, in its own layout.
//
// Lane i of block b holds k = 128b + 8i .. 128b + 8i + 7. Per lane, e is the exponent
// with max|x| < 0.99 * 2^e and X = round(x * 2^(23 - e)), |X| < 0.99 * 2^23: each x is
// held to within 2^(e - 24), one float32 ulp of its lane's largest |x| (the accuracy
// paragraph of weight_only_slices.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace pyfast {
namespace cpu {
namespace slices {

#if PYFAST_X86

// v[u] lane i = x[128b + 8i + u] (0 past K) and mx = each lane's max |x|. False when x has
// a non-finite value in the block.
PYFAST_TARGET_AVX512 inline bool lane_values(const float* x, int64_t K, int64_t b,
                                             __m512 v[8], __m512* mx) {
  const __m512i idx8 = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(8));
  const __m512 big = _mm512_set1_ps(3.402823466e38f);
  __m512 m = _mm512_setzero_ps();
  for (int u = 0; u < 8; ++u) {
    const int64_t k0 = 128 * b + u;  // lane i: k0 + 8i < K
    const int64_t lanes = k0 >= K ? 0 : std::min<int64_t>(16, (K - k0 + 7) / 8);
    const __mmask16 in = static_cast<__mmask16>((1u << lanes) - 1u);
    v[u] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx8, x + k0, 4);
    const __m512 a = _mm512_abs_ps(v[u]);
    if (_mm512_cmp_ps_mask(a, big, _CMP_LE_OQ) != 0xffff) return false;  // inf or NaN
    m = _mm512_max_ps(m, a);
  }
  *mx = m;
  return true;
}

// From the lane maxima mx (finite): e per lane (vgetexpps / vgetmantps: max|x| = mant *
// 2^ei, mant in [1, 2); e = ei + 1, or ei + 2 when mant >= 1.98, so that max|x| < 0.99 *
// 2^e; any e for a zero lane), sc = 2^(23 - e) and f = 2^(e - 23), both made from their
// exponent fields (both normal). False when a nonzero lane maximum is below 2^-64, where
// 2^(e - 23) times a group scale may fall into float32's subnormals.
PYFAST_TARGET_AVX512 inline bool lane_exponents(__m512 mx, __m512* sc, __m512* f) {
  const __mmask16 nonzero = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_NEQ_OQ);
  if (_mm512_mask_cmp_ps_mask(nonzero, mx, _mm512_set1_ps(0x1p-64f), _CMP_LT_OQ) != 0)
    return false;
  const __m512 mxs = _mm512_mask_blend_ps(nonzero, _mm512_set1_ps(1.0f), mx);  // 0 -> 1
  const __m512 mant = _mm512_getmant_ps(mxs, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512i ei = _mm512_add_epi32(  // e - 1
      _mm512_cvtps_epi32(_mm512_getexp_ps(mxs)),
      _mm512_maskz_set1_epi32(_mm512_cmp_ps_mask(mant, _mm512_set1_ps(1.98f), _CMP_GE_OQ), 1));
  *sc = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127 + 22), ei), 23));
  *f = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(127 - 22), ei), 23));
  return true;
}

#endif

}  // namespace slices
}  // namespace cpu
}  // namespace pyfast
