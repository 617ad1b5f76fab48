// pyfast_C::int4_mm_tc: schema and CUDA registration. Checks the tensors, makes the
// copies the kernel's alignment rules need (only for odd shapes or strided inputs),
// provides the split-K workspace and calls the torch-free launcher of int4_mm.cu
// (declared in int4_mm.h) on torch's current stream.
//
//   x          : float16/bfloat16 [M, K] on a CUDA device (float32 is refused: the kernel
//                multiplies on float16/bfloat16 tensor cores; pyfast's Python dispatch
//                sends float32 to the reference instead)
//   w_tc       : int32 [ceil(N/64), ceil(K/16), 32, 4] from repack_int4_tc
//                (pyfast/layouts/int4_tc.py)
//   scales     : float [N, G] (any float dtype; converted to float32), G = K / group_size
//                or 1 for group_size == -1; N = scales.size(0)
//   zeros      : uint8 [N, G], zero points 0..15
//   group_size : 32, 64, 128 or -1; K must be even and a multiple of it
//   bias       : float [N] or None (converted to float32)
//   returns    : x.dtype [M, N] contiguous,
//                out = x.dtype(x @ W^T + bias) with W the dequantized weight rounded to
//                x.dtype and float32 accumulation (int4_mm.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

#include "../checks.h"
#include "int4_mm.h"
#include "launch_helpers.h"

namespace pyfast {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// The split-K workspace: zero-filled once, left zero by every kernel launch (int4_mm.cu),
// so it is kept per (device, stream) and reused without a memset. Kernels of one stream
// run in order, so they never share it concurrently; a new stream gets its own. While a
// stream is being captured into a CUDA graph a fresh zeroed buffer is made instead (its
// memset is captured with the graph and the graph's pool keeps it alive), so no graph
// holds a pointer into this cache. The map is heap-allocated and never destroyed: its
// tensors must not be freed after the CUDA caching allocator at process exit.
at::Tensor split_k_workspace(const at::Tensor& like, size_t bytes, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(ceil_div(static_cast<int64_t>(bytes), 16) * 16);
  const auto opts = like.options().dtype(at::kByte);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PYFAST_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess,
              "pyfast_C::int4_mm_tc: cudaStreamIsCapturing failed");
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, opts);

  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& ws = (*cache)[{static_cast<int>(like.get_device()), stream}];
  if (!ws.defined() || ws.numel() < n) ws = at::zeros({n}, opts);  // on `stream`
  return ws;
}

at::Tensor int4_mm_tc_cuda(const at::Tensor& x_in, const at::Tensor& w_tc_in,
                           const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_device(x_in, "x", at::kCUDA);
  check_dtype(x_in, "x", {at::kHalf, at::kBFloat16});
  check_dim(x_in, "x", 2);
  check_dtype(w_tc_in, "w_tc", {at::kInt});
  check_dim(w_tc_in, "w_tc", 4);
  check_dtype(scales, "scales", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(scales, "scales", 2);
  check_dtype(zeros, "zeros", {at::kByte});
  check_dim(zeros, "zeros", 2);
  for (const auto& [t, name] : {std::pair{&w_tc_in, "w_tc"}, std::pair{&scales, "scales"},
                                std::pair{&zeros, "zeros"}}) {
    check_same_device(*t, name, x_in, "x");
  }

  const int64_t M = x_in.size(0), K = x_in.size(1), N = scales.size(0);
  const int64_t G =
      check_int4_groups(group_size, K, 2, "the int4 format needs an even K (two int4 per byte)");
  PYFAST_CHECK(K >= 2, "x.size(1) = K is ", K, "; the CUDA kernel needs K >= 2");
  PYFAST_CHECK(N >= 1 && N <= 65535LL * 64, "scales.size(0) = N is ", N,
              "; the CUDA kernel accepts 1 <= N <= ", 65535LL * 64);
  PYFAST_CHECK(M <= 0x7fffffff, "x.size(0) = M is ", M, "; the CUDA kernel accepts M < 2**31");
  check_size(scales, "scales", 1, G, "K / group_size (1 for group_size -1)");
  check_size(zeros, "zeros", 0, N, "scales.size(0) = N");
  check_size(zeros, "zeros", 1, G, "K / group_size (1 for group_size -1)");
  const int64_t want[4] = {ceil_div(N, 64), ceil_div(K, 16), 32, 4};
  PYFAST_CHECK(w_tc_in.sizes() == at::IntArrayRef(want), "w_tc has shape ", w_tc_in.sizes(),
              "; for N = ", N, ", K = ", K, " it must be ", at::IntArrayRef(want),
              " = (ceil(N/64), ceil(K/16), 32, 4), the shape repack_int4_tc gives");
  if (bias) {
    check_dtype(*bias, "bias", {at::kFloat, at::kHalf, at::kBFloat16});
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, N, "scales.size(0) = N");
    check_same_device(*bias, "bias", x_in, "x");
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_in.device().index()).stream();

  // x: unit stride along K, rows 16-byte aligned and round_up(K, 8) columns readable
  // (zero beyond K): as given when K % 8 == 0 and the rows are aligned, else a padded copy.
  const int64_t K8 = ceil_div(K, 8) * 8;
  const bool x_ok = K8 == K && x_in.stride(1) == 1 && aligned(x_in, 16) &&
                    (M == 1 || (x_in.stride(0) >= K && x_in.stride(0) % 8 == 0));
  at::Tensor x = x_in;
  if (!x_ok) {
    x = at::zeros({M, K8}, x_in.options());
    x.narrow(1, 0, K).copy_(x_in);
  }
  const int64_t x_row_stride = (M == 1 || !x_ok) ? K8 : x.stride(0);
  // w_tc: contiguous and 16-byte aligned (a fresh copy when it is a misaligned view).
  const at::Tensor w_tc = contiguous_aligned(w_tc_in);
  const at::Tensor scales_f = scales.to(at::kFloat).contiguous();
  const at::Tensor zeros_w = zero_words(zeros);  // read as 32-bit words
  at::Tensor bias_f;
  if (bias) bias_f = bias->to(at::kFloat).contiguous();
  const at::Tensor ws = split_k_workspace(x, pyfast_int4_mm_tc_workspace_bytes(M, N), stream);

  const cudaError_t err = pyfast_int4_mm_tc(
      x.const_data_ptr(), x.scalar_type() == at::kHalf ? PYFAST_F16 : PYFAST_BF16, M, K,
      x_row_stride, w_tc.const_data_ptr<int32_t>(), N, scales_f.const_data_ptr<float>(),
      zeros_w.const_data_ptr<uint8_t>(), group_size,
      bias ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
      ws.mutable_data_ptr(), stream);
  PYFAST_CHECK(err == cudaSuccess, "pyfast_C::int4_mm_tc CUDA launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float16/bfloat16 [M, K], w_tc int32 [ceil(N/64), ceil(K/16), 32, 4] (repack_int4_tc),
  // scales float [N, G], zeros uint8 [N, G], bias [N] or None -> x.dtype [M, N]:
  //   out = x @ W^T + bias, W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] rounded to
  //   x.dtype, g = k // group_size, float32 accumulation (pyfast.reference.int4_mm_tc).
  m.def("int4_mm_tc(Tensor x, Tensor w_tc, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CUDA, m) {
  m.impl("int4_mm_tc", &pyfast::int4_mm_tc_cuda);
}
