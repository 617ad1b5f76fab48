"""pyfast.summary(model): one row per linear/conv layer, dense or compressed, and totals.

Rows: every nn.Linear and torch conv (Conv1d/2d/3d, ConvTranspose*: dense; a layer pruned
with pyfast.prune masks shows the sparsity of its effective, masked weight), every
uninitialized lazy layer (LazyLinear, LazyConv*: format "uninitialized (lazy)", params and
bytes unknown and counted as 0, sparsity NaN), every pyfast layer, every wrapper
around one (QuantConv2d), every QAT layer (float weights still: before == after), and
every low-rank pair (LowRankLinear / LowRankConv2d). A wrapper or a pair is one row and
its inner layers are not listed again, so nothing is counted twice.

A low-rank row: params and "before" are those of the dense layer it stands for; "after"
adds up what its two factors store now (dense, or quantized / pruned after factorizing);
sparsity and `weights` count the factors' r (in + out) weights, which are what pruning
them zeroes (the product of two factors is dense however sparse they are).

Tied tensors: a row that holds a tensor an earlier row already holds (two layers sharing
one weight Parameter, or two wrappers sharing one inner layer) keeps the layer's own
figures and is marked "tied with <that row>"; the totals count each tensor once (the same
data: device, address, element count and dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from . import reference
from .lowrank.layers import LowRankConv2d, LowRankLinear
from .nn import Int4Linear, LowBitLinear, Sparse24Int4Linear, Sparse24Linear, _CompressedLinear
from .quant.qat import QATConv2d, QATLinear


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    format: str
    params: int          # logical weight + bias elements (as the dense layer has them)
    bytes_before: int    # the dense layer in its original dtype
    bytes_after: int     # what the layer stores now
    sparsity: float      # fraction of zero weights in the effective dense weight
    weights: int = 0     # weight elements (no bias) that sparsity counts
    # the part of params / bytes_before / bytes_after held by tensors that the earlier row
    # `tied_with` already counts (the totals leave it out); "" and 0s: nothing shared
    tied_with: str = ""
    tied_params: int = 0
    tied_before: int = 0
    tied_after: int = 0


LAZY_FORMAT = "uninitialized (lazy)"


class Summary(list):
    """LayerRow list; str() is the table. `.skipped` maps layer names to reasons.
    The totals count a tensor that tied rows share once."""

    skipped: dict

    @property
    def total_params(self) -> int:
        return sum(r.params - r.tied_params for r in self)

    @property
    def total_before(self) -> int:
        return sum(r.bytes_before - r.tied_before for r in self)

    @property
    def total_after(self) -> int:
        return sum(r.bytes_after - r.tied_after for r in self)

    def __str__(self) -> str:
        head = f"{'layer':<28}{'type':<22}{'format':<26}{'params':>11}{'before':>11}{'after':>11}{'sparsity':>9}"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.name[:27]:<28}{r.type[:21]:<22}{r.format[:25]:<26}{r.params:>11,}"
                         f"{_mib(r.bytes_before):>11}{_mib(r.bytes_after):>11}{r.sparsity:>8.1%}"
                         + (f"  tied with {r.tied_with}" if r.tied_with else ""))
        ratio = self.total_before / self.total_after if self.total_after else float("nan")
        lines += ["-" * len(head),
                  f"{'total':<76}{self.total_params:>11,}{_mib(self.total_before):>11}"
                  f"{_mib(self.total_after):>11}   ({ratio:.2f}x smaller)"]
        if any(r.tied_with for r in self):
            lines.append("tied: a row marked 'tied with X' shares tensors with row X; "
                         "the totals count them once")
        lazy = [r.name for r in self if r.format == LAZY_FORMAT]
        if lazy:
            lines.append(f"uninitialized lazy layers (params and bytes unknown, counted as 0; "
                         f"run a forward first): {', '.join(lazy)}")
        for name, why in self.skipped.items():
            lines.append(f"left as is: {name}: {why}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<pyfast.Summary of {len(self)} layers>"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}MiB" if n >= 2**20 else f"{n / 2**10:.1f}KiB"


def _dense_row(name: str, mod: nn.Module) -> LayerRow:
    """nn.Linear / torch conv (_ConvNd) / QAT layer; a masked (parametrized) weight is
    read as the forward sees it."""
    with torch.no_grad():
        w = mod.weight.detach()
    nbias = 0 if mod.bias is None else mod.bias.numel()
    nbytes = (w.numel() + nbias) * w.element_size()
    zeros = _zero_fraction(w)
    masked = parametrize.is_parametrized(mod, "weight")
    cls = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
    dtype = str(w.dtype).replace('torch.', '')
    fmt = f"dense {dtype}" + (", masked" if masked else "")
    if isinstance(mod, (QATLinear, QATConv2d)):     # "qat=int4 g128 sym" -> "QAT int4 g128 sym"
        short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        fmt = f"QAT {mod._qat_repr()[4:]}, {short}"
    return LayerRow(name, cls.__name__, fmt, w.numel() + nbias, nbytes, nbytes, zeros, w.numel())


def _lazy_row(name: str, mod: nn.Module) -> LayerRow:
    """A LazyLinear / LazyConv* before its first forward: no shapes yet, so params and
    bytes are unknown (0 here; the table says so) and sparsity is NaN."""
    return LayerRow(name, type(mod).__name__, LAZY_FORMAT, 0, 0, 0, float("nan"), 0)


def _zero_fraction(w: Tensor) -> float:
    """Fraction of zeros; NaN for a tensor without data (the meta device)."""
    return float("nan") if w.is_meta else float((w == 0).sum()) / max(w.numel(), 1)


def _nonzero_fraction(t: Tensor, total: int) -> float:
    return float("nan") if t.is_meta else float((t != 0).sum()) / max(total, 1)


def _effective_weight(layer: _CompressedLinear) -> Tensor:
    """The weight whose zeros the sparsity column counts: the int8 codes (a zero code is a
    zero weight), else the dequantized weight (int4 and low-bit: q == zero point), in
    whatever layout the layer stores."""
    if hasattr(layer, "weight_int8"):                        # Int8, Int8WeightOnly, Static
        return layer.canonical_weight() if hasattr(layer, "canonical_weight") else layer.weight_int8
    if isinstance(layer, Sparse24Int4Linear):
        return layer.dequantized_weight()
    if isinstance(layer, Int4Linear):
        return reference.dequantize_int4(layer.canonical_packed(), layer.scales, layer.zeros,
                                         layer.group_size)
    if isinstance(layer, LowBitLinear):
        return reference.dequantize_lowbit(layer.packed, layer.scales, layer.zeros, layer.bits,
                                           layer.group_size)
    raise TypeError(f"no effective weight for {type(layer).__name__}")


def _compressed_row(name: str, mod: nn.Module, inner: _CompressedLinear) -> LayerRow:
    """A pyfast layer (mod is inner) or a wrapper around one (QuantConv2d: mod, its inner)."""
    n, k = inner.out_features, inner.in_features
    params = n * k + (0 if inner.bias is None else n)
    if isinstance(inner, Sparse24Linear):
        sparsity = 1.0 - _nonzero_fraction(inner.values, n * k)
    else:
        sparsity = _zero_fraction(_effective_weight(inner))
    return LayerRow(name, type(mod).__name__, getattr(mod, "format", inner.format), params,
                    mod.dense_bytes(), mod.storage_bytes(), sparsity, n * k)


def _wrapped(mod: nn.Module):
    """The pyfast layer a wrapper module (QuantConv2d) stands on, else None: a module that
    is not itself a pyfast layer, reports its own bytes, and has one as a direct child."""
    if isinstance(mod, _CompressedLinear) or not (callable(getattr(mod, "storage_bytes", None))
                                                  and callable(getattr(mod, "dense_bytes", None))):
        return None
    inner = [c for c in mod.children() if isinstance(c, _CompressedLinear)]
    return inner[0] if len(inner) == 1 else None


# A piece of a row's figures for the tie check: (tensors that hold it, params,
# bytes_before, bytes_after).
_Part = Tuple[List[Tensor], int, int, int]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _dense_parts(mod: nn.Module) -> List[_Part]:
    """A dense row's weight and bias, as _dense_row counts them (the bias at the weight's
    element size). A parametrized weight (pyfast.prune masks, weight_norm) is held by its
    parametrization's originals ("original", or "original0", "original1", ...)."""
    weight = mod.weight
    held = [weight]
    if parametrize.is_parametrized(mod, "weight"):
        plist = mod.parametrizations.weight
        held = [t for name, t in [*plist.named_parameters(recurse=False),
                                  *plist.named_buffers(recurse=False)]
                if name.startswith("original")]
    esize = weight.element_size()
    parts = [(held, weight.numel(), weight.numel() * esize, weight.numel() * esize)]
    if mod.bias is not None:
        nbias = mod.bias.numel() * esize
        parts.append(([mod.bias], mod.bias.numel(), nbias, nbias))
    return parts


def _compressed_parts(inner: _CompressedLinear) -> List[_Part]:
    """A pyfast layer's weight (every buffer but the bias) and bias, as its row counts them."""
    n, k = inner.out_features, inner.in_features
    esize = torch.empty(0, dtype=inner.orig_dtype).element_size()
    weight = [b for name, b in inner.named_buffers() if name != "bias"]
    parts = [(weight, n * k, n * k * esize, sum(map(_nbytes, weight)))]
    if inner.bias is not None:
        parts.append(([inner.bias], n, n * esize, _nbytes(inner.bias)))
    return parts


def _lowrank_row(name: str, mod: nn.Module) -> Tuple[LayerRow, List[_Part]]:
    """One row for a LowRankLinear / LowRankConv2d from the rows of its two factors; its
    parts: one, held by every tensor the factors' rows count."""
    listed = [pair for part in ("first", "second")
              for pair in _listed(getattr(mod, part).named_modules(prefix=f"{name}.{part}"))]
    factors = [row for row, _ in listed]
    if isinstance(mod, LowRankLinear):
        n, k = mod.out_features, mod.in_features
    else:
        kh, kw = mod.geometry["kernel_size"]
        n, k = mod.out_channels, mod.in_channels * kh * kw
    bias = factors[-1].params - factors[-1].weights     # second's row (the bias is there)
    params = n * k + bias
    # bytes per element of the dense layer: the factors' float dtype, whatever they are now
    per = factors[0].bytes_before / factors[0].params
    weights = sum(p.weights for p in factors)
    zeros = sum(p.sparsity * p.weights for p in factors)
    formats = list(dict.fromkeys(p.format for p in factors))
    row = LayerRow(name, type(mod).__name__, f"rank {mod.rank}: " + " + ".join(formats),
                   params, round(params * per), sum(p.bytes_after for p in factors),
                   zeros / weights, weights)
    tensors = [t for _, parts in listed for part in parts for t in part[0]]
    return row, [(tensors, row.params, row.bytes_before, row.bytes_after)]


def _listed(named_modules) -> List[Tuple[LayerRow, List[_Part]]]:
    """(row, parts) of the layers among (name, module) pairs in named_modules() order, each
    layer once."""
    listed = []
    covered = []   # wrappers / pairs already listed: their inner layers are not listed again
    for name, mod in named_modules:
        if any(c == "" or name.startswith(c + ".") for c in covered):
            continue
        inner = _wrapped(mod)
        if inner is not None:
            listed.append((_compressed_row(name, mod, inner), _compressed_parts(inner)))
            covered.append(name)
        elif isinstance(mod, (LowRankLinear, LowRankConv2d)):
            listed.append(_lowrank_row(name, mod))
            covered.append(name)
        elif isinstance(mod, _CompressedLinear):
            listed.append((_compressed_row(name, mod, mod), _compressed_parts(mod)))
        elif isinstance(mod, (nn.Linear, _ConvNd, QATLinear, QATConv2d)):
            if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
                listed.append((_lazy_row(name, mod), []))
            else:
                listed.append((_dense_row(name, mod), _dense_parts(mod)))
    return listed


def _key(t: Tensor) -> tuple:
    """Tensors with the same key hold the same data: device, address, element count and
    dtype. One without data to compare (meta device, empty, not strided) is only itself."""
    if t.is_meta or t.numel() == 0 or t.layout != torch.strided:
        return ("object", id(t))
    return (str(t.device), t.data_ptr(), t.numel(), t.dtype)


def _tie(row: LayerRow, parts: List[_Part], counted: Dict[tuple, str]) -> LayerRow:
    """row with its tied_* fields: the parts whose tensors the rows before it already
    count (a part partly held by such tensors: their bytes only); then its own tensors
    go into counted (tensor key -> name of the row that counts it)."""
    tied_with, params, before, after = "", 0, 0, 0
    for tensors, p_params, p_before, p_after in parts:
        keys = [_key(t) for t in tensors]
        seen = [i for i, key in enumerate(keys) if key in counted]
        if not seen:
            continue
        tied_with = tied_with or counted[keys[seen[0]]]
        if len(seen) == len(keys):
            params, before, after = params + p_params, before + p_before, after + p_after
        else:
            after += sum(_nbytes(tensors[i]) for i in seen)
    for key in (_key(t) for tensors, *_ in parts for t in tensors):
        counted.setdefault(key, row.name)
    if not tied_with:
        return row
    return replace(row, tied_with=tied_with, tied_params=params, tied_before=before,
                   tied_after=after)


def _rows(named_modules) -> "Summary":
    """The rows of the layers among (name, module) pairs in named_modules() order, each
    layer once, tied rows marked."""
    rows = Summary()
    counted: Dict[tuple, str] = {}
    for row, parts in _listed(named_modules):
        rows.append(_tie(row, parts, counted))
    return rows


def summary(model: nn.Module, print_table: bool = True) -> Summary:
    """Per-layer table: type, format, parameters, bytes before/after, sparsity, totals.

    Prints it (unless print_table=False) and returns it as a Summary (a list of
    LayerRow), so the numbers can be read programmatically too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows = _rows(model.named_modules())
    rows.skipped = dict(getattr(model, "pyfast_skipped", {}))
    if print_table:
        print(rows)
    return rows
