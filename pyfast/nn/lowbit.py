"""LowBitLinear: int2 (asymmetric) and binary (XNOR-Net) group-wise weight-only layers.

The weight is stored as pack_lowbit lays it out (pyfast/formats.py): 2 or 1 bit per
weight plus one float32 scale (and, for int2, one uint8 zero point) per group of
`group_size` inputs of each output row. Activations stay in float; the matmul
dequantizes in float32 (torch.ops.pyfast.lowbit_mm, reference backend).

`from_linear` is round-to-nearest (RTN) quantization; `from_quantized` takes codes
computed elsewhere (GPTQ, pyfast.quant.gptq).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks as chk
from .. import ops  # noqa: F401  (torch.ops.pyfast.* must exist)
from ..reference import pack_bits
from .linear import _CompressedLinear

Tensor = torch.Tensor


def unsupported_reason(in_features: int, bits: int, group_size: int,
                       k_name: str = "in_features") -> Optional[str]:
    """None if a LowBitLinear can hold in_features inputs with these settings, else why
    not (for skipping a layer: pyfast.quantize's "int2"/"binary"); k_name names K in the
    reason (a conv's "in_channels*kh*kw")."""
    try:
        chk.group_size(group_size, in_features, k_name=k_name, bits=bits)
    except ValueError as exc:
        return f"{exc} ({'int2' if bits == 2 else 'binary'})"
    return None


class LowBitLinear(_CompressedLinear):
    """W2A16 (bits=2) or W1A16 binary (bits=1) weights, group-wise or per channel (-1).

    Buffers: packed uint8 [N, K*bits/8], scales float32 [N, G], zeros uint8 [N, G]
    (bits 2) or [N, 0] (bits 1: a binary weight is +-scale, it has no zero point).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bits: int = 2, group_size: int = 128, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.bits = chk.lowbit_bits(bits)
        gs = chk.group_size(group_size, in_features, k_name="in_features", bits=bits)
        self.group_size = group_size
        groups = in_features // gs
        self.register_buffer("packed", torch.zeros(out_features, in_features * bits // 8,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups if bits == 2 else 0,
                                                  dtype=torch.uint8, device=device))

    def pyfast_config(self) -> dict:
        return {**super().pyfast_config(), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict, device=None):
        """As the base class, with the bias in orig_dtype (from_linear copies the dense
        layer's bias as it is), so a bfloat16 model's state_dict loads back."""
        layer = super().from_config(config, device)
        if layer.bias is not None:
            layer.bias = layer.bias.to(layer.orig_dtype)
        return layer

    @property
    def format(self) -> str:  # type: ignore[override]
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int2 weight-only {g} asym" if self.bits == 2 else f"binary weight-only {g}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, group_size: int = 128) -> "LowBitLinear":
        """Round-to-nearest: the weight packed by pack_lowbit (formats.py)."""
        cls._check_linear(linear)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    bits=bits, group_size=group_size, device=linear.weight.device)
        layer.orig_dtype = linear.weight.dtype
        packed, scales, zeros = torch.ops.pyfast.pack_lowbit(linear.weight.detach(), bits,
                                                             group_size)
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        layer._copy_bias(linear)
        return layer

    @classmethod
    def from_quantized(cls, q: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                       group_size: int, bias: Optional[Tensor] = None) -> "LowBitLinear":
        """From codes computed elsewhere (e.g. GPTQ): q integer [N, K] in 0 .. 2**bits - 1,
        scales float [N, G], zeros integer [N, G] in 0..3 for bits 2 (None or [N, 0] for
        bits 1), bias float [N] or None. The weight is w = (q - zero) * scale (bits 2)
        or (2q - 1) * scale (bits 1)."""
        chk.tensor("q", q, dim=2)
        bits = chk.lowbit_bits(bits)
        n, k = q.shape
        layer = cls(k, n, bias is not None, bits=bits, group_size=group_size, device=q.device)
        _check_codes("q", q, 2 ** bits - 1)
        chk.tensor("scales", scales, dtypes=chk.FLOAT_DTYPES)
        chk.size("scales", scales, 0, n, "one row per output row N of q")
        if scales.shape != layer.scales.shape:
            raise ValueError(f"scales has shape {tuple(scales.shape)}; expected "
                             f"{tuple(layer.scales.shape)} (N, K / group_size)")
        if bits == 2 or zeros is not None:
            chk.tensor("zeros", zeros, dim=2)
            if zeros.shape != layer.zeros.shape:
                why = ("binary weights have no zero point" if bits == 1
                       else "N, K / group_size")
                raise ValueError(f"zeros has shape {tuple(zeros.shape)}; expected "
                                 f"{tuple(layer.zeros.shape)} ({why})")
            _check_codes("zeros", zeros, 3)
            layer.zeros.copy_(zeros.to(torch.uint8))
        layer.packed.copy_(pack_bits(q.to(torch.uint8), bits))
        layer.scales.copy_(scales.float())
        if bias is not None:
            chk.bias(bias, n)
            layer.bias = bias.detach().clone()
            layer.orig_dtype = bias.dtype
        return layer

    def _check_loaded_values(self) -> None:
        """int2 zero points must be 0..3, as from_quantized requires (formats.py): other
        values gave weights outside the int2 grid (load_state_dict / pyfast.load)."""
        if self.bits == 2 and self.zeros.device.type != "meta":
            _check_codes("zeros", self.zeros, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.ops.pyfast.lowbit_mm(self._flat(x), self.packed, self.scales, self.zeros,
                                         self.bits, self.group_size, self.bias)
        return self._unflat(out, x)


def _check_codes(name: str, t: Tensor, top: int) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: an integer dtype (codes)")
    bad = (t < 0) | (t > top)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(t[idx])} at {idx}; accepted: integers 0..{top}")
