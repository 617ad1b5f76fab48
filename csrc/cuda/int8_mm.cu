// CUDA kernel of pyfast_C::int8_mm: int8 x int8 -> int32 on the tensor cores,
// with the float32 epilogue of pyfast/reference.py fused. Torch-free (CUDA headers
// only); launcher declared in int8_mm.h, called from int8_mm_launch.cpp.
//
//   a       : int8    [M, K] row stride lda    activations
//   b       : int8    [N, K] row stride ldb    weight (nn.Linear layout)
//   a_scale : float32 [M],  b_scale : float32 [N],  bias : float32 [N] or null
//   out     : float32/float16/bfloat16 [M, N] contiguous
//   out[m, n] = cast(((float(acc) * a_scale[m]) * b_scale[n]) + bias[n])
//
// Sources (PTX ISA 8.x / 9.0, CUDA C++ Programming Guide 12.x/13.x; section numbers
// are those of PTX ISA 8.x and move between versions, the titles do not):
//  * mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA 9.7.14.5.14 "mma",
//    fragments in 9.7.14.5.10 "Matrix Fragments for mma.m16n8k32"), with
//    groupID g = lane >> 2 and threadID_in_group t = lane % 4:
//      A (16 x 32, row): 4 x .b32, a_i (i = 0..15, 4 per register, low byte first)
//        row = g for i in [0,4) and [8,12), g + 8 otherwise;
//        col = 4t + (i & 3) for i < 8, 4t + (i & 3) + 16 for i >= 8.
//        So register 0 = row g, k 4t..4t+3; 1 = row g+8, same k; 2 = row g,
//        k 16+4t..; 3 = row g+8, k 16+4t.. .
//      B (32 x 8, col): 2 x .b32, b_i (i = 0..7): row (k) = 4t + (i & 3) (+16 for
//        i >= 4), col (n) = g. "col" means B is stored N-major, K contiguous:
//        exactly b [N, K], so no transpose is needed anywhere.
//      C/D (16 x 8, s32): c0, c1 at row g, cols 2t, 2t+1; c2, c3 at row g+8.
//  * ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA 9.7.14.5.15 "ldmatrix"):
//    lanes 8j..8j+7 give the 8 row addresses (16 bytes each) of matrix j, and
//    lane l receives in register j the 4 bytes at row l / 4, bytes 4 (l % 4)..+3
//    of matrix j. With int8 data a 16-byte row is 16 k-values, so one matrix
//    register is exactly "row g, k 4t..4t+3": the A and B fragments above.
//      A, one m16 x k32 block: lane l addresses row l % 16, 16-byte chunk l / 16
//        (matrices: rows 0-7 k0-15, rows 8-15 k0-15, rows 0-7 k16-31, rows 8-15
//        k16-31 = registers a0..a3).
//      B, two n8 x k32 blocks: lane l addresses row 8 (l / 16) + l % 8, chunk
//        (l / 8) % 2 (matrices: n0-7 k0-15, n0-7 k16-31, n8-15 k0-15, n8-15
//        k16-31 = {b0, b1} of the first n8 tile, then of the second).
//  * cp.async.cg.shared.global [dst], [src], 16, src_size (PTX ISA 9.7.9.25.3
//    "cp.async"): copies src_size bytes (0..16) and zero-fills the rest of the 16,
//    so rows past M or N and k past K arrive as zeros and add nothing to the
//    int32 sums; cp.async.commit_group / cp.async.wait_group N make the
//    multi-stage pipeline (CUDA C++ Programming Guide, "Asynchronous Data Copies").
//    cp-size 16 needs 16-byte-aligned addresses: the fast path requires a, b
//    16-byte aligned and lda, ldb multiples of 16 (K itself may be anything: the
//    last chunk of a row is a partial copy). Otherwise kAligned = false loads
//    bytes with predicated ld.global and stores 16-byte rows to shared memory
//    (slower, same bits).
//
// Shared memory: per stage a tile of BM rows of a and BN rows of b, 64 bytes (k)
// each = 4 chunks of 16 bytes. 32 banks x 4 bytes = 128 bytes per bank row (CUDA
// C++ Programming Guide, "Shared Memory", compute capability 8.x/9.0), so two tile
// rows share a bank row and rows r, r+2, r+4, r+6 would hit the same banks for one
// ldmatrix phase (8 rows, one chunk). The chunk is stored at (chunk ^ ((row >> 1)
// & 3)): in 8 consecutive rows starting at a multiple of 8, (row & 1, swizzled
// chunk) takes 8 distinct values, i.e. the 8 addresses cover all 32 banks once
// (conflict-free ldmatrix and cp.async stores).
//
// Work split: a 1-D grid of BM x BN output tiles, walked in groups of kGroupM tile
// rows so that CTAs running together share tiles of a and b in L2; blockIdx.y is
// the K split. With one split the fused epilogue writes `out`; with several (few
// tiles for the SMs, long K) each split writes its exact int32 partial sums to a
// workspace [splits, M, N] and a second kernel adds them (integer addition:
// exact and order-independent, every partial is bounded by 128 * 128 * K) and
// runs the same epilogue, so split-K is bit-identical to no split.
//
// Epilogue: __int2float_rn (round to nearest even, as torch's int32 -> float32),
// __fmul_rn, __fmul_rn, __fadd_rn (no FMA contraction: "Intrinsic Functions" of
// the Programming Guide), __float2half_rn / __float2bfloat16_rn (RNE, as .to()).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "int8_mm.h"
#include "ptx.h"

namespace {

using namespace pyfast_cuda;  // smem_addr, cp_async_commit/wait, ldmatrix_x4 (ptx.h)

constexpr int kBK = 64;                  // k bytes per tile row per stage
constexpr int kChunks = kBK / 16;        // 16-byte chunks per tile row
constexpr int kGroupM = 8;               // tile rows per raster group (L2 reuse)
constexpr int kMaxSplits = 16;
constexpr int kMinKTilesPerSplit = 4;    // a split covers at least 4 * 64 = 256 of K
constexpr int kReduceThreads = 256;
constexpr int64_t kSmallMaxM = 32;    // M <= 32: SmallM
constexpr int64_t kMediumMaxM = 128;  // 32 < M <= 128: MediumM; larger M: LargeM

// One tile configuration: BM x BN outputs per CTA, WARPS_M x WARPS_N warps each
// computing a (BM / WARPS_M) x (BN / WARPS_N) block, STAGES-deep cp.async pipeline.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, kMinBlocks = MIN_BLOCKS_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16;  // m16 tiles per warp
  static constexpr int NI = WN / 8;   // n8 tiles per warp
  static constexpr int kAChunks = BM * kChunks / kThreads;  // cp.async per thread per stage
  static constexpr int kBChunks = BN * kChunks / kThreads;
  static constexpr int kStageBytes = (BM + BN) * kBK;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: whole m16 tiles, pairs of n8 tiles");
  static_assert(kAChunks >= 1 && kAChunks * kThreads == BM * kChunks, "A chunks split evenly");
  static_assert(kBChunks >= 1 && kBChunks * kThreads == BN * kChunks, "B chunks split evenly");
  static_assert(STAGES >= 2, "a pipeline needs two stages");
};

// M <= 32 (decode): 1 x 4 warps of 32 x 16; 6 stages keep 20 KiB of weight in flight
// per CTA, and CTAs are small (36 KiB shared) so several fit on an SM.
using SmallM = Config<32, 64, 1, 4, 6, 4>;
// 32 < M <= 128: 2 x 2 warps of 32 x 64, 48 KiB shared.
using MediumM = Config<64, 128, 2, 2, 4, 2>;
// M > 128: 2 x 4 warps of 64 x 32, 64 KiB shared, two CTAs per SM.
using LargeM = Config<128, 128, 2, 4, 4, 2>;

struct Params {
  const int8_t* a;
  const int8_t* b;
  const float* a_scale;
  const float* b_scale;
  const float* bias;       // null: no bias
  void* out;
  int32_t* ws;             // null: one split, the GEMM kernel runs the epilogue
  int64_t lda, ldb;
  int M, N, K;
  int out_dtype;
  int tiles_m, tiles_n;
  int k_tiles_per_split;
};

// --- PTX wrappers ------------------------------------------------------------------

// 16-byte async copy global -> shared; bytes in [0, 16] are read, the rest zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  // .L2::128B: also fetch the rest of the 128-byte line into L2; a tile row is 64
  // bytes, so the next k-tile of the same row is then an L2 hit.
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(bytes)
               : "memory");
}

// c (16 x 8 s32) += a (16 x 32 s8, row) * b (32 x 8 s8, col). Registers only (not
// volatile), so the compiler may schedule it freely between the ldmatrix loads.
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` (XOR swizzle, see top).
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// --- epilogue ------------------------------------------------------------------------

__device__ __forceinline__ float epilogue(int32_t acc, float as, float bs, const float* bias,
                                          int n) {
  const float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), as), bs);
  return bias == nullptr ? v : __fadd_rn(v, __ldg(bias + n));
}

__device__ __forceinline__ void store_one(void* out, int64_t i, float v, int dtype) {
  if (dtype == PYFAST_F32) {
    static_cast<float*>(out)[i] = v;
  } else if (dtype == PYFAST_F16) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

// Two neighbours (i, i + 1) in one store; i even and the row stride even, so the
// pair is aligned to twice the element size.
__device__ __forceinline__ void store_two(void* out, int64_t i, float v0, float v1, int dtype) {
  if (dtype == PYFAST_F32) {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + i) = make_float2(v0, v1);
  } else if (dtype == PYFAST_F16) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(out) + i) = __floats2half2_rn(v0, v1);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + i) =
        __floats2bfloat162_rn(v0, v1);
  }
}

// --- the GEMM kernel -----------------------------------------------------------------

// Loads k-tile `kt` (global k in [64 kt, 64 kt + 64)) of `rows` tile rows into the
// shared tile at `tile` (u32 shared address) / `tile_ptr` (generic pointer).
// row_ptr[i] / row_ok[i]: the global row start and whether it is inside the matrix
// for this thread's i-th chunk; chunk ids are tid + i * kThreads.
template <class C, int kCount, bool kAligned>
__device__ __forceinline__ void load_tile(uint32_t tile, uint8_t* tile_ptr,
                                          const int8_t* const (&row_ptr)[kCount],
                                          const bool (&row_ok)[kCount], const int8_t* fallback,
                                          int kt, int K) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    const int id = static_cast<int>(threadIdx.x) + i * C::kThreads;
    const int row = id / kChunks, chunk = id % kChunks;
    const int k = kt * kBK + chunk * 16;
    const int bytes = row_ok[i] ? max(0, min(16, K - k)) : 0;
    // With bytes == 0 nothing is read; point at a valid address all the same.
    const int8_t* src = bytes > 0 ? row_ptr[i] + k : fallback;
    const uint32_t off = swizzle(row, chunk);
    if constexpr (kAligned) {
      cp_async_16(tile + off, src, bytes);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        if (j < bytes) {
          w[j / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(__ldg(src + j))) << (8 * (j % 4));
        }
      }
      *reinterpret_cast<uint4*>(tile_ptr + off) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <class C, bool kAligned>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) int8_mm_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;

  // Tile of this CTA: groups of kGroupM tile rows, column-major inside a group.
  const int pid = static_cast<int>(blockIdx.x);
  const int group_tiles = kGroupM * p.tiles_n;
  const int first_m = (pid / group_tiles) * kGroupM;
  const int group_rows = min(p.tiles_m - first_m, kGroupM);
  const int in_group = pid % group_tiles;
  const int m0 = (first_m + in_group % group_rows) * C::BM;
  const int n0 = (in_group / group_rows) * C::BN;

  // K range of this split, in k-tiles.
  const int k_tiles_all = (p.K + kBK - 1) / kBK;
  const int kt0 = static_cast<int>(blockIdx.y) * p.k_tiles_per_split;
  const int k_tiles = max(0, min(k_tiles_all, kt0 + p.k_tiles_per_split) - kt0);

  // Global rows this thread copies (the same rows for every k-tile).
  const int8_t* a_row[C::kAChunks];
  bool a_ok[C::kAChunks];
#pragma unroll
  for (int i = 0; i < C::kAChunks; ++i) {
    const int m = m0 + (tid + i * C::kThreads) / kChunks;
    a_ok[i] = m < p.M;
    a_row[i] = p.a + (a_ok[i] ? static_cast<int64_t>(m) * p.lda : 0);
  }
  const int8_t* b_row[C::kBChunks];
  bool b_ok[C::kBChunks];
#pragma unroll
  for (int i = 0; i < C::kBChunks; ++i) {
    const int n = n0 + (tid + i * C::kThreads) / kChunks;
    b_ok[i] = n < p.N;
    b_row[i] = p.b + (b_ok[i] ? static_cast<int64_t>(n) * p.ldb : 0);
  }

  const uint32_t smem_base = smem_addr(smem);
  auto load_stage = [&](int stage, int kt) {
    const uint32_t a_tile = smem_base + stage * C::kStageBytes;
    uint8_t* a_ptr = smem + stage * C::kStageBytes;
    load_tile<C, C::kAChunks, kAligned>(a_tile, a_ptr, a_row, a_ok, p.a, kt, p.K);
    load_tile<C, C::kBChunks, kAligned>(a_tile + C::BM * kBK, a_ptr + C::BM * kBK, b_row, b_ok,
                                        p.b, kt, p.K);
  };

  int32_t acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Prologue: STAGES - 1 tiles in flight. One commit per slot even when empty, so
  // that "group i = k-tile i" holds and wait_group<STAGES - 2> below means "k-tile
  // kt has landed" (the PTX ISA counts empty groups like any other).
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, kt0 + s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();  // this thread's copies of k-tile kt are done
    __syncthreads();                 // everyone's are, and stage (kt - 1) % STAGES is free
    const int next = kt + C::STAGES - 1;
    if (next < k_tiles) load_stage(next % C::STAGES, kt0 + next);
    cp_async_commit();

    const int stage = kt % C::STAGES;
    const uint32_t a_tile = smem_base + stage * C::kStageBytes;
    const uint32_t b_tile = a_tile + C::BM * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {  // two k32 steps per 64-byte tile row
      uint32_t af[C::MI][4];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        const int row = warp_m * C::WM + i * 16 + lane % 16;
        ldmatrix_x4(af[i], a_tile + swizzle(row, 2 * ks + lane / 16));
      }
      uint32_t bf[C::NI][2];
#pragma unroll
      for (int j = 0; j < C::NI / 2; ++j) {
        const int row = warp_n * C::WN + j * 16 + (lane / 16) * 8 + lane % 8;
        uint32_t r[4];
        ldmatrix_x4(r, b_tile + swizzle(row, 2 * ks + (lane / 8) % 2));
        bf[2 * j][0] = r[0];
        bf[2 * j][1] = r[1];
        bf[2 * j + 1][0] = r[2];
        bf[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NI; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; leave none behind

  // Epilogue straight from the accumulator fragments: c0, c1 at (row g, cols 2t,
  // 2t + 1), c2, c3 at row g + 8.
  const int g = lane / 4, t = lane % 4;
  const bool pairs = p.N % 2 == 0;  // (m * N + n) even for even n: aligned pair stores
#pragma unroll
  for (int i = 0; i < C::MI; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + warp_m * C::WM + i * 16 + g + 8 * h;
      if (m >= p.M) continue;
      if (p.ws != nullptr) {
        int32_t* ws = p.ws + (static_cast<int64_t>(blockIdx.y) * p.M + m) * p.N;
#pragma unroll
        for (int j = 0; j < C::NI; ++j) {
          const int n = n0 + warp_n * C::WN + j * 8 + 2 * t;
          if (pairs && n + 1 < p.N) {
            *reinterpret_cast<int2*>(ws + n) = make_int2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          } else {
            if (n < p.N) ws[n] = acc[i][j][2 * h];
            if (n + 1 < p.N) ws[n + 1] = acc[i][j][2 * h + 1];
          }
        }
        continue;
      }
      const float as = __ldg(p.a_scale + m);
      const int64_t row = static_cast<int64_t>(m) * p.N;
#pragma unroll
      for (int j = 0; j < C::NI; ++j) {
        const int n = n0 + warp_n * C::WN + j * 8 + 2 * t;
        if (n + 1 < p.N) {
          const float v0 = epilogue(acc[i][j][2 * h], as, __ldg(p.b_scale + n), p.bias, n);
          const float v1 = epilogue(acc[i][j][2 * h + 1], as, __ldg(p.b_scale + n + 1), p.bias,
                                    n + 1);
          if (pairs) {
            store_two(p.out, row + n, v0, v1, p.out_dtype);
          } else {
            store_one(p.out, row + n, v0, p.out_dtype);
            store_one(p.out, row + n + 1, v1, p.out_dtype);
          }
        } else if (n < p.N) {
          store_one(p.out, row + n,
                    epilogue(acc[i][j][2 * h], as, __ldg(p.b_scale + n), p.bias, n), p.out_dtype);
        }
      }
    }
  }
}

// Split-K second pass: out[m, n] = epilogue(sum_s ws[s, m, n]). One thread per output.
__global__ void __launch_bounds__(kReduceThreads) splitk_epilogue_kernel(const Params p,
                                                                         int splits) {
  const int64_t total = static_cast<int64_t>(p.M) * p.N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    int32_t acc = 0;
    for (int s = 0; s < splits; ++s) acc += __ldg(p.ws + s * total + i);  // exact: |acc| < 2**31
    const int m = static_cast<int>(i / p.N), n = static_cast<int>(i % p.N);
    store_one(p.out, i, epilogue(acc, __ldg(p.a_scale + m), __ldg(p.b_scale + n), p.bias, n),
              p.out_dtype);
  }
}

// --- host side ---------------------------------------------------------------------

enum class Tile { kSmall, kMedium, kLarge };

struct Plan {
  Tile tile;
  int tiles_m, tiles_n;
  int splits, k_tiles_per_split;
};

template <class C>
Plan make_plan(Tile tile, int64_t M, int64_t N, int64_t K, int sm_count) {
  Plan plan{tile, static_cast<int>((M + C::BM - 1) / C::BM),
            static_cast<int>((N + C::BN - 1) / C::BN), 1, 0};
  const int64_t tiles = static_cast<int64_t>(plan.tiles_m) * plan.tiles_n;
  const int k_tiles = static_cast<int>((K + kBK - 1) / kBK);
  // Split K only when the output tiles leave SMs idle: aim at two CTAs per SM,
  // keeping at least kMinKTilesPerSplit k-tiles per split.
  int splits = 1;
  if (sm_count > 0 && tiles < sm_count) {
    const int64_t want = (2 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
    const int64_t by_k = k_tiles / kMinKTilesPerSplit;
    splits = static_cast<int>(std::min<int64_t>(std::min<int64_t>(want, by_k), kMaxSplits));
    splits = splits < 2 ? 1 : splits;
  }
  plan.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  // No empty split: e.g. 10 k-tiles over 4 splits is 3 + 3 + 3 + 1, over 3 it is 4 + 4 + 2.
  plan.splits = plan.k_tiles_per_split > 0
                    ? (k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split
                    : 1;
  return plan;
}

Plan plan_for(int64_t M, int64_t N, int64_t K, int sm_count) {
  if (M <= kSmallMaxM) return make_plan<SmallM>(Tile::kSmall, M, N, K, sm_count);
  if (M <= kMediumMaxM) return make_plan<MediumM>(Tile::kMedium, M, N, K, sm_count);
  return make_plan<LargeM>(Tile::kLarge, M, N, K, sm_count);
}

bool args_ok(int64_t M, int64_t N, int64_t K) {
  return M >= 0 && N >= 0 && K >= 0 && M <= PYFAST_INT8_MM_MAX_ROWS &&
         N <= PYFAST_INT8_MM_MAX_ROWS && K <= PYFAST_INT8_MM_MAX_K;
}

template <class C>
cudaError_t launch_gemm(const Params& p, bool aligned, int splits, cudaStream_t stream) {
  if (static_cast<int64_t>(p.tiles_m) * p.tiles_n > INT32_MAX) return cudaErrorInvalidValue;
  auto kernel = aligned ? int8_mm_kernel<C, true> : int8_mm_kernel<C, false>;
  if (C::kSmemBytes > 48 * 1024) {  // above 48 KiB dynamic shared memory is opt-in
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(p.tiles_m * p.tiles_n), static_cast<unsigned>(splits));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int64_t pyfast_int8_mm_workspace_elems(int64_t M, int64_t N, int64_t K, int sm_count) {
  if (!args_ok(M, N, K) || M == 0 || N == 0) return 0;
  const Plan plan = plan_for(M, N, K, sm_count);
  return plan.splits > 1 ? plan.splits * M * N : 0;
}

cudaError_t pyfast_int8_mm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                           int64_t M, int64_t N, int64_t K, const float* a_scale,
                           const float* b_scale, const float* bias, void* out, int out_dtype,
                           int32_t* workspace, int64_t workspace_elems, int sm_count,
                           cudaStream_t stream) {
  if (!args_ok(M, N, K) || lda < K || ldb < K) return cudaErrorInvalidValue;
  if (out_dtype != PYFAST_F32 && out_dtype != PYFAST_F16 && out_dtype != PYFAST_BF16) {
    return cudaErrorInvalidValue;
  }
  if (M == 0 || N == 0) return cudaSuccess;
  // With K == 0 the int8 operands are never read, and an empty tensor's data pointer may
  // be null (seen on an H100: the K = 0 test got cudaErrorInvalidValue here).
  if ((K > 0 && (a == nullptr || b == nullptr)) || a_scale == nullptr || b_scale == nullptr ||
      out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const Plan plan = plan_for(M, N, K, sm_count);
  if (plan.splits > 1 && (workspace == nullptr || workspace_elems < plan.splits * M * N)) {
    return cudaErrorInvalidValue;
  }

  Params p;
  p.a = a;
  p.b = b;
  p.a_scale = a_scale;
  p.b_scale = b_scale;
  p.bias = bias;
  p.out = out;
  p.ws = plan.splits > 1 ? workspace : nullptr;
  p.lda = lda;
  p.ldb = ldb;
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.out_dtype = out_dtype;
  p.tiles_m = plan.tiles_m;
  p.tiles_n = plan.tiles_n;
  p.k_tiles_per_split = plan.k_tiles_per_split;

  // 16-byte cp.async: every chunk source (row start + multiple of 16) 16-byte aligned.
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b) % 16 == 0 && lda % 16 == 0 && ldb % 16 == 0;
  cudaError_t err;
  switch (plan.tile) {
    case Tile::kSmall: err = launch_gemm<SmallM>(p, aligned, plan.splits, stream); break;
    case Tile::kMedium: err = launch_gemm<MediumM>(p, aligned, plan.splits, stream); break;
    default: err = launch_gemm<LargeM>(p, aligned, plan.splits, stream); break;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;

  const int64_t blocks = std::min<int64_t>((M * N + kReduceThreads - 1) / kReduceThreads,
                                           int64_t{1} << 20);
  splitk_epilogue_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
      p, plan.splits);
  return cudaGetLastError();
}
