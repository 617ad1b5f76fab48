"""factorize(model, rank= | energy=): replace Linear / Conv2d layers by low-rank pairs, in place.

Rank choice per layer (weight W [N, K], Conv2d weights as [C_out, C_in*kh*kw]):
  rank=r     the same r everywhere, clamped to min(N, K);
  energy=e   the smallest r whose singular values keep a fraction e of sum(s_i^2)
             (= ||W_r||_F^2 / ||W||_F^2, so the relative Frobenius error is sqrt(1 - e)
             or less, Eckart-Young).
A layer is replaced only if the pair has fewer parameters than the dense layer (by
more than `min_saving` of it); otherwise it is left as it is with the reason in
`model.pyfast_skipped` and a warning, as pyfast.quantize does (pyfast.api._walk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..api import Filter, _walk
from .layers import LowRankConv2d, LowRankLinear, conv_factorize_reason, svd

Tensor = torch.Tensor
PER_POSITION = "output position (an input row of a Linear, an output pixel of a Conv2d)"
PER_SAMPLE = "sample of example_input"


@dataclass(frozen=True)
class LowRankRow:
    name: str
    type: str                    # "Linear" or "Conv2d"
    shape: Tuple[int, ...]       # the dense weight's shape
    rank: int
    full_rank: int               # min(N, K)
    energy: float                # fraction of sum(s^2) the kept singular values hold
    params_before: int           # weight + bias elements
    params_after: int
    macs_before: int             # multiply-adds, per LowRankReport.macs_per
    macs_after: int


class LowRankReport(list):
    """LowRankRow list, one per replaced layer; str() is the table with totals.
    `.skipped` maps layer names to reasons, `.macs_per` says what the MACs count."""

    skipped: Dict[str, str]
    macs_per: str

    def total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self)

    @property
    def params_saved(self) -> int:
        return self.total("params_before") - self.total("params_after")

    @property
    def macs_saved(self) -> int:
        return self.total("macs_before") - self.total("macs_after")

    def __str__(self) -> str:
        head = (f"{'layer':<22}{'type':<8}{'shape':<18}{'rank':>10}{'energy':>8}"
                f"{'params':>11}{'->':>3}{'after':>10}{'MACs':>12}{'->':>3}{'after':>11}")
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.name[:21]:<22}{r.type:<8}{'x'.join(map(str, r.shape)):<18}"
                         f"{f'{r.rank}/{r.full_rank}':>10}{r.energy:>8.3f}{r.params_before:>11,}"
                         f"{'':>3}{r.params_after:>10,}{r.macs_before:>12,}{'':>3}{r.macs_after:>11,}")
        pb, mb = self.total("params_before"), self.total("macs_before")
        lines += ["-" * len(head),
                  f"{'total':<66}{pb:>11,}{'':>3}{self.total('params_after'):>10,}{mb:>12,}"
                  f"{'':>3}{self.total('macs_after'):>11,}",
                  f"parameters and FLOPs saved: {self.params_saved:,} parameters "
                  f"({self.params_saved / max(pb, 1):.1%}), {self.macs_saved:,} MACs "
                  f"({self.macs_saved / max(mb, 1):.1%}); MACs per {self.macs_per}"]
        lines += [f"left as is: {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<pyfast.lowrank.LowRankReport of {len(self)} layers>"


def rank_for_energy(s: Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2), s sorted descending (1 if s == 0)."""
    sq = s.double() ** 2
    cum = sq.cumsum(0)
    if not float(cum[-1]) > 0:
        return 1
    frac = cum / cum[-1]
    return min(int((frac < energy).sum()) + 1, len(s))


def _check_args(rank, energy, min_saving) -> None:
    if (rank is None) == (energy is None):
        raise ValueError(f"pass exactly one of rank= or energy=, got rank={rank!r} and "
                         f"energy={energy!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < energy <= 1.0):
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) \
            or not 0.0 <= min_saving < 1.0:
        raise ValueError(f"min_saving must be a float in [0, 1), got {min_saving!r}")


def _positions(model: nn.Module, example_input, targets: List[nn.Module]) -> Dict[int, int]:
    """Per sample of example_input (first dim = batch): how many rows each Linear and
    output pixels each Conv2d computes, from one forward pass (eval mode, no grad).
    A layer that the pass does not run gets 0."""
    if not isinstance(example_input, Tensor) or example_input.dim() == 0:
        raise TypeError(f"example_input must be a batched torch.Tensor (first dim = batch), "
                        f"got {type(example_input).__name__}")
    batch = max(example_input.shape[0], 1)
    counts: Dict[int, int] = {id(m): 0 for m in targets}

    def hook(mod, args, out):   # out: [..., N] of a Linear, [B, C_out, H, W] of a Conv2d
        width = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        counts[id(mod)] += out.numel() // width // batch

    handles = [m.register_forward_hook(hook) for m in targets]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def factorize(model: nn.Module, rank: Optional[int] = None, energy: Optional[float] = None, *,
              include: Filter = None, exclude: Filter = None, min_saving: float = 0.0,
              example_input: Optional[Tensor] = None) -> LowRankReport:
    """Replace nn.Linear / nn.Conv2d layers by LowRankLinear / LowRankConv2d in place;
    returns the LowRankReport (print it for the table).

    rank / energy: exactly one (see the module docstring). include/exclude: glob(s) on
    module names or a callable(name, module), as in pyfast.quantize. min_saving: the
    fraction of a layer's parameters the factorization must save, else the layer is
    skipped (0.0: any saving). Grouped convs and layers with non-finite weights are
    skipped with the reason; report.skipped names the layers this call left,
    model.pyfast_skipped (and the warning) those of earlier calls too. The pairs keep each
    layer's training mode and requires_grad flags (a frozen layer stays frozen).
    example_input: if given, MACs are per sample of it (a forward pass counts the rows /
    output pixels of each layer); else per output position. Layers already inside a
    LowRankLinear / LowRankConv2d are not factorized again.
    """
    _check_args(rank, energy, min_saving)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inner = {id(c) for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))
             for c in m.children()}

    def is_target(mod: nn.Module) -> bool:
        return isinstance(mod, (nn.Linear, nn.Conv2d)) and id(mod) not in inner

    targets = [m for m in model.modules() if is_target(m)]
    positions = None if example_input is None else _positions(model, example_input, targets)
    report = LowRankReport()
    report.macs_per = PER_POSITION if positions is None else PER_SAMPLE

    def convert(name: str, mod: nn.Module):
        if isinstance(mod, nn.Conv2d):
            reason = conv_factorize_reason(mod)
            if reason is not None:
                return reason
        w2 = mod.weight.reshape(mod.weight.shape[0], -1)
        if not bool(torch.isfinite(w2).all()):
            # NaN: the SVD raises half-way through the walk; inf: it returns NaN factors
            return "weight has non-finite values (NaN or inf); the SVD needs finite ones"
        n, k = w2.shape
        usv = svd(w2)
        r = min(rank, n, k) if rank is not None else rank_for_energy(usv[1], energy)
        nbias = 0 if mod.bias is None else n
        before, after = n * k + nbias, r * (n + k) + nbias
        if after >= before:
            return (f"no parameter saving: rank {r} of {min(n, k)} needs {after:,} parameters "
                    f"vs {before:,} dense")
        if before - after <= min_saving * before:
            return (f"rank {r} of {min(n, k)} saves {(before - after) / before:.1%} of "
                    f"{before:,} parameters, not more than min_saving {min_saving:.1%}")
        new = (LowRankConv2d.from_conv(mod, r, usv) if isinstance(mod, nn.Conv2d)
               else LowRankLinear.from_linear(mod, r, usv))
        mult = 1 if positions is None else positions[id(mod)]
        s2 = usv[1] ** 2
        report.append(LowRankRow(
            name, type(mod).__name__, tuple(mod.weight.shape), r, min(n, k),
            float(s2[:r].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0,
            before, after, n * k * mult, r * (n + k) * mult))
        return new

    own: Dict[str, str] = {}     # convert's reasons, also those repeating an earlier call's

    def convert_recorded(name: str, mod: nn.Module):
        result = convert(name, mod)
        if isinstance(result, str):
            own[name or "<root>"] = result
        return result

    earlier = dict(getattr(model, "pyfast_skipped", {}))
    with torch.no_grad():
        _walk(model, include, exclude, convert_recorded, is_target)
    # the report names the layers this call left: model.pyfast_skipped (and the walk's
    # warning, as for quantize) also keeps the reasons of earlier quantize / prune /
    # factorize calls for layers this call may not even have looked at
    report.skipped = {k: v for k, v in model.pyfast_skipped.items()
                      if earlier.get(k) != v or k in own}
    return report
