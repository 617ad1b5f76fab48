// pyfast's int8 GEMM for the CPU kernel of pyfast_C::int8_mm: the per-ISA
// micro-kernels (int8_gemm_avx512.cpp, int8_gemm_avx2.cpp, int8_gemm_scalar.cpp)
// behind one table, driven by the blocking and threading in int8_mm.cpp.
//
// Layout: a int8 [M, K] and b int8 [N, K] are both row-major with unit stride
// along K (b as nn.Linear stores its weight), so every output element is a dot
// product of two contiguous rows. The micro-kernels compute such dot products for
// a tile of up to mr_max rows of a times kNr rows of b, over one block of K; no
// operand is packed or copied (the weight is read in place).
//
// Exactness. The sums are int32 and exact: |acc| <= 128 * 128 * K < 2**31 for
// K <= 131071 (checked by the op). The AVX-512 kernel uses vpdpbusd, which
// multiplies an UNSIGNED byte by a signed one, so it feeds b ^ 0x80 = b + 128
// (0..255) as the unsigned operand and a as the signed one:
//     sum_k (b[n,k] + 128) * a[m,k] = acc[m,n] + 128 * sum_k a[m,k]
// and the epilogue subtracts comp[m] = 128 * sum_k a[m,k] (one value per row of a,
// computed once per call). vpdpbusd adds without saturation, so intermediate sums
// that wrap around 2**32 still give the exact acc once comp is subtracted
// (all arithmetic is modulo 2**32 and the true acc fits int32). Padding in a K
// tail is a = 0, which contributes 0 whatever b holds; any int8 value, -128
// included, is valid in both a and b.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace pyfast {
namespace cpu {
namespace int8_gemm {

constexpr int kNr = 4;     // rows of b (output columns) per micro-kernel tile
constexpr int kMaxMr = 8;  // the largest mr_max of any ISA

// c[i * ldc + j] (+)= sum_{k < kl} a[i * lda + k] * b[j * ldb + k]   for i < MR, j < nr
// MR is fixed per function (tile[MR]); nr in 1..kNr (the kernel reads b row nr-1
// again in place of the missing rows and stores only nr columns). `accumulate`
// false: store the sums; true: add them to c (modulo 2**32). With the AVX-512
// kernel the sums include + 128 * sum_k a[i, k] (see comp above).
// `prefetch` > 0 (SIMD kernels): while reading b row j at offset k, prefetch the byte
// b[j * ldb + k + prefetch] into L2 (decode: the same offset in the next tile's rows).
using TileFn = void (*)(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int nr,
                        int64_t kl, int32_t* c, int64_t ldc, bool accumulate, int64_t prefetch);

// comp[m] = 128 * sum_{k < K} a[m * lda + k] (modulo 2**32), for m in [0, M).
using RowCompFn = void (*)(const int8_t* a, int64_t lda, int64_t M, int64_t K, int32_t* comp);

// One row of output, n columns:
//   out[j] = cast(((float(acc[j] - comp) * a_scale) * b_scale[j]) + bias[j])
// in float32, one rounding per operation (no FMA), bias == nullptr: no add. The
// cast rounds to nearest even (float16 / bfloat16), as torch's .to().
template <typename OutT>
using EpilogueFn = void (*)(const int32_t* acc, int64_t n, int32_t comp, float a_scale,
                            const float* b_scale, const float* bias, OutT* out);

struct Kernels {
  const char* name;
  int mr_max;                  // tile[1..mr_max] are set
  TileFn tile[kMaxMr + 1];
  RowCompFn row_comp;          // nullptr: the sums are exact, comp = 0
  EpilogueFn<float> epilogue_f32;
  EpilogueFn<c10::Half> epilogue_f16;
  EpilogueFn<c10::BFloat16> epilogue_bf16;
};

// The kernel table's epilogue for output type OutT (float, c10::Half, c10::BFloat16).
template <typename OutT>
EpilogueFn<OutT> epilogue_for(const Kernels& kern) {
  if constexpr (std::is_same_v<OutT, float>) {
    return kern.epilogue_f32;
  } else if constexpr (std::is_same_v<OutT, c10::Half>) {
    return kern.epilogue_f16;
  } else {
    return kern.epilogue_bf16;
  }
}

const Kernels& kernels_scalar();
#if defined(__x86_64__) && defined(__GNUC__)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace int8_gemm
}  // namespace cpu
}  // namespace pyfast
