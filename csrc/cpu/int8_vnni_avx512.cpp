// AVX-512 VNNI tiles of the VNNI-layout int8 GEMM (int8_vnni.h), and the portable
// scalar tiles for CPUs without it.
//
// Outer product (Intel SDM vol. 2C, VPDPBUSD): per step of 4 k the tile loads the
// panel's 3 weight vectors (192 contiguous bytes: 48 columns x 4 k, flipped to
// unsigned with one XOR each) and, per row of a, broadcasts that row's 4 bytes of x to
// all 16 lanes and issues 3 vpdpbusd. Each int32 lane accumulates one output element,
// so there is no horizontal sum at the end and a is read 4 bytes per row per step.
// 8 rows: 24 accumulators + 3 weight vectors + 1 broadcast = 28 of 32 zmm registers,
// 11 loads per 24 vpdpbusd. The weight streams through each panel in order, which the
// hardware prefetchers follow (the canonical-layout kernel reads 4 separate rows).
// Compiled with per-function target attributes (isa.h), so the extension still loads
// and runs on CPUs without AVX-512.
#include "int8_vnni.h"

#include <cstring>

#include "isa.h"

#if PYFAST_X86
#include <immintrin.h>
#endif

namespace pyfast {
namespace cpu {
namespace int8_vnni {
namespace {

// The 4 bytes a[k4 * 4 .. k4 * 4 + 3] of one row as an int32, bytes at or past K read
// as 0 (the K tail; the panel's padding there is 0 too).
inline int32_t load4(const int8_t* row, int64_t k, int64_t K) {
  int32_t v = 0;
  std::memcpy(&v, row + k, static_cast<size_t>(K - k < 4 ? K - k : 4));
  return v;
}

template <int MR>
void tile_scalar(const int8_t* a, int64_t lda, int64_t K, const int8_t* panel, int32_t* c,
                 int64_t ldc) {
  for (int i = 0; i < MR; ++i) {
    uint32_t acc[kPanelN] = {};
    const int8_t* ai = a + i * lda;
    for (int64_t k = 0; k < K; ++k) {
      const int8_t* w = panel + (k / kGroupK) * kPanelN * kGroupK + k % kGroupK;
      const int32_t x = ai[k];
      for (int j = 0; j < kPanelN; ++j) {
        acc[j] += static_cast<uint32_t>(x * static_cast<int32_t>(w[j * kGroupK]));
      }
    }
    for (int j = 0; j < kPanelN; ++j) c[i * ldc + j] = static_cast<int32_t>(acc[j]);
  }
}

#if PYFAST_X86
// acc += u8(u) . s8(s) in inline assembly (see int8_gemm_avx512.cpp: GCC 12 spills
// the accumulators of the intrinsic).
PYFAST_TARGET_AVX512 inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %[s], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [s] "v"(s));
  return acc;
}

// Named accumulators, not an array (GCC keeps an array of zmm on the stack).
#define PYFAST_VROW(i, X)                                \
  if constexpr (MR > i) {                                \
    const __m512i xb = _mm512_set1_epi32(X(i));          \
    c##i##0 = dpbusd(c##i##0, v0, xb);                   \
    c##i##1 = dpbusd(c##i##1, v1, xb);                   \
    c##i##2 = dpbusd(c##i##2, v2, xb);                   \
  }
#define PYFAST_VROWS(X) \
  PYFAST_VROW(0, X) PYFAST_VROW(1, X) PYFAST_VROW(2, X) PYFAST_VROW(3, X) \
  PYFAST_VROW(4, X) PYFAST_VROW(5, X) PYFAST_VROW(6, X) PYFAST_VROW(7, X)
#define PYFAST_VSTORE(i)                                  \
  if constexpr (MR > i) {                                 \
    _mm512_storeu_si512(c + i * ldc, c##i##0);            \
    _mm512_storeu_si512(c + i * ldc + 16, c##i##1);       \
    _mm512_storeu_si512(c + i * ldc + 32, c##i##2);       \
  }

template <int MR>
PYFAST_TARGET_AVX512 void tile_avx512(const int8_t* a, int64_t lda, int64_t K,
                                      const int8_t* panel, int32_t* c, int64_t ldc) {
  static_assert(MR >= 1 && MR <= kMaxMr, "MR out of range");
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 = w + 128
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z;
  __m512i c30 = z, c31 = z, c32 = z, c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z;
  __m512i c60 = z, c61 = z, c62 = z, c70 = z, c71 = z, c72 = z;
  const int64_t full = K / kGroupK;
  const int8_t* p = panel;
  int64_t k = 0;
  for (int64_t t = 0; t < full; ++t, k += kGroupK, p += kPanelN * kGroupK) {
    const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
    const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64), flip);
    const __m512i v2 = _mm512_xor_si512(_mm512_loadu_si512(p + 128), flip);
#define PYFAST_X4(i) (*reinterpret_cast<const int32_t*>(a + (i) * lda + k))
    PYFAST_VROWS(PYFAST_X4)
#undef PYFAST_X4
  }
  if (k < K) {  // K tail: x bytes past K are 0, so the padded weight adds 0
    const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(p), flip);
    const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64), flip);
    const __m512i v2 = _mm512_xor_si512(_mm512_loadu_si512(p + 128), flip);
#define PYFAST_X4(i) load4(a + (i) * lda, k, K)
    PYFAST_VROWS(PYFAST_X4)
#undef PYFAST_X4
  }
  PYFAST_VSTORE(0) PYFAST_VSTORE(1) PYFAST_VSTORE(2) PYFAST_VSTORE(3)
  PYFAST_VSTORE(4) PYFAST_VSTORE(5) PYFAST_VSTORE(6) PYFAST_VSTORE(7)
}

#undef PYFAST_VSTORE
#undef PYFAST_VROWS
#undef PYFAST_VROW

// Decode (M = 1): one row of x times P consecutive panels, P sequential weight streams
// at once, each prefetched kDecodeAhead bytes ahead into L2. With one stream per thread
// the int8 GEMV read memory about 15% slower than the canonical kernel's 4 row streams
// (ad-hoc timing, Zen 4, 2 threads, cold 4096 x 4096 and 11008 x 4096 weights; not a
// bench result file); P = 4 with the prefetch matched it. acc[3 q + v]: columns
// 48 q + 16 v .. + 15 (an array: GCC keeps these 12 in registers after full unrolling).
template <int P>
PYFAST_TARGET_AVX512 void decode_avx512(const int8_t* x, int64_t K, const int8_t* panel,
                                        int64_t panel_bytes, int32_t* c) {
  constexpr int64_t kDecodeAhead = 4096;
  constexpr int64_t kStep = kPanelN * kGroupK;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[3 * P];
#pragma GCC unroll 12
  for (int i = 0; i < 3 * P; ++i) acc[i] = _mm512_setzero_si512();
  const int64_t steps = (K + kGroupK - 1) / kGroupK;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t k = t * kGroupK;
    const __m512i xb = _mm512_set1_epi32(k + kGroupK <= K
                                             ? *reinterpret_cast<const int32_t*>(x + k)
                                             : load4(x, k, K));
#pragma GCC unroll 4
    for (int q = 0; q < P; ++q) {
      const int8_t* p = panel + q * panel_bytes + t * kStep;
      __builtin_prefetch(p + kDecodeAhead, 0, 2);
      __builtin_prefetch(p + kDecodeAhead + 64, 0, 2);
      __builtin_prefetch(p + kDecodeAhead + 128, 0, 2);
#pragma GCC unroll 3
      for (int v = 0; v < 3; ++v) {
        acc[3 * q + v] =
            dpbusd(acc[3 * q + v], _mm512_xor_si512(_mm512_loadu_si512(p + 64 * v), flip), xb);
      }
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < P; ++q) {
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) _mm512_storeu_si512(c + q * kPanelN + 16 * v, acc[3 * q + v]);
  }
}
#endif  // PYFAST_X86

}  // namespace

const TileFn* tiles_scalar() {
  static const TileFn t[kMaxMr + 1] = {nullptr,         &tile_scalar<1>, &tile_scalar<2>,
                                       &tile_scalar<3>, &tile_scalar<4>, &tile_scalar<5>,
                                       &tile_scalar<6>, &tile_scalar<7>, &tile_scalar<8>};
  return t;
}

#if PYFAST_X86
void decode_avx512(int panels, const int8_t* x, int64_t K, const int8_t* panel,
                   int64_t panel_bytes, int32_t* c) {
  if (panels == kDecodePanels) {
    decode_avx512<kDecodePanels>(x, K, panel, panel_bytes, c);
  } else {
    for (int q = 0; q < panels; ++q) {
      decode_avx512<1>(x, K, panel + q * panel_bytes, panel_bytes, c + q * kPanelN);
    }
  }
}

const TileFn* tiles_avx512() {
  static const TileFn t[kMaxMr + 1] = {nullptr,         &tile_avx512<1>, &tile_avx512<2>,
                                       &tile_avx512<3>, &tile_avx512<4>, &tile_avx512<5>,
                                       &tile_avx512<6>, &tile_avx512<7>, &tile_avx512<8>};
  return t;
}
#endif

}  // namespace int8_vnni
}  // namespace cpu
}  // namespace pyfast
