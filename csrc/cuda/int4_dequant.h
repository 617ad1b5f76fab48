// In-register int4 -> float16/bfloat16 dequantization shared by the int4 tensor-core
// kernels (int4_mm.cu, sparse24_int4_mm.cu). Torch-free: CUDA headers only.
//
// Why it is exact up to the one rounding of the product: lop3 computes
// (word & 0x000F000F) | MAGIC in one instruction, giving two 16-bit floats whose low
// mantissa bits are the codes q. For float16 MAGIC = 0x6400 = 1024.0: float16 has 10
// mantissa bits, so in [1024, 2048) the spacing is 1 and the bits 0x6400 | q are
// exactly 1024 + q (q < 16). For bfloat16 MAGIC = 0x4300 = 128.0: 7 mantissa bits,
// spacing 1 in [128, 256), so 0x4300 | q is exactly 128 + q. Subtracting
// (MAGIC + zero) (itself exact: an integer below 2048 / 256) gives q - zero exactly (a
// small integer); one multiply by the scale rounded to x.dtype is the only rounding of
// the weight (two in all: the scale's conversion, the product). A scale beyond the
// float16 range becomes inf, as in any float16 GEMM.
// (PTX ISA 9.1, 9.7.8.7 "lop3"; the trick is Marlin's: Frantar et al., "MARLIN:
// Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models", 2024.)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace pyfast_cuda {

template <typename T> struct Traits;
template <> struct Traits<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr float kMagicValue = 1024.0f;
  static __device__ __forceinline__ T2 pair(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  static constexpr float kMagicValue = 128.0f;
  static __device__ __forceinline__ T2 pair(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T2> __device__ __forceinline__ T2 bits_as(uint32_t u) {
  T2 v;
  memcpy(&v, &u, 4);
  return v;
}
template <typename T2> __device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// (a & b) | c in one instruction: lop3 look-up table 0xEA = (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The T2 pair {(q0 - z) * s, (q1 - z) * s} as 32 bits, q0 = bits 0-3 and q1 = bits
// 16-19 of `word` (other bits ignored); magic_zero = T2 pair of MAGIC + z, scale = T2
// pair of s (both as 32 bits, e.g. Traits<T>::pair(...) through as_bits).
template <typename T>
__device__ __forceinline__ uint32_t dequant2(uint32_t word, uint32_t magic_zero, uint32_t scale) {
  using T2 = typename Traits<T>::T2;
  const uint32_t q = and_or(word, 0x000F000Fu, Traits<T>::kMagic);
  return as_bits(__hmul2(__hsub2(bits_as<T2>(q), bits_as<T2>(magic_zero)), bits_as<T2>(scale)));
}

}  // namespace pyfast_cuda
