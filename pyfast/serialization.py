"""pyfast.save / pyfast.load: compressed models as safetensors plus a manifest.

The file is one safetensors file: every tensor of `model.state_dict()` (packed
int4 nibbles, int8 weights, scales, 2:4 values and metadata, and whatever stayed
dense), and in its metadata a JSON manifest with, for each module whose
structure the plain model does not have (a pyfast layer, or a torch layer whose
shape changed, e.g. by structured pruning), its class, its constructor config
and the name, dtype and shape of each of its tensors.

`load(model, path)` takes the model as built by its own code (its skeleton,
best built under `torch.device("meta")` so no float weight is ever allocated),
rebuilds each module of the manifest from its config on the meta device, checks
that the manifest and the tensors agree and that each rebuilt module can stand where
the skeleton has its layer (same kind and geometry; same or, after structured
pruning, smaller sizes), then swaps them in and assigns the file's tensors, all or
nothing: a refused file leaves the model as it was. Nothing
is unpickled: the manifest is JSON and classes are looked up in a fixed registry
(pyfast's layers, and a few torch layers rebuilt from their sizes), never
imported by name from the file.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import _torch_fastpath
from .api import torch_pruned
from .nn.conv import conv_padding
from .nn.linear import _dtype_from_name

FORMAT = "pyfast/1"
_MANIFEST_KEY = "pyfast_manifest"
Tensor = torch.Tensor


# --- the registry: which module classes a manifest may name ---------------------------------

def _torch_config(mod: nn.Module) -> dict:
    """Constructor arguments of the torch layers a compression can reshape."""
    dtype = str(next(iter(mod.parameters()), torch.empty(0)).dtype).replace("torch.", "")
    if isinstance(mod, nn.Linear):
        return {"in_features": mod.in_features, "out_features": mod.out_features,
                "bias": mod.bias is not None, "dtype": dtype}
    if isinstance(mod, nn.Conv2d):
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels,
                "kernel_size": list(mod.kernel_size), "stride": list(mod.stride),
                "padding": mod.padding if isinstance(mod.padding, str) else list(mod.padding),
                "dilation": list(mod.dilation), "groups": mod.groups,
                "bias": mod.bias is not None, "padding_mode": mod.padding_mode, "dtype": dtype}
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {"num_features": mod.num_features, "eps": mod.eps, "momentum": mod.momentum,
                "affine": mod.affine, "track_running_stats": mod.track_running_stats,
                "dtype": dtype}
    raise TypeError(f"no config rule for {type(mod).__name__}")  # unreachable: see _TORCH


def _torch_from_config(cls) -> Callable[[dict, object], nn.Module]:
    def build(config: dict, device=None) -> nn.Module:
        cfg = dict(config)
        dtype = _dtype_from_name(cfg.pop("dtype", "float32"))
        for key in ("kernel_size", "stride", "dilation"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        if isinstance(cfg.get("padding"), list):
            cfg["padding"] = tuple(cfg["padding"])
        return cls(**cfg, device=device, dtype=dtype)
    return build


# exact types only: a subclass of nn.Linear may have its own forward and is left to the skeleton
_TORCH = {f"torch.nn.{c.__name__}": c for c in (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)}


def _pyfast_classes() -> Dict[str, type]:
    """Every pyfast module class that implements the save/load protocol, by qualified name."""
    from . import nn as _layers  # noqa: F401  (defines the layer classes)
    for sub in ("quant", "lowrank", "prune"):   # workflows that define their own modules
        try:
            __import__(f"{__package__}.{sub}")
        except ModuleNotFoundError as exc:   # a workflow package that is not there is fine
            if exc.name != f"{__package__}.{sub}":
                raise
    found, todo = {}, [nn.Module]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{__package__}.") and _has_protocol(cls):
            found[_key(cls)] = cls
    return found


def _has_protocol(cls) -> bool:
    return callable(getattr(cls, "pyfast_config", None)) and callable(getattr(cls, "from_config", None))


def _key(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_pyfast_layer(mod: nn.Module) -> bool:
    return _has_protocol(type(mod)) and type(mod).__module__.startswith(f"{__package__}.")


def _describe(mod: nn.Module) -> Optional[Tuple[str, dict]]:
    """(class key, config) for a module the manifest records, else None."""
    if _is_pyfast_layer(mod):
        return _key(type(mod)), mod.pyfast_config()
    for key, cls in _TORCH.items():
        if type(mod) is cls:
            return key, _torch_config(mod)
    return None


def _tensor_specs(mod: nn.Module) -> Dict[str, list]:
    """The module's tensors, its children's included, unless the manifest records the
    children on their own (children_recorded)."""
    own = getattr(mod, "children_recorded", False)
    tensors = ({k: v for k, v in [*mod._parameters.items(), *mod._buffers.items()] if v is not None}
               if own else mod.state_dict())
    return {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in tensors.items()}


# --- save -----------------------------------------------------------------------------------------

def _check_saveable(model: nn.Module) -> None:
    """Refuse masks that are not finished: the file would hold the mask and the unmasked
    tensor under other names (weight_orig, weight_mask, parametrizations.weight.original)
    than the model's, and would then fit no skeleton."""
    for name, mod in model.named_modules():
        if getattr(mod, "parametrizations", None):
            raise ValueError(
                f"module {name or '<root>'!r} still has parametrizations "
                f"({', '.join(mod.parametrizations.keys())}), e.g. pruning masks: make them "
                "permanent first (pyfast.prune.finish(model)), then save")
        masked = torch_pruned(mod)
        if masked:
            raise ValueError(
                f"module {name or '<root>'!r} ({type(mod).__name__}) still has a "
                f"torch.nn.utils.prune mask on {', '.join(masked)} ({masked[0]}_orig and "
                f"{masked[0]}_mask): make it permanent first with "
                f"torch.nn.utils.prune.remove(module, {masked[0]!r}) (or pyfast.swap(model) "
                "for an nn.Linear), then save")


def manifest(model: nn.Module) -> dict:
    """The manifest pyfast.save writes for `model` (JSON-able)."""
    modules, covered = {}, []
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue   # rebuilt with its parent
        described = _describe(mod)
        if described is None:
            continue
        cls_key, config = described
        modules[name] = {"class": cls_key, "config": config, "tensors": _tensor_specs(mod)}
        # A pyfast module rebuilds its children from its config (QuantConv2d's inner
        # layer), except a pair whose factors may have been converted after it was
        # made (LowRankLinear quantized): those children are recorded on their own.
        if not cls_key.startswith("torch.nn.") and not getattr(mod, "children_recorded", False):
            covered.append(name)
    return {"format": FORMAT, "modules": modules,
            "skipped": dict(getattr(model, "pyfast_skipped", {}))}


def save(model: nn.Module, path, *, metadata: Optional[Dict[str, str]] = None) -> int:
    """Write model's tensors as safetensors with the manifest; returns the file size in bytes.

    Prune masks must be made permanent first. Tied (shared) tensors are refused:
    safetensors stores each tensor once and loading would untie them silently.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise TypeError(f"metadata must map str to str, got {metadata!r}")
    _check_saveable(model)
    state = model.state_dict()
    seen: Dict[Tuple[int, int], str] = {}
    for key, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: it has no data to save")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            raise ValueError(f"tensors {seen[ident]!r} and {key!r} share memory (tied weights); "
                             "pyfast.save does not support tied weights")
        seen[ident] = key
    meta = dict(metadata or {})
    meta[_MANIFEST_KEY] = json.dumps(manifest(model))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return os.path.getsize(path)


# --- load -----------------------------------------------------------------------------------------

def read_manifest(path) -> dict:
    """The manifest of a pyfast file; ValueError if the file has none or if it is not
    the structure pyfast.save writes (a hand-edited or corrupt manifest)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _MANIFEST_KEY not in meta:
        raise ValueError(f"{os.fspath(path)!r} has no pyfast manifest: it was not written by "
                         "pyfast.save (a plain safetensors file loads with load_state_dict)")
    try:
        man = json.loads(meta[_MANIFEST_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{os.fspath(path)!r}: its pyfast manifest is not valid JSON "
                         f"({err})") from err
    if not isinstance(man, dict):
        raise ValueError(f"{os.fspath(path)!r}: its pyfast manifest is a JSON "
                         f"{type(man).__name__}; pyfast.save writes an object")
    if man.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} has manifest format {man.get('format')!r}; "
                         f"this pyfast reads {FORMAT!r}")
    _check_manifest_structure(path, man)
    return man


_ENTRY_FORM = "{'class': str, 'config': {...}, 'tensors': {name: [dtype, [sizes]]}}"


def _check_manifest_structure(path, man: dict) -> None:
    modules = man.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{os.fspath(path)!r}: manifest 'modules' is {_short(modules)}; "
                         "accepted: an object mapping module names to " + _ENTRY_FORM)
    for name, entry in modules.items():
        problem = _entry_problem(entry)
        if problem is not None:
            raise ValueError(f"{os.fspath(path)!r}: manifest entry for module {name!r}: "
                             f"{problem}; accepted: {_ENTRY_FORM}")
    skipped = man.get("skipped", {})
    if not isinstance(skipped, dict) or not all(isinstance(v, str) for v in skipped.values()):
        raise ValueError(f"{os.fspath(path)!r}: manifest 'skipped' is {_short(skipped)}; "
                         "accepted: an object mapping layer names to reasons (strings)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry_problem(entry) -> Optional[str]:
    """What is wrong with one manifest entry's structure, or None."""
    if not isinstance(entry, dict):
        return f"it is {_short(entry)}"
    for key, kind in (("class", str), ("config", dict), ("tensors", dict)):
        if not isinstance(entry.get(key), kind):
            return f"{key!r} is {_short(entry.get(key))}"
    for tname, spec in entry["tensors"].items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and isinstance(spec[1], list)
                and all(type(d) is int and d >= 0 for d in spec[1])):
            return f"tensor {tname!r} is {_short(spec)}, not [dtype, [sizes]]"
    return None


def _file_specs(path) -> Dict[str, list]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: [str(f.get_slice(k).get_dtype()).lower(), list(f.get_slice(k).get_shape())]
                for k in f.keys()}


_ST_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i8": "int8",
              "u8": "uint8", "i32": "int32", "i64": "int64", "f64": "float64", "bool": "bool",
              "i16": "int16"}


def _check_agreement(path, man: dict, file_specs: Dict[str, list]) -> None:
    problems: List[str] = []
    for name, entry in man["modules"].items():
        prefix = f"{name}." if name else ""
        for tname, (dtype, shape) in entry["tensors"].items():
            key = prefix + tname
            got = file_specs.get(key)
            if got is None:
                problems.append(f"module {name!r} ({entry['class']}) declares {tname} "
                                f"{dtype} {shape} but the file has no tensor {key!r}")
                continue
            gdtype = _ST_DTYPES.get(got[0], got[0])
            if gdtype != dtype or got[1] != shape:
                problems.append(f"module {name!r} ({entry['class']}) declares {tname} {dtype} "
                                f"{shape} but the file holds {gdtype} {got[1]}")
    if problems:
        raise ValueError(f"{os.fspath(path)!r}: manifest and tensors disagree: "
                         + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def _adopt_float_dtypes(mod: nn.Module, listed: Dict[str, list]) -> None:
    """Give the rebuilt module's floating-point tensors the floating dtypes the manifest
    lists. A model cast after compression (model.to(torch.bfloat16)) saves its layers'
    bias and scales in that dtype, while each layer's config still names the dtype the
    layer was built from; the file's dtype is the one to load. Names, shapes and integer
    dtypes are left as built, so the check after this still refuses any other difference.
    The tensors of the module's children too (QuantConv2d keeps its own in `inner`)."""
    for prefix, sub in mod.named_modules():
        prefix = f"{prefix}." if prefix else ""
        for slots in (sub._buffers, sub._parameters):
            for name, t in slots.items():
                want = listed.get(prefix + name)
                dtype = getattr(torch, want[0], None) if want else None
                if (t is None or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                        or not t.is_floating_point() or t.dtype == dtype):
                    continue
                cast = t.detach().to(dtype)
                slots[name] = nn.Parameter(cast, t.requires_grad) if slots is sub._parameters else cast


def _build(path, name: str, entry: dict, registry: Dict[str, type]) -> nn.Module:
    cls_key = entry["class"]
    if cls_key in _TORCH:
        build = _torch_from_config(_TORCH[cls_key])
    elif cls_key in registry:
        build = registry[cls_key].from_config
    else:
        raise ValueError(f"module {name!r}: class {cls_key!r} is not a pyfast layer or a torch "
                         "layer pyfast rebuilds; accepted: " + ", ".join(sorted([*_TORCH, *registry])))
    try:
        mod = build(entry["config"], device="meta")
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise ValueError(f"{os.fspath(path)!r}: module {name!r} ({cls_key}) cannot be built "
                         f"from its config {entry['config']}: {err}") from err
    _adopt_float_dtypes(mod, entry["tensors"])
    built = _tensor_specs(mod)
    if built != entry["tensors"]:
        raise ValueError(f"{os.fspath(path)!r}: module {name!r} ({cls_key}): its config "
                         f"{entry['config']} gives tensors {built}, but the manifest lists "
                         f"{entry['tensors']}: manifest and tensors disagree")
    return mod


def _same_structure(old: nn.Module, entry: dict) -> bool:
    """Whether the skeleton's module takes the file's tensors as it is. A torch layer that
    differs only in dtype does: load_state_dict(assign=True) gives it the file's tensors
    (and dtype) while the module object, its hooks and requires_grad flags stay."""
    described = _describe(old)
    if described is None or described[0] != entry["class"]:
        return False
    if entry["class"] in _TORCH:
        return _without(described[1], "dtype") == _without(entry["config"], "dtype")
    return described[1] == entry["config"]


def _without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


# --- which skeleton modules a file's module may replace ------------------------------------------

_SIZES = {"linear": ("in_features", "out_features"), "conv": ("in_channels", "out_channels"),
          "BatchNorm1d": ("num_features",), "BatchNorm2d": ("num_features",)}


def _layer_kind(mod: nn.Module) -> Optional[str]:
    """"linear", "conv", "BatchNorm1d/2d", or None for a module no compression replaces."""
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "BatchNorm1d" if isinstance(mod, nn.BatchNorm1d) else "BatchNorm2d"
    if not isinstance(mod, (nn.Linear, nn.Conv2d)) and not _is_pyfast_layer(mod):
        return None
    if hasattr(mod, "in_channels"):   # before in_features: QuantConv2d has both (K of im2col)
        return "conv"
    return "linear" if hasattr(mod, "in_features") else None


def _settings(mod: nn.Module, kind: str) -> dict:
    """What a replacement must keep besides the sizes: a torch layer's whole config (less
    sizes and dtype), else a conv's geometry (LowRankConv2d keeps it in `geometry`). Every
    conv also gets `pads`, its zero padding as (top, bottom, left, right), so that a
    QuantConv2d (which keeps only that form) is compared with a Conv2d's padding too."""
    if type(mod) in _TORCH.values():
        out = _without(_torch_config(mod), "dtype", *_SIZES[kind])
        return {**out, "pads": list(conv_padding(mod))} if kind == "conv" else out
    if kind != "conv":
        return {}
    geo = getattr(mod, "geometry", None) or {k: getattr(mod, k) for k in
                                             ("kernel_size", "stride", "dilation")}
    if "padding" in geo:   # LowRankConv2d: padding / padding_mode spelled as a Conv2d's
        padding = {k: geo[k] for k in ("padding", "padding_mode") if k in geo}
        pads = conv_padding(SimpleNamespace(**geo))
    else:                  # QuantConv2d, QATConv2d: zero padding (top, bottom, left, right)
        padding, pads = {"padding_mode": "zeros"}, mod.padding
    return {**{k: list(geo[k]) for k in ("kernel_size", "stride", "dilation")},
            "groups": getattr(mod, "groups", 1), **padding, "pads": list(pads)}


def _fit_problem(old: nn.Module, new: nn.Module) -> Optional[str]:
    """Why `new` (from the file) cannot stand where the skeleton has `old`, or None.
    Compressions replace a layer by one made from it, with its sizes; structured
    pruning (pyfast.prune.structured) only removes channels, so a smaller size fits."""
    kind, new_kind = _layer_kind(old), _layer_kind(new)
    if kind is None:
        return f"{type(old).__name__} is not a layer that a compression replaces"
    if kind != new_kind:
        return f"the model's layer is {kind}, the file's {new_kind or type(new).__name__}"
    old_set, new_set = _settings(old, kind), _settings(new, kind)
    differ = {k: (old_set[k], new_set[k]) for k in old_set.keys() & new_set.keys()
              if old_set[k] != new_set[k]}
    if "padding" in differ:
        differ.pop("pads", None)   # the same difference, already named as torch spells it
    if differ:
        return "settings differ (model, file): " + ", ".join(f"{k} {v[0]} vs {v[1]}"
                                                              for k, v in sorted(differ.items()))
    larger = [f"{k} {getattr(new, k)} > {getattr(old, k)}" for k in _SIZES[kind]
              if getattr(new, k) > getattr(old, k)]
    return ("the file's layer is larger: " + ", ".join(larger)) if larger else None


def _check_fits(path, name: str, old: nn.Module, new: nn.Module, cls_key: str) -> None:
    problem = _fit_problem(old, new)
    if problem is not None:
        raise ValueError(
            f"{os.fspath(path)!r} does not fit this model at module {name!r}: the model has "
            f"{type(old).__name__}({old.extra_repr()}), the file {cls_key} ({new.extra_repr()}); "
            f"{problem}. pyfast.load replaces an nn.Linear / nn.Conv2d / BatchNorm or pyfast "
            "layer only by a layer of the same kind and geometry, with the same sizes or "
            "smaller ones (structured pruning)")


# --- load: every replacement built and checked first, then swapped in all or nothing --------------

def _outer(planned: Dict[str, nn.Module], name: str) -> Optional[str]:
    return next((p for p in planned if name.startswith(p + ".")), None)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def _current(model: nn.Module, planned: Dict[str, nn.Module], name: str) -> nn.Module:
    """The module at `name` once the planned replacements are in."""
    outer = _outer(planned, name)
    try:
        if outer is None:
            return model.get_submodule(name)
        return planned[outer].get_submodule(name[len(outer) + 1:])
    except AttributeError as exc:
        raise ValueError(f"the file has module {name!r} but the model has no such "
                         f"submodule ({exc})") from exc


def _plan(model: nn.Module, path, man: dict) -> Dict[str, nn.Module]:
    """The replacement for each name of the model, built and checked, the model untouched.
    A module under a replacement (a low-rank pair's quantized factor) goes into it."""
    registry = _pyfast_classes()
    planned: Dict[str, nn.Module] = {}
    for name, entry in man["modules"].items():
        old = _current(model, planned, name)
        if _same_structure(old, entry):
            continue
        if name == "":
            raise ValueError("the file's root module is a compressed layer; wrap it in a "
                             "container (e.g. nn.Sequential) as pyfast.quantize requires")
        new = _build(path, name, entry, registry)
        _check_fits(path, name, old, new, entry["class"])
        outer = _outer(planned, name)
        if outer is None:
            planned[name] = new
        else:
            _set_submodule(planned[outer], name[len(outer) + 1:], new)
    return planned


def _assign(model: nn.Module, path, tensors: Dict[str, Tensor]) -> None:
    try:   # the layers check values their kernels assume (a 2:4 meta byte's idx0 < idx1)
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{os.fspath(path)!r}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)!r} does not fit this model: missing from the file: "
                         f"{missing[:8]}; in the file but not in the model: {unexpected[:8]}")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if t.device.type == "meta"]
    if still_meta:
        raise ValueError(f"after loading, these tensors have no data (they are not saved in "
                         f"the file, e.g. non-persistent buffers of a meta skeleton): {still_meta[:8]}")


def _snapshot(model: nn.Module) -> list:
    """Each module's child, parameter and buffer slots: what swapping modules in and
    load_state_dict(assign=True) change (they put new objects there, never write into
    the old tensors)."""
    return [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in model.modules()]


def _restore(snapshot: list) -> None:
    for mod, *saved in snapshot:
        for slots, old in zip((mod._modules, mod._parameters, mod._buffers), saved):
            slots.clear()
            slots.update(old)


def load(model: nn.Module, path, *, device="cpu") -> nn.Module:
    """Rebuild model's compressed layers from a pyfast.save file and load every tensor.

    model: the architecture as its code builds it; build it under
    `with torch.device("meta"):` so that no float weight is allocated. Returns model,
    on `device`. Raises ValueError if the manifest and tensors disagree, if the file
    names a class outside the registry, if a module of the file cannot stand where the
    model has another (another kind, geometry or larger sizes), or if a tensor of the
    model is not in the file; a refused file leaves the model as it was.
    """
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    man = read_manifest(path)
    _check_agreement(path, man, _file_specs(path))
    planned = _plan(model, path, man)
    tensors = load_file(os.fspath(path), device=str(device))
    before = _snapshot(model)
    try:
        for name, new in planned.items():
            _set_submodule(model, name, new)
        _assign(model, path, tensors)
    except BaseException:
        _restore(before)   # all or nothing: a half-loaded live model would be broken
        raise
    for name, new in planned.items():
        _torch_fastpath.keep_off(model, name, new)
    model.pyfast_skipped = dict(man.get("skipped", {}))
    return model.to(device)


__all__ = ["save", "load", "manifest", "read_manifest"]
