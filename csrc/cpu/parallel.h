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

}  // namespace cpu
}  // namespace pyfast
