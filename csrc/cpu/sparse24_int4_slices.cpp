// sparse24_int4_mm at M = 1 with float x on AVX-512 VNNI + VBMI: x cut into int8 slices
// (as the int4_mm kernel, weight_only_slices.cpp), the kept x of each weight row picked
// by a byte permute, and the products with the codes made by vpdpbusd in int32, exactly.
//
// Why: the float32 tiles (sparse24_int4.cpp) dequantize 16 kept values with a vpermps
// from a 16-entry table and pick their x with a vpermt2ps: about 11 zmm-sized
// instructions per 16 kept values, so at M = 1 they were compute-bound at 0.58-0.77x
// int4_mm's time (fp32 bench runs 135812 and this version's first full run), although
// 2:4 + int4 reads 3 bits per dense weight against int4's 4.
//
// A block is 128 dense columns of one row: 64 kept values, 32 code bytes and 16 meta
// bytes. Per block and row (Intel SDM vol. 2 for each instruction):
//   codes: a broadcast load puts code qword l & 3 in qword l, and vpmultishiftqb and a
//     mask make byte i of qword l the code of kept value kappa_l + i, kappa_l =
//     16 (l & 3) + 8 (l >> 2): the 64 codes one per byte (2 instructions; lane_of below);
//   indices: vpermw puts the meta word of the same 8 kept values in qword l, vpmultishiftqb
//     (shifts 0, 2, .., 14) and one vpternlogd ((v & 3) | base) make byte i the kept
//     value's column in the block, 4 (kept / 2) + index (3 instructions);
//   q - z as signed bytes (vpsubb), and the offset below (per channel one vpdpbusd,
//     else a vpsubb and a vpdpbusd);
//   per slice j: vpermt2b picks byte i = digit u_j of the kept value's x from the
//     slice's 128 bytes; vpdpbusd adds (q - z) times them into the 16 dword lanes (each
//     4 consecutive kept values = 8 dense columns, one x lane of x_slices.h, lane_of);
//     the three joined in one shift chain, highest first (3 vpermt2b, 3 vpdpbusd, 2 shifts);
//   float32 epilogue: convert, scale times lane factor, FMA (3 instructions).
// About 20 instructions per 64 kept values, against about 44 in the float32 tiles.
// Measured ad hoc (not bench result files; one thread, K = 4096, group 128, 3.6 GHz):
// about 14 cycles per block and row with the weight in L2 (about 12 GB/s of weight per
// core; the float32 tiles: about 7 GB/s) and 8 GB/s per core streaming from memory. The time
// follows the instruction count (about one zmm instruction per cycle: two more adds per
// block made it about 1.15x slower; the three vpermt2b replaced by vpxord, 1.1x faster), not
// memory: prefetch distances of 2-32 KiB, prefetcht0 into L1 and four rows per x load
// instead of two changed nothing beyond the noise; one row per x load was 0.75-0.8x
// (2 threads, weights rotated past the L3).
//
// Exactness. x's digits are those of U = X + 2^23 (0 < U < 2^24, X as in x_slices.h), all
// unsigned, as vpdpbusd's u8 operand needs; q - z (|q - z| <= 15) is its s8 operand. The
// chain starts from -128 sum (q - z) (vpdpbusd of the constant 128 with z - q; per
// channel 512 z - 128 sum q, lane_sums), so its
// top step makes sum (q - z) (u2 - 128) and the whole chain
//   A = sum over the lane's 4 kept values of (q - z) (U - 2^23) = sum (q - z) X,
// each step an exact partial of it (|A| <= 4 * 15 * 2^23 < 2^29; before the offset is
// taken, |sum (q - z) U| < 4 * 15 * 2^24 < 2^30): int32 never overflows. The zero point
// is exact in the lane sums, unlike int4_mm's kernel, which adds it in float32.
// A is rounded once to float32 and scaled by s * 2^(e - 23): the error of an output is at
// most the representation error of x (sum over lanes of 2^(e - 24) times the lane's sum
// of |w| over kept values) plus float32 rounding of the per-lane terms, as in
// weight_only_slices.cpp. Padding past K is x = 0 (U = 2^23, X = 0), so the columns a
// masked code or index load points at add exactly 0.
//
// x that the slices cannot hold makes x_slices return false and the call runs the float32
// tiles (sparse24_int4.cpp), as int4_mm does.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include <c10/util/Exception.h>

#include "sparse24_int4_slices.h"
#include "weight_only_kernels.h"  // prefetch_l2
#include "x_slices.h"

namespace pyfast {
namespace cpu {
namespace s24i4 {

#if PYFAST_X86

using weight_only::prefetch_l2;

// Lane order. Output dword d of a block holds 4 consecutive kept values, i.e. one x lane
// of 8 columns, but not lane d: the codes are read by a broadcast load (qword l of the
// vector = code qword l & 3, kept values 16 (l & 3) .. + 15, no shuffle instruction), so
// qword l holds kept values kappa_l + i, i < 8, kappa_l = 16 (l & 3) + 8 (l >> 2), and
// dword d = 2l + s the x lane
//   lane_of(d) = 4 ((d >> 1) & 3) + 2 (d >> 3) + (d & 1).
// x_slices stores the lane factors in this order; the scales and zero points are
// permuted to it by the constants below.
constexpr int lane_of(int d) { return 4 * ((d >> 1) & 3) + 2 * (d >> 3) + (d & 1); }

// Per block: the lane exponents from the gathered lanes (x_slices.h), then x read in
// natural order 16 columns at a time (lanes 2c and 2c + 1), U = X + 2^23, and each digit
// narrowed to bytes by vpmovdb.
PYFAST_TARGET_AVX512 bool x_slices(const float* x, int64_t K, uint8_t* dst) {
  const int64_t blocks = (K + 127) / 128;
  const __m512i offset = _mm512_set1_epi32(1 << 23);
  const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  alignas(64) int32_t lanes[16];
  for (int d = 0; d < 16; ++d) lanes[d] = lane_of(d);
  const __m512i order = _mm512_load_si512(lanes);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 v[8], mx, sc, f;
    if (!slices::lane_values(x, K, b, v, &mx) || !slices::lane_exponents(mx, &sc, &f))
      return false;
    uint8_t* blk = dst + b * kXBlockBytes;
    for (int c = 0; c < 8; ++c) {
      const int64_t k0 = 128 * b + 16 * c;
      const int64_t n = k0 >= K ? 0 : std::min<int64_t>(16, K - k0);
      const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), x + k0);
      const __m512 s = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * c)), sc);
      const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(xv, s)), offset);
      for (int j = 0; j < 3; ++j)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 128 * j + 16 * c),
                         _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8 * j)));
    }
    _mm512_storeu_ps(reinterpret_cast<float*>(blk + kXSliceBytes),
                     _mm512_permutexvar_ps(order, f));
  }
  return true;
}

namespace {

// How the lane scales and zero points of a block are found (one sweep per kind, so the
// block loop has no branch on it): one per row (per channel), one per block (group 128),
// or per lane (group 32 or 64: 4 or 2 groups per block).
enum class Scales { kRow, kBlock, kLane };

// Constants of a sweep: for per-lane groups, the group (within the block) of each dword
// and of each byte (byte 4d + t belongs to dword d).
struct LaneIndex {
  __m512i lane, byte;
};

PYFAST_TARGET_AVX512 LaneIndex lane_index(int gshift) {
  alignas(64) int32_t l[16];
  alignas(64) uint8_t y[64];
  const int sh = gshift < 7 ? gshift - 3 : 0;  // an x lane covers 8 columns
  for (int d = 0; d < 16; ++d) l[d] = lane_of(d) >> sh;
  for (int p = 0; p < 64; ++p) y[p] = static_cast<uint8_t>(lane_of(p >> 2) >> sh);
  return {_mm512_load_si512(l), _mm512_load_si512(y)};
}

// Block b of row n, per dword: the scale (s), the zero point in each byte (z) and, per
// channel, 512 times the zero point (z512, the lane sums' offset, lane_sums).
template <Scales kScales>
PYFAST_TARGET_AVX512_VBMI inline void group_params(const Weight& w, int64_t n, int64_t b,
                                                   const LaneIndex& li, __m512* s,
                                                   __m512i* z, __m512i* z512) {
  const float* sp = w.scales + n * w.G;
  const uint8_t* zp = w.zeros + n * w.G;
  if constexpr (kScales != Scales::kLane) {
    const int64_t g = kScales == Scales::kRow ? 0 : b;
    *s = _mm512_set1_ps(sp[g]);
    *z = _mm512_set1_epi8(static_cast<char>(zp[g]));
    if constexpr (kScales == Scales::kRow) *z512 = _mm512_set1_epi32(512 * zp[g]);
  } else {
    const int64_t per = int64_t{128} >> w.gshift, g0 = b * per;
    const __mmask16 m = static_cast<__mmask16>((1u << std::min(per, w.G - g0)) - 1u);
    *s = _mm512_permutexvar_ps(li.lane, _mm512_maskz_loadu_ps(m, sp + g0));
    *z = _mm512_permutexvar_epi8(li.byte,
                                 _mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, zp + g0)));
  }
}

// The lane sums a[r] = sum (q - z) X of block b of R weight rows (codes[r], meta[r] their
// row starts; cb = K / 4 and mb = K / 8 bytes per row), dwords in lane_of order, against
// the slices at xb. The chain starts from -128 sum (q - z) over the dword's 4 kept values:
// with kZ512 (one zero point per row, z512 made once) 512 z - 128 sum q, one vpdpbusd of
// q with the constant -128 onto 512 z; else 128 sum (z - q), a vpsubb and a vpdpbusd
// (broadcasting 512 z from a general register per block was 1.07x slower at group 128,
// weights in L2, measured ad hoc). With
// R = 2 each slice vector is loaded once for both rows and kept in a register (the empty
// asm: GCC folds a shared load into both rows' instructions as a memory operand
// otherwise, reading it twice; weight_only_slices.cpp), the chains interleaved.
template <int R, bool kZ512>
PYFAST_TARGET_AVX512_VBMI inline void lane_sums(const uint8_t* const codes[R],
                                                const uint8_t* const meta[R],
                                                const __m512i z[R], const __m512i z512[R],
                                                int64_t b, int64_t cb, int64_t mb,
                                                const uint8_t* xb, __m512i a[R]) {
  alignas(64) static const uint64_t kBase[8] = {  // byte i of qword l: 2 kappa_l + 4 (i / 2)
      0x0C0C080804040000ull, 0x2C2C282824242020ull, 0x4C4C484844444040ull,
      0x6C6C686864646060ull, 0x1C1C181814141010ull, 0x3C3C383834343030ull,
      0x5C5C585854545050ull, 0x7C7C787874747070ull};
  // codes: qword l holds code qword l & 3; kept value kappa_l + i is its nibble
  // 8 (l >> 2) + i, at bit 32 (l >> 2) + 4 i (vpmultishiftqb rotates within the qword)
  alignas(64) static const uint64_t kCtrl4[8] = {
      0x1C1814100C080400ull, 0x1C1814100C080400ull, 0x1C1814100C080400ull,
      0x1C1814100C080400ull, 0x3C3834302C282420ull, 0x3C3834302C282420ull,
      0x3C3834302C282420ull, 0x3C3834302C282420ull};
  // meta: word 4l <- meta word kappa_l / 8 = 2 (l & 3) + (l >> 2); index i at bit 2i
  alignas(64) static const uint16_t kMetaWord[32] = {0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4,
                                                     4, 6, 6, 6, 6, 1, 1, 1, 1, 3, 3,
                                                     3, 3, 5, 5, 5, 5, 7, 7, 7, 7};
  const __m512i ctrl2 = _mm512_set1_epi64(0x0E0C0A0806040200ll);
  const __m512i ctrl4 = _mm512_load_si512(kCtrl4), words = _mm512_load_si512(kMetaWord);
  const __m512i base = _mm512_load_si512(kBase);
  const __m512i low4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
  const __m512i minus128 = _mm512_set1_epi8(static_cast<char>(0x80));  // as s8
  const __m512i plus128 = minus128;                                       // as u8
  const int64_t c0 = 32 * b, m0 = 16 * b;  // < cb, mb: a block holds at least 8 columns
  __m512i idx[R], qz[R];
  for (int r = 0; r < R; ++r) {
    const __m512i c = c0 + 32 <= cb
        ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[r] + c0)))
        : _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(
              static_cast<__mmask32>((1u << (cb - c0)) - 1u), codes[r] + c0));
    const __m128i m = m0 + 16 <= mb
        ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta[r] + m0))
        : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (mb - m0)) - 1u), meta[r] + m0);
    const __m512i q = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl4, c), low4);
    // (shifted & three) | base in one vpternlogd (truth table 0xEA: (A & B) | C)
    idx[r] = _mm512_ternarylogic_epi32(
        _mm512_multishift_epi64_epi8(
            ctrl2, _mm512_permutexvar_epi16(words, _mm512_castsi128_si512(m))),
        three, base, 0xEA);
    qz[r] = _mm512_sub_epi8(q, z[r]);
    if constexpr (kZ512)
      a[r] = _mm512_dpbusd_epi32(z512[r], q, minus128);
    else  // 128 sum (z - q)
      a[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), plus128, _mm512_sub_epi8(z[r], q));
  }
  for (int j = 2; j >= 0; --j) {
    if (j != 2)
      for (int r = 0; r < R; ++r) a[r] = _mm512_slli_epi32(a[r], 8);
    __m512i lo = _mm512_loadu_si512(xb + 128 * j), hi = _mm512_loadu_si512(xb + 128 * j + 64);
    if constexpr (R > 1) asm("" : "+v"(lo), "+v"(hi));
    for (int r = 0; r < R; ++r)
      a[r] = _mm512_dpbusd_epi32(a[r], _mm512_permutex2var_epi8(lo, idx[r], hi), qz[r]);
  }
}

// Rows n .. n + R - 1, all of K; each block prefetches into L2 the code and meta bytes
// `ahead` rows further on (the weight is read row after row: one stream of each).
template <Scales kScales, int R>
PYFAST_TARGET_AVX512_VBMI void rows(const uint8_t* xs, const Weight& w, int64_t n,
                                    int64_t ahead, const LaneIndex& li, float* out) {
  const int64_t cb = w.K / 4, mb = w.K / 8, blocks = (w.K + 127) / 128;
  const uint8_t* codes[R];
  const uint8_t* meta[R];
  __m512 t[R], s[R];
  __m512i z[R], z512[R];
  for (int r = 0; r < R; ++r) {
    codes[r] = w.packed + (n + r) * cb, meta[r] = w.meta + (n + r) * mb;
    t[r] = _mm512_setzero_ps();
    if constexpr (kScales == Scales::kRow) group_params<kScales>(w, n + r, 0, li, &s[r], &z[r], &z512[r]);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < R; ++r) {
      prefetch_l2(codes[r] + 32 * b + ahead * cb);
      prefetch_l2(meta[r] + 16 * b + ahead * mb);
      if constexpr (kScales != Scales::kRow) group_params<kScales>(w, n + r, b, li, &s[r], &z[r], &z512[r]);
    }
    const uint8_t* xb = xs + b * kXBlockBytes;
    const __m512 f = _mm512_loadu_ps(reinterpret_cast<const float*>(xb + kXSliceBytes));
    __m512i a[R];
    lane_sums<R, kScales == Scales::kRow>(codes, meta, z, z512, b, cb, mb, xb, a);
    for (int r = 0; r < R; ++r)
      t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), _mm512_mul_ps(s[r], f), t[r]);
  }
  for (int r = 0; r < R; ++r) out[n + r] = _mm512_reduce_add_ps(t[r]);
}

template <Scales kScales>
PYFAST_TARGET_AVX512_VBMI void sweep(const uint8_t* xs, const Weight& w, int64_t n0,
                                     int64_t n1, float* out) {
  const LaneIndex li = lane_index(w.gshift);
  // at least 8 KiB of codes ahead (weight_only_kernels.h, prefetch_distance)
  const int64_t ahead = std::max<int64_t>(1, (8192 + w.K / 4 - 1) / (w.K / 4));
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) rows<kScales, 2>(xs, w, n, ahead, li, out);
  if (n < n1) rows<kScales, 1>(xs, w, n, ahead, li, out);
}

}  // namespace

void m1_slices(const uint8_t* xs, const Weight& w, int64_t n0, int64_t n1, float* out) {
  if (w.G == 1) return sweep<Scales::kRow>(xs, w, n0, n1, out);
  if (w.gshift >= 7) return sweep<Scales::kBlock>(xs, w, n0, n1, out);  // group 128
  sweep<Scales::kLane>(xs, w, n0, n1, out);
}

#else  // not x86: never selected (active_isa() is kScalar)

bool x_slices(const float* x, int64_t K, uint8_t* dst) {
  (void)x, (void)K, (void)dst;
  TORCH_CHECK(false, "s24i4::x_slices called on a CPU without AVX-512");
}

void m1_slices(const uint8_t* xs, const Weight& w, int64_t n0, int64_t n1, float* out) {
  (void)xs, (void)w, (void)n0, (void)n1, (void)out;
  TORCH_CHECK(false, "s24i4::m1_slices called on a CPU without AVX-512");
}

#endif

}  // namespace s24i4
}  // namespace cpu
}  // namespace pyfast
