// CPU weights on transparent huge pages (2 MiB): pyfast_C::hugepage_copy and
// pyfast_C::on_hugepages, used by pyfast/memory.py for the packed buffers of the layers.
//
// Why: at M = 1 a layer streams its whole weight once per call, 4 KiB page after 4 KiB
// page. The L2 TLB of the Zen 4 machines this project measures on covers 3072 pages
// (12 MiB; AMD, "Software Optimization Guide for the AMD Zen 4 Microarchitecture",
// publication 57647), less than one Llama-7B layer, so every page of a weight read
// after the other layers costs a page walk, and the hardware prefetchers stop at each
// 4 KiB page boundary. The int4 kernels, which do more arithmetic per byte than the int8
// ones, hide this worst: ad hoc (2 threads, M = 1, weights rotated past the L3, in one
// process; not a bench result file), int4_mm ran 1.07-1.13x faster with its weight on
// huge pages, w8a8_mm_vnni 1.00-1.05x, fp32 F.linear 1.03x.
//
// How: an anonymous mmap of the size rounded up to 4 KiB, starting on a 2 MiB boundary,
// marked MADV_HUGEPAGE (Linux, transparent huge pages in "always" or "madvise" mode:
// /sys/kernel/mm/transparent_hugepage/enabled). The kernel backs each whole aligned
// 2 MiB of it with one huge page when it can (the tail past the last 2 MiB boundary
// stays on 4 KiB pages, so no memory is wasted). The tensor owns the mapping: its
// storage's deleter unmaps it, and that deleter is how on_hugepages recognizes it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../checks.h"

namespace pyfast {
namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kPage = 4096;

#ifdef __linux__

struct Mapping {
  void* start;
  size_t length;
};

// The storage deleter (context = the Mapping): unmaps the region.
void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  munmap(m->start, m->length);
  delete m;
}

// A region of `bytes` (rounded up to 4 KiB) starting on a 2 MiB boundary, marked
// MADV_HUGEPAGE; nothing of it is touched yet.
Mapping* map_huge(size_t bytes) {
  const size_t length = (bytes + kPage - 1) / kPage * kPage;
  void* raw = mmap(nullptr, length + kHuge, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  PYFAST_CHECK(raw != MAP_FAILED, "hugepage_copy: mmap of ", length + kHuge,
              " bytes failed: ", std::strerror(errno));
  const auto base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHuge - 1) / kHuge * kHuge;
  // Give back the unaligned head and the tail past `length` (both page multiples).
  if (start > base) munmap(raw, start - base);
  const uintptr_t end = base + length + kHuge;
  if (end > start + length) munmap(reinterpret_cast<void*>(start + length), end - start - length);
  void* p = reinterpret_cast<void*>(start);
  if (madvise(p, length, MADV_HUGEPAGE) != 0) {
    const int err = errno;
    munmap(p, length);
    PYFAST_CHECK(false, "hugepage_copy: madvise(MADV_HUGEPAGE) failed: ", std::strerror(err),
                " (transparent huge pages not available in this kernel?)");
  }
  return new Mapping{p, length};
}

#endif

// t (CPU, any dtype and strides, at least one element) -> a contiguous copy of t whose
// data starts on a 2 MiB boundary of a MADV_HUGEPAGE mapping (Linux only).
at::Tensor hugepage_copy(const at::Tensor& t) {
  check_device(t, "t", at::kCPU);
  PYFAST_CHECK(t.numel() > 0, "hugepage_copy: t is empty (shape ", t.sizes(), ")");
#ifdef __linux__
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  Mapping* m = map_huge(bytes);
  at::Tensor out = at::for_blob(m->start, t.sizes())
                       .context(m, &unmap)
                       .options(t.options())
                       .make_tensor();
  out.copy_(t);
  return out;
#else
  PYFAST_CHECK(false, "hugepage_copy: transparent huge pages are Linux-only");
#endif
}

// True if t's storage was made by hugepage_copy.
bool on_hugepages(const at::Tensor& t) {
#ifdef __linux__
  return t.has_storage() && t.storage().data_ptr().get_deleter() == &unmap;
#else
  (void)t;
  return false;
#endif
}

}  // namespace
}  // namespace pyfast

TORCH_LIBRARY_FRAGMENT(pyfast_C, m) {
  // t CPU tensor (any dtype, strides; not empty) -> contiguous copy of t on a 2 MiB
  // aligned MADV_HUGEPAGE mapping that the returned tensor owns (Linux only).
  m.def("hugepage_copy(Tensor t) -> Tensor");
  // True if t's storage was made by hugepage_copy.
  m.def("on_hugepages(Tensor t) -> bool");
}

TORCH_LIBRARY_IMPL(pyfast_C, CPU, m) {
  m.impl("hugepage_copy", &pyfast::hugepage_copy);
}

TORCH_LIBRARY_IMPL(pyfast_C, CompositeExplicitAutograd, m) {
  m.impl("on_hugepages", &pyfast::on_hugepages);
}
