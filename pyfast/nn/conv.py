"""QuantConv2d: a quantized nn.Conv2d run as im2col + a pyfast matmul op.

pyfast has no convolution kernel. A Conv2d with groups == 1 is a matmul on the
unfolded input (im2col): F.unfold turns x [B, C_in, H, W] into columns
[B, C_in*kh*kw, L] (L = H_out * W_out output positions, each column one receptive
field, ordered (c, i, j) exactly like weight.reshape(C_out, C_in*kh*kw)), so

    conv(x) = (cols^T @ W^T + bias) reshaped to [B, C_out, H_out, W_out]

with W the flattened weight [C_out, C_in*kh*kw]. The matmul is done by an inner
pyfast linear layer (Int8Linear, Int8WeightOnlyLinear, Int4Linear, StaticInt8Linear,
...), so its ops and kernels apply unchanged. The cost is the unfolded copy of the
input (kh*kw times its size), which is what a direct conv kernel would avoid.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn.utils import prune as torch_prune

from .. import _checks as chk
from .linear import _CompressedLinear

Tensor = torch.Tensor
Pair = Tuple[int, int]


# The modules of the forward (pre-)hooks pyfast attaches itself and takes off again:
# pyfast.quant.prepare_static's input observers (convert_static consumes them) and GPTQ's
# Hessian hook (on one layer while the calibration batches run).
_OWN_HOOK_MODULES = ("pyfast.quant.static", "pyfast.quant.gptq")


def hooks_reason(mod: nn.Module) -> Optional[str]:
    """None unless mod has a forward hook or forward pre-hook that a pyfast layer standing
    in for it would not run (spectral_norm's, a user's, an open FeatureDistiller's). Those
    of torch.nn.utils.prune pass (a conversion reads the weight they compute), and so do
    pyfast's own transient ones (static observers, GPTQ)."""
    for kind, hooks in (("forward pre-hook", mod._forward_pre_hooks),
                        ("forward hook", mod._forward_hooks)):
        for hook in hooks.values():
            where = getattr(hook, "__module__", None)
            if isinstance(hook, torch_prune.BasePruningMethod) or where in _OWN_HOOK_MODULES:
                continue
            if where == "pyfast.distill.features":
                # pyfast's own, but it stays until the distiller is closed. Not carried over:
                # the FeatureDistiller's handle would still point at this layer, and a
                # compressed student layer would no longer train under distill
                return ("carries the capture hook of an open pyfast.distill.FeatureDistiller "
                        "(or of a running distill() call), which a pyfast layer would not "
                        "run: compress the models before building the FeatureDistiller "
                        "(pyfast.quant.prepare_qat for quantization-aware distillation) or "
                        "after distilling, once it is closed (fd.close(), or build it in a "
                        "`with` block; distill() closes those it builds)")
            what = getattr(hook, "__qualname__", None) or type(hook).__qualname__
            return (f"has a {kind} {where}.{what}, which a pyfast layer would not run: "
                    "remove it first (its handle's .remove(); torch.nn.utils."
                    "remove_spectral_norm / remove_weight_norm for those) or exclude the layer")
    return None


def conv_unsupported_reason(conv: nn.Module) -> Optional[str]:
    """None if QuantConv2d can stand in for this nn.Conv2d, else why not (for skipping)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__}: pyfast compresses nn.Conv2d only (im2col)"
    for method in ("forward", "_conv_forward"):
        if getattr(type(conv), method) is not getattr(nn.Conv2d, method):
            return f"{type(conv).__name__} overrides nn.Conv2d.{method}"
    hooked = hooks_reason(conv)
    if hooked is not None:
        return hooked
    if conv.groups != 1:
        return (f"groups={conv.groups} (grouped/depthwise conv): pyfast quantizes Conv2d as "
                "im2col + one matmul, which needs groups == 1")
    if conv.padding_mode != "zeros":
        return (f"padding_mode {conv.padding_mode!r}: only 'zeros' padding is supported "
                "(F.unfold pads with zeros)")
    if conv.weight.dtype not in chk.FLOAT_DTYPES:
        return f"weight dtype {conv.weight.dtype} is not float32/float16/bfloat16"
    if conv.weight.device.type not in ("cpu", "cuda"):
        return f"weight on {conv.weight.device}, pyfast runs on cpu and cuda"
    return None


def conv_padding(conv: nn.Conv2d) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, its string forms resolved:
    'valid' is none; 'same' pads d*(k-1) in total per dim, the odd one at the end
    (bottom/right), as PyTorch does."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (ph, ph, pw, pw)


def linear_from_weight(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """An nn.Linear viewing weight [N, K] and bias [N] (no copy, no gradient): what the
    pyfast layers' from_linear constructors take."""
    n, k = weight.shape
    lin = nn.Linear(k, n, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def im2col(x: Tensor, kernel_size: Pair, stride: Pair, padding: Tuple[int, int, int, int],
           dilation: Pair) -> Tensor:
    """x [B, C, H, W] -> the receptive fields as rows [B, L, C*kh*kw] (a strided view of
    F.unfold's [B, C*kh*kw, L]); padding (top, bottom, left, right) in zeros."""
    t, b, l, r = padding
    if t == b and l == r:
        cols = F.unfold(x, kernel_size, dilation, (t, l), stride)
    else:
        cols = F.unfold(F.pad(x, (l, r, t, b)), kernel_size, dilation, 0, stride)
    return cols.transpose(1, 2)


def _pair(name: str, v, *, minimum: int) -> Pair:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum
                             for x in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return vals  # type: ignore[return-value]


class ConvGeometry(nn.Module):
    """Shared by QuantConv2d and the QAT conv: sizes, checks and output size of a Conv2d
    with groups 1 and zero padding (top, bottom, left, right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair("kernel_size", kernel_size, minimum=1)
        self.stride = _pair("stride", stride, minimum=1)
        self.dilation = _pair("dilation", dilation, minimum=1)
        pad = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)
        if len(pad) == 1:
            pad = pad * 4
        elif len(pad) == 2:
            pad = (pad[0], pad[0], pad[1], pad[1])
        if len(pad) != 4 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0
                                for p in pad):
            raise ValueError("padding must be an int >= 0, a pair (ph, pw) or (top, bottom, "
                             f"left, right), got {padding!r}")
        self.padding: Tuple[int, int, int, int] = pad  # type: ignore[assignment]

    @property
    def in_features(self) -> int:
        """C_in * kh * kw: the K of the matmul."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def geometry_config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation)}

    def output_size(self, h: int, w: int) -> Pair:
        t, b, l, r = self.padding
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1)

    def _batched(self, x: Tensor) -> Tuple[Tensor, bool, Pair]:
        """(x as [B, C, H, W], whether it was unbatched, (H_out, W_out)); checks x."""
        chk.tensor("input", x, dtypes=chk.FLOAT_DTYPES)
        unbatched = x.dim() == 3
        x4 = x.unsqueeze(0) if unbatched else x
        if x4.dim() != 4 or x4.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input [B, {self.in_channels}, H, W] "
                             f"or [{self.in_channels}, H, W], got shape {tuple(x.shape)}")
        h, w = x4.shape[2:]
        if h == 0 or w == 0:
            raise ValueError(f"input has spatial size {h}x{w} (shape {tuple(x.shape)}); "
                             "H and W must be > 0")
        size = self.output_size(h, w)
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"input of spatial size {h}x{w} is smaller than the (dilated) "
                             f"kernel {self.kernel_size} with padding {self.padding}")
        return x4, unbatched, size

    def _to_image(self, rows: Tensor, n: int, size: Pair, unbatched: bool,
                  like: Optional[Tensor] = None) -> Tensor:
        """rows [B, L, C_out] -> [B, C_out, H_out, W_out] (or [C_out, H_out, W_out]) in the
        memory format torch's conv gives for input `like` ([B, C_in, H, W]; None: a
        contiguous one): channels_last for a channels_last input, else contiguous."""
        out = rows.transpose(1, 2).reshape(n, self.out_channels, *size)   # channels_last
        if unbatched:
            return out.squeeze(0).contiguous()
        # torch's conv rule (suggest_memory_format): a [B, 1, H, W] input is contiguous in
        # both formats, and its strides say which one it was made in
        keep = like is not None and suggest_memory_format(like) == torch.channels_last
        return out if keep else out.contiguous()

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


class QuantConv2d(ConvGeometry):
    """A Conv2d (groups 1, zero padding) whose matmul is a pyfast layer `inner` with
    in_features = in_channels*kh*kw and out_features = out_channels.

    padding: int, (ph, pw) or (top, bottom, left, right) for the asymmetric 'same' case.
    Input [B, C_in, H, W] or unbatched [C_in, H, W], output in the input's dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, inner: Optional[_CompressedLinear] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation)
        if not isinstance(inner, _CompressedLinear):
            raise TypeError(f"inner must be a pyfast layer (_CompressedLinear), got "
                            f"{type(inner).__name__}")
        if (inner.in_features, inner.out_features) != (self.in_features, out_channels):
            raise ValueError(f"inner has in_features={inner.in_features}, out_features="
                             f"{inner.out_features}; expected in_channels*kh*kw = "
                             f"{self.in_features} and out_channels = {out_channels}")
        self.inner = inner

    @classmethod
    def from_conv(cls, conv: nn.Conv2d,
                  make_inner: Callable[[nn.Linear], _CompressedLinear]) -> "QuantConv2d":
        """make_inner(linear) builds the inner layer from the flattened weight, e.g.
        Int8Linear.from_linear or lambda lin: Int4Linear.from_linear(lin, group_size=32)."""
        reason = conv_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot quantize this Conv2d: {reason}")
        w = conv.weight.detach()
        lin = linear_from_weight(w.reshape(w.shape[0], -1), conv.bias)
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv_padding(conv), conv.dilation, inner=make_inner(lin))

    # --- save/load protocol (pyfast/serialization.py) ----------------------------------
    def pyfast_config(self) -> dict:
        return {**self.geometry_config(),
                "inner": {"class": type(self.inner).__name__,
                          "config": self.inner.pyfast_config()}}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "QuantConv2d":
        from . import compressed_layer_types   # a fixed registry: never import by name
        cfg = dict(config)
        inner_cfg = cfg.pop("inner")
        classes = {c.__name__: c for c in compressed_layer_types()}
        inner_cls = classes.get(inner_cfg.get("class"))
        if inner_cls is None:
            raise ValueError(f"inner layer class {inner_cfg.get('class')!r} is not a pyfast "
                             f"layer; accepted: {', '.join(sorted(classes))}")
        inner = inner_cls.from_config(inner_cfg["config"], device=device)
        return cls(**cfg, inner=inner)

    # --- the layer ------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return f"{self.inner.format} conv (im2col)"

    def storage_bytes(self) -> int:
        return self.inner.storage_bytes()

    def dense_bytes(self) -> int:
        return self.inner.dense_bytes()

    def forward(self, x: Tensor) -> Tensor:
        x4, unbatched, size = self._batched(x)
        cols = im2col(x4, self.kernel_size, self.stride, self.padding, self.dilation)
        return self._to_image(self.inner(cols), x4.shape[0], size, unbatched, like=x4)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, format={self.format}"
