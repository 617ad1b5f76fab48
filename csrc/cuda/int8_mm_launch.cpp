// CUDA kernel registration of pyfast_C::int8_mm: checks the tensors (as the CPU
// kernel csrc/cpu/int8_mm.cpp does), allocates the output and the split-K
// workspace, and calls the torch-free launcher of int8_mm.cu (int8_mm.h) on torch's
// current stream.
//
//   a       : int8    [M, K] on a CUDA device; rows may be strided (stride(1) == 1
//             and stride(0) >= K are used in place, anything else is made contiguous)
//   b       : int8    [N, K] on a's device, same rule
//   a_scale : float32 [M], b_scale : float32 [N] (made contiguous)
//   bias    : [N] of any floating dtype or None; converted to float32 contiguous,
//             as the reference adds bias.float()
//   out     : out_dtype (float32/float16/bfloat16) [M, N] contiguous, on a's device
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../checks.h"
#include "int8_mm.h"

namespace pyfast {
namespace {

int out_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return PYFAST_F32;
    case at::kHalf: return PYFAST_F16;
    case at::kBFloat16: return PYFAST_BF16;
    default:
      PYFAST_CHECK(false, "out_dtype is ", t, "; accepted: ",
                  dtype_list({at::kFloat, at::kHalf, at::kBFloat16}));
  }
}

// `t` as it is if its rows are unit-stride along K with non-overlapping rows,
// otherwise a contiguous copy; `ld` gets the row stride the kernel will use.
at::Tensor rows_of(const at::Tensor& t, int64_t& ld) {
  const int64_t rows = t.size(0), K = t.size(1);
  const bool ok = (t.stride(1) == 1 || K <= 1) && (rows <= 1 || t.stride(0) >= K);
  const at::Tensor r = ok ? t : t.contiguous();
  ld = rows <= 1 ? K : r.stride(0);
  return r;
}

at::Tensor int8_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& a_scale,
                        const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                        at::ScalarType out_dtype) {
  check_device(a_in, "a", at::kCUDA);
  check_same_device(b_in, "b", a_in, "a");
  check_same_device(a_scale, "a_scale", a_in, "a");
  check_same_device(b_scale, "b_scale", a_in, "a");
  if (bias.has_value()) check_same_device(*bias, "bias", a_in, "a");
  const auto [M, K, N] = check_int8_mm_args(a_in, b_in, a_scale, b_scale, bias, out_dtype,
                                            PYFAST_INT8_MM_MAX_K);
  PYFAST_CHECK(M <= PYFAST_INT8_MM_MAX_ROWS, "a.size(0) = M is ", M,
              "; the CUDA int8_mm accepts M <= ", PYFAST_INT8_MM_MAX_ROWS);
  PYFAST_CHECK(N <= PYFAST_INT8_MM_MAX_ROWS, "b.size(0) = N is ", N,
              "; the CUDA int8_mm accepts N <= ", PYFAST_INT8_MM_MAX_ROWS);
  const int out_code = out_dtype_code(out_dtype);
  at::Tensor bias_f;

  const c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor out = at::empty({M, N}, a_in.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // The reference adds bias.float(): one rounding for a float64 bias, exact otherwise.
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  int64_t lda = 0, ldb = 0;
  const at::Tensor a = rows_of(a_in, lda), b = rows_of(b_in, ldb);
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();

  // The SM count only steers split-K (how many CTAs share one output tile's K).
  int sm_count = 0;
  const cudaError_t attr_err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                                      a.device().index());
  PYFAST_CHECK(attr_err == cudaSuccess, "pyfast_C::int8_mm: cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(attr_err));
  const int64_t ws_elems = pyfast_int8_mm_workspace_elems(M, N, K, sm_count);
  at::Tensor ws;
  if (ws_elems > 0) ws = at::empty({ws_elems}, a.options().dtype(at::kInt));

  const cudaError_t err = pyfast_int8_mm(
      a.const_data_ptr<int8_t>(), lda, b.const_data_ptr<int8_t>(), ldb, M, N, K,
      as.const_data_ptr<float>(), bs.const_data_ptr<float>(),
      bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
      out_code, ws.defined() ? ws.mutable_data_ptr<int32_t>() : nullptr, ws_elems, sm_count,
      c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  PYFAST_CHECK(err == cudaSuccess, "pyfast_C::int8_mm CUDA launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast_C, CUDA, m) {
  m.impl("int8_mm", &pyfast::int8_mm_cuda);
}
