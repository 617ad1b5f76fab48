"""Pruning masks that stay applied while the model trains, and finish() to make them permanent.

torch.nn.utils.prune keeps `weight_orig` and recomputes `weight = weight_orig * mask`
in a forward pre-hook. pyfast does the same with torch.nn.utils.parametrize: the
layer's `weight` becomes the output of a WeightMask parametrization,

    weight = parametrizations.weight.original * mask        (mask: bool buffer, weight's shape)

so d loss / d original = mask * d loss / d weight is exactly 0 on pruned entries, and
the weight the layer computes with stays 0 there whatever the optimizer does.
The pruned entries of `original` are also set to 0 when the mask is applied; an
optimizer created after that (SGD with or without momentum, Adam with L2 weight decay,
AdamW) leaves them at 0. One that already holds momentum / Adam moments from before
the pruning moves them off 0 again: the forward never sees them, and finish() keeps
the masked values, but build the optimizer after pruning (or reset its state) if the
stored tensor itself must stay 0.
Masks combine with AND, so pruning a layer again never brings a weight back.

finish(model) removes the parametrizations and leaves `weight` a plain Parameter
holding the masked values; finish(model, to_sparse24=True) also turns each masked
layer whose weight is exactly 2:4 into a Sparse24Linear (a Conv2d into a
QuantConv2d around one, on the flattened [C_out, C_in*kh*kw] weight).

The prunable layers are nn.Linear, nn.Conv2d and the QAT layers of pyfast.quant
(QATLinear, QATConv2d: their float weight is a Parameter of the same shape, and
convert_qat quantizes the masked weight, so the zeros survive the conversion).
A layer used at several places (weight sharing) is pruned once, under its first
name, and its mask applies at every place; include/exclude that select only some of
its names leave it as it is, with the reason, as pyfast.quantize does. So is a layer
whose weight Parameter another module holds too (tied weights), an uninitialized lazy
layer, one whose weight torch.nn.utils.prune or another parametrization (weight_norm)
computes, and the other convs (Conv1d, Conv3d, ConvTranspose*). An nn.MultiheadAttention
whose out_proj is selected is named too: its in_proj_weight (Q/K/V, a raw Parameter) is
not pruned. All of that is decided before any mask is applied, so a call that raises
leaves the model as it was.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ..api import (Filter, _lazy_reason, _matcher, _nothing_selected, _param_holders,
                   _tied_reason, _walk, positions, shared_reason, torch_pruned)
from ..nn import QuantConv2d, Sparse24Linear
from ..nn.conv import conv_unsupported_reason
from ..quant.qat import QATConv2d, QATLinear
from ..sparsity import is_24

Tensor = torch.Tensor
QAT_LAYERS = (QATLinear, QATConv2d)
PRUNABLE = (nn.Linear, nn.Conv2d) + QAT_LAYERS
# nn.MultiheadAttention's Q/K/V projections: raw Parameters, not nn.Linear layers
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class WeightMask(nn.Module):
    """Parametrization weight = original * mask; mask a bool buffer of the weight's shape."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, original: Tensor) -> Tensor:
        return original * self.mask   # bool promotes to original's dtype; same shape

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, kept={int(self.mask.sum())}/{self.mask.numel()}"


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def attention_projections(mha: nn.Module) -> List[Tuple[str, Tensor]]:
    """(name, Parameter) of the Q/K/V projection weights an nn.MultiheadAttention holds
    itself (in_proj_weight, or q/k/v_proj_weight when kdim / vdim differ)."""
    return [(n, getattr(mha, n)) for n in ATTENTION_PROJECTIONS
            if isinstance(getattr(mha, n, None), Tensor)]


def _weight_reason(mod: nn.Module) -> Optional[str]:
    """Why a mask cannot go on mod's weight: something else already computes it."""
    if "weight" in torch_pruned(mod):
        return ("pruned with torch.nn.utils.prune (a forward pre-hook computes weight = "
                "weight_orig * weight_mask), which a pyfast.prune mask cannot stack on: make it "
                "permanent first with torch.nn.utils.prune.remove(module, 'weight')")
    if parametrize.is_parametrized(mod, "weight"):
        others = [type(p).__name__ for p in mod.parametrizations.weight
                  if not isinstance(p, WeightMask)]
        if others:
            return (f"its weight has the parametrization {', '.join(others)}, which pyfast.prune "
                    "does not own (a mask cannot be stacked on it): remove it first "
                    "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')) or "
                    "exclude the layer")
        return None
    if mod._parameters.get("weight") is None and mod._buffers.get("weight") is None:
        return ("its weight is neither a Parameter nor a buffer (a forward pre-hook computes "
                "it, as the old torch.nn.utils.weight_norm / spectral_norm do): remove that "
                "first or exclude the layer")
    return None


# _tied_reason's effect for a mask: apply_mask zeroes the shared tensor under the other
# holder, whose gradients then revive the pruned entries, and finish() changes its output
TIED = ("which a mask would break (the other holder reads the shared tensor: the mask zeroes "
        "it there too, and that holder's training revives the pruned entries); to prune it "
        "anyway")


def _skip_reason(mod: nn.Module, holders: Dict[int, list]) -> Optional[str]:
    """Why a layer the filters select is left as it is, or None: decided for every layer
    before any mask is applied, so that a call never stops half way."""
    if not isinstance(mod, PRUNABLE):
        return (f"{type(mod).__name__}: pyfast.prune prunes nn.Linear and nn.Conv2d layers "
                "(and their QAT layers) only")
    return _lazy_reason(mod) or _weight_reason(mod) or _tied_reason(mod, holders, ("weight",), TIED)


def _attention_reasons(model: nn.Module, chosen: set) -> Dict[str, str]:
    """{name: reason} for each nn.MultiheadAttention whose out_proj the filters select (the
    filters are asked about Linear/Conv2d layers only): its Q/K/V projections stay dense."""
    out = {}
    for name, mod in model.named_modules():
        projections = attention_projections(mod) if isinstance(mod, nn.MultiheadAttention) else []
        if projections and id(mod.out_proj) in chosen:
            out[name] = (f"nn.MultiheadAttention holds its Q/K/V projections as raw Parameters "
                         f"({', '.join(n for n, _ in projections)}), not nn.Linear layers: "
                         "pyfast.prune does not prune them (prune.sparsity counts them); its "
                         "out_proj is an nn.Linear and is pruned like one")
    return out


def select(model: nn.Module, include: Filter = None, exclude: Filter = None,
           warn: bool = False) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, str]]:
    """(layers, skipped): (name, module) of every prunable layer the filters select, in
    model order, and the reason for each selected layer left as it is (see the module
    docstring). warn: warn (at the pruner's caller) if the filters select nothing.

    include/exclude: glob(s) on module names or a callable(name, module) -> bool,
    as in pyfast.quantize (pyfast/api.py). A layer used at several places is one
    entry under its first name, and only if the filters select all of its names:
    its mask changes every place, so selecting some of them cannot be honoured."""
    check_model(model)
    inc = _matcher(include, "include", True)
    exc = _matcher(exclude, "exclude", False)
    holders = _param_holders(model)
    layers: List[Tuple[str, nn.Module]] = []
    skipped: Dict[str, str] = {}
    found = positions(model, lambda m: isinstance(m, PRUNABLE + (_ConvNd,))).values()
    selected = set()
    for mod, names in found:
        chosen = [n for n in names if inc(n, mod) and not exc(n, mod)]
        if chosen:
            selected.add(id(mod))
        why = _skip_reason(mod, holders) if chosen else None
        if len(chosen) == len(names) and why is None:
            layers.append((names[0], mod))
        elif chosen:
            skipped[names[0]] = why or shared_reason(names, chosen, "pruning")
    skipped.update(_attention_reasons(model, selected))
    if warn and not layers and not skipped:
        prunable = [names[0] for mod, names in found if isinstance(mod, PRUNABLE)]
        warnings.warn(_nothing_selected(include, exclude, prunable, "nn.Linear / nn.Conv2d layers",
                                        "pruned"),
                      stacklevel=3)
    return layers, skipped


def targets(model: nn.Module, include: Filter = None,
            exclude: Filter = None) -> List[Tuple[str, nn.Module]]:
    """The layers of select(model, include, exclude), without the reasons."""
    return select(model, include, exclude)[0]


def _mask_param(module: nn.Module) -> Optional[WeightMask]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    masks = [p for p in module.parametrizations.weight if isinstance(p, WeightMask)]
    return masks[0] if masks else None


def get_mask(module: nn.Module) -> Optional[Tensor]:
    """The bool mask [weight's shape] applied to module.weight, or None if not masked."""
    p = _mask_param(module)
    return None if p is None else p.mask


def is_masked(module: nn.Module) -> bool:
    return _mask_param(module) is not None


def check_mask(module: nn.Module, mask, name: str = "") -> None:
    """TypeError / ValueError unless mask is a bool tensor of module.weight's shape."""
    weight = module.weight
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask for layer {name!r} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask for layer {name!r} has shape {tuple(mask.shape)}; it must have "
                         f"the weight's shape {tuple(weight.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask for layer {name!r} has dtype {mask.dtype}; accepted: torch.bool "
                        "(True = keep)")


def apply_mask(module: nn.Module, mask: Tensor, name: str = "") -> None:
    """AND `mask` (bool, module.weight's shape) into the module's mask, creating it if needed."""
    check_mask(module, mask, name)
    mask = mask.to(module.weight.device)
    p = _mask_param(module)
    if p is None:
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
    else:
        p.mask &= mask
    with torch.no_grad():   # zero the stored values too: a fresh optimizer keeps them at 0
        module.parametrizations.weight.original.mul_(_mask_param(module).mask)


def effective_weight(module: nn.Module) -> Tensor:
    """module.weight as the forward uses it (masked), detached."""
    with torch.no_grad():
        return module.weight.detach()


def record_skipped(model: nn.Module, skipped: Dict[str, str], done: List[str],
                   stacklevel: int = 3) -> None:
    """Merge reasons into model.pyfast_skipped (shown by pyfast.summary) and warn once,
    as pyfast.quantize does; layers handled in this call (`done`) leave the list.
    stacklevel: as warnings.warn's, counted from the caller (3: its caller's caller)."""
    merged = dict(getattr(model, "pyfast_skipped", {}))
    for name in done:
        merged.pop(name or "<root>", None)
    merged.update({(n or "<root>"): r for n, r in skipped.items()})
    model.pyfast_skipped = merged
    if skipped:
        warnings.warn("pyfast.prune left these layers as they were: "
                      + "; ".join(f"{n}: {r}" for n, r in skipped.items()), stacklevel=stacklevel)


def _sparse24(name: str, mod: nn.Module):
    """The 2:4 layer for a finished (unmasked) Linear/Conv2d, or why it stays dense."""
    if isinstance(mod, QAT_LAYERS):   # no 2:4 QAT format: convert_qat quantizes it, zeros kept
        return (f"{type(mod).__name__}: mask made permanent, stays a QAT layer "
                "(pyfast.quant.convert_qat quantizes it with its zeros)")
    w = mod.weight.detach()
    flat = w.reshape(w.shape[0], -1)
    if flat.shape[1] % 4:
        return f"input size {flat.shape[1]} is not a multiple of 4: cannot be 2:4; stays dense"
    if not is_24(flat):
        return "weight is not 2:4 (prune it with prune.n_m(model, 2, 4) first); stays dense"
    if isinstance(mod, nn.Conv2d):
        return conv_unsupported_reason(mod) or QuantConv2d.from_conv(mod, Sparse24Linear.from_linear)
    return Sparse24Linear.from_linear(mod)


def finish(model: nn.Module, to_sparse24: bool = False) -> nn.Module:
    """Make every pruning mask permanent, in place; returns model.

    Each masked layer's weight becomes a plain Parameter holding weight * mask (the
    parametrization and its mask are removed). to_sparse24=True then replaces each
    masked nn.Linear whose weight is exactly 2:4 by Sparse24Linear.from_linear, and
    each such nn.Conv2d by a QuantConv2d with a Sparse24Linear inside; masked layers
    that are not 2:4 stay dense, and masked QAT layers stay QAT layers, listed in
    model.pyfast_skipped with the reason.
    """
    check_model(model)
    if not isinstance(to_sparse24, bool):
        raise TypeError(f"to_sparse24 must be a bool, got {to_sparse24!r}")
    finished = set()
    for _, mod in list(model.named_modules()):
        if is_masked(mod):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            finished.add(id(mod))
    if to_sparse24 and finished:
        with torch.no_grad():
            _walk(model, None, None, _sparse24, lambda m: id(m) in finished)
    return model
