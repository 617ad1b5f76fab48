// Which x86 instruction set the CPU kernels use, chosen at run time.
//
// Kernels are compiled for several ISAs in the same binary with per-function
// target attributes (__attribute__((target("...")))), never with global -m
// flags, so the extension loads and runs on any x86-64 CPU; each call switches
// on active_isa(). Levels (Intel SDM vol. 1, ch. 14-15; AMD APM vol. 4):
//   kAvx512: AVX-512 F + BW + VL + VNNI (vpdpbusd: u8 x s8 dot into int32)
//   kAvx2  : AVX2 + FMA (vpmaddwd on sign-extended int16 for int8 products)
//   kScalar: plain C++ (any CPU, and the non-x86 fallback)
// Tests force each level in turn with set_isa() (torch.ops.pyfast_C.set_cpu_isa),
// which can lower the level but never raise it above what the CPU reports.
#pragma once

#include <string>

namespace pyfast {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detected_isa();              // the best level this CPU supports
Isa active_isa();                // min(detected, the level set by set_isa)
void set_isa(Isa isa);           // clamps to detected_isa()
const char* isa_name(Isa isa);   // "avx512", "avx2", "scalar"
// Whether the kAvx512 kernels may use vdpbf16ps (AVX512_BF16: pairs of bfloat16
// products added into float32; Intel SDM vol. 2, VDPBF16PS) for bfloat16 x: the
// CPU reports AVX512_BF16 and the environment variable PYFAST_NO_BF16DOT is unset
// (read on every call; the tests set it to reach the kernels of CPUs without it).
bool has_bf16_dot();
// Whether the kAvx512 kernels may use AVX512_VBMI's byte permutes (vpermt2b,
// vpmultishiftqb; Intel SDM vol. 2): the CPU reports it (Ice Lake, Zen 4 and later; not
// Skylake-X / Cascade Lake).
bool has_vbmi();
Isa isa_from_name(const std::string& name);  // TORCH_CHECKs the name

}  // namespace cpu
}  // namespace pyfast

#if defined(__x86_64__) && defined(__GNUC__)
#define PYFAST_X86 1
// Function attributes that let one function use the instructions of a level.
#define PYFAST_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define PYFAST_TARGET_AVX512_BF16                                                    \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma," \
                        "f16c")))
#define PYFAST_TARGET_AVX512_VBMI                                                    \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma," \
                        "f16c")))
#define PYFAST_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PYFAST_X86 0
#endif
