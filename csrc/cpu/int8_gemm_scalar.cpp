// Portable micro-kernels of pyfast's int8 GEMM (see int8_gemm.h): plain C++ for
// any CPU (the compiler may vectorise the dot product with the baseline ISA).
// The int32 sums are exact, so no compensation (row_comp = nullptr).
#include "int8_gemm.h"

namespace pyfast {
namespace cpu {
namespace int8_gemm {
namespace {

void tile_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int nr, int64_t kl,
                 int32_t* c, int64_t ldc, bool accumulate, int64_t prefetch) {
  (void)lda;
  (void)ldc;
  (void)prefetch;  // the portable kernel leaves prefetching to the hardware
  for (int j = 0; j < nr; ++j) {
    const int8_t* bj = b + j * ldb;
    int32_t s = 0;
    for (int64_t k = 0; k < kl; ++k) s += int32_t{a[k]} * int32_t{bj[k]};
    c[j] = accumulate ? static_cast<int32_t>(static_cast<uint32_t>(c[j]) + static_cast<uint32_t>(s))
                      : s;
  }
}

template <typename OutT>
void epilogue_scalar(const int32_t* acc, int64_t n, int32_t comp, float a_scale,
                     const float* b_scale, const float* bias, OutT* out) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(
        static_cast<int32_t>(static_cast<uint32_t>(acc[j]) - static_cast<uint32_t>(comp)));
    v = v * a_scale;
    v = v * b_scale[j];
    if (bias != nullptr) v = v + bias[j];
    out[j] = static_cast<OutT>(v);  // c10::Half / c10::BFloat16: round to nearest even
  }
}

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels k = {
      "scalar",
      1,
      {nullptr, &tile_scalar, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
      nullptr,
      &epilogue_scalar<float>,
      &epilogue_scalar<c10::Half>,
      &epilogue_scalar<c10::BFloat16>,
  };
  return k;
}

}  // namespace int8_gemm
}  // namespace cpu
}  // namespace pyfast
