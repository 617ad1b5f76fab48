"""CUDA C++ kernels (csrc/cuda) as backends of the pyfast ops.

Present only in a pyfast._C built with a CUDA torch and nvcc; on any other
machine `pyfast.backends()` reports why (no GPU, no CUDA build, sm < 80).
"""
from __future__ import annotations

import torch

from .. import _ext, dispatch

SOURCE = "csrc/cuda"


def _quantize_per_token(x):
    return torch.ops.pyfast_C.quantize_per_token(x)


dispatch.set_availability("cuda", _ext.reason_cuda)
dispatch.register(dispatch.Backend("cuda", "quantize_per_token", _quantize_per_token,
                                   ("cuda",), source=SOURCE + "/quantize_per_token.cu"))
