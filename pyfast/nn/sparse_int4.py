"""Sparse24Int4Linear: 2:4 semi-structured sparsity with int4 kept values.

The two compressions multiply: 2:4 halves the weights, int4 stores each kept one in
4 bits, and the 2-bit indices of the kept ones cost 1 bit per dense weight, so a
layer takes about 3 bits per weight plus one scale (and zero point) per group:
0.21x of bfloat16, 0.77x of plain int4 at group size 128 (pyfast/formats.py, "2:4 sparsity + int4").
The format is Sparse-Marlin's idea (Frantar et al.): at small batches a matmul is
bound by the weight bytes it reads. Its kernels: C++ on CPU, which is compute-bound on
the machine benchmarked, so there it is about int4's speed, not faster (README,
Performance), and it buys the smaller size; Triton on NVIDIA GPUs (kernels/
sparse24_int4.py: the dense tile rebuilt in registers for tl.dot), not yet run on a GPU.
The CUDA C++ kernel (mma.sp m16n8k32 on the sparse tensor cores) reads the weight in
its own order, the layout "tc" (pyfast/layouts/sparse24_int4_tc.py, op
sparse24_int4_mm_tc; pyfast/nn/layout.py says when "auto" picks it).

The matmul (torch.ops.pyfast.sparse24_int4_mm, or sparse24_int4_mm_tc on the "tc"
layout: the same result) dequantizes in float32 in its reference, so any float input
dtype works; out = x @ W.T + bias in x.dtype, W the dense 2:4 weight.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import _checks as chk
from .. import ops  # noqa: F401  (torch.ops.pyfast.* must exist)
from .. import reference
from ..layouts import sparse24_int4_tc
from ..ops import _sparse24_int4_group
from ..sparsity import magnitude_24_mask
from . import layout as _layout
from .linear import _TC, _Int4GroupLinear

Tensor = torch.Tensor


def unsupported_reason(in_features: int, group_size: int) -> Optional[str]:
    """None if a Sparse24Int4Linear can hold in_features inputs with this group size,
    else why not (pyfast.sparsify skips such a layer with the reason)."""
    try:
        _sparse24_int4_group(group_size, in_features, "in_features")
    except ValueError as exc:
        return f"{exc} (2:4 + int4)"
    return None


class Sparse24Int4Linear(_Int4GroupLinear):
    """2:4 sparse weights whose kept values are group-wise int4 (symmetric or not).

    Buffers (formats.py): packed uint8 [N, K/4] (the kept values' codes), meta uint8
    [N, K/8] (their 2-bit indices), scales float32 [N, G], zeros uint8 [N, G], with
    G = K / group_size groups of DENSE columns (group_size 32, 64, 128 or -1).
    In the layout "tc" (pyfast/nn/layout.py), packed and meta hold their
    repack_sparse24_int4_tc images instead: codes_tc int32 [ceil(N/16), ceil(K/64), 32, 2]
    and meta_tc int32 [ceil(N/16), ceil(K/64), 32]; scales and zeros stay as they are.
    """

    _LAYOUTS, _LAYOUT_BUFFERS = _TC, ("packed", "meta")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, symmetric: bool = True, device=None,
                 layout: str = "canonical"):
        super().__init__(in_features, out_features, bias, device)
        gs = _sparse24_int4_group(group_size, in_features, "in_features")
        chk.bool_arg("symmetric", symmetric)
        self.layout = _layout.check(layout, allow_auto=False, accepted=_TC,
                                    what="Sparse24Int4Linear")
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // gs
        packed = torch.zeros(out_features, in_features // 4, dtype=torch.uint8, device=device)
        # 0b0100 per group: kept indices 0 and 1 (a valid, deterministic default)
        meta = torch.full((out_features, in_features // 8), 0x44, dtype=torch.uint8,
                          device=device)
        if self.layout == "tc":
            packed, meta = torch.ops.pyfast.repack_sparse24_int4_tc(packed, meta)
        self.register_buffer("packed", packed)
        self.register_buffer("meta", meta)
        self._register_group_params(out_features, groups, device)

    @property
    def format(self) -> str:  # type: ignore[override]
        return self._int4_format("2:4 sparse + int4")

    def _check_loaded_values(self) -> None:
        super()._check_loaded_values()
        if self.meta.device.type != "meta":
            meta = self.meta if self.layout == "canonical" else sparse24_int4_tc.unrepack(
                self.packed, self.meta, self.out_features, self.in_features)[1]
            sparse24_int4_tc.check_meta_values(meta)

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune: bool = False, group_size: int = 128,
                    symmetric: bool = True, layout: str = "auto") -> "Sparse24Int4Linear":
        """prune=True keeps the 2 largest |w| of each group of 4 first; otherwise the
        weight must already be 2:4 (else ValueError naming the first bad group). The
        kept values are then quantized round-to-nearest, int4's rule per group.
        layout: "canonical", "tc" or "auto" (pyfast/nn/layout.py)."""
        cls._check_linear(linear)
        chk.bool_arg("prune", prune)
        _layout.check(layout, accepted=_TC, what="Sparse24Int4Linear")
        w = linear.weight.detach()
        if prune:
            w = w * magnitude_24_mask(w)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    group_size=group_size, symmetric=symmetric, device=w.device)
        layer.orig_dtype = w.dtype
        packed, meta, scales, zeros = torch.ops.pyfast.pack_sparse24_int4(
            w, group_size, symmetric)
        for buf, t in ((layer.packed, packed), (layer.meta, meta), (layer.scales, scales),
                       (layer.zeros, zeros)):
            buf.copy_(t)
        layer._copy_bias(linear)
        return layer.repack(layout)

    @torch.no_grad()
    def repack(self, layout: str = "auto") -> "Sparse24Int4Linear":
        """Store packed and meta in `layout` ("canonical", "tc" or "auto" for where the
        weight is now, in the dense dtype it replaces); in place, exact (a permutation of
        the codes and indices); returns self."""
        _layout.check(layout, accepted=_TC, what="Sparse24Int4Linear")
        chosen = _layout.resolve(layout, "sparse24_int4_mm_tc", self.packed.device,
                                 self.orig_dtype)
        self._set_layout(chosen)
        return self

    def _relaid(self, tensors: dict, layout: str) -> dict:
        packed, meta = tensors["packed"], tensors["meta"]
        packed, meta = (torch.ops.pyfast.repack_sparse24_int4_tc(packed, meta) if layout == "tc"
                        else sparse24_int4_tc.unrepack(packed, meta, self.out_features,
                                                       self.in_features))
        return {"packed": packed, "meta": meta}

    def canonical_weight(self) -> Tuple[Tensor, Tensor]:
        """(packed uint8 [N, K/4], meta uint8 [N, K/8]) whatever the layout (the buffers,
        or un-repacked copies)."""
        if self.layout == "tc":
            return sparse24_int4_tc.unrepack(self.packed, self.meta, self.out_features,
                                             self.in_features)
        return self.packed, self.meta

    def dequantized_weight(self) -> Tensor:
        """The dense float32 weight [N, K] the layer multiplies by (zeros where pruned)."""
        return reference.dequantize_sparse24_int4(*self.canonical_weight(), self.scales,
                                                  self.zeros, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        op = (torch.ops.pyfast.sparse24_int4_mm_tc if self.layout == "tc" else
              torch.ops.pyfast.sparse24_int4_mm)
        out = op(self._flat(x), self.packed, self.meta, self.scales, self.zeros,
                 self.group_size, self.bias)
        return self._unflat(out, x)
