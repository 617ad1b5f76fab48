"""pyfast.backends(): what runs where on this machine, and why not."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from . import _ext, dispatch, memory


_NO_KERNEL = "no kernel for this op yet"


@dataclass(frozen=True)
class BackendStatus:
    op: str
    family: str
    device: str              # "cpu" or "cuda"
    reason: Optional[str]    # None: usable here for typical inputs
    default: bool            # first usable in the priority list of this device
    source: str

    @property
    def available(self) -> bool:
        return self.reason is None


class BackendReport(list):
    """A list of BackendStatus rows; str() is a readable table."""

    def for_op(self, op: str) -> List[BackendStatus]:
        return [r for r in self if r.op == op]

    def default(self, op: str, device: str) -> str:
        """The family a plain call of op on device type `device` ("cpu", "cuda") runs."""
        for arg, value, accepted in (("op", op, dict.fromkeys(r.op for r in self)),
                                     ("device", device, dict.fromkeys(r.device for r in self))):
            if not isinstance(value, str):
                raise TypeError(f"BackendReport.default: {arg} must be a str, got "
                                f"{type(value).__name__}")
            if value not in accepted:
                raise ValueError(f"BackendReport.default: {arg} {value!r} is not in the report; "
                                 f"accepted: {', '.join(map(str, accepted))}")
        return next(r.family for r in self if r.op == op and r.device == device and r.default)

    def __str__(self) -> str:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        devices = list(dispatch.PRIORITY)
        lines = [f"pyfast backends (torch {torch.__version__}; GPU: {gpu}; "
                 f"extension pyfast._C: {_ext.status()})",
                 "rule: a forced backend, else the first usable in order: "
                 + "; ".join(f"{d}: {' > '.join(p)}" for d, p in dispatch.PRIORITY.items()),
                 *(f"  from M = {m}: {op} on {d}: {' > '.join(order)}"
                   for (op, d), (m, order) in dispatch.M_RULES.items()),
                 "* = what a plain call runs (at small M)", *self._forcing()]
        width = max([len("op"), *(len(r.op) for r in self)]) + 2   # the longest op name fits
        # a forced backend that cannot run here is still what a call takes (and raises):
        # its row is the default but not available; it gets "*!" and a footnote
        stuck = [r for r in self if r.default and not r.available]
        table = []
        for op in dict.fromkeys(r.op for r in self):
            cells = []
            for d in devices:
                order = dispatch.PRIORITY[d]
                usable = sorted((r for r in self if r.op == op and r.device == d and r.available),
                                key=lambda r: order.index(r.family) if r.family in order else 99)
                cells.append(" ".join([r.family + ("*" if r.default else "") for r in usable]
                                      + [r.family + "*!" for r in stuck
                                         if (r.op, r.device) == (op, d)]) or "-")
            table.append((op, cells))
        cell_width = max([26, *(len(c) + 2 for _, cells in table for c in cells)])
        lines.append(f"{'op':<{width}}" + "".join(f"{d:<{cell_width}}" for d in devices))
        lines += [f"{op:<{width}}" + "".join(f"{c:<{cell_width}}" for c in cells)
                  for op, cells in table]
        if stuck:
            lines.append("*! = forced but cannot run here; calls raise:")
            raising: dict = {}
            for r in stuck:
                raising.setdefault((r.family, r.device, r.reason), []).append(r.op)
            lines += [f"  {fam} on {dev} ({', '.join(op_names)}): {reason}"
                      for (fam, dev, reason), op_names in raising.items()]
        why: dict = {}
        for r in self:
            if not r.available and r.source and not r.reason.startswith("kernel runs on"):
                why.setdefault((r.family, r.device, r.reason), []).append(r.op)
        if why:
            lines.append("kernels that exist but cannot run here:")
            for (fam, dev, reason), op_names in why.items():
                lines.append(f"  {fam} on {dev} ({', '.join(op_names)}): {reason}")
        lines += ["notes:", *(f"  {n}" for n in self.notes())]
        return "\n".join(lines)

    @staticmethod
    def _forcing() -> List[str]:
        """The header line naming what forces backends now, if anything does."""
        env = os.environ.get("PYFAST_BACKEND", "")
        said = ([f"PYFAST_BACKEND={env!r}"] if dispatch._parse_env(env) else []) + [
            f"use_backend {forced}" for forced in dispatch._FORCED.get() if forced]
        return ["forced now (the * follows it): " + "; ".join(said)] if said else []

    def reference_only(self) -> List[str]:
        """Ops that have no compiled kernel at all (only the pure-torch reference)."""
        ops = dict.fromkeys(r.op for r in self)
        return [op for op in ops if all(r.reason == _NO_KERNEL for r in self
                                        if r.op == op and r.family != "reference")]

    def notes(self) -> List[str]:
        ref_only = self.reference_only()
        static = ("only the reference" if "quantize_static" in ref_only
                  else "its kernels above")
        return [
            "reference only (pure torch, no compiled kernel): " + (", ".join(ref_only) or "none"),
            "Conv2d layers (QuantConv2d) run as im2col (F.unfold) + the matmul op of their inner "
            "layer (w8a8_mm, int8_weight_mm, int4_mm, ...), so that op's kernels apply; there "
            "is no direct conv kernel",
            f"static int8 (StaticInt8Linear) = quantize_static ({static}) + int8_mm "
            "(int8_mm_vnni on a VNNI-layout weight)",
            "int4_mm_tc / sparse24_mm_tc / sparse24_int4_mm_tc take the weight in the CUDA "
            "C++ kernels' tensor-core layout (repack_int4_tc / repack_sparse24_tc / "
            "repack_sparse24_int4_tc, once per layer): Int4Linear, Sparse24Linear and "
            "Sparse24Int4Linear use it where that kernel runs (layout=\"auto\": "
            "float16/bfloat16 weights on a GPU with the CUDA build), elsewhere the canonical "
            "int4_mm / sparse24_mm / sparse24_int4_mm; pyfast.repack(model) re-lays a model "
            "after .to(device)",
            "int4_mm_ksplit takes the int4 weight cut into K chunks (repack_int4_ksplit, "
            "once per layer), which the C++ CPU kernel reads faster at M = 1 for K > 6144: "
            "Int4Linear uses it on an AVX-512 CPU for such K unless the layer is bfloat16 "
            "(layout=\"auto\"), elsewhere the canonical int4_mm",
            "w8a8_mm_vnni / int8_mm_vnni take the int8 weight in the C++ CPU kernel's VNNI "
            "panel order (repack_int8_vnni, once per layer): Int8Linear / StaticInt8Linear "
            "use it where that kernel runs at the AVX-512 VNNI level (layout=\"auto\"), "
            "elsewhere the canonical w8a8_mm / int8_mm",
            memory.describe() + " (pyfast/memory.py)",
        ]


def backends() -> BackendReport:
    """Every op x backend family x device: usable here or the reason why not.

    "DEFAULT" marks what a plain call on that device runs (for inputs that every
    kernel accepts; a kernel's own `supports` check can still pass a call on): the
    forced backend where PYFAST_BACKEND or use_backend forces one (a call raises if
    it cannot run), else the first usable in the device's priority order.
    """
    report = BackendReport()
    for op in dispatch.ops():
        table = dispatch.kernels(op)
        forced, strict = dispatch._forced_for(op)
        if not strict and forced not in table:   # use_backend("x") skips ops without an x
            forced = None
        for device, order in dispatch.PRIORITY.items():
            rows = []
            for family in dispatch.FAMILIES:
                backend = table.get(family)
                if backend is None:
                    reason = _NO_KERNEL
                elif device not in backend.devices:
                    reason = f"kernel runs on {'/'.join(backend.devices)} only"
                else:
                    reason = dispatch.unavailable_reason(family, device)
                if reason is None and family not in order and family != forced:
                    reason = "used only when forced on this device"
                rows.append((family, reason, backend.source if backend else ""))
            usable = [f for f, reason, _ in rows if reason is None]
            if forced is not None:   # dispatch.choose's rule 1 (an error if it cannot run)
                first = forced
            else:
                first = min(usable, key=order.index) if usable else None
            report.extend(BackendStatus(op, f, device, reason, f == first, src)
                          for f, reason, src in rows)
    return report
