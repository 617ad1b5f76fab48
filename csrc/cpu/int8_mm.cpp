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
// The int32 product comes from at::_int_mm (exact, any M/N/K including 0).
// K is limited to 131071 = 2**31 / 128**2 - 1 so that no sum can overflow int32
// (131072 products of (-128) * (-128) would reach 2**31, one past INT32_MAX).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../checks.h"

namespace pyfast {
namespace {

constexpr int64_t kMaxK = (int64_t{1} << 17) - 1;  // 128 * 128 * kMaxK < 2**31

template <typename OutT>
void epilogue(const int32_t* acc, const float* a_scale, const float* b_scale,
              const float* bias /* nullptr: no bias */, int64_t M, int64_t N, OutT* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* accr = acc + m * N;
      OutT* outr = out + m * N;
      const float as = a_scale[m];
      if (bias != nullptr) {
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(accr[n]) * as;
          v = v * b_scale[n];
          v = v + bias[n];
          outr[n] = static_cast<OutT>(v);
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(accr[n]) * as;
          v = v * b_scale[n];
          outr[n] = static_cast<OutT>(v);
        }
      }
    }
  });
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                       at::ScalarType out_dtype) {
  check_device(a, "a", at::kCPU);
  check_device(b, "b", at::kCPU);
  check_device(a_scale, "a_scale", at::kCPU);
  check_device(b_scale, "b_scale", at::kCPU);
  check_dtype(a, "a", {at::kChar});
  check_dtype(b, "b", {at::kChar});
  check_dim(a, "a", 2);
  check_dim(b, "b", 2);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  check_size(b, "b", 1, K, "a.size(1) = K");
  TORCH_CHECK(K <= kMaxK, "a.size(1) = K is ", K, "; int8_mm accepts K <= ", kMaxK,
              " (larger K could overflow the int32 accumulator)");
  check_dtype(a_scale, "a_scale", {at::kFloat});
  check_dim(a_scale, "a_scale", 1);
  check_size(a_scale, "a_scale", 0, M, "a.size(0) = M");
  check_dtype(b_scale, "b_scale", {at::kFloat});
  check_dim(b_scale, "b_scale", 1);
  check_size(b_scale, "b_scale", 0, N, "b.size(0) = N");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype is ", out_dtype, "; accepted: ",
              dtype_list({at::kFloat, at::kHalf, at::kBFloat16}));
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_device(*bias, "bias", at::kCPU);
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias has dtype ",
                bias->scalar_type(), "; accepted: a floating dtype or None");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, N, "b.size(0) = N");
    bias_f = bias->to(at::kFloat).contiguous();  // the reference adds bias.float()
  }

  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // at::_int_mm wants [M, K] @ [K, N]; b.t() is a view, no copy of the weight.
  const at::Tensor acc = at::_int_mm(a, b.t()).contiguous();
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pyfast_C::int8_mm", [&] {
    epilogue<scalar_t>(acc.const_data_ptr<int32_t>(), as.const_data_ptr<float>(),
                       bs.const_data_ptr<float>(),
                       bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr, M, N,
                       out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("int8_mm", &pyfast::int8_mm_cpu);
}
