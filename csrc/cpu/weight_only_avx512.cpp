// AVX-512 kernels of int8_weight_mm / int4_mm for small M (see weight_only.h).
//
// A tile is MR activation rows x NR weight rows over the whole K; its MR * NR
// float32 accumulators are zmm registers (16 lanes each, summed across lanes at
// the end). Each weight vector is dequantized once per tile and used by all MR
// rows, so for M <= 8 the weight is read from memory exactly once.
//
// int8: 16 bytes -> vpmovsxbd (16 x int32) -> vcvtdq2ps -> FMA with x; the row
//   sum is multiplied by scale[n] at the end (reference: (x @ w.T) * scale).
// int4: one 64-byte load per row per block of 128 k, each nibble turned into a
//   float by vpternlogd + vsubps ("magic exponent", no shuffle; see int4_rows_m1),
//   with x stored in the matching block order (int4_small_layout). M = 1 runs one
//   row at a time (one sequential weight stream per thread).
//   The panel dequant at the end of the file (large M) still uses a 16-entry table
//   per (row, group) and vpermps, storing (q - zero) * scale bit-identical to the
//   reference's weight.
// K tails (K not a multiple of 16 / 32) use masked loads; masked-off weight lanes
// are zeroed so padding never meets a non-finite table entry.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include <c10/util/Exception.h>

#include "weight_only_kernels.h"
#include "weight_only_lanes.h"

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

// --- int4, small M: dequantization without shuffles ("magic exponent") ----------------
//
// Layout: x in blocks of 128 k, 16 lanes x 8 nibble positions (int4_small_layout):
//   xp[b*128 + p*16 + i] = x[b*128 + 8i + p]
// and one 64-byte load of a weight row per block: 16 dwords, dword i = packed bytes
// 4i..4i+3 = k 8i..8i+7, its nibble p (bits 4p..4p+3) = k 8i + p (canonical packing,
// low nibble = even k). So the vector of nibble p lines up with x block row p.
//
// A nibble becomes a float with one vpternlogd and one subtraction: at nibble
// position t (bits 4t..4t+3, t <= 4), (d & (15 << 4t)) | bits(2^E) with E = 23 - 4t
// is the float 2^E + q exactly (the nibble lands in the mantissa at weight
// 2^(E - 23 + 4t) = 1), and (2^E + q) - (2^E + 8) = q - 8 exactly. Only positions
// 2..4 are used, so that the nine constants stay in registers: nibbles 2..4 are read
// in place, nibbles 0, 1 after one shift left by 8 and nibbles 5..7 after one shift
// right by 12. Per 16 weights: vpternlogd, vsubps, one FMA per x row.
// Why not the table lookup of the panel dequant below (vpmovzxbd + 2 vpermps per 32
// weights): on Zen 4 a zmm shuffle issues once per cycle and this loop was
// shuffle-bound; logic, subtraction and FMA together issue about 1.5 zmm ops per
// cycle (measured in isolation). Measured ad hoc (not a bench result file), one
// core, weights in L2, M = 1: about 16 -> 20 G weights/s with the exact zero point.
//
// The zero point is subtracted exactly in the same vsubps: (2^E + q) - (2^E + z) =
// q - z, with 2^E + z built once per block (splitting the sum around a fixed zero
// point instead cancels badly when z is far from it: measured, a per-channel row
// with z = 0..15 failed the reference tolerance).
// Scales and zeros per lane: lane i of block b belongs to group (128b + 8i) / group.

// The mask / magic / subtrahend constants of nibble positions 2..4 (indices 0, 1
// unused): three positions only, so that all nine constants stay in registers (with
// five, GCC 12 re-broadcasts some inside the loop).
struct MagicConsts {
  __m512i mask[5], magic[5];
  __m512 base[5];  // 2^E
};

PYFAST_TARGET_AVX512 inline void make_magic(MagicConsts& c) {
  for (int p = 2; p < 5; ++p) {
    const float e = static_cast<float>(1 << (23 - 4 * p));
    c.mask[p] = _mm512_set1_epi32(15 << (4 * p));
    c.magic[p] = _mm512_castps_si512(_mm512_set1_ps(e));
    c.base[p] = _mm512_set1_ps(e);
  }
}

// q - z of nibble position `pos` of d; sub[pos] = 2^E + z per lane (block_subs).
PYFAST_TARGET_AVX512 inline __m512 nibble(const MagicConsts& c, const __m512* sub, __m512i d,
                                          int pos) {
  // 0xEA: (A & B) | C, with A = d, B = mask, C = magic
  const __m512i f = _mm512_ternarylogic_epi32(d, c.mask[pos], c.magic[pos], 0xEA);
  return _mm512_sub_ps(_mm512_castsi512_ps(f), sub[pos]);
}

PYFAST_TARGET_AVX512 inline __m512 block_scales(const Int4Weight& w, int64_t n, int64_t b) {
  return per_lane(w.scales + n * w.ldg, w, b);
}

// The subtrahends 2^E + z of positions 2..4 for block b of row n, z per lane
// (exact: z <= 15, E >= 15).
PYFAST_TARGET_AVX512 inline void block_subs(const MagicConsts& c, const Int4Weight& w,
                                            int64_t n, int64_t b, __m512* sub) {
  const __m512 zf = per_lane(w.zeros + n * w.ldg, w, b);
  for (int p = 2; p < 5; ++p) sub[p] = _mm512_add_ps(c.base[p], zf);
}

// M = 1 where the int8-slice kernel (weight_only_slices.cpp, which replaced this one at
// M = 1 because of the cost below) does not run: x it cannot represent, or
// PYFAST_NO_INT8_SLICES set. The x vector is read 8 times per 64 weight bytes, so it
// must stay in L1: K is cut into chunks of kChunkBlocks blocks (4096 k, 16 KiB of x) and a group of
// kRowGroup rows is swept chunk by chunk (rows one at a time, so that the weight is
// read in long runs; without chunks, K = 11008 read x from L2 and ran at half
// speed). While it reads a row segment, it prefetches the segment read next (the
// next row's, or the next chunk's first row) into L2: the hardware prefetcher stops
// at every 4 KiB page. Per block: two accumulator chains, then one FMA by the lane
// scales.
// Why this stays near pyfast W8A8's speed at M = 1 (measured ad hoc on one core in a
// standalone copy of this loop, weights in L2, group 128; not bench result files): about
// 21 cycles per block of 128 weights, close to its ~39 zmm instructions at two per cycle
// (Zen 4 issues a 512-bit op as two 256-bit halves): two cores then need ~0.45 ms for
// 4096 x 4096, against the ~0.35 ms of 1.6x W8A8. Variants tried: some q - zero
// subtractions on the FMA pipe (vfmsub by 1.0), 22 cycles; four accumulator chains, 23;
// two weight rows interleaved, 21; x split exactly into three bfloat16 parts with
// q - zero as exact bfloat16 from one vpermw per 32 weights and 12 vdpbf16ps per block,
// 25 (vdpbf16ps and vpermw share a pipe); the nibble at the top of the mantissa (1 + q/16)
// with the zero point removed per lane afterwards, 18.5 but 2.3x the error, not used.
constexpr int64_t kChunkBlocks = 32;
constexpr int64_t kRowGroup = 8;

PYFAST_TARGET_AVX512 void int4_rows_m1(const float* x, const Int4Weight& w,
                                       int64_t n0, int64_t n1, float* out) {
  MagicConsts c;
  make_magic(c);
  const int64_t half = w.K / 2, blocks = (half + 63) / 64;
  for (int64_t n = n0; n < n1; n += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, n1 - n);
    __m512 tot[kRowGroup];
    for (int64_t r = 0; r < rows; ++r) tot[r] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
      const int64_t b1 = std::min(blocks, b0 + kChunkBlocks);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = w.packed + (n + r) * half;
        const uint8_t* next = r + 1 < rows ? row + half + 64 * b0
                              : b1 < blocks ? w.packed + n * half + 64 * b1
                                            : w.packed + (n + rows) * half;
        __m512 t = tot[r];
        for (int64_t b = b0; b < b1; ++b) {
          prefetch_l2(next + 64 * (b - b0));
          __m512 sub[5];
          block_subs(c, w, n + r, b, sub);
          const __m512i d = load_block(row, b, half);
          const __m512i d0 = _mm512_slli_epi32(d, 8), d2 = _mm512_srli_epi32(d, 12);
          const float* xb = x + 128 * b;
          __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(xb), nibble(c, sub, d0, 2));
          __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(xb + 16), nibble(c, sub, d0, 3));
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 32), nibble(c, sub, d, 2), a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 48), nibble(c, sub, d, 3), a1);
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 64), nibble(c, sub, d, 4), a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 80), nibble(c, sub, d2, 2), a1);
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 96), nibble(c, sub, d2, 3), a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 112), nibble(c, sub, d2, 4), a1);
          t = _mm512_fmadd_ps(block_scales(w, n + r, b), _mm512_add_ps(a0, a1), t);
        }
        tot[r] = t;
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      out[n + r] = _mm512_reduce_add_ps(tot[r]);
  }
}

// M > 1: a tile of MR x rows times NR weight rows. The nibble vectors of a row are
// scaled once (lane scales folded in) and used by all MR x rows.
template <int MR, int NR>
PYFAST_TARGET_AVX512 void int4_tile(const float* x, int64_t ldx, const Int4Weight& w,
                                    int64_t n, float* out, int64_t ldo) {
  MagicConsts c;
  make_magic(c);
  const int64_t half = w.K / 2, blocks = (half + 63) / 64;
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = w.packed + (n + r) * half;
  const int64_t ahead = prefetch_distance(NR * half);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i d0[NR], d[NR], d2[NR];
    __m512 s[NR], sub[NR][5];
    for (int r = 0; r < NR; ++r) {
      prefetch_l2(rows[r] + 64 * b + ahead);
      d[r] = load_block(rows[r], b, half);
      d0[r] = _mm512_slli_epi32(d[r], 8);
      d2[r] = _mm512_srli_epi32(d[r], 12);
      s[r] = block_scales(w, n + r, b);
      block_subs(c, w, n + r, b, sub[r]);
    }
    const float* xb = x + 128 * b;
    for (int p = 0; p < 8; ++p) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm512_mul_ps(
            p < 2   ? nibble(c, sub[r], d0[r], p + 2)
            : p < 5 ? nibble(c, sub[r], d[r], p)
                    : nibble(c, sub[r], d2[r], p - 3),
            s[r]);
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_loadu_ps(xb + m * ldx + 16 * p);
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r)
      out[m * ldo + n + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int NR, int MAX_MR>
void int4_run_tile(int mr, const float* x, int64_t ldx, const Int4Weight& w,
                   int64_t n, float* out, int64_t ldo) {
  if constexpr (MAX_MR > 1) {
    if (mr < MAX_MR) return int4_run_tile<NR, MAX_MR - 1>(mr, x, ldx, w, n, out, ldo);
  }
  int4_tile<MAX_MR, NR>(x, ldx, w, n, out, ldo);
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
#undef PYFAST_WO_TILE_FN

}  // namespace

void int8_small_avx512(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
  small_driver<int8_tile_fn, 8>(xp, w.K, M, w, n0, n1, out, ldo);
}

void int4_small_avx512(const float* xp, int64_t ld, int64_t M,
                       const Int4Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (M == 1) return int4_rows_m1(xp, w, n0, n1, out);
  // Weight rows in pairs (then a single one), x rows in tiles of up to 8 (the two
  // weight rows' bytes stay in L1 between the x tiles).
  constexpr int kMaxMr = 8;
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2)
    for (int64_t m = 0; m < M; m += kMaxMr)
      int4_run_tile<2, kMaxMr>(static_cast<int>(std::min<int64_t>(kMaxMr, M - m)), xp + m * ld,
                               ld, w, n, out + m * ldo, ldo);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; m += kMaxMr)
      int4_run_tile<1, kMaxMr>(static_cast<int>(std::min<int64_t>(kMaxMr, M - m)), xp + m * ld,
                               ld, w, n, out + m * ldo, ldo);
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
      const int64_t i = n * w.ldg + g;
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
void int4_small_avx512(const float* xp, int64_t ld, int64_t M,
                       const Int4Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  (void)xp, (void)ld, (void)M, (void)w, (void)n0, (void)n1, (void)out, (void)ldo;
  TORCH_CHECK(false, "int4_small_avx512 called on a CPU without AVX-512");
}
PYFAST_WO_DEQUANT_DEFINE(avx512, )

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
