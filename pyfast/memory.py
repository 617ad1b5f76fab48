"""Where pyfast layers keep their packed CPU weights: on transparent huge pages.

A compressed layer at batch 1 reads its whole weight once per call. On 4 KiB pages
that costs a page walk for every 4 KiB once the weight has left the TLB (as it has
after the model's other layers ran), and the hardware prefetchers stop at every page
boundary; on 2 MiB pages neither happens. Every buffer of a pyfast layer
(pyfast.nn) of at least HUGE_PAGE bytes on the CPU is therefore copied once, when it
is set, into memory marked for transparent huge pages (torch.ops.pyfast_C.hugepage_copy,
csrc/cpu/hugepages.cpp): ad hoc on this project's Zen 4 machine, int4_mm at M = 1 ran
1.07-1.13x faster so (csrc/cpu/hugepages.cpp says how it was measured).

It applies where status() is None: Linux with transparent huge pages in "always" or
"madvise" mode, the C++ extension loaded, and PYFAST_NO_HUGEPAGES not set to 1.
Elsewhere buffers stay where PyTorch put them (correct, only the page walks remain);
pyfast.backends() prints the reason. PyTorch's own tensors (an nn.Linear's weight)
stay on 4 KiB pages unless THP_MEM_ALLOC_ENABLE=1 is set before torch starts.

The tensors behave like any other: saving copies the bytes, .to(device) moves them, and
a layer moved back to the CPU (or loaded) gets its buffers placed again.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from . import _ext

HUGE_PAGE = 2 << 20     # bytes; a smaller tensor could not fill one huge page
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> Optional[str]:
    """The selected mode in THP_ENABLED ("always", "madvise", "never"), None if unreadable."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def status() -> Optional[str]:
    """None if layer buffers go on huge pages here, else the reason they do not."""
    if os.environ.get("PYFAST_NO_HUGEPAGES", "") == "1":
        return "disabled by PYFAST_NO_HUGEPAGES=1"
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are Linux-only (this is {sys.platform})"
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        return (f"transparent huge pages are off ({THP_ENABLED}: "
                f"{'unreadable' if mode is None else mode})")
    if not _ext.load():
        return _ext.status()
    return None


def describe() -> str:
    """One line for pyfast.backends()."""
    why = status()
    if why is None:
        return (f"CPU layer buffers of {HUGE_PAGE >> 20} MiB and more: on transparent huge "
                f"pages ({_thp_mode()} mode)")
    return f"CPU layer buffers: on PyTorch's pages, not huge pages: {why}"


def on_hugepages(t: torch.Tensor) -> bool:
    """True if t's memory was placed by to_hugepages."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    return (type(t) is torch.Tensor and t.device.type == "cpu" and _ext.load()
            and bool(torch.ops.pyfast_C.on_hugepages(t)))


def to_hugepages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t on transparent huge pages, or t itself where that does not
    apply: status() is not None, t is not a plain CPU tensor (a GPU, meta or fake
    tensor, a Parameter), is smaller than HUGE_PAGE, is in shared memory, or is placed
    already."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad
            or t.numel() * t.element_size() < HUGE_PAGE or t.is_shared()
            or status() is not None or on_hugepages(t)):
        return t
    return torch.ops.pyfast_C.hugepage_copy(t)
