// The bfloat16 2:4 kernel of pyfast_C::sparse24_mm for 8 <= M < 64 rows of x on AVX-512
// CPUs with AVX512_BF16 (path 2 of csrc/cpu/sparse24.cpp, which holds the op, its checks
// and the layout: values [N, K/2] bf16, meta [N, K/4] with the kept indices in bits 0-1 and
// 2-3 of each byte).
//
// One vector step covers a pair of weight rows (n, n + 1) and 8 groups (32 k):
//   v   = the 16 kept bf16 of row n, then the 16 of row n + 1 (32 words, two 32-byte loads)
//   idx = word lane L (r = L % 16: group j = r / 2, kept value i = r % 2) = 4j + idx_i of
//         that row's meta byte j, from one broadcast of each row's 8 meta bytes, a vpshufb,
//         a vpsrlvw and a vpternlogd (AVX512BW)
//   per row m of x: vpermw picks the kept x of both rows at once from x[m, 32s : 32s + 32]
//         (one 64-byte memory operand), and vdpbf16ps adds the pair products of each group
//         into a float32 lane: lanes 0-7 are row n's 8 groups, lanes 8-15 row n + 1's
//         (Intel SDM vol. 2, VPERMW and VDPBF16PS; products of two bf16 are exact in
//         float32, subnormal inputs and results count as 0).
// The index and the values are built once per step and serve MT = 16 (or 8) rows of x: per
// vdpbf16ps the loop issues one vpermw with one 64-byte load and about 5/16 other vector
// ops. The older tiles (kernel_bf16dot in sparse24.cpp, MT = 4, one weight row per index,
// x chunks in registers) issue a vpermt2w and 3/4 of an index op per vdpbf16ps; they stay
// the path below 8 rows.
//
// What bounds it (Zen 4, one core, measured ad hoc in a standalone loop, not bench result
// files): vdpbf16ps on registers ran at 0.5 cycles, with a 64-byte load operand at 1.1, as
// vpermw(load) + vdpbf16ps at 1.35: the loads, not the permutes, set the pace. So x must
// come from L1: with whole rows of K = 4096 per call (x block 128 KiB, in L2) this kernel
// took about 2.6 cycles per vdpbf16ps, with K blocks of kKBlock = 512 (x block 16 KiB)
// 1.2-1.4x less overall (4096 x 4096, M = 16). Dense bfloat16 F.linear (oneDNN) took about
// 2.0 cycles per 32 multiply-adds; a 2:4 vdpbf16ps does 32 of the dense product's 64.
//
// x is packed once per call into blocks of MT rows, xp[s][m][32 words] (zeros past M and
// K), so the rows read per step are one contiguous KiB: read from x itself, 16 rows 8 KiB
// apart (K = 4096) fall into the same L1 sets and evict each other (measured ad hoc: 3.5x
// slower). Per K block each call reads a 1 KiB segment of values and 128 bytes of meta per
// weight row; the hardware prefetcher does not follow such short runs, so each call
// prefetches (prefetcht1, into L2) its rows' segment of the next K block, or in the last K
// block the rows kNBlock further on (the next task of this thread; a prefetch never faults,
// so one past a row's or the weight's end is harmless: Intel SDM vol. 2, PREFETCHh). The 16 accumulators of
// a call are reduced by a transposing tree (14 adds, 30 shuffles) to the 2 x MT sums,
// added into the task's acc_t across K blocks. Threads split N in blocks of kNBlock rows
// (at::parallel_for).
#include "sparse24_bf16pairs.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"

#define PYFAST_S24P_INLINE inline __attribute__((always_inline))

namespace pyfast {
namespace cpu {

#if PYFAST_X86
namespace {

constexpr int64_t kStepGroups = 8;   // groups per vector step (32 k)
constexpr int64_t kKBlock = 512;     // k per K block: x block of 16 rows = 16 KiB (L1)
constexpr int64_t kNBlock = 16;      // weight rows per parallel task

// vpshufb picks meta byte j into the low byte of word lanes 2j, 2j + 1 of each half (the
// 128-bit lanes hold that row's 8 meta bytes twice); 0x80 zeroes the high byte.
struct PairConstants {
  alignas(64) uint8_t pick[64];
  alignas(64) uint16_t shift[32];
  alignas(64) uint16_t base[32];
  PairConstants() {
    for (int L = 0; L < 32; ++L) {
      const int r = L % 16, j = r / 2, i = r % 2;
      pick[2 * L] = static_cast<uint8_t>(j);
      pick[2 * L + 1] = 0x80;
      shift[L] = static_cast<uint16_t>(2 * i);
      base[L] = static_cast<uint16_t>(4 * j);
    }
  }
};
const PairConstants kPair;

// One step's index vector from the rows' 8-byte meta words (qwords, zeros past G).
PYFAST_TARGET_AVX512_BF16 PYFAST_S24P_INLINE __m512i pair_index(__m256i meta0, __m256i meta1,
                                                               __m512i pick, __m512i shift,
                                                               __m512i base) {
  const __m512i src = _mm512_inserti64x4(_mm512_castsi256_si512(meta0), meta1, 1);
  const __m512i w = _mm512_srlv_epi16(_mm512_shuffle_epi8(src, pick), shift);
  return _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(3), base, 0xEA);  // (w & 3) | base
}

// lanes 0-7 of acc[m] -> o0[m], lanes 8-15 -> o1[m], m < MT (MT = 8 or 16), by a tree:
// pairs of accumulators (unpack lo/hi 32-bit, add), pairs of those (64-bit), then 128-bit
// lanes. Stores the sums or (accumulate) adds them.
template <int MT>
PYFAST_TARGET_AVX512_BF16 PYFAST_S24P_INLINE void reduce_pairs(const __m512* acc, float* o0,
                                                              float* o1, bool accumulate) {
  __m512 p[MT / 2], r[MT / 4];
#pragma GCC unroll 8
  for (int i = 0; i < MT / 2; ++i)
    p[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                         _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  // r[i]: 128-bit lane q holds the sums of lanes 4q..4q+3 of acc[4i .. 4i + 3]
#pragma GCC unroll 4
  for (int i = 0; i < MT / 4; ++i) {
    const __m512d a = _mm512_castps_pd(p[2 * i]), b = _mm512_castps_pd(p[2 * i + 1]);
    r[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // t: [row n of m 0-3 | row n+1 of m 0-3 | row n of m 4-7 | row n+1 of m 4-7] (+8 for t1)
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88),
                                  _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
  if constexpr (MT == 16) {
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], 0x88),
                                    _mm512_shuffle_f32x4(r[2], r[3], 0xDD));
    __m512 s0 = _mm512_shuffle_f32x4(t0, t1, 0x88), s1 = _mm512_shuffle_f32x4(t0, t1, 0xDD);
    if (accumulate) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(o0));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(o1));
    }
    _mm512_storeu_ps(o0, s0);
    _mm512_storeu_ps(o1, s1);
  } else {
    const __m512 s = _mm512_shuffle_f32x4(t0, t0, 0xD8);  // [row n m 0-7 | row n+1 m 0-7]
    __m256 s0 = _mm512_castps512_ps256(s);
    __m256 s1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    if (accumulate) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(o0));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(o1));
    }
    _mm256_storeu_ps(o0, s0);
    _mm256_storeu_ps(o1, s1);
  }
}

// acc[m] += the pair products of step xs (MT rows of packed x) against (idx, v).
template <int MT>
PYFAST_TARGET_AVX512_BF16 PYFAST_S24P_INLINE void pair_step(const uint16_t* xs, __m512i idx,
                                                           __m512i v, __m512* acc) {
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    const __m512i sel = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(xs + 32 * m));
    acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)sel, (__m512bh)v);
  }
}

// A pair of weight rows: their values and meta rows.
struct PairRows {
  const uint16_t* v0;
  const uint16_t* v1;
  const uint8_t* m0;
  const uint8_t* m1;
};

// Rows w of W against the MT rows of one packed x block, steps [s0, s1) of the call's K
// block; full steps only before the last step of K, which holds r = G - 8s groups (1..8).
// Prefetched into L2 while it runs: steps s + ahead of the rows next (a new values line
// every 2 steps, a new meta line every 8; ahead is a multiple of 8). o0 / o1 [MT]: the
// sums of w's rows, stored or (accumulate) added.
template <int MT>
PYFAST_TARGET_AVX512_BF16 void pair_kernel(const uint16_t* xp, const PairRows& w,
                                           const PairRows& next, int64_t ahead, int64_t s0,
                                           int64_t s1, int64_t G, float* o0, float* o1,
                                           bool accumulate) {
  const uint16_t *v0 = w.v0, *v1 = w.v1;
  const uint8_t *m0 = w.m0, *m1 = w.m1;
  const __m512i pick = _mm512_load_si512(kPair.pick);
  const __m512i shift = _mm512_load_si512(kPair.shift);
  const __m512i base = _mm512_load_si512(kPair.base);
  __m512 acc[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t full = std::min(s1, G / kStepGroups);  // steps with all 8 groups
  int64_t s = s0;
  for (; s < full; ++s) {
    if ((s & 1) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(next.v0 + 16 * (s + ahead)), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next.v1 + 16 * (s + ahead)), _MM_HINT_T1);
    }
    if ((s & 7) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(next.m0 + 8 * (s + ahead)), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next.m1 + 8 * (s + ahead)), _MM_HINT_T1);
    }
    uint64_t a, b;
    std::memcpy(&a, m0 + 8 * s, 8);
    std::memcpy(&b, m1 + 8 * s, 8);
    const __m512i idx = pair_index(_mm256_set1_epi64x(static_cast<long long>(a)),
                                   _mm256_set1_epi64x(static_cast<long long>(b)), pick, shift,
                                   base);
    const __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + 16 * s))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + 16 * s)), 1);
    pair_step<MT>(xp + s * MT * 32, idx, v, acc);
  }
  if (s < s1) {  // the last step of K: r < 8 groups, masked loads (zeros past G)
    const int64_t r = G - kStepGroups * s;
    const __mmask16 mb = static_cast<__mmask16>((1u << r) - 1);
    const __mmask16 mv = static_cast<__mmask16>((1u << (2 * r)) - 1);
    const __m256i a = _mm256_broadcastq_epi64(_mm_maskz_loadu_epi8(mb, m0 + 8 * s));
    const __m256i b = _mm256_broadcastq_epi64(_mm_maskz_loadu_epi8(mb, m1 + 8 * s));
    const __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mv, v0 + 16 * s)),
        _mm256_maskz_loadu_epi16(mv, v1 + 16 * s), 1);
    pair_step<MT>(xp + s * MT * 32, pair_index(a, b, pick, shift, base), v, acc);
  }
  reduce_pairs<MT>(acc, o0, o1, accumulate);
}

// A block of x rows [m0, m0 + rows), packed as MT rows.
struct XBlock {
  int64_t m0, rows;
  int mt;  // 16, or 8 for a last block of at most 8 rows
  const uint16_t* xp;
};

}  // namespace

void sparse24_bf16_pairs(const uint16_t* x, const uint16_t* vals, const uint8_t* meta,
                         int64_t M, int64_t N, int64_t K, float* acc) {
  const int64_t G = K / 4, S = (G + kStepGroups - 1) / kStepGroups;
  std::vector<XBlock> blocks;
  int64_t packed = 0;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, M - m0);
    const int mt = rows <= 8 ? 8 : 16;
    blocks.push_back({m0, rows, mt, nullptr});
    packed += S * mt * 32;
  }
  // xp[s][m][32 words] per block; zeros past M and past K.
  std::vector<uint16_t> xp(static_cast<size_t>(packed), 0);
  int64_t at = 0;
  for (XBlock& b : blocks) {
    uint16_t* dst = xp.data() + at;
    b.xp = dst;
    at += S * b.mt * 32;
    for (int64_t m = 0; m < b.rows; ++m) {
      const uint16_t* src = x + (b.m0 + m) * K;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k0 = 32 * s, n = std::min<int64_t>(32, K - k0);
        std::memcpy(dst + (s * b.mt + m) * 32, src + k0, static_cast<size_t>(n) * 2);
      }
    }
  }
  const int64_t kb_steps = kKBlock / (4 * kStepGroups);
  const int64_t tasks = (N + kNBlock - 1) / kNBlock;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kNBlock * M * K));
  const int64_t nbk = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    // acc_t[(n - nb0) * nbk + block][16]: the task's sums across K blocks
    std::vector<float> acc_t(static_cast<size_t>(kNBlock * nbk * 16));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nb0 = t * kNBlock, nb1 = std::min(N, nb0 + kNBlock);
      for (int64_t sb = 0; sb < S; sb += kb_steps) {
        const int64_t se = std::min(S, sb + kb_steps);
        const bool last = se == S;
        for (int64_t bi = 0; bi < nbk; ++bi) {
          const XBlock& b = blocks[bi];
          for (int64_t n = nb0; n < nb1; n += 2) {
            const int64_t n1 = std::min(n + 1, N - 1);  // odd N: the last row twice
            const PairRows w{vals + n * (K / 2), vals + n1 * (K / 2), meta + n * G, meta + n1 * G};
            // Prefetch: these rows' next K block, or from the last K block on, the same
            // rows of the next N block (which this thread most likely runs next).
            const int64_t q = std::min(n + kNBlock, N - 1), q1 = std::min(q + 1, N - 1);
            const PairRows next = last ? PairRows{vals + q * (K / 2), vals + q1 * (K / 2),
                                                  meta + q * G, meta + q1 * G}
                                       : w;
            float* o0 = acc_t.data() + ((n - nb0) * nbk + bi) * 16;
            float* o1 = o0 + nbk * 16;
            if (b.mt == 16) {
              pair_kernel<16>(b.xp, w, next, last ? -sb : kb_steps, sb, se, G, o0, o1, sb > 0);
            } else {
              pair_kernel<8>(b.xp, w, next, last ? -sb : kb_steps, sb, se, G, o0, o1, sb > 0);
            }
          }
        }
      }
      for (int64_t bi = 0; bi < nbk; ++bi) {
        const XBlock& b = blocks[bi];
        for (int64_t m = 0; m < b.rows; ++m) {
          float* row = acc + (b.m0 + m) * N;
          for (int64_t n = nb0; n < nb1; ++n) row[n] = acc_t[((n - nb0) * nbk + bi) * 16 + m];
        }
      }
    }
  });
}

#else  // not x86: the op reaches this kernel only at the AVX-512 level

void sparse24_bf16_pairs(const uint16_t*, const uint16_t*, const uint8_t*, int64_t, int64_t,
                         int64_t, float*) {
  TORCH_CHECK(false, "pyfast_C::sparse24_mm: the bfloat16 pair kernel needs an x86 AVX-512 "
              "build; this build has none");
}

#endif

}  // namespace cpu
}  // namespace pyfast
