// The bfloat16 2:4 kernel for 8 <= M < 64 rows of x (csrc/cpu/sparse24_bf16pairs.cpp).
#pragma once

#include <cstdint>

namespace pyfast {
namespace cpu {

// acc[m, n] = sum over groups g of x[m, 4g + i0] * v0 + x[m, 4g + i1] * v1 (float32, no bias)
//   x    : bfloat16 bits [M, K] row-major, K % 4 == 0
//   vals : bfloat16 bits [N, K/2] row-major (2 kept values per group of 4)
//   meta : uint8 [N, K/4] row-major (bits 0-1 / 2-3: index of kept value 0 / 1)
//   acc  : float32 [M, N] row-major, written
// Needs the AVX-512 level and AVX512_BF16 (the caller checks active_isa() and
// has_bf16_dot()); any M >= 1 works, it is fastest from 8 rows on.
void sparse24_bf16_pairs(const uint16_t* x, const uint16_t* vals, const uint8_t* meta,
                         int64_t M, int64_t N, int64_t K, float* acc);

}  // namespace cpu
}  // namespace pyfast
