// Input checks shared by the CPU kernels and the CUDA launchers of pyfast_C.
//
// Every check names the argument, the value it got and what is accepted, so a
// failing call from Python says exactly which tensor is wrong (a RuntimeError
// raised by TORCH_CHECK).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <initializer_list>
#include <string>

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
  TORCH_CHECK(ok, name, " has dtype ", t.scalar_type(), "; accepted: ",
              dtype_list(dtypes));
}

// `name` must have `dim` dimensions.
inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(),
              "-D with shape ", t.sizes());
}

// `name`.size(`d`) must equal `expected` (described by `what`, e.g. "a.size(0) = M").
inline void check_size(const at::Tensor& t, const char* name, int64_t d,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(d) == expected, name, ".size(", d, ") is ", t.size(d),
              " (shape ", t.sizes(), "); it must equal ", what, " = ", expected);
}

// `name` must be on a device of type `type` (and on `like`'s device if given).
inline void check_device(const at::Tensor& t, const char* name, at::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, name, " is on ", t.device(),
              "; this kernel accepts ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " tensors only");
}

inline void check_same_device(const at::Tensor& t, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

}  // namespace pyfast
