"""Which weight layout a layer stores: canonical, or the CUDA kernels' tensor-core order.

    "canonical"  the formats of pyfast/formats.py; every backend reads them
    "tc"         int4: fragment order (pyfast/layouts/int4_tc.py, op int4_mm_tc);
                 2:4: sparse-tensor-core metadata (pyfast/layouts/sparse24_tc.py,
                 op sparse24_mm_tc). Made once by the repack ops; only the CUDA C++
                 kernels read it fast, elsewhere the reference undoes the repack per call.
    "auto"       "tc" exactly where the CUDA C++ kernel of the layer's op would run
                 for its weight: a CUDA device with the kernel built (pyfast.backends()),
                 and float16/bfloat16 weights (the kernels multiply in those dtypes);
                 "canonical" everywhere else (CPU, float32 models, no CUDA build).
A layer made on the CPU and moved to a GPU keeps its layout: call
pyfast.repack(model) (or layer.repack("auto")) after .to("cuda").
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch

LAYOUTS = ("canonical", "tc")
_HALF = (torch.float16, torch.bfloat16)


def check(layout, *, allow_auto: bool = True) -> str:
    accepted = LAYOUTS + (("auto",) if allow_auto else ())
    if not isinstance(layout, str) or layout not in accepted:
        raise ValueError(f"layout {layout!r} is not supported; accepted: "
                         + ", ".join(repr(a) for a in accepted))
    return layout


def why_not_tc(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the CUDA C++ kernel of `op` would run a weight on device/dtype, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the weight is on {device.type}; the tensor-core layout is for CUDA devices"
    if dtype not in _HALF:
        return f"the weight is {dtype}; the tensor-core kernels take float16/bfloat16"
    if "cuda" not in dispatch.kernels(op):
        return f"no CUDA C++ kernel is registered for {op}"
    return dispatch.unavailable_reason("cuda", "cuda")


def resolve(layout: str, op: str, device, dtype: torch.dtype) -> str:
    """'auto' -> 'tc' or 'canonical' (see the module docstring); others unchanged."""
    check(layout)
    if layout != "auto":
        return layout
    return "tc" if why_not_tc(op, device, dtype) is None else "canonical"
