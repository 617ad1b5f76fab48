// parallel_for_with_state: at::parallel_for whose workers run with the caller's
// thread-local state (grad mode, inference mode, dispatch-key sets; ATen's
// ThreadLocalState), for loop bodies that call ATen ops.
//
// Why: with ATen's OpenMP backend (ATen/ParallelOpenMP.h) the worker threads keep their
// own thread-local state, so an ATen op on a worker does not see the caller's
// torch.inference_mode(). The dense-panel paths (dequant_mm.h, sparse24.cpp) write
// at::mm_out into a slice of the output, which under inference_mode is an inference
// tensor: on a worker that in-place write raised "Inplace update to inference tensor
// outside InferenceMode is not allowed" (tests/test_inference_mode.py). Bodies that only
// read and write raw pointers need none of this and keep plain at::parallel_for.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

namespace pyfast {
namespace cpu {

template <typename F>
void parallel_for_with_state(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;  // the caller's
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// Rows per panel of the dense-panel paths (dequant_mm.h, sparse24.cpp): at most
// max_rows, and a number of panels that is a multiple of the thread count. Each thread's
// at::mm runs single-threaded inside the parallel region, so fewer panels than threads,
// or a remainder, leaves a core idle: int4_mm at K = N = 768, M = 64 (one 4 MiB panel, all
// on one thread) ran 1.4-1.7x slower than float32 F.linear on 2 threads, and at K = 768,
// N = 3072, M = 512 (3 panels: 2 on one thread) 1.6-1.9x (ad hoc, not bench files; the
// commit that added this gives the times after). A multiple of 16 rows.
inline int64_t balanced_panel_rows(int64_t N, int64_t max_rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cap = std::max<int64_t>(16, max_rows / 16 * 16);
  const int64_t rounds = (N + cap * threads - 1) / (cap * threads);  // panels per thread
  const int64_t panels = std::max<int64_t>(1, rounds * threads);
  return std::max<int64_t>(16, ((N + panels - 1) / panels + 15) / 16 * 16);
}

}  // namespace cpu
}  // namespace pyfast
