// CPU kernels of the weight-only ops (float activations x quantized weights):
//
//   pyfast_C::int8_weight_mm(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor
//     x       : float32 / bfloat16 / float16 [M, K], any strides
//     w_int8  : int8 [N, K] (any strides; made contiguous)
//     w_scale : [N] any float dtype (used as float32)
//     bias    : [N] any float dtype, or None
//     out     : x.dtype [M, N] = ((x @ float(w_int8).T) * w_scale + bias), in float32
//   pyfast_C::int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros,
//                     int group_size, Tensor? bias) -> Tensor
//     packed  : uint8 [N, K/2] (low nibble = even k), scales [N, G] any float dtype,
//     zeros   : uint8 [N, G], group_size 32 / 64 / 128 or -1 (per channel, G = 1)
//     out     : x.dtype [M, N] = x @ ((q - zero) * scale).T + bias, in float32
// Layouts: pyfast/formats.py; oracle: pyfast/reference.py.
//
// Which path (a visible rule, per call):
//   int4_mm, bfloat16 x, M <= kBf16DotMaxM, active ISA avx512 and cpu::has_bf16_dot():
//     the vdpbf16ps kernel (weight_only_bf16dot.cpp) on bfloat16 x pairs. float32 x
//     too when PyTorch allows bfloat16 inside float32 matmuls
//     (fp32_matmul_allows_bf16: torch.set_float32_matmul_precision("medium")): x is
//     rounded to bfloat16 once, the output stays float32. Unless x (so rounded) holds a
//     non-finite value, one of magnitude 2^116 or more, or a subnormal one
//     (x_int4_bf16dot), which go on to the next rules.
//   int4_mm, M = 1, active ISA avx512 (other dtypes, or bfloat16 x where the rule above
//     does not apply): x in int8 slices and vpdpbusd (weight_only_slices.cpp), unless
//     PYFAST_NO_INT8_SLICES is set or x has a value the slices cannot hold (non-finite,
//     or a nonzero 8-k lane below 2^-64 in magnitude), which go on to the next rule.
//   M <= small_m_limit(x.dtype): the small-M kernels (weight_only.h) for the ISA
//     that pyfast::cpu::active_isa() names (avx512 / avx2 / scalar); x is
//     converted to float32 (exact) and every weight byte is read once per tile
//     of 8 (AVX-512) / 4 (AVX2) rows; threads split N. Memory-bound at M = 1.
//   otherwise: each thread dequantizes panels of weight rows (a few MiB, so
//     they stay in L2/L3) with the active ISA's dequant and multiplies them with
//     at::mm (single-threaded inside the parallel region): float32 panels for
//     float32 / float16 x, bfloat16 panels (scale folded in, as F.linear in
//     bfloat16 rounds its weight) for bfloat16 x, which runs oneDNN's bf16 GEMM.
//     at::mm chooses its own instructions; the ISA setting governs the dequant.
// Accuracy: float32 accumulation everywhere; each dequantized weight is the
// reference's float32 weight, except in bfloat16 panels (rounded to bfloat16:
// within twice PyTorch's own bfloat16 F.linear error, tests/_helpers.py).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>  // TORCH_VERSION_* (PyTorch >= 2.9)
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "../checks.h"
#include "dequant_mm.h"
#include "weight_only_kernels.h"

namespace pyfast {
namespace cpu {
namespace weight_only {

// --- scalar kernels (any CPU) ------------------------------------------------------------
// Each sum is kept in 16 partial sums (k mod 16, like the 16 lanes of the AVX-512
// kernels) added pairwise at the end: a single running sum of K products would
// have an error growing like K ulps, several times PyTorch's own.

namespace {
constexpr int kParts = 16;

inline float sum_parts(float* part) {
  for (int h = kParts / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) part[l] += part[l + h];
  return part[0];
}
}  // namespace

void int8_small_scalar(const float* xp, int64_t M, const Int8Weight& w, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w.w + n * w.K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * w.K;
      float part[kParts] = {};
      for (int64_t k = 0; k < w.K; ++k) part[k % kParts] += xr[k] * static_cast<float>(wr[k]);
      out[m * ldo + n] = sum_parts(part) * w.scale[n];
    }
  }
}

void int4_small_scalar(const float* xp, int64_t ld, int64_t M, const Int4Weight& w,
                       int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int64_t L = 8;  // x layout of the scalar path: blocks of 16 k (weight_only.h)
  const int64_t half = w.K / 2, gbytes = w.group / 2;
  std::vector<float> row(ld, 0.0f);  // the row's dequantized weights, in x's block order
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.packed + n * half;
    for (int64_t j = 0; j < half; ++j) {
      const int64_t g = j / gbytes;
      const float z = static_cast<float>(w.zeros[n * w.ldg + g]), s = w.scales[n * w.ldg + g];
      const int64_t at = (j / L) * 2 * L + j % L;
      row[at] = (static_cast<float>(p[j] & 15) - z) * s;
      row[at + L] = (static_cast<float>(p[j] >> 4) - z) * s;
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * ld;
      float part[kParts] = {};
      for (int64_t i = 0; i < ld; ++i) part[i % kParts] += xr[i] * row[i];  // padding is 0 * 0
      out[m * ldo + n] = sum_parts(part);
    }
  }
}

PYFAST_WO_DEQUANT_DEFINE(scalar, )

int64_t int4_panel_lanes(Isa isa) {
#if PYFAST_X86
  if (isa == Isa::kAvx512) return 16;
#endif
  (void)isa;
  return 0;
}

XBlocks int4_small_layout(Isa isa) {
#if PYFAST_X86
  if (isa == Isa::kAvx512) return {16, 8};
#endif
  (void)isa;
  return {8, 2};
}

// --- per-ISA dispatch of the panel dequant ---------------------------------------------

#define PYFAST_WO_DISPATCH(name, W, T)                                         \
  void name(Isa isa, const W& w, int64_t n0, int64_t n1, T* dst) {             \
    switch (isa) {                                                             \
      case Isa::kAvx512: return name##_avx512(w, n0, n1, dst);                 \
      case Isa::kAvx2: return name##_avx2(w, n0, n1, dst);                     \
      default: return name##_scalar(w, n0, n1, dst);                           \
    }                                                                          \
  }
PYFAST_WO_DISPATCH(dequant_int8_f32, Int8Weight, float)
PYFAST_WO_DISPATCH(dequant_int8_bf16, Int8Weight, uint16_t)
PYFAST_WO_DISPATCH(dequant_int4_f32, Int4Weight, float)
PYFAST_WO_DISPATCH(dequant_int4_bf16, Int4Weight, uint16_t)
#undef PYFAST_WO_DISPATCH

}  // namespace weight_only
}  // namespace cpu

namespace {

using cpu::Isa;
using namespace cpu::weight_only;
using namespace cpu::dequant_mm;

// Largest M that takes the small-M kernels (measured on Zen 4, 2 threads: above it
// the panel + at::mm path is as fast or faster). bfloat16 crosses earlier: the
// small kernels compute in float32 FMAs, while oneDNN's bfloat16 GEMM (vdpbf16ps)
// does twice the multiply-adds per instruction. The scalar kernels are slow, so
// the scalar ISA hands over to at::mm early.
int64_t small_m_limit(at::ScalarType x_dtype, Isa isa) {
  if (isa == Isa::kScalar) return 4;
  return x_dtype == at::kBFloat16 ? 4 : 32;
}

// Largest M of the int4 bf16-dot kernel (bfloat16 x, AVX512_BF16): it converts each
// weight block once per tile of 4 x rows and multiplies with vdpbf16ps, so it keeps
// ahead of the bfloat16 panels + oneDNN GEMM further than the float32 kernels do.
constexpr int64_t kBf16DotMaxM = 16;

// Whether PyTorch lets float32 matmuls on the CPU compute in bfloat16 internally:
// torch.backends.mkldnn.matmul.fp32_precision == "bf16", which
// torch.set_float32_matmul_precision("medium") also sets (PyTorch >= 2.9, docs
// notes/mkldnn "Bfloat16 (BF16) on MKLDNN backend"; F.linear in float32 then runs
// oneDNN's bfloat16 GEMM). Older PyTorch: never (the float32 kernels).
bool fp32_matmul_allows_bf16() {
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 9)
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN,
                                              at::Float32Op::MATMUL) == at::Float32Precision::BF16;
#else
  return false;
#endif
}

// Whether int4_mm at M = 1 may run the int8-slice kernel (weight_only_slices.cpp): the
// environment variable PYFAST_NO_INT8_SLICES is unset (read on every call; the tests
// set it to reach the float32 kernel that runs otherwise).
bool int8_slices_enabled() { return std::getenv("PYFAST_NO_INT8_SLICES") == nullptr; }

// Float32 copy of x [M, K] (natural order) unless x already is contiguous float32.
at::Tensor x_float32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

// x [M, K] -> `dtype` [M, ld] in the int4 block order `blocks` (weight_only.h): zero
// padded to ld, then each block of L * P columns, seen as [L][P], is transposed to
// [P][L]; for P = 2, [x0 x1 x2 ... ] becomes [x0 x2 x4 ... x1 x3 ...] (one torch
// copy; exact, a permutation).
at::Tensor x_int4_blocks(const at::Tensor& x, XBlocks blocks, at::ScalarType dtype) {
  const int64_t M = x.size(0), K = x.size(1), B = blocks.lanes * blocks.per_lane;
  const int64_t ld = (K + B - 1) / B * B;
  at::Tensor padded = at::zeros({M, ld}, x.options().dtype(dtype));
  padded.narrow(1, 0, K).copy_(x);
  return padded.view({M, ld / B, blocks.lanes, blocks.per_lane})
      .transpose(2, 3)
      .contiguous()
      .view({M, ld});
}

// The small-M int4 input in one pass over x (any float dtype, any strides), without
// the several torch ops of x_int4_blocks (their overhead is most of a M = 1 call on a
// small layer): xp [M, ld] float32 in the block order `blocks`, zero padded.
void x_int4_small(const at::Tensor& x, XBlocks blocks, int64_t ld, float* xp) {
  const int64_t M = x.size(0), K = x.size(1), L = blocks.lanes, P = blocks.per_lane;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "x_int4_small", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* xr = src + m * s0;
      float* d = xp + m * ld;
      std::fill(d, d + ld, 0.0f);  // the padding past K
      for (int64_t b = 0; b * L * P < K; ++b)  // k = b*L*P + P*i + p -> d[b*L*P + p*L + i]
        for (int64_t i = 0; i < L; ++i)
          for (int64_t p = 0, k = b * L * P + P * i; p < P && k < K; ++p, ++k)
            d[b * L * P + p * L + i] = static_cast<float>(xr[k * s1]);
    }
  });
}

// The bf16-dot int4 input (weight_only.h, int4_small_bf16dot) from bfloat16 x [M, K]
// (any strides): xq [M, ld] bfloat16 pairs and xs [M, ld / 8] float32 lane sums, zero
// padded to ld (a multiple of 128). False, and the call takes the next rule, when x holds
// a value the kernel cannot take: it sums (128 + q) x over a lane of 8 k and subtracts
// (128 + z) times the lane's x sum (weight_only_bf16dot.cpp), so an inf there gives
// inf - inf = NaN where the reference gives +-inf, and an |x| from 2^116 up (float32 max
// / 4096, against 2 x 8 x 143 for the two terms) can overflow a lane term although the
// output is finite. NaN is refused with inf (one test on the exponent bits). So is a
// subnormal x: vdpbf16ps takes subnormal inputs as zero (Intel SDM vol. 2, VDPBF16PS:
// "DAZ" regardless of MXCSR) while the float lane sum keeps them, so the two terms no
// longer cancel (outputs 30-3000x the true ones, of either sign).
constexpr uint16_t kBf16DotAbsBitsLimit = 0x7980;   // bfloat16 bits of 2^116

bool x_int4_bf16dot(const at::Tensor& x, int64_t ld, uint16_t* xq, float* xs) {
  const int64_t M = x.size(0), K = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  auto value = [](uint16_t bits) {  // bfloat16 -> float32, exact
    const uint32_t u = uint32_t{bits} << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  uint16_t largest = 0;   // of |x|'s bits: for non-negative floats their order is the values'
  bool subnormal = false;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = src + m * s0;
    for (int64_t k0 = 0; k0 < ld; k0 += 8) {  // lane i = (k0 % 128) / 8 of block k0 / 128
      const int64_t b = k0 / 128, i = (k0 % 128) / 8;
      float sum = 0.0f;
      for (int64_t p = 0; p < 8; ++p) {
        const int64_t k = k0 + p;
        const uint16_t bits = k < K ? xr[k * s1] : uint16_t{0};
        largest = std::max<uint16_t>(largest, bits & 0x7FFF);
        subnormal |= (bits & 0x7F80) == 0 && (bits & 0x7F) != 0;
        xq[m * ld + b * 128 + 32 * (p % 4) + 2 * i + p / 4] = bits;
        sum += value(bits);
      }
      xs[m * (ld / 8) + k0 / 8] = sum;
    }
  }
  return largest < kBf16DotAbsBitsLimit && !subnormal;
}

// Threads split N in units of 4 rows (the widest small-M tile).
template <typename Fn>
void split_n(int64_t N, int64_t work_per_row, Fn fn) {
  const int64_t units = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(4 * work_per_row, 1));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    fn(4 * u0, std::min(N, 4 * u1));
  });
}

// --- int8_weight_mm -------------------------------------------------------------------------

at::Tensor int8_weight_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  check_x(x_in);
  check_device(w_in, "w_int8", at::kCPU);
  check_dtype(w_in, "w_int8", {at::kChar});
  check_dim(w_in, "w_int8", 2);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  check_size(w_in, "w_int8", 1, K, "x.size(1) = K");
  check_float(w_scale, "w_scale");
  check_dim(w_scale, "w_scale", 1);
  check_size(w_scale, "w_scale", 0, N, "w_int8.size(0) = N");
  const at::Tensor b = bias_f32(bias, N, "w_int8.size(0) = N");

  at::Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return b.defined() ? out.copy_(b.expand({M, N})) : out.zero_();  // empty sum
  const at::Tensor wc = w_in.contiguous();
  const at::Tensor sc = w_scale.to(at::kFloat).contiguous();
  const Int8Weight w{wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), N, K};
  const Isa isa = cpu::active_isa();
  const float* bp = ptr_or_null(b);

  if (M <= small_m_limit(x_in.scalar_type(), isa)) {
    const at::Tensor xf = x_float32(x_in);
    at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, xf.options());
    const float* xp = xf.const_data_ptr<float>();
    float* ap = acc.mutable_data_ptr<float>();
    split_n(N, M * K, [&](int64_t n0, int64_t n1) {
      switch (isa) {
        case Isa::kAvx512: return int8_small_avx512(xp, M, w, n0, n1, ap, N);
        case Isa::kAvx2: return int8_small_avx2(xp, M, w, n0, n1, ap, N);
        default: return int8_small_scalar(xp, M, w, n0, n1, ap, N);
      }
    });
    finish_f32(acc, bp, out);
    return out;
  }

  auto dq_f32 = [&](int64_t n0, int64_t n1, float* d) { dequant_int8_f32(isa, w, n0, n1, d); };
  auto dq_bf16 = [&](int64_t n0, int64_t n1, uint16_t* d) {
    dequant_int8_bf16(isa, w, n0, n1, d);
  };
  if (x_in.scalar_type() == at::kBFloat16) {  // scale folded into the bf16 panel
    panel_mm(x_in.contiguous(), N, K, out, dq_f32, dq_bf16);
    if (bp != nullptr) {
      at::BFloat16* o = out.mutable_data_ptr<at::BFloat16>();
      epilogue<at::BFloat16, at::BFloat16>(o, M, N, nullptr, bp, o);
    }
    return out;
  }
  const at::Tensor xf = x_float32(x_in);
  at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, xf.options());
  panel_mm(xf, N, K, acc, dq_f32, dq_bf16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "pyfast_C::int8_weight_mm", [&] {
    epilogue<float, scalar_t>(acc.const_data_ptr<float>(), M, N, w.scale, bp,
                              out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// --- int4_mm and int4_mm_ksplit ------------------------------------------------------------
//
// Both run the weight as chunks along K: ws[c] holds columns [c Kc, (c + 1) Kc) as an int4
// weight of Kc columns (weight_only.h). int4_mm has one chunk, the whole weight.
// int4_mm_ksplit (pyfast/layouts/int4_ksplit.py) has C, each a contiguous [N, Kc/2] block:
// at M = 1 a thread then reads its rows of chunk 0 as long sequential streams with x's
// slices for Kc columns in L1, then those of chunk 1. In the canonical layout a K whose
// slices overflow L1 (K > 6144) is read as segments of each row (weight_only_slices.cpp,
// sweep), about 37 against 48 GB/s in a C++ model of the two access patterns (2 threads,
// K = 11008, weights rotated past the L3; ad hoc). Each path below runs every chunk into
// float32 sums (chunk 0 into acc, chunk c > 0 into parts[c - 1]) and adds them in chunk
// order, each thread for its own columns.

// acc[m, n] += parts[p][m, n] for p < P, m < M, n in [n0, n1) (parts [P, M, N]).
void add_parts(float* acc, const float* parts, int64_t P, int64_t M, int64_t N, int64_t n0,
               int64_t n1) {
  for (int64_t p = 0; p < P; ++p)
    for (int64_t m = 0; m < M; ++m) {
      const float* src = parts + (p * M + m) * N;
      float* dst = acc + m * N;
      for (int64_t n = n0; n < n1; ++n) dst[n] += src[n];
    }
}

// x [M, K] (K = C Kc, M, N, K > 0), the chunks ws, bias (float32 [N] or undefined) ->
// out [M, N] in x.dtype.
at::Tensor int4_run(const at::Tensor& x_in, const std::vector<Int4Weight>& ws,
                    const at::Tensor& b) {
  const int64_t M = x_in.size(0), K = x_in.size(1), N = ws[0].N;
  const int64_t C = static_cast<int64_t>(ws.size()), Kc = ws[0].K;
  at::Tensor out = at::empty({M, N}, x_in.options());
  const Isa isa = cpu::active_isa();
  const float* bp = ptr_or_null(b);
  // the float32 sums: acc (out itself for float32 out) and the parts of chunks 1..C-1
  auto sums = [&](const at::TensorOptions& f32) {
    at::Tensor acc = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, f32);
    at::Tensor parts = C > 1 ? at::empty({C - 1, M, N}, f32) : at::Tensor();
    return std::make_pair(acc, parts);
  };
  auto dst = [&](float* ap, float* pp, int64_t c) { return c == 0 ? ap : pp + (c - 1) * M * N; };

  const at::ScalarType dt = x_in.scalar_type();
  if ((dt == at::kBFloat16 || (dt == at::kFloat && fp32_matmul_allows_bf16())) &&
      M <= kBf16DotMaxM && isa == Isa::kAvx512 && cpu::has_bf16_dot()) {
    // float32 x here: rounded to bfloat16 once (the internal precision the user allowed),
    // the float32 sums are the output (no bfloat16 rounding of out).
    const at::Tensor xb = dt == at::kBFloat16 ? x_in : x_in.to(at::kBFloat16);
    const int64_t ld = (Kc + 127) / 128 * 128;
    at::Tensor xq = at::empty({C, M, ld}, xb.options());
    at::Tensor xs = at::empty({C, M, ld / 8}, xb.options().dtype(at::kFloat));
    uint16_t* xqp = reinterpret_cast<uint16_t*>(xq.mutable_data_ptr<at::BFloat16>());
    float* xsp = xs.mutable_data_ptr<float>();
    bool ok = true;
    for (int64_t c = 0; c < C && ok; ++c)
      ok = x_int4_bf16dot(xb.narrow(1, c * Kc, Kc), ld, xqp + c * M * ld, xsp + c * M * (ld / 8));
    if (ok) {
      auto [acc, parts] = sums(xs.options());
      float* ap = acc.mutable_data_ptr<float>();
      float* pp = C > 1 ? parts.mutable_data_ptr<float>() : nullptr;
      split_n(N, M * K, [&](int64_t n0, int64_t n1) {
        for (int64_t c = 0; c < C; ++c)
          int4_small_bf16dot(xqp + c * M * ld, xsp + c * M * (ld / 8), ld, M, ws[c], n0, n1,
                             dst(ap, pp, c), N);
        add_parts(ap, pp, C - 1, M, N, n0, n1);
      });
      finish_f32(acc, bp, out);
      return out;
    }  // else x has a non-finite or too large value: the rules below
  }
  if (M == 1 && isa == Isa::kAvx512 && int8_slices_enabled()) {
    // x in int8 slices (weight_only_slices.cpp) unless x cannot be represented.
    const at::Tensor xf = x_float32(x_in);
    const int64_t xbytes = (Kc + 127) / 128 * kSliceBlockBytes, Gc = ws[0].G;
    at::Tensor xs = at::empty({C * xbytes}, xf.options().dtype(at::kByte));
    at::Tensor zs = at::empty({C * Gc}, xf.options());
    uint8_t* xsp = xs.mutable_data_ptr<uint8_t>();
    float* zsp = zs.mutable_data_ptr<float>();
    bool ok = true;
    for (int64_t c = 0; c < C && ok; ++c)
      ok = x_int4_slices(xf.const_data_ptr<float>() + c * Kc, ws[c], xsp + c * xbytes,
                         zsp + c * Gc);
    if (ok) {
      auto [acc, parts] = sums(xf.options());
      float* ap = acc.mutable_data_ptr<float>();
      float* pp = C > 1 ? parts.mutable_data_ptr<float>() : nullptr;
      split_n(N, K, [&](int64_t n0, int64_t n1) {
        for (int64_t c = 0; c < C; ++c)
          int4_m1_slices(xsp + c * xbytes, zsp + c * Gc, ws[c], n0, n1, dst(ap, pp, c));
        add_parts(ap, pp, C - 1, 1, N, n0, n1);
      });
      finish_f32(acc, bp, out);
      return out;
    }
  }
  if (M <= small_m_limit(x_in.scalar_type(), isa)) {
    const XBlocks blocks = int4_small_layout(isa);
    const int64_t B = blocks.lanes * blocks.per_lane, ld = (Kc + B - 1) / B * B;
    const at::Tensor xp = at::empty({C, M, ld}, x_in.options().dtype(at::kFloat));
    float* xpp = xp.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c)
      x_int4_small(x_in.narrow(1, c * Kc, Kc), blocks, ld, xpp + c * M * ld);
    auto [acc, parts] = sums(xp.options());
    float* ap = acc.mutable_data_ptr<float>();
    float* pp = C > 1 ? parts.mutable_data_ptr<float>() : nullptr;
    split_n(N, M * K, [&](int64_t n0, int64_t n1) {
      for (int64_t c = 0; c < C; ++c) {
        const float* xc = xpp + c * M * ld;
        float* d = dst(ap, pp, c);
        switch (isa) {
          case Isa::kAvx512: int4_small_avx512(xc, ld, M, ws[c], n0, n1, d, N); break;
          case Isa::kAvx2: int4_small_avx2(xc, ld, M, ws[c], n0, n1, d, N); break;
          default: int4_small_scalar(xc, ld, M, ws[c], n0, n1, d, N);
        }
      }
      add_parts(ap, pp, C - 1, M, N, n0, n1);
    });
    finish_f32(acc, bp, out);
    return out;
  }

  // Large M: panels of the dequantized weight; with chunks, each row of each chunk
  // dequantized straight into its columns of the panel (one row per call: the row stride
  // of a call's output is then moot). Kc is a multiple of 32 (int4_mm_ksplit_cpu checks),
  // the columns that the AVX-512 panel order permutes within: the chunks' orders join
  // into K's, and no chunk's row is padded.
  auto dq = [&](auto dequant, int64_t n0, int64_t n1, auto* d) {
    if (C == 1) return dequant(isa, ws[0], n0, n1, d);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < C; ++c) dequant(isa, ws[c], n, n + 1, d + (n - n0) * K + c * Kc);
  };
  auto dq_f32 = [&](int64_t n0, int64_t n1, float* d) {
    dq([](Isa i, const Int4Weight& w, int64_t a, int64_t z, float* p) {
      dequant_int4_f32(i, w, a, z, p);
    }, n0, n1, d);
  };
  auto dq_bf16 = [&](int64_t n0, int64_t n1, uint16_t* d) {
    dq([](Isa i, const Int4Weight& w, int64_t a, int64_t z, uint16_t* p) {
      dequant_int4_bf16(i, w, a, z, p);
    }, n0, n1, d);
  };
  // x's columns in the panel's k order (a permutation: exact in any dtype).
  const int64_t lanes = int4_panel_lanes(isa);
  const at::Tensor x_panel =
      lanes == 0 ? x_in : x_int4_blocks(x_in, {lanes, 2}, x_in.scalar_type());
  return panel_path(x_panel, N, bp, out, dq_f32, dq_bf16);
}

// The empty results: M or N is 0, or K is 0 (the bias alone: an empty sum).
std::optional<at::Tensor> int4_empty(const at::Tensor& x, int64_t N, const at::Tensor& b) {
  const int64_t M = x.size(0), K = x.size(1);
  if (M != 0 && N != 0 && K != 0) return std::nullopt;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  return b.defined() ? out.copy_(b.expand({M, N})) : out.zero_();
}

// Checks x and the packed weight's device, dtype and dims; returns G (groups per row).
int64_t check_int4_call(const at::Tensor& x, const at::Tensor& w, const char* w_name,
                        int64_t w_dim, int64_t group_size, const char* why_even) {
  check_x(x);
  const int64_t G = check_int4_groups(group_size, x.size(1), 2, why_even);
  check_device(w, w_name, at::kCPU);
  check_dtype(w, w_name, {at::kByte});
  check_dim(w, w_name, w_dim);
  return G;
}

at::Tensor int4_mm_cpu(const at::Tensor& x_in, const at::Tensor& packed_in,
                       const at::Tensor& scales_in, const at::Tensor& zeros_in,
                       int64_t group_size, const std::optional<at::Tensor>& bias) {
  const int64_t G = check_int4_call(x_in, packed_in, "packed", 2, group_size,
                                    "int4_mm needs an even K");
  const int64_t K = x_in.size(1), N = packed_in.size(0);
  const int64_t group = group_size == -1 ? K : group_size;
  check_size(packed_in, "packed", 1, K / 2, "x.size(1) / 2 = K/2");
  check_group_params(scales_in, zeros_in, N, G);
  const at::Tensor b = bias_f32(bias, N, "packed.size(0) = N");
  if (auto empty = int4_empty(x_in, N, b)) return *empty;
  const at::Tensor pc = packed_in.contiguous(), zc = zeros_in.contiguous();
  const at::Tensor sc = scales_in.to(at::kFloat).contiguous();
  return int4_run(x_in, {Int4Weight{pc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(),
                                    zc.const_data_ptr<uint8_t>(), N, K, group, G, G}}, b);
}

at::Tensor int4_mm_ksplit_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                              const at::Tensor& scales_in, const at::Tensor& zeros_in,
                              int64_t group_size, const std::optional<at::Tensor>& bias) {
  const int64_t G = check_int4_call(x_in, w_in, "w_ks", 3, group_size,
                                    "int4_mm_ksplit needs an even K");
  const int64_t K = x_in.size(1), C = w_in.size(0), N = w_in.size(1), Kc = 2 * w_in.size(2);
  PYFAST_CHECK(C >= 1 && C * Kc == K, "w_ks has shape ", w_in.sizes(),
               "; accepted: [C, N, K / (2 C)] with C >= 1 and K = x.size(1) = ", K);
  const int64_t group = group_size == -1 ? Kc : group_size;  // per channel: per chunk
  PYFAST_CHECK(Kc % 32 == 0 && (group_size == -1 || Kc % group_size == 0), "w_ks has chunks "
               "of ", Kc, " columns, not a multiple of 32 and of group_size ", group_size,
               "; accepted: chunks of whole groups and of a multiple of 32 columns (the "
               "AVX-512 panels permute x within blocks of 32)");
  check_group_params(scales_in, zeros_in, N, G);
  const at::Tensor b = bias_f32(bias, N, "w_ks.size(1) = N");
  if (auto empty = int4_empty(x_in, N, b)) return *empty;
  const at::Tensor pc = w_in.contiguous(), zc = zeros_in.contiguous();
  const at::Tensor sc = scales_in.to(at::kFloat).contiguous();
  const int64_t Gc = group_size == -1 ? 1 : Kc / group;           // groups per chunk
  const int64_t step = group_size == -1 ? 0 : Gc;                   // chunk c's first group
  std::vector<Int4Weight> ws;
  for (int64_t c = 0; c < C; ++c)
    ws.push_back(Int4Weight{pc.const_data_ptr<uint8_t>() + c * N * (Kc / 2),
                            sc.const_data_ptr<float>() + c * step,
                            zc.const_data_ptr<uint8_t>() + c * step, N, Kc, group, Gc, G});
  return int4_run(x_in, ws, b);
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // x float32/bfloat16/float16 [M, K] (any strides), w_int8 int8 [N, K], w_scale [N]
  // and bias [N] (or None) of any float dtype -> out x.dtype [M, N] =
  //   (x @ w_int8.T) * w_scale + bias, accumulated in float32.
  m.def("int8_weight_mm(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor");
  // x as above, packed uint8 [N, K/2] (low nibble = even k), scales [N, G] any float
  // dtype, zeros uint8 [N, G], group_size 32/64/128/-1, bias [N] or None ->
  //   out x.dtype [M, N] = x @ ((q - zero) * scale).T + bias, accumulated in float32.
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias) -> Tensor");
  // int4_mm with packed in K chunks, w_ks uint8 [C, N, K / (2 C)] (chunk c: the packed
  // columns [c K/C, (c + 1) K/C), pyfast/layouts/int4_ksplit.py); scales, zeros, bias and
  // out as int4_mm (group_size -1: one scale per row, as there).
  m.def("int4_mm_ksplit(Tensor x, Tensor w_ks, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("int8_weight_mm", &pyfast::int8_weight_mm_cpu);
  m.impl("int4_mm", &pyfast::int4_mm_cpu);
  m.impl("int4_mm_ksplit", &pyfast::int4_mm_ksplit_cpu);
}
