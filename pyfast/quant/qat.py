"""Quantization-aware training (QAT) for the int8 W8A8 and int4 weight-only formats.

    model = prepare_qat(model, "int4", group_size=-1)   # Linear/Conv2d -> QATLinear/QATConv2d
    train(model, ...)                                  # fine-tune as usual
    convert_qat(model)                                 # -> Int4Linear / QuantConv2d(Int4Linear)

A QAT layer keeps its float weight as a trainable Parameter (the very Parameter of
the layer it replaces, so an optimizer built before prepare_qat still holds it) and
in forward uses the weight as the pyfast format will store it ("fake quantization"):

    "int8": weight per output channel, symmetric int8 (the quantize_per_token rule of
            pyfast/formats.py, computed by that op); activations per token (per row;
            per receptive field for a conv), same rule, as Int8Linear does at run time.
    "int4": weight group-wise int4 exactly as pack_int4 packs it (computed by the
            pack_int4 op, dequantized by reference.dequantize_int4); activations float.

Gradients use the straight-through estimator (Bengio et al. 2013, "Estimating or
Propagating Gradients Through Stochastic Neurons"; the QAT recipe of Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"): the plain (unclipped) STE, identity gradient for every element. No element
is clipped in these formats anyway: the scales are taken from each row's / group's own
max |w| (max |x|), so round(w / scale) always falls inside the integer range (except
the rare asymmetric-int4 case where the rounded zero point shifts an extreme value by
one step). The scales themselves are recomputed from the current weights at each
forward and get no gradient.

convert_qat builds the layers with the same function as pyfast.quantize
(pyfast.api.quantized_layer), so the converted model computes what the QAT forward
computed, up to float rounding of the matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .. import reference
from ..api import (Filter, _int4_reason, _walk, check_quant_args, positions, quantized_layer,
                   replace_module, torch_pruned)
from ..nn.conv import ConvGeometry, conv_padding, conv_unsupported_reason, hooks_reason, im2col, \
    linear_from_weight
from ..nn.linear import _dtype_from_name, _dtype_name

Tensor = torch.Tensor
QAT_METHODS = ("int8", "int4")


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized value exactly; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, fake: Tensor) -> Tensor:  # type: ignore[override]
        return fake

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def fake_quant_rows_int8(x: Tensor) -> Tensor:
    """x [R, C] -> the dequantized symmetric per-row int8 of x (quantize_per_token), STE."""
    q, s = torch.ops.pyfast.quantize_per_token(x.detach())
    return _STE.apply(x, (q.float() * s[:, None]).to(x.dtype))


def fake_quant_int4(w: Tensor, group_size: int, symmetric: bool) -> Tensor:
    """w [N, K] -> the weight an Int4Linear from w multiplies by (pack_int4), STE."""
    packed, scales, zeros = torch.ops.pyfast.pack_int4(w.detach(), group_size, symmetric)
    fake = reference.dequantize_int4(packed, scales, zeros, group_size)
    return _STE.apply(w, fake.to(w.dtype))


def _parametrization_reason(mod: nn.Module):
    """None if QAT can carry mod's weight over, else why not. A parametrized weight (a
    pyfast.prune mask) is carried over by registering the same modules on the QAT layer's
    stored Parameter, which is exact only for one-tensor parametrizations without
    right_inverse (registering would apply right_inverse to the stored value again). A
    weight pruned with torch.nn.utils.prune (weight = weight_orig * weight_mask, by a
    forward pre-hook) is carried over as a pyfast.prune mask when its mask is 0/1."""
    pruned = torch_pruned(mod)
    if pruned:
        if pruned != ["weight"]:
            return (f"torch.nn.utils.prune pruned its {', '.join(sorted(set(pruned)))}; QAT "
                    "carries over a mask on the weight only (make the others permanent "
                    "first with torch.nn.utils.prune.remove(module, name))")
        mask = mod.weight_mask
        if not bool(((mask == 0) | (mask == 1)).all()):
            return ("its torch.nn.utils.prune weight_mask holds values other than 0 and 1, "
                    "which a pruning mask cannot carry (make it permanent first with "
                    "torch.nn.utils.prune.remove(module, 'weight'))")
        return None
    if not parametrize.is_parametrized(mod, "weight"):
        return None
    chain = mod.parametrizations.weight
    if chain.is_tensor and not any(hasattr(p, "right_inverse") for p in chain):
        return None
    return (f"its weight has the parametrizations {', '.join(type(p).__name__ for p in chain)}, "
            "which QAT cannot carry over; accepted: pyfast.prune masks and other one-tensor "
            "parametrizations without right_inverse (remove the others first with "
            "torch.nn.utils.parametrize.remove_parametrizations)")


def _share_params(layer: nn.Module, source: nn.Module) -> None:
    """Give layer source's weight and bias Parameters (no copy: an optimizer built before
    prepare_qat still holds them).

    A weight masked by pyfast.prune is a torch parametrization: source.weight is then the
    computed original * mask, not a Parameter. layer takes the stored Parameter
    (parametrizations.weight.original) and the same parametrization modules, so it stays
    masked: pruned weights stay 0 while training, and convert_qat quantizes the masked
    weight, as pyfast.quantize and quantize_static do for a masked layer. A weight pruned
    with torch.nn.utils.prune gives its weight_orig Parameter and its mask, as a
    pyfast.prune mask (which also sets the pruned entries of weight_orig to 0)."""
    reason = _parametrization_reason(source)
    if reason is not None:
        raise ValueError(f"cannot prepare this {type(source).__name__} for QAT: {reason}")
    layer.bias = source.bias
    if torch_pruned(source):
        from ..prune.masks import apply_mask   # (pyfast.prune imports this module)
        layer.weight = source.weight_orig
        apply_mask(layer, source.weight_mask != 0, type(source).__name__)
        return
    if not parametrize.is_parametrized(source, "weight"):
        layer.weight = source.weight
        return
    chain = source.parametrizations.weight
    layer.weight = chain.original
    for p in chain:   # in order: weight = p_n(...p_1(original))
        parametrize.register_parametrization(layer, "weight", p)


class _QATMixin:
    """The fake-quantized weight [N, K] and activations [R, K] of one QAT layer."""

    method: str
    group_size: int
    symmetric: bool

    def _qat_init(self, method: str, group_size: int, symmetric: bool) -> None:
        check_quant_args(method, group_size, symmetric, QAT_METHODS)
        if method == "int8" and symmetric is not True:
            raise ValueError(f"symmetric={symmetric!r}: int8 is always symmetric; "
                             "symmetric=False applies to int4 only")
        self.method, self.group_size, self.symmetric = method, group_size, symmetric

    def fake_weight(self, w2: Tensor) -> Tensor:
        if self.method == "int8":
            return fake_quant_rows_int8(w2)
        return fake_quant_int4(w2, self.group_size, self.symmetric)

    def fake_input(self, x2: Tensor) -> Tensor:
        return fake_quant_rows_int8(x2) if self.method == "int8" else x2

    def _qat_config(self) -> dict:
        return {"method": self.method, "group_size": self.group_size,
                "symmetric": self.symmetric, "dtype": _dtype_name(self.weight.dtype)}

    def _qat_repr(self) -> str:
        if self.method == "int8":
            return "qat=int8 W8A8"
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"qat=int4 {g} {'sym' if self.symmetric else 'asym'}"


class QATLinear(_QATMixin, nn.Module):
    """nn.Linear with fake-quantized weight (and, for int8, activations); float params
    weight [N, K] and bias [N] as nn.Linear has them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 method: str = "int8", group_size: int = 128, symmetric: bool = True,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        self._qat_init(method, group_size, symmetric)
        lin = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = lin.weight, lin.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "int8", group_size: int = 128,
                    symmetric: bool = True) -> "QATLinear":
        """Shares linear's weight and bias Parameters (no copy), and its pruning mask."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    method, group_size, symmetric, device="meta", dtype=linear.weight.dtype)
        _share_params(layer, linear)
        return layer

    def pyfast_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, **self._qat_config()}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "QATLinear":
        cfg = dict(config)
        return cls(**{**cfg, "dtype": _dtype_from_name(cfg.get("dtype", "float32"))},
                   device=device)

    def forward(self, x: Tensor) -> Tensor:
        x2 = self.fake_input(x.reshape(-1, self.in_features))
        out = F.linear(x2, self.fake_weight(self.weight), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def to_pyfast(self) -> nn.Module:
        """The pyfast layer pyfast.quantize makes from the current float weights."""
        return quantized_layer(linear_from_weight(self.weight, self.bias), self.method,
                               self.group_size, self.symmetric)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._qat_repr()}")


class QATConv2d(_QATMixin, ConvGeometry):
    """nn.Conv2d (groups 1, zero padding) with fake-quantized weight; for int8 the
    activations are fake-quantized per receptive field (a row of the im2col matrix),
    which is what QuantConv2d(Int8Linear) quantizes per token at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, method: str = "int8", group_size: int = 128,
                 symmetric: bool = True, device=None, dtype=torch.float32) -> None:
        ConvGeometry.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                              dilation)
        self._qat_init(method, group_size, symmetric)
        conv = nn.Conv2d(in_channels, out_channels, self.kernel_size, bias=bias, device=device,
                         dtype=dtype)
        self.weight, self.bias = conv.weight, conv.bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method: str = "int8", group_size: int = 128,
                  symmetric: bool = True) -> "QATConv2d":
        """Shares conv's weight and bias Parameters (no copy), and its pruning mask."""
        reason = conv_unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot prepare this Conv2d for QAT: {reason}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv_padding(conv), conv.dilation, conv.bias is not None, method,
                    group_size, symmetric, device="meta", dtype=conv.weight.dtype)
        _share_params(layer, conv)
        return layer

    def pyfast_config(self) -> dict:
        return {**self.geometry_config(), "bias": self.bias is not None, **self._qat_config()}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "QATConv2d":
        cfg = dict(config)
        return cls(**{**cfg, "dtype": _dtype_from_name(cfg.get("dtype", "float32"))},
                   device=device)

    def forward(self, x: Tensor) -> Tensor:
        x4, unbatched, size = self._batched(x)
        w2 = self.fake_weight(self.weight.reshape(self.out_channels, -1))
        if self.method == "int4":   # float activations: a plain conv with the fake weight
            t, b, l, r = self.padding
            xp = x4 if (t, l) == (b, r) else F.pad(x4, (l, r, t, b))
            out = F.conv2d(xp, w2.reshape(self.weight.shape), self.bias, self.stride,
                           (t, l) if (t, l) == (b, r) else 0, self.dilation)
            return out.squeeze(0) if unbatched else out
        cols = im2col(x4, self.kernel_size, self.stride, self.padding, self.dilation)
        rows = self.fake_input(cols.reshape(-1, self.in_features))
        # L = H_out * W_out spelled out: -1 cannot be inferred for an empty batch
        out = F.linear(rows, w2, self.bias).reshape(x4.shape[0], size[0] * size[1],
                                                    self.out_channels)
        return self._to_image(out, x4.shape[0], size, unbatched, like=x4)

    def to_pyfast(self) -> nn.Module:
        """The QuantConv2d pyfast.quantize makes from the current float weights."""
        from ..nn import QuantConv2d
        lin = linear_from_weight(self.weight.reshape(self.out_channels, -1), self.bias)
        return QuantConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                           self.padding, self.dilation,
                           inner=quantized_layer(lin, self.method, self.group_size,
                                                 self.symmetric))

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, bias={self.bias is not None}, {self._qat_repr()}"


def prepare_qat(model: nn.Module, method: str = "int8", group_size: int = 128,
                symmetric: bool = True, *, include: Filter = None, exclude: Filter = None,
                conv: bool = True) -> nn.Module:
    """Replace each target nn.Linear (and nn.Conv2d, unless conv=False) by QATLinear /
    QATConv2d, in place; returns model. method "int8" (W8A8) or "int4" (group_size
    32/64/128/-1, symmetric or not). Layers the format cannot take are skipped with
    the reason in model.pyfast_skipped, exactly as pyfast.quantize would skip them.
    A layer masked by pyfast.prune or torch.nn.utils.prune keeps its mask (as a
    pyfast.prune mask): pruned weights stay 0 through QAT, and convert_qat quantizes the
    masked weight (pyfast.quantize does the same)."""
    check_quant_args(method, group_size, symmetric, QAT_METHODS)
    if method == "int8" and symmetric is not True:
        raise ValueError(f"symmetric={symmetric!r}: int8 is always symmetric; "
                         "symmetric=False applies to int4 only")
    if not isinstance(conv, bool):
        raise TypeError(f"conv must be a bool, got {conv!r}")

    def convert(name: str, mod: nn.Module):
        why = _parametrization_reason(mod)   # a prune mask carries over; weight_norm cannot
        if why is not None:
            return why
        if isinstance(mod, _ConvNd):   # Conv1d, Conv3d, ConvTranspose*: skipped, with the reason
            reason = conv_unsupported_reason(mod) or (
                _int4_reason(mod.weight[0].numel(), group_size, "in_channels*kh*kw")
                if method == "int4" else None)
            return reason or QATConv2d.from_conv(mod, method, group_size, symmetric)
        if method == "int4":
            reason = _int4_reason(mod.in_features, group_size, "in_features")
            if reason is not None:
                return reason
        return QATLinear.from_linear(mod, method, group_size, symmetric)

    def is_target(mod: nn.Module) -> bool:
        return isinstance(mod, nn.Linear) or (conv and isinstance(mod, _ConvNd))

    return _walk(model, include, exclude, convert, is_target)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every QATLinear / QATConv2d by its pyfast layer (Int8Linear, Int4Linear or
    QuantConv2d around one), built from the trained float weights; in place. A QAT layer
    with a forward hook or pre-hook (a user's, an open FeatureDistiller's) is refused with
    a ValueError before any layer is converted: the new layer would not run the hook."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QATLinear, QATConv2d))]
    if not layers:
        raise ValueError("model has no QAT layers: call pyfast.quant.prepare_qat(model, method) "
                         "and fine-tune it before convert_qat")
    if layers[0][0] == "":
        raise ValueError(f"model is itself a {type(model).__name__}; wrap it in a container "
                         "(e.g. nn.Sequential(layer)) so it can be replaced in place")
    for name, mod in layers:   # all checked first: a refused call converts nothing
        hooked = hooks_reason(mod)
        if hooked is not None:
            hooked = hooked.replace(" or exclude the layer", "")   # convert_qat has no filters
            raise ValueError(f"cannot convert QAT layer {name!r}: it {hooked}")
    shared = positions(model, lambda m: isinstance(m, (QATLinear, QATConv2d)))
    with torch.no_grad():
        for name, mod in layers:
            replace_module(model, shared[id(mod)][1], mod.to_pyfast())
    return model


__all__ = ["prepare_qat", "convert_qat", "QATLinear", "QATConv2d", "fake_quant_rows_int8",
           "fake_quant_int4", "QAT_METHODS"]
