"""C++ CPU kernels (csrc/cpu) as backends of the pyfast ops.

The compiled kernels live in the torch.library namespace `pyfast_C` (schemas in
csrc/registration.cpp and in each csrc/cpu/*.cpp with TORCH_LIBRARY_FRAGMENT);
the public `pyfast::` ops call them through this table. Each kernel picks its
instruction set at run time (csrc/cpu/isa.h: AVX-512 VNNI, AVX2, scalar).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks as chk
from .. import _ext, dispatch

SOURCE = "csrc/cpu"


def _quantize_per_token(x):
    return torch.ops.pyfast_C.quantize_per_token(x)


def _int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    return torch.ops.pyfast_C.int8_mm(a, b, a_scale.float(), b_scale.float(), bias,
                                      chk.out_dtype(out_dtype))


def _w8a8_mm(x, w_int8, w_scale, bias=None):
    return torch.ops.pyfast_C.w8a8_mm(x, w_int8, w_scale.float(), bias)


def _w8a8_mm_vnni(x, w_vnni, w_scale, bias=None):
    return torch.ops.pyfast_C.w8a8_mm_vnni(x, w_vnni, w_scale.float(), bias)


def _int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias=None, out_dtype=None):
    return torch.ops.pyfast_C.int8_mm_vnni(a, w_vnni, a_scale.float(), w_scale.float(), bias,
                                           chk.out_dtype(out_dtype))


def _quantize_static(x, scale):
    return torch.ops.pyfast_C.quantize_static(x, scale)


def _int8_weight_mm(x, w_int8, w_scale, bias=None):
    return torch.ops.pyfast_C.int8_weight_mm(x, w_int8, w_scale, bias)


def _int4_mm(x, packed, scales, zeros, group_size, bias=None):
    return torch.ops.pyfast_C.int4_mm(x, packed, scales, zeros, group_size, bias)


def _int4_mm_ksplit(x, w_ks, scales, zeros, group_size, bias=None):
    return torch.ops.pyfast_C.int4_mm_ksplit(x, w_ks, scales, zeros, group_size, bias)


def _sparse24_mm(x, values, meta, bias=None):
    return torch.ops.pyfast_C.sparse24_mm(x, values, meta, bias)


def _sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None):
    return torch.ops.pyfast_C.sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias)


KERNELS = {
    "quantize_per_token": (_quantize_per_token, "quantize.cpp"),
    "quantize_static": (_quantize_static, "quantize.cpp"),
    "int8_mm": (_int8_mm, "int8_mm.cpp"),
    "w8a8_mm": (_w8a8_mm, "int8_mm.cpp"),
    "w8a8_mm_vnni": (_w8a8_mm_vnni, "int8_vnni.cpp"),
    "int8_mm_vnni": (_int8_mm_vnni, "int8_vnni.cpp"),
    "int8_weight_mm": (_int8_weight_mm, "weight_only.cpp"),
    "int4_mm": (_int4_mm, "weight_only.cpp"),
    "int4_mm_ksplit": (_int4_mm_ksplit, "weight_only.cpp"),
    "sparse24_mm": (_sparse24_mm, "sparse24.cpp"),
    "sparse24_int4_mm": (_sparse24_int4_mm, "sparse24_int4.cpp"),
}


def _built(op: str):
    """supports(): a pyfast._C built from older sources may lack a kernel. Asked on every
    call that reaches this backend, answered once (the extension does not change while a
    process runs)."""
    answer = []

    def supports(*args) -> Optional[str]:
        if not answer:
            missing = _ext.load() and not hasattr(torch.ops.pyfast_C, op)
            answer.append(f"pyfast._C has no pyfast_C::{op} (built from older sources); "
                          "rebuild with `pip install --no-build-isolation -e .`" if missing else None)
        return answer[0]
    return supports


dispatch.set_availability("cpp", _ext.reason_cpp)
for _op, (_fn, _file) in KERNELS.items():
    dispatch.register(dispatch.Backend("cpp", _op, _fn, ("cpu",), supports=_built(_op),
                                       source=f"{SOURCE}/{_file}"))
