// CUDA registration of pyfast_C::sparse24_mm_tc: checks the tensors, allocates the
// output (and the split-K workspace) and calls the torch-free launcher of
// sparse24_mm.cu (declared in sparse24_mm.h) on torch's current stream.
//
//   x       : float16/bfloat16 [M, K] on a CUDA device of compute capability >= 8.0
//             (float32 is rejected: the Python dispatch runs the reference instead);
//             made contiguous if it is not
//   values  : x.dtype [N, K/2], the canonical 2:4 values (pyfast/formats.py)
//   meta_tc : int32 [ceil(N/16), ceil(K/64), 32], repack_sparse24_tc(meta)
//             (pyfast/layouts/sparse24_tc.py)
//   bias    : [N] of any float dtype, or None (converted to float32 once per call)
//   returns : x.dtype [M, N] contiguous,  x @ W.T + bias, float32 accumulation
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../checks.h"
#include "launch_helpers.h"
#include "sparse24_mm.h"

namespace pyfast {
namespace {

at::Tensor sparse24_mm_tc_cuda(const at::Tensor& x_in, const at::Tensor& values_in,
                               const at::Tensor& meta_in, const std::optional<at::Tensor>& bias_in) {
  check_device(x_in, "x", at::kCUDA);
  PYFAST_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "x has dtype ", x_in.scalar_type(),
              "; the CUDA kernel sparse24_mm_tc accepts float16, bfloat16 (float32 runs the "
              "reference through torch.ops.pyfast.sparse24_mm_tc)");
  check_dim(x_in, "x", 2);
  check_same_device(values_in, "values", x_in, "x");
  check_same_device(meta_in, "meta_tc", x_in, "x");
  check_dtype(values_in, "values", {x_in.scalar_type()});
  check_dim(values_in, "values", 2);
  check_dtype(meta_in, "meta_tc", {at::kInt});
  check_dim(meta_in, "meta_tc", 3);

  const int64_t M = x_in.size(0), K = x_in.size(1), N = values_in.size(0);
  PYFAST_CHECK(K % 4 == 0, "x.size(1) = K is ", K, "; 2:4 sparsity needs K % 4 == 0");
  check_size(values_in, "values", 1, K / 2, "K / 2");
  check_size(meta_in, "meta_tc", 0, (N + 15) / 16, "ceil(N / 16)");
  check_size(meta_in, "meta_tc", 1, (K + 63) / 64, "ceil(K / 64)");
  check_size(meta_in, "meta_tc", 2, 32, "32 (lanes)");
  PYFAST_CHECK(N <= 65535LL * 64, "values.size(0) = N is ", N,
              "; the CUDA kernel accepts N <= ", 65535 * 64);
  const at::Tensor bias = float_bias(bias_in, x_in, N, "values.size(0) = N");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int dev = x_in.device().index();
  const int sms = sparse_tc_sm_count(dev, "pyfast_C::sparse24_mm_tc");

  const at::Tensor x = contiguous_aligned(x_in);
  const at::Tensor values = contiguous_aligned(values_in);
  const at::Tensor meta = contiguous_aligned(meta_in);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  const size_t ws_bytes = pyfast_sparse24_mm_tc_workspace_bytes(M, N, K, sms);
  const at::Tensor workspace = float_workspace(x, ws_bytes);
  const cudaError_t err = pyfast_sparse24_mm_tc(
      x.const_data_ptr(), values.const_data_ptr(), meta.const_data_ptr<int32_t>(),
      bias.defined() ? bias.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
      x.scalar_type() == at::kHalf ? PYFAST_F16 : PYFAST_BF16, M, N, K,
      ws_bytes > 0 ? workspace.mutable_data_ptr<float>() : nullptr, ws_bytes, sms,
      c10::cuda::getCurrentCUDAStream(dev).stream());
  PYFAST_CHECK(err == cudaSuccess, "pyfast_C::sparse24_mm_tc CUDA launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float16/bfloat16 [M, K], values x.dtype [N, K/2] (canonical 2:4 values),
  // meta_tc int32 [ceil(N/16), ceil(K/64), 32] (repack_sparse24_tc), bias [N] or None
  //   -> out x.dtype [M, N] = x @ W.T + bias, float32 accumulation, one rounding.
  m.def("sparse24_mm_tc(Tensor x, Tensor values, Tensor meta_tc, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CUDA, m) {
  m.impl("sparse24_mm_tc", &pyfast::sparse24_mm_tc_cuda);
}
