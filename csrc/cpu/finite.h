// all_finite(x): whether every element of a float32 / bfloat16 / float16 tensor is finite.
//
// Why the 2:4 kernels need it: their reference (pyfast/reference.py) multiplies x by the
// dense weight, pruned positions included, so a NaN or inf at a column that a weight row
// pruned gives 0 * inf = NaN in that row's output. The CPU 2:4 tiles read only the kept
// columns and would drop it; so sparse24_mm and sparse24_int4_mm send x with a non-finite
// value to their dense-panel path (at::mm on the expanded weight), which multiplies every
// position as the reference does. Such x is an error state, so its speed does not matter;
// the check itself is one pass over x's bits (M K elements against the matmul's M N K;
// ad hoc, about 1-2 us a call at M <= 4, K = 4096, on this project's Zen 4).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../message.h"

namespace pyfast {
namespace cpu {

namespace finite_detail {
// True when no element's exponent field is all ones (the IEEE encoding of inf and NaN).
template <typename Bits>
bool exponent_never_all_ones(const Bits* p, int64_t n, Bits exp_mask) {
  Bits bad = 0;  // branch-free, so the loop vectorizes; one test at the end
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((p[i] & exp_mask) == exp_mask);
  return bad == 0;
}
}  // namespace finite_detail

// x: float32 / bfloat16 / float16, contiguous (the caller's contiguous copy).
inline bool all_finite(const at::Tensor& x) {
  const int64_t n = x.numel();
  const void* p = x.const_data_ptr();
  switch (x.scalar_type()) {
    case at::kFloat:
      return finite_detail::exponent_never_all_ones(static_cast<const uint32_t*>(p), n,
                                                    uint32_t{0x7f800000});
    case at::kBFloat16:
      return finite_detail::exponent_never_all_ones(static_cast<const uint16_t*>(p), n,
                                                    uint16_t{0x7f80});
    case at::kHalf:
      return finite_detail::exponent_never_all_ones(static_cast<const uint16_t*>(p), n,
                                                    uint16_t{0x7c00});
    default:
      PYFAST_CHECK(false, "all_finite: x has dtype ", x.scalar_type(),
                  "; accepted: float32, bfloat16, float16");
  }
}

}  // namespace cpu
}  // namespace pyfast
