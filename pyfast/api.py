"""The model API: quantize, sparsify and swap nn.Linear (and nn.Conv2d) layers in place.

Each function walks the model, replaces every eligible layer by the pyfast
layer for the format, and never converts a layer the kernels cannot take: it
is left as it is, and the reason is kept in `model.pyfast_skipped` (shown by
pyfast.summary) and reported once in a warning. So is a layer that is already a pyfast
layer (compressed, or prepared for QAT) unless it is what the call makes anyway, and a
call whose include / exclude select no layer warns, naming the model's layers.
quantize also takes nn.Conv2d (groups 1, zero padding) as a QuantConv2d: im2col + the
same pyfast layer. A layer with a forward (pre-)hook its pyfast layer would not run, or
whose weight Parameter another module holds too (tied weights), is left with the reason;
one pruned with torch.nn.utils.prune converts from the weight its pre-hook computes.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import prune as torch_prune
from torch.nn.utils import parametrize

from . import _checks as chk
from . import _torch_fastpath
from .nn import Int4Linear, Int8Linear, Int8WeightOnlyLinear, QuantConv2d, Sparse24Linear
from .nn import layout as _layout
from .nn.conv import conv_unsupported_reason, hooks_reason
from .nn.linear import _CompressedLinear, _Int8LayoutLinear
from .nn.lowbit import LowBitLinear, unsupported_reason as lowbit_unsupported
from .nn.sparse_int4 import Sparse24Int4Linear, unsupported_reason as s24i4_unsupported
from .sparsity import is_24, magnitude_24_mask

Filter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]
QUANT_METHODS = ("int8", "int8-weight", "int4", "int2", "binary")
_LOWBIT_BITS = {"int2": 2, "binary": 1}


def _patterns(spec) -> Optional[list]:
    """spec as a list of glob strings, or None if it is neither a string nor an
    iterable of strings (an int, a list holding a non-string)."""
    if isinstance(spec, str):
        return [spec]
    try:
        patterns = list(spec)
    except TypeError:       # not iterable: the caller names the argument
        return None
    return patterns if all(isinstance(p, str) for p in patterns) else None


def _matcher(spec: Filter, arg: str, default: bool) -> Callable[[str, nn.Module], bool]:
    if spec is None:
        return lambda name, mod: default
    if callable(spec):
        return spec
    patterns = _patterns(spec)
    if patterns is None:
        raise TypeError(f"{arg} must be a glob string, a list of them or a callable(name, module); "
                        f"got {spec!r}")
    return lambda name, mod: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _lazy_reason(mod: nn.Module) -> Optional[str]:
    """Why an nn.LazyLinear / nn.LazyConv2d cannot be converted yet: its weight has no
    shape until the first forward (converting it would fail on in_features 0)."""
    if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
        return f"uninitialized lazy layer ({type(mod).__name__}); run a forward first"
    return None


def _pruning_methods(mod: nn.Module) -> list:
    return [h for h in mod._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod)]


def torch_pruned(mod: nn.Module) -> list:
    """The names of mod's tensors pruned with torch.nn.utils.prune (its forward pre-hooks
    recompute name = name_orig * name_mask)."""
    return [h._tensor_name for h in _pruning_methods(mod)]


def refresh_pruned(mod: nn.Module) -> None:
    """Recompute mod's tensors pruned with torch.nn.utils.prune as its pre-hooks do before
    each forward (name = name_orig * name_mask, by the pruning method's apply_mask). After
    load_state_dict they hold the old values until the next forward; a conversion reads
    them, and must see what the float model computes."""
    for method in _pruning_methods(mod):
        setattr(mod, method._tensor_name, method.apply_mask(mod))


def _own_params(mod: nn.Module) -> list:
    """(tensor name, attribute path, Parameter) of each Parameter mod holds: its own, and
    the originals of its parametrized tensors (a pyfast.prune mask, weight_norm), which its
    ParametrizationList holds for it (mod._parameters no longer has them)."""
    own = [(n, n, p) for n, p in mod._parameters.items() if p is not None]
    if parametrize.is_parametrized(mod):
        for tname, plist in mod.parametrizations.items():
            own += [(tname, f"parametrizations.{tname}.{k}", p)
                    for k, p in plist._parameters.items() if p is not None]
    return own


def _param_holders(model: nn.Module) -> Dict[int, list]:
    """{id(Parameter): [(its name in model, the module holding it)]}: a tied Parameter
    (an lm_head sharing an embedding's weight) has several holders. A parametrization's
    original counts as held by the parametrized layer, so a masked layer's tie is seen."""
    holders: Dict[int, list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue    # its originals are listed under the layer that owns it
        for _, path, p in _own_params(mod):
            holders.setdefault(id(p), []).append((f"{name}.{path}".lstrip("."), mod))
    return holders


def _tied_reason(mod: nn.Module, holders: Dict[int, list], tensors: Optional[tuple] = None,
                 effect: str = "which a pyfast layer would untie; to compress it anyway"
                 ) -> Optional[str]:
    """Why a layer whose Parameter another module holds too is left as it is: its pyfast
    layer would hold a copy of its own, silently untying them. tensors: check only these
    (None: all); effect: what the call would do to the tie (the default: a conversion's)."""
    for tname, path, p in _own_params(mod):
        others = [n for n, m in holders.get(id(p), []) if m is not mod]
        if others and (tensors is None or tname in tensors):
            return (f"its {tname} is tied to {', '.join(others)} (the same Parameter), "
                    f"{effect}, untie it first: "
                    f"layer.{path} = nn.Parameter(layer.{path}.detach().clone())")
    return None


def _why_not_linear(name: str, mod: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None if a plain dense nn.Linear that a pyfast layer can stand in for."""
    lazy = _lazy_reason(mod)   # first: the checks below read its (shapeless) weight
    if lazy is not None:
        return lazy
    if isinstance(parent, nn.MultiheadAttention):
        return "inside nn.MultiheadAttention, which reads .weight directly"
    if type(mod).forward is not nn.Linear.forward:
        return f"{type(mod).__name__} overrides nn.Linear.forward"
    hooked = hooks_reason(mod)
    if hooked is not None:
        return hooked
    if mod.weight.dtype not in chk.FLOAT_DTYPES:
        return f"weight dtype {mod.weight.dtype} is not float32/float16/bfloat16"
    if mod.weight.device.type not in ("cpu", "cuda"):
        return f"weight on {mod.weight.device}, pyfast runs on cpu and cuda"
    return None


def positions(model: nn.Module, is_target: Callable[[nn.Module], bool]) -> Dict[int, list]:
    """{id(module): (module, [every name it has in model])} for the modules is_target
    selects, in model order. A module used at several places (weight sharing, as in
    ALBERT, or Sequential(lin, act, lin)) has one entry and all its names:
    named_modules() alone lists it once, under its first name."""
    found: Dict[int, list] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if is_target(mod):
            found.setdefault(id(mod), [mod, []])[1].append(name)
    return found


def replace_module(model: nn.Module, names: Iterable[str], new: nn.Module) -> None:
    """Put `new` at every name of a module, so a shared layer stays shared."""
    for name in names:
        if name == "":
            raise ValueError(f"model is itself an nn.{type(model).__name__}; wrap it in a "
                             "container (e.g. nn.Sequential(layer)) so it can be replaced in place")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        _torch_fastpath.keep_off(model, name, new)


def shared_reason(names, chosen, doing: str) -> str:
    """Why a module shared by `names` is left as it is when the filters select only
    `chosen` of them (every workflow: converting or pruning it changes every place)."""
    return (f"shared by {', '.join(names)}; include/exclude select only {', '.join(chosen)}, "
            f"and {doing} it would change the others too")


# A float layer of each kind that pyfast layers stand in for. A walk's is_target is asked
# about them to learn which kinds it converts (quantize: both; sparsify, GPTQ: nn.Linear;
# swap and prune.finish: neither, they convert particular layers only), so that it
# reports the pyfast layers of those kinds only. On the meta device: never computed with.
_KINDS = {"nn.Linear": nn.Linear(1, 1, device="meta"),
          "nn.Conv2d": nn.Conv2d(1, 1, 1, device="meta")}


def _qat_types() -> tuple:
    # imported here: pyfast.quant.qat imports this module
    from .quant.qat import QATConv2d, QATLinear
    return QATLinear, QATConv2d


def _kind(mod: nn.Module) -> Optional[str]:
    """The _KINDS key of the float layer a pyfast layer stands in for (a compressed layer,
    QuantConv2d, a QAT layer), None for any other module. A low-rank pair is none: its
    factors are layers of their own, which quantize converts."""
    qat_linear, qat_conv = _qat_types()
    if isinstance(mod, (QuantConv2d, qat_conv)):
        return "nn.Conv2d"
    if isinstance(mod, (_CompressedLinear, qat_linear)):
        return "nn.Linear"
    return None


def _inside(name: str, outer: set) -> bool:
    """Whether a proper prefix of module name `name` is in `outer`."""
    parts = name.split(".")
    return name != "" and any(".".join(parts[:i]) in outer for i in range(len(parts)))


def _pyfast_positions(model: nn.Module, is_target: Callable[[nn.Module], bool]) -> Dict[int, list]:
    """positions() of the pyfast layers of a kind the walk converts, outermost only (a
    QuantConv2d's inner layer is part of it), but for the targets: those the walk
    converts itself (prune.finish converts masked QAT layers)."""
    walked = _walked_kinds(is_target)
    found = positions(model, lambda m: _kind(m) is not None)
    outer = {n for _, names in found.values() for n in names}
    kept = {}
    for key, (mod, names) in found.items():
        names = [n for n in names if not _inside(n, outer)]
        if names and _kind(mod) in walked and not is_target(mod):
            kept[key] = [mod, names]
    return kept


def _already_reason(mod: nn.Module) -> str:
    """Why a walk leaves a pyfast layer as it is: it has no float weight left to convert."""
    if isinstance(mod, _qat_types()):
        return (f"QAT layer ({type(mod).__name__}, {mod._qat_repr()}); "
                "pyfast.quant.convert_qat(model) makes it its pyfast layer")
    return (f"already compressed ({type(mod).__name__}, {mod.format}); pyfast does not "
            "compress a layer twice: start from the float model to compress it another way")


def _walked_kinds(is_target: Callable[[nn.Module], bool]) -> list:
    """The _KINDS keys of the float layers a walk converts."""
    return [kind for kind, probe in _KINDS.items() if is_target(probe)]


def _nothing_selected(include: Filter, exclude: Filter, names: list, what: str,
                      done: str = "converted") -> str:
    """The warning of a walk that selected no layer: the model has none of `what`, or
    include/exclude (a typo?) select none of `names`; nothing was `done`."""
    if not names:
        return f"pyfast found no {what} in the model; nothing was {done}"
    given = " and ".join(f"{arg}={spec!r}" for arg, spec in
                         (("include", include), ("exclude", exclude)) if spec is not None)
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    verb = "select" if include is not None and exclude is not None else "selects"
    return (f"{given} {verb} none of the model's {len(names)} {what} ({shown}); "
            f"nothing was {done}")


def _walk(model: nn.Module, include: Filter, exclude: Filter,
          convert: Callable[[str, nn.Module], Union[nn.Module, str, None]],
          is_target: Callable[[nn.Module], bool] = lambda m: isinstance(m, nn.Linear),
          already: Optional[Callable[[nn.Module], bool]] = None,
          what: Optional[str] = None) -> nn.Module:
    """convert(name, module) once per target module the filters select, its result put at
    every place the module has. A shared module whose names the filters treat differently
    is left as it is, with the reason. So is a pyfast layer of a kind of layer the walk
    converts (an Int8Linear, a QuantConv2d, a QAT layer) that the filters select, unless
    already(layer) says it is what this call makes. If the filters select no layer, a
    warning says so, naming the model's `what` (default: the kinds of layer it converts)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inc = _matcher(include, "include", True)
    exc = _matcher(exclude, "exclude", False)

    def select(mod: nn.Module, names: list) -> list:
        return [n for n in names if inc(n, mod) and not exc(n, mod)]

    targets = positions(model, is_target)
    done = _pyfast_positions(model, is_target)      # before the walk adds pyfast layers
    skipped = _Skipped(getattr(model, "pyfast_skipped", {}))
    selected = _convert_selected(model, targets, select, convert, skipped)
    for mod, names in done.values():
        chosen = select(mod, names)
        selected = selected or bool(chosen)
        if chosen and not (already is not None and already(mod)):
            skipped[chosen[0] or "<root>"] = _already_reason(mod)
    model.pyfast_skipped = dict(skipped)
    if not selected:
        kinds = _walked_kinds(is_target)
        counted = tuple(type(_KINDS[k]) for k in kinds) or nn.Module  # only those `what` names
        found = [names[0] for mod, names in targets.values() if isinstance(mod, counted)]
        found += [names[0] for _, names in done.values()]
        what = what or (f"{' / '.join(kinds)} layers" if kinds else "layers this call converts")
        warnings.warn(_nothing_selected(include, exclude, found, what), stacklevel=3)
    if skipped.now:     # this call's reasons; model.pyfast_skipped keeps earlier calls' too
        warnings.warn("pyfast left these layers as they were: "
                      + "; ".join(f"{n}: {skipped[n]}" for n in skipped.now), stacklevel=3)
    return model


class _Skipped(dict):
    """model.pyfast_skipped as a walk updates it; `now` lists the names this walk set (a
    layer it left again for the same reason too), so that its warning names those only."""

    def __init__(self, earlier) -> None:
        super().__init__(earlier)
        self.now: Dict[str, None] = {}

    def __setitem__(self, name: str, reason: str) -> None:
        super().__setitem__(name, reason)
        self.now[name] = None

    def pop(self, name, *default):
        self.now.pop(name, None)
        return super().pop(name, *default)


def _convert_selected(model: nn.Module, targets: Dict[int, list], select, convert,
                      skipped: Dict[str, str]) -> bool:
    """_walk's conversion of its targets, the reasons for those left put in skipped;
    whether the filters (select) chose any."""
    parents = {id(c): m for m in model.modules() for c in m.children()}
    holders = _param_holders(model)
    selected = False
    for mod, names in targets.values():
        chosen = select(mod, names)
        if not chosen:
            continue
        selected = True
        name = names[0]
        if len(chosen) < len(names):
            skipped[name or "<root>"] = shared_reason(names, chosen, "converting")
            continue
        reason = (_why_not_linear(name, mod, parents.get(id(mod))) if isinstance(mod, nn.Linear)
                  else _lazy_reason(mod) or hooks_reason(mod)) or _tied_reason(mod, holders)
        if reason is None:
            refresh_pruned(mod)
        result = reason if reason is not None else convert(name, mod)
        if isinstance(result, str):
            skipped[name or "<root>"] = result
        elif result is not None and result is not mod:
            replace_module(model, names, result)
            skipped.pop(name, None)
    return selected


def check_quant_args(method: str, group_size: int, symmetric: bool,
                     methods=QUANT_METHODS) -> None:
    if method not in methods:
        raise ValueError(f"method {method!r} is not supported; accepted: {', '.join(methods)}")
    if method in _LOWBIT_BITS or method == "int4":
        chk.int_arg("group_size", group_size)   # before abs() below, which a str would break
    if method in _LOWBIT_BITS:
        chk.group_size(group_size, 8 * abs(group_size), bits=_LOWBIT_BITS[method])
    if method == "int4":
        chk.group_size(group_size, 2 * abs(group_size))  # validates the value itself
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")


# Why a quantize method has no use for an argument; quantize refuses a value other than
# the default for it rather than ignore it (prepare_qat does the same for int8).
_NO_GROUP_SIZE = {"int8": "int8 weights have one scale per output channel",
                  "int8-weight": "int8 weights have one scale per output channel"}
# int2 is not here: its groups are always asymmetric, which symmetric=False asks for
_NO_SYMMETRIC = {"int8": "int8 weights are always symmetric",
                 "int8-weight": "int8 weights are always symmetric",
                 "binary": "binary weights are a sign times a mean-|w| scale"}


def _not_taken(arg: str, value, call: str, why: str, applies: str) -> ValueError:
    """The error for an argument that `call` has no use for, rather than ignore it."""
    return ValueError(f"{arg}={value!r}: {call} does not take {arg} ({why}); "
                      f"{arg} applies to {applies}")


def _check_method_takes(method: str, group_size: Optional[int], symmetric) -> None:
    """ValueError if group_size (None: not given) or symmetric (default True) is set for a
    method that does not use it. Unknown methods pass: check_quant_args names them."""
    if method not in QUANT_METHODS:     # a tuple test: an unhashable method gets there too
        return
    if group_size is not None and method in _NO_GROUP_SIZE:
        raise _not_taken("group_size", group_size, f"method {method!r}", _NO_GROUP_SIZE[method],
                         "int4, int2 and binary")
    if symmetric is not True and method in _NO_SYMMETRIC:
        raise _not_taken("symmetric", symmetric, f"method {method!r}", _NO_SYMMETRIC[method],
                         "int4 (int2 is always asymmetric)")


# The layouts each quantize method's layer can store (besides "auto").
_METHOD_LAYOUTS = {"int8": ("canonical", "vnni"), "int4": ("canonical", "tc", "ksplit")}


def quantized_layer(mod: nn.Module, method: str, group_size: int = 128,
                    symmetric: bool = True, layout: str = "auto") -> Union[nn.Module, str]:
    """The pyfast layer for an nn.Linear or nn.Conv2d (QuantConv2d around the same
    layer), or the reason it cannot be converted. Used by quantize and by
    pyfast.quant.convert_qat, so both give exactly the same layers."""
    if isinstance(mod, _ConvNd):    # Conv1d, Conv3d, ConvTranspose*: the reason
        reason = conv_unsupported_reason(mod)
        if reason is not None:
            return reason
        k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        why = (_int4_reason(k, group_size, "in_channels*kh*kw") if method == "int4" else
               lowbit_unsupported(k, _LOWBIT_BITS[method], group_size, "in_channels*kh*kw")
               if method in _LOWBIT_BITS else None)
        return why or QuantConv2d.from_conv(
            mod, lambda lin: quantized_layer(lin, method, group_size, symmetric, layout))
    if method == "int8":
        return Int8Linear.from_linear(mod, layout=layout)
    if method == "int8-weight":
        return Int8WeightOnlyLinear.from_linear(mod)
    if method in _LOWBIT_BITS:
        bits = _LOWBIT_BITS[method]
        return lowbit_unsupported(mod.in_features, bits, group_size) or \
            LowBitLinear.from_linear(mod, bits=bits, group_size=group_size)
    return _int4_reason(mod.in_features, group_size, "in_features") or \
        Int4Linear.from_linear(mod, group_size=group_size, symmetric=symmetric, layout=layout)


def _int4_reason(k: int, group_size: int, what: str) -> Optional[str]:
    if group_size != -1 and k % group_size:
        return f"{what} {k} is not a multiple of group_size {group_size} (int4)"
    if k % 2:
        return f"{what} {k} is odd: int4 packs two values per byte"
    return None


def quantize(model: nn.Module, method: str, *, group_size: Optional[int] = None,
             symmetric: bool = True, include: Filter = None, exclude: Filter = None,
             conv: bool = True, layout: str = "auto") -> nn.Module:
    """Replace nn.Linear (and nn.Conv2d) layers by quantized pyfast layers, in place;
    returns model.

    method: "int8" (W8A8, Int8Linear), "int8-weight" (Int8WeightOnlyLinear) or
    "int4" (Int4Linear with group_size 32/64/128/-1 and symmetric or not), "int2"
    (LowBitLinear, 2-bit asymmetric groups) or "binary" (LowBitLinear, 1 bit with a
    mean-|w| scale). group_size None means 128, and per channel (-1) for binary.
    include/exclude: glob(s) on module names (e.g. "blocks.*.mlp.*") or a
    callable(name, module) -> bool. Layers whose in_features the format cannot
    take (int4: not a multiple of group_size) are skipped with the reason.
    conv: also quantize nn.Conv2d as QuantConv2d (im2col + the same layer, with
    in_features = C_in*kh*kw); grouped convs, non-zero padding modes and the other
    convs (Conv1d, Conv3d, ConvTranspose*) are skipped with the reason. conv=False
    leaves every conv alone.
    layout (pyfast/nn/layout.py): "auto" stores each weight in the order of its fast
    kernel where that kernel runs (int8: VNNI panels on an AVX-512 CPU; int4: tensor-core
    order on a GPU with the CUDA extension, float16/bfloat16, or K chunks on an AVX-512
    CPU for K > 6144, not bfloat16), else canonical; "canonical"; or a layout of the
    method ("vnni" for int8, "tc" or "ksplit" for int4).
    group_size and symmetric are refused (ValueError) for a method that does not use
    them: group_size for int8 / int8-weight, symmetric=False for int8, int8-weight and
    binary (int2 groups are always asymmetric, so symmetric=False is what int2 does).
    A layer that is already a pyfast layer is kept as it is: silently if it has the
    format asked for (e.g. GPTQ's Int4Linear, when quantize then converts the convs),
    else with the reason in model.pyfast_skipped (compress the float model instead).
    """
    _check_method_takes(method, group_size, symmetric)   # before group_size gets its default
    if group_size is None:
        group_size = -1 if method == "binary" else 128
    check_quant_args(method, group_size, symmetric)
    _layout.check(layout, accepted=_METHOD_LAYOUTS.get(method, ("canonical",)),
                  what=f"method {method!r}")
    if not isinstance(conv, bool):
        raise TypeError(f"conv must be a bool, got {conv!r}")

    def convert(name: str, mod: nn.Module):
        return quantized_layer(mod, method, group_size, symmetric, layout)

    def is_target(mod: nn.Module) -> bool:
        # every conv: those that are not an nn.Conv2d are skipped with the reason
        return isinstance(mod, nn.Linear) or (conv and isinstance(mod, _ConvNd))

    def already(mod: nn.Module) -> bool:   # e.g. GPTQ's Int4Linear, then quantize the convs
        return _quant_args_of(mod) == _quant_args(method, group_size, symmetric)

    with torch.no_grad():
        return _walk(model, include, exclude, convert, is_target, already)


def _quant_args(method: str, group_size: Optional[int], symmetric) -> tuple:
    """quantize's arguments that decide the format of its layers, the others as None."""
    return (method, None if method in _NO_GROUP_SIZE else group_size,
            symmetric if method == "int4" else None)


def _quant_args_of(layer: nn.Module) -> Optional[tuple]:
    """_quant_args of the quantize call that makes `layer` (QuantConv2d: its inner layer),
    None for a layer quantize does not make."""
    if isinstance(layer, QuantConv2d):
        layer = layer.inner
    kind = type(layer)      # exact: a StaticInt8Linear is an Int8Linear quantize does not make
    if kind is Int4Linear:
        return _quant_args("int4", layer.group_size, layer.symmetric)
    if kind is LowBitLinear:
        return _quant_args("int2" if layer.bits == 2 else "binary", layer.group_size, True)
    method = {Int8Linear: "int8", Int8WeightOnlyLinear: "int8-weight"}.get(kind)
    return None if method is None else _quant_args(method, None, True)


SPARSE_VALUES = (None, "int4")


def sparsify(model: nn.Module, pattern: str = "2:4", *, values: Optional[str] = None,
             group_size: Optional[int] = None, symmetric: bool = True, include: Filter = None,
             exclude: Filter = None, layout: str = "auto") -> nn.Module:
    """Magnitude 2:4 pruning of each nn.Linear weight, in place; returns model.

    values: None keeps the kept weights in the layer's float dtype (Sparse24Linear);
    "int4" also quantizes them, group-wise int4 with group_size (32, 64, 128 or -1,
    groups of dense columns; None means 128) and symmetric as in quantize
    (Sparse24Int4Linear, about 3 bits per weight). group_size and symmetric=False are
    refused (ValueError) without values="int4", which alone uses them. Layers whose
    in_features the format cannot take are skipped with the reason. layout: as in
    quantize ("tc": the order of the sparse-tensor-core kernel, sparse24_mm_tc's
    metadata, or with values="int4" sparse24_int4_mm_tc's codes and metadata)."""
    if pattern != "2:4":
        raise ValueError(f"pattern {pattern!r} is not supported; accepted: '2:4'")
    if values not in SPARSE_VALUES:
        raise ValueError(f"values {values!r} is not supported; accepted: None (float "
                         "values) or 'int4'")
    _layout.check(layout, accepted=("canonical", "tc"), what="sparsify")
    _check_values_take(values, group_size, symmetric)
    if group_size is None:
        group_size = 128
    if values == "int4":
        check_quant_args("int4", group_size, symmetric)

    def convert(name: str, lin: nn.Linear):
        if values == "int4":
            return s24i4_unsupported(lin.in_features, group_size) or \
                Sparse24Int4Linear.from_linear(lin, prune=True, group_size=group_size,
                                               symmetric=symmetric, layout=layout)
        if lin.in_features % 4:
            return f"in_features {lin.in_features} is not a multiple of 4 (2:4)"
        return Sparse24Linear.from_linear(lin, prune=True, layout=layout)

    def already(mod: nn.Module) -> bool:    # what this call makes: left without a note
        if values is None:
            return type(mod) is Sparse24Linear
        return (type(mod) is Sparse24Int4Linear
                and (mod.group_size, mod.symmetric) == (group_size, symmetric))

    with torch.no_grad():
        return _walk(model, include, exclude, convert, already=already)


def _check_values_take(values: Optional[str], group_size: Optional[int], symmetric) -> None:
    """As _check_method_takes for sparsify: float values (values=None) quantize nothing."""
    if values is not None:
        return
    why = "the kept weights stay in the layer's float dtype"
    if group_size is not None:
        raise _not_taken("group_size", group_size, "sparsify with values=None", why,
                         "values='int4'")
    if symmetric is not True:
        raise _not_taken("symmetric", symmetric, "sparsify with values=None", why,
                         "values='int4'")


_TC_LAYERS = (Int4Linear, Sparse24Linear, Sparse24Int4Linear)   # layouts "canonical", "tc"


def repack(model: nn.Module, layout: str = "auto") -> nn.Module:
    """Re-lay every Int4Linear, Sparse24Linear, Sparse24Int4Linear, Int8Linear and
    StaticInt8Linear of model in `layout`, in place.

    For a model moved with .to(device) (or cast) after compression: "auto" gives each
    layer the layout of its fast kernel where that kernel runs on the new device
    (tensor-core order on a GPU, VNNI order and int4 K chunks on an AVX-512 CPU), the
    canonical one elsewhere. "canonical" re-lays every such layer; "tc" / "vnni" /
    "ksplit" only the layers that have that layout (Int4Linear, Sparse24Linear and
    Sparse24Int4Linear / Int8Linear and StaticInt8Linear / Int4Linear), leaving the
    others as they are.
    Exact: a permutation of the packed bytes. Returns model."""
    _layout.check(layout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for mod in model.modules():
        if isinstance(mod, _TC_LAYERS) and layout in ("auto", "canonical", *mod._LAYOUTS):
            mod.repack(layout)
        elif isinstance(mod, _Int8LayoutLinear) and layout in ("auto", "canonical", "vnni"):
            mod.repack(layout)
    return model


def _from_dynamic_quantized(mod: nn.Module):
    """torch.ao dynamic quantized Linear -> Int8Linear, or the reason it cannot be."""
    try:
        w = mod.weight()
        b = mod.bias()
    except (AttributeError, RuntimeError, TypeError) as exc:
        return f"cannot read its packed weight ({exc})"
    if not isinstance(w, torch.Tensor) or w.dtype != torch.qint8:
        return f"weight is {getattr(w, 'dtype', type(w).__name__)}, not qint8 (only int8 converts)"
    scheme = w.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        zero = torch.tensor([w.q_zero_point()])
        scale = torch.full((w.shape[0],), w.q_scale(), dtype=torch.float32)
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0:
        zero = w.q_per_channel_zero_points()
        scale = w.q_per_channel_scales().float()
    else:
        return f"weight quantization scheme {scheme} is not supported"
    if bool((zero != 0).any()):
        return "weight zero point is not 0 (pyfast int8 weights are symmetric)"
    return Int8Linear.from_int8(w.int_repr(), scale, b)


def _dynamic_linear_types():
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    except ImportError:  # torch.ao.quantization is deprecated and may be removed
        return ()
    return (DynLinear,)


def swap(model: nn.Module, *, include: Filter = None, exclude: Filter = None) -> nn.Module:
    """Convert layers compressed with PyTorch's own tools, in place; returns model.

    - nn.Linear pruned with torch.nn.utils.prune: a 2:4 mask becomes a
      Sparse24Linear; any other mask is made permanent (prune.remove) and the
      layer stays dense.
    - torch.ao.quantization.quantize_dynamic qint8 Linear becomes Int8Linear.
    A pruned module that is not an nn.Linear keeps its mask, with the reason.
    """
    dyn_types = _dynamic_linear_types()

    def is_target(mod: nn.Module) -> bool:   # any pruned module: others get the reason
        return (bool(dyn_types) and isinstance(mod, dyn_types)) or bool(torch_pruned(mod))

    def convert(name: str, mod: nn.Module):
        if dyn_types and isinstance(mod, dyn_types):
            return _from_dynamic_quantized(mod)
        if not isinstance(mod, nn.Linear):
            return (f"{type(mod).__name__} pruned with torch.nn.utils.prune: swap converts "
                    "nn.Linear only; its mask is left as it is (torch.nn.utils.prune.remove("
                    f"module, {torch_pruned(mod)[0]!r}) makes it permanent)")
        mask = getattr(mod, "weight_mask", None)
        for pname in torch_pruned(mod):
            torch_prune.remove(mod, pname)   # weight = weight_orig * mask, permanently
        if mask is None:
            return "pruned, but not its weight; masks made permanent, layer stays dense"
        if mod.in_features % 4 or not is_24(mask):
            return "pruning mask is not 2:4; made permanent, layer stays dense"
        return Sparse24Linear.from_linear(mod)

    with torch.no_grad():
        return _walk(model, include, exclude, convert, is_target,
                     what="layers pruned by torch.nn.utils.prune or quantized by torch.ao "
                          "quantize_dynamic")


__all__ = ["quantize", "sparsify", "swap", "magnitude_24_mask"]
