// CUDA registration of pyfast_C::sparse24_int4_mm_tc: checks the tensors, makes the copies
// the kernel's alignment rules need (only for strided or misaligned inputs), allocates
// the output (and the split-K workspace) and calls the torch-free launcher of
// sparse24_int4_mm.cu (declared in sparse24_int4_mm.h) on torch's current stream.
//
//   x          : float16/bfloat16 [M, K] on a CUDA device of compute capability >= 8.0
//                (float32 is refused: pyfast's Python dispatch runs the reference instead)
//   codes_tc   : int32 [ceil(N/16), ceil(K/64), 32, 2], and
//   meta_tc    : int32 [ceil(N/16), ceil(K/64), 32], from repack_sparse24_int4_tc
//                (pyfast/layouts/sparse24_int4_tc.py)
//   scales     : float [N, G] (any float dtype; converted to float32), N = scales.size(0),
//                G = K / group_size or 1 for group_size == -1
//   zeros      : uint8 [N, G], zero points 0..15
//   group_size : 32, 64, 128 or -1; K must be a multiple of 8 and of group_size
//   bias       : float [N] or None (converted to float32)
//   returns    : x.dtype [M, N] contiguous, x @ W.T + bias with the kept values
//                dequantized and rounded to x.dtype, float32 accumulation
//                (sparse24_int4_mm.h)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "../checks.h"
#include "launch_helpers.h"
#include "sparse24_int4_mm.h"

namespace pyfast {
namespace {

at::Tensor sparse24_int4_mm_tc_cuda(const at::Tensor& x_in, const at::Tensor& codes_in,
                                    const at::Tensor& meta_in, const at::Tensor& scales,
                                    const at::Tensor& zeros, int64_t group_size,
                                    const std::optional<at::Tensor>& bias_in) {
  check_device(x_in, "x", at::kCUDA);
  PYFAST_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "x has dtype ", x_in.scalar_type(),
              "; the CUDA kernel sparse24_int4_mm_tc accepts float16, bfloat16 (float32 runs "
              "the reference through torch.ops.pyfast.sparse24_int4_mm_tc)");
  check_dim(x_in, "x", 2);
  check_dtype(codes_in, "codes_tc", {at::kInt});
  check_dim(codes_in, "codes_tc", 4);
  check_dtype(meta_in, "meta_tc", {at::kInt});
  check_dim(meta_in, "meta_tc", 3);
  check_dtype(scales, "scales", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(scales, "scales", 2);
  check_dtype(zeros, "zeros", {at::kByte});
  check_dim(zeros, "zeros", 2);
  for (const auto& [t, name] : {std::pair{&codes_in, "codes_tc"}, std::pair{&meta_in, "meta_tc"},
                                std::pair{&scales, "scales"}, std::pair{&zeros, "zeros"}}) {
    check_same_device(*t, name, x_in, "x");
  }

  const int64_t M = x_in.size(0), K = x_in.size(1), N = scales.size(0);
  const int64_t G = check_int4_groups(
      group_size, K, 8, "the 2:4 + int4 format needs K % 8 == 0 (pyfast/formats.py)");
  PYFAST_CHECK(N <= 65535LL * 64, "scales.size(0) = N is ", N,
              "; the CUDA kernel accepts N <= ", 65535LL * 64);
  check_size(scales, "scales", 1, G, "K / group_size (1 for group_size -1)");
  check_size(zeros, "zeros", 0, N, "scales.size(0) = N");
  check_size(zeros, "zeros", 1, G, "K / group_size (1 for group_size -1)");
  const int64_t T16 = (N + 15) / 16, K64 = (K + 63) / 64;
  const int64_t want_codes[4] = {T16, K64, 32, 2}, want_meta[3] = {T16, K64, 32};
  PYFAST_CHECK(codes_in.sizes() == at::IntArrayRef(want_codes), "codes_tc has shape ",
              codes_in.sizes(), "; for N = ", N, ", K = ", K, " it must be ",
              at::IntArrayRef(want_codes),
              " = (ceil(N/16), ceil(K/64), 32, 2), the shape repack_sparse24_int4_tc gives");
  PYFAST_CHECK(meta_in.sizes() == at::IntArrayRef(want_meta), "meta_tc has shape ",
              meta_in.sizes(), "; for N = ", N, ", K = ", K, " it must be ",
              at::IntArrayRef(want_meta),
              " = (ceil(N/16), ceil(K/64), 32), the shape repack_sparse24_int4_tc gives");
  const at::Tensor bias = float_bias(bias_in, x_in, N, "scales.size(0) = N");

  const c10::cuda::CUDAGuard guard(x_in.device());
  const int dev = x_in.device().index();
  const int sms = sparse_tc_sm_count(dev, "pyfast_C::sparse24_int4_mm_tc");

  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor x = contiguous_aligned(x_in);
  const at::Tensor codes = contiguous_aligned(codes_in);
  const at::Tensor meta = contiguous_aligned(meta_in);
  const at::Tensor scales_f = scales.to(at::kFloat).contiguous();
  const at::Tensor zeros_w = zero_words(zeros);

  const size_t ws_bytes = pyfast_sparse24_int4_mm_tc_workspace_bytes(M, N, K, sms);
  const at::Tensor workspace = float_workspace(x, ws_bytes);
  const cudaError_t err = pyfast_sparse24_int4_mm_tc(
      x.const_data_ptr(), codes.const_data_ptr<int32_t>(), meta.const_data_ptr<int32_t>(),
      scales_f.const_data_ptr<float>(), zeros_w.const_data_ptr<uint8_t>(), G, group_size,
      bias.defined() ? bias.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
      x.scalar_type() == at::kHalf ? PYFAST_F16 : PYFAST_BF16, M, N, K,
      ws_bytes > 0 ? workspace.mutable_data_ptr<float>() : nullptr, ws_bytes, sms,
      c10::cuda::getCurrentCUDAStream(dev).stream());
  PYFAST_CHECK(err == cudaSuccess, "pyfast_C::sparse24_int4_mm_tc CUDA launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float16/bfloat16 [M, K], codes_tc int32 [ceil(N/16), ceil(K/64), 32, 2] and
  // meta_tc int32 [ceil(N/16), ceil(K/64), 32] (repack_sparse24_int4_tc), scales float
  // [N, G], zeros uint8 [N, G], bias [N] or None -> out x.dtype [M, N] = x @ W.T + bias,
  // the kept values (q - zero) * scale rounded to x.dtype, float32 accumulation.
  m.def("sparse24_int4_mm_tc(Tensor x, Tensor codes_tc, Tensor meta_tc, Tensor scales, "
        "Tensor zeros, int group_size, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CUDA, m) {
  m.impl("sparse24_int4_mm_tc", &pyfast::sparse24_int4_mm_tc_cuda);
}
