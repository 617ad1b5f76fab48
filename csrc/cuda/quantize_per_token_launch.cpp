// CUDA kernel registration of pyfast_C::quantize_per_token: checks the tensors,
// allocates the outputs and calls the torch-free launcher of
// quantize_per_token.cu (declared in kernels.h) on torch's current stream.
//
//   x     : float32/float16/bfloat16 [M, K] on a CUDA device; rows may be strided
//           (stride(1) must be 1 and stride(0) >= K, otherwise x is made contiguous)
//   q     : int8    [M, K] contiguous, on x's device
//   scale : float32 [M], on x's device
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace pyfast {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return PYFAST_F32;
    case at::kHalf: return PYFAST_F16;
    case at::kBFloat16: return PYFAST_BF16;
    default: PYFAST_CHECK(false, "x has dtype ", t, "; accepted: float32, float16, bfloat16");
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in) {
  check_device(x_in, "x", at::kCUDA);
  check_dtype(x_in, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  const int64_t M = x_in.size(0), K = x_in.size(1);
  PYFAST_CHECK(M <= 0x7fffffff, "x.size(0) = M is ", M,
              "; the CUDA kernel accepts M <= 2**31 - 1 (one thread block per row)");
  // The kernel reads rows at x + m * row_stride with unit stride along K.
  const bool rows_ok = x_in.stride(1) == 1 && (M <= 1 || x_in.stride(0) >= K);
  const at::Tensor x = rows_ok ? x_in : x_in.contiguous();
  const int64_t row_stride = M <= 1 ? K : x.stride(0);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const cudaError_t err = pyfast_quantize_per_token(
      x.const_data_ptr(), dtype_code(x.scalar_type()), M, K, row_stride,
      q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  PYFAST_CHECK(err == cudaSuccess, "pyfast_C::quantize_per_token CUDA launch failed: ",
              cudaGetErrorString(err));
  return {q, scale};
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CUDA, m) {
  m.impl("quantize_per_token", &pyfast::quantize_per_token_cuda);
}
