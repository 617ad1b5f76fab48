// PTX wrappers shared by the tensor-core kernels (int8_mm.cu, int4_mm.cu,
// sparse24_mm.cu). Torch-free: CUDA headers only. Each kernel file keeps the
// wrappers that are specific to it (its cp.async sizes and cache hints, its mma).
//
// References (PTX ISA 8.x; section numbers move between versions, titles do not):
//   cp.async.commit_group / cp.async.wait_group  9.7.9.25.3 "Data Movement: cp.async"
//   ldmatrix                                      9.7.14.5.15 "ldmatrix"
//   __cvta_generic_to_shared                      CUDA C++ Programming Guide, "Address
//                                                 Space Conversion Functions"
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyfast_cuda {

// 32-bit shared-memory address of a generic pointer into shared memory (the operand
// form cp.async and ldmatrix take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed cp.async groups are in flight
// (the data of the older groups is then in shared memory for this thread; a
// __syncthreads() makes it visible to the others).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory: lanes 8j..8j+7 give the row addresses of
// matrix j (16 bytes each), and lane l receives in r[j] the 4 bytes at row l / 4,
// bytes 4 (l % 4)..+3 of matrix j. The "memory" clobber keeps it after the shared
// stores it depends on.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  ldmatrix_x4(r, smem_addr(p));
}

}  // namespace pyfast_cuda
