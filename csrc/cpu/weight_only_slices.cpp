// int4_mm at M = 1 with float x on AVX-512 VNNI: x cut into int8 slices, the products
// with the nibbles made by vpdpbusd in int32, exactly (layout in weight_only.h, "int8
// slices of x").
//
// Why: the float32 kernel (int4_rows_m1, weight_only_avx512.cpp) needs per 16 weights a
// vpternlogd and a vsubps to make the floats and an FMA: about 39 zmm instructions per
// block of 128 weights, so it was compute-bound at M = 1 (1.00-1.17x pyfast W8A8 in the
// fp32 bench run 092526, against the 1.6x that half the bytes allow). Here a block of one
// row is 3 instructions of nibble unpacking, 6 vpdpbusd (64 u8 x s8 products each, Intel
// SDM vol. 2, VPDPBUSD), 2 shifts joining the slices, an add for the zero point's 8 and 3
// for the float32 epilogue; the rest of the zero point term is made once per row and
// group, not per block.
// Where the time goes (Zen 4, measured here): a zmm vpdpbusd or FMA issues once per cycle
// (12 independent ones in a loop), and a vpdpbusd with a vpsrld and a vpandd beside it
// takes 1.36 cycles: the kernel is bound by its vector instructions, about 11.4 cycles
// per block and row on one core with the weight in L2 (18.5 GB/s per core). Streaming
// from memory it read about 15-17 GB/s per core while 4 plain read streams read 18-25.
// Variants built beside this one and timed ad hoc in the same runs (not bench result
// files; 2 threads, M = 1, 4096 x 4096, int4 weights on huge pages rotated past the L3;
// W8A8 = w8a8_mm_vnni, likewise; in L2 = the slope of time over N, 1 thread):
//   - the vpdpbusd chain removed (the weight loaded and unpacked, the sums garbage): 2x
//     faster in L2 (39-43 against 20-21 GB/s per core), but from memory no faster
//     (31-33 against 32-35 GB/s, W8A8 41-44). So from memory this sweep is held by how
//     it reads memory, not by its arithmetic;
//   - the two rows of a pair stored interleaved per 64-byte block (one sequential
//     stream, as a panel layout would give; weight repacked for the test): 27.7-30.9
//     against 27.9-30.9 GB/s (W8A8 32-49 in those runs). So a panel layout would not
//     help; what lets W8A8's panel streams read faster (4 at once, 3 lines per step,
//     each prefetched 4 KiB ahead) is not known;
//   - prefetch: none 12-14 GB/s, prefetcht0 18-19, 4 KiB ahead 30-31, 16 KiB ahead as 8;
//     one row per step (a single sequential stream) 29-30;
//   - four rows per step, and the three slices summed in separate chains joined at the
//     end: no change in L2 (the loop is not latency-bound);
//   - two slices (16-bit x, less accurate; not kept): 1.28x faster in L2, from memory
//     within the noise of the same runs (24-42 against 22-33 GB/s).
// Changes measured ad hoc against the previous version, in one process (a C++ harness
// calling both builds alternately, 2 threads, weights on huge pages rotated past the L3,
// median of 15 paired rounds; not bench result files):
//   - the zero point term moved out of the block loop (it was a vpmulld and a broadcast
//     per block; now a vpaddd of -8 sum X, and the rest per row and group) and the
//     slices joined by one shift chain: 1.03-1.09x (without the -8 sum X, whose float32
//     zero point term made one test_ops case's error 1.005x its tolerance);
//   - two adjacent rows per step sharing each x load, where x fits one chunk (K <= 6912):
//     1.11-1.45x at K = 4096 in all (all of this file's changes, last run: 1.28x at
//     4096 x 4096, 1.09x at N = 11008); at K = 11008 (two chunks) pairs were 0.95-0.97x,
//     so there one row at a time stays (1.02x);
//   - the zero point kept whole in int32 (a vpmulld per block and row) with the rest:
//     0.91-0.93x of the float32 zero point term below (without the -8 sum X).
// Tried on 2026-11-25 and not kept (same harness style: a build with an environment
// switch, both variants alternated per round in one process, 30 rounds, 2 threads, int4
// g128 weights on huge pages rotated through 256 MiB; W8A8 read 44-51 GB/s in these runs,
// this kernel 34-37 GB/s, 1.32-1.50x W8A8; variant / this kernel, median [quartiles]):
//   - four adjacent rows per step (x slices loaded once for four): 1.006 [0.95, 1.05] at
//     4096 x 4096, 1.027 [0.97, 1.05] at 4096 x 11008;
//   - four rows 8 apart per step (rows i, i + 8, i + 16, i + 24 of a group of 32: four
//     sequential streams, as W8A8's decode reads four panels): 1.009 [0.97, 1.08] and
//     1.071 [0.94, 1.11];
//   - the odd nibbles by one vgf2p8affineqb (GFNI) instead of a shift and an and: 1.006,
//     0.958, 1.024 on the three shapes (quartiles 0.94-1.07).
// With the weight in cache (4096 x 1024, 2 threads, not rotated) a call read 50.6 GB/s,
// so from memory the sweep is not held by its arithmetic alone here either.
// The idea is the Ozaki scheme's (Ozaki, Ogita, Oishi, Rump, "Error-free transformations
// of matrix multiplication by using fast routines of matrix multiplication and its
// applications", Numer. Algorithms 2012): split the float operand into narrow integer
// slices under a shared exponent and multiply the slices exactly with integer units.
//
// x in slices. Lane i of block b holds k = 128b + 8i .. 128b + 8i + 7 (the 16 dword lanes
// of a 64-byte weight load, weight_only_lanes.h). Per lane, e is the exponent with
// max|x| < 0.99 * 2^e, and X = round(x * 2^(23 - e)), |X| < 0.99 * 2^23, written as
// d0 + 256 d1 + 65536 d2 with signed digits d_j in [-128, 127] (the three slices).
// Accuracy: each x is held to within 2^(e - 24), one float32 ulp of its lane's largest
// |x| (an x as large as that maximum keeps float32's 24 bits; smaller ones keep the bits
// above that ulp). With q the nibble (vpdpbusd's unsigned operand), the lane sums
// A = sum (q - 8) X are exact in int32 (lane_sums: sum q X by vpdpbusd, then -8 sum X
// from the x side); each is rounded once to float32 and scaled by the group scale s and
// 2^(e - 23). The rest of the zero point z enters as s * (z - 8) * zsum per row and group,
// zsum = -(the group's sum of x as held), summed exactly in double and rounded once to
// float32 (x_int4_slices, zero_term). All of these are summed in float32. So the error of
// an output is at most sum over lanes of 2^(e - 24) * sum |w| over the lane (the
// representation), plus the float32 rounding of terms of size s * |A| * 2^(e - 23) per
// lane and s * |z - 8| * |zsum| per group (|q - 8| <= 8 and |z - 8| <= 8, against
// |q - z| <= 15 for an exact (q - z): terms of the same order; for z = 8, symmetric
// weights, the second term is 0 and the lane sums are those of q - z). For x of one scale
// this is well under PyTorch's own float32 F.linear error (tests/test_cpu_int4_slices.py
// and tests/test_ops.py hold every output to it, outlier x included); an x much smaller
// than a neighbour within its 8-k lane loses the bits below that neighbour's ulp (the
// test with a 2^-30 next to a 1.0 shows it, and the bound).
//
// x that this cannot represent (a non-finite value, or a lane whose largest |x| is
// nonzero and below 2^-64, where 2^(e - 23) times a group scale may fall into float32's
// subnormals) makes x_int4_slices return false, and the call runs the float32 kernel.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include <c10/util/Exception.h>

#include "weight_only_kernels.h"
#include "weight_only_lanes.h"
#include "x_slices.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

#if PYFAST_X86

namespace {

// The 4 x 4 byte transpose of the dwords of w[0..3]: byte t of dword i of out[j] = byte j
// of dword i of w[t]. Two rounds of bit selects (vpternlogd 0xCA = A ? B : C per bit,
// here (m & B) | (~m & C)).
PYFAST_TARGET_AVX512 inline void transpose_bytes(const __m512i* w, __m512i* out) {
  const __m512i m8 = _mm512_set1_epi32(0x00FF00FF), m16 = _mm512_set1_epi32(0x0000FFFF);
  auto sel = [](__m512i m, __m512i a, __m512i b) PYFAST_TARGET_AVX512 {
    return _mm512_ternarylogic_epi32(m, a, b, 0xCA);
  };
  // t01_lo = [w0.b0 w1.b0 w0.b2 w1.b2], t01_hi = [w0.b1 w1.b1 w0.b3 w1.b3] (low byte first)
  const __m512i t01_lo = sel(m8, w[0], _mm512_slli_epi32(w[1], 8));
  const __m512i t01_hi = sel(m8, _mm512_srli_epi32(w[0], 8), w[1]);
  const __m512i t23_lo = sel(m8, w[2], _mm512_slli_epi32(w[3], 8));
  const __m512i t23_hi = sel(m8, _mm512_srli_epi32(w[2], 8), w[3]);
  out[0] = sel(m16, t01_lo, _mm512_slli_epi32(t23_lo, 16));
  out[1] = sel(m16, t01_hi, _mm512_slli_epi32(t23_hi, 16));
  out[2] = sel(m16, _mm512_srli_epi32(t01_lo, 16), t23_lo);
  out[3] = sel(m16, _mm512_srli_epi32(t01_hi, 16), t23_hi);
}

}  // namespace

// Per block: the 8 x of each lane gathered as v[u] (lane i = x[128b + 8i + u]) and e from
// the lane maximum (x_slices.h); X = round(x * 2^(23 - e)) (the product is exact, a power
// of two; vcvtps2dq rounds to nearest even), |X| < 0.99 * 2^23. With Y = X + 0x8080, bytes 0 and 1 of Y are d0 + 128 and d1 + 128 and
// Y >> 16 = d2, so bytes 0-2 of Y ^ 0x8080 are the signed digits d0, d1, d2; and
// -sum X = 8 * 0x8080 - sum Y.
PYFAST_TARGET_AVX512 bool x_int4_slices(const float* x, const Int4Weight& w, uint8_t* dst,
                                        float* zsum) {
  const int64_t K = w.K, blocks = (K + 127) / 128;
  // zsum: lanes run through the groups in order (a lane never straddles two: group is K,
  // or 32, 64 or 128), so each group's sum is a running double sum, flushed when the
  // next group starts. Each term, an int32 times a power of two, is exact in double.
  int64_t g = 0, group_end = w.group;
  double run = 0.0;
  const __m512i bias = _mm512_set1_epi32(0x8080);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 v[8], mx, sc, f;
    if (!slices::lane_values(x, K, b, v, &mx) || !slices::lane_exponents(mx, &sc, &f))
      return false;
    __m512i dig[8], y_sum = _mm512_setzero_si512();
    for (int u = 0; u < 8; ++u) {
      const __m512i y = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[u], sc)), bias);
      dig[u] = _mm512_xor_si512(y, bias);
      y_sum = _mm512_add_epi32(y_sum, y);
    }
    uint8_t* blk = dst + b * kSliceBlockBytes;
    for (int p = 0; p < 2; ++p) {  // parity p: the x of u = 2t + p, t = 0..3
      const __m512i w[4] = {dig[p], dig[2 + p], dig[4 + p], dig[6 + p]};
      __m512i sl[4];
      transpose_bytes(w, sl);
      for (int j = 0; j < kSlices; ++j) _mm512_storeu_si512(blk + (2 * j + p) * 64, sl[j]);
    }
    _mm512_storeu_ps(reinterpret_cast<float*>(blk + kSliceBytes + 64), f);
    // -(sum of X) = 8 * 0x8080 - sum of Y, per lane, into the group sums
    alignas(64) int32_t nsx[16];
    alignas(64) float fl[16];
    const __m512i neg_sum = _mm512_sub_epi32(_mm512_set1_epi32(8 * 0x8080), y_sum);
    _mm512_storeu_si512(blk + kSliceBytes, _mm512_slli_epi32(neg_sum, 3));  // -8 sum X
    _mm512_store_si512(nsx, neg_sum);
    _mm512_store_ps(fl, f);
    for (int i = 0; i < 16 && 128 * b + 8 * i < K; ++i) {
      if (128 * b + 8 * i >= group_end) {
        zsum[g++] = static_cast<float>(run);
        run = 0.0, group_end += w.group;
      }
      run += static_cast<double>(nsx[i]) * static_cast<double>(fl[i]);
    }
  }
  zsum[g] = static_cast<float>(run);  // g = G - 1 (K > 0)
  return true;
}

namespace {

// The sweep: groups of kRowGroup weight rows; K in the fewest equal chunks whose x data
// is at most kChunkBytes (so that it stays in the 32 KiB L1; whole rows up to K = 6144);
// within a chunk the rows of the group two at a time when x is one chunk, else one at a
// time (one sequential stream either way), each row segment prefetching into L2 the
// segment read about kAheadBytes later.
// Measured ad hoc (2 threads, M = 1, int4 weights rotated past the L3, variants
// interleaved in one process, median of 9 rounds; not bench result files):
//   - prefetch: one segment ahead (2 KiB at K = 4096) was 1.2-1.35x slower than 4-12 KiB
//     ahead, which were alike; prefetcht0 was 0.82-0.90x prefetcht1, none 0.5x;
//   - chunks: at K = 11008 two chunks of 43 blocks ran 1.15x faster than chunks of 32
//     blocks (16 KiB); chunks of 24, 28 and 32 KiB were alike;
//   - row groups: 32 rows instead of 8 were 1.12x faster at K = 11008 (each chunk's x is
//     read into L1 once per group) and alike at K = 4096;
//   - rows per step and streams: see the top of this file.
// The loop is written out as in int4_rows_m1 and rows_bf16dot: a shared sweep template
// taking the block loop as a lambda made GCC 12 stop inlining the block function and
// ran 1.25x (this kernel) and 1.4x (int4_rows_m1) slower on one core, weights in L2.
constexpr int64_t kChunkBytes = 24 * 1024;
constexpr int64_t kAheadBytes = 8 * 1024;
constexpr int64_t kRowGroup = 32;

// The lane sums a[r] = sum q X of block b of weight rows row + r * stride, r < R (q the
// nibbles, not yet less the zero point), against the slices of x at xb. One chain per
// row, highest slice first: a = sum q d2; a = 256 a + sum q d1; a = 256 a + sum q d0.
// Each step's value is the exact sum of q times the digits taken so far (|.| <= 8 * 15 *
// 0.99 * 2^23 < 2^31 at the end, less before), so the int32 result is exact; one chain
// needs no adds to join three sums. With R = 2 each slice vector is loaded once for both
// rows and kept in a register (the empty asm: GCC would otherwise fold the load into both
// rows' vpdpbusd as memory operands, reading it twice), and the chains are interleaved
// step by step (each is 6 dependent vpdpbusd).
template <int R>
PYFAST_TARGET_AVX512 inline void lane_sums(const uint8_t* row, int64_t stride, int64_t half,
                                           int64_t b, const uint8_t* xb, __m512i a[R]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i nib[R][2];
  for (int r = 0; r < R; ++r) {
    const __m512i d = load_block(row + r * stride, b, half);
    nib[r][0] = _mm512_and_si512(d, low4);                          // even k
    nib[r][1] = _mm512_and_si512(_mm512_srli_epi32(d, 4), low4);  // odd k
    a[r] = _mm512_setzero_si512();
  }
  for (int j = kSlices - 1; j >= 0; --j) {
    if (j != kSlices - 1)
      for (int r = 0; r < R; ++r) a[r] = _mm512_slli_epi32(a[r], 8);
    for (int p = 0; p < 2; ++p) {
      __m512i x = _mm512_loadu_si512(xb + (2 * j + p) * 64);
      if constexpr (R > 1) asm("" : "+v"(x));
      for (int r = 0; r < R; ++r) a[r] = _mm512_dpbusd_epi32(a[r], nib[r][p], x);
    }
  }
  __m512i c = _mm512_loadu_si512(xb + kSliceBytes);  // -8 sum X: sum (q - 8) X
  if constexpr (R > 1) asm("" : "+v"(c));
  for (int r = 0; r < R; ++r) a[r] = _mm512_add_epi32(a[r], c);
}

// The lane factors 2^(e - 23) of x block xb.
PYFAST_TARGET_AVX512 inline __m512 lane_factors(const uint8_t* xb) {
  return _mm512_loadu_ps(reinterpret_cast<const float*>(xb + kSliceBytes + 64));
}

// t + a's lanes in float32 times the lane scales s and factors f.
PYFAST_TARGET_AVX512 inline __m512 scale_sums(__m512i a, __m512 s, __m512 f, __m512 t) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(s, f), t);
}

// t + the zero point term of one row: sum over groups of s * z * zsum (zsum = -(sum of
// the group's x as held)), 16 groups per step.
PYFAST_TARGET_AVX512 inline __m512 zero_term(const float* s, const uint8_t* z,
                                             const float* zsum, int64_t G, __m512 t) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g)) - 1u);
    const __m512 zf = _mm512_cvtepi32_ps(_mm512_sub_epi32(  // z - 8 (8 is in the lane sums)
        _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z + g)), _mm512_set1_epi32(8)));
    t = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + g), zf),
                        _mm512_maskz_loadu_ps(m, zsum + g), t);
  }
  return t;
}

// How the lane scales of a block are found (the sweep is compiled once per kind, so the
// block loop has no branch on it): one scale per row, one per block (group 128), or per
// lane (group 32, 64: per_lane's permute). sweep_scales gives per_lane(s, w, b)'s values
// without its run-time branches.
enum class Scales { kRow, kBlock, kLane };

template <Scales kScales>
PYFAST_TARGET_AVX512 inline __m512 sweep_scales(const float* s, const Int4Weight& w,
                                                int64_t b) {
  if constexpr (kScales == Scales::kRow) return _mm512_set1_ps(s[0]);
  else if constexpr (kScales == Scales::kBlock) return _mm512_set1_ps(s[b]);
  else return per_lane(s, w, b);
}

template <Scales kScales>
PYFAST_TARGET_AVX512 void sweep(const uint8_t* xs, const float* zsum, const Int4Weight& w,
                                int64_t n0, int64_t n1, float* out) {
  const int64_t half = w.K / 2, blocks = (half + 63) / 64;
  const int64_t chunks = (blocks * kSliceBlockBytes + kChunkBytes - 1) / kChunkBytes;
  const int64_t chunk = (blocks + chunks - 1) / chunks;                // blocks per chunk
  const int64_t ahead = (kAheadBytes + chunk * 64 - 1) / (chunk * 64);  // in row segments
  const bool pairs = chunks == 1;
  for (int64_t n = n0; n < n1; n += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, n1 - n);
    __m512 tot[kRowGroup];
    for (int64_t r = 0; r < rows; ++r)
      tot[r] = zero_term(w.scales + (n + r) * w.ldg, w.zeros + (n + r) * w.ldg, zsum, w.G,
                         _mm512_setzero_ps());
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
      const int64_t b1 = std::min(blocks, b0 + chunk);
      int64_t r = 0;
      for (; pairs && r + 1 < rows; r += 2) {  // rows r, r + 1: one stream, x read once
        const uint8_t* row = w.packed + (n + r) * half;
        const uint8_t* next = segment_after(w, n, rows, r, b0, chunk, ahead);
        const uint8_t* next2 = segment_after(w, n, rows, r + 1, b0, chunk, ahead);
        const float* scales = w.scales + (n + r) * w.ldg;
        __m512 t0 = tot[r], t1 = tot[r + 1];
        for (int64_t b = b0; b < b1; ++b) {
          prefetch_l2(next + 64 * (b - b0));
          prefetch_l2(next2 + 64 * (b - b0));
          const uint8_t* xb = xs + b * kSliceBlockBytes;
          const __m512 f = lane_factors(xb);
          __m512i a[2];
          lane_sums<2>(row, half, half, b, xb, a);
          t0 = scale_sums(a[0], sweep_scales<kScales>(scales, w, b), f, t0);
          t1 = scale_sums(a[1], sweep_scales<kScales>(scales + w.ldg, w, b), f, t1);
        }
        tot[r] = t0, tot[r + 1] = t1;
      }
      for (; r < rows; ++r) {
        const uint8_t* row = w.packed + (n + r) * half;
        const uint8_t* next = segment_after(w, n, rows, r, b0, chunk, ahead);
        const float* scales = w.scales + (n + r) * w.ldg;
        __m512 t = tot[r];
        for (int64_t b = b0; b < b1; ++b) {
          prefetch_l2(next + 64 * (b - b0));
          const uint8_t* xb = xs + b * kSliceBlockBytes;
          __m512i a[1];
          lane_sums<1>(row, half, half, b, xb, a);
          t = scale_sums(a[0], sweep_scales<kScales>(scales, w, b), lane_factors(xb), t);
        }
        tot[r] = t;
      }
    }
    for (int64_t r = 0; r < rows; ++r) out[n + r] = _mm512_reduce_add_ps(tot[r]);
  }
}

// Whether x's slices fit one chunk (K <= 6144): then a row is read whole in one step.
inline bool one_chunk(const Int4Weight& w) {
  const int64_t blocks = (w.K / 2 + 63) / 64;
  return blocks * kSliceBlockBytes <= kChunkBytes;
}

// The sweep in kStreams far-apart sequential streams, for x in one chunk: rows n0..n1 cut
// into kStreams equal runs (plus a tail of fewer than kStreams rows, left to sweep), and
// step i takes row i of every run whole, sharing each x slice load among them, each
// stream prefetching the row kStreamAheadBytes ahead of it into L2.
// Why (2 threads, M = 1, K = 4096, int4 g128 weights on huge pages rotated through
// 256 MiB; ad hoc, not bench result files):
//   - a C++ model of this loop (the same loads and vpdpbusd per block, x from L1) read
//     41 GB/s as one sequential stream with the prefetch 8 KiB ahead, 48-50 GB/s as 2 or
//     4 far streams with or without it, as fast as a model of W8A8's decode (4 panels,
//     48 GB/s in the same run); so the hardware prefetchers serve several far streams
//     faster than one, however far ahead the software prefetch of one runs;
//   - this kernel with 4 streams against the pairs of adjacent rows (sweep), both builds
//     alternated in one process, 20 rounds, speedup median [quartiles]: 16 KiB ahead
//     1.073 [1.05, 1.16] and 1.155 [1.04, 1.18] at N = 4096 and 11008; 8 KiB ahead
//     1.066-1.088 and 1.019 [1.00, 1.13]; 4 KiB ahead 1.026 (a run whose W8A8 read
//     67 GB/s). Bit-identical outputs (the same lane sums in the same order per row).
//     At K = 11008 (x in two chunks; streams of whole rows read x from L2): 1.003 [0.98,
//     1.05], so there the row groups of sweep stay; two far-apart row groups of sweep in
//     lockstep (x in chunks, each x load shared): 1.060, 0.995, 1.002 in three runs.
//   - bench run 2026-11-25_024140_m1 (commit 45a55ef, 4 streams): int4 1.36x and 1.43x
//     W8A8 at K = 4096 (67% and 71% of the bandwidth), against 1.25x and 1.24x (57%,
//     60%) in the run before this change; K = 11008 unchanged (1.25x);
//   - then, against those 4 streams (same harness, 16 rounds): 2 streams 1.173 [1.11,
//     1.21] and 1.073 [1.00, 1.12] at N = 4096, 1.113 [1.06, 1.15] at N = 11008 (the
//     C++ model read alike with 2 and 4: the 4-row lane sums hold 8 nibble vectors and
//     4 chains in registers, 2 rows half of that); 8 streams 0.84-0.88 (spills); the
//     prefetch 32 KiB ahead 0.96-0.98;
//   - bench run 2026-11-25_032140_m1 (commit 461defc, 2 streams): int4 1.62x and 1.64x
//     W8A8 at K = 4096, at 73% and 77% of the bandwidth (W8A8 read 43-44 GB/s there,
//     47-48 in 024140_m1); K = 11008 1.31x at 61%.
//   - K > 6144: the canonical layout can only be read in row segments here (sweep). The
//     K-split layout (pyfast/layouts/int4_ksplit.py, int4_mm_ksplit in weight_only.cpp)
//     stores each chunk of K <= 6144 columns contiguously, and each chunk then runs
//     this function: bench run 2026-11-25_043600_m1, 11008 x 4096, 1.05x int4_mm
//     (1.37x W8A8, 72% of the bandwidth); paired A/B rounds 1.10-1.23x while W8A8 read
//     47-53 GB/s, 0.98x when it read 75 (the sweep is then bound by its instructions).
constexpr int kStreams = 2;
constexpr int64_t kStreamAheadBytes = 16 * 1024;

template <Scales kScales>
PYFAST_TARGET_AVX512 void sweep_streams(const uint8_t* xs, const float* zsum,
                                        const Int4Weight& w, int64_t n0, int64_t n1,
                                        float* out) {
  const int64_t half = w.K / 2, blocks = (half + 63) / 64;
  const int64_t run = (n1 - n0) / kStreams;                        // rows per stream
  const int64_t ahead = (kStreamAheadBytes + half - 1) / half;     // in rows
  for (int64_t i = 0; i < run; ++i) {
    __m512 t[kStreams];
    const uint8_t* next[kStreams];
    const float* scales[kStreams];
    for (int q = 0; q < kStreams; ++q) {
      const int64_t r = n0 + q * run + i;
      t[q] = zero_term(w.scales + r * w.ldg, w.zeros + r * w.ldg, zsum, w.G, _mm512_setzero_ps());
      next[q] = w.packed + std::min(r + ahead, n1 - 1) * half;  // the next run's start: harmless
      scales[q] = w.scales + r * w.ldg;
    }
    const uint8_t* row = w.packed + (n0 + i) * half;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int q = 0; q < kStreams; ++q) prefetch_l2(next[q] + 64 * b);
      const uint8_t* xb = xs + b * kSliceBlockBytes;
      const __m512 f = lane_factors(xb);
      __m512i a[kStreams];
      lane_sums<kStreams>(row, run * half, half, b, xb, a);
      for (int q = 0; q < kStreams; ++q)
        t[q] = scale_sums(a[q], sweep_scales<kScales>(scales[q], w, b), f, t[q]);
    }
    for (int q = 0; q < kStreams; ++q) out[n0 + q * run + i] = _mm512_reduce_add_ps(t[q]);
  }
  if (n0 + kStreams * run < n1) sweep<kScales>(xs, zsum, w, n0 + kStreams * run, n1, out);
}

template <Scales kScales>
PYFAST_TARGET_AVX512 void sweep_any(const uint8_t* xs, const float* zsum, const Int4Weight& w,
                                    int64_t n0, int64_t n1, float* out) {
  if (one_chunk(w)) return sweep_streams<kScales>(xs, zsum, w, n0, n1, out);
  sweep<kScales>(xs, zsum, w, n0, n1, out);
}

}  // namespace

PYFAST_TARGET_AVX512 void int4_m1_slices(const uint8_t* xs, const float* zsum,
                                         const Int4Weight& w, int64_t n0, int64_t n1,
                                         float* out) {
  if (w.G == 1) return sweep_any<Scales::kRow>(xs, zsum, w, n0, n1, out);
  if (w.group >= 128) return sweep_any<Scales::kBlock>(xs, zsum, w, n0, n1, out);  // 128
  sweep_any<Scales::kLane>(xs, zsum, w, n0, n1, out);
}

#else  // not x86: never selected (active_isa() is kScalar)

bool x_int4_slices(const float* x, const Int4Weight& w, uint8_t* dst, float* zsum) {
  (void)x, (void)w, (void)dst, (void)zsum;
  TORCH_CHECK(false, "x_int4_slices called on a CPU without AVX-512");
}

void int4_m1_slices(const uint8_t* xs, const float* zsum, const Int4Weight& w, int64_t n0,
                    int64_t n1, float* out) {
  (void)xs, (void)zsum, (void)w, (void)n0, (void)n1, (void)out;
  TORCH_CHECK(false, "int4_m1_slices called on a CPU without AVX-512");
}

#endif

}  // namespace weight_only
}  // namespace cpu
}  // namespace pyfast
