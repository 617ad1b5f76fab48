"""Feature distillation (FitNets, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

The student learns to reproduce the teacher's intermediate features ("hints"):
forward hooks capture the outputs of named modules of both models, a learned
adapter ("regressor" in the paper) maps each student feature to the teacher's width,
and the loss is the mean squared error to the (detached) teacher feature, averaged
over the pairs.

Features are channel-first maps [B, C, *spatial] (the adapter is a 1x1 Conv1d /
Conv2d / Conv3d on the channels) or [B, ..., D] (the adapter is a Linear on the last
dim). The output of a conv, batch/instance norm or pooling layer (any dimensionality)
is a map; of any other module, a 4-D output is a [B, C, H, W] map and any other one
[B, ..., D] (name the conv layer itself, not an activation after a Conv1d / Conv3d).
Equal widths need no adapter (nn.Identity). Different spatial sizes: both maps are
adaptive-average-pooled to the smaller size on each axis (the larger one is pooled
down), then compared.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd,
                                      _MaxPoolNd)

Tensor = torch.Tensor
# Layers whose output has the channels on dim 1 ([B, C, *spatial]) whatever its rank:
# a [B, C, L] or [B, C, D, H, W] map of one of them is not a [B, ..., D] feature
_CHANNEL_FIRST = (_ConvNd, _BatchNorm, _InstanceNorm, _MaxPoolNd, _AvgPoolNd,
                  _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_LAYOUT = {0: "[B, ..., D] feature", 1: "[B, C, L] map", 2: "[B, C, H, W] map",
           3: "[B, C, D, H, W] map"}


def _check_models(student, teacher) -> None:
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    if student is teacher:
        raise ValueError("student and teacher are the same module; distillation needs two")


class Capture:
    """Forward hooks keeping the latest output of some named modules of one model."""

    def __init__(self, model: nn.Module, names: Iterable[str], which: str) -> None:
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(names))
        for n in names:
            if not isinstance(n, str) or n not in modules:
                avail = [k for k in modules if k]
                shown = ", ".join(repr(k) for k in avail[:40])
                more = f" ... ({len(avail) - 40} more)" if len(avail) > 40 else ""
                raise ValueError(f"the {which} has no module named {n!r}; available: "
                                 f"{shown}{more}")
        self.which, self.outputs = which, {}
        self.modules = {n: modules[n] for n in names}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(mod, args, out):
            if not isinstance(out, Tensor):
                raise TypeError(f"{self.which} module {name!r} ({type(mod).__name__}) returned "
                                f"{type(out).__name__}; feature hooks need a tensor output")
            self.outputs[name] = out
        return hook

    def get(self, name: str) -> Tensor:
        if not self.handles:
            raise RuntimeError(f"the {self.which} hooks are closed")
        if name not in self.outputs:
            raise RuntimeError(f"no output of {self.which} module {name!r} captured yet: run "
                               f"the {self.which} forward on the batch first")
        return self.outputs[name]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.outputs = [], {}


def _attr_width(mod: nn.Module) -> Optional[Tuple[int, int]]:
    """(width, spatial dims) read from the layer itself, or None if its type does not say
    (spatial dims 0: a [B, ..., D] feature; 1, 2, 3: a [B, C, *spatial] map)."""
    if isinstance(mod, _ConvNd) and len(mod.kernel_size) in _CONV:
        return mod.out_channels, len(mod.kernel_size)
    if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm3d)):  # BatchNorm1d: [B, C] or [B, C, L]
        return mod.num_features, 2 if isinstance(mod, nn.BatchNorm2d) else 3
    if isinstance(mod, nn.Linear):
        return mod.out_features, 0
    return None


def _shape_width(shape: torch.Size, where: str, mod: nn.Module) -> Tuple[int, int]:
    """(width, spatial dims) of a feature of this shape that module mod gave."""
    if isinstance(mod, _CHANNEL_FIRST) and 2 <= len(shape) <= 5:
        return shape[1], len(shape) - 2
    if len(shape) == 4:
        return shape[1], 2
    if len(shape) >= 2:
        return shape[-1], 0
    raise ValueError(f"{where} output has shape {tuple(shape)}: features must be "
                     "[B, C, *spatial] maps or [B, ..., D]")


class FeatureDistiller(nn.Module):
    """FitNets hints between named layers: pairs = {"student layer": "teacher layer", ...}.

    Its parameters() are the adapters' (train them with the student: pyfast.distill.distill
    does). example_input (a batch) is run once through both models (eval mode, no grad)
    to read the feature shapes, and each adapted pair is checked to compare there (a
    pair that cannot raises ValueError now, not at the first loss() of training); without
    it the widths are read from the named layers, which works for Conv1d/2d/3d,
    BatchNorm2d/3d and Linear outputs only. A constructor that fails removes its hooks.
    Use it as a context manager or call close() to remove the hooks. loss() after a
    forward of both models on the same batch gives the mean over pairs of
    MSE(adapter(student), teacher).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Dict[str, str],
                 adapters: bool = True, example_input: Optional[Tensor] = None) -> None:
        super().__init__()
        _check_models(student, teacher)
        if not isinstance(pairs, dict) or not pairs or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
            raise TypeError("pairs must be a non-empty dict {student layer name: teacher layer "
                            f"name}} of strings, got {pairs!r}")
        if not isinstance(adapters, bool):
            raise TypeError(f"adapters must be a bool, got {adapters!r}")
        self._models = (student, teacher)       # a tuple: not registered, not in parameters()
        self.pairs: List[Tuple[str, str]] = list(pairs.items())
        self._s = Capture(student, pairs.keys(), "student")
        try:
            self._t = Capture(teacher, pairs.values(), "teacher")
        except BaseException:
            self._s.close()
            raise
        # any failure (also the model's own error on a wrong example_input): the caller
        # never gets this object to close(), so the hooks must not outlive it
        try:
            widths = self._widths(example_input)
            self.adapters = nn.ModuleList(self._adapter(i, sw, tw, adapters)
                                          for i, (sw, tw) in enumerate(widths))
            self.widths = widths
            if example_input is not None:
                with torch.no_grad():     # fail here, not at the first loss() of training
                    for i, (sn, tn) in enumerate(self.pairs):
                        self._compared(i, self._s.get(sn), self._t.get(tn))
        except BaseException:
            self.close()
            raise

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def _widths(self, example_input) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
        if example_input is None:
            out = []
            for sn, tn in self.pairs:
                sw, tw = _attr_width(self._s.modules[sn]), _attr_width(self._t.modules[tn])
                if sw is None or tw is None:
                    bad = sn if sw is None else tn
                    raise ValueError(f"cannot tell the output width of {bad!r} from its type; "
                                     "pass example_input= (one input batch) so the feature "
                                     "shapes are measured")
                out.append((sw, tw))
            return out
        if not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a torch.Tensor batch, got "
                            f"{type(example_input).__name__}")
        for model in self._models:
            was = model.training
            try:
                with torch.no_grad():
                    model.eval()(example_input)
            finally:
                model.train(was)
        for cap in (self._s, self._t):
            missing = [n for n in cap.modules if n not in cap.outputs]
            if missing:
                raise ValueError(f"{cap.which} module {missing[0]!r} did not run in the "
                                 "eval-mode forward of example_input (a layer used in training "
                                 "mode only, or off the path of this input); pair layers that "
                                 "run in eval mode")
        return [(_shape_width(self._s.get(sn).shape, f"student {sn!r}", self._s.modules[sn]),
                 _shape_width(self._t.get(tn).shape, f"teacher {tn!r}", self._t.modules[tn]))
                for sn, tn in self.pairs]

    def _adapter(self, i: int, sw, tw, adapters: bool) -> nn.Module:
        (s_width, s_dims), (t_width, t_dims) = sw, tw
        sn, tn = self.pairs[i]
        if s_dims != t_dims:
            a, b = sorted((s_dims, t_dims), reverse=True)
            other = f"a {_LAYOUT[b]}" if b else "is not"
            raise ValueError(f"pair {sn!r} -> {tn!r}: one feature is a {_LAYOUT[a]} and the "
                             f"other {other}; pair layers of the same kind")
        if s_width == t_width:
            return nn.Identity()
        if not adapters:
            raise ValueError(f"pair {sn!r} -> {tn!r}: student width {s_width} != teacher width "
                             f"{t_width} and adapters=False; pass adapters=True to learn a "
                             "projection")
        dtype = next(self.student.parameters(), torch.empty(0)).dtype
        device = next(self.student.parameters(), torch.empty(0)).device
        if s_dims:
            return _CONV[s_dims](s_width, t_width, 1, device=device, dtype=dtype)
        return nn.Linear(s_width, t_width, device=device, dtype=dtype)

    def _compared(self, i: int, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """(adapter(s), t) of pair i, maps pooled to their common spatial size."""
        sn, tn = self.pairs[i]
        (sw, dims), _ = self.widths[i]
        got = s.shape[1] if dims else s.shape[-1]
        if got != sw:
            raise ValueError(f"student {sn!r} gives width {got} now, but its adapter was "
                             f"built for {sw}")
        s = self.adapters[i](s)
        if dims and s.dim() == t.dim() == dims + 2 and s.shape[2:] != t.shape[2:]:
            size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
            s, t = _POOL[dims](s, size), _POOL[dims](t, size)
        if s.shape != t.shape:
            raise ValueError(f"pair {sn!r} -> {tn!r}: adapted student feature "
                             f"{tuple(s.shape)} and teacher feature {tuple(t.shape)} differ")
        return s, t

    def loss(self) -> Tensor:
        """Mean over pairs of MSE(adapter(student feature), teacher feature.detach())."""
        losses = [F.mse_loss(*self._compared(i, self._s.get(sn), self._t.get(tn).detach()))
                  for i, (sn, tn) in enumerate(self.pairs)]
        return torch.stack(losses).mean()

    forward = loss

    def close(self) -> None:
        """Remove the hooks from both models (idempotent)."""
        self._s.close()
        self._t.close()

    def __enter__(self) -> "FeatureDistiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        return "pairs=" + ", ".join(f"{s!r}->{t!r}" for s, t in self.pairs)
