// AVX-512 kernels of int8_weight_mm / int4_mm for small M (see weight_only.h).
//
// A tile is MR activation rows x NR weight rows over the whole K; its MR * NR
// float32 accumulators are zmm registers (16 lanes each, summed across lanes at
// the end). Each weight vector is dequantized once per tile and used by all MR
// rows, so for M <= 8 the weight is read from memory exactly once.
//
// int8: 16 bytes -> vpmovsxbd (16 x int32) -> vcvtdq2ps -> FMA with x; the row
//   sum is multiplied by scale[n] at the end (reference: (x @ w.T) * scale).
// int4: 16 packed bytes = 32 weights. vpmovzxbd widens the bytes to 16 int32
//   lanes; lane i holds q[2i] in bits 0-3 and q[2i+1] in bits 4-7. vpermps
//   (_mm512_permutexvar_ps) uses only the low 4 bits of each index, so
//   permutexvar(d, T) looks up T[q[2i]] without masking and
//   permutexvar(d >> 4, T) looks up T[q[2i+1]]. T is a 16-entry table per
//   (row, group): T[q] = (float(q) - float(zero)) * scale, i.e. the scale is
//   folded into the dequantized weight, bit-identical to the reference's weight.
//   The activations are stored de-interleaved per 32 k (even k, then odd k;
//   weight_only.h) so the looked-up vectors line up with x without a shuffle.
//   Per 32 weights: 1 widening load, 1 shift, 2 vpermps, and 2 FMA per x row.
// K tails (K not a multiple of 16 / 32) use masked loads; masked-off weight lanes
// are zeroed so padding never meets a non-finite table entry.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "weight_only_kernels.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

#if PYFAST_X86

namespace {

template <int MR, int NR>
PYFAST_TARGET_AVX512 void int8_tile(const float* x, int64_t ldx, const Int8Weight& w,
                                    int64_t n, float* out, int64_t ldo) {
  const int64_t K = w.K;
  const int8_t* p[NR];
  for (int r = 0; r < NR; ++r) p[r] = w.w + (n + r) * K;
  const int64_t ahead = prefetch_distance(NR * K);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if ((k & 63) == 0)
      for (int r = 0; r < NR; ++r) prefetch_l2(p[r] + k + ahead);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + k))));
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p[r] + k)));
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r)
      out[m * ldo + n + r] = _mm512_reduce_add_ps(acc[m][r]) * w.scale[n + r];
}

template <int MR, int NR>
PYFAST_TARGET_AVX512 void int4_tile(const float* x, int64_t ldx, const Int4Weight& w,
                                    int64_t n, float* out, int64_t ldo) {
  const int64_t half = w.K / 2, gbytes = w.group / 2;
  const uint8_t* p[NR];
  for (int r = 0; r < NR; ++r) p[r] = w.packed + (n + r) * half;
  const int64_t ahead = prefetch_distance(NR * half);
  const __m512 iota =
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 T[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (n + r) * w.G + g;
      T[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(w.zeros[i]))),
                           _mm512_set1_ps(w.scales[i]));
    }
    // Groups are 16, 32 or 64 bytes (or the whole row), so a 16-byte block never
    // straddles two groups and byte j is at x offset 2 * j.
    const int64_t j1 = std::min(half, (g + 1) * gbytes);
    int64_t j = g * gbytes;
    for (; j + 16 <= j1; j += 16) {
      if ((j & 63) == 0)
        for (int r = 0; r < NR; ++r) prefetch_l2(p[r] + j + ahead);
      __m512 wl[NR], wh[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i d =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + j)));
        wl[r] = _mm512_permutexvar_ps(d, T[r]);
        wh[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), T[r]);
      }
      const float* xb = x + 2 * j;
      for (int m = 0; m < MR; ++m) {
        const __m512 xl = _mm512_loadu_ps(xb + m * ldx);
        const __m512 xh = _mm512_loadu_ps(xb + m * ldx + 16);
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = _mm512_fmadd_ps(xl, wl[r], acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(xh, wh[r], acc[m][r]);
        }
      }
    }
    if (j < j1) {  // per-channel rows only: K % 32 != 0; x is zero padded to ld
      const __mmask16 mask = static_cast<__mmask16>((1u << (j1 - j)) - 1u);
      __m512 wl[NR], wh[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, p[r] + j));
        wl[r] = _mm512_maskz_permutexvar_ps(mask, d, T[r]);
        wh[r] = _mm512_maskz_permutexvar_ps(mask, _mm512_srli_epi32(d, 4), T[r]);
      }
      const float* xb = x + 2 * j;
      for (int m = 0; m < MR; ++m) {
        const __m512 xl = _mm512_loadu_ps(xb + m * ldx);
        const __m512 xh = _mm512_loadu_ps(xb + m * ldx + 16);
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = _mm512_fmadd_ps(xl, wl[r], acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(xh, wh[r], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) out[m * ldo + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// Tile<MR, NR>::run calls the tile function template for compile-time MR, NR.
#define PYFAST_WO_TILE_FN(name)                                                           \
  template <int MR, int NR>                                                               \
  struct name##_fn {                                                                      \
    template <typename W>                                                                 \
    static void run(const float* x, int64_t ldx, const W& w, int64_t n, float* out,       \
                    int64_t ldo) {                                                        \
      name<MR, NR>(x, ldx, w, n, out, ldo);                                               \
    }                                                                                     \
  };
PYFAST_WO_TILE_FN(int8_tile)
PYFAST_WO_TILE_FN(int4_tile)
#undef PYFAST_WO_TILE_FN

}  // namespace

void int8_small_avx512(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
  small_driver<int8_tile_fn, 8>(xp, w.K, M, w, n0, n1, out, ldo);
}

void int4_small_avx512(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                       int64_t n0, int64_t n1, float* out, int64_t ldo) {
  small_driver<int4_tile_fn, 8>(xp, ld, M, w, n0, n1, out, ldo);
}

PYFAST_WO_DEQUANT_INT8_DEFINE(avx512, PYFAST_TARGET_AVX512)

namespace {

// float32 -> bfloat16, round to nearest even, 16 lanes (a quiet NaN stays NaN:
// its top mantissa bit absorbs the carry).
PYFAST_TARGET_AVX512 inline __m256i to_bf16x16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// Panel rows in the 32-k block order (int4_panel_lanes = 16): the table lookups
// of the small kernel, stored as they come. Store(dst, v) writes 16 values.
template <typename Out, typename Store>
PYFAST_TARGET_AVX512 inline void dequant_int4_blocks(const Int4Weight& w, int64_t n0,
                                                     int64_t n1, Out* dst, Store store) {
  const int64_t half = w.K / 2, gbytes = w.group / 2, ld = (w.K + 31) / 32 * 32;
  const __m512 iota =
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.packed + n * half;
    Out* d = dst + (n - n0) * ld;
    for (int64_t g = 0; g < w.G; ++g) {
      const int64_t i = n * w.G + g;
      const __m512 T = _mm512_mul_ps(
          _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(w.zeros[i]))),
          _mm512_set1_ps(w.scales[i]));
      const int64_t j1 = std::min(half, (g + 1) * gbytes);
      for (int64_t j = g * gbytes; j < j1; j += 16) {
        const __mmask16 mask = j + 16 <= j1 ? __mmask16(0xffff)
                                            : static_cast<__mmask16>((1u << (j1 - j)) - 1u);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, p + j));
        store(d + 2 * j, _mm512_maskz_permutexvar_ps(mask, v, T));
        store(d + 2 * j + 16, _mm512_maskz_permutexvar_ps(mask, _mm512_srli_epi32(v, 4), T));
      }
    }
  }
}

}  // namespace

PYFAST_TARGET_AVX512 void dequant_int4_f32_avx512(const Int4Weight& w, int64_t n0, int64_t n1,
                                                  float* dst) {
  dequant_int4_blocks(w, n0, n1, dst,
                      [](float* d, __m512 v) PYFAST_TARGET_AVX512 { _mm512_storeu_ps(d, v); });
}

PYFAST_TARGET_AVX512 void dequant_int4_bf16_avx512(const Int4Weight& w, int64_t n0,
                                                   int64_t n1, uint16_t* dst) {
  dequant_int4_blocks(w, n0, n1, dst, [](uint16_t* d, __m512 v) PYFAST_TARGET_AVX512 {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), to_bf16x16(v));
  });
}

#else  // not x86: never selected (active_isa() is kScalar)

void int8_small_avx512(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
  int8_small_scalar(xp, M, w, n0, n1, out, ldo);
}
void int4_small_avx512(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                       int64_t n0, int64_t n1, float* out, int64_t ldo) {
  int4_small_scalar(xp, ld, M, w, n0, n1, out, ldo);
}
PYFAST_WO_DEQUANT_DEFINE(avx512, )

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
