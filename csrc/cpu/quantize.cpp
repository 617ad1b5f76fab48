// CPU kernel of pyfast_C::quantize_per_token (symmetric per-row int8).
//
//   x     : float32 / float16 / bfloat16 [M, K], any strides (made contiguous)
//   q     : int8    [M, K] contiguous  clamp(round_half_even(x / scale), -127, 127)
//   scale : float32 [M]                amax(|x[m, :]|) / 127; 1.0 where that is 0 (an
//                                      all-zero row, or a subnormal amax that underflows)
//
// Bit-exact with the reference (pyfast/reference.py: quantize_rows_int8):
// - every x is widened to float32 first (exact for float16/bfloat16);
// - scale = amax / 127.0f and v = x / scale are IEEE float32 true divisions,
//   like torch's `amax / 127.0` and `xf / scale[:, None]` (no reciprocal-multiply:
//   this file is compiled without -ffast-math);
// - std::nearbyint rounds in the current rounding mode, which is the default
//   round-to-nearest-even (the mode torch.round uses); the clamp bounds are
//   integers, so rounding then clamping equals what the reference does.
// NaN: a row holding a NaN gets scale NaN, so whatever consumes the scale
// (int8_mm's epilogue) yields NaN for that row instead of a plausible number;
// its q values are 0. As in the reference.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../checks.h"

namespace pyfast {
namespace {

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  // Rows are independent; a chunk of about 32k elements amortises the task overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * K;
      int8_t* qr = q + m * K;
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(static_cast<float>(xr[k]));
        // NaN-propagating max (std::max / fmaxf would drop a NaN).
        amax = (a > amax || std::isnan(a)) ? a : amax;
      }
      const float s0 = amax / 127.0f;
      const float s = std::isnan(amax) ? amax : (s0 > 0.0f ? s0 : 1.0f);
      scale[m] = s;
      for (int64_t k = 0; k < K; ++k) {
        const float v = static_cast<float>(xr[k]) / s;
        float r = std::nearbyint(v);
        r = std::isnan(r) ? 0.0f : std::min(std::max(r, -127.0f), 127.0f);
        qr[k] = static_cast<int8_t>(r);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x_in) {
  check_device(x_in, "x", at::kCPU);
  check_dtype(x_in, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pyfast_C::quantize_per_token", [&] {
    quantize_rows<scalar_t>(x.const_data_ptr<scalar_t>(), M, K,
                            q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>());
  });
  return {q, scale};
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("quantize_per_token", &pyfast::quantize_per_token_cpu);
}
