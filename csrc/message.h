// Error messages of pyfast_C's checks, built without iostreams.
//
//   PYFAST_CHECK(cond, "x.size(1) = K is ", K, "; ...");   // like TORCH_CHECK
//
// TORCH_CHECK with several message arguments formats them with a std::ostringstream
// (c10::str). On the first H100 run, calls whose message streamed an integer or a
// shape crashed the test process with SIGSEGV, while messages made only of strings
// raised cleanly (README, "What has run where"). Inserting an integer into an ostream
// goes through the num_put facet of the stream's locale; when the process holds two
// copies of libstdc++'s iostream code (a library that carries its own, e.g. GCC bug
// 67903, llama.cpp PR 22434), the facet can come from one copy and the code from the
// other. That is a hypothesis, not verified on that machine. Here the message is one
// std::string made by concatenation, numbers formatted by std::to_string (no locale,
// no ostream), and TORCH_CHECK receives it as its only argument, which c10::str
// passes through untouched (c10/util/StringUtil.h, _str_wrapper<std::string>).
// The text is the same as TORCH_CHECK's would be: a shape prints as "[3, 16]" like
// c10::ArrayRef's operator<<, a dtype as c10::toString, a device as Device::str().
// The message is only built when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace pyfast {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, char* v) { s += v; }  // std::strerror
// Exact types only below: implicit conversions (a double to a one-element IntArrayRef,
// say) would print something else than the value; an unsupported type does not compile.
template <typename T, std::enable_if_t<std::is_same_v<T, c10::Device>, int> = 0>
inline void append(std::string& s, const T& v) {
  s += v.str();
}
template <typename T, std::enable_if_t<std::is_same_v<T, c10::IntArrayRef>, int> = 0>
inline void append(std::string& s, const T& v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
// Integers (not bool or char, which an ostream would print differently).
template <typename T,
          std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                               !std::is_same_v<T, char>,
                           int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}

}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace pyfast

#define PYFAST_CHECK(cond, ...) TORCH_CHECK(cond, ::pyfast::message(__VA_ARGS__))
