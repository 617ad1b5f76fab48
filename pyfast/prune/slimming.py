"""Sparsity-inducing penalties to add to the training loss before pruning.

    loss = task_loss + prune.l1_penalty(model, 1e-4)          # before prune.magnitude
    loss = task_loss + prune.slimming_penalty(model, 1e-4)    # before structured(criterion="bn")

slimming_penalty is the channel-level sparsity of network slimming (Liu et al. 2017,
"Learning Efficient Convolutional Networks through Network Slimming", eq. 1):
lambda * sum |gamma| over the BatchNorm scale factors, which drives the gammas of
unneeded channels toward 0 so that pruning them by |gamma| costs little.
Both return a differentiable scalar tensor (the subgradient sign(w) at the weights).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..api import Filter, _matcher
from .masks import check_model, targets

Tensor = torch.Tensor
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight >= 0:
        raise ValueError(f"weight must be a float >= 0 (the penalty's coefficient), got {weight!r}")
    return float(weight)


def l1_penalty(model: nn.Module, weight: float = 1e-4, *, include: Filter = None,
               exclude: Filter = None) -> Tensor:
    """weight * sum |w| over the (masked) weights of the targeted Linear/Conv2d layers."""
    weight = _check_weight(weight)
    layers = targets(model, include, exclude)
    if not layers:
        raise ValueError("l1_penalty found no nn.Linear / nn.Conv2d layer in model "
                         "(after include/exclude)")
    return weight * sum(m.weight.abs().sum() for _, m in layers)


def slimming_penalty(model: nn.Module, weight: float = 1e-4, *, include: Filter = None,
                     exclude: Filter = None) -> Tensor:
    """weight * sum |gamma| over the affine BatchNorm layers (network slimming, eq. 1)."""
    weight = _check_weight(weight)
    check_model(model)
    inc, exc = _matcher(include, "include", True), _matcher(exclude, "exclude", False)
    gammas = [m.weight for n, m in model.named_modules()
              if isinstance(m, NORMS) and m.weight is not None and inc(n, m) and not exc(n, m)]
    if not gammas:
        raise ValueError("slimming_penalty found no affine BatchNorm layer in model (after "
                         "include/exclude); network slimming needs BatchNorm scale factors")
    return weight * sum(g.abs().sum() for g in gammas)
