"""Compressed drop-in replacements for nn.Linear, backed by the pyfast ops.

Each layer keeps only its packed tensors (as buffers, so they are in the
state_dict and follow .to(device)), calls only torch.ops.pyfast.*, accepts
inputs of any leading shape [..., in_features], and says its format in repr.
Layouts: pyfast/formats.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks as chk
from .. import memory
from .. import ops  # noqa: F401  (torch.ops.pyfast.* must exist)
from ..layouts import int4_ksplit, int4_tc, int8_vnni, sparse24_tc
from . import layout as _layout
from ..sparsity import magnitude_24_mask

Tensor = torch.Tensor
_TC = ("canonical", "tc")        # Sparse24Linear, Sparse24Int4Linear (pyfast/nn/layout.py)
_INT4 = ("canonical", "tc", "ksplit")   # Int4Linear
_VNNI = ("canonical", "vnni")    # Int8Linear, StaticInt8Linear


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    d = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a layer config")
    return d


class _CompressedLinear(nn.Module):
    """Shared plumbing: sizes, optional float bias, reshaping, byte counts."""

    format: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device=None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.orig_dtype = bias_dtype   # dtype of the dense weight it replaces
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    # --- buffers of 2 MiB and more on the CPU go on transparent huge pages (pyfast/
    # memory.py): whether set in __init__ or assigned (from_linear, repack, load_state_dict
    # with assign=True: nn.Module.__setattr__ calls register_buffer for a buffer name),
    # moved (.to(), .cpu(): _apply) or copied (deepcopy, pickle: __setstate__). copy_
    # into a buffer keeps its memory.
    def register_buffer(self, name: str, tensor: Optional[Tensor], persistent: bool = True):
        if isinstance(tensor, Tensor):
            tensor = memory.to_hugepages(tensor)
        super().register_buffer(name, tensor, persistent)

    # Scale buffers stay float32 through a cast of the model (model.half(), .to(bfloat16)),
    # as the formats define them (pyfast/formats.py): in float16 a per-channel int8 scale
    # of a weight row of magnitude 2e-4 is subnormal (21% output error after .half() in
    # such a layer, against 0.26% for the dense layer), and quantize_static takes only a
    # float32 scale. They go through nn.Module._apply viewed as int32, which a dtype cast
    # leaves alone (Module.to casts floating-point tensors only) while a device move still
    # moves them: converting back after the cast would keep the rounding. The packed
    # weights are integers; the bias follows the cast.
    _FLOAT32_BUFFERS = ("weight_scale", "scales", "input_scale")

    def _apply(self, fn, recurse: bool = True):
        # Refuse a cast to a dtype the kernels do not take (model.double()), before any
        # tensor moves: a float64 bias or 2:4 values made every later forward fail with
        # a message about the bias or the input. And refuse a cast of the integer codes
        # (model.type(torch.float32) casts every tensor): it destroyed the layer for good.
        device = self._probe_device()
        probe = fn(torch.empty(0, device=device))
        if isinstance(probe, Tensor) and probe.dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__} cannot be cast to {probe.dtype}: its "
                            "kernels take float32, float16 or bfloat16; accepted casts: "
                            ".float(), .half(), .bfloat16(), .to(device)")
        probe16 = fn(torch.empty(0, dtype=torch.float16, device=device))
        # a cast sends float32 and float16 to one dtype; a move keeps each its own
        cast = (probe.dtype if isinstance(probe, Tensor) and isinstance(probe16, Tensor)
                and probe16.dtype == probe.dtype else None)
        probe = fn(torch.empty(0, dtype=torch.int8, device=device))
        if isinstance(probe, Tensor) and probe.dtype != torch.int8:
            raise TypeError(f"{type(self).__name__} cannot cast its integer codes to "
                            f"{probe.dtype} (e.g. module.type(dtype) casts every tensor); "
                            "accepted casts: .float(), .half(), .bfloat16(), .to(dtype), "
                            ".to(device), which leave integer tensors alone")
        # Trainable buffers (a fine-tuned bias, 2:4 values or scales) are the optimizer's
        # tensors: Module._apply would replace them by copies that are not leaves (their
        # gradient went to the old tensor, which the layer no longer reads).
        trainable = {n: t for n, t in self._buffers.items() if t is not None and t.requires_grad}
        # The float32 buffers (scales) stay float32 through .half() / .to(dtype): they go
        # through fn as int32 views, which those casts leave alone. A view is a new tensor
        # object without requires_grad, so where fn returned the view itself (no move), the
        # original tensor is put back: an optimizer fine-tuning the scales keeps them.
        kept = {n: self._buffers[n] for n in self._FLOAT32_BUFFERS
                if self._buffers.get(n) is not None and self._buffers[n].dtype == torch.float32}
        views = {n: t.view(torch.int32) for n, t in kept.items()}
        self._buffers.update(views)
        try:
            super()._apply(fn, recurse)
        finally:
            for name, original in kept.items():
                now = self._buffers[name]
                if now is views[name]:
                    self._buffers[name] = original
                elif now.dtype == torch.int32:
                    self._buffers[name] = now.view(torch.float32).requires_grad_(
                        original.requires_grad)
        for name, original in trainable.items():
            self._keep_leaf(name, original)
        if cast is not None:
            self.orig_dtype = cast   # the dense layer this one stands for is now in `cast`
        self._place_buffers()
        return self

    def _keep_leaf(self, name: str, original: Tensor) -> None:
        """Put the trainable `original` back in buffer `name` with the data _apply gave it,
        as nn.Module._apply does for a Parameter (its gradient follows); where torch cannot
        swap the data in (a move to the meta device), the new tensor becomes a leaf."""
        now = self._buffers.get(name)
        if now is None or now is original:
            return
        now = now.detach()
        if not torch._has_compatible_shallow_copy_type(original, now):
            self._buffers[name] = now.requires_grad_()
            return
        with torch.no_grad():
            original.data = now
            if original.grad is not None:
                original.grad = original.grad.to(device=now.device, dtype=now.dtype)
        self._buffers[name] = original

    def _probe_device(self) -> torch.device:
        return next((t.device for t in self._buffers.values() if t is not None),
                    torch.device("cpu"))

    def __setstate__(self, state) -> None:   # copy.deepcopy, pickle
        super().__setstate__(state)
        self._place_buffers()

    def _check_loaded_values(self) -> None:
        """ValueError if a buffer holds values its format forbids (after load_state_dict)."""

    # The float buffer in the dtype of the model (casts follow it): orig_dtype follows it
    # where a load assigns it (pyfast.load of a model cast after compression).
    _DTYPE_BUFFER = "bias"

    # load_state_dict (and pyfast.load) are where packed data comes from outside pyfast:
    # values that the kernels assume (a 2:4 meta byte's idx0 < idx1) are checked there
    # once, not per call, and reported as load_state_dict reports a wrong shape.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        errors = len(error_msgs)
        try:
            state_dict = self._to_own_layout(state_dict, prefix)
        except ValueError as exc:   # the repack refuses a value (a 2:4 meta byte)
            error_msgs.append(f"{type(self).__name__} at {prefix!r}: {exc}")
            return
        # All or nothing: until every tensor is in and checked, keep the buffers (the
        # objects, which assign=True replaces, and the values, which copy_ overwrites).
        # The kernels do not check the values per call: a refused value left in gave garbage.
        assign = local_metadata.get("assign_to_params_buffers", False)
        before = {n: (b, None if assign else b.detach().clone())
                  for n, b in self._buffers.items() if b is not None and prefix + n in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) == errors and any(k.startswith(prefix) for k in state_dict):
            try:
                self._check_loaded_values()
            except ValueError as exc:
                error_msgs.append(f"{type(self).__name__} at {prefix!r}: {exc}")
        if len(error_msgs) > errors:
            with torch.no_grad():
                for name, (obj, value) in before.items():
                    if value is not None:
                        obj.copy_(value)
                    self._buffers[name] = obj
        elif assign and prefix + self._DTYPE_BUFFER in state_dict and \
                self._buffers.get(self._DTYPE_BUFFER) is not None:
            self.orig_dtype = self._buffers[self._DTYPE_BUFFER].dtype

    # --- layouts (pyfast/nn/layout.py): a layer with several layouts names them (_LAYOUTS)
    # and the buffers whose shape depends on the layout, and defines _relaid(tensors,
    # layout): those buffers ({name: tensor}, in any of its layouts) re-laid in `layout` by
    # the repack / unrepack functions. Layers with one layout leave both empty and never
    # reach _relaid (_to_own_layout returns first; only layers with layouts call _set_layout).
    _LAYOUTS: tuple = ()
    _LAYOUT_BUFFERS: tuple = ()

    def _set_layout(self, layout: str) -> None:
        if layout != self.layout:
            relaid = self._relaid({n: self._buffers[n] for n in self._LAYOUT_BUFFERS}, layout)
            for name, t in relaid.items():
                setattr(self, name, t)
            self.layout = layout

    def _incoming_layout(self, incoming: dict, own: dict):
        """The layout, other than the layer's, whose shapes and dtypes the tensors
        `incoming` have (from a re-lay of stand-ins of `own` on meta), or None."""
        stand_ins = {n: torch.empty_like(t, device="meta") for n, t in own.items()}
        for other in self._LAYOUTS:
            if other == self.layout:
                continue
            spec = self._relaid(stand_ins, other)
            if all(incoming[n].shape == spec[n].shape and incoming[n].dtype == spec[n].dtype
                   for n in own):
                return other
        return None

    def _to_own_layout(self, state_dict, prefix):
        """state_dict, or a copy whose packed tensors saved in another of the layer's
        layouts are re-laid in its own: "auto" resolves by machine and device (VNNI or
        K-split on a CPU, tc on a GPU, canonical on the meta device), so a state_dict may
        hold any of them."""
        names = self._LAYOUT_BUFFERS
        incoming = {n: state_dict.get(prefix + n) for n in names}
        if not names or not all(isinstance(t, Tensor) for t in incoming.values()):
            return state_dict          # a missing key: torch reports it
        own = {n: self._buffers[n] for n in names}
        if all(incoming[n].shape == own[n].shape and incoming[n].dtype == own[n].dtype
               for n in names):
            return state_dict
        if self._incoming_layout(incoming, own) is None:
            return state_dict          # no layout of the layer: torch reports the mismatch
        out = dict(state_dict)         # (the caller's dict stays as it was)
        out.update((prefix + n, t) for n, t in self._relaid(incoming, self.layout).items())
        return out

    def _place_buffers(self) -> None:
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = memory.to_hugepages(buf)

    # _flat / _unflat run on every forward: a 2-D x passes through both untouched (a
    # reshape to its own shape still makes a new view, about 0.5 us each way).
    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        dim = x.dim()
        if dim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input [..., {self.in_features}], "
                             f"got shape {tuple(x.shape)}")
        return x if dim == 2 else x.reshape(-1, self.in_features)

    def _unflat(self, out: Tensor, x: Tensor) -> Tensor:
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _check_linear(linear) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        chk.tensor("linear.weight", linear.weight, dtypes=chk.FLOAT_DTYPES)

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()

    # --- save/load protocol (pyfast/io.py): a JSON-able config that rebuilds the
    # layer with buffers of the right shapes and dtypes, without any float weight.
    def pyfast_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "orig_dtype": _dtype_name(self.orig_dtype)}

    @classmethod
    def from_config(cls, config: dict, device=None):
        cfg = dict(config)
        orig = _dtype_from_name(cfg.pop("orig_dtype", "float32"))
        layer = cls(**cfg, device=device)
        layer.orig_dtype = orig
        if layer.bias is not None:   # from_linear keeps the bias in the dense layer's dtype
            layer.bias = torch.zeros(layer.out_features, dtype=orig, device=device)
        return layer

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_bytes(self) -> int:
        esize = torch.empty(0, dtype=self.orig_dtype).element_size()
        nbias = 0 if self.bias is None else self.out_features
        return (self.in_features * self.out_features + nbias) * esize

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}")


class _Int8WeightLinear(_CompressedLinear):
    """Per-output-channel int8 weight [N, K] with float32 scales [N] (formats.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        cls._check_linear(linear)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device)
        layer.orig_dtype = linear.weight.dtype
        q, s = torch.ops.pyfast.quantize_per_token(linear.weight.detach())
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(s)
        layer._copy_bias(linear)
        return layer

    @classmethod
    def from_int8(cls, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]):
        """From an already-quantized weight (e.g. torch's quantize_dynamic)."""
        chk.tensor("w_int8", w_int8, dtypes=(torch.int8,), dim=2)
        chk.scale_vector("w_scale", w_scale, w_int8.shape[0], "one scale per output row")
        chk.bias(bias, w_int8.shape[0])
        chk.same_device(w_int8=w_int8, w_scale=w_scale, bias=bias)
        n, k = w_int8.shape
        layer = cls(k, n, bias is not None, device=w_int8.device)
        layer.weight_int8.copy_(w_int8)
        layer.weight_scale.copy_(w_scale.float())
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer


class _Int8LayoutLinear(_Int8WeightLinear):
    """An int8 weight stored canonical [N, K] or (layout "vnni") as its repack_int8_vnni
    image [ceil(N/48), ceil(K/4), 48, 4], the order of the fast CPU kernel
    (pyfast/nn/layout.py). `_vnni_op` is the op that reads the VNNI weight: "auto"
    picks that layout where its C++ kernel runs at the AVX-512 level."""

    _vnni_op = "w8a8_mm_vnni"
    _LAYOUTS, _LAYOUT_BUFFERS = _VNNI, ("weight_int8",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 layout: str = "canonical"):
        super().__init__(in_features, out_features, bias, device)
        self.layout = _layout.check(layout, allow_auto=False, accepted=_VNNI,
                                    what=type(self).__name__)
        if self.layout == "vnni":
            self.weight_int8 = torch.ops.pyfast.repack_int8_vnni(self.weight_int8)

    def _layout_suffix(self) -> str:
        return ", VNNI layout" if self.layout == "vnni" else ""

    def pyfast_config(self) -> dict:
        return {**super().pyfast_config(), "layout": self.layout}

    @torch.no_grad()
    def repack(self, layout: str = "auto"):
        """Store the weight in `layout` ("canonical", "vnni" or "auto" for where it is
        now); in place, exact (a permutation of the bytes); returns self."""
        _layout.check(layout, accepted=_VNNI, what=type(self).__name__)
        chosen = _layout.resolve_vnni(layout, self.weight_int8.device, self._vnni_op,
                                      (self.out_features, self.in_features))
        self._set_layout(chosen)
        return self

    def _relaid(self, tensors: dict, layout: str) -> dict:
        w = tensors["weight_int8"]
        return {"weight_int8": torch.ops.pyfast.repack_int8_vnni(w) if layout == "vnni" else
                int8_vnni.unrepack(w, self.out_features, self.in_features)}

    def canonical_weight(self) -> Tensor:
        """The int8 weight [N, K] whatever the layout (a view or an un-repacked copy)."""
        if self.layout == "vnni":
            return int8_vnni.unrepack(self.weight_int8, self.out_features, self.in_features)
        return self.weight_int8


class Int8Linear(_Int8LayoutLinear):
    """W8A8: int8 weights per output channel, activations quantized per token at run time.

    weight_int8: canonical int8 [N, K], or (layout "vnni") its repack_int8_vnni image
    [ceil(N/48), ceil(K/4), 48, 4], the order of the fast CPU kernel (pyfast/nn/layout.py)."""

    @property
    def format(self) -> str:  # type: ignore[override]
        # per-token dynamic activations, per-channel weights
        return "int8 W8A8" + self._layout_suffix()

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "auto") -> "Int8Linear":
        """layout: "canonical", "vnni" or "auto" (pyfast/nn/layout.py)."""
        _layout.check(layout, accepted=_VNNI, what="Int8Linear")
        return super().from_linear(linear).repack(layout)

    @classmethod
    def from_int8(cls, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                  layout: str = "auto") -> "Int8Linear":
        """From an already-quantized weight [N, K] (e.g. torch's quantize_dynamic)."""
        _layout.check(layout, accepted=_VNNI, what="Int8Linear")
        return super().from_int8(w_int8, w_scale, bias).repack(layout)

    def forward(self, x: Tensor) -> Tensor:
        # One op: per-token quantization of x and the int8 GEMM (fused on CPU).
        op = torch.ops.pyfast.w8a8_mm_vnni if self.layout == "vnni" else torch.ops.pyfast.w8a8_mm
        out = op(self._flat(x), self.weight_int8, self.weight_scale, self.bias)
        return self._unflat(out, x)


class Int8WeightOnlyLinear(_Int8WeightLinear):
    """W8A16 / W8A32: int8 weights per output channel, float activations."""

    format = "int8 weight-only"  # per-channel scales

    def forward(self, x: Tensor) -> Tensor:
        out = torch.ops.pyfast.int8_weight_mm(self._flat(x), self.weight_int8,
                                              self.weight_scale, self.bias)
        return self._unflat(out, x)


class _Int4GroupLinear(_CompressedLinear):
    """Shared by the group-wise int4 layers (Int4Linear, Sparse24Int4Linear): the scales
    float32 [N, G] and zeros uint8 [N, G] buffers, group_size / symmetric / layout in the
    config, and the format string."""

    def _register_group_params(self, out_features: int, groups: int, device) -> None:
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8,
                                                 dtype=torch.uint8, device=device))

    def pyfast_config(self) -> dict:
        return {**super().pyfast_config(), "group_size": self.group_size,
                "symmetric": self.symmetric, "layout": self.layout}

    def _check_loaded_values(self) -> None:
        """zeros must be int4 zero points, 0..15 (formats.py): the CPU 2:4 + int4 kernels
        take q - zero in 4-bit arithmetic and gave other sums than the reference."""
        z = self.zeros
        if z.device.type != "meta" and z.numel() and int(z.max()) > 15:
            r, c = (int(i) for i in (z > 15).nonzero()[0])
            raise ValueError(f"zeros[{r}, {c}] = {int(z[r, c])} is not an int4 zero point; "
                             "accepted: 0..15 (pyfast/formats.py)")

    def _int4_format(self, what: str) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        lay = {"tc": ", tensor-core layout", "ksplit": ", K-split layout"}.get(self.layout, "")
        return f"{what} {g} {'sym' if self.symmetric else 'asym'}{lay}"


class Int4Linear(_Int4GroupLinear):
    """W4A16: group-wise int4 weights (symmetric or asymmetric), dequant fused in the matmul.

    packed: canonical uint8 [N, K/2] (formats.py); in the layout "tc" its repack_int4_tc
    image (the CUDA kernel's fragment order); in the layout "ksplit" its
    repack_int4_ksplit image uint8 [C, N, K/(2C)] (the C++ CPU kernel's K chunks,
    C = int4_ksplit.chunks_for(K), or 1 where that gives none). scales and zeros are
    canonical in every layout (pyfast/nn/layout.py says which "auto" picks)."""

    _LAYOUTS, _LAYOUT_BUFFERS = _INT4, ("packed",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, symmetric: bool = True, device=None,
                 layout: str = "canonical"):
        super().__init__(in_features, out_features, bias, device)
        gs = chk.group_size(group_size, in_features, k_name="in_features")
        self.group_size, self.symmetric = group_size, chk.bool_arg("symmetric", symmetric)
        self.layout = _layout.check(layout, allow_auto=False, accepted=_INT4, what="Int4Linear")
        groups = in_features // gs
        canonical = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("packed", canonical)
        if layout != "canonical":
            self.packed = self._relaid({"packed": canonical}, layout)["packed"]
        self._register_group_params(out_features, groups, device)

    @property
    def format(self) -> str:  # type: ignore[override]
        return self._int4_format("int4 weight-only")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    symmetric: bool = True, layout: str = "auto") -> "Int4Linear":
        """layout: "canonical", "tc", "ksplit" or "auto" (pyfast/nn/layout.py)."""
        cls._check_linear(linear)
        _layout.check(layout, accepted=_INT4, what="Int4Linear")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    group_size=group_size, symmetric=symmetric, device=w.device)
        layer.orig_dtype = w.dtype
        packed, scales, zeros = torch.ops.pyfast.pack_int4(w, group_size, symmetric)
        layer.packed.copy_(packed)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        layer._copy_bias(linear)
        return layer.repack(layout)

    @torch.no_grad()
    def repack(self, layout: str = "auto") -> "Int4Linear":
        """Store the weight in `layout` ("canonical", "tc", "ksplit" or "auto" for where it
        is now); in place, exact (a permutation of the packed bytes); returns self."""
        _layout.check(layout, accepted=_INT4, what="Int4Linear")
        chosen = _layout.resolve_int4(layout, self.packed.device, self.orig_dtype,
                                      self.in_features, self.group_size)
        self._set_layout(chosen)
        return self

    def canonical_packed(self) -> Tensor:
        """The canonical packed uint8 [N, K/2] whatever the layout (a view or a copy)."""
        return self._canonical(self.packed)

    def _canonical(self, p: Tensor) -> Tensor:
        if p.dtype == torch.int32:                                  # "tc"
            return int4_tc.unrepack(p, self.out_features, self.in_features)
        return int4_ksplit.unrepack(p) if p.dim() == 3 else p      # "ksplit" / canonical

    def _ksplit_chunks(self) -> int:
        if self.layout == "ksplit" and self.packed.dim() == 3:
            return int(self.packed.shape[0])                       # keep the layer's own
        return int4_ksplit.chunks_for(self.in_features, self.group_size) or 1

    def _incoming_layout(self, incoming: dict, own: dict):
        p = incoming["packed"]   # a K-split weight of any chunk count is taken (re-split)
        if p.dtype == torch.uint8 and p.dim() == 3 and p.shape[1] == self.out_features \
                and p.shape[0] >= 1 and 2 * p.shape[0] * p.shape[2] == self.in_features:
            try:
                int4_ksplit.check_chunks(self.in_features, int(p.shape[0]), self.group_size)
                return "ksplit"
            except ValueError:
                return None
        return super()._incoming_layout(incoming, own)

    def _relaid(self, tensors: dict, layout: str) -> dict:
        p = self._canonical(tensors["packed"])
        if layout == "tc":
            p = torch.ops.pyfast.repack_int4_tc(p)
        elif layout == "ksplit":
            p = torch.ops.pyfast.repack_int4_ksplit(p.contiguous(), self._ksplit_chunks(),
                                                    self.group_size)
        return {"packed": p.contiguous()}

    _OPS = {"tc": "int4_mm_tc", "ksplit": "int4_mm_ksplit"}

    def forward(self, x: Tensor) -> Tensor:
        op = getattr(torch.ops.pyfast, self._OPS.get(self.layout, "int4_mm"))
        out = op(self._flat(x), self.packed, self.scales, self.zeros, self.group_size, self.bias)
        return self._unflat(out, x)


class Sparse24Linear(_CompressedLinear):
    """2:4 semi-structured sparse weights (fp32/fp16/bf16 values + 2-bit indices)."""

    _LAYOUTS, _LAYOUT_BUFFERS = _TC, ("meta",)
    _DTYPE_BUFFER = "values"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, layout: str = "canonical"):
        chk.multiple_of_4("in_features", in_features)
        if dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"dtype {dtype!r} is not supported; accepted: torch.float32, "
                            "torch.float16, torch.bfloat16")
        super().__init__(in_features, out_features, bias, device, bias_dtype=dtype)
        self.layout = _layout.check(layout, allow_auto=False, accepted=_TC,
                                    what="Sparse24Linear")
        self.register_buffer("values", torch.zeros(out_features, in_features // 2,
                                                   dtype=dtype, device=device))
        # meta: canonical uint8 [N, K/4] (formats.py), or its repack_sparse24_tc image
        canonical = torch.full((out_features, in_features // 4), 0b0100,
                               dtype=torch.uint8, device=device)
        self.register_buffer("meta", canonical if layout == "canonical" else
                             torch.ops.pyfast.repack_sparse24_tc(canonical))

    def pyfast_config(self) -> dict:
        cfg = super().pyfast_config()
        cfg["dtype"] = _dtype_name(self.values.dtype)
        cfg["layout"] = self.layout
        return cfg

    def _check_loaded_values(self) -> None:
        if self.meta.device.type != "meta":
            sparse24_tc.check_meta_values(self.meta if self.layout == "canonical" else
                                          sparse24_tc.unrepack_meta(self.meta, self.out_features,
                                                                    self.in_features))

    @torch.no_grad()
    def repack(self, layout: str = "auto") -> "Sparse24Linear":
        """Store the metadata in `layout` ("canonical", "tc" or "auto" for where the
        values are now); in place, exact; returns self."""
        _layout.check(layout, accepted=_TC, what="Sparse24Linear")
        chosen = _layout.resolve(layout, "sparse24_mm_tc", self.values.device, self.values.dtype)
        self._set_layout(chosen)
        return self

    def _relaid(self, tensors: dict, layout: str) -> dict:
        m = tensors["meta"]
        return {"meta": torch.ops.pyfast.repack_sparse24_tc(m) if layout == "tc" else
                sparse24_tc.unrepack_meta(m, self.out_features, self.in_features)}

    @classmethod
    def from_config(cls, config: dict, device=None):
        cfg = dict(config)
        cfg["dtype"] = _dtype_from_name(cfg.get("dtype", "float32"))
        cfg.pop("orig_dtype", None)   # a 2:4 layer's dense dtype is its values' dtype
        return cls(**cfg, device=device)

    @property
    def format(self) -> str:  # type: ignore[override]
        tc = ", tensor-core layout" if self.layout == "tc" else ""
        return f"2:4 sparse {str(self.values.dtype).replace('torch.', '')}{tc}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune: bool = False,
                    layout: str = "auto") -> "Sparse24Linear":
        """prune=True keeps the 2 largest |w| of each group of 4 first; otherwise the
        weight must already be 2:4 (else ValueError naming the first bad group).
        layout: "canonical", "tc" or "auto" (pyfast/nn/layout.py)."""
        cls._check_linear(linear)
        _layout.check(layout, accepted=_TC, what="Sparse24Linear")
        w = linear.weight.detach()
        if chk.bool_arg("prune", prune):
            w = w * magnitude_24_mask(w)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        values, meta = torch.ops.pyfast.sparse24_compress(w)
        layer.values.copy_(values)
        layer.meta.copy_(meta)
        layer._copy_bias(linear)
        return layer.repack(layout)

    def forward(self, x: Tensor) -> Tensor:
        x2 = self._flat(x)
        if x2.dtype != self.values.dtype:
            if x2.dtype not in chk.FLOAT_DTYPES:   # layer.to(x.dtype) would be refused too
                chk.tensor("input", x2, dtypes=chk.FLOAT_DTYPES)
            raise TypeError(f"input has dtype {x2.dtype} but this layer's values are "
                            f"{self.values.dtype}; call layer.to({x2.dtype}) or cast the input")
        op = torch.ops.pyfast.sparse24_mm_tc if self.layout == "tc" else torch.ops.pyfast.sparse24_mm
        out = op(x2, self.values, self.meta, self.bias)
        return self._unflat(out, x)

