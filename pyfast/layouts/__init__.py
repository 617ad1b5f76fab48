"""Kernel-specific weight layouts, each produced once at layer creation by a repack op.

The canonical packed formats (pyfast/formats.py) are what every backend accepts and
what pyfast.save writes. A kernel that needs another order (tensor-core fragment
order for int4, sparse-tensor-core order for the 2:4 metadata and the 2:4 + int4
codes) gets it from a module
here: `repack` / `unrepack` are pure torch, run on any device, are exact inverses,
and are the reference of the repack ops in pyfast.ops.
"""

import torch as _torch


def check_dims(n, k) -> None:
    """TypeError / ValueError unless n and k (a weight's rows and columns) are ints >= 0
    (torch.SymInt too, under torch.compile)."""
    for name, v in (("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, _torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def check_repacked_tensor(t, name: str, dtype, want: tuple, n: int, k: int, spec: str,
                          repack_op: str, canonical: str) -> None:
    """TypeError / ValueError naming `name` unless t is a `dtype` tensor of shape `want`
    (what `repack_op` gives for an N x K weight; `spec` spells the shape, e.g.
    "(ceil(N/48), ceil(K/4), 48, 4)"; `canonical` the input it repacks)."""
    if not isinstance(t, _torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (from {repack_op}), got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {str(dtype).replace('torch.', '')} "
                        f"(the output of {repack_op}; a canonical {canonical} must be repacked "
                        "first)")
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; for N = {n}, K = {k} it must be "
                         f"{tuple(want)} = {spec}, the shape {repack_op} gives")
