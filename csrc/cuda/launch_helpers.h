// Tensor preparation shared by the torch-facing CUDA launchers (csrc/cuda/*_launch.cpp):
// the copies a kernel's alignment rules need, made only when the input breaks them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "../checks.h"

namespace pyfast {

// The tensor itself when it is contiguous and its data pointer `bytes`-aligned, else an
// aligned contiguous copy (a fresh allocation from torch's caching allocator is aligned
// to at least 256 bytes).
inline at::Tensor contiguous_aligned(const at::Tensor& t, int64_t bytes = 16) {
  const at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % bytes == 0) return c;
  return c.clone(at::MemoryFormat::Contiguous);
}

// zeros uint8 [N, G] as the int4 kernels read them, 32-bit words: contiguous, 4-byte
// aligned and round_up(N * G, 4) bytes readable (a zero-padded flat copy when needed).
inline at::Tensor zero_words(const at::Tensor& zeros) {
  at::Tensor z = zeros.contiguous();
  if (reinterpret_cast<uintptr_t>(z.const_data_ptr()) % 4 == 0 && z.numel() % 4 == 0) return z;
  const int64_t n = z.numel();
  at::Tensor padded = at::zeros({(n + 3) / 4 * 4}, z.options());
  padded.narrow(0, 0, n).copy_(z.reshape({-1}));
  return padded;
}

// bias [N] of any float dtype on x's device -> float32 contiguous (undefined for None);
// `n_what` names where N comes from (e.g. "scales.size(0) = N").
inline at::Tensor float_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x,
                             int64_t N, const char* n_what) {
  if (!bias.has_value()) return at::Tensor();
  check_same_device(*bias, "bias", x, "x");
  check_dim(*bias, "bias", 1);
  check_size(*bias, "bias", 0, N, n_what);
  PYFAST_CHECK(at::isFloatingType(bias->scalar_type()), "bias has dtype ", bias->scalar_type(),
              "; accepted: a floating-point dtype");
  return bias->to(at::kFloat).contiguous();
}

// Multiprocessor count of CUDA device `dev`, after checking that it has sparse tensor
// cores (compute capability >= 8.0); `op` names the caller in the errors.
inline int sparse_tc_sm_count(int dev, const char* op) {
  int major = 0, sms = 0;
  PYFAST_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                      cudaSuccess &&
                  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
              op, ": cannot query CUDA device ", dev);
  PYFAST_CHECK(major >= 8, op, " needs sparse tensor cores (compute capability >= 8.0); "
              "device ", dev, " has ", major, ".x");
  return sms;
}

// A float32 scratch buffer of `bytes` bytes on x's device (undefined when bytes == 0).
inline at::Tensor float_workspace(const at::Tensor& x, size_t bytes) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes / sizeof(float))}, x.options().dtype(at::kFloat));
}

}  // namespace pyfast
