// C-style launcher of the W4A16 tensor-core GEMM of pyfast_C::int4_mm_tc
// (csrc/cuda/int4_mm.cu). Torch-free: raw pointers and sizes only; the torch-facing
// checks, copies and workspace live in int4_mm_launch.cpp.
//
//   out[m, n] = x.dtype( sum_k x[m, k] * W[n, k]  + bias[n] )      (sum in float32)
//   W[n, k]   = x.dtype( x.dtype(q[n, k] - zeros[n, g]) * x.dtype(scales[n, g]) ),
//   g = min(k / group_size, G - 1)
// i.e. pyfast.reference.int4_mm with the dequantized weight rounded to the activation
// dtype (the tensor cores multiply float16/bfloat16). Layouts: pyfast/formats.py (scales,
// zeros), pyfast/layouts/int4_tc.py (w_tc).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kernels.h"  // PyfastDtype

// Bytes of workspace pyfast_int4_mm_tc may use for an M x N output (an upper bound
// over every tile configuration and split count it picks): M * N float32 partial sums
// followed by ceil(M / 16) * ceil(N / 64) int32 tile counters.
size_t pyfast_int4_mm_tc_workspace_bytes(int64_t M, int64_t N);

// Arguments (all device pointers on the current device, all tensors contiguous):
//   x            : [M, round_up(K, 8)] of x_dtype (PYFAST_F16 or PYFAST_BF16; PYFAST_F32
//                  returns cudaErrorInvalidValue), element (m, k) at x + m * x_row_stride + k;
//                  16-byte aligned, x_row_stride a multiple of 8 and >= round_up(K, 8);
//                  columns K .. round_up(K, 8) - 1 must hold zeros (the torch launcher
//                  makes a zero-padded copy when K % 8 != 0)
//   M            : rows of x and out, 0 <= M <= 2**31 - 1 (M == 0 launches nothing)
//   K            : in_features, even, >= 2, a multiple of group_size when group_size > 0
//   w_tc         : int32 [ceil(N/64), ceil(K/16), 32, 4], repack of the int4 codes
//                  (pyfast/layouts/int4_tc.py), 16-byte aligned
//   N            : out_features, 1 <= N <= 65535 * 64
//   scales       : float32 [N, G], G = K / group_size (1 when group_size == -1)
//   zeros        : uint8 [N, G] zero points 0..15, 4-byte aligned and readable up to
//                  round_up(N * G, 4) bytes (the kernel reads them as 32-bit words)
//   group_size   : 32, 64, 128, or -1 (one group per row)
//   bias         : float32 [N], or nullptr for none
//   out          : [M, N] of x_dtype, row stride N
//   workspace    : pyfast_int4_mm_tc_workspace_bytes(M, N) bytes, 16-byte aligned, ALL ZERO
//                  on entry; the kernel leaves it all zero again when it completes, so one
//                  buffer serves every later call in the same stream
//   stream       : the stream to launch on (asynchronous)
// Returns cudaSuccess, cudaErrorInvalidValue for a bad argument, or the launch error.
cudaError_t pyfast_int4_mm_tc(const void* x, int x_dtype, int64_t M, int64_t K,
                              int64_t x_row_stride, const int32_t* w_tc, int64_t N,
                              const float* scales, const uint8_t* zeros, int64_t group_size,
                              const float* bias, void* out, void* workspace,
                              cudaStream_t stream);
