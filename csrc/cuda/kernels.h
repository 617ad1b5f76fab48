// C-style launchers of the CUDA kernels of pyfast (csrc/cuda/*.cu).
//
// The .cu files include only CUDA headers (no torch), so they compile in about a
// second and can be checked with nvcc alone (tests/test_cuda_compile.py); the
// *_launch.cpp files check torch tensors and call these launchers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

// x_dtype codes for the launchers.
enum PyfastDtype : int { PYFAST_F32 = 0, PYFAST_F16 = 1, PYFAST_BF16 = 2 };

// Symmetric per-row int8 quantization (pyfast/formats.py, quantize_per_token).
//   x            : [M, K] of x_dtype (0 float32, 1 float16, 2 bfloat16); element
//                  (m, k) at x + m * x_row_stride + k (unit stride along K)
//   q            : int8    [M, K] contiguous (row stride K)
//   scale        : float32 [M]    amax(|x[m, :]|) / 127, 1.0 for an all-zero row
//   M            : 0 <= M <= 2**31 - 1 (one thread block per row)
//   K            : >= 0
// Launches asynchronously on `stream`; returns the launch error (cudaSuccess,
// cudaErrorInvalidValue for a bad argument). M == 0 launches nothing.
cudaError_t pyfast_quantize_per_token(const void* x, int x_dtype, int64_t M, int64_t K,
                                      int64_t x_row_stride, int8_t* q, float* scale,
                                      cudaStream_t stream);
