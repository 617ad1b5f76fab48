"""Input checks shared by every op, run before any backend sees a tensor.

They only read shapes, dtypes and devices, so they also run on the fake tensors
that torch.compile traces with. Every message names the argument, what it got
and what is accepted, so a user can fix the call without reading the source.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .formats import INT4_GROUP_SIZES, LOWBIT_BITS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, *, dtypes=None, dim: Optional[int] = None, layout: str = "") -> None:
    """TypeError / ValueError naming `name` unless t is a tensor of one of `dtypes` with
    `dim` dimensions; `layout` (e.g. "[N, K/2]") is quoted in the dimension error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {_names(dtypes)}")
    if dim is not None and t.dim() != dim:
        shape = f" {layout}" if layout else ""
        raise ValueError(
            f"{name} must be {dim}-D{shape}, got a {t.dim()}-D tensor of shape "
            f"{tuple(t.shape)}"
        )


# These checks run on every op call (a layer's forward included), so they build their
# messages only when they fail: `why` of size() is formatted with why_args then.

def size(name: str, t: torch.Tensor, axis: int, expected: int, why: str, *why_args) -> None:
    if t.shape[axis] != expected:
        why = why.format(*why_args) if why_args else why
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: dimension {axis} must be {expected} ({why})"
        )


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    first_name = first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t.device
        elif t.device != first:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first}; "
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


def int_arg(name: str, v) -> None:
    """TypeError unless v is an int (not a bool, a float or a 0-d tensor)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")


def bool_arg(name: str, v) -> bool:
    """TypeError unless v is a bool (not 0/1, None or a string); returns v."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return v


_PER_BYTE = {4: "two int4", 2: "four 2-bit", 1: "eight 1-bit"}


def group_size(gs, k: int, *, k_name: str = "K (in_features)", bits: int = 4) -> int:
    """Checks a group size for `bits`-bit packing of K values per row; returns the
    group length (K itself for -1, per channel)."""
    int_arg("group_size", gs)
    if gs not in INT4_GROUP_SIZES:
        raise ValueError(
            f"group_size {gs} is not supported; accepted: 32, 64, 128 or -1 (per channel)"
        )
    per_byte = 8 // bits
    if gs == -1 and k <= 0:
        raise ValueError(f"{k_name} = {k} must be positive for group_size -1 (one group per row)")
    if k % per_byte:
        need = "even" if per_byte == 2 else f"a multiple of {per_byte}"
        raise ValueError(f"{k_name} = {k} must be {need} to pack {_PER_BYTE[bits]} "
                         "values per byte")
    if gs != -1 and k % gs:
        raise ValueError(f"{k_name} = {k} is not a multiple of group_size {gs}")
    return k if gs == -1 else gs


def lowbit_bits(b) -> int:
    """bits of a pack_lowbit / lowbit_mm weight: 1 (binary) or 2 (int2)."""
    if isinstance(b, bool) or not isinstance(b, int):
        raise TypeError(f"bits must be an int, got {b!r}")
    if b not in LOWBIT_BITS:
        raise ValueError(f"bits {b} is not supported; accepted: 1 (binary) or 2 (int2)")
    return b


def multiple_of_4(name: str, k: int) -> None:
    if k % 4:
        raise ValueError(
            f"{name} = {k} is not a multiple of 4; 2:4 sparsity groups K in fours"
        )
