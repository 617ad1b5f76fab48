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
#include "sparse24_mm.h"

namespace pyfast {
namespace {

// The tensor itself when it is contiguous and 16-byte aligned, else an aligned copy
// (a fresh allocation from torch's caching allocator is 16-byte aligned).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0) return c;
  return c.clone(at::MemoryFormat::Contiguous);
}

at::Tensor sparse24_mm_tc_cuda(const at::Tensor& x_in, const at::Tensor& values_in,
                               const at::Tensor& meta_in, const std::optional<at::Tensor>& bias_in) {
  check_device(x_in, "x", at::kCUDA);
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
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
  TORCH_CHECK(K % 4 == 0, "x.size(1) = K is ", K, "; 2:4 sparsity needs K % 4 == 0");
  check_size(values_in, "values", 1, K / 2, "K / 2");
  check_size(meta_in, "meta_tc", 0, (N + 15) / 16, "ceil(N / 16)");
  check_size(meta_in, "meta_tc", 1, (K + 63) / 64, "ceil(K / 64)");
  check_size(meta_in, "meta_tc", 2, 32, "32 (lanes)");
  TORCH_CHECK(N <= 65535LL * 64, "values.size(0) = N is ", N,
              "; the CUDA kernel accepts N <= ", 65535 * 64);
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_same_device(*bias_in, "bias", x_in, "x");
    check_dim(*bias_in, "bias", 1);
    check_size(*bias_in, "bias", 0, N, "values.size(0) = N");
    TORCH_CHECK(at::isFloatingType(bias_in->scalar_type()), "bias has dtype ",
                bias_in->scalar_type(), "; accepted: a floating-point dtype");
    bias = bias_in->to(at::kFloat).contiguous();
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int dev = x_in.device().index();
  int major = 0, sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                      cudaSuccess &&
                  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
              "pyfast_C::sparse24_mm_tc: cannot query CUDA device ", dev);
  TORCH_CHECK(major >= 8, "pyfast_C::sparse24_mm_tc needs sparse tensor cores (compute "
              "capability >= 8.0); device ", dev, " has ", major, ".x");

  const at::Tensor x = contiguous_aligned(x_in);
  const at::Tensor values = contiguous_aligned(values_in);
  const at::Tensor meta = contiguous_aligned(meta_in);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  const size_t ws_bytes = pyfast_sparse24_mm_tc_workspace_bytes(M, N, K, sms);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))},
                          x.options().dtype(at::kFloat));
  }
  const cudaError_t err = pyfast_sparse24_mm_tc(
      x.const_data_ptr(), values.const_data_ptr(), meta.const_data_ptr<int32_t>(),
      bias.defined() ? bias.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
      x.scalar_type() == at::kHalf ? PYFAST_F16 : PYFAST_BF16, M, N, K,
      ws_bytes > 0 ? workspace.mutable_data_ptr<float>() : nullptr, ws_bytes, sms,
      c10::cuda::getCurrentCUDAStream(dev).stream());
  TORCH_CHECK(err == cudaSuccess, "pyfast_C::sparse24_mm_tc CUDA launch failed: ",
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
