"""pyfast.prune: pruning of every kind, with masks that survive fine-tuning.

    from pyfast import prune
    prune.magnitude(model, 0.5, scope="global")     # unstructured, masks applied
    prune.n_m(model, 2, 4)                           # N:M along the input dim
    ...fine-tune: pruned weights stay exactly 0...
    prune.finish(model, to_sparse24=True)            # permanent; 2:4 -> Sparse24Linear
    prune.structured(model, 0.5, example_input)      # really removes channels
    prune.iterative(model, 0.8, steps=5, finetune=fn)  # Zhu & Gupta cubic schedule
    prune.sparsity(model)                            # name -> fraction, .overall

torch.nn.utils.prune only masks (the model never gets smaller); `structured` rebuilds
a smaller dense model, and `finish(to_sparse24=True)` gives the 2:4 kernel layers.
"""
from __future__ import annotations

from torch import nn

from .graph import TraceError
from .masks import apply_mask, attention_projections, finish, get_mask, is_masked, WeightMask
from .schedule import iterative, sparsity_schedule
from .slimming import l1_penalty, slimming_penalty
from .structured import channel_counts, structured
from .unstructured import custom, magnitude, n_m, random


class Sparsity(dict):
    """layer name -> fraction of zero weights (effective, masked weight); `.overall` is
    zeros / weights over all of them, `.zeros` and `.weights` the counts."""

    overall: float
    zeros: int
    weights: int

    def __str__(self) -> str:
        lines = [f"{n:<40}{s:>8.1%}" for n, s in self.items()]
        return "\n".join(lines + [f"{'overall':<40}{self.overall:>8.1%}"])


def sparsity(model: nn.Module) -> Sparsity:
    """Sparsity of each layer pyfast.summary lists (Linear, Conv2d, pyfast layers), and of
    each nn.MultiheadAttention's Q/K/V projection weights ("<name>.in_proj_weight", raw
    Parameters no pruner masks: left out, the overall would overstate), and overall."""
    from ..summary import summary

    rows = summary(model, print_table=False)
    out = Sparsity({r.name: r.sparsity for r in rows})
    weights = [r.weights for r in rows]
    zeros = [round(r.sparsity * r.weights) for r in rows]
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            for pname, w in attention_projections(mod):
                out[f"{name}.{pname}".lstrip(".")] = float((w == 0).sum()) / max(w.numel(), 1)
                weights.append(w.numel())
                zeros.append(int((w == 0).sum()))
    out.weights, out.zeros = sum(weights), sum(zeros)
    out.overall = out.zeros / out.weights if out.weights else 0.0
    return out


__all__ = ["magnitude", "random", "custom", "n_m", "structured", "iterative", "finish",
           "sparsity", "Sparsity", "sparsity_schedule", "l1_penalty", "slimming_penalty",
           "apply_mask", "get_mask", "is_masked", "WeightMask", "channel_counts", "TraceError"]
