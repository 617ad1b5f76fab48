// sparse24_int4_mm at M = 1 with float x on AVX-512 VNNI + VBMI: x in int8 slices, the
// kept x picked by vpermt2b and multiplied with the codes by vpdpbusd, exactly
// (sparse24_int4_slices.cpp).
#pragma once

#include <cstdint>

namespace pyfast {
namespace cpu {
namespace s24i4 {

// The 2:4 + int4 weight (pyfast/formats.py; csrc/cpu/sparse24_int4.cpp):
struct Weight {
  const uint8_t* packed;  // [N, K/4]: codes q of the K/2 kept values, low nibble = even one
  const uint8_t* meta;    // [N, K/8]: kept value i's index in its group of 4 at bits 2i, 2i+1
  const float* scales;    // [N, G] float32
  const uint8_t* zeros;   // [N, G]
  int64_t N, K, G;
  int gshift;             // dense column k lies in group k >> gshift (63: per channel)
};

// x in slices, per block of 128 dense columns (kXBlockBytes bytes, K zero padded to whole
// blocks):
//   uint8 [3][128]: slice j, byte c = digit u_j of U = X + 2^23 at column 128b + c
//                   (U = u0 + 256 u1 + 65536 u2, 0 < U < 2^24)
//   float [16]    : per lane of 8 columns, 2^(e - 23) (x = X * 2^(e - 23) + error), in
//                   the kernel's lane order (lane_of, sparse24_int4_slices.cpp)
// with X and e as in x_slices.h. x_slices returns false, leaving dst unusable, for x the
// slices cannot hold (non-finite, or a nonzero lane below 2^-64).
constexpr int64_t kXSliceBytes = 3 * 128;
constexpr int64_t kXBlockBytes = kXSliceBytes + 64;
bool x_slices(const float* x, int64_t K, uint8_t* dst);

// out[n] = sum_k x[k] W[n, k] (float32, no bias) for n in [n0, n1), from x_slices' dst.
void m1_slices(const uint8_t* xs, const Weight& w, int64_t n0, int64_t n1, float* out);

}  // namespace s24i4
}  // namespace cpu
}  // namespace pyfast
