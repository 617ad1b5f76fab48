"""CUDA C++ kernels (csrc/cuda) as backends of the pyfast ops.

Present only in a pyfast._C built with a CUDA torch and nvcc; on any other
machine `pyfast.backends()` reports why (no GPU, no CUDA build, sm < 80).

    op              kernel (csrc/cuda)   what it is
    quantize_per_token  quantize_per_token.cu   one CTA per row, warp-shuffle abs-max
    int8_mm         int8_mm.cu       mma.sync m16n8k32 s8 tensor cores, cp.async
                                     pipeline, scale/bias epilogue fused
    w8a8_mm         the two above    quantize_per_token, then int8_mm (two launches)
    int4_mm_tc      int4_mm.cu       W4A16 on mma.sync m16n8k16, weights repacked
                                     once into fragment order (repack_int4_tc)
    sparse24_mm_tc  sparse24_mm.cu   mma.sp m16n8k32 on sparse tensor cores,
                                     metadata repacked once (repack_sparse24_tc)
    sparse24_int4_mm_tc  sparse24_int4_mm.cu  mma.sp m16n8k32 with the int4 kept
                                     values dequantized in registers; codes and
                                     metadata repacked once (repack_sparse24_int4_tc)
The canonical-layout int4_mm, sparse24_mm and sparse24_int4_mm have no CUDA C++
kernel: the layers repack to the *_tc layout when they are made on a GPU (pyfast.nn,
layout="auto").
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks as chk
from .. import _ext, dispatch

SOURCE = "csrc/cuda"
_HALF = (torch.float16, torch.bfloat16)


def _quantize_per_token(x):
    return torch.ops.pyfast_C.quantize_per_token(x)


def _int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    return torch.ops.pyfast_C.int8_mm(a, b, a_scale.float(), b_scale.float(), bias,
                                      chk.out_dtype(out_dtype))


def _w8a8_mm(x, w_int8, w_scale, bias=None):
    # Two launches (quantize_per_token.cu, then int8_mm.cu); the fused call is the CPU's.
    q, q_scale = torch.ops.pyfast_C.quantize_per_token(x)
    return _int8_mm(q, w_int8, q_scale, w_scale, bias, x.dtype)


def _int4_mm_tc(x, w_tc, scales, zeros, group_size, bias=None):
    return torch.ops.pyfast_C.int4_mm_tc(x, w_tc, scales, zeros, group_size, bias)


def _sparse24_mm_tc(x, values, meta_tc, bias=None):
    return torch.ops.pyfast_C.sparse24_mm_tc(x, values, meta_tc, bias)


def _sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, group_size, bias=None):
    return torch.ops.pyfast_C.sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros,
                                                  group_size, bias)


def _half_activations(x, *rest) -> Optional[str]:
    """The W4A16 and 2:4 tensor-core kernels multiply in float16/bfloat16."""
    if x.dtype not in _HALF:
        return (f"x is {x.dtype}; the tensor-core kernel takes float16 or bfloat16 "
                "activations (cast the layer with .half() or .bfloat16())")
    return None


# op -> (function, source file, supports)
KERNELS = {
    "quantize_per_token": (_quantize_per_token, "quantize_per_token.cu", None),
    "int8_mm": (_int8_mm, "int8_mm.cu", None),
    "w8a8_mm": (_w8a8_mm, "quantize_per_token.cu + int8_mm.cu", None),
    "int4_mm_tc": (_int4_mm_tc, "int4_mm.cu", _half_activations),
    "sparse24_mm_tc": (_sparse24_mm_tc, "sparse24_mm.cu", _half_activations),
    "sparse24_int4_mm_tc": (_sparse24_int4_mm_tc, "sparse24_int4_mm.cu", _half_activations),
}

dispatch.set_availability("cuda", _ext.reason_cuda)
for _op, (_fn, _file, _supports) in KERNELS.items():
    dispatch.register(dispatch.Backend("cuda", _op, _fn, ("cuda",), supports=_supports,
                                       source=f"{SOURCE}/{_file}"))
