"""Input checks shared by every op, run before any backend sees a tensor.

They only read shapes, dtypes and devices, so they also run on the fake tensors
that torch.compile traces with. Every message names the argument, what it got
and what is accepted, so a user can fix the call without reading the source.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .formats import INT4_GROUP_SIZES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, *, dtypes=None, dim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {_names(dtypes)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(
            f"{name} must be {dim}-D, got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
        )


def size(name: str, t: torch.Tensor, axis: int, expected: int, why: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: dimension {axis} must be {expected} ({why})"
        )


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def bias(b: Optional[torch.Tensor], n: int) -> None:
    if b is None:
        return
    tensor("bias", b, dtypes=FLOAT_DTYPES, dim=1)
    size("bias", b, 0, n, "one entry per output feature N")


def scale_vector(name: str, s: torch.Tensor, n: int, what: str) -> None:
    tensor(name, s, dtypes=FLOAT_DTYPES, dim=1)
    size(name, s, 0, n, what)


def out_dtype(d) -> torch.dtype:
    if d is None:
        return torch.float32
    if not isinstance(d, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {d!r}")
    if d not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype {d} is not supported; accepted: {_names(FLOAT_DTYPES)}")
    return d


def group_size(gs, k: int, *, k_name: str = "K (in_features)") -> int:
    if isinstance(gs, bool) or not isinstance(gs, int):
        raise TypeError(f"group_size must be an int, got {gs!r}")
    if gs not in INT4_GROUP_SIZES:
        raise ValueError(
            f"group_size {gs} is not supported; accepted: 32, 64, 128 or -1 (per channel)"
        )
    if k % 2:
        raise ValueError(f"{k_name} = {k} must be even to pack two int4 values per byte")
    if gs != -1 and k % gs:
        raise ValueError(f"{k_name} = {k} is not a multiple of group_size {gs}")
    return k if gs == -1 else gs


def multiple_of_4(name: str, k: int) -> None:
    if k % 4:
        raise ValueError(
            f"{name} = {k} is not a multiple of 4; 2:4 sparsity groups K in fours"
        )
