// Generic (plain C++) bodies of the weight-only kernels, included by the ISA files.
//
// The bodies are always_inline so that each ISA file's wrapper, compiled with
// its own target attribute (PYFAST_TARGET_AVX512 / PYFAST_TARGET_AVX2 / none),
// gets its own copy that GCC vectorises for that ISA; no global -m flag.
// Every weight value is computed exactly as pyfast.reference does:
//   int8: float(w)            int4: (float(q) - float(zero)) * scale   (one rounding)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "weight_only.h"

#define PYFAST_WO_INLINE inline __attribute__((always_inline))

namespace pyfast {
namespace cpu {
namespace weight_only {

// Software prefetch of the weight stream into L2 (prefetcht1), one per 64-byte
// line, `prefetch_distance(tile_bytes)` bytes ahead of the current load: the
// same offset in the next tile of weight rows (at least 8 KiB ahead). Measured on
// Zen 4 at M = 1: the hardware prefetcher alone lets a core stall on each new
// 2 KiB row stream (int4 K = 4096) and compute and memory time add up; with this
// they overlap (single core: 8.3 -> 12.2 GB/s of int4 weight).
PYFAST_WO_INLINE int64_t prefetch_distance(int64_t tile_bytes) {
  return std::max<int64_t>(tile_bytes, 8192);
}

PYFAST_WO_INLINE void prefetch_l2(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);  // read, locality 2 = prefetcht1
#endif
}

// float32 -> bfloat16 bits, round to nearest even (as torch's .to(bfloat16));
// a NaN stays a (quiet) NaN.
PYFAST_WO_INLINE uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((b >> 16) | 0x40u) : rounded);
}

PYFAST_WO_INLINE void dequant_int8_f32_body(const Int8Weight& w, int64_t n0, int64_t n1,
                                            float* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = w.w + n * w.K;
    float* d = dst + (n - n0) * w.K;
    for (int64_t k = 0; k < w.K; ++k) d[k] = static_cast<float>(src[k]);
  }
}

PYFAST_WO_INLINE void dequant_int8_bf16_body(const Int8Weight& w, int64_t n0, int64_t n1,
                                             uint16_t* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = w.w + n * w.K;
    uint16_t* d = dst + (n - n0) * w.K;
    const float s = w.scale[n];
    for (int64_t k = 0; k < w.K; ++k) d[k] = to_bf16(static_cast<float>(src[k]) * s);
  }
}

// One group of one row: bytes p[0, nbytes) -> 2 * nbytes weights.
template <typename Out, typename Cvt>
PYFAST_WO_INLINE void dequant_int4_group(const uint8_t* p, int64_t nbytes, float z, float s,
                                         Out* d, Cvt cvt) {
  for (int64_t j = 0; j < nbytes; ++j) {
    d[2 * j] = cvt((static_cast<float>(p[j] & 15) - z) * s);
    d[2 * j + 1] = cvt((static_cast<float>(p[j] >> 4) - z) * s);
  }
}

template <typename Out, typename Cvt>
PYFAST_WO_INLINE void dequant_int4_body(const Int4Weight& w, int64_t n0, int64_t n1, Out* dst,
                                        Cvt cvt) {
  const int64_t half = w.K / 2, gbytes = w.group / 2;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t g = 0; g < w.G; ++g) {
      const float z = static_cast<float>(w.zeros[n * w.ldg + g]);
      const float s = w.scales[n * w.ldg + g];
      dequant_int4_group(w.packed + n * half + g * gbytes, gbytes, z, s,
                         dst + (n - n0) * w.K + g * w.group, cvt);
    }
  }
}

PYFAST_WO_INLINE void dequant_int4_f32_body(const Int4Weight& w, int64_t n0, int64_t n1,
                                            float* dst) {
  dequant_int4_body(w, n0, n1, dst, [](float v) { return v; });
}

PYFAST_WO_INLINE void dequant_int4_bf16_body(const Int4Weight& w, int64_t n0, int64_t n1,
                                             uint16_t* dst) {
  dequant_int4_body(w, n0, n1, dst, [](float v) { return to_bf16(v); });
}

// The small-M drivers of the ISA files (weight_only_avx2.cpp, weight_only_avx512.cpp):
// Tile<MR, NR>::run computes an MR x NR block of out (MR activation rows, NR weight
// rows); MAX_MR is the most activation rows one tile keeps in registers (4 on AVX2,
// 8 on AVX-512).

// Tile<mr, NR>::run for a run-time mr in 1..MAX_MR.
template <template <int, int> class Tile, int NR, int MAX_MR, typename W>
void run_tile(int mr, const float* x, int64_t ldx, const W& w, int64_t n, float* out,
              int64_t ldo) {
  if constexpr (MAX_MR > 1) {
    if (mr < MAX_MR) return run_tile<Tile, NR, MAX_MR - 1>(mr, x, ldx, w, n, out, ldo);
  }
  Tile<MAX_MR, NR>::run(x, ldx, w, n, out, ldo);
}

// Weight rows [n0, n1) in tiles of NR = 4 (M = 1) or 2, then single rows; inside a
// weight tile, activation rows in tiles of up to MAX_MR (the weight tile, at most 4
// rows of K, stays in L1 between them).
template <template <int, int> class Tile, int MAX_MR, typename W>
void small_driver(const float* x, int64_t ldx, int64_t M, const W& w, int64_t n0, int64_t n1,
                  float* out, int64_t ldo) {
  int64_t n = n0;
  auto rows = [&](auto nr_tag) {
    constexpr int NR = decltype(nr_tag)::value;
    for (; n + NR <= n1; n += NR)
      for (int64_t m = 0; m < M; m += MAX_MR)
        run_tile<Tile, NR, MAX_MR>(static_cast<int>(std::min<int64_t>(MAX_MR, M - m)),
                                   x + m * ldx, ldx, w, n, out + m * ldo, ldo);
  };
  if (M == 1) rows(std::integral_constant<int, 4>{});
  rows(std::integral_constant<int, 2>{});
  rows(std::integral_constant<int, 1>{});
}

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast

// Defines dequant_int8_*_<suffix> / dequant_int4_*_<suffix> (natural k order) with
// the function attribute `target` (may be empty).
#define PYFAST_WO_DEQUANT_INT8_DEFINE(suffix, target)                                   \
  target void dequant_int8_f32_##suffix(const Int8Weight& w, int64_t n0, int64_t n1,   \
                                        float* dst) {                                  \
    dequant_int8_f32_body(w, n0, n1, dst);                                             \
  }                                                                                    \
  target void dequant_int8_bf16_##suffix(const Int8Weight& w, int64_t n0, int64_t n1,  \
                                         uint16_t* dst) {                              \
    dequant_int8_bf16_body(w, n0, n1, dst);                                            \
  }
#define PYFAST_WO_DEQUANT_INT4_DEFINE(suffix, target)                                   \
  target void dequant_int4_f32_##suffix(const Int4Weight& w, int64_t n0, int64_t n1,   \
                                        float* dst) {                                  \
    dequant_int4_f32_body(w, n0, n1, dst);                                             \
  }                                                                                    \
  target void dequant_int4_bf16_##suffix(const Int4Weight& w, int64_t n0, int64_t n1,  \
                                         uint16_t* dst) {                              \
    dequant_int4_bf16_body(w, n0, n1, dst);                                            \
  }
#define PYFAST_WO_DEQUANT_DEFINE(suffix, target) \
  PYFAST_WO_DEQUANT_INT8_DEFINE(suffix, target) PYFAST_WO_DEQUANT_INT4_DEFINE(suffix, target)
