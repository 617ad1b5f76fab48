// Shared declarations of the weight-only CPU kernels (int8_weight_mm, int4_mm).
//
// Files:
//   weight_only.cpp         schemas, input checks, the choice of path and ISA,
//                           the large-M path (dequantized panel + at::mm), epilogue,
//                           the scalar kernels
//   weight_only_kernels.h   generic panel-dequant bodies, prefetch, bf16 rounding
//   weight_only_avx512.cpp  AVX-512 small-M kernels (PYFAST_TARGET_AVX512)
//   weight_only_avx2.cpp    AVX2 + FMA small-M kernels (PYFAST_TARGET_AVX2)
//   weight_only_bf16dot.cpp int4, bfloat16 x, AVX512_BF16 small-M kernel (vdpbf16ps)
//   weight_only_lanes.h     per-lane group scales / zeros of the AVX-512 int4 kernels
//
// Two paths, for every ISA:
//   small M (decode, M <= a threshold): the "small" kernels below read each
//     weight row once per tile of up to 8 activation rows, dequantize it in
//     registers and FMA it into float32 accumulators (x converted to float32).
//   large M: rows of the weight are dequantized into an L2/L3-sized panel
//     (float32 for float32/float16 x, bfloat16 for bfloat16 x) and multiplied
//     by at::mm (MKL / oneDNN), each thread on its own panels.
//
// Layouts (pyfast/formats.py):
//   int8 weight : w int8 [N, K] row-major, scale float32 [N]
//   int4 weight : packed uint8 [N, K/2] (low nibble = even k), scales float32
//                 [N, G], zeros uint8 [N, G], G = K / group (group = K per channel);
//                 int4_mm_ksplit: packed uint8 [C, N, K/(2C)], chunk c the canonical
//                 packed of columns [c K/C, (c + 1) K/C) (pyfast/layouts/int4_ksplit.py),
//                 each run as an Int4Weight of K/C columns whose scales and zeros are
//                 the columns of its groups in the [N, G] tensors (ldg = G)
#pragma once

#include <cstdint>

#include "isa.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

struct Int8Weight {
  const int8_t* w;      // [N, K]
  const float* scale;   // [N]
  int64_t N, K;
};

struct Int4Weight {
  const uint8_t* packed;  // [N, K/2] contiguous
  const float* scales;    // [N, G], row stride ldg
  const uint8_t* zeros;   // [N, G], row stride ldg
  int64_t N, K;
  int64_t group;          // elements per group (K when per channel)
  int64_t G;              // groups per row
  int64_t ldg;            // row stride of scales and zeros: G, or for one K chunk of
                          // int4_mm_ksplit the whole weight's G (1 per channel)
};

// Activations as the small kernels read them: float32 rows of length `ld`.
//   int8: x[m, k] at xp[m * ld + k], ld = K (natural order).
//   int4: blocks of L * P consecutive k, each stored as P rows of L lanes:
//         xp[b*L*P + p*L + i] = x[b*L*P + P*i + p], i < L (lanes), p < P.
//         AVX2 and scalar: L = 8, P = 2 (the even k, then the odd k): one load of
//         L packed bytes widened to L int32 lanes gives the low nibbles (even k)
//         matching the first L x and the high nibbles the next L.
//         AVX-512: L = 16, P = 8: one 64-byte load = 16 dwords of 8 nibbles each,
//         nibble p of dword i being k = 8i + p (weight_only_avx512.cpp).
//         No shuffle of the weight is needed. The last partial block is zero
//         padded; ld = ceil(K / (L * P)) * L * P.
struct XBlocks {
  int64_t lanes, per_lane;  // L, P
};
XBlocks int4_small_layout(Isa isa);

// out[m * ldo + n] for m in [0, M), n in [n0, n1), float32:
//   int8: (sum_k x[m, k] * float(w[n, k])) * scale[n]
//   int4: sum_k x[m, k] * ((float(q[n, k]) - float(zero[n, g])) * scale[n, g])
// (the dequantized weight value is computed exactly as pyfast.reference does).
void int8_small_avx512(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo);
void int8_small_avx2(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                     int64_t n1, float* out, int64_t ldo);
void int8_small_scalar(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo);
void int4_small_avx512(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                       int64_t n0, int64_t n1, float* out, int64_t ldo);
void int4_small_avx2(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                     int64_t n0, int64_t n1, float* out, int64_t ldo);
void int4_small_scalar(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                       int64_t n0, int64_t n1, float* out, int64_t ldo);

// bfloat16 x on AVX-512 + AVX512_BF16 (has_bf16_dot(); weight_only_bf16dot.cpp):
//   xq uint16 [M, ld] bfloat16 bits, blocks of 128 k, pair j of lane i in dword
//      j*16 + i: xq[b*128 + 32j + 2i + h] = x[b*128 + 8i + j + 4h] (h = 0, 1)
//   xs float32 [M, ld/8]: xs[b*16 + i] = sum of x[b*128 + 8i + p], p < 8
//   ld = K rounded up to 128, zero padded.
// out as int4_small_* (float32, the group scale applied per lane).
void int4_small_bf16dot(const uint16_t* xq, const float* xs, int64_t ld, int64_t M,
                        const Int4Weight& w, int64_t n0, int64_t n1, float* out, int64_t ldo);

// int8 slices of x (M = 1, float x, AVX-512 VNNI; weight_only_slices.cpp): per block of
// 128 k, kSliceBlockBytes bytes:
//   int8  [3][2][64]: slice j, parity p, byte 4i + t = digit d_j of X[8i + 2t + p]
//                     (lane i = k 8i .. 8i + 7 of the block; X = d0 + 256 d1 + 65536 d2
//                     the lane's x in fixed point)
//   int32 [16]      : per lane, -8 * (sum of X)
//   float [16]      : per lane, 2^(e - 23): x = X * 2^(e - 23) + error
// and zsum float32 [G]: per quantization group of w, -(the sum of its x as held, that is
// of X * 2^(e - 23)), summed exactly in double and rounded once.
// x_int4_slices fills dst and zsum from float32 x [w.K] (zero padded to whole blocks) and
// returns false, leaving them unusable, when x has a non-finite value or a lane whose
// largest |x| is nonzero and below 2^-64 (the float32 kernel runs then).
// int4_m1_slices: out[n] for n in [n0, n1), float32, as int4_small_* at M = 1.
constexpr int kSlices = 3;
constexpr int64_t kSliceBytes = kSlices * 128;
constexpr int64_t kSliceBlockBytes = kSliceBytes + 64 + 64;
bool x_int4_slices(const float* x, const Int4Weight& w, uint8_t* dst, float* zsum);
void int4_m1_slices(const uint8_t* xs, const float* zsum, const Int4Weight& w, int64_t n0,
                    int64_t n1, float* out);

// The int4 panel layout of an ISA: 0 = natural k order, rows of K; L > 0 = the
// block order above with L lanes and P = 2 (even k, then odd k), rows of ld = K
// rounded up to 2L, zero padded. The panel path permutes x's columns the same
// way, so x @ panel.T is unchanged while the AVX-512 dequant needs no shuffle
// back to natural order.
int64_t int4_panel_lanes(Isa isa);

// Dequantize weight rows [n0, n1) into dst [(n1 - n0), K] (natural k order; int4:
// the ISA's panel layout, int4_panel_lanes).
//   int8 float32 : float(w)                 (the scale is applied after the matmul,
//                                            as the reference does)
//   int8 bfloat16: bf16(float(w) * scale)    (scale folded: bf16 matmul output)
//   int4 float32 : (q - zero) * scale        (exactly the reference's weight)
//   int4 bfloat16: bf16((q - zero) * scale)
// dst_bf16 holds bfloat16 bit patterns (round to nearest even).
void dequant_int8_f32(Isa isa, const Int8Weight& w, int64_t n0, int64_t n1, float* dst);
void dequant_int8_bf16(Isa isa, const Int8Weight& w, int64_t n0, int64_t n1, uint16_t* dst);
void dequant_int4_f32(Isa isa, const Int4Weight& w, int64_t n0, int64_t n1, float* dst);
void dequant_int4_bf16(Isa isa, const Int4Weight& w, int64_t n0, int64_t n1, uint16_t* dst);

// The same four per ISA (called by the dispatching functions above).
#define PYFAST_WO_DEQUANT_DECL(suffix)                                                   \
  void dequant_int8_f32_##suffix(const Int8Weight&, int64_t, int64_t, float*);          \
  void dequant_int8_bf16_##suffix(const Int8Weight&, int64_t, int64_t, uint16_t*);      \
  void dequant_int4_f32_##suffix(const Int4Weight&, int64_t, int64_t, float*);          \
  void dequant_int4_bf16_##suffix(const Int4Weight&, int64_t, int64_t, uint16_t*);
PYFAST_WO_DEQUANT_DECL(avx512)
PYFAST_WO_DEQUANT_DECL(avx2)
PYFAST_WO_DEQUANT_DECL(scalar)
#undef PYFAST_WO_DEQUANT_DECL

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
