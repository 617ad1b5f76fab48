"""Triton kernels (kernels/, installed as pyfast.kernels) as backends of the ops.

Triton runs on NVIDIA GPUs; on CPU tensors it runs only under the Triton
interpreter (TRITON_INTERPRET=1, which must be set before the kernels are
imported) and only when forced: that is how the test suite checks these
kernels on machines without a GPU. The kernel modules are imported on first
use, so `import pyfast` never imports Triton.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

from .. import dispatch

# op -> (module in pyfast.kernels, function name); each function takes the op's
# arguments exactly as its schema lists them. A module may also define
# `supports_<op>(*args) -> Optional[str]` for inputs its kernel cannot take.
KERNELS = {
    "quantize_per_token": ("quantize", "quantize_per_token"),
    "quantize_static": ("quantize", "quantize_static"),
    "int8_mm": ("int8_mm", "int8_mm"),
    "w8a8_mm": ("int8_mm", "w8a8_mm"),
    "int8_weight_mm": ("weight_only", "int8_weight_mm"),
    "int4_mm": ("weight_only", "int4_mm"),
    "sparse24_mm": ("sparse24", "sparse24_mm"),
    "sparse24_int4_mm": ("sparse24_int4", "sparse24_int4_mm"),
}


def reason_triton(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"GPU compute capability {major}.{minor} < 8.0 (int8/bf16 tl.dot needs sm_80+)"
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") == "1":
            return None
        return "on CPU Triton runs only in its interpreter (set TRITON_INTERPRET=1)"
    return f"Triton does not run on {device_type}"


def _module(name: str):
    return importlib.import_module(f"pyfast.kernels.{name}")


def _lazy(module: str, fn: str) -> Callable:
    def call(*args):
        return getattr(_module(module), fn)(*args)
    call.__name__ = f"triton_{fn}"
    return call


def _lazy_supports(module: str, op: str) -> Callable[..., Optional[str]]:
    def supports(*args) -> Optional[str]:
        check = getattr(_module(module), f"supports_{op}", None)
        return None if check is None else check(*args)
    return supports


def _source(module: str) -> str:
    return f"kernels/{module}.py"


dispatch.set_availability("triton", reason_triton)
for _op, (_mod, _fn) in KERNELS.items():
    if importlib.util.find_spec(f"pyfast.kernels.{_mod}") is not None:
        dispatch.register(dispatch.Backend("triton", _op, _lazy(_mod, _fn), ("cuda", "cpu"),
                                           supports=_lazy_supports(_mod, _op), source=_source(_mod)))
