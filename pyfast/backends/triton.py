"""Triton kernels (kernels/, installed as pyfast.kernels) as backends of the ops.

Triton runs on NVIDIA GPUs; on CPU tensors it runs only under the Triton
interpreter (TRITON_INTERPRET=1) and only when forced, which is how the test
suite checks these kernels on machines without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .. import dispatch


def reason_triton(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") == "1":
            return None
        return "on CPU Triton runs only in its interpreter (set TRITON_INTERPRET=1)"
    return f"Triton does not run on {device_type}"


dispatch.set_availability("triton", reason_triton)
