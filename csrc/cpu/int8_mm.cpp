// CPU kernel of pyfast_C::int8_mm: int8 x int8 -> int32 matmul with a fused
// float32 epilogue (per-row and per-column scales, optional bias).
//
//   a       : int8    [M, K]  activations (any strides)
//   b       : int8    [N, K]  weight, row-major as nn.Linear stores it (any strides)
//   a_scale : float32 [M]     per-token scale of a
//   b_scale : float32 [N]     per-output-channel scale of b
//   bias    : [N] float32/float16/bfloat16/float64, or None
//   out     : out_dtype (float32/float16/bfloat16) [M, N] contiguous
//
//   acc[m, n] = sum_k int32(a[m, k]) * int32(b[n, k])           exact in int32
//   out[m, n] = cast(((float(acc) * a_scale[m]) * b_scale[n]) + float(bias[n]))
//
// The epilogue is evaluated in float32 in exactly that order, one rounding per
// operation (no FMA: setup.py passes -ffp-contract=off), so a float32 result is
// bit-identical to the reference in pyfast/reference.py, and a float16/bfloat16
// result is that value rounded once (round-to-nearest-even, as torch's .to()).
// The int32 product is pyfast's own GEMM (int8_gemm.h: AVX-512 VNNI, AVX2 or
// portable micro-kernels, picked by cpu::active_isa() at each call), blocked and
// threaded here; the epilogue runs on each finished block while it is in cache.
// K is limited to 131071 = 2**31 / 128**2 - 1 so that no sum can overflow int32
// (131072 products of (-128) * (-128) would reach 2**31, one past INT32_MAX).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "int8_gemm.h"
#include "isa.h"
#include "quantize.h"

namespace pyfast {
namespace {

namespace g = cpu::int8_gemm;

constexpr int64_t kMaxK = (int64_t{1} << 17) - 1;  // 128 * 128 * kMaxK < 2**31

// Blocking (AVX-512 figures; Zen 4 / recent Xeon: 32-48 KiB L1d, 1-2 MiB L2 per core).
// A task owns a panel of kNc rows of b (output columns) and a range of rows of a.
// It walks K in blocks of at most kKc: the b panel block (kNc x kKc = 128 KiB)
// stays in L2 while every row tile of a passes over it, and one row tile of a
// (mr x kKc <= 12 KiB) stays in L1 while the kNc / 4 tiles of b stream past it.
// The int32 sums of the task live in a per-thread buffer (rows x kNc), and the
// float epilogue turns each finished row into output while it is in cache.
// When a covers one row tile only (decode, M <= mr) nothing of a is reused
// across tiles, so K is not blocked: the weight is streamed once, row by row.
constexpr int64_t kNc = 64;
constexpr int64_t kKc = 2048;
// Up to this many row tiles of a, K is not blocked and b tiles are the outer loop;
// the first row tile prefetches the b tile kAheadTiles ahead (see gemm()). Both
// chosen by timing M = 8..24 on 4096x4096, 4096x11008 and 11008x4096 with cold
// weights (Zen 4, 2 threads; ad hoc, not a bench result file): 3-10% faster than
// the K-blocked loop at M = 12..24, about even at M = 8.
constexpr int64_t kFewTiles = 4;
constexpr int64_t kAheadTiles = 2;
// Below this many multiply-adds a call runs on the calling thread.
constexpr int64_t kSerialWork = int64_t{1} << 18;

// Prefetches the cache lines of the b block a thread computes next (rows x bytes,
// row stride ld) into L2, an equal share after each micro-kernel call, so that
// reading the weight from DRAM overlaps with the arithmetic on the current block
// instead of stalling the first row tile that touches it. (The hardware
// prefetchers see only short runs: 4 rows of at most kKc bytes per tile.) Used
// when a block is read by several row tiles (M > mr); a single row tile (decode)
// reads each line once; there the micro-kernel itself prefetches each b row kNr rows
// ahead as it reads it (the same offset in the next tile), because the hardware
// prefetchers stop at every 4 KiB page and a tile reads kNr pages at once (measured
// on Zen 4, 2 threads, int8 GEMV from DRAM, in a standalone C++ test rather than
// a bench result file: 30 -> 37 GB/s).
class BlockPrefetcher {
 public:
  void reset(const int8_t* base, int64_t ld, int64_t rows, int64_t bytes, int64_t calls) {
    base_ = base, ld_ = ld, rows_ = rows, bytes_ = bytes, row_ = 0, offset_ = 0;
    const int64_t lines = rows * ((bytes + 63) / 64);
    per_call_ = (lines + calls - 1) / std::max<int64_t>(calls, 1);
  }
  void step() {
    for (int64_t i = 0; i < per_call_ && row_ < rows_; ++i) {
      __builtin_prefetch(base_ + row_ * ld_ + offset_, /*rw=*/0, /*locality: L2=*/2);
      offset_ += 64;
      if (offset_ >= bytes_) offset_ = 0, ++row_;
    }
  }

 private:
  const int8_t* base_ = nullptr;
  int64_t ld_ = 0, rows_ = 0, bytes_ = 0, row_ = 0, offset_ = 0, per_call_ = 0;
};

const g::Kernels& kernels_for(cpu::Isa isa) {
#if PYFAST_X86
  if (isa == cpu::Isa::kAvx512) return g::kernels_avx512();
  if (isa == cpu::Isa::kAvx2) return g::kernels_avx2();
#endif
  (void)isa;
  return g::kernels_scalar();
}

// out [M, N] = epilogue(a [M, K] (row stride lda) x b [N, K]^T (row stride ldb)).
template <typename OutT>
void gemm(const g::Kernels& kern, const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
          int64_t M, int64_t N, int64_t K, const float* a_scale, const float* b_scale,
          const float* bias, OutT* out) {
  const g::EpilogueFn<OutT> epilogue = g::epilogue_for<OutT>(kern);
  const int64_t mr = kern.mr_max;
  const int64_t work = M * N * std::max<int64_t>(K, 1);

  // comp[m] (AVX-512 only): the 128 * sum_k a[m, k] that the unsigned b adds.
  std::vector<int32_t> comp;
  if (kern.row_comp != nullptr) {
    comp.resize(M);
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1)),
                     [&](int64_t m0, int64_t m1) {
                       kern.row_comp(a + m0 * lda, lda, m1 - m0, K, comp.data() + m0);
                     });
  }

  // A few row tiles (mr < M <= kFewTiles * mr, e.g. M = 16 in batched decode): K is
  // not blocked, and each task walks its b tiles in the outer loop and the row tiles
  // of a in the inner one, so each b tile (kNr rows x K) is read from memory once and
  // then from L1/L2 by the other row tiles, and a (M x K) stays in L2. The first row
  // tile prefetches the b tile kAheadTiles ahead (see the decode prefetch below).
  const bool few_tiles = M > mr && M <= kFewTiles * mr;
  int64_t kc = std::max<int64_t>(K, 1);
  if (M > kFewTiles * mr && K > kKc) {
    const int64_t blocks = (K + kKc - 1) / kKc;
    kc = ((K + blocks - 1) / blocks + 63) / 64 * 64;
  }

  // Threads: at::parallel_for (ATen's intra-op pool, torch.set_num_threads). Note
  // that ATen's parallel_for is an inline OpenMP region (ATen/ParallelOpenMP.h,
  // under #ifdef _OPENMP): it runs on one thread unless this file is compiled
  // with -fopenmp (and linked with it; libgomp is then torch's own copy).
  // Tasks: N panels x M chunks. With few panels (small N) also split M, so that
  // every thread gets work; the chunks are whole row tiles.
  const int64_t threads = at::get_num_threads();
  const int64_t n_panels = (N + kNc - 1) / kNc;
  const int64_t m_tiles = (M + mr - 1) / mr;
  int64_t m_chunks = 1;
  if (n_panels < 4 * threads) {
    m_chunks = std::min(m_tiles, (4 * threads + n_panels - 1) / n_panels);
  }
  const int64_t mc = (m_tiles + m_chunks - 1) / m_chunks * mr;
  m_chunks = (M + mc - 1) / mc;
  const int64_t tasks = n_panels * m_chunks;
  const int64_t grain = work < kSerialWork ? tasks : 1;

  const int64_t n_tiles_per_panel = (kNc + g::kNr - 1) / g::kNr;
  // Decode (one row tile): the micro-kernel prefetches the next tile's b rows.
  const int64_t decode_prefetch = M <= mr ? g::kNr * ldb : 0;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> acc(std::min(mc, M) * kNc);
    BlockPrefetcher prefetch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = (t / m_chunks) * kNc, nl = std::min(kNc, N - n0);
      const int64_t m0 = (t % m_chunks) * mc, ml = std::min(mc, M - m0);
      if (few_tiles) {
        for (int64_t j = 0; j < nl; j += g::kNr) {
          const int8_t* bj = b + (n0 + j) * ldb;
          const int nr = static_cast<int>(std::min<int64_t>(g::kNr, nl - j));
          for (int64_t i = 0; i < ml; i += mr) {
            kern.tile[std::min(mr, ml - i)](a + (m0 + i) * lda, lda, bj, ldb, nr, K,
                                            acc.data() + i * kNc + j, kNc, /*accumulate=*/false,
                                            i == 0 ? kAheadTiles * g::kNr * ldb : 0);
          }
        }
      } else {
        int64_t k0 = 0;
        do {  // at least once: K = 0 stores zero sums
          const int64_t kl = std::min(kc, K - k0);
          // The b block this thread computes next: the next K block of this panel,
          // or the first of the next task's panel.
          int64_t t_next = t, k_next = k0 + kl;
          if (k_next >= K) t_next = t + 1, k_next = 0;
          if (t_next < t1 && ml > mr) {
            const int64_t n_next = (t_next / m_chunks) * kNc;
            prefetch.reset(b + n_next * ldb + k_next, ldb, std::min(kNc, N - n_next),
                           std::min(kc, K - k_next), ((ml + mr - 1) / mr) * n_tiles_per_panel);
          } else {
            prefetch.reset(nullptr, 0, 0, 0, 1);
          }
          for (int64_t i = 0; i < ml; i += mr) {
            const int64_t rows = std::min(mr, ml - i);
            const g::TileFn tile = kern.tile[rows];
            const int8_t* ai = a + (m0 + i) * lda + k0;
            for (int64_t j = 0; j < nl; j += g::kNr) {
              tile(ai, lda, b + (n0 + j) * ldb + k0, ldb,
                   static_cast<int>(std::min<int64_t>(g::kNr, nl - j)), kl,
                   acc.data() + i * kNc + j, kNc, /*accumulate=*/k0 > 0, decode_prefetch);
              prefetch.step();
            }
          }
          k0 += kl;
        } while (k0 < K);
      }
      for (int64_t i = 0; i < ml; ++i) {
        const int64_t m = m0 + i;
        epilogue(acc.data() + i * kNc, nl, comp.empty() ? 0 : comp[m], a_scale[m], b_scale + n0,
                 bias == nullptr ? nullptr : bias + n0, out + m * N + n0);
      }
    }
  });
}

// The GEMM and epilogue on checked CPU tensors: a [M, K], b [N, K] int8 (rows
// contiguous after .contiguous()), a_scale [M] / b_scale [N] float32, bias [N] any
// float dtype (the reference adds bias.float()).
at::Tensor run_int8_mm(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, a_in.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // Rows must be contiguous along K (a no-op for the usual row-major tensors).
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  const g::Kernels& kern = kernels_for(cpu::active_isa());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pyfast_C::int8_mm", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gemm<scalar_t>(kern, a.const_data_ptr<int8_t>(), a.stride(0), b.const_data_ptr<int8_t>(),
                     b.stride(0), M, N, K, as.const_data_ptr<float>(), bs.const_data_ptr<float>(),
                     bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr,
                     out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  check_device(a, "a", at::kCPU);
  check_device(b, "b", at::kCPU);
  check_device(a_scale, "a_scale", at::kCPU);
  check_device(b_scale, "b_scale", at::kCPU);
  if (bias.has_value()) check_device(*bias, "bias", at::kCPU);
  check_int8_mm_args(a, b, a_scale, b_scale, bias, out_dtype, kMaxK);
  return run_int8_mm(a, b, a_scale, b_scale, bias, out_dtype);
}

// pyfast_C::w8a8_mm: x quantized per token (quantize.h, bit-exact with
// quantize_per_token), then the GEMM above with out_dtype x.dtype, in one call:
// no Python dispatch, checks or tensors between the two steps.
//   x       : float32/float16/bfloat16 [M, K] (any strides)
//   w_int8  : int8 [N, K], w_scale: float32 [N], bias: [N] any float dtype or None
//   -> out  : x.dtype [M, N] = int8_mm(quantize_per_token(x), w_int8, ..., x.dtype)
at::Tensor w8a8_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_int8, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias) {
  check_device(x_in, "x", at::kCPU);
  check_device(w_int8, "w_int8", at::kCPU);
  check_device(w_scale, "w_scale", at::kCPU);
  if (bias.has_value()) check_device(*bias, "bias", at::kCPU);
  check_dtype(x_in, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check_dtype(w_int8, "w_int8", {at::kChar});
  check_dim(w_int8, "w_int8", 2);
  check_size(w_int8, "w_int8", 1, K, "x.size(1) = K");
  const int64_t N = w_int8.size(0);
  PYFAST_CHECK(K <= kMaxK, "x.size(1) = K is ", K, "; w8a8_mm accepts K <= ", kMaxK,
              " (larger K could overflow the int32 accumulator)");
  check_dtype(w_scale, "w_scale", {at::kFloat});
  check_dim(w_scale, "w_scale", 1);
  check_size(w_scale, "w_scale", 0, N, "w_int8.size(0) = N");
  check_bias(bias, N, "w_int8.size(0) = N");
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor q_scale = at::empty({M}, x.options().dtype(at::kFloat));
  cpu::quantize_per_token_into(x, q.mutable_data_ptr<int8_t>(),
                               q_scale.mutable_data_ptr<float>());
  return run_int8_mm(q, w_int8, q_scale, w_scale, bias, x.scalar_type());
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("int8_mm", &pyfast::int8_mm_cpu);
  m.impl("w8a8_mm", &pyfast::w8a8_mm_cpu);
}
