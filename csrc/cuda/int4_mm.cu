// CUDA kernel of pyfast_C::int4_mm_tc: W4A16 GEMM on mma.sync tensor cores, with the
// int4 weight pre-shuffled into fragment order (pyfast/layouts/int4_tc.py), in the
// manner of Marlin (Frantar, Castro, Chen, Hoefler, Alistarh, "MARLIN: Mixed-Precision
// Auto-Regressive Parallel Inference on Large Language Models", 2024). Torch-free; the
// launcher is declared in int4_mm.h and called from int4_mm_launch.cpp.
//
//   x      : float16/bfloat16 [M, K8]   activations, K8 = round_up(K, 8), zero beyond K
//   w_tc   : int32 [NT, KT, 32, 4]      NT = ceil(N/64), KT = ceil(K/16) (layout spec in
//                                       pyfast/layouts/int4_tc.py)
//   scales : float32 [N, G], zeros : uint8 [N, G] (read as 32-bit words)
//   out    : x.dtype [M, N] = x @ W^T + bias, float32 accumulation
//
// Work decomposition. A CTA has 4 warps and owns 16*MT output rows, 64*WN output columns
// and a range of K ("split"). Its warps form a WN x WK grid (WN * WK = 4): warp (wn, wk)
// owns columns [64 wn, 64 wn + 64) of the CTA and, inside every pipeline stage, the k16
// steps [4 wk, 4 wk + 4). Three configurations are instantiated (chosen by M):
//   M <= 16 : MT = 1, WN = 1, WK = 4   (64 columns per CTA: many CTAs at small M)
//   M <= 32 : MT = 2, WN = 2, WK = 2
//   M >  32 : MT = 4, WN = 4, WK = 1   (256 columns: activations re-read 4x less)
// At M <= 16 the kernel is memory-bound (4 bits of weight per 2 * M flops), so the
// point is to keep enough bytes in flight on every SM: 4096 x 4096 has only 64 column
// tiles of 64, so K is also split across CTAs ("split-K") until about 2 CTAs per SM.
//
// Split-K reduction: atomics into a float32 workspace. Every CTA of a split adds its
// partial tile with red.global.add.f32 (atomicAdd, result unused), then takes a ticket
// on a per-tile counter; the CTA that draws the last ticket reads the sums, adds the
// bias, writes out in x.dtype and stores zeros back into the workspace and the counter.
// So the workspace is zero before and after every launch and needs no memset per call
// (the launcher keeps one per stream); the partition needs no ordering between CTAs
// (no spin-waiting, so no deadlock whatever order the CTAs are scheduled in). Cost:
// the float32 sums are added in a run-dependent order (results can differ in the last
// bits between runs when splits > 1), and atom/red .add.f32 flush subnormal partial sums
// to zero (PTX ISA, "red": ".add.f32 ... flushes subnormal inputs and results").
// Memory ordering follows the CUDA C++ Programming Guide, "Memory Fence Functions"
// (the last-block sum example): writes, __threadfence(), barrier, ticket atomic.
//
// Pipeline (per CTA): kStages = 4 shared-memory buffers filled with cp.async (PTX ISA,
// "cp.async": 16-byte .cg copies for weights and activations, 4-byte .ca copies for
// scales and zero words; src-size 0 zero-fills), kStages - 1 stages in flight while one
// is computed; cp.async.wait_group + __syncthreads hand a stage to the compute.
//
// Per k16 step a warp (a) ldmatrix.x4 its A fragments (PTX ISA 9.7.14.5.15 "ldmatrix":
// lanes 8q..8q+7 give the row addresses of matrix q, and lane T receives row T/4,
// elements 2(T%4), 2(T%4)+1 of each matrix), from a row-swizzled tile (16-byte chunk c
// of row r stored at chunk c ^ (r % 8), so the 8 rows of one 8x8 matrix hit 8 different
// bank groups); (b) loads its 16 weight bytes (one ld.shared.v4), which by construction
// of the repack are its B fragments for 8 subtiles of n8 (PTX ISA 9.7.14.5.8, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); (c) dequantizes in registers and
// (d) issues mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32.
//
// Dequantization: dequant2 (int4_dequant.h), exact up to one rounding of (q - zero) * scale.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "int4_dequant.h"
#include "int4_mm.h"
#include "ptx.h"

namespace {

using namespace pyfast_cuda;  // smem_addr, cp_async_commit/wait, ldmatrix_x4 (ptx.h);
                              // Traits, bits_as, as_bits, and_or (int4_dequant.h)

constexpr int kThreads = 128;        // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 4;           // cp.async pipeline depth
constexpr int kStepsPerWarp = 4;     // k16 steps a warp computes per stage
constexpr int kTileN = 64;           // columns of one w_tc tile (8 subtiles of n8)
constexpr int kTileBytes = 512;      // one w_tc tile: 32 lanes x 16 bytes
constexpr int kScaleK = 32;          // scale slots every 32 k (the smallest group size)

// --- PTX wrappers --------------------------------------------------------------------

// 16-byte global -> shared copy, L1 bypassed (.cg); src_bytes 0 writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes) : "memory");
}

// 4-byte copy (.ca: scales and zero words of neighbouring groups share L1 lines).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes) : "memory");
}

// D = A * B + D, A 16x16 row-major (4 regs), B 16x8 column-major (2 regs), D float32.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// --- kernel ------------------------------------------------------------------------------

struct Params {
  const void* x;          // [M, K8] x.dtype, row stride x_row_stride
  int64_t x_row_stride;
  int M;
  int x_cols;             // K8 = round_up(K, 8): columns of x that may be read
  const uint4* w;         // w_tc as [NT][KT][32] 16-byte lane chunks
  int N, NT, KT;
  const float* scales;    // [N, G]
  const uint32_t* zero_words;  // zeros [N, G] as 32-bit words (byte b of word i: entry 4i+b)
  int G;
  int group_len;          // group_size, or K for one group per row
  const float* bias;      // [N] or nullptr
  void* out;              // [M, N] x.dtype
  float* ws;              // [M, N] float32, zero on entry and exit
  int* counters;          // [gridDim.x * gridDim.y], zero on entry and exit
  int steps_per_split;    // k16 steps per split (a multiple of the stage's steps)
  int splits;             // gridDim.z
};

// Shared memory of one configuration (byte sizes; every region 16-byte aligned).
template <int MT, int WN>
struct Smem {
  static constexpr int kWK = kWarps / WN;
  static constexpr int kStageSteps = kStepsPerWarp * kWK;      // k16 steps per stage
  static constexpr int kStageK = 16 * kStageSteps;              // k per stage
  static constexpr int kRows = 16 * MT;                         // CTA rows
  static constexpr int kCols = kTileN * WN;                     // CTA columns
  static constexpr int kSlots = kStageK / kScaleK;              // scale slots per stage
  static constexpr int kEntries = kSlots * kCols;               // (slot, column) pairs
  static constexpr int kAChunks = kRows * kStageK / 8;          // 16-byte chunks of A
  static constexpr int kB = kWarps * kStepsPerWarp * kTileBytes;
  static constexpr int kA = kRows * kStageK * 2;
  static constexpr int kRaw = kEntries * 8;                     // float32 scale + zero word
  static constexpr int kStage = kB + kA + kRaw;
  static constexpr int kConv = kEntries * 8;                    // T2 scale, T2 magic + zero
  static constexpr int kTotal = kStages * kStage + kConv;
  static_assert(kEntries % kThreads == 0 && kAChunks % kThreads == 0, "even split of copies");
  static_assert(kStageK / 8 >= 8, "swizzle needs 8 chunks per row");
  static_assert((kWK - 1) * WN * MT * 32 * 32 * 4 <= kStages * kStage, "reduction fits");
};

template <typename T, int MT, int WN>
__global__ void __launch_bounds__(kThreads) int4_mm_tc_kernel(const Params p) {
  using S = Smem<MT, WN>;
  constexpr int WK = S::kWK;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;     // PTX groupID, threadID_in_group
  const int wn = warp % WN, wk = warp / WN;
  const int m0 = blockIdx.x * S::kRows;
  const int tile0 = blockIdx.y * WN;        // first 64-column tile of the CTA
  const int nt = tile0 + wn;                // this warp's 64-column tile
  const int step_begin = blockIdx.z * p.steps_per_split;
  const int step_end = min(p.KT, step_begin + p.steps_per_split);
  const int n_stages = (step_end - step_begin + S::kStageSteps - 1) / S::kStageSteps;
  const T* x = static_cast<const T*>(p.x);

  auto stage_ptr = [&](int buf) { return smem + buf * S::kStage; };

  // Issues the cp.async copies of local stage `st` into buffer `buf` (no commit).
  auto load_stage = [&](int st, int buf) {
    unsigned char* sb = stage_ptr(buf);
    unsigned char* sa = sb + S::kB;
    unsigned char* sraw = sa + S::kA;
    const int base_step = step_begin + st * S::kStageSteps;
    // B: each lane copies its own 16 bytes of its warp's kStepsPerWarp tiles.
#pragma unroll
    for (int kt = 0; kt < kStepsPerWarp; ++kt) {
      const int step = base_step + wk * kStepsPerWarp + kt;
      if (nt < p.NT && step < step_end) {
        cp_async16(sb + ((warp * kStepsPerWarp + kt) * 32 + lane) * 16,
                   p.w + ((int64_t)nt * p.KT + step) * 32 + lane, 16);
      }
    }
    // A: rows m0.., k = 16 base_step..; zero-filled outside [0, M) x [0, K8).
#pragma unroll
    for (int i = 0; i < S::kAChunks / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (S::kStageK / 8), ch = c % (S::kStageK / 8);
      const int m = m0 + row, k = base_step * 16 + ch * 8;
      const bool ok = m < p.M && k < p.x_cols;
      cp_async16(sa + row * (S::kStageK * 2) + ((ch ^ (row & 7)) * 16),
                 ok ? x + (int64_t)m * p.x_row_stride + k : x, ok ? 16 : 0);
    }
    // Scales and zero words: slot s covers k = 16 base_step + 32 s .. + 31.
#pragma unroll
    for (int i = 0; i < S::kEntries / kThreads; ++i) {
      const int e = tid + i * kThreads;
      const int slot = e / S::kCols, col = e % S::kCols;
      const int n = tile0 * kTileN + col;
      const int grp = min((base_step * 16 + slot * kScaleK) / p.group_len, p.G - 1);
      const bool ok = n < p.N;
      const int64_t idx = (int64_t)n * p.G + grp;
      cp_async4(sraw + e * 4, ok ? p.scales + idx : p.scales, ok ? 4 : 0);
      cp_async4(sraw + S::kEntries * 4 + e * 4, ok ? p.zero_words + (idx >> 2) : p.zero_words,
                ok ? 4 : 0);
    }
  };

  // Converts this thread's raw entries of buffer `buf` (its own copies: complete after
  // cp.async.wait_group) into {T2 scale, T2 magic + zero} at conv[slot][wn][g][s] for
  // column 64 wn + 8 s + g, so a lane reads its 8 columns as 64 contiguous bytes.
  uint2* conv = reinterpret_cast<uint2*>(smem + kStages * S::kStage);
  auto convert = [&](int buf, int st) {
    const unsigned char* sraw = stage_ptr(buf) + S::kB + S::kA;
    const int base_step = step_begin + st * S::kStageSteps;
#pragma unroll
    for (int i = 0; i < S::kEntries / kThreads; ++i) {
      const int e = tid + i * kThreads;
      const int slot = e / S::kCols, col = e % S::kCols;
      const int n = tile0 * kTileN + col;
      const int grp = min((base_step * 16 + slot * kScaleK) / p.group_len, p.G - 1);
      const int64_t idx = (int64_t)n * p.G + grp;
      const float s = reinterpret_cast<const float*>(sraw)[e];
      const uint32_t zw = reinterpret_cast<const uint32_t*>(sraw + S::kEntries * 4)[e];
      const float z = static_cast<float>((zw >> (8 * (idx & 3))) & 0xFFu);
      const int cw = col / kTileN, cs = (col % kTileN) / 8, cg = col % 8;
      conv[slot * S::kCols + cw * kTileN + cg * 8 + cs] =
          make_uint2(as_bits(Traits<T>::pair(s)),
                     as_bits(Traits<T>::pair(Traits<T>::kMagicValue + z)));
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][s][r] = 0.0f;

  auto compute_stage = [&](int buf, int st) {
    const unsigned char* sb = stage_ptr(buf);
    const unsigned char* sa = sb + S::kB;
    const int base_step = step_begin + st * S::kStageSteps;
    uint32_t s2[8], z2[8];
#pragma unroll
    for (int kt = 0; kt < kStepsPerWarp; ++kt) {
      const int step_in_stage = wk * kStepsPerWarp + kt;
      if (base_step + step_in_stage >= step_end) break;  // warp-uniform: K tail
      if ((kt & 1) == 0) {  // a new 32-k scale slot every 2 steps
        const uint4* c = reinterpret_cast<const uint4*>(
            conv + (step_in_stage / 2) * S::kCols + wn * kTileN + g * 8);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint4 v = c[q];
          s2[2 * q] = v.x; z2[2 * q] = v.y; s2[2 * q + 1] = v.z; z2[2 * q + 1] = v.w;
        }
      }
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = 16 * mt + (lane & 15), ch = 2 * step_in_stage + (lane >> 4);
        ldmatrix_x4(a[mt], sa + row * (S::kStageK * 2) + ((ch ^ (row & 7)) * 16));
      }
      const uint4 bw = *reinterpret_cast<const uint4*>(
          sb + ((warp * kStepsPerWarp + kt) * 32 + lane) * 16);
      const uint32_t words[4] = {bw.x, bw.y, bw.z, bw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // subtile s = 2 j + h: nibble pairs i = 2 h, 2 h + 1
          const int s = 2 * j + h;
          uint32_t b[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            b[r] = dequant2<T>(words[j] >> (4 * (2 * h + r)), z2[s], s2[s]);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma16816<T>(acc[mt][s], a[mt], b[0], b[1]);
        }
      }
    }
  };

  // --- main loop: kStages - 1 stages in flight ---
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_stages) load_stage(st, st);
    cp_async_commit();
  }
  for (int st = 0; st < n_stages; ++st) {
    cp_async_wait<kStages - 2>();  // this thread's copies of stage st have landed
    __syncthreads();               // everyone's have; everyone finished stage st - 1
    convert(st % kStages, st);
    const int next = st + kStages - 1;
    if (next < n_stages) load_stage(next, next % kStages);
    cp_async_commit();
    __syncthreads();               // conv table of stage st visible
    if (nt < p.NT) compute_stage(st % kStages, st);
  }
  cp_async_wait<0>();
  __syncthreads();                 // pipeline smem free for the reduction

  // --- reduce the WK warps of each column tile in shared memory (fixed order) ---
  if constexpr (WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
    constexpr int kAcc = MT * 8 * 4;
    if (wk > 0) {
      float* dst = red + ((wk - 1) * WN + wn) * kAcc * 32;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int s = 0; s < 8; ++s)
#pragma unroll
          for (int r = 0; r < 4; ++r) dst[((mt * 8 + s) * 4 + r) * 32 + lane] = acc[mt][s][r];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
      for (int w2 = 1; w2 < WK; ++w2) {
        const float* src = red + ((w2 - 1) * WN + wn) * kAcc * 32;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int s = 0; s < 8; ++s)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mt][s][r] += src[((mt * 8 + s) * 4 + r) * 32 + lane];
      }
    }
  }

  // --- epilogue: C fragment c_r at row g + 8 (r >= 2), column 2 t + (r & 1) ---
  T* out = static_cast<T*>(p.out);
  if (wk == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int s = 0; s < 8; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int m = m0 + 16 * mt + g + 8 * (r >> 1);
          const int n = nt * kTileN + 8 * s + 2 * t + (r & 1);
          if (m < p.M && n < p.N) {
            const int64_t o = (int64_t)m * p.N + n;
            if (p.splits == 1) {
              const float v = acc[mt][s][r];
              out[o] = Traits<T>::from_float(p.bias ? v + p.bias[n] : v);
            } else {
              atomicAdd(p.ws + o, acc[mt][s][r]);
            }
          }
        }
  }
  if (p.splits == 1) return;

  // --- split-K: the CTA with the last ticket of this tile finishes it ---
  __threadfence();                 // this thread's partial sums before the ticket
  __syncthreads();
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) {
    const int ticket = atomicAdd(p.counters + tile, 1);
    s_is_last = ticket == p.splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  const int rows = min(S::kRows, p.M - m0);
  for (int i = tid; i < rows * S::kCols; i += kThreads) {
    const int m = m0 + i / S::kCols, n = tile0 * kTileN + i % S::kCols;
    if (n >= p.N) continue;
    float* w = p.ws + (int64_t)m * p.N + n;
    const float v = __ldcg(w);     // L2: where the atomics landed
    __stcg(w, 0.0f);               // leave the workspace zero for the next launch
    out[(int64_t)m * p.N + n] = Traits<T>::from_float(p.bias ? v + p.bias[n] : v);
  }
  if (tid == 0) atomicExch(p.counters + tile, 0);
}

// --- host side ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// SMs of the current device (132 on an H100 SXM), or 132 if the query fails.
int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    return 132;
  }
  return sms;
}

template <typename T, int MT, int WN>
cudaError_t launch(Params p, int64_t M, int64_t K, cudaStream_t stream) {
  using S = Smem<MT, WN>;
  const auto kernel = int4_mm_tc_kernel<T, MT, WN>;
  // More than 48 KB of dynamic shared memory needs an opt-in per kernel (CUDA C++
  // Programming Guide, "Shared Memory"); cheap, and per device, so done every launch.
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kTotal);
  if (err != cudaSuccess) return err;

  const int64_t m_blocks = ceil_div(M, S::kRows);
  const int64_t n_tiles = ceil_div(p.NT, WN);
  const int64_t stages = ceil_div(p.KT, S::kStageSteps);
  // Split K until about 2 CTAs per SM, but keep >= 2 stages per split and the
  // float32 reduction traffic (splits * M * N * 4 bytes) below the weight's (N * K / 2).
  const int64_t ctas = m_blocks * n_tiles;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());  // 2 CTAs fit per H100 SM
  int64_t splits = ceil_div(target, ctas);
  splits = std::min(splits, std::max<int64_t>(1, stages / 2));
  splits = std::min(splits, std::max<int64_t>(1, K / (8 * M)));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  const int64_t stages_per_split = ceil_div(stages, splits);
  splits = ceil_div(stages, stages_per_split);
  p.steps_per_split = static_cast<int>(stages_per_split * S::kStageSteps);
  p.splits = static_cast<int>(splits);
  if (n_tiles > 65535 || m_blocks > 0x7fffffff) return cudaErrorInvalidValue;

  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(n_tiles),
                  static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, S::kTotal, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_m(const Params& p, int64_t M, int64_t K, cudaStream_t stream) {
  if (M <= 16) return launch<T, 1, 1>(p, M, K, stream);
  if (M <= 32) return launch<T, 2, 2>(p, M, K, stream);
  return launch<T, 4, 4>(p, M, K, stream);
}

}  // namespace

size_t pyfast_int4_mm_tc_workspace_bytes(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  return static_cast<size_t>(M * N + ceil_div(M, 16) * ceil_div(N, kTileN)) * 4;
}

cudaError_t pyfast_int4_mm_tc(const void* x, int x_dtype, int64_t M, int64_t K,
                              int64_t x_row_stride, const int32_t* w_tc, int64_t N,
                              const float* scales, const uint8_t* zeros, int64_t group_size,
                              const float* bias, void* out, void* workspace,
                              cudaStream_t stream) {
  const int64_t K8 = ceil_div(K, 8) * 8;
  const bool gs_ok = group_size == -1 ||
                     ((group_size == 32 || group_size == 64 || group_size == 128) &&
                      K % group_size == 0);
  if (M < 0 || M > 0x7fffffff || K < 2 || K % 2 != 0 || K > 0x3fffffff || N < 1 ||
      N > 65535LL * kTileN || !gs_ok || x_row_stride < K8 || x_row_stride % 8 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(w_tc) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(zeros) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) return cudaSuccess;
  Params p{};
  p.x = x;
  p.x_row_stride = x_row_stride;
  p.M = static_cast<int>(M);
  p.x_cols = static_cast<int>(K8);
  p.w = reinterpret_cast<const uint4*>(w_tc);
  p.N = static_cast<int>(N);
  p.NT = static_cast<int>(ceil_div(N, kTileN));
  p.KT = static_cast<int>(ceil_div(K, 16));
  p.scales = scales;
  p.zero_words = reinterpret_cast<const uint32_t*>(zeros);
  p.G = static_cast<int>(group_size == -1 ? 1 : K / group_size);
  p.group_len = static_cast<int>(group_size == -1 ? K : group_size);
  p.bias = bias;
  p.out = out;
  p.ws = static_cast<float*>(workspace);
  p.counters = reinterpret_cast<int*>(static_cast<float*>(workspace) + M * N);
  switch (x_dtype) {
    case PYFAST_F16: return dispatch_m<__half>(p, M, K, stream);
    case PYFAST_BF16: return dispatch_m<__nv_bfloat16>(p, M, K, stream);
    default: return cudaErrorInvalidValue;  // float32 x: no tensor-core path
  }
}
