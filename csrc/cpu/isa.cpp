// Run-time ISA selection for the CPU kernels (see isa.h) and its ops:
//   pyfast_C::cpu_isa() -> str                   the active level
//   pyfast_C::set_cpu_isa(str isa) -> str        set it ("avx512", "avx2", "scalar",
//                                                "best"); returns the previous level
//   pyfast_C::cpu_has_vbmi() -> bool             the CPU reports AVX512_VBMI
#include "isa.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "../message.h"

namespace pyfast {
namespace cpu {
namespace {

Isa detect() {
#if PYFAST_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512vnni");
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

std::atomic<int>& requested() {
  static std::atomic<int> level{static_cast<int>(Isa::kAvx512)};
  return level;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  return static_cast<Isa>(std::min(requested().load(std::memory_order_relaxed),
                                   static_cast<int>(detected_isa())));
}

void set_isa(Isa isa) { requested().store(static_cast<int>(isa)); }

bool has_bf16_dot() {
#if PYFAST_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has && std::getenv("PYFAST_NO_BF16DOT") == nullptr;
#else
  return false;
#endif
}

bool has_vbmi() {
#if PYFAST_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") != 0;
  }();
  return has;
#else
  return false;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "avx512" || name == "best") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  PYFAST_CHECK(false, "isa is '", name, "'; accepted: avx512, avx2, scalar, best");
}

}  // namespace cpu
}  // namespace pyfast

namespace {

std::string cpu_isa() { return pyfast::cpu::isa_name(pyfast::cpu::active_isa()); }

std::string cpu_isa_detected() { return pyfast::cpu::isa_name(pyfast::cpu::detected_isa()); }

bool cpu_has_vbmi() { return pyfast::cpu::has_vbmi(); }

std::string set_cpu_isa(std::string isa) {
  std::string previous = cpu_isa();
  pyfast::cpu::set_isa(pyfast::cpu::isa_from_name(isa));
  return previous;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // No tensor arguments: plain functions (catch-all kernels).
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isa_detected() -> str", &cpu_isa_detected);
  m.def("set_cpu_isa(str isa) -> str", &set_cpu_isa);
  // whether the avx512 level may run the AVX512_VBMI kernels (sparse24_int4_mm at M = 1)
  m.def("cpu_has_vbmi() -> bool", &cpu_has_vbmi);
}
