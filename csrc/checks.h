// Input checks shared by the CPU kernels and the CUDA launchers of pyfast_C.
//
// Every check names the argument, the value it got and what is accepted, so a
// failing call from Python says exactly which tensor is wrong (a RuntimeError
// raised by PYFAST_CHECK, message.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>

#include "message.h"

namespace pyfast {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (at::ScalarType t : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

// `name` must have one of `dtypes`.
inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> dtypes) {
  bool ok = false;
  for (at::ScalarType d : dtypes) ok = ok || t.scalar_type() == d;
  PYFAST_CHECK(ok, name, " has dtype ", t.scalar_type(), "; accepted: ",
              dtype_list(dtypes));
}

// `name` must have `dim` dimensions.
inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  PYFAST_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(),
              "-D with shape ", t.sizes());
}

// `name`.size(`d`) must equal `expected` (described by `what`, e.g. "a.size(0) = M").
inline void check_size(const at::Tensor& t, const char* name, int64_t d,
                       int64_t expected, const char* what) {
  PYFAST_CHECK(t.size(d) == expected, name, ".size(", d, ") is ", t.size(d),
              " (shape ", t.sizes(), "); it must equal ", what, " = ", expected);
}

// `name` must be on a device of type `type` (and on `like`'s device if given).
inline void check_device(const at::Tensor& t, const char* name, at::DeviceType type) {
  PYFAST_CHECK(t.device().type() == type, name, " is on ", t.device(),
              "; this kernel accepts ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " tensors only");
}

inline void check_same_device(const at::Tensor& t, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  PYFAST_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// An optional bias: a floating dtype, 1-D, n values (n described by `what`).
inline void check_bias(const std::optional<at::Tensor>& bias, int64_t n, const char* what) {
  if (!bias.has_value()) return;
  PYFAST_CHECK(at::isFloatingType(bias->scalar_type()), "bias has dtype ",
              bias->scalar_type(), "; accepted: a floating dtype or None");
  check_dim(*bias, "bias", 1);
  check_size(*bias, "bias", 0, n, what);
}

// The group layout of every int4 kernel (pyfast/formats.py): group_size 32 / 64 / 128 or
// -1 (per channel), and K = x.size(1) a multiple of `k_multiple` (the format's packing;
// `why` says which) and of group_size. Returns G, the groups per weight row.
inline int64_t check_int4_groups(int64_t group_size, int64_t K, int64_t k_multiple,
                                 const char* why) {
  PYFAST_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == -1,
              "group_size is ", group_size, "; accepted: 32, 64, 128, -1 (per channel)");
  PYFAST_CHECK(K % k_multiple == 0, "x.size(1) = K is ", K, "; ", why);
  PYFAST_CHECK(group_size == -1 || K % group_size == 0, "x.size(1) = K is ", K,
              "; it must be a multiple of group_size = ", group_size);
  return group_size == -1 ? 1 : K / group_size;
}

// The int8 activations of int8_mm and int8_mm_vnni: a int8 [M, K], a_scale float32 [M].
inline void check_int8_rows(const at::Tensor& a, const at::Tensor& a_scale) {
  check_dtype(a, "a", {at::kChar});
  check_dim(a, "a", 2);
  check_dtype(a_scale, "a_scale", {at::kFloat});
  check_dim(a_scale, "a_scale", 1);
  check_size(a_scale, "a_scale", 0, a.size(0), "a.size(0) = M");
}

// The output dtype of the int8 GEMMs: float32, float16 or bfloat16.
inline void check_out_dtype(at::ScalarType out_dtype) {
  PYFAST_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "out_dtype is ", out_dtype, "; accepted: ",
              dtype_list({at::kFloat, at::kHalf, at::kBFloat16}));
}

// Shapes, dtypes and the K limit of pyfast_C::int8_mm's arguments, shared by the CPU
// kernel and the CUDA launcher (each checks devices itself). Returns {M, K, N}.
//   a int8 [M, K], b int8 [N, K], a_scale float32 [M], b_scale float32 [N],
//   bias floating [N] or none, out_dtype float32/float16/bfloat16, K <= max_k.
inline std::array<int64_t, 3> check_int8_mm_args(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
    const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
    at::ScalarType out_dtype, int64_t max_k) {
  check_int8_rows(a, a_scale);
  check_dtype(b, "b", {at::kChar});
  check_dim(b, "b", 2);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  check_size(b, "b", 1, K, "a.size(1) = K");
  PYFAST_CHECK(K <= max_k, "a.size(1) = K is ", K, "; int8_mm accepts K <= ", max_k,
              " (larger K could overflow the int32 accumulator)");
  check_dtype(b_scale, "b_scale", {at::kFloat});
  check_dim(b_scale, "b_scale", 1);
  check_size(b_scale, "b_scale", 0, N, "b.size(0) = N");
  check_out_dtype(out_dtype);
  check_bias(bias, N, "b.size(0) = N");
  return {M, K, N};
}

}  // namespace pyfast
