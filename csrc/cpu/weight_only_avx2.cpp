// AVX2 + FMA kernels of int8_weight_mm / int4_mm for small M (see weight_only.h).
//
// Same tiling as the AVX-512 file (MR activation rows x NR weight rows, float32
// accumulators in ymm registers, 8 lanes), with MR <= 4 to fit 16 registers.
// int8: 8 bytes -> vpmovsxbd -> vcvtdq2ps -> FMA; times scale[n] at the end.
// int4: 8 packed bytes = 16 weights. vpmovzxbd widens them to 8 int32 lanes;
//   AVX2 has no 16-entry float permute, so the nibble becomes a float by the
//   exponent trick: (nibble | 0x4B000000) is the float 2**23 + q exactly, and
//   subtracting the float 2**23 + zero leaves q - zero exactly; times the
//   group's scale gives (q - zero) * scale, bit-identical to the reference's
//   weight. x is de-interleaved per 16 k (weight_only.h), so no shuffle.
// K tails: the last bytes are copied into a zeroed 8-byte buffer; x tails use
// vmaskmovps (int8) or the zero padding of the de-interleaved x (int4), and the
// padding lanes of an int4 weight vector are zeroed.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "weight_only_kernels.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

#if PYFAST_X86

namespace {

template <int MR, int NR>
PYFAST_TARGET_AVX2 void int8_tile(const float* x, int64_t ldx, const Int8Weight& w, int64_t n,
                                  float* out, int64_t ldo) {
  const int64_t K = w.K;
  const int8_t* p[NR];
  for (int r = 0; r < NR; ++r) p[r] = w.w + (n + r) * K;
  const int64_t ahead = prefetch_distance(NR * K);
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0)
      for (int r = 0; r < NR; ++r) prefetch_l2(p[r] + k + ahead);
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[r] + k))));
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const int rem = static_cast<int>(K - k);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) {
      alignas(16) int8_t buf[16] = {0};
      std::memcpy(buf, p[r] + k, rem);
      wv[r] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(buf))));
    }
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_maskload_ps(x + m * ldx + k, mask);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      // lanes summed in a fixed order: (0+4, 1+5, 2+6, 3+7) then pairs
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]),
                                   _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
      out[m * ldo + n + r] = _mm_cvtss_f32(s1) * w.scale[n + r];
    }
}

// 8 weights (q - zero) * scale from the 8 int32 lanes `nib` (values 0..15).
PYFAST_TARGET_AVX2 inline __m256 int4_values(__m256i nib, __m256 z_magic, __m256 scale) {
  const __m256i as_float = _mm256_or_si256(nib, _mm256_set1_epi32(0x4B000000));
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_castsi256_ps(as_float), z_magic), scale);
}

template <int MR, int NR>
PYFAST_TARGET_AVX2 void int4_tile(const float* x, int64_t ldx, const Int4Weight& w, int64_t n,
                                  float* out, int64_t ldo) {
  const int64_t half = w.K / 2, gbytes = w.group / 2;
  const uint8_t* p[NR];
  for (int r = 0; r < NR; ++r) p[r] = w.packed + (n + r) * half;
  const int64_t ahead = prefetch_distance(NR * half);
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m256 zm[NR], sc[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (n + r) * w.ldg + g;
      zm[r] = _mm256_set1_ps(8388608.0f + static_cast<float>(w.zeros[i]));  // 2**23 + zero
      sc[r] = _mm256_set1_ps(w.scales[i]);
    }
    const int64_t j1 = std::min(half, (g + 1) * gbytes);
    for (int64_t j = g * gbytes; j < j1; j += 8) {
      if ((j & 63) == 0)
        for (int r = 0; r < NR; ++r) prefetch_l2(p[r] + j + ahead);
      const int rem = static_cast<int>(std::min<int64_t>(8, j1 - j));
      __m256 wl[NR], wh[NR];
      for (int r = 0; r < NR; ++r) {
        __m128i bytes;
        if (rem == 8) {
          bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[r] + j));
        } else {  // per-channel K tail
          alignas(16) uint8_t buf[16] = {0};
          std::memcpy(buf, p[r] + j, rem);
          bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
        }
        const __m256i d = _mm256_cvtepu8_epi32(bytes);
        wl[r] = int4_values(_mm256_and_si256(d, low4), zm[r], sc[r]);
        wh[r] = int4_values(_mm256_srli_epi32(d, 4), zm[r], sc[r]);
        if (rem < 8) {
          const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
              _mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
          wl[r] = _mm256_and_ps(wl[r], keep);
          wh[r] = _mm256_and_ps(wh[r], keep);
        }
      }
      const float* xb = x + 2 * j;
      for (int m = 0; m < MR; ++m) {
        const __m256 xl = _mm256_loadu_ps(xb + m * ldx);
        const __m256 xh = _mm256_loadu_ps(xb + m * ldx + 8);
        for (int r = 0; r < NR; ++r) {
          acc[m][r] = _mm256_fmadd_ps(xl, wl[r], acc[m][r]);
          acc[m][r] = _mm256_fmadd_ps(xh, wh[r], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]),
                                   _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
      out[m * ldo + n + r] = _mm_cvtss_f32(s1);
    }
}

template <int MR, int NR>
struct int8_tile_fn {
  static void run(const float* x, int64_t ldx, const Int8Weight& w, int64_t n, float* out,
                  int64_t ldo) {
    int8_tile<MR, NR>(x, ldx, w, n, out, ldo);
  }
};
template <int MR, int NR>
struct int4_tile_fn {
  static void run(const float* x, int64_t ldx, const Int4Weight& w, int64_t n, float* out,
                  int64_t ldo) {
    int4_tile<MR, NR>(x, ldx, w, n, out, ldo);
  }
};

}  // namespace

void int8_small_avx2(const float* xp, int64_t M, const Int8Weight& w, int64_t n0, int64_t n1,
                     float* out, int64_t ldo) {
  small_driver<int8_tile_fn, 4>(xp, w.K, M, w, n0, n1, out, ldo);
}

void int4_small_avx2(const float* xp, int64_t ld, int64_t M, const Int4Weight& w, int64_t n0,
                     int64_t n1, float* out, int64_t ldo) {
  small_driver<int4_tile_fn, 4>(xp, ld, M, w, n0, n1, out, ldo);
}

PYFAST_WO_DEQUANT_DEFINE(avx2, PYFAST_TARGET_AVX2)

#else  // not x86: never selected (active_isa() is kScalar)

void int8_small_avx2(const float* xp, int64_t M, const Int8Weight& w, int64_t n0, int64_t n1,
                     float* out, int64_t ldo) {
  int8_small_scalar(xp, M, w, n0, n1, out, ldo);
}
void int4_small_avx2(const float* xp, int64_t ld, int64_t M, const Int4Weight& w, int64_t n0,
                     int64_t n1, float* out, int64_t ldo) {
  int4_small_scalar(xp, ld, M, w, n0, n1, out, ldo);
}
PYFAST_WO_DEQUANT_DEFINE(avx2, )

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
