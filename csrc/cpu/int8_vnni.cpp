// CPU kernels of pyfast_C::w8a8_mm_vnni (W8A8 on an int8 weight in VNNI panel order)
// and pyfast_C::int8_mm_vnni (the same GEMM for int8 activations given with their
// scales, e.g. static int8; described at its function below).
//
//   x       : float32 / float16 / bfloat16 [M, K] (any strides)
//   w_vnni  : int8 [ceil(N/48), ceil(K/4), 48, 4]  (pyfast/layouts/int8_vnni.py; made
//             once per layer by repack_int8_vnni from the [N, K] weight)
//   w_scale : float32 [N]; bias: [N] any float dtype, or None
//   out     : x.dtype [M, N] = w8a8_mm(x, W, w_scale, bias), bit for bit
//
// x is quantized per token (quantize.h, bit-exact with quantize_per_token), the int32
// sums come from the tiles of int8_vnni.h (exact: the same sums as int8_mm), and the
// float epilogue is int8_gemm.h's, so the output equals the reference's exactly.
//
// Blocking: a task is one panel (48 output columns, 192 * ceil(K/4) bytes: 192 KiB at
// K = 4096, inside a Zen 4 / recent Xeon L2) times a range of rows of x; its row tiles
// (8 rows) pass over the panel one after the other, so the weight is read from memory
// once and from L2 by every later tile; the int32 sums of the task (rows x 48) go
// through the epilogue while in cache. Threads take tasks (at::parallel_for); with few
// panels (small N) the rows are split too, so that every thread gets work. Decode
// (M = 1, AVX-512) instead reads kDecodePanels panels side by side (int8_vnni.h).
// Why this layout rather than the canonical one: ad-hoc timing on this project's Zen 4
// (2 threads, cold weights, 4096 x 4096, a standalone C++ prototype; not a bench result
// file) put the int32 GEMM at 1.1-1.25x the canonical-layout kernel of int8_mm.cpp for
// M = 8..1024 and even at M = 1. bench/ measures the op itself.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "int8_gemm.h"
#include "int8_vnni.h"
#include "isa.h"
#include "quantize.h"

namespace pyfast {
namespace {

namespace g = cpu::int8_gemm;
namespace v = cpu::int8_vnni;

constexpr int64_t kMaxK = (int64_t{1} << 17) - 1;  // as int8_mm.cpp: 128 * 128 * K < 2**31
// Below this many multiply-adds a call runs on the calling thread.
constexpr int64_t kSerialWork = int64_t{1} << 18;

// out [M, N] = epilogue(q [M, K] (row stride K) x W^T), W from the panels w.
template <typename OutT>
void gemm_vnni(const int8_t* q, int64_t M, int64_t K, const int8_t* w, int64_t N,
               const float* q_scale, const float* w_scale, const float* bias, OutT* out) {
  const bool simd = cpu::active_isa() == cpu::Isa::kAvx512;
#if PYFAST_X86
  const v::TileFn* tiles = simd ? v::tiles_avx512() : v::tiles_scalar();
  const g::Kernels& kern = simd ? g::kernels_avx512() : g::kernels_scalar();
#else
  const v::TileFn* tiles = v::tiles_scalar();
  const g::Kernels& kern = g::kernels_scalar();
#endif
  const g::EpilogueFn<OutT> epilogue = g::epilogue_for<OutT>(kern);
  const int64_t panel_bytes = (K + v::kGroupK - 1) / v::kGroupK * v::kPanelN * v::kGroupK;

  // comp[m] = 128 * sum_k q[m, k]: the AVX-512 tiles' sums include it (int8_vnni.h).
  std::vector<int32_t> comp(M, 0);
  if (simd) kern.row_comp(q, K, M, K, comp.data());

  const int64_t threads = at::get_num_threads();
  const int64_t panels = (N + v::kPanelN - 1) / v::kPanelN;
  const int64_t mr = v::kMaxMr, m_tiles = (M + mr - 1) / mr;
  int64_t m_chunks = 1;
  if (panels < 4 * threads) m_chunks = std::min(m_tiles, (4 * threads + panels - 1) / panels);
  const int64_t mc = (m_tiles + m_chunks - 1) / m_chunks * mr;
  m_chunks = (M + mc - 1) / mc;
  const int64_t tasks = panels * m_chunks;
  const int64_t grain = M * N * std::max<int64_t>(K, 1) < kSerialWork ? tasks : 1;

#if PYFAST_X86
  if (simd && M == 1) {  // decode: kDecodePanels weight streams per call (int8_vnni.h)
    const int64_t groups = (panels + v::kDecodePanels - 1) / v::kDecodePanels;
    at::parallel_for(0, groups, N * K < kSerialWork ? groups : 1, [&](int64_t g0, int64_t g1) {
      int32_t acc[v::kDecodePanels * v::kPanelN];
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t j0 = gi * v::kDecodePanels;
        const int np = static_cast<int>(std::min<int64_t>(v::kDecodePanels, panels - j0));
        v::decode_avx512(np, q, K, w + j0 * panel_bytes, panel_bytes, acc);
        const int64_t n0 = j0 * v::kPanelN, nl = std::min<int64_t>(np * v::kPanelN, N - n0);
        epilogue(acc, nl, comp[0], q_scale[0], w_scale + n0,
                 bias == nullptr ? nullptr : bias + n0, out + n0);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> acc(std::min(mc, M) * v::kPanelN);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / m_chunks, n0 = j * v::kPanelN;
      const int64_t nl = std::min<int64_t>(v::kPanelN, N - n0);
      const int64_t m0 = (t % m_chunks) * mc, ml = std::min(mc, M - m0);
      for (int64_t i = 0; i < ml; i += mr) {
        tiles[std::min(mr, ml - i)](q + (m0 + i) * K, K, K, w + j * panel_bytes,
                                    acc.data() + i * v::kPanelN, v::kPanelN);
      }
      for (int64_t i = 0; i < ml; ++i) {
        const int64_t m = m0 + i;
        epilogue(acc.data() + i * v::kPanelN, nl, comp[m], q_scale[m], w_scale + n0,
                 bias == nullptr ? nullptr : bias + n0, out + m * N + n0);
      }
    }
  });
}

// The checks shared by w8a8_mm_vnni and int8_mm_vnni: w_vnni int8
// [ceil(N/48), ceil(K/4), 48, 4] with N = w_scale.size(0), w_scale float32 [N], bias
// [N] or None, all on the CPU; K <= kMaxK. `op` names the op in the messages.
void check_vnni_weight(const char* op, int64_t K, const at::Tensor& w_vnni,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  check_device(w_vnni, "w_vnni", at::kCPU);
  check_device(w_scale, "w_scale", at::kCPU);
  if (bias.has_value()) check_device(*bias, "bias", at::kCPU);
  check_dtype(w_scale, "w_scale", {at::kFloat});
  check_dim(w_scale, "w_scale", 1);
  const int64_t N = w_scale.size(0);
  PYFAST_CHECK(K <= kMaxK, "K is ", K, "; ", op, " accepts K <= ", kMaxK,
              " (larger K could overflow the int32 accumulator)");
  check_dtype(w_vnni, "w_vnni", {at::kChar});
  check_dim(w_vnni, "w_vnni", 4);
  check_size(w_vnni, "w_vnni", 0, (N + v::kPanelN - 1) / v::kPanelN,
             "ceil(N / 48) with N = w_scale.size(0)");
  check_size(w_vnni, "w_vnni", 1, (K + v::kGroupK - 1) / v::kGroupK, "ceil(K / 4)");
  check_size(w_vnni, "w_vnni", 2, v::kPanelN, "the panel width");
  check_size(w_vnni, "w_vnni", 3, v::kGroupK, "the bytes per lane");
  check_bias(bias, N, "w_scale.size(0) = N");
}

// out [M, N] (out_dtype) = gemm_vnni of q (int8 [M, K]) with its row scales q_scale.
at::Tensor run_vnni(const at::Tensor& q, const at::Tensor& q_scale, const at::Tensor& w_vnni,
                    const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                    at::ScalarType out_dtype) {
  const int64_t M = q.size(0), K = q.size(1), N = w_scale.size(0);
  const at::Tensor w = w_vnni.contiguous(), ws = w_scale.contiguous();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, q.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pyfast_C::vnni_gemm", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gemm_vnni<scalar_t>(q.const_data_ptr<int8_t>(), M, K, w.const_data_ptr<int8_t>(), N,
                          q_scale.const_data_ptr<float>(), ws.const_data_ptr<float>(),
                          bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr,
                          out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

at::Tensor w8a8_mm_vnni_cpu(const at::Tensor& x_in, const at::Tensor& w_vnni,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  check_device(x_in, "x", at::kCPU);
  check_dtype(x_in, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  check_vnni_weight("w8a8_mm_vnni", x_in.size(1), w_vnni, w_scale, bias);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor q_scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M > 0)
    cpu::quantize_per_token_into(x, q.mutable_data_ptr<int8_t>(),
                                 q_scale.mutable_data_ptr<float>());
  return run_vnni(q, q_scale, w_vnni, w_scale, bias, x.scalar_type());
}

// pyfast_C::int8_mm_vnni: int8_mm on the weight in VNNI panel order, for activations
// quantized beforehand (static int8: quantize_static, then this).
//   a       : int8 [M, K] (any strides), a_scale: float32 [M]
//   w_vnni, w_scale, bias: as w8a8_mm_vnni; out_dtype float32 / float16 / bfloat16
//   -> out  : out_dtype [M, N] = int8_mm(a, W, a_scale, w_scale, bias, out_dtype), bit for bit
at::Tensor int8_mm_vnni_cpu(const at::Tensor& a, const at::Tensor& w_vnni,
                            const at::Tensor& a_scale, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_device(a, "a", at::kCPU);
  check_device(a_scale, "a_scale", at::kCPU);
  check_int8_rows(a, a_scale);
  check_out_dtype(out_dtype);
  check_vnni_weight("int8_mm_vnni", a.size(1), w_vnni, w_scale, bias);
  return run_vnni(a.contiguous(), a_scale.contiguous(), w_vnni, w_scale, bias, out_dtype);
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("w8a8_mm_vnni", &pyfast::w8a8_mm_vnni_cpu);
  m.impl("int8_mm_vnni", &pyfast::int8_mm_vnni_cpu);
}
