// CPU kernel of pyfast_C::sparse24_mm: x @ W.T + bias with W stored 2:4-sparse.
//
//   x      : float32 / bfloat16 / float16 [M, K], any strides (made contiguous)
//   values : x.dtype [N, K/2]  the 2 kept weights of each group of 4 along K
//   meta   : uint8   [N, K/4]  bits 0-1 / 2-3: index in the group of kept value 0 / 1
//   bias   : [N] any float dtype, or None
//   out    : x.dtype [M, N],   out[m, n] = sum_g x[m, 4g+i0] * v0 + x[m, 4g+i1] * v1 + bias[n]
// Layout: pyfast/formats.py; oracle: pyfast/reference.py (sparse24_mm). Paths 2-4 read
// only the kept values and their 2-bit indices (half the multiplies of a dense GEMM and
// 0.56x / 0.625x of its float32 / 16-bit weight bytes). Only meta bits 0-3 are read
// (masked), so no meta byte can make any path read outside its group; a byte that breaks
// the format (idx0 >= idx1) gives an unspecified sum.
//
// Which path (a visible rule, per call; A = pyfast::cpu::active_isa()):
//   1. M >= 512 (bfloat16 x with AVX512_BF16: M >= 64): dense panels of W + at::mm
//      (panel_mm). A tuned dense GEMM at full FMA rate beats the 2:4 kernels here; the
//      panels are rebuilt from the 2:4 bytes in L2 (O(N K) against O(M N K)). Also x with
//      a NaN or inf at any M: paths 2-4 never multiply a pruned column, the reference
//      does (0 * inf = NaN; finite.h).
//   2. bfloat16 x, A = avx512 and the CPU has AVX512_BF16 (and the environment variable
//      PYFAST_NO_BF16DOT, which the tests use to reach path 3/4, is unset): from
//      kPairMinRows = 8 rows, sparse24_bf16_pairs (csrc/cpu/sparse24_bf16pairs.cpp: a pair
//      of weight rows per permute, 16 rows of x per index, x blocks in L1); below, the
//      kernel_bf16dot tiles on the raw bfloat16 bits.
//   3. A = avx512, M >= kXtMinRows (12) and N >= kXtMinN (256): kernel_xt_avx512 (x
//      transposed, no permutes).
//   4. otherwise the permute tiles of level A: kernel_avx512 / kernel_avx2 / tile_scalar.
//   Paths 3-4 widen x to float32 once (exact) and the values in registers as they are
//   loaded (float16: vcvtph2ps; bfloat16: a 16-bit shift, exact). Accumulation is
//   float32 everywhere; bias is added in float32; one rounding to x.dtype (path 1 for
//   bfloat16: the GEMM's bfloat16 output, then + bias rounded again, as F.linear rounds
//   its product).
//
// The gather of paths 2 and 4. A group's kept x elements are x[m, 4g + idx]; a SIMD
// register of kept values lines up with a register of gathered x built by one lane
// permute whose indices come from the meta bytes by arithmetic (shift by 2 bits per
// index, mask 3, add 4g):
//   AVX-512, float32 compute: 8 groups = 32 k = 16 kept values (one zmm). x[m, k:k+32] is
//     two zmm; vpermt2ps (_mm512_permutex2var_ps) picks the 16 kept x; one FMA.
//   AVX-512 + AVX512_BF16, bfloat16 x: 16 groups = 64 k = 32 kept bf16 (one zmm). x[m,
//     k:k+64] is two zmm of bf16; vpermt2w picks the 32 kept x; vdpbf16ps multiplies the
//     pairs (v0, v1) of each group and adds both products into one float32 lane (one
//     instruction per 32 MACs; products of two bf16 are exact in float32; the
//     instruction treats subnormal inputs and results as 0 -- Intel SDM, VDPBF16PS).
//   AVX2 + FMA: 4 groups = 16 k = 8 kept (one ymm): two vpermps (_mm256_permutevar8x32_ps)
//     of x[m, k:k+8] and x[m, k+8:k+16] and a blend; one FMA. Remaining groups in scalar.
//   scalar: one group at a time (any CPU), 8 partial sums.
// Register blocking: a tile of MT rows of x times NT rows of W keeps MT x NT vector
// accumulators; each loaded x chunk is reused for NT weight rows and each values vector
// and index vector for MT rows of x. Partial sums are reduced horizontally at the end
// of each K block and added into a float32 accumulator [M, N] (out itself for float32).
// Blocking: threads split N (at::parallel_for); each takes blocks of kNBlock weight
// rows x a K block whose x tile (MT rows) stays in L1, and sweeps all M tiles over it,
// so the values of the block are read from memory once and from L2 for later M tiles.
// On this Zen 4 the permutes issue at about one per 1-2 cycles, which caps these tiles
// near half a dense GEMM's multiply rate: fine for M = 1 (memory-bound), the reason for
// path 3 from M = 12 on (N >= 256) and path 1 for large M.
// Tried and not kept (bfloat16, M = 16): a permute-free "pair table", x laid out once per
// call as the 6 possible kept pairs of each group of 4 for 16 rows (3 bytes per x element),
// so that a group of a weight row is one broadcast (v0, v1) and one vdpbf16ps against a
// 64-byte table row chosen by the meta nibble. Its loop cost about 3 cycles per group
// (meta byte, lookup, table line from L2), and the table outgrows L2 at K = 11008 or needs
// K blocks that cut the weight rows into short runs; measured ad hoc (not a bench file) it
// was 1.18x dense bfloat16 on 4096 x 4096 but 0.98-1.00x on 4096 x 11008 and 11008 x 4096.
// The kernel_bf16dot tiles below took 3.3 cycles per vdpbf16ps at M = 16 (weight in L2;
// dense bfloat16 F.linear about 2.1 per 32 multiply-adds, so 1.27x at best): they reload
// or permute x for every weight row and compute an index per row for only 4 rows of x.
// sparse24_bf16_pairs replaced them from 8 rows on (its header says why it is faster).
//
// Threads: at::parallel_for runs in parallel only when this file is compiled with
// -fopenmp (ATen's OpenMP backend is header code); otherwise every path runs on one
// thread (at::mm in path 1 still uses its own threads).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "finite.h"
#include "isa.h"
#include "parallel.h"
#include "sparse24_bf16pairs.h"

#define PYFAST_S24_INLINE inline __attribute__((always_inline))
// Full unrolling of the loops over a tile's rows, requested explicitly: GCC then turns the
// accumulator arrays into registers (scalar replacement runs before its own unrolling;
// without the pragma a 4 x 4 tile kept a copy of every accumulator on the stack, stored
// every step).
#define PYFAST_S24_UNROLL _Pragma("GCC unroll 16")

namespace pyfast {
namespace cpu {
namespace {

// One call's operands, as raw row-major pointers.
struct Operands {
  const void* x;        // [M, K] float32 (or raw bfloat16 bits for the bf16-dot kernel)
  int64_t ldx;          // = K
  const void* values;   // [N, K/2] float32 / bfloat16 / float16
  int64_t ldv;          // = K/2
  const uint8_t* meta;  // [N, K/4]
  int64_t ldm;          // = K/4
  float* acc;           // [M, N] float32 partial sums
  int64_t ldo;          // = N
  int64_t v_bytes;      // bytes of one value (4 or 2)
};

// Prefetches into L2 (prefetcht1) groups [g0, g1) of weight rows [r0, r1): their values
// (v_bytes each, ldv per row) and meta. Always inlined, as are its callers: GCC found a
// separate function that only prefetches free of side effects and deleted its calls.
PYFAST_S24_INLINE void prefetch_rows(const char* values, int64_t v_bytes, int64_t ldv,
                                     const uint8_t* meta, int64_t ldm, int64_t r0, int64_t r1,
                                     int64_t g0, int64_t g1) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* v = values + (r * ldv + 2 * g0) * v_bytes;
    for (int64_t o = 0; o < 2 * (g1 - g0) * v_bytes; o += 64) __builtin_prefetch(v + o, 0, 2);
    const char* m = reinterpret_cast<const char*>(meta + r * ldm + g0);
    for (int64_t o = 0; o < g1 - g0; o += 64) __builtin_prefetch(m + o, 0, 2);
  }
}

// Store (first K block) or add a tile's finished sum.
PYFAST_S24_INLINE void put(float* o, float s, bool accumulate) { *o = accumulate ? *o + s : s; }

// --- scalar (any CPU) ----------------------------------------------------------------------

template <typename V>
void tile_scalar(const Operands& op, int64_t m0, int64_t mt, int64_t n0, int64_t nt, int64_t g0,
                 int64_t g1, bool accumulate) {
  for (int64_t m = m0; m < m0 + mt; ++m) {
    const float* xr = static_cast<const float*>(op.x) + m * op.ldx;
    for (int64_t n = n0; n < n0 + nt; ++n) {
      const V* v = static_cast<const V*>(op.values) + n * op.ldv;
      const uint8_t* meta = op.meta + n * op.ldm;
      // 8 partial sums (group g feeds sum g % 8), as the vector kernels' lanes: the
      // rounding error grows with K / 8, not K (PyTorch's own sums are blocked too).
      float s[8] = {};
      for (int64_t g = g0; g < g1; ++g) {
        const int b = meta[g];
        float& t = s[g & 7];
        t += xr[4 * g + (b & 3)] * static_cast<float>(v[2 * g]);
        t += xr[4 * g + ((b >> 2) & 3)] * static_cast<float>(v[2 * g + 1]);
      }
      const float total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      put(op.acc + m * op.ldo + n, total, accumulate);
    }
  }
}

#if PYFAST_X86

// --- AVX2 + FMA: 4 groups (16 k, 8 kept values) per step ---------------------------------

template <typename V>
PYFAST_TARGET_AVX2 PYFAST_S24_INLINE __m256 load8(const V* p) {
  if constexpr (std::is_same_v<V, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<V, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {  // bfloat16: the high 16 bits of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

PYFAST_TARGET_AVX2 PYFAST_S24_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MT, int NT, typename V>
PYFAST_TARGET_AVX2 void kernel_avx2(const Operands& op, int64_t m0, int64_t n0, int64_t g0,
                                    int64_t g1, bool accumulate) {
  const float* x = static_cast<const float*>(op.x) + m0 * op.ldx;
  const V* vals = static_cast<const V*>(op.values) + n0 * op.ldv;
  const uint8_t* meta = op.meta + n0 * op.ldm;
  // Lane 2j + i (group j of 4, kept value i): index bits at 8j + 2i of the 4 meta bytes;
  // groups 0-1 index x[k:k+8], groups 2-3 x[k+8:k+16] (each lane index modulo 8).
  const __m256i shift = _mm256_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[MT][NT];
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t g = g0;
  for (; g + 4 <= g1; g += 4) {
    __m256 xl[MT], xh[MT];
    PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
      xl[m] = _mm256_loadu_ps(x + m * op.ldx + 4 * g);
      xh[m] = _mm256_loadu_ps(x + m * op.ldx + 4 * g + 8);
    }
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) {
      uint32_t mb;
      std::memcpy(&mb, meta + n * op.ldm + g, sizeof mb);
      const __m256i idx = _mm256_or_si256(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(mb)), shift),
                           three),
          base);
      const __m256 v = load8(vals + n * op.ldv + 2 * g);
      PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
        const __m256 sel = _mm256_blend_ps(_mm256_permutevar8x32_ps(xl[m], idx),
                                           _mm256_permutevar8x32_ps(xh[m], idx), 0xF0);
        acc[m][n] = _mm256_fmadd_ps(sel, v, acc[m][n]);
      }
    }
  }
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
    const float* xr = x + m * op.ldx;
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) {
      float s = hsum256(acc[m][n]);
      const V* v = vals + n * op.ldv;
      const uint8_t* mr = meta + n * op.ldm;
      for (int64_t t = g; t < g1; ++t) {  // the last K % 16 / 4 groups
        const int b = mr[t];
        s += xr[4 * t + (b & 3)] * static_cast<float>(v[2 * t]);
        s += xr[4 * t + ((b >> 2) & 3)] * static_cast<float>(v[2 * t + 1]);
      }
      put(op.acc + (m0 + m) * op.ldo + n0 + n, s, accumulate);
    }
  }
}

// --- AVX-512, float32 compute: 8 groups (32 k, 16 kept values) per step --------------------

template <typename V>
PYFAST_TARGET_AVX512 PYFAST_S24_INLINE __m512 load16(const V* p, __mmask16 mask) {
  if constexpr (std::is_same_v<V, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<V, at::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  } else {  // bfloat16
    const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// 8 meta bytes (groups 0..7 of a step) -> 16 lane indices into x[k : k+32]:
// lane 2j + i = 4j + ((byte j >> 2i) & 3). Bytes 0-3 are dword 0, bytes 4-7 dword 1.
PYFAST_TARGET_AVX512 PYFAST_S24_INLINE __m512i index16(__m128i bytes) {
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shift =
      _mm512_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26, 0, 2, 8, 10, 16, 18, 24, 26);
  const __m512i base =
      _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i d =
      _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(bytes)), shift);
  return _mm512_ternarylogic_epi32(d, _mm512_set1_epi32(3), base, 0xEA);  // (d & 3) | base
}

// An MT x NT tile over groups [g0, g1), 8 groups per step. The last step (r < 8 groups)
// uses masked loads: masked-off x and values are 0, and masked-off meta bytes are 0,
// which point into the zeroed x lanes. One loop (no helper taking the accumulators by
// reference): that keeps GCC from mirroring them on the stack.
template <int MT, int NT, typename V>
PYFAST_TARGET_AVX512 void kernel_avx512(const Operands& op, int64_t m0, int64_t n0, int64_t g0,
                                        int64_t g1, bool accumulate) {
  const float* x = static_cast<const float*>(op.x) + m0 * op.ldx;
  const V* vals = static_cast<const V*>(op.values) + n0 * op.ldv;
  const uint8_t* meta = op.meta + n0 * op.ldm;
  __m512 acc[MT][NT];
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; g += 8) {
    __mmask16 xlo = 0xFFFF, xhi = 0xFFFF, vm = 0xFFFF, mm = 0xFF;
    if (g + 8 > g1) {
      const int64_t r = g1 - g;
      const uint32_t kbits = static_cast<uint32_t>((uint64_t{1} << (4 * r)) - 1);
      xlo = static_cast<__mmask16>(kbits & 0xFFFF);
      xhi = static_cast<__mmask16>(kbits >> 16);
      vm = static_cast<__mmask16>((1u << (2 * r)) - 1);
      mm = static_cast<__mmask16>((1u << r) - 1);
    }
    __m512 xl[MT], xh[MT];
    PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
      const float* p = x + m * op.ldx + 4 * g;
      xl[m] = _mm512_maskz_loadu_ps(xlo, p);
      xh[m] = _mm512_maskz_loadu_ps(xhi, p + 16);
    }
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) {
      const __m512i idx = index16(_mm_maskz_loadu_epi8(mm, meta + n * op.ldm + g));
      const __m512 v = load16(vals + n * op.ldv + 2 * g, vm);
      PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
        acc[m][n] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xl[m], idx, xh[m]), v, acc[m][n]);
    }
  }
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n)
      put(op.acc + (m0 + m) * op.ldo + n0 + n, _mm512_reduce_add_ps(acc[m][n]), accumulate);
}

// --- AVX-512 + AVX512_BF16, bfloat16 x: 16 groups (64 k, 32 kept values) per step ----------

// Constants of index32: lane L = 2j + i (group j of 16, kept value i) reads 16-bit word
// j / 2 of the 16 meta bytes, shifted by 8 (j odd: high byte) + 2i, masked to 2 bits,
// plus 4j.
struct Bf16IndexConstants {
  alignas(64) uint16_t word[32];
  alignas(64) uint16_t shift[32];
  alignas(64) uint16_t base[32];
  Bf16IndexConstants() {
    for (int L = 0; L < 32; ++L) {
      word[L] = static_cast<uint16_t>(L >> 2);
      shift[L] = static_cast<uint16_t>(8 * ((L >> 1) & 1) + 2 * (L & 1));
      base[L] = static_cast<uint16_t>(4 * (L >> 1));
    }
  }
};
const Bf16IndexConstants kBf16Index;

// An MT x NT tile over groups [g0, g1), 16 groups per step; the last step masked as in
// kernel_avx512.
template <int MT, int NT>
PYFAST_TARGET_AVX512_BF16 void kernel_bf16dot(const Operands& op, int64_t m0, int64_t n0,
                                              int64_t g0, int64_t g1, bool accumulate) {
  const uint16_t* x = static_cast<const uint16_t*>(op.x) + m0 * op.ldx;
  const uint16_t* vals = static_cast<const uint16_t*>(op.values) + n0 * op.ldv;
  const uint8_t* meta = op.meta + n0 * op.ldm;
  const __m512i word = _mm512_load_si512(kBf16Index.word);
  const __m512i shift = _mm512_load_si512(kBf16Index.shift);
  const __m512i base = _mm512_load_si512(kBf16Index.base);
  __m512 acc[MT][NT];
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; g += 16) {
    __mmask32 xlo = 0xFFFFFFFFu, xhi = 0xFFFFFFFFu, vm = 0xFFFFFFFFu;
    __mmask16 mm = 0xFFFF;
    if (g + 16 > g1) {
      const int64_t r = g1 - g;
      const uint64_t kbits = (uint64_t{1} << (4 * r)) - 1;  // r < 16: 4r < 64 lanes
      xlo = static_cast<__mmask32>(kbits & 0xFFFFFFFFu);
      xhi = static_cast<__mmask32>(kbits >> 32);
      vm = static_cast<__mmask32>((uint64_t{1} << (2 * r)) - 1);
      mm = static_cast<__mmask16>((1u << r) - 1);
    }
    __m512i xl[MT], xh[MT];
    PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
      const uint16_t* p = x + m * op.ldx + 4 * g;
      xl[m] = _mm512_maskz_loadu_epi16(xlo, p);
      xh[m] = _mm512_maskz_loadu_epi16(xhi, p + 32);
    }
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n) {
      const __m128i bytes = _mm_maskz_loadu_epi8(mm, meta + n * op.ldm + g);
      const __m512i w = _mm512_srlv_epi16(
          _mm512_permutexvar_epi16(word, _mm512_castsi128_si512(bytes)), shift);
      const __m512i idx = _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(3), base, 0xEA);
      const __m512i v = _mm512_maskz_loadu_epi16(vm, vals + n * op.ldv + 2 * g);
      PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m) {
        const __m512i sel = _mm512_permutex2var_epi16(xl[m], idx, xh[m]);
        acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)sel, (__m512bh)v);
      }
    }
  }
  PYFAST_S24_UNROLL for (int m = 0; m < MT; ++m)
    PYFAST_S24_UNROLL for (int n = 0; n < NT; ++n)
      put(op.acc + (m0 + m) * op.ldo + n0 + n, _mm512_reduce_add_ps(acc[m][n]), accumulate);
}

// --- AVX-512, many rows of x: x transposed, one broadcast weight per kept value ---------------
//
// With many rows of x (path 3: from 12) the permutes above become the bottleneck
// (vpermt2ps / vpermt2w issue at most one every one to two cycles, so a 2:4 tile ran at
// about half the FMA rate of a dense GEMM). This kernel needs none: x is packed transposed in blocks of MB = 16 * T rows,
// xt[k][j] = x[m0 + j, k], so the kept x of a weight (n, g, i) for MB rows of x is one
// contiguous row xt[4g + i] at an address computed from the meta byte. Per kept value:
// one broadcast of the weight, T FMAs with T loads of that row (L1/L2-resident block).
// The accumulators hold MB consecutive outputs of one weight row (out transposed), so no
// horizontal sums; they live in acc_t [rows of the W block][Mp] between K blocks.
// One weight row (vals, meta: that row) against one block of MB rows of x, groups
// [g0, g1); U partial sums (groups g, g+1, ... take turns) keep U * T FMA chains in flight.
// One row at a time keeps the scalar registers for the row's pointers few (a tile of
// rows made GCC spill its row pointers); the xt tile is reused from L1 across rows.
// With T = 1 (MB = 16) the 16 kept values of U = 8 groups are one load and each is
// broadcast by vpermps, which issues on a shuffle pipe beside the FMAs, instead of 16
// broadcast loads: on Zen 4 an FMA with a 64-byte load and a broadcast load took 2 cycles
// and one with the 64-byte load alone 1.25 (measured ad hoc in isolation, not a bench
// result file). With T >= 2 each broadcast already serves T FMAs. float16 / bfloat16
// values are widened in registers (load16: vcvtph2ps / a 16-bit shift, exact), 2U per
// load, then broadcast the same way.
template <int T, int U, typename V>
PYFAST_TARGET_AVX512 void kernel_xt_avx512(const float* xt, const V* vals,
                                           const uint8_t* meta, int64_t g0, int64_t g1,
                                           float* acc_t, bool accumulate) {
  constexpr int64_t MB = 16 * T;
  __m512 a[U][T];
  PYFAST_S24_UNROLL for (int u = 0; u < U; ++u)
    PYFAST_S24_UNROLL for (int t = 0; t < T; ++t) a[u][t] = _mm512_setzero_ps();
  int64_t g = g0;
  constexpr bool kPermute = !std::is_same_v<V, float> || T == 1;  // 2U kept values, one load
  static_assert(2 * U <= 16, "one zmm holds the 2U kept values of a step");
  constexpr __mmask16 kStep = static_cast<__mmask16>((1u << (2 * U)) - 1);
  for (; g + U <= g1; g += U) {
    const __m512 vv = kPermute ? load16<V>(vals + 2 * g, kStep) : _mm512_setzero_ps();
    PYFAST_S24_UNROLL for (int u = 0; u < U; ++u) {
      const int b = meta[g + u];
      const float* xg = xt + 4 * (g + u) * MB;
      const float* r0 = xg + (b & 3) * MB;
      const float* r1 = xg + ((b >> 2) & 3) * MB;
      const __m512 v0 = kPermute ? _mm512_permutexvar_ps(_mm512_set1_epi32(2 * u), vv)
                                 : _mm512_set1_ps(static_cast<float>(vals[2 * (g + u)]));
      const __m512 v1 = kPermute ? _mm512_permutexvar_ps(_mm512_set1_epi32(2 * u + 1), vv)
                                 : _mm512_set1_ps(static_cast<float>(vals[2 * (g + u) + 1]));
      PYFAST_S24_UNROLL for (int t = 0; t < T; ++t)
        a[u][t] = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + 16 * t), v0, a[u][t]);
      PYFAST_S24_UNROLL for (int t = 0; t < T; ++t)
        a[u][t] = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + 16 * t), v1, a[u][t]);
    }
  }
  for (; g < g1; ++g) {
    const int b = meta[g];
    const float* xg = xt + 4 * g * MB;
    const __m512 v0 = _mm512_set1_ps(static_cast<float>(vals[2 * g]));
    const __m512 v1 = _mm512_set1_ps(static_cast<float>(vals[2 * g + 1]));
    PYFAST_S24_UNROLL for (int t = 0; t < T; ++t) {
      a[0][t] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + (b & 3) * MB + 16 * t), v0, a[0][t]);
      a[0][t] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + ((b >> 2) & 3) * MB + 16 * t), v1, a[0][t]);
    }
  }
  PYFAST_S24_UNROLL for (int t = 0; t < T; ++t) {
    __m512 s = a[0][t];
    PYFAST_S24_UNROLL for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, a[u][t]);
    if (accumulate) s = _mm512_add_ps(s, _mm512_loadu_ps(acc_t + 16 * t));
    _mm512_storeu_ps(acc_t + 16 * t, s);
  }
}

#endif  // PYFAST_X86

// --- tiles and the blocked driver --------------------------------------------------------------

// A kernel for a full MT x NT tile; the driver calls it with the tile's corner.
using KernelFn = void (*)(const Operands&, int64_t m0, int64_t n0, int64_t g0, int64_t g1,
                          bool accumulate);

// The kernels of one path: full[mt - 1] for an mt x nt tile, narrow[mt - 1] for mt x 1
// (the last < nt rows of W).
struct Path {
  int64_t mt;          // rows of x per tile (1..4)
  int64_t nt;          // rows of W per tile
  int64_t step;        // groups per vector step (K block is a multiple of it)
  int64_t x_bytes;     // bytes of one x element as the kernel reads it
  KernelFn full[4];
  KernelFn narrow[4];
};

// Tiles of up to MTMAX rows of x by NT rows of W, and of 1..MTMAX rows by 1 (the last
// rows of a block of W).
template <template <int, int> class K, int MTMAX, int NT>
Path make_path(int64_t step, int64_t x_bytes) {
  Path p{MTMAX, NT, step, x_bytes, {}, {}};
  p.full[0] = &K<1, NT>::run;
  p.narrow[0] = &K<1, 1>::run;
  if constexpr (MTMAX >= 2) {
    p.full[1] = &K<2, NT>::run;
    p.narrow[1] = &K<2, 1>::run;
  }
  if constexpr (MTMAX >= 3) {
    p.full[2] = &K<3, NT>::run;
    p.narrow[2] = &K<3, 1>::run;
  }
  if constexpr (MTMAX >= 4) {
    p.full[3] = &K<4, NT>::run;
    p.narrow[3] = &K<4, 1>::run;
  }
  return p;
}

template <typename V>
struct ScalarK {
  template <int MT, int NT>
  struct K {
    static void run(const Operands& op, int64_t m0, int64_t n0, int64_t g0, int64_t g1,
                    bool accumulate) {
      tile_scalar<V>(op, m0, MT, n0, NT, g0, g1, accumulate);
    }
  };
};

#if PYFAST_X86
template <typename V>
struct Avx2K {
  template <int MT, int NT>
  struct K {
    // AVX2 has 16 ymm: at most 2 x 4 accumulators with the x chunks and indices.
    static void run(const Operands& op, int64_t m0, int64_t n0, int64_t g0, int64_t g1,
                    bool accumulate) {
      kernel_avx2<MT, NT, V>(op, m0, n0, g0, g1, accumulate);
    }
  };
};

template <typename V>
struct Avx512K {
  template <int MT, int NT>
  struct K {
    static void run(const Operands& op, int64_t m0, int64_t n0, int64_t g0, int64_t g1,
                    bool accumulate) {
      kernel_avx512<MT, NT, V>(op, m0, n0, g0, g1, accumulate);
    }
  };
};

template <int MT, int NT>
struct Bf16DotK {
  static void run(const Operands& op, int64_t m0, int64_t n0, int64_t g0, int64_t g1,
                  bool accumulate) {
    kernel_bf16dot<MT, NT>(op, m0, n0, g0, g1, accumulate);
  }
};
#endif

constexpr int kTileW = 3;  // W rows per tile for M > 1: 4 x 3 accumulators + 8 x chunks
constexpr int64_t kNBlock = 64;             // weight rows per block (their K block stays in L2)
constexpr int64_t kXTileBytes = 16 * 1024;  // x rows of one tile x K block: half of L1d
// While the first x tile of a K block meets a tile of W rows, the next W tile's segment
// (its K block) is prefetched into L2; the later x tiles find it there. Measured ad hoc
// (Zen 4, 2 threads, K = N = 4096, weights larger than the caches; not a bench result
// file): M = 4 1.9 -> 1.6 ms (float32) and 1.3 -> 0.9 ms (bfloat16), M = 1 unchanged
// within noise, bfloat16 M = 16 4.9 -> 4.1 ms on one thread.
constexpr int64_t kAheadTiles = 1;

// acc[M, N] = x @ W.T over all groups, tile by tile (see the header for the loop order).
void run_blocked(const Path& p, const Operands& op, int64_t M, int64_t N, int64_t G) {
  const int64_t mt = std::min<int64_t>(p.mt, M);
  // K block: the x tile (mt rows) fills about kXTileBytes; whole multiples of a step.
  int64_t gb = kXTileBytes / (mt * 4 * p.x_bytes);
  gb = std::max<int64_t>(p.step, gb / p.step * p.step);
  const int64_t units = (N + p.nt - 1) / p.nt;
  // About 64k multiply-adds per task at least, so tiny calls stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * G * 2 * p.nt));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t n_begin = u0 * p.nt, n_end = std::min(N, u1 * p.nt);
    for (int64_t nb0 = n_begin; nb0 < n_end; nb0 += kNBlock) {
      const int64_t nb1 = std::min(n_end, nb0 + kNBlock);
      for (int64_t g0 = 0; g0 < G; g0 += gb) {
        const int64_t g1 = std::min(G, g0 + gb);
        for (int64_t m0 = 0; m0 < M; m0 += mt) {
          const int64_t rows = std::min(mt, M - m0);
          int64_t n = nb0;
          for (; n + p.nt <= nb1; n += p.nt) {
            if (m0 == 0) {
              const int64_t r0 = std::min(nb1, n + kAheadTiles * p.nt);
              prefetch_rows(static_cast<const char*>(op.values), op.v_bytes, op.ldv, op.meta,
                            op.ldm, r0, std::min(nb1, r0 + p.nt), g0, g1);
            }
            p.full[rows - 1](op, m0, n, g0, g1, g0 > 0);
          }
          for (; n < nb1; ++n) p.narrow[rows - 1](op, m0, n, g0, g1, g0 > 0);
        }
      }
    }
  });
}

// The transposed-x path (kernel_xt_avx512): threads split N in blocks of kXtNBlock rows;
// per block, K blocks of gb groups (the xt tile of one M block, 4 * gb * MB floats =
// kXtTileBytes, stays in the 32 KiB L1) sweep all M blocks, then the block's acc_t is
// written out transposed. The weight is then read as short row segments (gb groups of
// one row: 9 * gb bytes with float32 values, 5 * gb with 16-bit ones), one row after
// another; the hardware prefetcher does not follow that pattern, so the segment kXtAhead
// rows later in the sweep is prefetched into L2 while a row is computed. Measured ad hoc
// (Zen 4, M = 16, K = N = 4096, one thread; not a bench result file): a 64 KiB tile in L2
// without the prefetch ran at about 10 cycles per group of a weight row, a 16 KiB tile
// without it at 15, with it at 5 (and 5 with the weight in L2).
constexpr int64_t kXtNBlock = 32;
constexpr int64_t kXtTileBytes = 16 * 1024;
constexpr int64_t kXtAhead = 2;
// Path 3 from M = kXtMinRows and N = kXtMinN on. The xt kernel costs about the same for
// any M up to 16 (one block of rows), so the tiles, whose time grows with M, win below
// about 10-14 rows, and at every M for few weight rows. Measured ad hoc (float32 x, 2
// threads, median of 200 calls, this Zen 4; not a bench result file), time in us as
// tiles / xt: K x N = 4096 x 4096: M 8 2154-2274 / 2685, M 16 3958-4139 / 2687-2724;
// 768 x 3072: M 8 264 / 335-347, M 16 510 / 339; 11008 x 4096: M 8 6702-6916 /
// 7934-8116; 4096 x 512: M 10 310 / 342-356, M 12 352 / 343-358, M 16 462-479 / 350;
// 4096 x 256: M 12 181 / 202-206, M 16 238 / 208-213; 4096 x 128: M 16 128 / 137-141, M
// 64 486-489 / 502-513; 4096 x 64: M 64 252-264 / 388-637. (The rule was M >= 8 alone.)
constexpr int64_t kXtMinRows = 12;
constexpr int64_t kXtMinN = 256;
constexpr int64_t kPairMinRows = 8;  // bfloat16 x: from this M on, sparse24_bf16_pairs

// Prefetches the segment of weight row n + kXtAhead in the sweep order of XtPath::run:
// the same groups [g0, g0 + gb) while rows of the N block [nb0, nb1) remain, then the
// block's first rows at the next K block (past the weight's end: nothing).
template <typename V>
PYFAST_S24_INLINE void prefetch_xt_segment(const V* vals, const uint8_t* meta, int64_t K,
                                           int64_t n, int64_t nb0, int64_t nb1, int64_t g0,
                                           int64_t gb) {
  const int64_t G = K / 4;
  int64_t r = n + kXtAhead, g = g0;
  if (r >= nb1) r = nb0 + (r - nb1), g = g0 + gb;
  if (g >= G || r >= nb1) return;
  prefetch_rows(reinterpret_cast<const char*>(vals), sizeof(V), K / 2, meta, G, r, r + 1, g,
                std::min(G, g + gb));
}

template <int T>
struct XtPath {
  static constexpr int U = 8 / T;  // 8 FMA chains
  template <typename V, typename Out>
  static void run(const at::Tensor& x /* float32 [M, K] */, const V* vals,
                  const uint8_t* meta, const float* bias, int64_t M, int64_t N, int64_t K,
                  Out* out) {
    constexpr int64_t MB = 16 * T;
    const int64_t G = K / 4, blocks = (M + MB - 1) / MB, Mp = blocks * MB;
    // xt[b][k][j] = x[b * MB + j, k] (0 past M)
    at::Tensor xt_t = at::empty({blocks, K, MB}, x.options());
    const float* xp = x.const_data_ptr<float>();
    float* xt = xt_t.mutable_data_ptr<float>();
    // Tasks of at least ~64k multiply-adds (tiny calls stay on one thread).
    at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / (MB * K)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* dst = xt + b * K * MB;
        const int64_t rows = std::min(MB, M - b * MB);
        for (int64_t j = 0; j < MB; ++j) {
          const float* src = xp + (b * MB + j) * K;
          if (j < rows) {
            for (int64_t k = 0; k < K; ++k) dst[k * MB + j] = src[k];
          } else {
            for (int64_t k = 0; k < K; ++k) dst[k * MB + j] = 0.0f;
          }
        }
      }
    });
    const int64_t gb = std::max<int64_t>(16, kXtTileBytes / (16 * MB));
    const int64_t nblocks = (N + kXtNBlock - 1) / kXtNBlock;
    const int64_t grain = std::max<int64_t>(1, 65536 / (kXtNBlock * Mp * 2 * G));
    at::parallel_for(0, nblocks, grain, [&](int64_t q0, int64_t q1) {
      std::vector<float> acc_t(kXtNBlock * Mp);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t nb0 = q * kXtNBlock, nb1 = std::min(N, nb0 + kXtNBlock);
        for (int64_t g0 = 0; g0 < G; g0 += gb) {
          const int64_t g1 = std::min(G, g0 + gb);
          for (int64_t b = 0; b < blocks; ++b) {
            const float* xb = xt + b * K * MB;
            for (int64_t n = nb0; n < nb1; ++n) {
              prefetch_xt_segment(vals, meta, K, n, nb0, nb1, g0, gb);
              kernel_xt_avx512<T, U, V>(xb, vals + n * (K / 2), meta + n * G, g0, g1,
                                     acc_t.data() + (n - nb0) * Mp + b * MB, g0 > 0);
            }
          }
        }
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = nb0; n < nb1; ++n) {
            const float s = acc_t[(n - nb0) * Mp + m] + (bias != nullptr ? bias[n] : 0.0f);
            out[m * N + n] = static_cast<Out>(s);
          }
        }
      }
    });
  }
};

// --- large M: dense panels of W and at::mm ----------------------------------------------------
//
// From kExpandMinRows rows of x on, a dense GEMM (MKL / oneDNN, behind at::mm) at full FMA
// rate beats every 2:4 kernel above (at best half its rate per multiply here, see the
// timing table in the tests' docstring), so each thread rebuilds panels of W rows densely
// (a panel fits in L2) and multiplies them with at::mm into out's columns. The rebuild is
// O(N * K) against O(M * N * K) for the product; the weight bytes read stay 2:4's.
// bfloat16 x gets bfloat16 panels (the GEMM rounds its output to bfloat16 once, as
// F.linear; bias is then added and rounded again); float16 x runs in float32.

// dense[r, :] = the 2:4 row n0 + r, as T (zeros elsewhere).
template <typename V, typename T>
void expand_rows(const V* vals, const uint8_t* meta, int64_t K, int64_t n0, int64_t n1,
                 T* dense) {
  const int64_t G = K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const V* v = vals + n * (K / 2);
    const uint8_t* mr = meta + n * G;
    T* d = dense + (n - n0) * K;
    std::fill(d, d + K, T(0.0f));
    for (int64_t g = 0; g < G; ++g) {
      const int b = mr[g];
      if constexpr (std::is_same_v<V, T>) {
        d[4 * g + (b & 3)] = v[2 * g];
        d[4 * g + ((b >> 2) & 3)] = v[2 * g + 1];
      } else {
        d[4 * g + (b & 3)] = static_cast<T>(static_cast<float>(v[2 * g]));
        d[4 * g + ((b >> 2) & 3)] = static_cast<T>(static_cast<float>(v[2 * g + 1]));
      }
    }
  }
}

// out_mm[:, n] = x_mm @ W[n, :] for all n; x_mm and out_mm float32 (or both bfloat16).
template <typename V, typename T>
void panel_mm(const at::Tensor& x_mm, const V* vals, const uint8_t* meta, int64_t N, int64_t K,
              at::Tensor& out_mm) {
  const int64_t rows = balanced_panel_rows(
      N, std::max<int64_t>(64, (4 << 20) / (K * static_cast<int64_t>(sizeof(T)))));
  const int64_t panels = (N + rows - 1) / rows;
  const int64_t grain = std::max<int64_t>(1, 65536 / (rows * K * x_mm.size(0)));
  // ATen ops in the body: the workers need the caller's inference mode (parallel.h)
  parallel_for_with_state(0, panels, grain, [&](int64_t p0, int64_t p1) {
    at::Tensor panel = at::empty({rows, K}, x_mm.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * rows, n1 = std::min(N, n0 + rows);
      expand_rows<V, T>(vals, meta, K, n0, n1, panel.mutable_data_ptr<T>());
      at::Tensor dst = out_mm.narrow(1, n0, n1 - n0);
      at::mm_out(dst, x_mm, panel.narrow(0, 0, n1 - n0).t());
    }
  });
}

// From this many rows of x on, the dense-panel path (see panel_mm): measured crossovers on
// a 2-core AVX-512 Zen 4 (timing table in the report): bfloat16 x from 64 rows (oneDNN's
// bfloat16 GEMM runs vdpbf16ps at full rate), float32 / float16 x from 512 rows.
int64_t expand_min_rows(at::ScalarType x_dtype, Isa isa) {
  if (x_dtype == at::kBFloat16 && isa == Isa::kAvx512 && has_bf16_dot()) return 64;
  return 512;
}

// --- checks and the op ------------------------------------------------------------------------


// out[m, n] = acc[m, n] + bias[n], rounded once to T (acc may alias out when T is float).
template <typename A, typename T>
void finish(const A* acc, const float* bias, int64_t M, int64_t N, T* out) {
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)),
                   [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const A* a = acc + m * N;
      T* o = out + m * N;
      if (bias != nullptr) {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(a[n]) + bias[n]);
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<T>(static_cast<float>(a[n]));
      }
    }
  });
}

template <typename V>
Path float32_path(Isa isa, int64_t M) {
#if PYFAST_X86
  if (isa == Isa::kAvx512) {
    return M == 1 ? make_path<Avx512K<V>::template K, 1, 8>(8, 4)
                  : make_path<Avx512K<V>::template K, 4, kTileW>(8, 4);
  }
  if (isa == Isa::kAvx2) {
    return M == 1 ? make_path<Avx2K<V>::template K, 1, 4>(4, 4)
                  : make_path<Avx2K<V>::template K, 2, 3>(4, 4);
  }
#endif
  return make_path<ScalarK<V>::template K, 4, 4>(1, 4);
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x_in, const at::Tensor& values_in,
                           const at::Tensor& meta_in, const std::optional<at::Tensor>& bias) {
  check_device(x_in, "x", at::kCPU);
  check_dtype(x_in, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_dim(x_in, "x", 2);
  const int64_t M = x_in.size(0), K = x_in.size(1);
  PYFAST_CHECK(K % 4 == 0, "x.size(1) = K is ", K, "; 2:4 sparsity needs K a multiple of 4");
  check_device(values_in, "values", at::kCPU);
  PYFAST_CHECK(values_in.scalar_type() == x_in.scalar_type(), "values has dtype ",
              values_in.scalar_type(), " but x has ", x_in.scalar_type(), "; they must match");
  check_dim(values_in, "values", 2);
  const int64_t N = values_in.size(0), G = K / 4;
  check_size(values_in, "values", 1, K / 2, "x.size(1) / 2 = K/2");
  check_device(meta_in, "meta", at::kCPU);
  check_dtype(meta_in, "meta", {at::kByte});
  check_dim(meta_in, "meta", 2);
  check_size(meta_in, "meta", 0, N, "values.size(0) = N");
  check_size(meta_in, "meta", 1, G, "x.size(1) / 4 = K/4");
  at::Tensor b;
  if (bias.has_value()) {
    check_device(*bias, "bias", at::kCPU);
    PYFAST_CHECK(at::isFloatingType(bias->scalar_type()), "bias has dtype ",
                bias->scalar_type(), "; accepted: a floating dtype");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, N, "values.size(0) = N");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;

  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  const at::ScalarType dt = x_in.scalar_type();
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  const uint8_t* mp = meta.const_data_ptr<uint8_t>();
  const Isa isa = active_isa();
  // float32 partial sums: out itself for float32 x, else a scratch tensor.
  at::Tensor acc = dt == at::kFloat ? out : at::empty({M, N}, x_in.options().dtype(at::kFloat));
  auto finish_acc = [&] {
    if (dt == at::kFloat && bp == nullptr) return;  // the sums are the output
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pyfast_C::sparse24_mm", [&] {
      finish<float, scalar_t>(acc.const_data_ptr<float>(), bp, M, N,
                              out.mutable_data_ptr<scalar_t>());
    });
  };
  if (K == 0) {  // empty sum
    acc.zero_();
    finish_acc();
    return out;
  }

  // 1. Many rows, or x with a NaN / inf (finite.h: the tiles below skip pruned columns):
  //    dense panels + at::mm (any ISA level; at::mm picks its own instructions).
  if (M >= expand_min_rows(dt, isa) || !all_finite(x_in.contiguous())) {
    if (dt == at::kBFloat16) {
      panel_mm<at::BFloat16, at::BFloat16>(x_in.contiguous(),
                                           values.const_data_ptr<at::BFloat16>(), mp, N, K, out);
      if (bp != nullptr) {
        at::BFloat16* o = out.mutable_data_ptr<at::BFloat16>();
        finish<at::BFloat16, at::BFloat16>(o, bp, M, N, o);
      }
      return out;
    }
    const at::Tensor x = x_in.to(at::kFloat).contiguous();
    if (dt == at::kFloat) {
      panel_mm<float, float>(x, values.const_data_ptr<float>(), mp, N, K, acc);
    } else {
      panel_mm<at::Half, float>(x, values.const_data_ptr<at::Half>(), mp, N, K, acc);
    }
    finish_acc();
    return out;
  }

  Operands op{nullptr, K, values.const_data_ptr(), K / 2, mp, G, acc.mutable_data_ptr<float>(), N,
              static_cast<int64_t>(values.element_size())};
#if PYFAST_X86
  // 2. bfloat16 x with AVX512_BF16: the vdpbf16ps tiles on the raw bfloat16 bits.
  if (dt == at::kBFloat16 && isa == Isa::kAvx512 && has_bf16_dot()) {
    const at::Tensor x = x_in.contiguous();
    if (M >= kPairMinRows) {
      sparse24_bf16_pairs(static_cast<const uint16_t*>(x.const_data_ptr()),
                          static_cast<const uint16_t*>(values.const_data_ptr()), mp, M, N, K,
                          acc.mutable_data_ptr<float>());
      finish_acc();
      return out;
    }
    op.x = x.const_data_ptr();
    run_blocked(M == 1 ? make_path<Bf16DotK, 1, 8>(16, 2) : make_path<Bf16DotK, 4, kTileW>(16, 2),
                op, M, N, G);
    finish_acc();
    return out;
  }
#endif
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // exact widening
#if PYFAST_X86
  // 3. AVX-512, 12+ rows and 256+ weight rows: transposed x, no gather permutes (values
  //    widened in registers; widening them all first, values.to(float32), took 3x the
  //    kernel's time at M = 16).
  if (isa == Isa::kAvx512 && M >= kXtMinRows && N >= kXtMinN) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pyfast_C::sparse24_mm", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const scalar_t* v = values.const_data_ptr<scalar_t>();
      if (M >= 64) {
        XtPath<4>::run(x, v, mp, bp, M, N, K, o);
      } else if (M >= 32) {
        XtPath<2>::run(x, v, mp, bp, M, N, K, o);
      } else {
        XtPath<1>::run(x, v, mp, bp, M, N, K, o);
      }
    });
    return out;
  }
#endif
  // 4. The permute tiles of the active ISA level (float32 compute, values widened per load).
  op.x = x.const_data_ptr();
  Path p;
  switch (dt) {
    case at::kFloat: p = float32_path<float>(isa, M); break;
    case at::kHalf: p = float32_path<at::Half>(isa, M); break;
    default: p = float32_path<at::BFloat16>(isa, M); break;
  }
  run_blocked(p, op, M, N, G);
  finish_acc();
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float32/bfloat16/float16 [M, K] (any strides, K % 4 == 0), values x.dtype [N, K/2],
  // meta uint8 [N, K/4] (2:4 layout of pyfast/formats.py), bias [N] any float dtype or
  // None -> out x.dtype [M, N] = x @ W.T + bias, W the dense matrix of (values, meta);
  // float32 accumulation, one rounding to x.dtype.
  m.def("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("sparse24_mm", &pyfast::cpu::sparse24_mm_cpu);
}
