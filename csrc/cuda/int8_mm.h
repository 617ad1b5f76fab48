// C-style launcher of the CUDA int8 tensor-core GEMM (csrc/cuda/int8_mm.cu), the
// CUDA kernel of pyfast_C::int8_mm. Torch-free: int8_mm_launch.cpp checks the
// tensors and calls these two functions.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels.h"  // PyfastDtype: PYFAST_F32 / PYFAST_F16 / PYFAST_BF16

// Largest K: 128 * 128 * K must stay below 2**31 so no int32 sum can overflow
// (the same limit as pyfast/ops.py MAX_INT8_K and csrc/cpu/int8_mm.cpp).
constexpr int64_t PYFAST_INT8_MM_MAX_K = (int64_t{1} << 17) - 1;
// Largest M and N: tile row/column indices stay in 32-bit int with room for the
// partial tile past the end.
constexpr int64_t PYFAST_INT8_MM_MAX_ROWS = int64_t{1} << 30;

// int32 elements of split-K workspace that pyfast_int8_mm needs for this problem
// on a GPU with `sm_count` multiprocessors (0 when it will not split K; then
// `workspace` may be null). Pure function of its arguments: call it with the
// same values that are then passed to pyfast_int8_mm.
int64_t pyfast_int8_mm_workspace_elems(int64_t M, int64_t N, int64_t K, int sm_count);

// out[m, n] = cast(((float(acc[m, n]) * a_scale[m]) * b_scale[n]) + bias[n]),
// acc[m, n] = sum_k int32(a[m, k]) * int32(b[n, k]) (exact), each float32 operation
// rounded once (no FMA), then one round-to-nearest-even cast to out_dtype; with
// bias == nullptr the addition is skipped (not "+ 0", which would turn -0 into +0).
//
//   a         : int8    [M, K]; element (m, k) at a + m * lda + k (lda >= K)
//   lda       : row stride of a in elements (bytes)
//   b         : int8    [N, K], the weight as nn.Linear stores it; (n, k) at b + n * ldb + k
//   ldb       : row stride of b (>= K)
//   M, N      : 0 <= M, N <= PYFAST_INT8_MM_MAX_ROWS (2**30)
//   K         : 0 <= K <= PYFAST_INT8_MM_MAX_K; K == 0 gives bias (or zeros)
//   a_scale   : float32 [M] contiguous
//   b_scale   : float32 [N] contiguous
//   bias      : float32 [N] contiguous, or nullptr for no bias
//   out       : out_dtype [M, N] contiguous (row stride N)
//   out_dtype : PYFAST_F32, PYFAST_F16 or PYFAST_BF16
//   workspace : int32 [workspace_elems], scratch for split-K partial sums; at least
//               pyfast_int8_mm_workspace_elems(M, N, K, sm_count) elements
//   sm_count  : multiprocessors of the device (cudaDevAttrMultiProcessorCount);
//               only steers the split-K choice, never the result
//   stream    : the stream both kernels (GEMM, then split-K reduction) run on
// The fast path (16-byte cp.async) needs a, b 16-byte aligned and lda, ldb
// multiples of 16; other inputs take a slower path with plain byte loads. Both give
// the same bits. Launches asynchronously; returns the launch error
// (cudaErrorInvalidValue for a bad argument). M == 0 or N == 0 launches nothing.
cudaError_t pyfast_int8_mm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                           int64_t M, int64_t N, int64_t K, const float* a_scale,
                           const float* b_scale, const float* bias, void* out, int out_dtype,
                           int32_t* workspace, int64_t workspace_elems, int sm_count,
                           cudaStream_t stream);
