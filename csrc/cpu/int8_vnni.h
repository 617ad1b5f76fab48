// Micro-kernels of the CPU kernel of pyfast_C::w8a8_mm_vnni (int8_vnni.cpp): int8 x int8
// -> int32 on the weight in VNNI panel order (pyfast/layouts/int8_vnni.py):
//
//   w : int8 [ceil(N/48), ceil(K/4), 48, 4],  w[j, t, c, q] = W[48 j + c, 4 t + q]
//       (zero padded), so panel j is 192 * ceil(K/4) contiguous bytes.
//
// A tile is MR rows of a (int8 [MR, K], row stride lda, rows read up to K) times one
// panel: c[i * ldc + c] = sum_k a[i, k] * W[48 j + c, k] for all 48 columns c, stored
// (not accumulated), modulo 2**32. The AVX-512 kernel computes the sum plus
// 128 * sum_k a[i, k] (the comp of int8_gemm.h: it feeds w ^ 0x80 = w + 128 as
// vpdpbusd's unsigned operand); the scalar one the exact sum.
#pragma once

#include <cstdint>

namespace pyfast {
namespace cpu {
namespace int8_vnni {

constexpr int kPanelN = 48;  // output columns per panel (3 zmm of 16 int32 lanes)
constexpr int kGroupK = 4;   // bytes of K per int32 lane (one vpdpbusd dot product)
constexpr int kMaxMr = 8;    // rows of a per tile: 8 x 3 accumulators + 3 weight vectors

using TileFn = void (*)(const int8_t* a, int64_t lda, int64_t K, const int8_t* panel,
                        int32_t* c, int64_t ldc);

// tiles[mr] for mr = 1..kMaxMr.
const TileFn* tiles_scalar();
#if defined(__x86_64__) && defined(__GNUC__)
const TileFn* tiles_avx512();

// Decode (one row of x, AVX-512): c[48 q + col] for `panels` (1..kDecodePanels)
// consecutive panels starting at `panel` (panel_bytes apart), sums as the tiles'.
constexpr int kDecodePanels = 4;
void decode_avx512(int panels, const int8_t* x, int64_t K, const int8_t* panel,
                   int64_t panel_bytes, int32_t* c);
#endif

}  // namespace int8_vnni
}  // namespace cpu
}  // namespace pyfast
