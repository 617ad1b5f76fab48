"""Structured pruning that really removes channels/neurons: the model gets smaller.

structured(model, amount, example_input) finds, with graph.analyze, every Conv2d /
Linear whose output channels only reach BatchNorms, element-wise ops, pooling,
flatten and other Conv2d/Linear inputs; removes `amount` of those channels (the
least important by the criterion) and rebuilds the touched layers as new, smaller
plain nn.Conv2d / nn.Linear / nn.BatchNorm1d/2d modules with sliced weights, biases
and running statistics. Removing a channel is exactly the same as zeroing the
consumers' weights for it (the consumers never see it), which the tests check.

Criteria (the score of output channel c of a producer with weight W [C_out, ...]):
- "l1": sum |W[c]| (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- "l2": ||W[c]||_2.
- "bn": |gamma_c| of the BatchNorm after the layer (Liu et al. 2017, "Learning
  Efficient Convolutional Networks through Network Slimming"); train with
  prune.slimming_penalty first. Its default scope is "global": one threshold over
  the gammas of every prunable layer, as in the paper; scope="layer" prunes
  `amount` of each layer. Norms of different layers are not comparable, so "l1" /
  "l2" prune per layer only.
Each layer keeps at least one channel.

A rebuilt layer is a new module: pyfast.prune masks, requires_grad and train/eval
mode are carried over, anything else it carries is not. So a producer is left as it
is, with the reason, if it or a layer that would be rebuilt with it (its BatchNorms and
consumers) has forward / backward hooks, a parametrization other than a pyfast.prune
mask (weight_norm), a torch.nn.utils.prune mask, or a Parameter another module holds
too (tied weights). Every layer is rebuilt before any is put into the model, so a
call that raises leaves the model as it was.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..api import (Filter, _matcher, _nothing_selected, _param_holders, _tied_reason, positions,
                   replace_module, torch_pruned)
from ..nn.conv import hooks_reason
from .graph import Plan, analyze, plain_type
from .masks import (WeightMask, apply_mask, check_model, effective_weight, get_mask,
                    record_skipped)
from .unstructured import check_amount

Tensor = torch.Tensor
CRITERIA = ("l1", "l2", "bn")


def _scores(model_modules: Dict[str, nn.Module], plan: Plan, criterion: str) -> Optional[Tensor]:
    """One float score per output channel [C_out], or None (criterion "bn" without a BN)."""
    if criterion == "bn":
        bn = model_modules[plan.norms[0]] if plan.norms else None
        return None if bn is None or bn.weight is None else bn.weight.detach().abs().float()
    w = effective_weight(model_modules[plan.name]).float().reshape(plan.channels, -1)
    return w.abs().sum(dim=1) if criterion == "l1" else w.norm(dim=1)


def _keep_highest(scores: Tensor, n_remove: int) -> Tensor:
    """Indices (ascending) of the channels kept: all but the n_remove lowest, at least one."""
    n_keep = max(scores.numel() - n_remove, 1)
    return scores.topk(n_keep).indices.sort().values


def _select(scores: Dict[str, Tensor], amount: float, scope: str) -> Dict[str, Tensor]:
    if scope == "layer":
        return {n: _keep_highest(s, round(amount * s.numel())) for n, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    n_remove = round(amount * flat.numel())
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_remove:
        removed[(-flat).topk(n_remove).indices] = True    # the lowest scores over all layers
    out = {}
    for name, gone in zip(names, removed.split([scores[n].numel() for n in names])):
        keep = (~gone).nonzero().flatten()
        out[name] = keep if keep.numel() else scores[name].argmax().reshape(1)
    return out


def _rebuild_reason(mod: nn.Module, holders: Dict[int, list]) -> Optional[str]:
    """Why mod cannot be rebuilt smaller: the new plain layer would drop what it carries
    besides its tensors and pyfast.prune mask, or untie a Parameter it shares."""
    pruned = torch_pruned(mod)
    if pruned:
        return (f"pruned with torch.nn.utils.prune ({', '.join(pruned)}), whose mask the "
                "smaller layer would drop: make it permanent first with "
                "torch.nn.utils.prune.remove(module, name)")
    if parametrize.is_parametrized(mod):
        foreign = [f"{type(p).__name__} on {tname}" for tname, plist in mod.parametrizations.items()
                   for p in plist if tname != "weight" or not isinstance(p, WeightMask)]
        if foreign:
            return (f"has the parametrization {', '.join(foreign)}, which the smaller layer "
                    "would drop (only pyfast.prune masks are carried over): remove it first "
                    "(torch.nn.utils.parametrize.remove_parametrizations) or exclude the layer")
    hooked = hooks_reason(mod)
    if hooked is None and (mod._backward_hooks or mod._backward_pre_hooks):
        hooked = ("has a backward hook, which the smaller layer would not run: remove it "
                  "first or exclude the layer")
    return hooked or _tied_reason(mod, holders, effect="which the smaller layer would untie "
                                  "(it gets sliced copies); to prune it anyway")


def _plan_reason(modules: Dict[str, nn.Module], plan: Plan,
                 holders: Dict[int, list]) -> Optional[str]:
    """Why a producer is left as it is because a layer its pruning rebuilds cannot be."""
    for role, name in ([("", plan.name)] + [("its BatchNorm", n) for n in plan.norms]
                       + [("its consumer", n) for n, _ in plan.consumers]):
        why = _rebuild_reason(modules[name], holders)
        if why is not None:
            return why if not role else f"{role} {name!r} cannot be rebuilt smaller: {why}"
    return None


def _expand(keep: Tensor, group: int) -> Tensor:
    """Channel indices -> the input columns they own: c*group ... c*group + group - 1."""
    return (keep[:, None] * group + torch.arange(group, device=keep.device)[None, :]).reshape(-1)


def _rebuild(mod: nn.Module, out_idx: Optional[Tensor], in_idx: Optional[Tensor]) -> nn.Module:
    """A new plain layer with the kept output rows / input columns (masks carried over)."""
    cls = plain_type(mod)
    if cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        new = cls(len(out_idx), eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                  track_running_stats=mod.track_running_stats, **kw)
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(mod, key)
                if src is not None:
                    getattr(new, key).copy_(src[out_idx.to(src.device)])
            if getattr(mod, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(mod.num_batches_tracked)
        for key in ("weight", "bias"):   # a frozen affine BatchNorm stays frozen
            if getattr(mod, key) is not None:
                getattr(new, key).requires_grad_(getattr(mod, key).requires_grad)
        return new.train(mod.training)
    w, mask, bias = effective_weight(mod), get_mask(mod), mod.bias
    rows = out_idx if out_idx is not None else torch.arange(w.shape[0])
    cols = in_idx if in_idx is not None else torch.arange(w.shape[1])
    w = w[rows.to(w.device)][:, cols.to(w.device)]
    kw = dict(bias=bias is not None, device=w.device, dtype=w.dtype)
    if cls is nn.Linear:
        new = nn.Linear(w.shape[1], w.shape[0], **kw)
    else:
        new = nn.Conv2d(w.shape[1], w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                        mod.dilation, 1, padding_mode=mod.padding_mode, **kw)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias.detach()[rows.to(w.device)])
    new.weight.requires_grad_(mod.weight.requires_grad)
    if bias is not None:   # a frozen bias stays frozen
        new.bias.requires_grad_(bias.requires_grad)
    if mask is not None:   # keep unstructured masks applied on what is left
        apply_mask(new, mask[rows.to(w.device)][:, cols.to(w.device)])
    return new.train(mod.training)


def structured(model: nn.Module, amount: float, example_input, *, criterion: str = "l1",
               scope: Optional[str] = None, include: Filter = None,
               exclude: Filter = None) -> nn.Module:
    """Remove `amount` of the output channels of each prunable Conv2d/Linear, in place.

    example_input: a tensor (or tuple) the model accepts, for torch.fx shape propagation.
    include/exclude select which layers lose output channels (their consumers are
    always sliced to match). Layers that cannot be pruned (their output reaches an
    add, concat, reshape, the model output...) are listed in model.pyfast_skipped
    with the reason and a warning. Returns model, now a plain smaller dense model.
    """
    check_model(model)
    amount = check_amount(amount)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not supported; accepted: {', '.join(CRITERIA)}")
    scope = scope if scope is not None else ("global" if criterion == "bn" else "layer")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope {scope!r} is not supported; accepted: 'layer', 'global'")
    if scope == "global" and criterion != "bn":
        raise ValueError(f"scope 'global' needs criterion 'bn' (got criterion {criterion!r}): "
                         "weight norms of different layers are not comparable")
    plans, blocked = analyze(model, example_input)
    inc, exc = _matcher(include, "include", True), _matcher(exclude, "exclude", False)
    modules = dict(model.named_modules())
    chosen = {n: p for n, p in plans.items() if inc(n, modules[n]) and not exc(n, modules[n])}
    skipped = {n: why for n, why in blocked.items() if inc(n, modules[n]) and not exc(n, modules[n])}
    if not chosen and not skipped:
        warnings.warn(_nothing_selected(include, exclude, list(plans) + list(blocked),
                                        "nn.Linear / nn.Conv2d layers", "pruned"),
                      stacklevel=2)
    holders = _param_holders(model)
    for name in list(chosen):
        why = _plan_reason(modules, chosen[name], holders)
        if why is not None:
            skipped[name] = why
            del chosen[name]
    scores: Dict[str, Tensor] = {}
    for name, plan in chosen.items():
        s = _scores(modules, plan, criterion)
        if s is None:
            skipped[name] = "criterion 'bn' needs an affine BatchNorm right after the layer"
        else:
            scores[name] = s
    keep = _select(scores, amount, scope) if scores else {}
    out_idx: Dict[str, Tensor] = {}
    in_idx: Dict[str, Tensor] = {}
    for name, k in keep.items():
        if k.numel() == chosen[name].channels:
            continue
        out_idx[name] = k
        for bn in chosen[name].norms:
            out_idx[bn] = k
        for consumer, group in chosen[name].consumers:
            in_idx[consumer] = _expand(k, group)
    # a module registered under several names (an alias, called once) is replaced at every
    # name, so no place keeps the old, unsliced module
    names = {id(m): n for m, n in positions(model, lambda m: True).values()}
    rebuilt = {name: _rebuild(modules[name], out_idx.get(name), in_idx.get(name))
               for name in dict.fromkeys(list(out_idx) + list(in_idx))}
    for name, new in rebuilt.items():   # all rebuilt first: an error leaves the model as it was
        replace_module(model, names[id(modules[name])], new)
    record_skipped(model, skipped, list(keep))
    return model


def channel_counts(model: nn.Module) -> Dict[str, int]:
    """Output channels / features of each Conv2d and Linear (to see what structured removed)."""
    check_model(model)
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


__all__: List[str] = ["structured", "channel_counts", "CRITERIA"]
