"""Calibrated static int8 (W8A8 with one activation scale per layer).

    prepare_static(model, observer="mse")   # an observer on the input of each Linear / Conv2d
    calibrate(model, batches)               # run a few representative batches
    convert_static(model)                   # -> StaticInt8Linear / QuantConv2d(StaticInt8Linear)
    # or all three at once: quantize_static(model, batches, observer="mse")

The observers watch each target layer's input through a forward pre-hook (the model
itself is not changed until convert), so any forward pass between prepare and
convert calibrates: calibrate() is a convenience that runs the batches in eval mode
without gradients and with a progress bar. Weights are quantized per output channel
as in Int8Linear; the activation scale is the observer's (pyfast/quant/observers.py).
A prepare_static or quantize_static call that raises takes off the observers it
attached, so the model can be fixed and the call retried.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .. import _progress
from ..api import Filter, _walk, positions, replace_module
from ..nn import QuantConv2d, StaticInt8Linear
from ..nn import layout as _layout
from ..nn.conv import conv_unsupported_reason
from .observers import Observer, make_observer

Tensor = torch.Tensor
_OBS, _HOOK = "_pyfast_observer", "_pyfast_observer_hook"


def _observed(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, _OBS)]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _remove_observers(mods: Iterable[nn.Module]) -> None:
    """Take the observer and its forward pre-hook off each module (undoes attach)."""
    for mod in mods:
        getattr(mod, _HOOK).remove()
        delattr(mod, _HOOK)
        delattr(mod, _OBS)


@contextlib.contextmanager
def _undone_on_error(model: nn.Module) -> Iterator[None]:
    """If the body raises (Ctrl-C included), remove the observers it attached and restore
    model.pyfast_skipped, then re-raise: a failed call leaves the model as it found it.
    Observers that were there before (an earlier prepare_static) are kept."""
    before = {id(m) for _, m in _observed(model)}
    missing = object()
    skipped = model.__dict__.get("pyfast_skipped", missing)
    try:
        yield
    except BaseException:
        _remove_observers(m for _, m in _observed(model) if id(m) not in before)
        if skipped is missing:
            model.__dict__.pop("pyfast_skipped", None)
        else:
            model.pyfast_skipped = skipped
        raise


def prepare_static(model: nn.Module, observer: Union[str, type] = "minmax", *,
                   include: Filter = None, exclude: Filter = None, conv: bool = True,
                   **observer_kwargs) -> nn.Module:
    """Attach a fresh observer to the input of each target nn.Linear (and nn.Conv2d
    with groups 1 and zero padding, unless conv=False); in place, returns model.

    observer: "minmax", "moving_average", "percentile", "mse" or an Observer subclass;
    observer_kwargs go to it (momentum=, percentile=, bins=). Layers that cannot be
    converted later are skipped now, with the reason in model.pyfast_skipped.
    A model that is itself an nn.Linear / nn.Conv2d is refused (ValueError): convert
    could not replace it in place; wrap it in a container (nn.Sequential(layer)).
    If it raises (a layer already observed, a bad include / exclude), no observer of
    this call stays attached. There is no public undo yet: convert_static(model)
    consumes the observers, or start from a fresh model.
    """
    _check_model(model)
    make_observer(observer, **observer_kwargs)   # fail early on a bad name / argument
    if not isinstance(conv, bool):
        raise TypeError(f"conv must be a bool, got {conv!r}")

    def attach(name: str, mod: nn.Module):
        if isinstance(mod, _ConvNd):   # Conv1d, Conv3d, ConvTranspose*: skipped, with the reason
            reason = conv_unsupported_reason(mod)
            if reason is not None:
                return reason
        if name == "":
            raise ValueError(f"model is itself an nn.{type(mod).__name__}; wrap it in a "
                             "container (e.g. nn.Sequential(layer)) so that convert_static "
                             "can replace it in place")
        if hasattr(mod, _OBS):
            raise ValueError(f"layer {name!r} already has an observer: prepare_static was "
                             "called twice; convert_static(model) first, or start from a fresh "
                             "model")
        obs = make_observer(observer, **observer_kwargs)
        setattr(mod, _OBS, obs)
        setattr(mod, _HOOK, mod.register_forward_pre_hook(_hook))
        return None

    def is_target(mod: nn.Module) -> bool:
        return isinstance(mod, nn.Linear) or (conv and isinstance(mod, _ConvNd))

    with _undone_on_error(model):
        return _walk(model, include, exclude, attach, is_target)


def _hook(module: nn.Module, args: Tuple) -> None:
    if args and isinstance(args[0], Tensor):
        getattr(module, _OBS).observe(args[0])


def _input_of(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"each calibration batch must be a tensor x or a tuple/list (x, y, ...) "
                    f"with a tensor first, got {type(batch).__name__}")


def calibrate(model: nn.Module, batches: Union[Tensor, Iterable], *,
              progress: Optional[bool] = None) -> nn.Module:
    """Run `batches` (an iterable of tensors x, or of (x, y, ...) tuples whose x is
    used) through a prepared model in eval mode without gradients, so its observers
    see them. One tensor is one batch (as in gptq_quantize), not an iterable of rows.
    The training mode is restored afterwards. Returns model."""
    _check_model(model)
    if not _observed(model):
        raise ValueError("model has no observers: call pyfast.quant.prepare_static(model) "
                         "before calibrate")
    if isinstance(batches, Tensor):
        batches = [batches]          # one batch: iterating would run it row by row
    was_training = model.training
    model.eval()
    seen = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in _progress.bar(batches, desc="calibrate", total=total,
                                       progress=progress):
                model(_input_of(batch))
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("batches is empty: calibration needs at least one batch")
    return model


def convert_static(model: nn.Module, layout: str = "auto") -> nn.Module:
    """Replace every observed layer by StaticInt8Linear (Conv2d: QuantConv2d around one)
    with its observer's scale, and remove the hooks; in place, returns model.
    layout: "canonical", "vnni" or "auto" (pyfast/nn/layout.py: "auto" stores the weight
    in VNNI order where the C++ CPU kernel runs at the AVX-512 level).

    A layer that no calibration batch reached (while others were) is left as it is, as
    gptq_quantize leaves it: its observer is removed and the reason goes into
    model.pyfast_skipped, with a warning. Raises ValueError (naming the layer) if no layer
    saw data, or an observer has no usable range; then nothing is converted."""
    _check_model(model)
    _layout.check(layout, accepted=("canonical", "vnni"), what="convert_static")
    layers = _observed(model)
    if not layers:
        raise ValueError("model has no observers: call pyfast.quant.prepare_static(model) "
                         "and calibrate(model, batches) before convert_static")
    scales = {}
    unreached = [(name, mod) for name, mod in layers if getattr(mod, _OBS).batches == 0]
    if len(unreached) == len(layers):
        unreached = []      # no layer saw data: calibrate was not run (the error below)
    layers = [(name, mod) for name, mod in layers if (name, mod) not in unreached]
    for name, mod in layers:
        obs: Observer = getattr(mod, _OBS)
        try:
            scales[name] = obs.scale()
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc
    if "" in scales:   # prepare_static refuses it; an observer attached by hand
        raise ValueError(f"model is itself an nn.{type(model).__name__}; wrap it in a container "
                         "(e.g. nn.Sequential(layer)) so it can be replaced in place")
    if unreached:
        _remove_observers([mod for _, mod in unreached])
        why = ("no calibration batch reached it (the model's forward did not call it), so "
               "it has no activation range: calibrate on inputs that reach it")
        skipped = {**model.__dict__.get("pyfast_skipped", {}),
                   **{name: why for name, _ in unreached}}
        model.pyfast_skipped = skipped
        warnings.warn("pyfast left these layers as they were: "
                      + "; ".join(f"{n}: {why}" for n, _ in unreached), stacklevel=2)
    shared = positions(model, lambda m: hasattr(m, _OBS))   # every name of each layer
    with torch.no_grad():
        for name, mod in layers:
            _remove_observers([mod])
            scale = scales[name].to(mod.weight.device)
            if isinstance(mod, nn.Conv2d):
                new = QuantConv2d.from_conv(
                    mod, lambda lin, s=scale: StaticInt8Linear.from_linear(lin, s, layout))
            else:
                new = StaticInt8Linear.from_linear(mod, scale, layout)
            replace_module(model, shared[id(mod)][1], new)
    return model


def quantize_static(model: nn.Module, batches: Union[Tensor, Iterable],
                    observer: Union[str, type] = "minmax",
                    *, include: Filter = None, exclude: Filter = None, conv: bool = True,
                    progress: Optional[bool] = None, layout: str = "auto",
                    **observer_kwargs) -> nn.Module:
    """prepare_static + calibrate + convert_static(model, layout) in one call; in place,
    returns model. batches as calibrate: an iterable of batches, or one tensor (one batch).

    As pyfast.quantize: if include / exclude select no layer (or the model has none),
    a warning says so and the model is returned unchanged; layers that cannot be
    converted are left as they are, with the reason in model.pyfast_skipped.

    If any step raises (a batch the model cannot run, no batches, an observer with no
    usable range), the observers and hooks this call attached are removed and
    model.pyfast_skipped is restored before the error propagates, so the model is as
    it was and the call can be retried."""
    _check_model(model)
    _layout.check(layout, accepted=("canonical", "vnni"), what="quantize_static")
    with _undone_on_error(model):
        prepare_static(model, observer, include=include, exclude=exclude, conv=conv,
                       **observer_kwargs)
        if not _observed(model):      # nothing selected or convertible: _walk warned
            return model
        calibrate(model, batches, progress=progress)
        return convert_static(model, layout)


__all__ = ["prepare_static", "calibrate", "convert_static", "quantize_static"]
