"""LowRankLinear and LowRankConv2d: a dense layer as two thinner ones, by truncated SVD.

A weight W [N, K] is replaced by its best rank-r approximation in the Frobenius
norm (Eckart-Young-Mirsky): with the SVD W = U S V^T,

    W ~= W_r = U_r S_r V_r^T = (U_r S_r^1/2) (S_r^1/2 V_r^T) = B A,
    A = first.weight [r, K],  B = second.weight [N, r],

and ||W - W_r||_F^2 = sum of the discarded s_i^2. The square root of S goes to
both factors so that they have the same scale (neither is tiny nor huge, which
keeps fine-tuning with one learning rate well conditioned).

A Linear stores r (K + N) weights instead of N K and costs as many multiply-adds
per input row; a Conv2d [C_out, C_in, kh, kw] is factorized on its weight
reshaped to [C_out, C_in*kh*kw] (the im2col matrix): `first` is a conv with the
same kernel, stride, padding and dilation but r output channels, `second` a 1x1
conv from r to C_out channels carrying the bias.

Both are plain nn.Modules with trainable nn.Parameters (fine-tune them like any
layer) and implement pyfast's save/load protocol (pyfast_config / from_config).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import _checks as chk
from ..nn.linear import _dtype_from_name, _dtype_name

Tensor = torch.Tensor
SVD = Tuple[Tensor, Tensor, Tensor]


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def svd(w2: Tensor) -> SVD:
    """The thin SVD (U [N, m], S [m], V^T [m, K]; m = min(N, K)) of w2 [N, K], in float64."""
    return torch.linalg.svd(w2.detach().double(), full_matrices=False)


def svd_factors(w2: Tensor, rank: int, usv: Optional[SVD] = None) -> Tuple[Tensor, Tensor]:
    """w2 [N, K] -> (A [r, K], B [N, r]) in w2's dtype with B @ A the rank-r truncated SVD
    of w2 (computed in float64), sqrt(S) split between the factors. usv: svd(w2) if the
    caller already has it."""
    u, s, vh = svd(w2) if usv is None else usv
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(w2.dtype), b.to(w2.dtype)


def _check_rank(rank, n: int, k: int) -> int:
    _positive_int("rank", rank)
    if rank > min(n, k):
        raise ValueError(f"rank {rank} is larger than min(out, in) = {min(n, k)} of a "
                         f"[{n}, {k}] weight; accepted: 1..{min(n, k)}")
    return rank


def _in_out(mod: nn.Module) -> Tuple[int, int]:
    """(inputs, outputs) of a factor: features of a Linear / pyfast layer / QATLinear,
    channels of a Conv2d / QuantConv2d / QATConv2d. Read from the factor, not stored on
    the pair, so that a factor quantized, pruned or shrunk by structured pruning after
    the factorization keeps the pair's sizes true."""
    if hasattr(mod, "in_channels"):   # before in_features: QuantConv2d has both (K of im2col)
        return mod.in_channels, mod.out_channels
    return mod.in_features, mod.out_features


def _float_dtype(mod: nn.Module) -> torch.dtype:
    """The float dtype of a factor's weight, or of the dense weight a compressed factor
    replaced (its inner layer's, for a QuantConv2d)."""
    w = getattr(mod, "weight", None)
    if isinstance(w, Tensor) and w.is_floating_point():
        return w.dtype
    inner = getattr(mod, "inner", None)
    return _float_dtype(inner) if inner is not None else getattr(mod, "orig_dtype", torch.float32)


def _keep_flags(pair: "_LowRankPair", source: nn.Module) -> None:
    """The pair takes the dense layer's training mode and requires_grad flags: a frozen
    layer stays frozen (an optimizer built from the requires_grad parameters would
    train it otherwise) and an eval-mode model gets no train-mode layer."""
    pair.train(source.training)
    for factor in (pair.first, pair.second):
        factor.weight.requires_grad_(source.weight.requires_grad)
    if source.bias is not None:
        pair.second.bias.requires_grad_(source.bias.requires_grad)


def _size(factor: str, index: int) -> property:
    """A read-only size of the pair: _in_out(self.<factor>)[index]."""
    return property(lambda self: _in_out(getattr(self, factor))[index])


class _LowRankPair(nn.Module):
    """The sizes of first -> second, read from the factors (see _in_out)."""

    first: nn.Module
    second: nn.Module
    # pyfast.save records the factors as modules of their own (serialization.manifest):
    # from_config builds dense factors, and a quantized / QAT / 2:4 factor replaces one
    children_recorded = True

    rank = _size("first", 1)

    @property
    def dtype(self) -> torch.dtype:
        return _float_dtype(self.first)


class LowRankLinear(_LowRankPair):
    """x -> second(first(x)): first = Linear(in, rank, bias=False), second = Linear(rank, out)."""

    in_features, out_features = _size("first", 0), _size("second", 1)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _positive_int("in_features", in_features)
        _positive_int("out_features", out_features)
        _check_rank(rank, out_features, in_features)
        self.has_bias = bias
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int,
                    usv: Optional[SVD] = None) -> "LowRankLinear":
        """The truncated-SVD factorization of linear at `rank` (1..min(out, in)).
        usv: svd(linear.weight) if already computed (pyfast.lowrank.factorize has it).
        The pair keeps linear's training mode and requires_grad flags."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        chk.tensor("linear.weight", linear.weight, dtypes=chk.FLOAT_DTYPES)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        a, b = svd_factors(w, rank, usv)
        with torch.no_grad():
            layer.first.weight.copy_(a)
            layer.second.weight.copy_(b)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        _keep_flags(layer, linear)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def pyfast_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.has_bias, "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "LowRankLinear":
        cfg = dict(config)
        return cls(**{**cfg, "dtype": _dtype_from_name(cfg.get("dtype", "float32"))},
                   device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.has_bias}")


def conv_factorize_reason(conv: nn.Module) -> Optional[str]:
    """None if LowRankConv2d can stand in for this nn.Conv2d, else why not (for skipping)."""
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} overrides nn.Conv2d.forward"
    if conv.groups != 1:
        return (f"groups={conv.groups} (grouped/depthwise conv): the factorization splits the "
                "full [C_out, C_in*kh*kw] weight, which needs groups == 1")
    if conv.weight.dtype not in chk.FLOAT_DTYPES:
        return f"weight dtype {conv.weight.dtype} is not float32/float16/bfloat16"
    return None


class LowRankConv2d(_LowRankPair):
    """x -> second(first(x)): first = Conv2d(C_in, rank, kernel, stride, padding, dilation,
    bias=False), second = Conv2d(rank, C_out, 1) with the bias. groups == 1 only."""

    in_channels, out_channels = _size("first", 0), _size("second", 1)

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size,
                 stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        kernel_size = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) \
            else (kernel_size, kernel_size)
        _check_rank(rank, out_channels, in_channels * kernel_size[0] * kernel_size[1])
        padding = tuple(padding) if isinstance(padding, list) else padding
        self.has_bias = bias
        self.first = nn.Conv2d(in_channels, rank, kernel_size, _tuple(stride), padding,
                               _tuple(dilation), bias=False, padding_mode=padding_mode,
                               device=device, dtype=dtype)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)
        # first's geometry as built: a QuantConv2d / QATConv2d put there later keeps it
        # but spells padding as 4 sides and has no padding_mode
        f = self.first
        self.geometry = {"kernel_size": list(f.kernel_size), "stride": list(f.stride),
                         "padding": f.padding if isinstance(f.padding, str) else list(f.padding),
                         "dilation": list(f.dilation), "padding_mode": f.padding_mode}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, usv: Optional[SVD] = None) -> "LowRankConv2d":
        """The truncated-SVD factorization of conv's weight as [C_out, C_in*kh*kw] at `rank`.
        usv: svd of that reshaped weight if already computed. The pair keeps conv's
        training mode and requires_grad flags."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        reason = conv_factorize_reason(conv)
        if reason is not None:
            raise ValueError(f"cannot factorize this Conv2d: {reason}")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, rank, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.bias is not None, conv.padding_mode,
                    device=w.device, dtype=w.dtype)
        a, b = svd_factors(w.reshape(conv.out_channels, -1), rank, usv)
        with torch.no_grad():
            layer.first.weight.copy_(a.reshape(layer.first.weight.shape))
            layer.second.weight.copy_(b.reshape(layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        _keep_flags(layer, conv)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def pyfast_config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "rank": self.rank, **self.geometry, "bias": self.has_bias,
                "dtype": _dtype_name(self.dtype)}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "LowRankConv2d":
        cfg = dict(config)
        return cls(**{**cfg, "dtype": _dtype_from_name(cfg.get("dtype", "float32"))},
                   device=device)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, "
                f"kernel_size={tuple(g['kernel_size'])}, stride={tuple(g['stride'])}, "
                f"padding={g['padding']}, dilation={tuple(g['dilation'])}, bias={self.has_bias}")


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v
