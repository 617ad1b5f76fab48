// Per-lane group values of the AVX-512 int4 kernels (weight_only_avx512.cpp,
// weight_only_bf16dot.cpp). Both read a weight row in blocks of 128 k as one 64-byte
// load: 16 dword lanes, lane i of block b holding k 128b + 8i .. 128b + 8i + 7, so
// every lane lies inside one quantization group (group >= 32).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "weight_only.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

#if PYFAST_X86

// The 64 packed bytes of block b of a row (masked at the row's end: zero bytes,
// q = 0, meet zero padding of x).
PYFAST_TARGET_AVX512 inline __m512i load_block(const uint8_t* row, int64_t b, int64_t half) {
  const int64_t j = 64 * b;
  if (j + 64 <= half) return _mm512_loadu_si512(row + j);
  return _mm512_maskz_loadu_epi8((uint64_t{1} << (half - j)) - 1, row + j);
}

// Lane values of block b from one row's per-group values v[0, G) (float32 scales or
// uint8 zeros): lane i belongs to group (128b + 8i) / group. One group per row, or
// group 128: one value; group 32 / 64: 4 / 2 groups per block. When G > 1, group is
// 32, 64 or 128 (int4_mm checks it), so group indices come from shifts: a division
// here (idiv, tens of cycles) used to cost more than the whole block's arithmetic.
// R = __m512 gives float lanes; R = __m512i gives int32 lanes (uint8 v only: the exact
// integer zero points of the int8-slice kernel).
template <typename T, typename R = __m512>
PYFAST_TARGET_AVX512 inline R per_lane(const T* v, const Int4Weight& w, int64_t b) {
  constexpr bool kInt = std::is_same_v<R, __m512i>;
  static_assert(!kInt || std::is_same_v<T, uint8_t>, "int32 lanes are for uint8 values");
  auto bcast = [](T value) PYFAST_TARGET_AVX512 {
    if constexpr (kInt) return _mm512_set1_epi32(value);
    else return _mm512_set1_ps(static_cast<float>(value));
  };
  if (w.G == 1) return bcast(v[0]);
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(w.group));
  if (shift >= 7) return bcast(v[b]);
  const int64_t per = int64_t{128} >> shift, g0 = b * per, cnt = std::min(per, w.G - g0);
  const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1);
  // lane i -> group g0 + 8i / group = g0 + (i >> (shift - 3))
  const __m512i idx = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift - 3);
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(m, v + g0));
  } else {
    const __m512i g = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, v + g0));
    if constexpr (kInt) return _mm512_permutexvar_epi32(idx, g);
    else return _mm512_permutexvar_ps(idx, _mm512_cvtepi32_ps(g));
  }
}

// The start of the row segment read `ahead` segments after segment (r, chunk at b0) in
// the sweep order (chunk by chunk, rows r of the group in turn; then the next group's
// rows from block 0). Only prefetched: past the weight's end it is never read.
inline const uint8_t* segment_after(const Int4Weight& w, int64_t n, int64_t rows, int64_t r,
                                    int64_t b0, int64_t chunk, int64_t ahead) {
  const int64_t half = w.K / 2, blocks = (half + 63) / 64;
  int64_t rr = r + ahead, b = b0;
  while (rr >= rows && b < blocks) rr -= rows, b += chunk;
  if (b >= blocks) return w.packed + (n + rows + rr) * half;
  return w.packed + (n + rr) * half + 64 * b;
}

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
