// AVX2 micro-kernels of pyfast's int8 GEMM (see int8_gemm.h).
//
// No vpdpbusd here, and vpmaddubsw (u8 x s8 pairs into SATURATED int16) would
// clip full-range inputs, so both operands are sign-extended to int16
// (vpmovsxbw, _mm256_cvtepi8_epi16) and multiplied with vpmaddwd
// (_mm256_madd_epi16): int16 x int16 pairs summed into int32, exact here (each
// pair is at most 2 * 128 * 128 = 32768). The sums are exact, so no compensation
// (row_comp = nullptr). One step covers 16 k; a tile keeps MR x 4 ymm
// accumulators, and MR = 2 keeps 8 accumulators + 4 b vectors + 1 a vector
// within the 16 ymm registers. K tails (< 16) are finished in scalar code.
#include "int8_gemm.h"
#include "isa.h"

#if PYFAST_X86

#include <immintrin.h>

#include <type_traits>

namespace pyfast {
namespace cpu {
namespace int8_gemm {
namespace {

constexpr int kMrAvx2 = 2;

PYFAST_TARGET_AVX2 inline __m256i load_s16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Lane j of the result = sum of the 8 lanes of xj.
PYFAST_TARGET_AVX2 inline __m128i reduce4(__m256i x0, __m256i x1, __m256i x2, __m256i x3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(x0, x1), _mm256_hadd_epi32(x2, x3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <int MR>
PYFAST_TARGET_AVX2 void tile_avx2(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                                  int nr, int64_t kl, int32_t* c, int64_t ldc,
                                  bool accumulate, int64_t prefetch) {
  const int8_t* bj[4] = {b, b + (nr > 1 ? 1 : nr - 1) * ldb, b + (nr > 2 ? 2 : nr - 1) * ldb,
                         b + (nr > 3 ? 3 : nr - 1) * ldb};
  __m256i acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm256_setzero_si256();
  }
  int64_t k = 0;
  for (; k + 16 <= kl; k += 16) {
    if (prefetch > 0 && (k & 63) == 0)
      for (int j = 0; j < 4; ++j) __builtin_prefetch(bj[j] + k + prefetch, 0, 2);
    const __m256i v0 = load_s16(bj[0] + k), v1 = load_s16(bj[1] + k);
    const __m256i v2 = load_s16(bj[2] + k), v3 = load_s16(bj[3] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i av = load_s16(a + i * lda + k);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(av, v0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(av, v1));
      acc[i][2] = _mm256_add_epi32(acc[i][2], _mm256_madd_epi16(av, v2));
      acc[i][3] = _mm256_add_epi32(acc[i][3], _mm256_madd_epi16(av, v3));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    int32_t s[4];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s),
                     reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    const int8_t* ai = a + i * lda;
    int32_t* ci = c + i * ldc;
    for (int j = 0; j < nr; ++j) {
      for (int64_t t = k; t < kl; ++t) s[j] += int32_t{ai[t]} * int32_t{bj[j][t]};
      ci[j] = accumulate ? static_cast<int32_t>(static_cast<uint32_t>(ci[j]) +
                                                static_cast<uint32_t>(s[j]))
                         : s[j];
    }
  }
}

// float32 -> bfloat16 bits (in the low 16 bits of each int32 lane), round to
// nearest even, NaN -> 0x7FC0, as c10::BFloat16's round_to_nearest_even.
PYFAST_TARGET_AVX2 inline __m128i to_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <typename OutT>
PYFAST_TARGET_AVX2 void epilogue_avx2(const int32_t* acc, int64_t n, int32_t comp,
                                      float a_scale, const float* b_scale, const float* bias,
                                      OutT* out) {
  const __m256i vcomp = _mm256_set1_epi32(comp);
  const __m256 vas = _mm256_set1_ps(a_scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i c = _mm256_sub_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)), vcomp);
    __m256 v = _mm256_cvtepi32_ps(c);
    v = _mm256_mul_ps(v, vas);
    v = _mm256_mul_ps(v, _mm256_loadu_ps(b_scale + j));
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    if constexpr (std::is_same_v<OutT, float>) {
      _mm256_storeu_ps(out + j, v);
    } else if constexpr (std::is_same_v<OutT, c10::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), to_bf16_bits(v));
    }
  }
  for (; j < n; ++j) {
    float v = static_cast<float>(
        static_cast<int32_t>(static_cast<uint32_t>(acc[j]) - static_cast<uint32_t>(comp)));
    v = v * a_scale;
    v = v * b_scale[j];
    if (bias != nullptr) v = v + bias[j];
    out[j] = static_cast<OutT>(v);
  }
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k = {
      "avx2",
      kMrAvx2,
      {nullptr, &tile_avx2<1>, &tile_avx2<2>, nullptr, nullptr, nullptr, nullptr, nullptr,
       nullptr},
      nullptr,
      &epilogue_avx2<float>,
      &epilogue_avx2<c10::Half>,
      &epilogue_avx2<c10::BFloat16>,
  };
  return k;
}

}  // namespace int8_gemm
}  // namespace cpu
}  // namespace pyfast

#endif  // PYFAST_X86
