"""StaticInt8Linear: W8A8 with a calibrated (static) activation scale.

Like Int8Linear, the weight is int8 per output channel (weight_int8 [N, K] int8,
weight_scale [N] float32, the quantize_per_token rule of pyfast/formats.py). Unlike
it, activations are not scaled per token at run time: one float32 scale `input_scale`
[1], chosen once by calibration (pyfast.quant observers), quantizes every input
(quantize_static: round-half-to-even(x / scale), clamped to [-127, 127], so values
beyond 127 * scale clip). That saves the per-row max reduction at run time, at the
price of clipping or coarser steps where the calibration data were not representative.

Layouts as Int8Linear (pyfast/nn/layout.py): "canonical" runs quantize_static +
int8_mm, "vnni" (the int8 weight in VNNI panel order) quantize_static + int8_mm_vnni,
the C++ CPU kernel's fast order; "auto" picks "vnni" where that kernel runs at the
AVX-512 level.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks as chk
from .. import ops
from . import layout as _layout
from .linear import _VNNI, _Int8LayoutLinear

Tensor = torch.Tensor


class StaticInt8Linear(_Int8LayoutLinear):
    """W8A8 static: int8 per-channel weights, int8 activations with one calibrated scale.

    Buffers: weight_int8 int8 [N, K] (layout "vnni": its repack_int8_vnni image
    [ceil(N/48), ceil(K/4), 48, 4]), weight_scale float32 [N], input_scale float32 [1],
    bias [N] (optional, float).
    """

    _vnni_op = "int8_mm_vnni"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 layout: str = "canonical"):
        super().__init__(in_features, out_features, bias, device, layout)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))

    @property
    def format(self) -> str:  # type: ignore[override]
        return "int8 W8A8 static" + self._layout_suffix()  # calibrated per-tensor scale

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: Tensor = None,
                    layout: str = "auto") -> "StaticInt8Linear":
        """linear's weight quantized per channel; input_scale: float32 [1], positive and
        finite (an observer's scale(), pyfast.quant); layout: "canonical", "vnni" or
        "auto" (pyfast/nn/layout.py)."""
        _layout.check(layout, accepted=_VNNI, what="StaticInt8Linear")
        if input_scale is None:
            raise ValueError("input_scale is required: a calibrated float32 [1] scale "
                             "(pyfast.quant.prepare_static / calibrate / convert_static)")
        chk.tensor("input_scale", input_scale, dtypes=(torch.float32,))
        if input_scale.numel() != 1:
            raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}; "
                             "accepted: one value, float32 [1]")
        ops.check_static_scale("input_scale", input_scale)
        layer = super().from_linear(linear)
        layer.input_scale.copy_(input_scale.detach().reshape(1).to(layer.input_scale.device))
        return layer.repack(layout)

    def _check_loaded_values(self) -> None:
        """input_scale must be positive and finite, as from_linear requires: the
        quantize_static op does not check it per call (a scale of 0 gave the bias alone,
        NaN or inf gave NaN)."""
        super()._check_loaded_values()
        ops.check_static_scale("input_scale", self.input_scale)   # (not on meta tensors)

    def forward(self, x: Tensor) -> Tensor:
        x2 = self._flat(x)
        q, s = torch.ops.pyfast.quantize_static(x2, self.input_scale)
        mm = torch.ops.pyfast.int8_mm_vnni if self.layout == "vnni" else torch.ops.pyfast.int8_mm
        out = mm(q, self.weight_int8, s, self.weight_scale, self.bias, x.dtype)
        return self._unflat(out, x)

    def extra_repr(self) -> str:
        if self.input_scale.device.type == "meta":
            return super().extra_repr()
        return f"{super().extra_repr()}, input_scale={float(self.input_scale):.4g}"
