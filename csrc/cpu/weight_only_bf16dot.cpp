// int4_mm for bfloat16 x at small M on AVX-512 + AVX512_BF16 (see weight_only.h):
// the weight goes from nibbles to bfloat16 in registers and is multiplied by vdpbf16ps,
// 32 multiply-adds per instruction (the float32 kernel of weight_only_avx512.cpp does
// 16 per FMA and needs two more instructions per 16 weights to make the floats).
//
// Nibbles to bfloat16 pairs, one vpternlogd per 32 weights. A weight row's block of
// 128 k is one 64-byte load: dword lane i holds k = 128b + 8i + p in bits 4p..4p+3
// (canonical packing, low nibble = even k). Shifted right by 4j (j < 4), nibbles j and
// j + 4 sit in bits 0..3 and 16..19, the low mantissa bits of the dword's two bfloat16
// halves; (d >> 4j) & 0x000F000F | 0x43004300 is then the pair (128 + q[8i + j],
// 128 + q[8i + j + 4]) exactly (bfloat16 128.0 = 0x4300, whose mantissa step is 1).
// x is laid out to match (int4_bf16dot_layout): pair j of lane i is
// (x[8i + j], x[8i + j + 4]).
//
// The offset of 128 comes out per lane with the lane's x sum xs (8 k, float32):
//   sum_k (q - z) x = sum_k (128 + q) x - (128 + z) xs,
// started as -(128 + z) * xs and followed by the four vdpbf16ps of the block, then
// scaled by the lane's group scale into a float32 total. Products of two bfloat16 are
// exact in float32; the cancellation against the offset costs about log2(143 * 8)
// bits of a float32 block sum, far below the one bfloat16 rounding of the output.
// vdpbf16ps treats subnormal inputs and outputs as zero (Intel SDM vol. 2, VDPBF16PS).
//
// Loop order as in the float32 M = 1 kernel: groups of kRowGroup weight rows, swept in
// chunks of K so that the x tile stays in L1 (whole rows when they fit, kWholeRowBytes),
// one row at a time (long sequential weight runs), the segment read kAhead segments later prefetched into L2; x rows in tiles of
// up to 4, each weight block converted once per tile.
// Cost per block of 128 weights (Zen 4, zmm ops issue as two 256-bit halves): 3 shifts
// + 4 vpternlogd, then per x row 4 vdpbf16ps + 3 FMA-class ops; measured ad hoc about
// 13 cycles per block at M = 1 with the weight in L2, i.e. near the rate 2 cores need
// to keep up with DRAM, and about 8 per block per x row at M = 4.
// Two far-apart row streams at M = 1 (what made the int8-slice kernel read faster,
// weight_only_slices.cpp): 0.981, 0.956 and 1.039 of this sweep on 4096x4096,
// 4096x11008 and 11008x4096 (ad hoc A/B, 20 rounds, bit-identical; this kernel read
// 38-46 GB/s there, 1.58-1.80x W8A8), so not kept.
#include <immintrin.h>

#include <algorithm>

#include <c10/util/Exception.h>

#include "weight_only_kernels.h"
#include "weight_only_lanes.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

#if PYFAST_X86

namespace {

constexpr int64_t kRowGroup = 8;
// Prefetch distance in row segments (2 KiB each at M = 1): one segment was too close
// for DRAM latency at this kernel's rate on Zen 4 (measured ad hoc, M = 4: 1.06 ->
// 0.78 ms on a 4096 x 4096 layer; not a bench result file); 2, 3 and 4 were alike.
constexpr int64_t kAhead = 2;

template <int MR>
PYFAST_TARGET_AVX512_BF16 void rows_bf16dot(const uint16_t* xq, const float* xs, int64_t ld,
                                            const Int4Weight& w, int64_t n, int64_t rows,
                                            float* out, int64_t ldo) {
  const __m512i mask = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  const __m512 offset = _mm512_set1_ps(128.0f);
  const int64_t half = w.K / 2, blocks = (half + 63) / 64, lds = ld / 8;
  // The x tile of a chunk is MR rows x kChunk blocks x (256 bytes of x + 64 of xs). When
  // whole rows fit in kWholeRowBytes the sweep reads each weight row start to end (rows
  // back to back: one sequential stream); otherwise chunks of 32 / MR blocks (10 KiB of
  // x) stay in the 32 KiB L1 and the rows of a group are read a 2 KiB segment at a time.
  // Measured ad hoc (Zen 4, 2 threads, cold weights, both variants alternated in one
  // process; not a bench result file): whole rows took K = 11008, M = 1 from 0.92 to 0.75
  // ms and K = 4096, M = 2 from 0.48 to 0.39 ms; with 40 KiB of x (K = 16384, M = 1)
  // whole rows were 8% slower than chunks, x no longer fitting in L1.
  constexpr int64_t kWholeRowBytes = 28 * 1024;
  const int64_t kChunk = blocks * MR * 320 <= kWholeRowBytes ? blocks : 32 / MR;
  __m512 tot[kRowGroup][MR];
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunk) {
    const int64_t b1 = std::min(blocks, b0 + kChunk);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = w.packed + (n + r) * half;
      const uint8_t* next = segment_after(w, n, rows, r, b0, kChunk, kAhead);
      const float* scales = w.scales + (n + r) * w.ldg;
      const uint8_t* zeros = w.zeros + (n + r) * w.ldg;
      __m512 t[MR];
      for (int m = 0; m < MR; ++m) t[m] = tot[r][m];
      for (int64_t b = b0; b < b1; ++b) {
        prefetch_l2(next + 64 * (b - b0));
        const __m512i d = load_block(row, b, half);
        __m512bh v[4];
        for (int j = 0; j < 4; ++j)  // 0xEA: (A & B) | C
          v[j] = (__m512bh)_mm512_ternarylogic_epi32(
              j == 0 ? d : _mm512_srli_epi32(d, 4 * j), mask, magic, 0xEA);
        const __m512 s = per_lane(scales, w, b);
        const __m512 c = _mm512_add_ps(per_lane(zeros, w, b), offset);  // 128 + z
        for (int m = 0; m < MR; ++m) {
          const uint16_t* xb = xq + m * ld + 128 * b;
          // two chains of two vdpbf16ps (latency), the first started at -(128 + z) xs
          __m512 a0 = _mm512_fnmadd_ps(c, _mm512_loadu_ps(xs + m * lds + 16 * b),
                                       _mm512_setzero_ps());
          __m512 a1 = _mm512_setzero_ps();
          a0 = _mm512_dpbf16_ps(a0, v[0], (__m512bh)_mm512_loadu_si512(xb));
          a1 = _mm512_dpbf16_ps(a1, v[1], (__m512bh)_mm512_loadu_si512(xb + 32));
          a0 = _mm512_dpbf16_ps(a0, v[2], (__m512bh)_mm512_loadu_si512(xb + 64));
          a1 = _mm512_dpbf16_ps(a1, v[3], (__m512bh)_mm512_loadu_si512(xb + 96));
          t[m] = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), s, t[m]);
        }
      }
      for (int m = 0; m < MR; ++m) tot[r][m] = t[m];
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < MR; ++m) out[m * ldo + n + r] = _mm512_reduce_add_ps(tot[r][m]);
}

template <int MR>
void tile_bf16dot(int mr, const uint16_t* xq, const float* xs, int64_t ld, const Int4Weight& w,
                  int64_t n, int64_t rows, float* out, int64_t ldo) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_bf16dot<MR - 1>(mr, xq, xs, ld, w, n, rows, out, ldo);
  }
  rows_bf16dot<MR>(xq, xs, ld, w, n, rows, out, ldo);
}

}  // namespace

void int4_small_bf16dot(const uint16_t* xq, const float* xs, int64_t ld, int64_t M,
                        const Int4Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int kMaxMr = 4;
  for (int64_t n = n0; n < n1; n += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, n1 - n);
    for (int64_t m = 0; m < M; m += kMaxMr)
      tile_bf16dot<kMaxMr>(static_cast<int>(std::min<int64_t>(kMaxMr, M - m)), xq + m * ld,
                           xs + m * (ld / 8), ld, w, n, rows, out + m * ldo, ldo);
  }
}

#else  // not x86: never selected (has_bf16_dot() is false)

void int4_small_bf16dot(const uint16_t* xq, const float* xs, int64_t ld, int64_t M,
                        const Int4Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  (void)xq, (void)xs, (void)ld, (void)M, (void)w, (void)n0, (void)n1, (void)out, (void)ldo;
  TORCH_CHECK(false, "int4_small_bf16dot called on a CPU without AVX512_BF16");
}

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
