// CUDA kernel of pyfast_C::quantize_per_token: symmetric per-row int8.
//
// Torch-free (CUDA headers only); the launcher is declared in kernels.h and
// called from quantize_per_token_launch.cpp.
//
//   x     : float32/float16/bfloat16 [M, K], row stride x_row_stride elements
//   q     : int8    [M, K] contiguous   clamp(round_half_even(x / scale), -127, 127)
//   scale : float32 [M]                 amax(|x[m, :]|) / 127; 1.0 where that is 0
//                                       (all-zero row, subnormal amax); NaN for a NaN row
//
// One thread block per row, two passes over the row (the second pass re-reads x,
// mostly from L1/L2):
//   1. each thread takes the abs-max of its strided elements; a warp reduces with
//      __shfl_xor_sync (butterfly), warp results go through shared memory and the
//      first warp reduces them again. See the CUDA C++ Programming Guide, "Warp
//      Shuffle Functions" (__shfl_xor_sync: every lane of the mask must execute it;
//      the full-warp mask 0xffffffff is valid because all 32 lanes reach it) and
//      "Synchronization Functions" (__syncthreads between the shared-memory write
//      and read).
//   2. each thread divides, rounds and clamps its elements and writes int8.
// Vector loads (16 bytes: 4 float32 or 8 float16/bfloat16 per load) are used when
// every row start is 16-byte aligned and K is a multiple of the vector width;
// otherwise a scalar path handles the row.
//
// Bit-exact with the reference (pyfast/reference.py) because every step is the
// same IEEE float32 operation, with no fast-math:
//   - float16/bfloat16 -> float32 is exact (__half2float, __bfloat162float);
//   - scale = __fdiv_rn(amax, 127.f) and v = __fdiv_rn(x, scale) are correctly
//     rounded true divisions (CUDA C++ Programming Guide, "Intrinsic Functions":
//     __fdiv_rn is IEEE round-to-nearest-even division; it is also immune to
//     -use_fast_math, which would turn `/` into an approximate division);
//   - __float2int_rn rounds to nearest, ties to even (cvt.rni.s32.f32), like
//     torch.round; the clamp to [-127, 127] is applied after rounding.
// NaN: the abs-max propagates NaN and the row's scale is NaN, so int8_mm makes
// that row NaN (as the reference does); its q values are 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;  // 8 warps per row
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// max(|a|, m) that keeps a NaN once seen (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float m, float a) {
  return (a > m || a != a) ? a : m;
}

__device__ __forceinline__ int8_t quantize_one(float x, float scale) {
  const float v = __fdiv_rn(x, scale);
  if (v != v) return 0;
  const int r = __float2int_rn(v);  // saturates to int range, ties to even
  return static_cast<int8_t>(min(max(r, -127), 127));
}

// Abs-max over the block; every thread gets the result.
__device__ __forceinline__ float block_absmax(float v) {
  __shared__ float warp_max[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  v = lane < kWarps ? warp_max[lane] : 0.0f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;  // every warp reduced the same kWarps values
}

// VEC elements of T per 16-byte load when VEC > 1; VEC == 1 is the scalar path.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
quantize_per_token_kernel(const T* __restrict__ x, int64_t K, int64_t x_row_stride,
                          int8_t* __restrict__ q, float* __restrict__ scale) {
  const int64_t m = blockIdx.x;
  const T* xr = x + m * x_row_stride;
  int8_t* qr = q + m * K;

  // Pass 1: abs-max.
  float amax = 0.0f;
  if constexpr (VEC > 1) {
    static_assert(sizeof(T) * VEC == 16, "one vector is 16 bytes");
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t i = threadIdx.x; i < K / VEC; i += kThreads) {
      const uint4 raw = xv[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) amax = nan_max(amax, fabsf(to_float(e[j])));
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      amax = nan_max(amax, fabsf(to_float(xr[k])));
    }
  }
  amax = block_absmax(amax);
  const float s0 = __fdiv_rn(amax, 127.0f);
  const float s = isnan(amax) ? amax : (s0 > 0.0f ? s0 : 1.0f);
  if (threadIdx.x == 0) scale[m] = s;

  // Pass 2: divide, round, clamp, store.
  if constexpr (VEC > 1) {
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t i = threadIdx.x; i < K / VEC; i += kThreads) {
      const uint4 raw = xv[i];
      const T* e = reinterpret_cast<const T*>(&raw);
      int8_t out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = quantize_one(to_float(e[j]), s);
      // VEC int8 = 4 or 8 bytes, aligned because K % VEC == 0 and q is aligned.
      if constexpr (VEC == 4) {
        reinterpret_cast<char4*>(qr)[i] = make_char4(out[0], out[1], out[2], out[3]);
      } else {
        uint2 packed;
        packed.x = (uint32_t(uint8_t(out[0]))) | (uint32_t(uint8_t(out[1])) << 8) |
                   (uint32_t(uint8_t(out[2])) << 16) | (uint32_t(uint8_t(out[3])) << 24);
        packed.y = (uint32_t(uint8_t(out[4]))) | (uint32_t(uint8_t(out[5])) << 8) |
                   (uint32_t(uint8_t(out[6])) << 16) | (uint32_t(uint8_t(out[7])) << 24);
        reinterpret_cast<uint2*>(qr)[i] = packed;
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) qr[k] = quantize_one(to_float(xr[k]), s);
  }
}

template <typename T>
cudaError_t launch(const void* x_raw, int64_t M, int64_t K, int64_t x_row_stride, int8_t* q,
                   float* scale, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_raw);
  constexpr int VEC = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       (x_row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                       K % VEC == 0 && reinterpret_cast<uintptr_t>(q) % VEC == 0;
  const dim3 grid(static_cast<unsigned>(M)), block(kThreads);
  if (aligned) {
    quantize_per_token_kernel<T, VEC><<<grid, block, 0, stream>>>(x, K, x_row_stride, q, scale);
  } else {
    quantize_per_token_kernel<T, 1><<<grid, block, 0, stream>>>(x, K, x_row_stride, q, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pyfast_quantize_per_token(const void* x, int x_dtype, int64_t M, int64_t K,
                                      int64_t x_row_stride, int8_t* q, float* scale,
                                      cudaStream_t stream) {
  if (M < 0 || M > 0x7fffffff || K < 0 || x_row_stride < K) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  switch (x_dtype) {
    case PYFAST_F32: return launch<float>(x, M, K, x_row_stride, q, scale, stream);
    case PYFAST_F16: return launch<__half>(x, M, K, x_row_stride, q, scale, stream);
    case PYFAST_BF16: return launch<__nv_bfloat16>(x, M, K, x_row_stride, q, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}
