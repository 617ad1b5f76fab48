// Per-token (per-row) symmetric int8 quantization, shared by the CPU kernel of
// pyfast_C::quantize_per_token (quantize.cpp) and the fused W8A8 op
// pyfast_C::w8a8_mm (int8_mm.cpp), which quantizes x and multiplies in one call.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pyfast {
namespace cpu {

// x     : float32 / float16 / bfloat16 [M, K] on CPU, contiguous (checked)
// q     : int8    [M, K] written with row stride K
// scale : float32 [M]
// Bit-exact with the reference quantize_per_token (the rules are in quantize.cpp);
// rows are split over ATen's intra-op threads.
void quantize_per_token_into(const at::Tensor& x, int8_t* q, float* scale);

}  // namespace cpu
}  // namespace pyfast
