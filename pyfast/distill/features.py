"""Feature distillation (FitNets, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

The student learns to reproduce the teacher's intermediate features ("hints"):
forward hooks capture the outputs of named modules of both models, a learned
adapter ("regressor" in the paper) maps each student feature to the teacher's width,
and the loss is the mean squared error to the (detached) teacher feature, averaged
over the pairs.

Features are [B, C, H, W] (conv: the adapter is a 1x1 Conv2d on the channels) or
[B, ..., D] (the adapter is a Linear on the last dim). Equal widths need no adapter
(nn.Identity). Different spatial sizes: both maps are adaptive-average-pooled to the
smaller height and width (the larger one is pooled down), then compared.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


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


def _attr_width(mod: nn.Module) -> Optional[Tuple[int, bool]]:
    """(width, is_conv_map) read from the layer itself, or None if its type does not say."""
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels, True
    if isinstance(mod, nn.BatchNorm2d):
        return mod.num_features, True
    if isinstance(mod, nn.Linear):
        return mod.out_features, False
    return None


def _shape_width(shape: torch.Size, where: str) -> Tuple[int, bool]:
    if len(shape) == 4:
        return shape[1], True
    if len(shape) >= 2:
        return shape[-1], False
    raise ValueError(f"{where} output has shape {tuple(shape)}: features must be [B, C, H, W] "
                     "or [B, ..., D]")


class FeatureDistiller(nn.Module):
    """FitNets hints between named layers: pairs = {"student layer": "teacher layer", ...}.

    Its parameters() are the adapters' (train them with the student: pyfast.distill.distill
    does). example_input (a batch) is run once through both models (eval mode, no grad)
    to read the feature shapes; without it the widths are read from the named layers,
    which works for Conv2d, BatchNorm2d and Linear outputs only. Use it as a context
    manager or call close() to remove the hooks. loss() after a forward of both models
    on the same batch gives the mean over pairs of MSE(adapter(student), teacher).
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
        except ValueError:
            self._s.close()
            raise
        try:
            widths = self._widths(example_input)
            self.adapters = nn.ModuleList(self._adapter(i, sw, tw, adapters)
                                          for i, (sw, tw) in enumerate(widths))
        except (ValueError, TypeError):
            self.close()
            raise
        self.widths = widths

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def _widths(self, example_input) -> List[Tuple[Tuple[int, bool], Tuple[int, bool]]]:
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
        return [(_shape_width(self._s.get(sn).shape, f"student {sn!r}"),
                 _shape_width(self._t.get(tn).shape, f"teacher {tn!r}")) for sn, tn in self.pairs]

    def _adapter(self, i: int, sw, tw, adapters: bool) -> nn.Module:
        (s_width, s_conv), (t_width, t_conv) = sw, tw
        sn, tn = self.pairs[i]
        if s_conv != t_conv:
            raise ValueError(f"pair {sn!r} -> {tn!r}: one feature is a [B, C, H, W] map and "
                             "the other is not; pair layers of the same kind")
        if s_width == t_width:
            return nn.Identity()
        if not adapters:
            raise ValueError(f"pair {sn!r} -> {tn!r}: student width {s_width} != teacher width "
                             f"{t_width} and adapters=False; pass adapters=True to learn a "
                             "projection")
        dtype = next(self.student.parameters(), torch.empty(0)).dtype
        device = next(self.student.parameters(), torch.empty(0)).device
        if s_conv:
            return nn.Conv2d(s_width, t_width, 1, device=device, dtype=dtype)
        return nn.Linear(s_width, t_width, device=device, dtype=dtype)

    def loss(self) -> Tensor:
        """Mean over pairs of MSE(adapter(student feature), teacher feature.detach())."""
        losses = []
        for (sn, tn), adapter, ((sw, _), (tw, _)) in zip(self.pairs, self.adapters, self.widths):
            s, t = self._s.get(sn), self._t.get(tn).detach()
            got = s.shape[1] if s.dim() == 4 else s.shape[-1]
            if got != sw:
                raise ValueError(f"student {sn!r} gives width {got} now, but its adapter was "
                                 f"built for {sw}")
            s = adapter(s)
            if s.dim() == 4 and t.dim() == 4 and s.shape[2:] != t.shape[2:]:
                size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            if s.shape != t.shape:
                raise ValueError(f"pair {sn!r} -> {tn!r}: adapted student feature "
                                 f"{tuple(s.shape)} and teacher feature {tuple(t.shape)} differ")
            losses.append(F.mse_loss(s, t))
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
