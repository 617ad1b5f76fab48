// The shared pieces of the CPU kernels that dequantize weights and multiply
// (weight_only.cpp: int8_weight_mm, int4_mm; sparse24_int4.cpp: sparse24_int4_mm):
// input checks of x and bias, the float32 epilogue, and the large-M path that
// dequantizes panels of weight rows and multiplies them with at::mm.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "parallel.h"

namespace pyfast {
namespace cpu {
namespace dequant_mm {

// out[m, n] = cast((acc[m, n] * scale[n]) + bias[n]) (scale / bias optional), in place
// allowed (acc may alias out).
template <typename In, typename Out>
void epilogue(const In* acc, int64_t M, int64_t N, const float* scale, const float* bias,
              Out* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = static_cast<float>(acc[m * N + n]);
        if (scale != nullptr) v = v * scale[n];
        if (bias != nullptr) v = v + bias[n];
        out[m * N + n] = static_cast<Out>(v);
      }
  });
}

// Writes cast(acc + bias) (acc float32 [M, N]) into out (x.dtype), skipping the
// pass when there is nothing to do.
inline void finish_f32(const at::Tensor& acc, const float* bias, at::Tensor& out) {
  const int64_t M = acc.size(0), N = acc.size(1);
  if (bias == nullptr && out.scalar_type() == at::kFloat) return;  // acc is out
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "pyfast_C::weight_only epilogue", [&] {
    epilogue<float, scalar_t>(acc.const_data_ptr<float>(), M, N, nullptr, bias,
                              out.mutable_data_ptr<scalar_t>());
  });
}

// Panels: each thread dequantizes `rows` weight rows at a time (at most 4 MiB: 256 rows
// of K = 4096 in float32, 512 in bfloat16; the panel stays in L2 + L3 while at::mm
// reads it) and multiplies them into its column slice of out. Larger panels mean
// fewer passes over x (each panel's at::mm reads all of x); the panel count is a
// multiple of the thread count (balanced_panel_rows, parallel.h).
constexpr int64_t kPanelBytes = int64_t{4} << 20;

inline int64_t panel_rows(int64_t N, int64_t K, int64_t elem) {
  return balanced_panel_rows(N, kPanelBytes / std::max<int64_t>(K * elem, 1));
}

// out_mm [M, N] (float32 or bfloat16) = x_mm @ dequant(rows).T, panel by panel. (A
// weight of one panel or less dequantized whole and multiplied by one at::mm on all
// threads was slower, 0.68-0.78x at K = 4096, N = 128 and K = N = 768, M = 64: each
// thread's panel is read from its own L2; ad hoc, not a bench file.)
template <typename DequantF32, typename DequantBf16>
void panel_mm(const at::Tensor& x_mm, int64_t N, int64_t K, at::Tensor& out_mm,
              DequantF32 dq_f32, DequantBf16 dq_bf16) {
  const bool bf16 = x_mm.scalar_type() == at::kBFloat16;
  const int64_t rows = panel_rows(N, K, bf16 ? 2 : 4);
  const int64_t panels = (N + rows - 1) / rows;
  // ATen ops in the body: the workers need the caller's inference mode (parallel.h)
  parallel_for_with_state(0, panels, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor panel = at::empty({rows, K}, x_mm.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, n1 = std::min(N, n0 + rows);
      if (bf16) {
        dq_bf16(n0, n1, reinterpret_cast<uint16_t*>(panel.mutable_data_ptr<at::BFloat16>()));
      } else {
        dq_f32(n0, n1, panel.mutable_data_ptr<float>());
      }
      at::Tensor dst = out_mm.narrow(1, n0, n1 - n0);
      at::mm_out(dst, x_mm, panel.narrow(0, 0, n1 - n0).t());
    }
  });
}

// --- input checks ------------------------------------------------------------------------

inline void check_x(const at::Tensor& x) {
  check_device(x, "x", at::kCPU);
  check_dtype(x, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dim(x, "x", 2);
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_device(t, name, at::kCPU);
  PYFAST_CHECK(at::isFloatingType(t.scalar_type()), name, " has dtype ", t.scalar_type(),
              "; accepted: a floating dtype");
}

// bias as float32 [N] contiguous (undefined when None).
inline at::Tensor bias_f32(const std::optional<at::Tensor>& bias, int64_t N, const char* what) {
  if (!bias.has_value()) return at::Tensor();
  check_float(*bias, "bias");
  check_dim(*bias, "bias", 1);
  check_size(*bias, "bias", 0, N, what);
  return bias->to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}


// The large-M path of a weight-only op: out [M, N] (x.dtype) = x @ W.T + bias, W
// dequantized panel by panel (dq_f32 / dq_bf16, as panel_mm calls them). x [M, K] is
// in the panels' column order. bfloat16 x runs bfloat16 panels (the GEMM rounds its
// output once, then + bias rounds again, as F.linear in bfloat16); other dtypes run
// float32 panels on float32 x with one rounding at the end.
template <typename DequantF32, typename DequantBf16>
at::Tensor panel_path(const at::Tensor& x, int64_t N, const float* bias, at::Tensor& out,
                      DequantF32 dq_f32, DequantBf16 dq_bf16) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kBFloat16) {
    panel_mm(x.contiguous(), N, K, out, dq_f32, dq_bf16);
    if (bias != nullptr) {
      at::BFloat16* o = out.mutable_data_ptr<at::BFloat16>();
      epilogue<at::BFloat16, at::BFloat16>(o, M, N, nullptr, bias, o);
    }
    return out;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, xf.options());
  panel_mm(xf, N, K, acc, dq_f32, dq_bf16);
  finish_f32(acc, bias, out);
  return out;
}

// scales [N, G] (any float dtype) and zeros uint8 [N, G] of a group-wise int4 weight.
inline void check_group_params(const at::Tensor& scales, const at::Tensor& zeros, int64_t N,
                               int64_t G) {
  check_float(scales, "scales");
  check_dim(scales, "scales", 2);
  check_size(scales, "scales", 0, N, "packed.size(0) = N");
  check_size(scales, "scales", 1, G, "K / group_size = G (1 per channel)");
  check_device(zeros, "zeros", at::kCPU);
  check_dtype(zeros, "zeros", {at::kByte});
  check_dim(zeros, "zeros", 2);
  check_size(zeros, "zeros", 0, N, "packed.size(0) = N");
  check_size(zeros, "zeros", 1, G, "K / group_size = G (1 per channel)");
}

}  // namespace dequant_mm
}  // namespace cpu
}  // namespace pyfast
