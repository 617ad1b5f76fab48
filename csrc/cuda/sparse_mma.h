// Pieces shared by the 2:4 sparse-tensor-core kernels: sparse24_mm.cu (float16/bfloat16
// kept values) and sparse24_int4_mm.cu (int4 kept values dequantized in registers).
// Both compute out^T = W x^T with W [N, K] as the sparse A operand of mma.sp m16n8k32,
// so they share the mma wrapper, the swizzle of their x tiles, the epilogue, the split-K
// plan and its reduction. Torch-free: CUDA headers only.
//
// PTX references (PTX ISA 9.1, docs.nvidia.com/cuda/parallel-thread-execution):
//  [SP]  9.7.14.6.1 "Sparse matrix storage" and 9.7.14.6.2.2 "Matrix Fragments for
//        sparse mma.m16n8k32 with .f16 and .bf16 types" (operand layouts: see the
//        kernel files).
//  [CD]  9.7.14.5.8 (m16n8k16 floating point) accumulators: c0,c1 = (row g, cols
//        2tig, 2tig+1), c2,c3 = (row g+8, same cols); g = lane >> 2, tig = lane % 4.
//  [CPA] 9.7.9.25.3.1 "cp.async": cp-size 16 (.cg) or 4 (.ca); src-size < cp-size
//        zero-fills the rest (src-size 0 reads nothing).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "ptx.h"  // ldmatrix_x4

namespace pyfast_cuda {
namespace sparse {

// [CPA] 16-byte copy, zero-filled (and no global read) when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// [CPA] 4-byte copy, zero-filled when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

// [SP] d = A(sparse 16x32, metadata e, sparsity selector SEL) * B(32x8) + c, float32.
template <typename T, int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[4], uint32_t e) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e), "n"(SEL));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e), "n"(SEL));
  }
}

// mma_sp with the selector as a runtime 0/1 (the immediate must be a constant).
template <typename T>
__device__ __forceinline__ void mma_sp_sel(float (&d)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[4], uint32_t e, int sel) {
  if (sel == 0) {
    mma_sp<T, 0>(d, a, b, e);
  } else {
    mma_sp<T, 1>(d, a, b, e);
  }
}

__device__ __forceinline__ __half to_out(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_out(float v, __nv_bfloat16) {
  return __float2bfloat16_rn(v);
}

// Physical 16-byte chunk of logical chunk c in row r of a tile CH chunks wide: the 8
// rows one ldmatrix phase reads (r0 .. r0+7, r0 % 8 == 0, same c) land in 8 distinct
// 16-byte bank groups. CH >= 8: rows are multiples of 128 bytes, XOR the low 3 bits
// with r % 8. CH == 4 (64-byte rows, two rows per 128 bytes): XOR with (r / 2) % 4.
template <int CH>
__device__ __forceinline__ int swizzle(int r, int c) {
  static_assert(CH == 4 || CH % 8 == 0, "supported row widths");
  if constexpr (CH == 4) {
    return c ^ ((r >> 1) & 3);
  } else {
    return c ^ (r & 7);
  }
}

// The x (B operand) fragments of k32 step s of 64-k block jj for the warp's MT 8-column
// (m) tiles from the swizzled x tile at shared address sx (C::X_ROW bytes per row):
// ldmatrix matrix q = k 8q .. 8q+7 of rows m, so register q = B rows 8q + 2tig, +1
// (PTX ISA 9.1, 9.7.14.6.2.2, B fragment of sparse m16n8k32; 9.7.14.5.15 "ldmatrix").
template <class C>
__device__ __forceinline__ void load_x_fragments(uint32_t (&b)[C::MT][4], uint32_t sx, int wm0,
                                                 int jj, int s, int lane) {
#pragma unroll
  for (int j = 0; j < C::MT; ++j) {
    const int r = wm0 + 8 * j + (lane & 7);
    const int c = jj * 8 + s * 4 + (lane >> 3);
    ldmatrix_x4(b[j], sx + r * C::X_ROW + swizzle<C::X_CH>(r, c) * 16);
  }
}

template <class C>
__device__ __forceinline__ void zero_acc(float (&acc)[C::NT][C::MT][4]) {
#pragma unroll
  for (int i = 0; i < C::NT; ++i)
#pragma unroll
    for (int j = 0; j < C::MT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
}

// Where a CTA's accumulators go.
struct OutArgs {
  const float* bias;  // [N] float32 or nullptr
  void* out;          // [M, N] x.dtype, row-major
  float* partial;     // [S, M, N] float32 when split-K, else nullptr
  int64_t M, N;
  bool out_vec;       // out 16-byte aligned and N % 8 == 0
};

// Writes a CTA's tile: acc[i][j] is the [CD] fragment of the warp's 16-row (n) tile i and
// 8-column (m) tile j, warp tile origin (wn0, wm0) in the CTA tile at (n0, m0).
// Split-K: float32 partials [z, m, n] (z = blockIdx.z). Else: + bias, one rounding,
// the [BM][BN] tile staged in shared memory (C::OUT_ROW bytes per row, padded so the
// transposed writes do not conflict), then written as 16-byte rows (scalar stores at
// the N edge or for an unaligned out). Must be called by every thread of the CTA after
// the pipeline's last read of shared memory has been issued.
template <typename T, class C>
__device__ __forceinline__ void store_tile(const float (&acc)[C::NT][C::MT][4],
                                           unsigned char* smem, const OutArgs& o, int64_t n0,
                                           int64_t m0, int wn0, int wm0, int tid) {
  const int lane = tid % 32, g = lane >> 2, tig = lane & 3;
  if (o.partial != nullptr) {
    float* part = o.partial + static_cast<int64_t>(blockIdx.z) * o.M * o.N;
#pragma unroll
    for (int i = 0; i < C::NT; ++i)
#pragma unroll
      for (int j = 0; j < C::MT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t n = n0 + wn0 + 16 * i + g + 8 * (q >> 1);  // [CD]
          const int64_t m = m0 + wm0 + 8 * j + 2 * tig + (q & 1);
          if (n < o.N && m < o.M) part[m * o.N + n] = acc[i][j][q];
        }
    return;
  }

  __syncthreads();  // every warp is done reading the pipeline stages
  T* s_out = reinterpret_cast<T*>(smem);
  constexpr int OUT_LD = C::OUT_ROW / 2;
#pragma unroll
  for (int i = 0; i < C::NT; ++i)
#pragma unroll
    for (int q2 = 0; q2 < 2; ++q2) {
      const int nl = wn0 + 16 * i + g + 8 * q2;
      const int64_t n = n0 + nl;
      const float bv = (o.bias != nullptr && n < o.N) ? o.bias[n] : 0.0f;
#pragma unroll
      for (int j = 0; j < C::MT; ++j)
#pragma unroll
        for (int q1 = 0; q1 < 2; ++q1) {
          const int ml = wm0 + 8 * j + 2 * tig + q1;
          s_out[ml * OUT_LD + nl] = to_out(acc[i][j][2 * q2 + q1] + bv, T{});
        }
    }
  __syncthreads();
  T* out = static_cast<T*>(o.out);
  constexpr int CHUNKS = C::BN / 8;
  for (int idx = tid; idx < C::BM * CHUNKS; idx += C::THREADS) {
    const int r = idx / CHUNKS, c = idx % CHUNKS;
    const int64_t m = m0 + r, n = n0 + 8 * c;
    if (m >= o.M || n >= o.N) continue;
    const T* src = s_out + r * OUT_LD + 8 * c;
    if (o.out_vec && n + 8 <= o.N) {
      *reinterpret_cast<uint4*>(out + m * o.N + n) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e2 = 0; e2 < 8 && n + e2 < o.N; ++e2) out[m * o.N + n + e2] = src[e2];
    }
  }
}

// out[m, n] = round(sum_z partial[z, m, n] + bias[n]), z in increasing order.
template <typename T>
__global__ void __launch_bounds__(256)
splitk_reduce_kernel(const float* __restrict__ partial, int splits, const float* __restrict__ bias,
                     T* __restrict__ out, int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[z * total + i];
    if (bias != nullptr) s += bias[i % N];
    out[i] = to_out(s, T{});
  }
}

template <typename T>
cudaError_t launch_splitk_reduce(const OutArgs& o, int splits, cudaStream_t stream) {
  const int64_t total = o.M * o.N;
  const int64_t blocks = (total + 255) / 256 < 65535 * 4 ? (total + 255) / 256 : 65535 * 4;
  splitk_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      o.partial, splits, o.bias, static_cast<T*>(o.out), o.M, o.N);
  return cudaGetLastError();
}

// Grid and split-K factor of one problem for a configuration C (C::BN, BM, BK,
// TARGET_WAVES, MIN_KTILES_PER_SPLIT).
struct Plan {
  bool small;
  int64_t m_tiles, n_tiles;
  int k_tiles, k_tiles_per_split, splits;
};

template <class C>
Plan make_plan(int64_t M, int64_t N, int64_t K, int num_sms, bool small) {
  Plan pl{};
  pl.small = small;
  pl.m_tiles = (M + C::BM - 1) / C::BM;
  pl.n_tiles = (N + C::BN - 1) / C::BN;
  pl.k_tiles = static_cast<int>((K + C::BK - 1) / C::BK);
  const int64_t tiles = pl.m_tiles * pl.n_tiles;
  const int64_t target = static_cast<int64_t>(C::TARGET_WAVES) * (num_sms > 0 ? num_sms : 1);
  int64_t splits = 1;
  if (tiles < target && pl.k_tiles >= 2 * C::MIN_KTILES_PER_SPLIT) {
    splits = (target + tiles - 1) / tiles;
    const int64_t max_splits = pl.k_tiles / C::MIN_KTILES_PER_SPLIT;
    splits = splits < max_splits ? splits : max_splits;
    splits = splits < 32 ? splits : 32;
  }
  pl.k_tiles_per_split = static_cast<int>((pl.k_tiles + splits - 1) / splits);
  if (pl.k_tiles_per_split == 0) pl.k_tiles_per_split = 1;
  // No empty split: recompute the count from the per-split size.
  pl.splits = pl.k_tiles == 0 ? 1 : (pl.k_tiles + pl.k_tiles_per_split - 1) / pl.k_tiles_per_split;
  return pl;
}

// SmallM for M <= SmallM::BM (decode: many narrow CTAs, split-K), LargeM above.
template <class SmallM, class LargeM>
Plan plan_for(int64_t M, int64_t N, int64_t K, int num_sms) {
  return M <= SmallM::BM ? make_plan<SmallM>(M, N, K, num_sms, true)
                         : make_plan<LargeM>(M, N, K, num_sms, false);
}

inline size_t workspace_bytes(const Plan& pl, int64_t M, int64_t N) {
  return pl.splits > 1 ? static_cast<size_t>(pl.splits) * M * N * sizeof(float) : 0;
}

// cudaErrorInvalidValue unless the plan's grid fits (gridDim.y <= 65535) and the given
// workspace holds its split-K partials.
inline cudaError_t check_plan(const Plan& pl, int64_t M, int64_t N, const float* workspace,
                              size_t workspace_bytes_given) {
  if (pl.n_tiles > 65535 || pl.m_tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const size_t need = workspace_bytes(pl, M, N);
  if (need > workspace_bytes_given || (need > 0 && workspace == nullptr))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// More than 48 KB of dynamic shared memory needs an opt-in per function and device
// (CUDA C++ Programming Guide, "Shared Memory"); done once per device (bit d of
// `configured`, one flag word per kernel instantiation), not on every latency-bound call.
template <typename Kernel>
cudaError_t opt_in_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  configured.fetch_or(bit, std::memory_order_release);
  return cudaSuccess;
}

// Launches kernel<<<(m_tiles, n_tiles, splits), C::THREADS, C::SMEM_BYTES>>>(p), opting
// in to the shared memory first (once per device and kernel: `configured`).
template <class C, typename Kernel, typename Params>
cudaError_t launch_tiles(Kernel kernel, const Params& p, const Plan& pl,
                         std::atomic<uint64_t>& configured, cudaStream_t stream) {
  const cudaError_t err = opt_in_smem(kernel, C::SMEM_BYTES, configured);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(pl.m_tiles), static_cast<unsigned>(pl.n_tiles),
                  static_cast<unsigned>(pl.splits));
  kernel<<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse
}  // namespace pyfast_cuda
