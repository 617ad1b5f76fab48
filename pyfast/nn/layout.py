"""Which weight layout a layer stores: canonical, or the order its fastest kernel reads.

    "canonical"  the formats of pyfast/formats.py; every backend reads them
    "tc"         Int4Linear: fragment order (pyfast/layouts/int4_tc.py, op int4_mm_tc);
                 Sparse24Linear: sparse-tensor-core metadata (pyfast/layouts/
                 sparse24_tc.py, op sparse24_mm_tc); Sparse24Int4Linear: int4 codes and
                 metadata in sparse-tensor-core order (pyfast/layouts/sparse24_int4_tc.py,
                 op sparse24_int4_mm_tc). Only the CUDA C++ kernels read it fast.
    "ksplit"     Int4Linear: the packed int4 weight cut into C chunks along K, each
                 contiguous (pyfast/layouts/int4_ksplit.py, op int4_mm_ksplit). The C++
                 CPU kernel reads it faster at M = 1 where K > 6144; elsewhere its paths
                 run chunk by chunk (bfloat16 x at M = 2..16 about 0.9x, see below).
    "vnni"       Int8Linear / StaticInt8Linear: the int8 weight in VNNI panel order
                 (pyfast/layouts/int8_vnni.py, ops w8a8_mm_vnni / int8_mm_vnni). Only the
                 C++ CPU kernel reads it fast, with AVX-512 VNNI (elsewhere that kernel
                 runs scalar code).
    "auto"       the layer's fast layout exactly where its kernel would run for the
                 weight, "canonical" everywhere else:
                 tc   -- a CUDA device with the kernel built (pyfast.backends()) and
                         float16/bfloat16 weights (the kernels multiply in those dtypes);
                 ksplit -- an Int4Linear weight on a CPU, the C++ extension built with
                         int4_mm_ksplit, the CPU kernels at the AVX-512 level, a weight
                         that is not bfloat16 (bfloat16 x runs the vdpbf16ps kernel, which
                         gains nothing from the chunks at M = 1 and lost 7-12% at M = 4 and
                         16) and K > 6144 with a chunk count (int4_ksplit.chunks_for);
                 vnni -- a CPU weight, the C++ extension built with the layer's op
                         (w8a8_mm_vnni / int8_mm_vnni), the CPU kernels at the
                         AVX-512 level, and a weight that the panels pad by at most
                         1/16 (VNNI_MAX_PADDING: small layers stay canonical).
Each layout is made once by a repack op (exact); where its kernel cannot run, the
reference undoes the repack on every call (correct, slow). A layer keeps its layout
when moved: call pyfast.repack(model) (or layer.repack("auto")) after .to(device).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext, dispatch
from ..layouts import int4_ksplit, int8_vnni

LAYOUTS = ("canonical", "tc", "vnni", "ksplit")
_HALF = (torch.float16, torch.bfloat16)


def check(layout, *, allow_auto: bool = True, accepted=LAYOUTS, what: str = "") -> str:
    """layout if it is one of `accepted` (plus "auto" if allowed), else ValueError
    naming it and, with `what` (e.g. "Int8Linear"), the layer that refuses it."""
    accepted = tuple(accepted) + (("auto",) if allow_auto else ())
    if not isinstance(layout, str) or layout not in accepted:
        by = f" by {what}" if what else ""
        raise ValueError(f"layout {layout!r} is not supported{by}; accepted: "
                         + ", ".join(repr(a) for a in accepted))
    return layout


def why_not_tc(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the CUDA C++ kernel of `op` would run a weight on device/dtype, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the weight is on {device.type}; the tensor-core layout is for CUDA devices"
    if dtype not in _HALF:
        return f"the weight is {dtype}; the tensor-core kernels take float16/bfloat16"
    if "cuda" not in dispatch.kernels(op):
        return f"no CUDA C++ kernel is registered for {op}"
    return dispatch.unavailable_reason("cuda", "cuda")


# VNNI panels pad N up to a multiple of 48 and K up to a multiple of 4. "auto" takes the
# VNNI layout only where that adds at most 1/16 to the weight (N = 384, 480, 512 and up,
# any N that is a multiple of 48): the layers it leaves canonical are small ones (N = 10,
# 64, 256 pad by 380%, 50%, 12.5%), whose calls fixed costs dominate; ad hoc on this
# project's Zen 4 (Int8Linear, K = 64..1024, M = 1 and 64; not a bench result file) the two
# layouts were within noise there (0.94-1.12x), while the padding would be stored and saved.
VNNI_MAX_PADDING = 1 / 16


def vnni_padding(n: int, k: int) -> float:
    """Extra bytes of the VNNI weight of an N x K layer over the canonical one (0.5 = 50%)."""
    nt, kt, pn, gk = int8_vnni.repacked_shape(n, k)
    return nt * kt * pn * gk / (n * k) - 1


def _why_not_cpp_avx512(op: str, why_avx512: str) -> Optional[str]:
    """None if op's C++ CPU kernel is registered, built and runs at the AVX-512 level;
    else why not (why_avx512 says why a lower level does not do)."""
    backend = dispatch.kernels(op).get("cpp")
    if backend is None:
        return f"no C++ CPU kernel is registered for {op}"
    why = dispatch.unavailable_reason("cpp", "cpu") or (backend.supports and backend.supports())
    if why:
        return why
    isa = _ext.cpu_isa()
    if isa != "avx512":
        return f"the CPU kernels run at the {isa} level; {why_avx512}"
    return None


def why_not_vnni(device, op: str = "w8a8_mm_vnni", shape=None) -> Optional[str]:
    """None if the fast CPU kernel of `op` (w8a8_mm_vnni: Int8Linear; int8_mm_vnni:
    StaticInt8Linear) would run a weight on device, and (with shape = (N, K)) its VNNI
    padding is at most VNNI_MAX_PADDING; else why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the weight is on {device.type}; the VNNI layout is for the CPU kernel"
    why = _why_not_cpp_avx512(op, "the VNNI layout is fast only with AVX-512 VNNI (its "
                                  "kernel is scalar code elsewhere)")
    if why:
        return why
    if shape is not None:
        n, k = shape
        pad = vnni_padding(n, k)
        if pad > VNNI_MAX_PADDING:
            return (f"N = {n}, K = {k}: VNNI panels would pad the weight by {pad:.1%} "
                    f"(\"auto\" takes them up to {VNNI_MAX_PADDING:.2%}); a small layer keeps "
                    "the canonical weight (layout=\"vnni\" forces the panels)")
    return None


def resolve(layout: str, op: str, device, dtype: torch.dtype) -> str:
    """'auto' -> 'tc' or 'canonical' (see the module docstring); others unchanged."""
    check(layout)
    if layout != "auto":
        return layout
    return "tc" if why_not_tc(op, device, dtype) is None else "canonical"


def resolve_vnni(layout: str, device, op: str = "w8a8_mm_vnni", shape=None) -> str:
    """'auto' -> 'vnni' or 'canonical' for a weight of shape (N, K) (see the module
    docstring); others unchanged."""
    check(layout)
    if layout != "auto":
        return layout
    return "vnni" if why_not_vnni(device, op, shape) is None else "canonical"


def why_not_ksplit(device, dtype: torch.dtype, k: int, group_size: int) -> Optional[str]:
    """None if "auto" stores an Int4Linear weight (on device, layer dtype `dtype`, K
    columns) in the K-split layout, else why not (module docstring)."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the weight is on {device.type}; the K-split layout is for the CPU kernel"
    if dtype == torch.bfloat16:
        return ("the layer is bfloat16: its x takes the vdpbf16ps kernel, which the K-split "
                "layout does not speed up")
    if int4_ksplit.chunks_for(k, group_size) is None:
        return (f"K = {k}: " + ("x's slices fit in L1 whole, the canonical layout is as fast"
                                if k <= int4_ksplit.MAX_CHUNK_K else
                                "no chunk count cuts it into chunks of whole 128-column "
                                f"blocks of at most {int4_ksplit.MAX_CHUNK_K} columns"))
    return _why_not_cpp_avx512("int4_mm_ksplit", "the K-split layout speeds up the AVX-512 "
                                                 "M = 1 kernel only")


def resolve_int4(layout: str, device, dtype: torch.dtype, k: int, group_size: int) -> str:
    """Int4Linear's 'auto' -> 'tc', 'ksplit' or 'canonical' (see the module docstring);
    others unchanged."""
    check(layout)
    if layout != "auto":
        return layout
    if why_not_tc("int4_mm_tc", device, dtype) is None:
        return "tc"
    return "ksplit" if why_not_ksplit(device, dtype, k, group_size) is None else "canonical"
