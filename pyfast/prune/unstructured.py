"""Unstructured and N:M pruning with masks (see masks.py): magnitude, random, custom, n_m.

`amount` is the fraction of each layer's weights (scope="global": of all targeted
weights together) that are zero after the call: round(amount * numel) of them.
It counts the weights an earlier call already pruned, unlike torch.nn.utils.prune
where amount is a fraction of what is left; so iterative schedules pass their
target sparsity directly. Already-pruned weights score -inf and are pruned first,
and the new mask is ANDed with the old one, so a call never revives a weight
(asking for less sparsity than a layer has leaves it as it is).
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ..api import Filter
from .masks import apply_mask, check_mask, effective_weight, get_mask, record_skipped, select

Tensor = torch.Tensor
SCOPES = ("layer", "global")


def check_amount(amount, name: str = "amount") -> float:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {amount!r}")
    if not 0.0 <= float(amount) < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) of the weights to prune (not a "
                         f"count or a percentage), got {amount!r}")
    return float(amount)


def _scores(mod: nn.Module, score: Tensor) -> Tensor:
    """score (weight's shape) as float32, with entries already masked out at -inf."""
    s = score.detach().float().clone()
    mask = get_mask(mod)
    if mask is not None:
        s[~mask] = float("-inf")
    return s


def _keep_top(scores: Tensor, n_prune: int) -> Tensor:
    """Bool mask of scores' shape keeping the numel - n_prune highest (ties: topk's order)."""
    flat = scores.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    n_keep = flat.numel() - n_prune
    if n_keep > 0:
        keep[flat.topk(n_keep, sorted=False).indices] = True
    return keep.reshape(scores.shape)


def _prune_by_scores(model: nn.Module, layers: List[Tuple[str, nn.Module]], scores: List[Tensor],
                     amount: float, scope: str, skipped: Dict[str, str]) -> nn.Module:
    if scope == "layer":
        for (name, mod), s in zip(layers, scores):
            apply_mask(mod, _keep_top(s, round(amount * s.numel())), name)
    else:   # one threshold over every targeted weight: rank them all together
        flat = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.zeros(0)
        keep = _keep_top(flat, round(amount * flat.numel()))
        for (name, mod), part in zip(layers, keep.split([s.numel() for s in scores])):
            apply_mask(mod, part.reshape(mod.weight.shape), name)
    record_skipped(model, skipped, [n for n, _ in layers], stacklevel=4)   # the user's call
    return model


def magnitude(model: nn.Module, amount: float, scope: str = "layer", *,
              include: Filter = None, exclude: Filter = None) -> nn.Module:
    """Keep the largest |w| (Han et al. 2015, "Learning both Weights and Connections").

    scope="layer": each layer keeps its top (1 - amount) |w|. scope="global": one
    threshold over all targeted weights together, so layers end up with different
    sparsities (the redundant ones lose more). In place; returns model.
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not supported; accepted: {', '.join(SCOPES)}")
    layers, skipped = select(model, include, exclude, warn=True)
    return _prune_by_scores(model, layers, [_scores(m, effective_weight(m).abs()) for _, m in layers],
                            amount, scope, skipped)


def random(model: nn.Module, amount: float, seed: int = 0, *, include: Filter = None,
           exclude: Filter = None) -> nn.Module:
    """Prune a random round(amount * numel) of each layer's weights (a baseline), drawn
    with torch.Generator().manual_seed(seed); in place; returns model."""
    amount = check_amount(amount)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    layers, skipped = select(model, include, exclude, warn=True)
    scores = [_scores(m, torch.rand(m.weight.shape, generator=gen)) for _, m in layers]
    return _prune_by_scores(model, layers, scores, amount, "layer", skipped)


def custom(model: nn.Module, fn: Callable[[str, nn.Module, Tensor], Tensor], *,
           include: Filter = None, exclude: Filter = None) -> nn.Module:
    """fn(name, module, weight) -> bool mask of weight's shape (True = keep), for each
    targeted layer; weight is the current (masked) weight, detached. In place."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable(name, module, weight) -> bool mask, got {fn!r}")
    layers, skipped = select(model, include, exclude, warn=True)
    masks = []
    for name, mod in layers:   # every mask checked before any is applied: all or nothing
        mask = fn(name, mod, effective_weight(mod))
        if not isinstance(mask, Tensor):
            raise TypeError(f"fn returned {type(mask).__name__} for layer {name!r}; it must "
                            "return a bool torch.Tensor of the weight's shape")
        check_mask(mod, mask, name)
        masks.append(mask)
    for (name, mod), mask in zip(layers, masks):
        apply_mask(mod, mask, name)
    record_skipped(model, skipped, [n for n, _ in layers])
    return model


def _top_n(groups: Tensor, n: int) -> Tensor:
    """Indices of the n highest scores of each group (last dim); ties go to the lower index
    (a stable descending sort), the rule of magnitude_24_mask, so the mask is the same on
    every device and run. topk would leave ties in an unspecified order."""
    return groups.argsort(dim=-1, descending=True, stable=True)[..., :n]


def check_n_m(n, m) -> None:
    for arg, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{arg} must be an int, got {v!r}")
    if not (m >= 2 and 1 <= n < m):
        raise ValueError(f"n:m = {n}:{m} is not supported; accepted: ints with 1 <= n < m "
                         "(keep n of every m consecutive inputs, e.g. 2:4)")


def n_m(model: nn.Module, n: int = 2, m: int = 4, *, include: Filter = None,
        exclude: Filter = None) -> nn.Module:
    """N:M semi-structured magnitude pruning: in every group of m consecutive inputs of
    each output row keep the n largest |w| (Mishra et al. 2021, "Accelerating Sparse
    Deep Neural Networks", 2:4 on Ampere). Groups run along the input dimension: K of
    a Linear weight [N, K], the flattened C_in*kh*kw of a Conv2d weight [O, C_in, kh, kw]
    (what im2col multiplies). Equal |w| go to the lower index, so 2:4 gives exactly
    pyfast.sparsity.magnitude_24_mask.
    Layers whose input size is not a multiple of m are left alone, with the reason in
    model.pyfast_skipped and a warning. In place; returns model.
    """
    check_n_m(n, m)
    layers, skipped = select(model, include, exclude, warn=True)
    done = []
    for name, mod in layers:   # every mask computed before any is applied: all or nothing
        w = effective_weight(mod)
        rows, k = w.shape[0], w[0].numel()
        if k % m:
            skipped[name] = f"input size {k} is not a multiple of m={m} ({n}:{m} pruning)"
            continue
        groups = _scores(mod, w.abs()).reshape(rows, k // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, _top_n(groups, n), True)
        done.append((name, mod, keep.reshape(w.shape)))
    for name, mod, keep in done:
        apply_mask(mod, keep, name)
    record_skipped(model, skipped, [name for name, _, _ in done])
    return model
