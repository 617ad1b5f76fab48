// C-style launcher of the CUDA 2:4 sparse + int4 GEMM on sparse tensor cores
// (csrc/cuda/sparse24_int4_mm.cu), called by csrc/cuda/sparse24_int4_mm_launch.cpp.
// Torch-free (CUDA headers only), so the kernel file compiles and is checked with nvcc
// alone (tests/test_cuda_compile.py).
//
//   out[m, n] = x.dtype( sum_k x[m, k] * W[n, k] + bias[n] )   (sum in float32)
//   W[n, k]   = x.dtype( x.dtype(q - zeros[n, g]) * x.dtype(scales[n, g]) ) at the kept
//               k of each 4-chunk, 0 elsewhere;  g = k / group_size (0 for -1)
// i.e. pyfast.reference.sparse24_int4_mm with the dequantized kept values rounded to
// the activation dtype, as int4_mm_tc (the tensor cores multiply float16/bfloat16).
// Layouts: pyfast/formats.py (scales, zeros; "2:4 sparsity + int4 values"),
// pyfast/layouts/sparse24_int4_tc.py (codes_tc), pyfast/layouts/sparse24_tc.py (meta_tc).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kernels.h"  // PyfastDtype

// Bytes of float32 workspace pyfast_sparse24_int4_mm_tc needs for this problem on a GPU
// with `num_sms` multiprocessors: 0 without split-K, else splits * M * N * 4.
size_t pyfast_sparse24_int4_mm_tc_workspace_bytes(int64_t M, int64_t N, int64_t K,
                                                  int num_sms);

// out = x @ W.T + bias on sparse tensor cores (mma.sp m16n8k32, sm_80 or newer).
//   x          : [M, K] of x_dtype (PYFAST_F16 or PYFAST_BF16; else cudaErrorInvalidValue),
//                contiguous, 16-byte aligned
//   codes_tc   : int32 [ceil(N/16), ceil(K/64), 32, 2], contiguous, 16-byte aligned
//   meta_tc    : int32 [ceil(N/16), ceil(K/64), 32], contiguous, 16-byte aligned
//   scales     : float32 [N, G] contiguous
//   zeros      : uint8 [N, G] contiguous, zero points 0..15; 4-byte aligned and readable
//                up to round_up(N * G, 4) bytes (read as 32-bit words)
//   G          : K / group_size, or 1 for group_size == -1
//   group_size : 32, 64, 128 (K a multiple of it) or -1 (one group per row)
//   bias       : float32 [N] or nullptr
//   out        : x_dtype [M, N] contiguous, written entirely
//   M, N, K    : M >= 0, 0 <= N < 2**30 with ceil(N / 64) <= 65535, K >= 0 with
//                K % 8 == 0 (the canonical format's rule)
//   workspace  : float32 scratch of workspace_bytes bytes (>= the value of
//                pyfast_sparse24_int4_mm_tc_workspace_bytes; may be nullptr when that is 0)
//   num_sms    : multiprocessor count of the device (picks the split-K factor)
// Launches asynchronously on `stream` (one kernel, plus a reduction kernel with split-K;
// the split-K sums are in a fixed order, so results are deterministic) and returns the
// launch error; cudaErrorInvalidValue for a bad argument.
cudaError_t pyfast_sparse24_int4_mm_tc(const void* x, const int32_t* codes_tc,
                                       const int32_t* meta_tc, const float* scales,
                                       const uint8_t* zeros, int64_t G, int64_t group_size,
                                       const float* bias, void* out, int x_dtype, int64_t M,
                                       int64_t N, int64_t K, float* workspace,
                                       size_t workspace_bytes, int num_sms, cudaStream_t stream);
