// CUDA kernel of pyfast_C::sparse24_mm_tc: out = x @ W.T + bias with W 2:4-sparse, on
// the sparse tensor cores (mma.sp, sm_80 and newer). Torch-free (CUDA headers only);
// the launcher is declared in sparse24_mm.h and called from sparse24_mm_launch.cpp.
//
// Non-finite x: the sparse tensor cores multiply only the kept positions, so a NaN or inf
// of x in a column that a weight row pruned does not reach that row's output, where the
// reference's dense product gives 0 * inf = NaN (the CPU and Triton backends follow the
// reference; README, "Ops"). Not fixed here: it would need a pass over x per call, and
// this kernel has not yet run on a GPU.
//
//   x       : float16/bfloat16 [M, K] row-major (contiguous)
//   values  : x.dtype [N, K/2] canonical 2:4 values (pyfast/formats.py), row-major
//   meta_tc : int32 [ceil(N/16), ceil(K/64), 32]  (pyfast/layouts/sparse24_tc.py)
//   bias    : float32 [N] or null
//   out     : x.dtype [M, N] row-major;  out = float32(x @ W.T) + bias, rounded once
//
// Why out^T = W x^T: mma.sp takes the *A* operand sparse, so W [N, K] is A (rows = n)
// and x is B, K x M in "col" layout = x row-major [M, K]. The accumulator tile is
// (n, m); the epilogue writes it transposed into out[m, n].
//
// PTX references (PTX ISA 9.1, docs.nvidia.com/cuda/parallel-thread-execution):
//  [SP]  9.7.14.6.1 "Sparse matrix storage": 2:4 chunks of 4 consecutive k hold 2
//        kept values; their two 2-bit indices form a nibble (first index in the low
//        2 bits). With mma.sp::ordered_metadata the meaningful nibbles are 0b0100,
//        0b1000, 0b1001, 0b1100, 0b1101, 0b1110 (idx0 < idx1): exactly the canonical
//        meta byte of formats.py. For m16n8k32 the sparsity selector picks the thread
//        pair of each quad that supplies metadata: 0 -> T0,T1; 1 -> T2,T3.
//  [FA]  9.7.14.6.2.2 "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16":
//        A = four .b32 registers, each two kept values of one 4-chunk;
//        groupID g = lane >> 2, tig = lane % 4:
//          reg0: row g,   chunk cols 4*tig .. +3      reg1: row g+8, same chunk
//          reg2: row g,   chunk cols 16+4*tig .. +3   reg3: row g+8, same chunk
//        i.e. on the compressed 16 x 16 tile (2 values per chunk) exactly the dense
//        m16n8k16 A fragment, which ldmatrix.x4 delivers (below).
//        B (Figure 121) = four .b32 registers; register j of lane (g, tig) holds
//        B[k = 8j + 2tig, +1][col g]. Metadata (Figure 122): a .b32 per thread; the
//        even thread of the selected pair holds chunks 0-3 (k 0..15), the odd one
//        chunks 4-7 (k 16..31); bits [4c+3:4c] are chunk c (resp. 4+c) of row g and
//        bits [16+4c+3:16+4c] the same chunk of row g+8. (Same mapping as spelled out
//        in CUTLASS's sparse-QMMA emulation comments, "Representation of E in HMMA".)
//  [CD]  9.7.14.5.8 (m16n8k16 floating point) accumulators: c0,c1 = (row g, cols
//        2tig, 2tig+1), c2,c3 = (row g+8, same cols).
//  [LDM] 9.7.14.5.15 "ldmatrix": .x4 loads four 8x8 b16 matrices; lanes 8q..8q+7 give
//        the row addresses of matrix q; lane l receives row l/4, elements 2(l%4), +1
//        of each matrix into register q.
//  [CPA] 9.7.9.25.3.1 "cp.async": cp-size 16 (.cg) or 4 (.ca); src-size < cp-size
//        zero-fills the rest (src-size 0 reads nothing).
//
// meta_tc (repack_meta): word [t, j, lane = 4g + tig] holds, for 16-row tile t and
// 64-k block j, nibbles c = 0..3 of groups 16j + 4tig + c of row 16t + g in bits
// [4c+3:4c] and of row 16t + g + 8 in bits [16+4c+3:16+4c]. A k64 block is two
// m16n8k32 steps s = 0, 1; step s with selector s reads lanes tig = 2s (groups
// 16j + 8s + 0..3) and 2s + 1 (16j + 8s + 4..7): every lane's word is used by exactly
// one of the two steps, and one 128-byte load per warp feeds both.
//
// Pipeline: STAGES-deep cp.async ring in dynamic shared memory. Stage = values tile
// [BN][BK/2], x tile [BM][BK], meta tile [BN/16][BK/64][32] words. Rows of values/x
// tiles are XOR-swizzled in 16-byte chunks so each ldmatrix phase (8 rows, one chunk
// column) hits 8 distinct bank groups. Out-of-range rows (n >= N, m >= M) and k >= K
// are zero-filled by cp.async src-size 0, so padding contributes exactly 0 (and never
// reads out of bounds); meta tiles past the padded meta_tc are clamped to its last
// tile (any valid metadata multiplies zero values there).
//
// Configurations (chosen by M, launcher below):
//   small (M <= 16): BN 64 x BM 16 x BK 128, 4 warps each 16 n x 16 m, 4 stages
//     (52 KB). Memory-bound on W (values + meta = 1.25 N K bytes vs 2 N K dense): many
//     small CTAs keep loads in flight; split-K (fp32 partials + reduction kernel) when
//     ceil(N/64) CTAs cannot fill ~3 per SM.
//   large (M > 16): BN 128 x BM 128 x BK 64, 8 warps (2 n x 4 m) each 64 n x 32 m
//     (16 mma.sp per k32 step), 4 stages (100 KB); split-K when tiles < SMs.
// Epilogue: bias added in float32, one rounding to x.dtype, tile staged through shared
// memory and written as 16-byte rows (scalar stores at the N edge / unaligned out).
// Split-K writes float32 partials [S, M, N]; splitk_reduce sums them in split order
// (deterministic), adds bias and rounds once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "ptx.h"
#include "sparse24_mm.h"
#include "sparse_mma.h"

namespace {

using namespace pyfast_cuda;          // smem_addr, cp_async_commit/wait, ldmatrix_x4 (ptx.h)
using namespace pyfast_cuda::sparse;  // mma_sp, swizzle, cp_async16/4, store_tile, Plan

// ---------------------------------------------------------------- configuration ----
template <int BN_, int BM_, int BK_, int WARPS_N_, int WARPS_M_, int STAGES_, int MIN_CTAS_,
          int TARGET_WAVES_, int MIN_KTILES_PER_SPLIT_>
struct Config {
  static constexpr int BN = BN_;            // weight rows (n) per CTA
  static constexpr int BM = BM_;            // activation rows (m) per CTA
  static constexpr int BK = BK_;            // k per pipeline stage
  static constexpr int WARPS_N = WARPS_N_, WARPS_M = WARPS_M_;
  static constexpr int STAGES = STAGES_;
  static constexpr int MIN_CTAS = MIN_CTAS_;  // __launch_bounds__ CTAs per SM (caps registers)
  static constexpr int TARGET_WAVES = TARGET_WAVES_;  // split-K aims at this many CTAs per SM
  static constexpr int MIN_KTILES_PER_SPLIT = MIN_KTILES_PER_SPLIT_;
  static constexpr int THREADS = 32 * WARPS_N * WARPS_M;
  static constexpr int WN = BN / WARPS_N, WM = BM / WARPS_M;  // warp tile
  static constexpr int NT = WN / 16, MT = WM / 8;             // mma tiles per warp
  static constexpr int KB64 = BK / 64;                        // metadata blocks per stage
  static constexpr int V_ROW = BK;          // bytes per values row (BK/2 halves)
  static constexpr int X_ROW = 2 * BK;      // bytes per x row
  static constexpr int V_CH = V_ROW / 16, X_CH = X_ROW / 16;  // 16-byte chunks per row
  static constexpr int V_BYTES = BN * V_ROW, X_BYTES = BM * X_ROW;
  static constexpr int E_BYTES = (BN / 16) * KB64 * 32 * 4;
  static constexpr int STAGE_BYTES = V_BYTES + X_BYTES + E_BYTES;
  static constexpr int OUT_ROW = 2 * (BN + 8);  // epilogue staging row (padded: no conflicts)
  static constexpr int SMEM_BYTES =
      STAGES * STAGE_BYTES > BM * OUT_ROW ? STAGES * STAGE_BYTES : BM * OUT_ROW;
  static_assert(BK % 64 == 0 && WN % 16 == 0 && WM % 8 == 0, "tile shapes");
  static_assert((BN * V_CH) % THREADS == 0 && (BM * X_CH) % THREADS == 0, "even 16B loads");
  static_assert((BN * V_ROW / 4) % THREADS == 0 && (BM * X_ROW / 4) % THREADS == 0,
                "even 4B loads");
  static_assert(E_BYTES / 16 <= THREADS, "one metadata chunk per thread at most");
};

// <BN, BM, BK, WARPS_N, WARPS_M, STAGES, MIN_CTAS, TARGET_WAVES, MIN_KTILES_PER_SPLIT>.
// LargeM keeps MIN_CTAS 1: capping it at 128 registers (2 CTAs / SM) made ptxas spill.
using SmallM = Config<64, 16, 128, 4, 1, 4, 1, 3, 2>;
using LargeM = Config<128, 128, 64, 2, 4, 4, 1, 1, 4>;

struct Params {
  const void* x;
  const void* values;
  const uint32_t* meta;  // meta_tc as raw 32-bit words
  const float* bias;     // [N] or nullptr
  void* out;
  float* partial;        // [S, M, N] float32 when split-K, else nullptr
  int64_t M, N, K;
  int64_t T16, K64;      // meta_tc dims 0 and 1
  int k_tiles;           // ceil(K / BK)
  int k_tiles_per_split;
  bool out_vec;          // out 16-byte aligned and N % 8 == 0
};

// ------------------------------------------------------------------ stage loads ----
// Loads k tile kt (k0 = kt * BK) of values, x and meta_tc into one pipeline stage.
template <typename T, class C, bool ALIGNED>
__device__ __forceinline__ void load_stage(const Params& p, uint32_t s_v, uint32_t s_x,
                                           uint32_t s_e, int64_t n0, int64_t m0, int64_t k0,
                                           int tid) {
  const T* vals = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  const int64_t half_k = p.K / 2;
  if constexpr (ALIGNED) {
    // 16 bytes = 8 kept values = 16 k (K % 16 == 0: a chunk is all in or all out).
#pragma unroll
    for (int it = 0; it < C::BN * C::V_CH / C::THREADS; ++it) {
      const int idx = tid + it * C::THREADS, r = idx / C::V_CH, c = idx % C::V_CH;
      const int64_t n = n0 + r, k = k0 + 16 * c;
      const bool ok = n < p.N && k < p.K;
      cp_async16(s_v + r * C::V_ROW + swizzle<C::V_CH>(r, c) * 16,
                 ok ? vals + n * half_k + k / 2 : vals, ok);
    }
    // 16 bytes = 8 k of one x row.
#pragma unroll
    for (int it = 0; it < C::BM * C::X_CH / C::THREADS; ++it) {
      const int idx = tid + it * C::THREADS, r = idx / C::X_CH, c = idx % C::X_CH;
      const int64_t m = m0 + r, k = k0 + 8 * c;
      const bool ok = m < p.M && k < p.K;
      cp_async16(s_x + r * C::X_ROW + swizzle<C::X_CH>(r, c) * 16, ok ? x + m * p.K + k : x,
                 ok);
    }
  } else {
    // 4 bytes = 2 kept values = 4 k (K % 4 == 0: all in or all out).
    constexpr int V4 = C::V_ROW / 4, X4 = C::X_ROW / 4;
#pragma unroll 4
    for (int it = 0; it < C::BN * V4 / C::THREADS; ++it) {
      const int idx = tid + it * C::THREADS, r = idx / V4, e = idx % V4;
      const int64_t n = n0 + r, k = k0 + 4 * e;
      const bool ok = n < p.N && k < p.K;
      const int b = 4 * e;  // byte offset in the logical row
      cp_async4(s_v + r * C::V_ROW + swizzle<C::V_CH>(r, b / 16) * 16 + b % 16,
                ok ? vals + n * half_k + k / 2 : vals, ok);
    }
    // 4 bytes = 2 k of one x row.
#pragma unroll 4
    for (int it = 0; it < C::BM * X4 / C::THREADS; ++it) {
      const int idx = tid + it * C::THREADS, r = idx / X4, e = idx % X4;
      const int64_t m = m0 + r, k = k0 + 2 * e;
      const bool ok = m < p.M && k < p.K;
      const int b = 4 * e;
      cp_async4(s_x + r * C::X_ROW + swizzle<C::X_CH>(r, b / 16) * 16 + b % 16,
                ok ? x + m * p.K + k : x, ok);
    }
  }
  // Metadata: 128 bytes per (16-row tile, k64 block) = 8 chunks, always 16-byte aligned.
  constexpr int E_CHUNKS = C::E_BYTES / 16;
  if (tid < E_CHUNKS) {
    const int tl = tid / (8 * C::KB64), jj = (tid / 8) % C::KB64, w = tid % 8;
    const int64_t t = min(n0 / 16 + tl, p.T16 - 1), kb = min(k0 / 64 + jj, p.K64 - 1);
    cp_async16(s_e + ((tl * C::KB64 + jj) * 32 + 4 * w) * 4, p.meta + (t * p.K64 + kb) * 32 + 4 * w,
               true);
  }
}

// ------------------------------------------------------------------ the kernel ----
// grid: (ceil(M/BM), ceil(N/BN), S); CTA (bx, by, z) computes out rows m0.., columns
// n0.. over k tiles [z * k_tiles_per_split, min((z + 1) * k_tiles_per_split, k_tiles)).
template <typename T, class C, bool ALIGNED>
__global__ void __launch_bounds__(C::THREADS, C::MIN_CTAS)
sparse24_mm_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * C::BN;
  const int kt_begin = blockIdx.z * p.k_tiles_per_split;
  const int kt_end = min(kt_begin + p.k_tiles_per_split, p.k_tiles);
  const int n_kt = max(kt_end - kt_begin, 0);

  const uint32_t s_base = smem_addr(smem);
  auto s_v = [&](int stage) { return s_base + stage * C::STAGE_BYTES; };
  auto s_x = [&](int stage) { return s_v(stage) + C::V_BYTES; };
  auto s_e = [&](int stage) { return s_x(stage) + C::X_BYTES; };

  // Prologue: STAGES - 1 tiles in flight (one commit group each, empty past the end).
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < n_kt) {
      load_stage<T, C, ALIGNED>(p, s_v(s), s_x(s), s_e(s), n0, m0,
                                static_cast<int64_t>(kt_begin + s) * C::BK, tid);
    }
    cp_async_commit();
  }

  const int warp_n = warp % C::WARPS_N, warp_m = warp / C::WARPS_N;
  const int wn0 = warp_n * C::WN, wm0 = warp_m * C::WM;  // warp tile origin in the CTA
  float acc[C::NT][C::MT][4];
  zero_acc<C>(acc);

  for (int kt = 0; kt < n_kt; ++kt) {
    // Tile kt has landed (at most STAGES - 2 younger groups pending) for every thread;
    // the barrier also retires all reads of the stage refilled just below (used at kt-1).
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int next = kt + C::STAGES - 1;
    if (next < n_kt) {
      const int st = next % C::STAGES;
      load_stage<T, C, ALIGNED>(p, s_v(st), s_x(st), s_e(st), n0, m0,
                                static_cast<int64_t>(kt_begin + next) * C::BK, tid);
    }
    cp_async_commit();

    const int st = kt % C::STAGES;
    const uint32_t sv = s_v(st), sx = s_x(st);
    const uint32_t* se = reinterpret_cast<const uint32_t*>(smem + st * C::STAGE_BYTES +
                                                           C::V_BYTES + C::X_BYTES);
#pragma unroll
    for (int jj = 0; jj < C::KB64; ++jj) {
      uint32_t e[C::NT];  // this lane's metadata word for each 16-row tile (both steps)
#pragma unroll
      for (int i = 0; i < C::NT; ++i) e[i] = se[((wn0 / 16 + i) * C::KB64 + jj) * 32 + lane];
#pragma unroll
      for (int s = 0; s < 2; ++s) {  // k32 step s of the k64 block, sparsity selector s
        uint32_t a[C::NT][4], b[C::MT][4];
#pragma unroll
        for (int i = 0; i < C::NT; ++i) {
          // [LDM] matrix q = lane / 8: rows +8 for q odd, kept columns +8 for q >= 2
          // -> registers a0..a3 in the [FA] order.
          const int r = wn0 + 16 * i + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = jj * 4 + s * 2 + (lane >> 4);
          ldmatrix_x4(a[i], sv + r * C::V_ROW + swizzle<C::V_CH>(r, c) * 16);
        }
        load_x_fragments<C>(b, sx, wm0, jj, s, lane);
#pragma unroll
        for (int i = 0; i < C::NT; ++i)
#pragma unroll
          for (int j = 0; j < C::MT; ++j) {
            mma_sp_sel<T>(acc[i][j], a[i], b[j], e[i], s);
          }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; keep the smem reuse below safe

  const OutArgs o{p.bias, p.out, p.partial, p.M, p.N, p.out_vec};
  store_tile<T, C>(acc, smem, o, n0, m0, wn0, wm0, tid);
}

// ------------------------------------------------------------------ host side ----
Plan plan(int64_t M, int64_t N, int64_t K, int num_sms) {
  return plan_for<SmallM, LargeM>(M, N, K, num_sms);
}

template <typename T, class C, bool ALIGNED>
cudaError_t launch_main(const Params& p, const Plan& pl, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  return launch_tiles<C>(sparse24_mm_kernel<T, C, ALIGNED>, p, pl, configured, stream);
}

template <typename T>
cudaError_t launch(Params p, const Plan& pl, bool aligned, cudaStream_t stream) {
  p.k_tiles = pl.k_tiles;
  cudaError_t err;
  if (pl.small) {
    err = aligned ? launch_main<T, SmallM, true>(p, pl, stream)
                  : launch_main<T, SmallM, false>(p, pl, stream);
  } else {
    err = aligned ? launch_main<T, LargeM, true>(p, pl, stream)
                  : launch_main<T, LargeM, false>(p, pl, stream);
  }
  if (err != cudaSuccess || pl.splits == 1) return err;
  return launch_splitk_reduce<T>(OutArgs{p.bias, p.out, p.partial, p.M, p.N, p.out_vec},
                                 pl.splits, stream);
}

}  // namespace

size_t pyfast_sparse24_mm_tc_workspace_bytes(int64_t M, int64_t N, int64_t K, int num_sms) {
  if (M <= 0 || N <= 0 || K < 0) return 0;
  return workspace_bytes(plan(M, N, K, num_sms), M, N);
}

cudaError_t pyfast_sparse24_mm_tc(const void* x, const void* values, const int32_t* meta_tc,
                                  const float* bias, void* out, int x_dtype, int64_t M,
                                  int64_t N, int64_t K, float* workspace,
                                  size_t workspace_bytes_given, int num_sms,
                                  cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0 || K % 4 != 0) return cudaErrorInvalidValue;
  if (x_dtype != PYFAST_F16 && x_dtype != PYFAST_BF16) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(meta_tc) % 16 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 4 != 0 || reinterpret_cast<uintptr_t>(values) % 4 != 0)
    return cudaErrorInvalidValue;
  const Plan pl = plan(M, N, K, num_sms);
  const cudaError_t bad = check_plan(pl, M, N, workspace, workspace_bytes_given);
  if (bad != cudaSuccess) return bad;

  Params p{};
  p.x = x;
  p.values = values;
  p.meta = reinterpret_cast<const uint32_t*>(meta_tc);
  p.bias = bias;
  p.out = out;
  p.partial = pl.splits > 1 ? workspace : nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.T16 = (N + 15) / 16;
  p.K64 = (K + 63) / 64;
  p.k_tiles_per_split = pl.k_tiles_per_split;
  p.out_vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && N % 8 == 0;
  const bool aligned = K % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(values) % 16 == 0;
  return x_dtype == PYFAST_F16 ? launch<__half>(p, pl, aligned, stream)
                               : launch<__nv_bfloat16>(p, pl, aligned, stream);
}
