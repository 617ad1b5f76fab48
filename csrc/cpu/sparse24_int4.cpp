// CPU kernel of pyfast_C::sparse24_int4_mm: x @ W.T + bias, W 2:4 sparse with int4 kept values.
//
//   x          : float32 / bfloat16 / float16 [M, K], any strides (converted to float32: exact)
//   packed     : uint8 [N, K/4]  int4 codes q of the K/2 kept values, low nibble = even one
//   meta       : uint8 [N, K/8]  the 2-bit index (in its group of 4) of kept value i at bits
//                                2i, 2i+1 of the row read as one little-endian integer
//   scales     : [N, G] any float dtype (used as float32); zeros: uint8 [N, G]
//   group_size : 32 / 64 / 128 dense columns per scale, or -1 (per channel, G = 1)
//   bias       : [N] any float dtype, or None
//   out        : x.dtype [M, N] = x @ W.T + bias, W[n, 4 (i / 2) + idx_i] = (q_i - zero) * scale
// Layout: pyfast/formats.py ("2:4 sparsity + int4"); oracle: pyfast/reference.py. Every
// weight value is computed as the reference does, (float(q) - float(zero)) * scale (one
// rounding); float32 accumulation; one rounding to x.dtype (bfloat16 panels: see below).
//
// Which path (a visible rule, per call; A = pyfast::cpu::active_isa()):
//   1. M > small_m_limit (32; 4 for bfloat16 x or A = scalar, as int4_mm; 32 for bfloat16
//      x on the vdpbf16ps tiles of 2, kBf16DotMaxM): each thread
//      expands panels of weight rows to dense float32 (bfloat16 for bfloat16 x, as F.linear
//      in bfloat16 rounds its weight; AVX-512: two vexpandps per 32 columns) and multiplies
//      them with at::mm (dequant_mm.h). Also x with a NaN or inf at any M: rules 2-3
//      never multiply a pruned column, the reference does (0 * inf = NaN; finite.h).
//   2. M = 1 on AVX-512 with VBMI (has_vbmi()), any float x, PYFAST_NO_INT8_SLICES unset:
//      the int8-slice kernel (sparse24_int4_slices.cpp: x in three int8 slices, the kept x
//      picked by vpermt2b, products by vpdpbusd, exact in int32), unless x has a value the
//      slices cannot hold. Measured ad hoc against the tiles below (2 threads, weights
//      rotated past the L3; not bench result files): 1.4-1.6x with float32 x, 1.2-1.3x
//      with bfloat16 x (against the vdpbf16ps tiles) at K, N in {4096, 11008}.
//   3. otherwise tiles that read only the weight's 3 bits per dense weight:
//      bfloat16 x on AVX-512 with AVX512_BF16 (PYFAST_NO_BF16DOT unset, see sparse24.cpp)
//        and K a multiple of 64: tile_bf16dot (vdpbf16ps on the raw bits; described at the
//        kernel). Measured ad hoc (2 threads, K = N = 4096, weights larger than the
//        caches; not a bench result file): M = 1 0.56-0.94 -> 0.43-0.47 ms, M = 4
//        1.0-1.5 -> 0.74-0.78 ms. Otherwise the tiles of level A:
//      AVX-512: a chunk of 32 dense columns of one weight row is 16 kept values, i.e. 8 code
//        bytes and 4 meta bytes. The codes become 16 dword lanes (nibbles split with a mask
//        and a shift, interleaved with vpunpcklbw, widened by vpmovzxbd) that index a
//        16-float table of the group's weight values (q - zero) * scale, q = 0..15, built
//        once per group and row: one vpermps dequantizes 16 weights. Lane i's x position
//        in the chunk, 4 (i / 2) + idx_i, is the meta word shifted right by 2i per lane
//        (vpsrlvd), masked to 2 bits and or-ed with a constant (one vpternlogd);
//        vpermt2ps picks those 16 x from the chunk's two zmm of x; one FMA per x row. The codes and indices are built once per weight row
//        and chunk and reused for every x row of the tile (MT <= 4).
//      AVX2 + FMA: the same on chunks of 16 dense columns (8 kept values: 4 code bytes, 2
//        meta bytes); the 8 x are two vpermps (one per 8-column half) and a blend.
//      scalar: kept value by kept value (any CPU), 32 partial sums per dot product.
//   A per-channel K that is not a multiple of the chunk ends in a scalar tail.
// Blocking as sparse24.cpp: threads split N in tiles of NT rows; each takes blocks of 64
// weight rows by a K block whose x tile (MT rows) fills about 16 KiB of L1, sweeping all M
// tiles over it, so each weight byte comes from memory once. The weight streams are
// prefetched into L2 a tile of rows ahead (at least 8 KiB), as the int4 kernels do.
//
// Threads: at::parallel_for (parallel when compiled with -fopenmp, setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../checks.h"
#include "finite.h"
#include "dequant_mm.h"
#include "sparse24_int4_slices.h"
#include "isa.h"
#include "weight_only_kernels.h"  // to_bf16, prefetch_l2

#if PYFAST_X86
#include <immintrin.h>
#endif

#define PYFAST_S24I4_INLINE inline __attribute__((always_inline))
#define PYFAST_S24I4_UNROLL _Pragma("GCC unroll 16")

namespace pyfast {
namespace cpu {
namespace {

using weight_only::prefetch_l2;

// One call's operands, as raw row-major pointers.
struct Operands {
  const float* x;         // [M, K] float32
  const uint8_t* packed;  // [N, K/4]
  const uint8_t* meta;    // [N, K/8]
  const float* scales;    // [N, G]
  const uint8_t* zeros;   // [N, G]
  int64_t K, G;
  int gshift;             // dense column k lies in group k >> gshift (63: per channel)
  float* acc;             // [M, N] float32 sums
  int64_t N;
  const uint16_t* xb;     // [M, K] bfloat16 bits (the vdpbf16ps tiles), else nullptr
};

PYFAST_S24I4_INLINE void put(float* o, float s, bool accumulate) { *o = accumulate ? *o + s : s; }

// sum over dense columns [k0, k1) (multiples of 4) of x[k] * W[n, k], kept value by kept
// value, in 32 partial sums (kept value i mod 32, as the AVX-512 tiles' 2 x 16 lanes) added
// pairwise at the end: a single running sum of K/2 products would have an error growing
// like K ulps, several times PyTorch's own.
PYFAST_S24I4_INLINE float dot_scalar(const Operands& op, const float* xr, int64_t n, int64_t k0,
                                     int64_t k1) {
  constexpr int kParts = 32;
  const uint8_t* pr = op.packed + n * (op.K / 4);
  const uint8_t* mr = op.meta + n * (op.K / 8);
  float part[kParts] = {};
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t grp = k / 4;
    const int nib = (mr[grp / 2] >> (4 * (grp & 1))) & 15;
    const int64_t g = k >> op.gshift;
    const float z = static_cast<float>(op.zeros[n * op.G + g]), s = op.scales[n * op.G + g];
    const int byte = pr[grp];  // the two kept values of group grp: low and high nibble
    float* p = part + (2 * grp) % kParts;
    // fused multiply-adds (one rounding each, as the SIMD tiles and PyTorch's GEMMs)
    p[0] = std::fma(xr[k + (nib & 3)], (static_cast<float>(byte & 15) - z) * s, p[0]);
    p[1] = std::fma(xr[k + ((nib >> 2) & 3)], (static_cast<float>(byte >> 4) - z) * s, p[1]);
  }
  for (int h = kParts / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) part[l] += part[l + h];
  return part[0];
}

template <int MT, int NT>
void tile_scalar(const Operands& op, int64_t m0, int64_t n0, int64_t k0, int64_t k1,
                 bool accumulate) {
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j)
      put(op.acc + (m0 + i) * op.N + n0 + j,
          dot_scalar(op, op.x + (m0 + i) * op.K, n0 + j, k0, k1), accumulate);
}

// Prefetch distance of the weight streams: the same offset a tile of NT rows ahead.
PYFAST_S24I4_INLINE int64_t pf_distance(int64_t row_bytes, int nt) {
  return weight_only::prefetch_distance(nt * row_bytes);
}

#if PYFAST_X86

// --- AVX-512: chunks of 32 dense columns ----------------------------------------------------

// One chunk of 32 dense columns at k for an MT x NT tile, into acc. lut[j] holds the 16
// weight values (q - zero) * scale of row n0 + j's current group, q = 0..15 (lane q), so a
// code becomes its weight with one vpermps, exactly as the reference computes it.
template <int MT, int NT>
PYFAST_TARGET_AVX512 PYFAST_S24I4_INLINE void chunk_avx512(const Operands& op, int64_t m0,
                                                          int64_t n0, int64_t k,
                                                          const __m512 (&lut)[NT],
                                                          __m512 (&acc)[MT][NT]) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
  // lane i's x offset in the chunk is 4 (i / 2) + idx_i: bits 2-4 from here, bits 0-1 idx_i
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24,
                                         28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t ldp = op.K / 4, ldm = op.K / 8;
  __m512 xl[MT], xh[MT];
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
    xl[i] = _mm512_loadu_ps(op.x + (m0 + i) * op.K + k);
    xh[i] = _mm512_loadu_ps(op.x + (m0 + i) * op.K + k + 16);
  }
  PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
    const int64_t n = n0 + j;
    const uint8_t* cp = op.packed + n * ldp + k / 4;
    const uint8_t* mp = op.meta + n * ldm + k / 8;
    if ((k & 255) == 0) prefetch_l2(cp + pf_distance(ldp, NT));  // a new line every 256 k
    if ((k & 511) == 0) prefetch_l2(mp + pf_distance(ldm, NT));
    uint64_t cb;
    std::memcpy(&cb, cp, 8);
    const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(cb));
    const __m128i q8 = _mm_unpacklo_epi8(_mm_and_si128(b, low4),
                                         _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q8), lut[j]);
    uint32_t mw;
    std::memcpy(&mw, mp, 4);
    const __m512i shifted = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(mw)), shifts);
    // (shifted & three) | base in one vpternlogd (truth table 0xEA: (A & B) | C)
    const __m512i idx = _mm512_ternarylogic_epi32(shifted, three, base, 0xEA);
    PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
      acc[i][j] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xl[i], idx, xh[i]), acc[i][j]);
  }
}

// The columns [k0, k1) group by group: the LUTs of the NT rows are rebuilt at each group.
// Tiles of up to 6 accumulators keep two sets, for even and odd chunks of a group: twice
// the independent FMA chains (a 1 x 4 tile has only 4 otherwise) and sums of half the length.
template <int MT, int NT>
PYFAST_TARGET_AVX512 void tile_avx512(const Operands& op, int64_t m0, int64_t n0, int64_t k0,
                                      int64_t k1, bool accumulate) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t kfull = k0 + (k1 - k0) / 32 * 32;
  __m512 acc0[MT][NT], acc1[MT][NT];
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      acc0[i][j] = _mm512_setzero_ps();
      acc1[i][j] = _mm512_setzero_ps();
    }
  for (int64_t k = k0; k < kfull;) {
    const int64_t g = k >> op.gshift;
    const int64_t kend = op.gshift == 63 ? kfull : std::min(kfull, (g + 1) << op.gshift);
    __m512 lut[NT];
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      const int64_t at = (n0 + j) * op.G + g;
      lut[j] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(op.zeros[at]))),
                             _mm512_set1_ps(op.scales[at]));
    }
    if constexpr (MT * NT <= 6) {  // larger tiles: 2 sets would not fit the 32 zmm registers
      for (; k + 64 <= kend; k += 64) {
        chunk_avx512<MT, NT>(op, m0, n0, k, lut, acc0);
        chunk_avx512<MT, NT>(op, m0, n0, k + 32, lut, acc1);
      }
    }
    for (; k < kend; k += 32) chunk_avx512<MT, NT>(op, m0, n0, k, lut, acc0);
  }
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
    const float* xr = op.x + (m0 + i) * op.K;
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i][j], acc1[i][j]));
      if (kfull < k1) s += dot_scalar(op, xr, n0 + j, kfull, k1);
      put(op.acc + (m0 + i) * op.N + n0 + j, s, accumulate);
    }
  }
}

// --- AVX-512 + AVX512_BF16, bfloat16 x: chunks of 64 dense columns ---------------------------
//
// A chunk of 64 dense columns of one weight row is 32 kept values: 16 code bytes (byte j =
// the two kept values of group of 4 j) and 8 meta bytes. Dword lane j of vpmovzxbd holds
// byte j; (d | d << 12) & 0x000F000F puts its low code in the low word and its high code in
// the high word, the pair order of vdpbf16ps. One vpermw of a 32-word table turns each code
// into the bfloat16 of q - zero (exact: |q - zero| <= 15); with group 32 the chunk spans two
// groups, so lanes 8-15 add 16 to their words and read the table's upper half. Kept value
// i's x is column 4 (i / 2) + idx_i of the chunk: word i / 8 of the meta, shifted right by
// 2 (i % 8), masked to 2 bits, or-ed with 4 (i / 2); one vpermt2w picks the 32 x from the
// chunk's two zmm of x. vdpbf16ps multiplies exactly (bfloat16 x bfloat16 fits float32) and
// sums the pair into a float32 lane; one FMA per chunk applies the lanes' scales. The
// instruction treats subnormal inputs and results as zero (Intel SDM, VDPBF16PS).
struct Bf16Consts {
  alignas(64) uint16_t word[32], shift[32], base[32];
  alignas(64) uint16_t table[16][16];  // table[z][q] = bfloat16(q - z), exact (|q - z| <= 15)
  Bf16Consts() {
    for (int i = 0; i < 32; ++i) {
      word[i] = static_cast<uint16_t>(i / 8);
      shift[i] = static_cast<uint16_t>(2 * (i % 8));
      base[i] = static_cast<uint16_t>(4 * (i / 2));
    }
    for (int z = 0; z < 16; ++z)
      for (int q = 0; q < 16; ++q) table[z][q] = weight_only::to_bf16(static_cast<float>(q - z));
  }
};
const Bf16Consts kBf16;

// One chunk's vdpbf16ps products for the NT weight rows, into part[MT][NT] (added).
// table[j] / the words' group bit as described above; x chunks xl/xh of the MT x rows.
template <int MT, int NT>
PYFAST_TARGET_AVX512_BF16 PYFAST_S24I4_INLINE void chunk_bf16dot(
    const Operands& op, int64_t n0, int64_t k, const __m512i (&table)[NT], bool two_groups,
    const __m512i (&xl)[MT], const __m512i (&xh)[MT], __m512 (&part)[MT][NT]) {
  const __m512i word = _mm512_load_si512(kBf16.word), shift = _mm512_load_si512(kBf16.shift);
  const __m512i base = _mm512_load_si512(kBf16.base), three = _mm512_set1_epi16(3);
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  const __m512i upper = _mm512_mask_set1_epi32(_mm512_setzero_si512(), 0xFF00, 0x00100010);
  const int64_t ldp = op.K / 4, ldm = op.K / 8;
  PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
    const uint8_t* cp = op.packed + (n0 + j) * ldp + k / 4;
    const uint8_t* mp = op.meta + (n0 + j) * ldm + k / 8;
    if ((k & 255) == 0) prefetch_l2(cp + pf_distance(ldp, NT));  // a new line every 256 k
    if ((k & 511) == 0) prefetch_l2(mp + pf_distance(ldm, NT));
    const __m512i d =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp)));
    // (d | d << 12) & nib (truth table 0xA8: (A | B) & C), then | upper (two groups)
    __m512i q = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nib, 0xA8);
    if (two_groups) q = _mm512_or_si512(q, upper);
    const __m512i w = _mm512_permutexvar_epi16(q, table[j]);
    const __m512i mw =
        _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mp)));
    const __m512i sh = _mm512_srlv_epi16(_mm512_permutexvar_epi16(word, mw), shift);
    const __m512i idx = _mm512_ternarylogic_epi32(sh, three, base, 0xEA);  // (A & B) | C
    PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
      part[i][j] = _mm512_dpbf16_ps(part[i][j],
                                    (__m512bh)_mm512_permutex2var_epi16(xl[i], idx, xh[i]),
                                    (__m512bh)w);
  }
}

// The 32-word table of row n's groups a (words 0-15) and b (words 16-31).
PYFAST_TARGET_AVX512_BF16 PYFAST_S24I4_INLINE __m512i bf16_table(const Operands& op, int64_t a,
                                                                 int64_t b) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(kBf16.table[op.zeros[a]]))),
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kBf16.table[op.zeros[b]])), 1);
}

// Columns [k0, k1) (multiples of 64) group by group: with groups of 64 columns or more the
// products of a group's chunks are summed before one FMA by its scale; with groups of 32 a
// chunk holds two groups and is scaled lane by lane (lanes 0-7 / 8-15).
template <int MT, int NT>
PYFAST_TARGET_AVX512_BF16 void tile_bf16dot(const Operands& op, int64_t m0, int64_t n0,
                                            int64_t k0, int64_t k1, bool accumulate) {
  __m512 tot[MT][NT];
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) tot[i][j] = _mm512_setzero_ps();
  const bool two_groups = op.gshift == 5;
  for (int64_t k = k0; k < k1;) {
    const int64_t g = k >> op.gshift, g_hi = (k + 32) >> op.gshift;  // lanes 0-7 / 8-15
    const int64_t kend =
        two_groups ? k + 64 : op.gshift == 63 ? k1 : std::min(k1, (g + 1) << op.gshift);
    __m512i table[NT];
    __m512 scale[NT];
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      const int64_t a = (n0 + j) * op.G + g, b = (n0 + j) * op.G + g_hi;
      table[j] = bf16_table(op, a, b);
      scale[j] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(op.scales[a]),
                                      _mm512_set1_ps(op.scales[b]));
    }
    __m512 part[MT][NT];
    PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
      PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) part[i][j] = _mm512_setzero_ps();
    for (; k < kend; k += 64) {
      __m512i xl[MT], xh[MT];
      PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
        xl[i] = _mm512_loadu_si512(op.xb + (m0 + i) * op.K + k);
        xh[i] = _mm512_loadu_si512(op.xb + (m0 + i) * op.K + k + 32);
      }
      chunk_bf16dot<MT, NT>(op, n0, k, table, two_groups, xl, xh, part);
    }
    PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
      PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j)
        tot[i][j] = _mm512_fmadd_ps(part[i][j], scale[j], tot[i][j]);
  }
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j)
      put(op.acc + (m0 + i) * op.N + n0 + j, _mm512_reduce_add_ps(tot[i][j]), accumulate);
}

// --- AVX2 + FMA: chunks of 16 dense columns -------------------------------------------------

template <int MT, int NT>
PYFAST_TARGET_AVX2 void tile_avx2(const Operands& op, int64_t m0, int64_t n0, int64_t k0,
                                  int64_t k1, bool accumulate) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t ldp = op.K / 4, ldm = op.K / 8;
  const int64_t pf_p = pf_distance(ldp, NT), pf_m = pf_distance(ldm, NT);
  const int64_t kfull = k0 + (k1 - k0) / 16 * 16;
  __m256 acc[MT][NT];
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i)
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = k0; k < kfull; k += 16) {
    __m256 xl[MT], xh[MT];
    PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
      xl[i] = _mm256_loadu_ps(op.x + (m0 + i) * op.K + k);
      xh[i] = _mm256_loadu_ps(op.x + (m0 + i) * op.K + k + 8);
    }
    const int64_t g = k >> op.gshift;
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      const int64_t n = n0 + j;
      const uint8_t* cp = op.packed + n * ldp + k / 4;
      const uint8_t* mp = op.meta + n * ldm + k / 8;
      if ((k & 255) == 0) prefetch_l2(cp + pf_p);
      if ((k & 511) == 0) prefetch_l2(mp + pf_m);
      uint32_t cb;
      std::memcpy(&cb, cp, 4);
      const __m128i b = _mm_cvtsi32_si128(static_cast<int>(cb));
      const __m128i q8 = _mm_unpacklo_epi8(_mm_and_si128(b, low4),
                                           _mm_and_si128(_mm_srli_epi16(b, 4), low4));
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
      const __m256 z = _mm256_set1_ps(static_cast<float>(op.zeros[n * op.G + g]));
      const __m256 w = _mm256_mul_ps(_mm256_sub_ps(q, z), _mm256_set1_ps(op.scales[n * op.G + g]));
      uint16_t mw;
      std::memcpy(&mw, mp, 2);
      // lanes 0-3 (groups 0, 1) index x[k, k+8), lanes 4-7 x[k+8, k+16); vpermps reads the
      // low 3 bits of each index, so idx - 8 needs no correction
      const __m256i idx = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(mw), shifts), three), base);
      PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
        const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(xl[i], idx),
                                          _mm256_permutevar8x32_ps(xh[i], idx), 0xF0);
        acc[i][j] = _mm256_fmadd_ps(w, xg, acc[i][j]);
      }
    }
  }
  PYFAST_S24I4_UNROLL for (int i = 0; i < MT; ++i) {
    const float* xr = op.x + (m0 + i) * op.K;
    PYFAST_S24I4_UNROLL for (int j = 0; j < NT; ++j) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      v = _mm_add_ss(v, _mm_movehdup_ps(v));
      float s = _mm_cvtss_f32(v);
      if (kfull < k1) s += dot_scalar(op, xr, n0 + j, kfull, k1);
      put(op.acc + (m0 + i) * op.N + n0 + j, s, accumulate);
    }
  }
}

#endif  // PYFAST_X86

// --- the blocked driver ---------------------------------------------------------------------

using TileFn = void (*)(const Operands&, int64_t m0, int64_t n0, int64_t k0, int64_t k1,
                        bool accumulate);

// full[mt - 1]: an mt x nt tile; narrow[mt - 1]: mt x 1 (the last < nt rows of W).
struct Tiles {
  int mt, nt;
  TileFn full[4];
  TileFn narrow[4];
};

template <template <int, int> class T, int MT, int NT>
Tiles make_tiles() {
  static_assert(MT >= 1 && MT <= 4, "1..4 rows of x per tile");
  Tiles t{MT, NT, {}, {}};
  t.full[0] = &T<1, NT>::run;
  t.narrow[0] = &T<1, 1>::run;
  if constexpr (MT >= 2) t.full[1] = &T<2, NT>::run, t.narrow[1] = &T<2, 1>::run;
  if constexpr (MT >= 3) t.full[2] = &T<3, NT>::run, t.narrow[2] = &T<3, 1>::run;
  if constexpr (MT >= 4) t.full[3] = &T<4, NT>::run, t.narrow[3] = &T<4, 1>::run;
  return t;
}

template <int MT, int NT>
struct ScalarT {
  static void run(const Operands& op, int64_t m0, int64_t n0, int64_t k0, int64_t k1, bool a) {
    tile_scalar<MT, NT>(op, m0, n0, k0, k1, a);
  }
};

#if PYFAST_X86
template <int MT, int NT>
struct Avx512T {
  static void run(const Operands& op, int64_t m0, int64_t n0, int64_t k0, int64_t k1, bool a) {
    tile_avx512<MT, NT>(op, m0, n0, k0, k1, a);
  }
};

template <int MT, int NT>
struct Bf16DotT {
  static void run(const Operands& op, int64_t m0, int64_t n0, int64_t k0, int64_t k1, bool a) {
    tile_bf16dot<MT, NT>(op, m0, n0, k0, k1, a);
  }
};

template <int MT, int NT>
struct Avx2T {
  static void run(const Operands& op, int64_t m0, int64_t n0, int64_t k0, int64_t k1, bool a) {
    tile_avx2<MT, NT>(op, m0, n0, k0, k1, a);
  }
};
#endif

// M = 1: 4 weight rows per tile (4 independent FMA chains; the weight rows are the work).
// M > 1: up to 4 x rows by 3 weight rows (AVX-512: 12 accumulators + 8 x registers;
// AVX2 has 16 ymm: 2 x 3). Scalar: 4 x 4.
Tiles tiles_for(Isa isa, int64_t M) {
#if PYFAST_X86
  if (isa == Isa::kAvx512) return M == 1 ? make_tiles<Avx512T, 1, 4>() : make_tiles<Avx512T, 4, 3>();
  if (isa == Isa::kAvx2) return M == 1 ? make_tiles<Avx2T, 1, 4>() : make_tiles<Avx2T, 2, 3>();
#endif
  return make_tiles<ScalarT, 4, 4>();
}

constexpr int64_t kNBlock = 64;             // weight rows per block
constexpr int64_t kXTileBytes = 16 * 1024;  // the x tile of one K block: half of L1d

// acc[M, N] = x @ W.T, tile by tile (loop order in the header).
void run_blocked(const Tiles& t, const Operands& op, int64_t M) {
  const int64_t mt = std::min<int64_t>(t.mt, M), N = op.N, K = op.K;
  // K block: multiples of 32 columns (every chunk width), so only the last block has a tail
  const int64_t kb = std::max<int64_t>(32, kXTileBytes / (mt * 4) / 32 * 32);
  const int64_t units = (N + t.nt - 1) / t.nt;
  // About 64k multiply-adds per task at least, so tiny calls stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * (K / 2) * t.nt));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t n_begin = u0 * t.nt, n_end = std::min(N, u1 * t.nt);
    for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += kNBlock) {
      const int64_t nb1 = std::min(n_end, nb0 + kNBlock);
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
        for (int64_t m0 = 0; m0 < M; m0 += mt) {
          const int64_t rows = std::min(mt, M - m0);
          int64_t n = nb0;
          for (; n + t.nt <= nb1; n += t.nt) t.full[rows - 1](op, m0, n, k0, k1, k0 > 0);
          for (; n < nb1; ++n) t.narrow[rows - 1](op, m0, n, k0, k1, k0 > 0);
        }
      }
    }
  });
}

// --- large M: dense panels + at::mm ---------------------------------------------------------

// Row n's dense weight, dequantized and expanded (zeros at the pruned columns), into
// d[k0, K) (k0 a multiple of 4), kept value by kept value.
template <typename Out, typename Cvt>
void expand_row_scalar(const Operands& op, int64_t n, int64_t k0, Out* d, Cvt cvt) {
  const int64_t K = op.K;
  const uint8_t* pr = op.packed + n * (K / 4);
  const uint8_t* mr = op.meta + n * (K / 8);
  std::fill(d + k0, d + K, cvt(0.0f));
  for (int64_t grp = k0 / 4; grp < K / 4; ++grp) {
    const int nib = (mr[grp / 2] >> (4 * (grp & 1))) & 15;
    const int64_t g = (4 * grp) >> op.gshift;
    const float z = static_cast<float>(op.zeros[n * op.G + g]), s = op.scales[n * op.G + g];
    d[4 * grp + (nib & 3)] = cvt((static_cast<float>(pr[grp] & 15) - z) * s);
    d[4 * grp + ((nib >> 2) & 3)] = cvt((static_cast<float>(pr[grp] >> 4) - z) * s);
  }
}

#if PYFAST_X86
// kKept.m[b]: the kept positions of the two groups of a meta byte b as an 8-bit mask
// (bit 4h + idx for group h = 0, 1 of the byte).
struct KeptMasks {
  uint8_t m[256];
  constexpr KeptMasks() : m() {
    for (int b = 0; b < 256; ++b)
      m[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) |
                                  (1 << (4 + ((b >> 4) & 3))) | (1 << (4 + ((b >> 6) & 3))));
  }
};
constexpr KeptMasks kKept{};

// The same as expand_row_scalar in float32, 32 columns per step: the 16 kept values
// dequantized by the table permute (as in the tiles), then placed by two vexpandps with
// the chunk's kept-position masks (the format keeps each group's values in increasing k
// order, the order vexpandps fills the set bits; a meta byte that breaks the format
// gives unspecified values, never an access outside the row).
PYFAST_TARGET_AVX512 void expand_row_avx512(const Operands& op, int64_t n, float* d) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t K = op.K, kfull = K / 32 * 32;
  const uint8_t* pr = op.packed + n * (K / 4);
  const uint8_t* mr = op.meta + n * (K / 8);
  int64_t current = -1;
  __m512 lut = _mm512_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 32) {
    const int64_t g = k >> op.gshift;
    if (g != current) {
      const int64_t at = n * op.G + g;
      lut = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(op.zeros[at]))),
                          _mm512_set1_ps(op.scales[at]));
      current = g;
    }
    uint64_t cb;
    std::memcpy(&cb, pr + k / 4, 8);
    const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(cb));
    const __m128i q8 = _mm_unpacklo_epi8(_mm_and_si128(b, low4),
                                         _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q8), lut);
    const uint8_t* m = mr + k / 8;
    const __mmask16 lo = static_cast<__mmask16>(kKept.m[m[0]] | (kKept.m[m[1]] << 8));
    const __mmask16 hi = static_cast<__mmask16>(kKept.m[m[2]] | (kKept.m[m[3]] << 8));
    _mm512_storeu_ps(d + k, _mm512_maskz_expand_ps(lo, w));
    _mm512_storeu_ps(d + k + 16, _mm512_maskz_expand_ps(hi, _mm512_shuffle_f32x4(w, w, 0xEE)));
  }
  if (kfull < K) expand_row_scalar(op, n, kfull, d, [](float v) { return v; });
}
#endif

// dense[r, :] = weight row n0 + r for r < n1 - n0, as float32 or bfloat16 bits.
void expand_rows_f32(const Operands& op, Isa isa, int64_t n0, int64_t n1, float* dense) {
  for (int64_t n = n0; n < n1; ++n) {
#if PYFAST_X86
    if (isa == Isa::kAvx512) {
      expand_row_avx512(op, n, dense + (n - n0) * op.K);
      continue;
    }
#endif
    expand_row_scalar(op, n, 0, dense + (n - n0) * op.K, [](float v) { return v; });
  }
}

void expand_rows_bf16(const Operands& op, Isa isa, int64_t n0, int64_t n1, uint16_t* dense) {
  std::vector<float> row(op.K);
  for (int64_t n = n0; n < n1; ++n) {
    expand_rows_f32(op, isa, n, n + 1, row.data());
    uint16_t* d = dense + (n - n0) * op.K;
    for (int64_t k = 0; k < op.K; ++k) d[k] = weight_only::to_bf16(row[k]);
  }
}

// Largest M of the vdpbf16ps tiles (bfloat16 x): they beat the bfloat16 panels + oneDNN
// up to about M = 48 on this Zen 4 (measured ad hoc, 2 threads, 4096x4096: M = 16 2.6 ms
// against 6.0, M = 32 5.1 against 7.2, M = 64 10.3 against 9.4; not a bench result file).
constexpr int64_t kBf16DotMaxM = 32;

#if PYFAST_X86
// out = x @ W.T + bias at M = 1 by the int8-slice kernel (sparse24_int4_slices.cpp), or
// false when x has a value the slices cannot hold (non-finite, or a nonzero lane below
// 2^-64): the tiles run then.
bool m1_slices_path(const at::Tensor& x_in, const Operands& op, int64_t N, const float* bp,
                    at::Tensor& out) {
  const int64_t K = op.K;
  const at::Tensor xf = x_in.to(at::kFloat).contiguous();  // exact widening
  at::Tensor xs = at::empty({(K + 127) / 128 * s24i4::kXBlockBytes}, xf.options().dtype(at::kByte));
  uint8_t* xsp = xs.mutable_data_ptr<uint8_t>();
  if (!s24i4::x_slices(xf.const_data_ptr<float>(), K, xsp)) return false;
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({1, N}, xf.options());
  const s24i4::Weight w{op.packed, op.meta, op.scales, op.zeros, N, K, op.G, op.gshift};
  float* ap = acc.mutable_data_ptr<float>();
  // units of 2 rows (the kernel's pairs); as int4_mm's split_n, at least about 64 KiB of
  // weight work per thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (2 * K));
  at::parallel_for(0, (N + 1) / 2, grain, [&](int64_t u0, int64_t u1) {
    s24i4::m1_slices(xsp, w, 2 * u0, std::min(N, 2 * u1), ap);
  });
  dequant_mm::finish_f32(acc, bp, out);
  return true;
}
#endif

int64_t small_m_limit(at::ScalarType x_dtype, Isa isa) {
  if (isa == Isa::kScalar) return 4;
  return x_dtype == at::kBFloat16 ? 4 : 32;
}

at::Tensor sparse24_int4_mm_cpu(const at::Tensor& x_in, const at::Tensor& packed_in,
                                const at::Tensor& meta_in, const at::Tensor& scales_in,
                                const at::Tensor& zeros_in, int64_t group_size,
                                const std::optional<at::Tensor>& bias) {
  using namespace dequant_mm;
  check_x(x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const int64_t G = check_int4_groups(
      group_size, K, 8, "2:4 + int4 needs K a multiple of 8 (two groups of 4 per meta byte)");
  check_device(packed_in, "packed", at::kCPU);
  check_dtype(packed_in, "packed", {at::kByte});
  check_dim(packed_in, "packed", 2);
  const int64_t N = packed_in.size(0);
  check_size(packed_in, "packed", 1, K / 4, "x.size(1) / 4 = K/4");
  check_device(meta_in, "meta", at::kCPU);
  check_dtype(meta_in, "meta", {at::kByte});
  check_dim(meta_in, "meta", 2);
  check_size(meta_in, "meta", 0, N, "packed.size(0) = N");
  check_size(meta_in, "meta", 1, K / 8, "x.size(1) / 8 = K/8");
  check_group_params(scales_in, zeros_in, N, G);
  const at::Tensor b = bias_f32(bias, N, "packed.size(0) = N");
  const float* bp = ptr_or_null(b);

  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return b.defined() ? out.copy_(b.expand({M, N})) : out.zero_();  // empty sum
  const at::Tensor packed = packed_in.contiguous(), meta = meta_in.contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous(), zeros = zeros_in.contiguous();
  const int gshift = group_size == -1 ? 63 : (group_size == 32 ? 5 : group_size == 64 ? 6 : 7);
  Operands op{nullptr, packed.const_data_ptr<uint8_t>(), meta.const_data_ptr<uint8_t>(),
              scales.const_data_ptr<float>(), zeros.const_data_ptr<uint8_t>(), K, G, gshift,
              nullptr, N, nullptr};
  const Isa isa = active_isa();

#if PYFAST_X86
  const bool bf16_tiles = x_in.scalar_type() == at::kBFloat16 && isa == Isa::kAvx512 &&
                          has_bf16_dot() && K % 64 == 0;
#else
  const bool bf16_tiles = false;
#endif
  if (M > (bf16_tiles ? kBf16DotMaxM : small_m_limit(x_in.scalar_type(), isa)) ||
      !all_finite(x_in.contiguous())) {  // NaN / inf: see rule 1 and finite.h
    auto dq_f32 = [&](int64_t n0, int64_t n1, float* d) { expand_rows_f32(op, isa, n0, n1, d); };
    auto dq_bf16 = [&](int64_t n0, int64_t n1, uint16_t* d) {
      expand_rows_bf16(op, isa, n0, n1, d);
    };
    return panel_path(x_in, N, bp, out, dq_f32, dq_bf16);
  }

#if PYFAST_X86
  // 2a. M = 1, AVX-512 with VBMI, any float x: the int8-slice kernel, unless
  //     PYFAST_NO_INT8_SLICES is set (as for int4_mm) or x cannot be held in slices.
  if (M == 1 && isa == Isa::kAvx512 && has_vbmi() &&
      std::getenv("PYFAST_NO_INT8_SLICES") == nullptr &&
      m1_slices_path(x_in, op, N, bp, out))
    return out;
  // 2b. bfloat16 x, AVX-512 with AVX512_BF16, K a multiple of the 64-column chunk: the
  //     vdpbf16ps tiles on the raw bfloat16 bits.
  if (bf16_tiles) {
    const at::Tensor xb = x_in.contiguous();
    at::Tensor acc = at::empty({M, N}, xb.options().dtype(at::kFloat));
    op.xb = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
    op.acc = acc.mutable_data_ptr<float>();
    run_blocked(M == 1 ? make_tiles<Bf16DotT, 1, 4>() : make_tiles<Bf16DotT, 4, 3>(), op, M);
    finish_f32(acc, bp, out);
    return out;
  }
#endif
  const at::Tensor xf = x_in.to(at::kFloat).contiguous();  // exact widening
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, xf.options());
  op.x = xf.const_data_ptr<float>();
  op.acc = acc.mutable_data_ptr<float>();
  run_blocked(tiles_for(isa, M), op, M);
  finish_f32(acc, bp, out);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float32/bfloat16/float16 [M, K] (any strides, K % 8 == 0), packed uint8 [N, K/4],
  // meta uint8 [N, K/8], scales [N, G] float, zeros uint8 [N, G], group_size 32/64/128/-1,
  // bias [N] any float dtype or None -> out x.dtype [M, N] = x @ W.T + bias (2:4 + int4
  // layout of pyfast/formats.py); float32 accumulation.
  m.def("sparse24_int4_mm(Tensor x, Tensor packed, Tensor meta, Tensor scales, Tensor zeros, "
        "int group_size, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("sparse24_int4_mm", &pyfast::cpu::sparse24_int4_mm_cpu);
}
