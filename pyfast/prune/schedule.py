"""Iterative pruning: prune a bit more each step, fine-tune in between.

Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1): the sparsity after step t of n

    s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3          (t = 1 .. n, "cubic")

prunes fast while the network is still redundant and slowly near the end; "linear"
is s_i + (s_f - s_i) * t / n. s_n = s_f exactly.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

from torch import nn

from . import masks as _masks
from .structured import structured
from .unstructured import check_amount, magnitude

SCHEDULES = ("cubic", "linear")


def sparsity_schedule(final_amount: float, steps: int, schedule: str = "cubic",
                      initial_amount: float = 0.0) -> List[float]:
    """[s_1, ..., s_steps]: the target sparsity after each step (Zhu & Gupta 2017, eq. 1)."""
    final_amount = check_amount(final_amount, "final_amount")
    initial_amount = check_amount(initial_amount, "initial_amount")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not supported; accepted: {', '.join(SCHEDULES)}")
    if initial_amount > final_amount:
        raise ValueError(f"initial_amount {initial_amount} is larger than final_amount "
                         f"{final_amount}; pruning never revives weights")
    s_i, s_f = initial_amount, final_amount
    if schedule == "cubic":
        out = [s_f + (s_i - s_f) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]
    else:
        out = [s_i + (s_f - s_i) * t / steps for t in range(1, steps + 1)]
    out[-1] = s_f   # exact, whatever the rounding
    return out


def _is_structured(fn) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is structured


def iterative(model: nn.Module, final_amount: float, steps: int, *,
              prune_fn: Callable = magnitude,
              finetune: Optional[Callable[[nn.Module, int], object]] = None,
              schedule: str = "cubic", initial_amount: float = 0.0, finish: bool = False,
              **prune_kwargs) -> nn.Module:
    """Prune in `steps` steps up to final_amount, calling finetune(model, step) after
    each (step = 1 .. steps) with the masks applied; returns the model.

    prune_fn(model, amount, **prune_kwargs) is any pruner of this package
    (magnitude, random, or a function of your own with that signature). With mask
    pruners `amount` is the sparsity the model must have after the step (they count
    what is already pruned), so step t passes s_t, and the last step reaches
    final_amount exactly (round(final_amount * numel) zeros per layer; scope="global":
    over all targeted weights).

    prune_fn=structured (or a functools.partial of it): each step shrinks the model,
    and structured's amount is a fraction of the channels still there, so step t
    passes 1 - (1 - s_t) / (1 - s_(t-1)), with s_0 = 0 (the model it is given, whatever
    initial_amount is: that only shapes the schedule, as with the mask pruners); with
    the per-step rounding and the one-channel floor, about final_amount of the original
    channels are gone at the end. Pass its example_input (and criterion, ...) in
    prune_kwargs.

    finish=True calls prune.finish(model) at the end (masks made permanent).
    """
    _masks.check_model(model)
    if not callable(prune_fn):
        raise TypeError(f"prune_fn must be a callable(model, amount, **kwargs), got {prune_fn!r}")
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable(model, step) or None, got {finetune!r}")
    if not isinstance(finish, bool):
        raise TypeError(f"finish must be a bool, got {finish!r}")
    amounts = sparsity_schedule(final_amount, steps, schedule, initial_amount)
    relative = _is_structured(prune_fn)
    before = 0.0   # the fraction already gone: none; step 1 of structured removes s_1
    for step, s_t in enumerate(amounts, start=1):
        amount = 1 - (1 - s_t) / (1 - before) if relative else s_t
        before = s_t
        result = prune_fn(model, max(0.0, min(amount, 1.0 - 1e-12)), **prune_kwargs)
        if isinstance(result, nn.Module):
            model = result
        if finetune is not None:
            finetune(model, step)
    return _masks.finish(model) if finish else model
