// CPU kernels of pyfast_C::quantize_per_token (symmetric per-row int8) and
// pyfast_C::quantize_static (one calibrated scale; at the end of the file).
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
// - rounding is round-half-to-even (as torch.round), by the 1.5 * 2**23 trick
//   below; the clamp bounds are integers, so clamping first changes nothing.
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
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "quantize.h"

namespace pyfast {
namespace {

// Round-half-to-even of |v| <= 127 without a libm call: adding and subtracting
// 1.5 * 2**23 leaves the float with no fraction bits, so the FPU's default
// round-to-nearest-even does the rounding (exact for |v| < 2**22). Unlike
// std::nearbyint (a libm call without SSE4.1), this vectorises with baseline
// SSE2/AVX. It relies on no -ffast-math, which would fold the two operations away.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2**23

// The row kernel is compiled three times (GCC function multi-versioning,
// target_clones) and the loader picks the widest the CPU has: AVX-512, AVX2 or
// baseline x86-64. A wheel built here therefore runs on any x86-64 CPU and uses
// 16-lane divisions where they exist. Every clone computes the same IEEE float32
// operations, so all three are bit-exact with the reference.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYFAST_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYFAST_ISA_CLONES
#endif

PYFAST_ISA_CLONES
void quantize_row_f32(const float* xr, int64_t K, int8_t* qr, float* scale_out) {
  // amax on the bit patterns of |x|: for non-negative IEEE floats the integer
  // order is the float order, and every NaN pattern is above +inf (0x7f800000).
  // An integer max reduction vectorises; a float one would need -ffast-math.
  uint32_t max_bits = 0;
  for (int64_t k = 0; k < K; ++k) {
    uint32_t b;
    std::memcpy(&b, xr + k, sizeof b);
    b &= 0x7fffffffu;
    max_bits = b > max_bits ? b : max_bits;
  }
  float amax;
  std::memcpy(&amax, &max_bits, sizeof amax);
  const float s0 = amax / 127.0f;
  const float s = std::isnan(amax) ? amax : (s0 > 0.0f ? s0 : 1.0f);
  *scale_out = s;
  if (!std::isfinite(s)) {
    // A NaN row (scale NaN) or an inf row (x / inf is 0 or NaN): q is all 0 and
    // the non-finite scale carries the problem into the matmul, as in the reference.
    std::fill(qr, qr + K, int8_t{0});
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    // Clamping before rounding equals rounding before clamping: the bounds are
    // integers. Ternaries (not std::min/max) plus -fno-trapping-math (setup.py)
    // let GCC turn the clamp into vector min/max and vectorise the loop.
    float v = xr[k] / s;  // true division, as the reference
    v = v < -127.0f ? -127.0f : v;
    v = v > 127.0f ? 127.0f : v;
    qr[k] = static_cast<int8_t>(static_cast<int32_t>((v + kRoundMagic) - kRoundMagic));
  }
}

// pyfast_C::quantize_static's row: one calibrated scale s for every row, as the
// reference (pyfast/reference.py: quantize_static) computes it:
//   q = clamp(round_half_even(nan_to_0(float32(x) / s)), -127, 127)
// (the reference rounds, then maps NaN to 0 and +-inf to +-FLT_MAX, then clamps; an
// inf here is clamped directly to +-127, the same int8). Returns whether the row holds
// a NaN (its row scale is then NaN). Any s gives the reference's q; the Python op
// checks that s is positive and finite.
PYFAST_ISA_CLONES
bool quantize_row_static_f32(const float* xr, int64_t K, float s, int8_t* qr) {
  int nan = 0;  // an int OR-reduction vectorises; a bool one may not
  for (int64_t k = 0; k < K; ++k) {
    const float x = xr[k];
    nan |= x != x;
    float v = x / s;  // true division, as the reference
    v = v != v ? 0.0f : v;
    v = v < -127.0f ? -127.0f : v;
    v = v > 127.0f ? 127.0f : v;
    qr[k] = static_cast<int8_t>(static_cast<int32_t>((v + kRoundMagic) - kRoundMagic));
  }
  return nan != 0;
}

// row(xr, m) for every row m of x [M, K] (row stride K), xr its float32 values
// (float16/bfloat16 rows widened first, exactly); rows split over ATen's threads.
template <typename T, typename RowFn>
void for_rows_f32(const T* x, int64_t M, int64_t K, RowFn row) {
  // Rows are independent; a chunk of about 32k elements amortises the task overhead.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wide;
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * K;
      if constexpr (std::is_same_v<T, float>) {
        row(xr, m);
      } else {
        wide.resize(K);
        for (int64_t k = 0; k < K; ++k) wide[k] = static_cast<float>(xr[k]);
        row(wide.data(), m);
      }
    }
  });
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  for_rows_f32(x, M, K, [&](const float* xr, int64_t m) {
    quantize_row_f32(xr, K, q + m * K, scale + m);
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
  cpu::quantize_per_token_into(x, q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>());
  return {q, scale};
}

// pyfast_C::quantize_static:
//   x     : float32 / float16 / bfloat16 [M, K], any strides (made contiguous)
//   scale : float32, one value (the calibrated scale s; [1] from the layers)
//   -> q int8 [M, K] contiguous (quantize_row_static_f32), row scales float32 [M]:
//      s, or NaN for a row holding a NaN (as the reference: int8_mm then gives NaN).
std::tuple<at::Tensor, at::Tensor> quantize_static_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& scale) {
  check_device(x_in, "x", at::kCPU);
  check_device(scale, "scale", at::kCPU);
  check_dtype(x_in, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  check_dtype(scale, "scale", {at::kFloat});
  PYFAST_CHECK(scale.numel() == 1, "scale has shape ", scale.sizes(),
              "; accepted: one value (float32 [1])");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const float s = scale.contiguous().const_data_ptr<float>()[0];
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor rows = at::empty({M}, x.options().dtype(at::kFloat));
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* rp = rows.mutable_data_ptr<float>();
  if (M == 0) return {q, rows};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pyfast_C::quantize_static", [&] {
    for_rows_f32(x.const_data_ptr<scalar_t>(), M, K, [&](const float* xr, int64_t m) {
      const bool nan = quantize_row_static_f32(xr, K, s, qp + m * K);
      rp[m] = nan ? std::numeric_limits<float>::quiet_NaN() : s;
    });
  });
  return {q, rows};
}

}  // namespace

void cpu::quantize_per_token_into(const at::Tensor& x, int8_t* q, float* scale) {
  check_device(x, "x", at::kCPU);
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x, "x", 2);
  PYFAST_CHECK(x.is_contiguous(), "quantize_per_token_into: x must be contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pyfast_C::quantize_per_token", [&] {
    quantize_rows<scalar_t>(x.const_data_ptr<scalar_t>(), M, K, q, scale);
  });
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("quantize_per_token", &pyfast::quantize_per_token_cpu);
  m.impl("quantize_static", &pyfast::quantize_static_cpu);
}
