// AVX-512 VNNI micro-kernels of pyfast's int8 GEMM (see int8_gemm.h).
//
// vpdpbusd zmm (_mm512_dpbusd_epi32; Intel SDM vol. 2C "VPDPBUSD"): for each of
// the 16 int32 lanes, acc += sum of 4 products u8 * s8 of the lane's 4 bytes, with
// no saturation. One tile keeps MR x 4 accumulators (one zmm per output element,
// each summing 64 k per step) in registers: per step it loads 4 b rows (64 bytes
// each, flipped to unsigned with one XOR) and MR a rows, and issues 4 * MR
// vpdpbusd. At the end of the K block the 16 lanes of each accumulator are summed
// (reduce4 below). On Zen 4 a zmm vpdpbusd issues once per cycle and two 256-bit
// loads per cycle, so MR = 6 (24 accumulators, 10 loads per 24 vpdpbusd) keeps
// the multiplier busy with 30 of the 32 zmm registers live.
// Compiled with per-function target attributes only (isa.h), so the rest of the
// extension still runs on CPUs without AVX-512.
#include "int8_gemm.h"
#include "isa.h"

#if PYFAST_X86

#include <immintrin.h>

#include <type_traits>

namespace pyfast {
namespace cpu {
namespace int8_gemm {
namespace {

constexpr int kMrAvx512 = 6;

// acc += u8(u) . s8(s) (vpdpbusd), in inline assembly: GCC 12 compiles the
// _mm512_dpbusd_epi32 intrinsic with a register copy of the accumulator around
// every instruction and spills a 4 x 4 or 6 x 4 tile to the stack; the "+v"
// operand ties the accumulator to one register. AT&T order: src3, src2, dst.
PYFAST_TARGET_AVX512 inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %[s], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [s] "v"(s));
  return acc;
}

// Horizontal sums of 4 vectors: lane j of the result = sum of the 16 lanes of xj.
PYFAST_TARGET_AVX512 inline __m128i reduce4(__m512i x0, __m512i x1, __m512i x2, __m512i x3) {
  // Per 128-bit block: [x0 0+2, x1 0+2, x0 1+3, x1 1+3], and the same for x2, x3.
  const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(x0, x1),
                                       _mm512_unpackhi_epi32(x0, x1));
  const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(x2, x3),
                                       _mm512_unpackhi_epi32(x2, x3));
  // Per 128-bit block: [x0, x1, x2, x3] partial sums.
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23),
                                     _mm512_unpackhi_epi64(t01, t23));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// The accumulators are named variables, not an array: GCC keeps an array of
// 24 zmm on the stack (a load and a store around every vpdpbusd), while named
// ones it allocates to registers. PYFAST_ROW(i) is one row of a against the 4
// b vectors; rows i >= MR compile to nothing.
#define PYFAST_ROW(i, LOAD)                                \
  if constexpr (MR > i) {                                  \
    const __m512i av = LOAD;                               \
    c##i##0 = dpbusd(c##i##0, v0, av);               \
    c##i##1 = dpbusd(c##i##1, v1, av);               \
    c##i##2 = dpbusd(c##i##2, v2, av);               \
    c##i##3 = dpbusd(c##i##3, v3, av);               \
  }
#define PYFAST_ROWS(LOAD_ROW) \
  PYFAST_ROW(0, LOAD_ROW(0))  \
  PYFAST_ROW(1, LOAD_ROW(1))  \
  PYFAST_ROW(2, LOAD_ROW(2))  \
  PYFAST_ROW(3, LOAD_ROW(3))  \
  PYFAST_ROW(4, LOAD_ROW(4))  \
  PYFAST_ROW(5, LOAD_ROW(5))
#define PYFAST_STORE_ROW(i)                                              \
  if constexpr (MR > i) {                                                \
    __m128i s = reduce4(c##i##0, c##i##1, c##i##2, c##i##3);             \
    int32_t* ci = c + i * ldc;                                           \
    if (accumulate) s = _mm_add_epi32(s, _mm_maskz_loadu_epi32(store, ci)); \
    _mm_mask_storeu_epi32(ci, store, s);                                 \
  }

template <int MR>
PYFAST_TARGET_AVX512 void tile_avx512(const int8_t* a, int64_t lda, const int8_t* b,
                                      int64_t ldb, int nr, int64_t kl, int32_t* c,
                                      int64_t ldc, bool accumulate, int64_t prefetch) {
  static_assert(MR >= 1 && MR <= kMrAvx512, "MR out of range");
  // Missing b rows (nr < 4) re-read row nr - 1; their sums are not stored.
  const int8_t* b0 = b;
  const int8_t* b1 = b + (nr > 1 ? 1 : nr - 1) * ldb;
  const int8_t* b2 = b + (nr > 2 ? 2 : nr - 1) * ldb;
  const int8_t* b3 = b + (nr > 3 ? 3 : nr - 1) * ldb;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // b ^ 0x80 = b + 128
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  __m512i c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  __m512i c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  int64_t k = 0;
  for (; k + 64 <= kl; k += 64) {
    if (prefetch > 0) {
      __builtin_prefetch(b0 + k + prefetch, 0, 2);
      __builtin_prefetch(b1 + k + prefetch, 0, 2);
      __builtin_prefetch(b2 + k + prefetch, 0, 2);
      __builtin_prefetch(b3 + k + prefetch, 0, 2);
    }
    const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(b0 + k), flip);
    const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(b1 + k), flip);
    const __m512i v2 = _mm512_xor_si512(_mm512_loadu_si512(b2 + k), flip);
    const __m512i v3 = _mm512_xor_si512(_mm512_loadu_si512(b3 + k), flip);
#define PYFAST_LOAD_A(i) _mm512_loadu_si512(a + i * lda + k)
    PYFAST_ROWS(PYFAST_LOAD_A)
#undef PYFAST_LOAD_A
  }
  if (k < kl) {
    // K tail (< 64 bytes): masked loads read nothing past the rows. Masked-off
    // bytes load as 0: a = 0 there, so the product is 0 whatever b ^ 0x80 is.
    const __mmask64 m = (uint64_t{1} << (kl - k)) - 1;
    const __m512i v0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, b0 + k), flip);
    const __m512i v1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, b1 + k), flip);
    const __m512i v2 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, b2 + k), flip);
    const __m512i v3 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, b3 + k), flip);
#define PYFAST_LOAD_A(i) _mm512_maskz_loadu_epi8(m, a + i * lda + k)
    PYFAST_ROWS(PYFAST_LOAD_A)
#undef PYFAST_LOAD_A
  }
  const __mmask8 store = static_cast<__mmask8>((1u << nr) - 1);
  PYFAST_STORE_ROW(0)
  PYFAST_STORE_ROW(1)
  PYFAST_STORE_ROW(2)
  PYFAST_STORE_ROW(3)
  PYFAST_STORE_ROW(4)
  PYFAST_STORE_ROW(5)
}

#undef PYFAST_STORE_ROW
#undef PYFAST_ROWS
#undef PYFAST_ROW

// comp[m] = 128 * sum_k a[m, k]: vpdpbusd with all-ones as the unsigned operand
// sums the signed bytes 4 at a time into int32 lanes (|sum| <= 128 * K, no overflow).
PYFAST_TARGET_AVX512 void row_comp_avx512(const int8_t* a, int64_t lda, int64_t M, int64_t K,
                                          int32_t* comp) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* ar = a + m * lda;
    __m512i s = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(ar + k));
    if (k < K) {
      const __mmask64 mask = (uint64_t{1} << (K - k)) - 1;
      s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(mask, ar + k));
    }
    comp[m] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(s)) * 128u);
  }
}

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16's
// round_to_nearest_even, 16 lanes at a time.
PYFAST_TARGET_AVX512 inline __m256i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename OutT>
PYFAST_TARGET_AVX512 void epilogue_avx512(const int32_t* acc, int64_t n, int32_t comp,
                                          float a_scale, const float* b_scale,
                                          const float* bias, OutT* out) {
  const __m512i vcomp = _mm512_set1_epi32(comp);
  const __m512 vas = _mm512_set1_ps(a_scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask =
        n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    // The subtraction wraps modulo 2**32 and yields the exact int32 sum.
    const __m512i c = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(mask, acc + j), vcomp);
    __m512 v = _mm512_cvtepi32_ps(c);  // rounds to nearest even, like float(int32)
    v = _mm512_mul_ps(v, vas);
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, b_scale + j));
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + j));
    if constexpr (std::is_same_v<OutT, float>) {
      _mm512_mask_storeu_ps(out + j, mask, v);
    } else if constexpr (std::is_same_v<OutT, c10::Half>) {
      const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(out) + j, mask, h);
    } else {
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(out) + j, mask, to_bf16_bits(v));
    }
  }
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k = {
      "avx512",
      kMrAvx512,
      {nullptr, &tile_avx512<1>, &tile_avx512<2>, &tile_avx512<3>, &tile_avx512<4>,
       &tile_avx512<5>, &tile_avx512<6>, nullptr, nullptr},
      &row_comp_avx512,
      &epilogue_avx512<float>,
      &epilogue_avx512<c10::Half>,
      &epilogue_avx512<c10::BFloat16>,
  };
  return k;
}

}  // namespace int8_gemm
}  // namespace cpu
}  // namespace pyfast

#endif  // PYFAST_X86
