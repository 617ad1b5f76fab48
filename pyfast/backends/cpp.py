"""C++ CPU kernels (csrc/cpu) as backends of the pyfast ops.

The compiled kernels live in the torch.library namespace `pyfast_C` (see
csrc/registration.cpp); the public `pyfast::` ops call them through this table.
"""
from __future__ import annotations

import torch

from .. import _checks as chk
from .. import _ext, dispatch

SOURCE = "csrc/cpu"


def _quantize_per_token(x):
    return torch.ops.pyfast_C.quantize_per_token(x)


def _int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    return torch.ops.pyfast_C.int8_mm(a, b, a_scale.float(), b_scale.float(), bias,
                                      chk.out_dtype(out_dtype))


dispatch.set_availability("cpp", _ext.reason_cpp)
for _op, _fn in (("quantize_per_token", _quantize_per_token), ("int8_mm", _int8_mm)):
    dispatch.register(dispatch.Backend("cpp", _op, _fn, ("cpu",), source=SOURCE))
