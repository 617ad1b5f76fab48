// C-style launcher of the CUDA 2:4 sparse GEMM on sparse tensor cores
// (csrc/cuda/sparse24_mm.cu), called by csrc/cuda/sparse24_mm_launch.cpp.
//
// Torch-free (CUDA headers only), so the kernel file compiles and is checked with
// nvcc alone (tests/test_cuda_compile.py).
//
//   out[m, n] = sum_k x[m, k] * W[n, k] + bias[n]   (float32 accumulation, one
//   rounding to x's dtype), W [N, K] the 2:4 weight given as
//     values  : x_dtype [N, K/2]   canonical kept values (pyfast/formats.py), row-major
//     meta_tc : int32   [ceil(N/16), ceil(K/64), 32]  metadata in sparse-tensor-core
//               order (pyfast/layouts/sparse24_tc.py, repack_meta); padding nibbles 0b0100
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "kernels.h"  // PyfastDtype

// Bytes of float32 workspace pyfast_sparse24_mm_tc needs for this problem on a GPU with
// `num_sms` multiprocessors: 0 when the problem runs without split-K, else
// splits * M * N * 4 (one float32 partial product per split). Same rule as the launcher.
size_t pyfast_sparse24_mm_tc_workspace_bytes(int64_t M, int64_t N, int64_t K, int num_sms);

// out = x @ W.T + bias on sparse tensor cores (mma.sp m16n8k32, sm_80 or newer).
//   x         : [M, K] of x_dtype, contiguous (row stride K). x_dtype is PYFAST_F16 or
//               PYFAST_BF16 (float32 is not supported: cudaErrorInvalidValue)
//   values    : x_dtype [N, K/2] contiguous, the canonical 2:4 values
//   meta_tc   : int32 [ceil(N/16), ceil(K/64), 32] contiguous, 16-byte aligned
//   bias      : float32 [N] or nullptr
//   out       : x_dtype [M, N] contiguous, written entirely
//   M, N, K   : M >= 0, N >= 0, K >= 0 with K % 4 == 0; N <= 65535 * 64 (grid limit)
//   workspace : float32 scratch of workspace_bytes bytes (>= the value of
//               pyfast_sparse24_mm_tc_workspace_bytes; may be nullptr when that is 0)
//   num_sms   : multiprocessor count of the device (picks the split-K factor)
// x and values take the 16-byte cp.async path when K % 16 == 0 and both pointers are
// 16-byte aligned, else a 4-byte cp.async path (any K % 4 == 0, 4-byte aligned pointers).
// Launches asynchronously on `stream` (one kernel, plus a reduction kernel with
// split-K) and returns the launch error; cudaErrorInvalidValue for a bad argument.
cudaError_t pyfast_sparse24_mm_tc(const void* x, const void* values, const int32_t* meta_tc,
                                  const float* bias, void* out, int x_dtype, int64_t M,
                                  int64_t N, int64_t K, float* workspace,
                                  size_t workspace_bytes, int num_sms, cudaStream_t stream);
