"""Which backend runs an op: one table, one rule, and a way to force the choice.

Backends are families of kernels:
    reference  pyfast/reference.py     pure torch, every device, the test oracle
    cpp        csrc/cpu                C++ CPU kernels in the extension pyfast._C
    cuda       csrc/cuda               CUDA C++ kernels in pyfast._C (CUDA builds only)
    triton     kernels/                Triton kernels (GPU; CPU only through the
                                       Triton interpreter, and only when forced)

The rule, for an op called on a tensor of device type D:
    1. a forced backend (use_backend(...) or PYFAST_BACKEND) wins; if it cannot run
       these inputs that is an error that says why, never a silent fallback;
    2. otherwise the first backend in PRIORITY[D] (or, from a batch size M_RULES names,
       that rule's order) that is registered for the op, available here and accepts
       these inputs (its `supports` check);
    3. the reference is last in every list and accepts everything.
`pyfast.backends()` prints this table for the current machine.
"""
from __future__ import annotations

import contextvars
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Priority per device type; families absent here are only used when forced.
PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
FAMILIES = ("reference", "cpp", "cuda", "triton")

# Exceptions to PRIORITY by batch size, each from a committed bench file:
# (op, device type) -> (M from which it applies, the order from that M on), M = rows of
# the op's first argument. int8_mm / w8a8_mm on CUDA: at M = 1024 the Triton kernel took
# 0.45-0.46x the CUDA C++ kernel's time on all three Llama shapes; at M <= 128 neither
# was faster on every shape (M_RULES_SOURCE), so below 1024 the CUDA C++ kernel stays
# first. tests/test_ops.py checks these rules against that file.
M_RULES_SOURCE = "bench/results/nvidia-h100_2026-11-24_201651.json"
M_RULES: Dict[Tuple[str, str], Tuple[int, Tuple[str, ...]]] = {
    ("int8_mm", "cuda"): (1024, ("triton", "cuda", "reference")),
    ("w8a8_mm", "cuda"): (1024, ("triton", "cuda", "reference")),
}


def priority(op: str, device_type: str, args: tuple = ()) -> Tuple[str, ...]:
    """The order the rule tries for op(*args) on device_type: PRIORITY, or an M_RULES
    order when the call's M reaches that rule's threshold."""
    rule = M_RULES.get((op, device_type))
    if rule is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
        min_m, order = rule
        if args[0].shape[0] >= min_m:
            return order
    return PRIORITY.get(device_type, ("reference",))


@dataclass(frozen=True)
class Backend:
    """One kernel for one op.

    fn:       called with the op's arguments exactly as its schema lists them.
    devices:  device types it runs on ("cpu", "cuda").
    supports: optional; given the same arguments, returns None if it can take
              them or a short reason (e.g. "K % 16 != 0") if not.
    source:   where the kernel lives, for the report.
    """
    family: str
    op: str
    fn: Callable
    devices: Tuple[str, ...]
    supports: Optional[Callable[..., Optional[str]]] = None
    source: str = ""


@dataclass
class _Registry:
    kernels: Dict[str, Dict[str, Backend]] = field(default_factory=dict)
    # family -> callable returning None if usable here, else the reason it is not
    availability: Dict[str, Callable[[str], Optional[str]]] = field(default_factory=dict)
    # (family, device type) -> its answer, asked once (unavailable_reason)
    available: Dict[Tuple[str, str], Optional[str]] = field(default_factory=dict)


_REGISTRY = _Registry()
# The use_backend blocks in force, innermost last: a tuple per context (a thread, an
# asyncio task), so concurrent tasks do not see each other's blocks.
_FORCED: contextvars.ContextVar[Tuple[Dict[str, str], ...]] = contextvars.ContextVar(
    "pyfast_forced_backends", default=())


class _Entry(dict):
    """One use_backend block in _FORCED: its {op or "*": family}, plus the use_backend
    object that entered it, so that the object's __exit__ finds its own entry in the
    context it runs in (one object may be in force in several threads / tasks at once)."""
    __slots__ = ("owner",)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the call; the message says why."""


def register(backend: Backend) -> None:
    if backend.family not in FAMILIES:
        raise ValueError(f"family {backend.family!r} is not one of {FAMILIES}")
    _REGISTRY.kernels.setdefault(backend.op, {})[backend.family] = backend


def set_availability(family: str, check: Callable[[str], Optional[str]]) -> None:
    """check(device_type) -> None if the family can run on that device here, else why not."""
    _REGISTRY.availability[family] = check
    _REGISTRY.available.clear()


def ops() -> List[str]:
    return sorted(_REGISTRY.kernels)


def kernels(op: str) -> Dict[str, Backend]:
    return dict(_REGISTRY.kernels.get(op, {}))


def unavailable_reason(family: str, device_type: str) -> Optional[str]:
    """None if `family` can run on device_type in this process, else why not. Asked once
    per (family, device type) and remembered: what it depends on (the extension, the GPU,
    the Triton install and TRITON_INTERPRET, which Triton reads at import) does not
    change while a process runs, and this is on every op call's path."""
    key = (family, device_type)
    if key not in _REGISTRY.available:
        check = _REGISTRY.availability.get(family)
        _REGISTRY.available[key] = None if check is None else check(device_type)
    return _REGISTRY.available[key]


def _why_not(backend: Optional[Backend], device_type: str, args) -> Optional[str]:
    if backend is None:
        return "no kernel for this op"
    if device_type not in backend.devices:
        return f"runs on {'/'.join(backend.devices)}, not {device_type}"
    reason = unavailable_reason(backend.family, device_type)
    if reason is None and backend.supports is not None:
        reason = backend.supports(*args)
    return reason


# --- forcing -------------------------------------------------------------------

@functools.lru_cache(maxsize=16)   # read on every call; parsed once per distinct value
def _parse_env(value: str) -> Dict[str, str]:
    """PYFAST_BACKEND="reference" or "int8_mm=cpp, int4_mm = reference"; blank entries
    are ignored, so a blank value forces nothing ({}). Two entries giving one op (or, with
    no op, every op) different backends are an error; repeating an entry is not."""
    forced: Dict[str, str] = {}
    given: Dict[str, str] = {}   # op or "*" -> the entry that set it, for the error
    for part in filter(None, (p.strip() for p in value.split(","))):
        op, _, fam = (t.strip() for t in part.rpartition("="))
        if fam not in FAMILIES:
            raise ValueError(f"PYFAST_BACKEND names backend {fam!r}; accepted: {', '.join(FAMILIES)}")
        if op and op not in _REGISTRY.kernels:
            raise ValueError(f"PYFAST_BACKEND names unknown op {op!r}; ops: {', '.join(ops())}")
        key = op or "*"
        if forced.get(key, fam) != fam:
            what = f"op {op!r}" if op else "every op"
            raise ValueError(f"PYFAST_BACKEND gives {what} two backends: {given[key]!r} and "
                             f"{part!r}; accepted: one backend per op (and one for every op)")
        forced[key], given[key] = fam, part
    return forced


def _forced_for(op: str) -> Tuple[Optional[str], bool]:
    """(family, strict): strict when the op was named, not just the global '*'."""
    blocks = _FORCED.get()
    env = os.environ.get("PYFAST_BACKEND", "")
    if not blocks and not env:   # the common case, on every op call: nothing forced
        return None, False
    layers = ((_parse_env(env),) if env else ()) + blocks
    for forced in reversed(layers):
        if op in forced:
            return forced[op], True
        if "*" in forced:
            return forced["*"], False
    return None, False


_IN_COMPILE = ("pyfast.use_backend inside a torch.compile'd function would only hold while "
               "Dynamo traces it; put the with block around the compiled call instead")


def _not_traced(fn):
    """fn as a graph break for Dynamo (with fullgraph=True an error giving _IN_COMPILE)."""
    try:
        return torch.compiler.disable(fn, reason=_IN_COMPILE)
    except TypeError:   # torch before 2.7: no reason=
        return torch.compiler.disable(fn)


class use_backend:
    """Force backends inside a `with` block (this thread, or this asyncio task, only).

    use_backend("reference")            every op that has a reference kernel uses it
    use_backend("triton")               ops with a Triton kernel must use it (error if it
                                        cannot run the call); ops without one follow the rule
    use_backend(int8_mm="cpp")          int8_mm must use the C++ kernel

    Outside the function that torch.compile compiles, not inside it: Dynamo would run
    the block's entry and exit while tracing, and the compiled code would run the
    default kernels, so inside a compiled function it raises (a graph break, or an error
    with fullgraph=True). A block removes only its own entry on exit, so a generator
    that leaves its block after its caller entered another one leaves the caller's, and
    one object may be in force in several threads / tasks at once (each exit undoes the
    entry of the same thread / task)."""

    def __init__(self, family: Optional[str] = None, **per_op: str) -> None:
        forced: Dict[str, str] = {}
        if family is not None:
            forced["*"] = family
        forced.update(per_op)
        for op, fam in forced.items():
            if fam not in FAMILIES:
                raise ValueError(f"backend {fam!r} for {op!r} is not one of {', '.join(FAMILIES)}")
            if op != "*" and op not in _REGISTRY.kernels:
                raise ValueError(f"use_backend got unknown op {op!r}; ops: {', '.join(ops())}")
        self._forced = forced

    @_not_traced
    def __enter__(self) -> None:
        entry = _Entry(self._forced)
        entry.owner = self
        _FORCED.set(_FORCED.get() + (entry,))

    @_not_traced
    def __exit__(self, *exc) -> None:
        # This object's innermost entry in this context (thread / task): the one its
        # matching __enter__ made. Not a list on the object, which every context shares:
        # with one object in force in two tasks, the first to leave removed the other's
        # entry (absent from its own context), and its own stayed in force.
        current = _FORCED.get()
        mine = [i for i, f in enumerate(current) if getattr(f, "owner", None) is self]
        if not mine:
            raise RuntimeError("use_backend.__exit__ without a matching __enter__ in this "
                               "thread / asyncio task")
        _FORCED.set(current[:mine[-1]] + current[mine[-1] + 1:])


# --- the rule ---------------------------------------------------------------------

def choose(op: str, device_type: str, args: tuple) -> Backend:
    """Pick the backend for op(*args) on device_type, following the module rule."""
    table = _REGISTRY.kernels.get(op, {})
    family, strict = _forced_for(op)
    if family is not None and (strict or family in table):
        backend = table.get(family)
        reason = _why_not(backend, device_type, args)
        if reason is not None:
            raise BackendUnavailableError(
                f"pyfast.{op}: backend {family!r} was forced but cannot run this call: {reason}"
            )
        return backend
    trail = []
    for fam in priority(op, device_type, args):
        backend = table.get(fam)
        reason = _why_not(backend, device_type, args)
        if reason is None:
            return backend
        trail.append(f"{fam}: {reason}")
    raise BackendUnavailableError(
        f"pyfast.{op}: no backend can run on {device_type}: " + "; ".join(trail)
    )


def device_type_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    raise TypeError("no tensor argument to take the device from")
