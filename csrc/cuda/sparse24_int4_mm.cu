// CUDA kernel of pyfast_C::sparse24_int4_mm_tc: out = x @ W.T + bias with W 2:4-sparse
// and its kept values int4 codes with group-wise scales and zero points, on the sparse
// tensor cores (mma.sp, sm_80 and newer). The kept codes are dequantized in registers
// straight into the sparse A fragments, so the weight is read at about 3 bits per dense
// element (2 for the codes, 1 for the 2:4 indices) plus the group parameters. The design
// is sparse24_mm.cu's (read that file first) with its ldmatrix of the kept values
// replaced by one 8-byte load of fragment-ordered codes and the int4 dequantization of
// int4_mm.cu; it is the stretch kernel of issue 4, in the manner of Sparse-Marlin
// (Castro et al., "MARLIN ... Sparse-MARLIN", 2024). Torch-free (CUDA headers only);
// the launcher is declared in sparse24_int4_mm.h, called from sparse24_int4_mm_launch.cpp.
//
// Non-finite x: the sparse tensor cores multiply only the kept positions, so a NaN or inf
// of x in a column that a weight row pruned does not reach that row's output, where the
// reference's dense product gives 0 * inf = NaN (the CPU and Triton backends follow the
// reference; README, "Ops"). Not fixed here: it would need a pass over x per call, and
// this kernel has not yet run on a GPU.
//
//   x        : float16/bfloat16 [M, K] row-major, contiguous, 16-byte aligned, K % 8 == 0
//   codes_tc : int32 [ceil(N/16), ceil(K/64), 32, 2]  (pyfast/layouts/sparse24_int4_tc.py)
//   meta_tc  : int32 [ceil(N/16), ceil(K/64), 32]     (pyfast/layouts/sparse24_tc.py)
//   scales   : float32 [N, G];  zeros : uint8 [N, G] read as 32-bit words (G groups of
//              group_len dense k per row; group_len = K for one group per row)
//   bias     : float32 [N] or null
//   out      : x.dtype [M, N] row-major;  out = float32(x @ W.T) + bias, rounded once,
//              W[n, k] = x.dtype(x.dtype(q - zero) * x.dtype(scale)) at the kept k
//              (int4_mm_tc's rounding: the tensor cores multiply x.dtype operands)
//
// Operands (PTX ISA 9.1, 9.7.14.6.2.2 "Matrix Fragments for sparse mma.m16n8k32 with
// .f16 and .bf16 types"): W is the sparse A operand, x the B operand (see the header of
// sparse24_mm.cu for B, the metadata and the accumulators). A is four .b32 registers per
// lane (g = lane >> 2, tig = lane % 4): register r holds the two kept values of row
// g + 8 (r & 1), 4-chunk tig + 4 (r >> 1) of the k32 step, the first (lower k) in the low
// half. codes_tc word [t, j, lane, s] (16-row tile t, 64-k block j, k32 step s) holds
// exactly those eight codes as nibbles: register r's pair at nibbles r and r + 4, so
// dequant2(word >> 4r, ...) (int4_dequant.h) builds register r with one lop3, one
// subtraction and one multiply. A lane reads both steps' words of a block as one 8-byte
// shared load; a warp reads 256 contiguous bytes (no bank conflict).
//
// Group parameters: scale slots every 32 k (the smallest group size; a k32 step lies in
// one group since every group size is a multiple of 32 and steps start at multiples of
// 32). A stage holds, for each slot and CTA row, the float32 scale and the 32-bit word
// of zeros holding the row's zero point, copied with 4-byte cp.async (zero-filled for
// rows >= N); the lanes convert them to x.dtype pairs (scale, MAGIC + zero) when they
// dequantize. Slots of a group larger than 32 repeat its parameters (extra shared
// memory traffic, no extra global traffic beyond L1).
//
// K tails: K % 8 == 0, so a 4-chunk (one A register) is all in or all out of [0, K). The
// layout pads codes beyond K with 0 and the x tile is zero-filled there; a k32 step that
// starts at or past K is skipped, and in a step that crosses K the registers of chunks
// past K are set to exactly 0 (an inf or NaN scale of the last group would otherwise make
// 0 * inf = NaN from the padding). Rows >= N get zero-filled codes and scales and are
// never stored. meta_tc tiles past its end are clamped to its last tile (valid metadata
// for zero values), as in sparse24_mm.cu.
//
// Configurations (chosen by M, as sparse24_mm.cu; never tuned: no GPU has run this file):
//   small (M <= 16): BN 64 x BM 16 x BK 128, 4 warps each 16 n x 16 m, 4 stages. Memory
//     bound on W (0.375 N K bytes of codes and indices): many small CTAs keep loads in
//     flight; split-K (float32 partials + ordered reduction) when the CTAs cannot fill
//     ~3 per SM.
//   large (M > 16): BN 128 x BM 128 x BK 64, 8 warps (2 n x 4 m) each 64 n x 32 m.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "int4_dequant.h"
#include "ptx.h"
#include "sparse24_int4_mm.h"
#include "sparse_mma.h"

namespace {

using namespace pyfast_cuda;          // smem_addr, cp_async_*, ldmatrix_x4; Traits, dequant2
using namespace pyfast_cuda::sparse;  // mma_sp_sel, swizzle, cp_async16/4, store_tile, Plan

// ---------------------------------------------------------------- configuration ----
template <int BN_, int BM_, int BK_, int WARPS_N_, int WARPS_M_, int STAGES_, int MIN_CTAS_,
          int TARGET_WAVES_, int MIN_KTILES_PER_SPLIT_>
struct Config {
  static constexpr int BN = BN_;            // weight rows (n) per CTA
  static constexpr int BM = BM_;            // activation rows (m) per CTA
  static constexpr int BK = BK_;            // dense k per pipeline stage
  static constexpr int WARPS_N = WARPS_N_, WARPS_M = WARPS_M_;
  static constexpr int STAGES = STAGES_;
  static constexpr int MIN_CTAS = MIN_CTAS_;
  static constexpr int TARGET_WAVES = TARGET_WAVES_;
  static constexpr int MIN_KTILES_PER_SPLIT = MIN_KTILES_PER_SPLIT_;
  static constexpr int THREADS = 32 * WARPS_N * WARPS_M;
  static constexpr int WN = BN / WARPS_N, WM = BM / WARPS_M;  // warp tile
  static constexpr int NT = WN / 16, MT = WM / 8;             // mma tiles per warp
  static constexpr int KB64 = BK / 64;                        // 64-k blocks per stage
  static constexpr int SLOTS = BK / 32;                       // scale slots per stage
  static constexpr int X_ROW = 2 * BK, X_CH = X_ROW / 16;     // x tile row: bytes, chunks
  static constexpr int W_BYTES = (BN / 16) * KB64 * 32 * 8;   // codes: 8 bytes per lane
  static constexpr int X_BYTES = BM * X_ROW;
  static constexpr int E_BYTES = (BN / 16) * KB64 * 32 * 4;   // metadata: a word per lane
  static constexpr int P_BYTES = SLOTS * BN * 4;              // scales, and zero words
  static constexpr int STAGE_BYTES = W_BYTES + X_BYTES + E_BYTES + 2 * P_BYTES;
  static constexpr int OUT_ROW = 2 * (BN + 8);  // epilogue staging row (padded: no conflicts)
  static constexpr int SMEM_BYTES =
      STAGES * STAGE_BYTES > BM * OUT_ROW ? STAGES * STAGE_BYTES : BM * OUT_ROW;
  static_assert(BK % 64 == 0 && WN % 16 == 0 && WM % 8 == 0, "tile shapes");
  static_assert((BM * X_CH) % THREADS == 0 && (SLOTS * BN) % THREADS == 0, "even loads");
  static_assert(W_BYTES / 16 <= THREADS && E_BYTES / 16 <= THREADS,
                "one codes and one metadata chunk per thread at most");
};

// <BN, BM, BK, WARPS_N, WARPS_M, STAGES, MIN_CTAS, TARGET_WAVES, MIN_KTILES_PER_SPLIT>
using SmallM = Config<64, 16, 128, 4, 1, 4, 1, 3, 2>;
using LargeM = Config<128, 128, 64, 2, 4, 4, 1, 1, 4>;

struct Params {
  const void* x;
  const uint32_t* codes;      // codes_tc as raw 32-bit words
  const uint32_t* meta;       // meta_tc as raw 32-bit words
  const float* scales;        // [N, G]
  const uint32_t* zero_words; // zeros [N, G] as 32-bit words (byte b of word i: entry 4i+b)
  const float* bias;          // [N] or nullptr
  void* out;
  float* partial;             // [S, M, N] float32 when split-K, else nullptr
  int64_t M, N, K;
  int64_t T16, K64;           // codes_tc / meta_tc dims 0 and 1
  int G, group_len;
  int k_tiles;                // ceil(K / BK)
  int k_tiles_per_split;
  bool out_vec;               // out 16-byte aligned and N % 8 == 0
};

// ------------------------------------------------------------------ stage loads ----
// Loads k tile kt (k0 = kt * BK) of codes, x, meta and group parameters into one stage.
template <class C>
__device__ __forceinline__ void load_stage(const Params& p, uint32_t s_w, uint32_t s_x,
                                           uint32_t s_e, uint32_t s_s, uint32_t s_z,
                                           int64_t n0, int64_t m0, int64_t k0, int tid) {
  const int64_t t0 = n0 / 16, kb0 = k0 / 64;
  // Codes: 256 bytes = 16 chunks per (16-row tile, 64-k block); zero past the layout.
  constexpr int W_CHUNKS = C::W_BYTES / 16;
  if (tid < W_CHUNKS) {
    const int tl = tid / (16 * C::KB64), jj = (tid / 16) % C::KB64, c = tid % 16;
    const int64_t t = t0 + tl, kb = kb0 + jj;
    const bool ok = t < p.T16 && kb < p.K64;
    cp_async16(s_w + (tl * C::KB64 + jj) * 256 + c * 16,
               ok ? p.codes + (t * p.K64 + kb) * 64 + 4 * c : p.codes, ok);
  }
  // x: 16 bytes = 8 k of one row (K % 8 == 0: a chunk is all in or all out).
  const __half* x = static_cast<const __half*>(p.x);  // 2-byte elements, either dtype
#pragma unroll
  for (int it = 0; it < C::BM * C::X_CH / C::THREADS; ++it) {
    const int idx = tid + it * C::THREADS, r = idx / C::X_CH, c = idx % C::X_CH;
    const int64_t m = m0 + r, k = k0 + 8 * c;
    const bool ok = m < p.M && k < p.K;
    cp_async16(s_x + r * C::X_ROW + swizzle<C::X_CH>(r, c) * 16, ok ? x + m * p.K + k : x, ok);
  }
  // Metadata: 128 bytes per (16-row tile, 64-k block), clamped to the last tile/block.
  constexpr int E_CHUNKS = C::E_BYTES / 16;
  if (tid < E_CHUNKS) {
    const int tl = tid / (8 * C::KB64), jj = (tid / 8) % C::KB64, w = tid % 8;
    const int64_t t = min(t0 + tl, p.T16 - 1), kb = min(kb0 + jj, p.K64 - 1);
    cp_async16(s_e + ((tl * C::KB64 + jj) * 32 + 4 * w) * 4,
               p.meta + (t * p.K64 + kb) * 32 + 4 * w, true);
  }
  // Group parameters of slot `slot` (k0 + 32 slot ..) and CTA row `row`, at [slot][row].
#pragma unroll
  for (int it = 0; it < C::SLOTS * C::BN / C::THREADS; ++it) {
    const int e = tid + it * C::THREADS, slot = e / C::BN, row = e % C::BN;
    const int64_t n = n0 + row;
    const int grp = min(static_cast<int>((k0 + 32 * slot) / p.group_len), p.G - 1);
    const bool ok = n < p.N;
    const int64_t idx = n * p.G + grp;
    cp_async4(s_s + e * 4, ok ? p.scales + idx : p.scales, ok);
    cp_async4(s_z + e * 4, ok ? p.zero_words + (idx >> 2) : p.zero_words, ok);
  }
}

// ------------------------------------------------------------------ the kernel ----
// grid: (ceil(M/BM), ceil(N/BN), S); CTA (bx, by, z) computes out rows m0.., columns
// n0.. over k tiles [z * k_tiles_per_split, min((z + 1) * k_tiles_per_split, k_tiles)).
template <typename T, class C>
__global__ void __launch_bounds__(C::THREADS, C::MIN_CTAS)
sparse24_int4_mm_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * C::BN;
  const int kt_begin = blockIdx.z * p.k_tiles_per_split;
  const int kt_end = min(kt_begin + p.k_tiles_per_split, p.k_tiles);
  const int n_kt = max(kt_end - kt_begin, 0);

  const uint32_t s_base = smem_addr(smem);
  auto off_w = [](int stage) { return stage * C::STAGE_BYTES; };
  auto off_x = [&](int stage) { return off_w(stage) + C::W_BYTES; };
  auto off_e = [&](int stage) { return off_x(stage) + C::X_BYTES; };
  auto off_s = [&](int stage) { return off_e(stage) + C::E_BYTES; };
  auto off_z = [&](int stage) { return off_s(stage) + C::P_BYTES; };
  auto load = [&](int stage, int kt) {
    load_stage<C>(p, s_base + off_w(stage), s_base + off_x(stage), s_base + off_e(stage),
                  s_base + off_s(stage), s_base + off_z(stage), n0, m0,
                  static_cast<int64_t>(kt_begin + kt) * C::BK, tid);
  };

  // Prologue: STAGES - 1 tiles in flight (one commit group each, empty past the end).
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < n_kt) load(s, s);
    cp_async_commit();
  }

  const int warp_n = warp % C::WARPS_N, warp_m = warp / C::WARPS_N;
  const int wn0 = warp_n * C::WN, wm0 = warp_m * C::WM;  // warp tile origin in the CTA
  const int groups_k = static_cast<int>(p.K / 4);        // 4-chunks in [0, K)
  float acc[C::NT][C::MT][4];
  zero_acc<C>(acc);

  for (int kt = 0; kt < n_kt; ++kt) {
    // Tile kt has landed for every thread; the barrier also retires all reads of the
    // stage refilled just below (used at kt - 1).
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (kt + C::STAGES - 1 < n_kt) load((kt + C::STAGES - 1) % C::STAGES, kt + C::STAGES - 1);
    cp_async_commit();

    const int st = kt % C::STAGES;
    const int64_t k0 = static_cast<int64_t>(kt_begin + kt) * C::BK;
    const uint32_t sx = s_base + off_x(st);
    const uint2* sw = reinterpret_cast<const uint2*>(smem + off_w(st));
    const uint32_t* se = reinterpret_cast<const uint32_t*>(smem + off_e(st));
    const float* ss = reinterpret_cast<const float*>(smem + off_s(st));
    const uint32_t* sz = reinterpret_cast<const uint32_t*>(smem + off_z(st));
#pragma unroll
    for (int jj = 0; jj < C::KB64; ++jj) {
      uint32_t e[C::NT];  // this lane's metadata word per 16-row tile (both steps)
      uint2 cw[C::NT];    // this lane's codes words per 16-row tile (.x step 0, .y step 1)
#pragma unroll
      for (int i = 0; i < C::NT; ++i) {
        const int slot_w = (wn0 / 16 + i) * C::KB64 + jj;
        e[i] = se[slot_w * 32 + lane];
        cw[i] = sw[slot_w * 32 + lane];
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {  // k32 step s of the block, sparsity selector s
        const int64_t kstep = k0 + 64 * jj + 32 * s;
        if (kstep >= p.K) continue;  // CTA-uniform: the tile's tail past K
        const int slot = 2 * jj + s;
        const int grp = min(static_cast<int>(kstep / p.group_len), p.G - 1);
        const bool tail = kstep + 32 > p.K;                     // CTA-uniform
        const int chunk0 = static_cast<int>(kstep / 4) + tig;  // 4-chunk of registers 0, 1
        uint32_t a[C::NT][4];
#pragma unroll
        for (int i = 0; i < C::NT; ++i) {
          uint32_t scale2[2], zero2[2];  // rows g and g + 8 of the tile
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = wn0 + 16 * i + g + 8 * h;
            const int n = static_cast<int>(n0) + row;
            // byte (n G + grp) % 4 of the zero word, without a 64-bit product
            const int byte = ((n & 3) * (p.G & 3) + grp) & 3;
            const uint32_t z = (sz[slot * C::BN + row] >> (8 * byte)) & 0xFFu;
            scale2[h] = as_bits(Traits<T>::pair(ss[slot * C::BN + row]));
            zero2[h] = as_bits(Traits<T>::pair(Traits<T>::kMagicValue + static_cast<float>(z)));
          }
          const uint32_t word = s == 0 ? cw[i].x : cw[i].y;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            a[i][r] = dequant2<T>(word >> (4 * r), zero2[r & 1], scale2[r & 1]);
            if (tail && chunk0 + 4 * (r >> 1) >= groups_k) a[i][r] = 0u;  // past K: 0
          }
        }
        uint32_t b[C::MT][4];
        load_x_fragments<C>(b, sx, wm0, jj, s, lane);
#pragma unroll
        for (int i = 0; i < C::NT; ++i)
#pragma unroll
          for (int j = 0; j < C::MT; ++j) mma_sp_sel<T>(acc[i][j], a[i], b[j], e[i], s);
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

template <typename T, class C>
cudaError_t launch_main(const Params& p, const Plan& pl, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  return launch_tiles<C>(sparse24_int4_mm_kernel<T, C>, p, pl, configured, stream);
}

template <typename T>
cudaError_t launch(Params p, const Plan& pl, cudaStream_t stream) {
  p.k_tiles = pl.k_tiles;
  const cudaError_t err =
      pl.small ? launch_main<T, SmallM>(p, pl, stream) : launch_main<T, LargeM>(p, pl, stream);
  if (err != cudaSuccess || pl.splits == 1) return err;
  return launch_splitk_reduce<T>(OutArgs{p.bias, p.out, p.partial, p.M, p.N, p.out_vec},
                                 pl.splits, stream);
}

}  // namespace

size_t pyfast_sparse24_int4_mm_tc_workspace_bytes(int64_t M, int64_t N, int64_t K,
                                                  int num_sms) {
  if (M <= 0 || N <= 0 || K < 0) return 0;
  return workspace_bytes(plan(M, N, K, num_sms), M, N);
}

cudaError_t pyfast_sparse24_int4_mm_tc(const void* x, const int32_t* codes_tc,
                                       const int32_t* meta_tc, const float* scales,
                                       const uint8_t* zeros, int64_t G, int64_t group_size,
                                       const float* bias, void* out, int x_dtype, int64_t M,
                                       int64_t N, int64_t K, float* workspace,
                                       size_t workspace_bytes_given, int num_sms,
                                       cudaStream_t stream) {
  const bool gs_ok = (group_size == -1 && G == 1) ||
                     ((group_size == 32 || group_size == 64 || group_size == 128) &&
                      K % group_size == 0 && G == K / group_size);
  if (M < 0 || N < 0 || K < 0 || K % 8 != 0 || K > 0x3fffffff || N > 0x3fffffff || !gs_ok ||
      G * N > (int64_t{1} << 40)) {
    return cudaErrorInvalidValue;
  }
  if (x_dtype != PYFAST_F16 && x_dtype != PYFAST_BF16) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  for (const void* ptr : {x, static_cast<const void*>(codes_tc), static_cast<const void*>(meta_tc)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorInvalidValue;
  }
  if (reinterpret_cast<uintptr_t>(zeros) % 4 != 0) return cudaErrorInvalidValue;
  const Plan pl = plan(M, N, K, num_sms);
  const cudaError_t bad = check_plan(pl, M, N, workspace, workspace_bytes_given);
  if (bad != cudaSuccess) return bad;

  Params p{};
  p.x = x;
  p.codes = reinterpret_cast<const uint32_t*>(codes_tc);
  p.meta = reinterpret_cast<const uint32_t*>(meta_tc);
  p.scales = scales;
  p.zero_words = reinterpret_cast<const uint32_t*>(zeros);
  p.bias = bias;
  p.out = out;
  p.partial = pl.splits > 1 ? workspace : nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.T16 = (N + 15) / 16;
  p.K64 = (K + 63) / 64;
  p.G = static_cast<int>(G);
  p.group_len = static_cast<int>(group_size == -1 ? (K > 0 ? K : 1) : group_size);
  p.k_tiles_per_split = pl.k_tiles_per_split;
  p.out_vec = reinterpret_cast<uintptr_t>(out) % 16 == 0 && N % 8 == 0;
  return x_dtype == PYFAST_F16 ? launch<__half>(p, pl, stream)
                               : launch<__nv_bfloat16>(p, pl, stream);
}
