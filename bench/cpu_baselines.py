"""PyTorch's (and torchao's) own CPU paths for the same formats, timed beside pyfast.

    quantize_dynamic   torch.ao dynamic int8 Linear (W8A8, fp32 x) - deprecated upstream
    int8pack           torch._weight_int8pack_mm (int8 weight-only, bf16 x)
    int4pack           torch._weight_int4pack_mm_for_cpu (int4 group 128, bf16 x)
    torchao:*          torchao.quantization.quantize_ configs, where torchao installs
                       (optional: pip install torchao; never a pyfast dependency)

Each is built from the layer's own weight copies, so the rotation at small M is the
same as for the pyfast rows. Rows that cannot be built (e.g. int4pack with N not a
multiple of 16) are skipped, and the bench output and result file say why.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .cases import Case, Cell, nbytes, spot_check
from .shapes import INT4_GROUP_SIZE


def _linear_from(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _per_copy(cell: Cell, key: str, fmt: str, build: Callable[[int], object]) -> list:
    """One object per copy of the layer's `fmt` weights, cached on the layer: the count
    of copies is sized for that format's bytes, so at small M the baseline cycles
    through as many bytes as the pyfast row of the same format."""
    cache = cell.layer.__dict__.setdefault("_baseline_cache", {})
    if key not in cache:
        cache[key] = [build(i) for i in range(len(getattr(cell.layer, fmt)))]
    return cache[key]


def _dense(cell: Cell, i: int) -> torch.Tensor:
    return cell.layer.dense[i % len(cell.layer.dense)]


def _pick(cell: Cell, objs: list, i: int):
    return objs[i % len(objs)] if cell.rotate else objs[0]


BUILD_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)


def _build(name: str, cell: Cell, key: str, fmt: str, build: Callable[[int], object],
           skipped: List[Tuple[str, str]]) -> Optional[list]:
    """_per_copy, or None with (name, why) added to skipped when torch cannot build it
    for this shape (its own limits, e.g. int4pack needs N % 16 == 0)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # torch.ao.quantization is deprecated
            return _per_copy(cell, key, fmt, build)
    except BUILD_ERRORS as exc:
        skipped.append((name, f"cannot be built for K={cell.layer.k} N={cell.layer.n}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
        return None


def cpu_baseline_cases(cell: Cell) -> Tuple[List[Case], List[Tuple[str, str]]]:
    if cell.device != "cpu":
        return [], []
    m, k, n = cell.m, cell.layer.k, cell.layer.n
    flops, w0 = 2 * m * n * k, cell.layer.dense[0]
    out32, out16 = 4 * m * n, 2 * m * n
    cases, skipped = [], []

    dyn = _build("quantize_dynamic", cell, "dyn", "int8",
                 lambda i: torch.ao.quantization.quantize_dynamic(
                     nn.Sequential(_linear_from(_dense(cell, i))), {nn.Linear}, dtype=torch.qint8),
                 skipped)
    if dyn is not None:
        cases.append(Case("quantize_dynamic", "torch.ao", "f32->i8->f32",
                          lambda i: _pick(cell, dyn, i)(cell.x32), _n(cell, dyn), flops,
                          nbytes(cell.x32) + n * k + out32, spot_check(cell.x32, w0, 0.05),
                          note="W8A8 dynamic, deprecated upstream", weight_bytes=n * k))

    # int8_nk: PyTorch's own int8 tensor, not pyfast's placed copy (cases.make_layer)
    i8 = _build("int8pack", cell, "int8pack", "int8_nk", lambda i: (
        cell.layer.int8_nk[i], cell.layer.int8[i % len(cell.layer.int8)][1].to(torch.bfloat16)),
        skipped)
    xb = cell.x32.to(torch.bfloat16)
    if i8 is not None:
        cases.append(Case("torch._weight_int8pack_mm", "torch", "bf16.w8",
                          lambda i: torch._weight_int8pack_mm(xb, *_pick(cell, i8, i)), _n(cell, i8),
                          flops, nbytes(xb) + n * k + 2 * n + out16, spot_check(xb, w0, 0.05),
                          note="int8 weight-only, bf16 x", weight_bytes=n * k + 2 * n))

    def int4pack(i):
        packed, scales, zeros = cell.layer.int4[i]
        q = torch.stack(((packed & 0xF), (packed >> 4)), dim=2).reshape(n, k).to(torch.int32)
        b = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        # torch dequantizes (q - 8) * scale + zero; pyfast's symmetric pack is (q - 8) * scale
        sz = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=2).to(torch.bfloat16)
        return b, sz.contiguous()
    i4 = _build("int4pack", cell, "int4pack", "int4", int4pack, skipped)
    i4_bytes = n * k // 2 + 4 * n * k // INT4_GROUP_SIZE
    if i4 is not None:
        cases.append(Case("torch._weight_int4pack_mm_for_cpu", "torch", f"bf16.w4g{INT4_GROUP_SIZE}",
                          lambda i: torch._weight_int4pack_mm_for_cpu(
                              xb, _pick(cell, i4, i)[0], INT4_GROUP_SIZE, _pick(cell, i4, i)[1]),
                          _n(cell, i4), flops, nbytes(xb) + i4_bytes + out16,
                          spot_check(xb, w0, 0.2), note="int4 weight-only, bf16 x",
                          weight_bytes=i4_bytes))

    torchao_cases, why = _torchao_cases(cell, flops)
    cases += torchao_cases
    if why:
        skipped.append(("torchao", why))
    return cases, skipped


def _n(cell: Cell, objs: list) -> int:
    return len(objs) if cell.rotate else 1


def _torchao_cases(cell: Cell, flops: int):
    if importlib.util.find_spec("torchao") is None:
        return [], "torchao is not installed (optional: pip install torchao)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                              Int8WeightOnlyConfig, quantize_)
    except ImportError as exc:
        return [], f"torchao does not import here ({exc})"
    w0, m, n, k = cell.layer.dense[0], cell.m, cell.layer.n, cell.layer.k
    xb = cell.x32.to(torch.bfloat16)
    out = []
    for label, config, x, dtype in (("int8 dyn W8A8", Int8DynamicActivationInt8WeightConfig, cell.x32,
                                     torch.float32),
                                    ("int8 weight-only", Int8WeightOnlyConfig, xb, torch.bfloat16)):
        def build(i, config=config, dtype=dtype):
            model = nn.Sequential(_linear_from(_dense(cell, i))).to(dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(model, config())
            return model
        try:
            models = _per_copy(cell, f"torchao-{label}", "int8", build)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            return out, f"torchao {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        out.append(Case(f"torchao {label}", "torchao", "f32" if dtype == torch.float32 else "bf16",
                        lambda i, models=models, x=x: _pick(cell, models, i)(x), _n(cell, models), flops,
                        nbytes(x) + n * k + 4 * n + m * n * x.element_size(),
                        spot_check(x, w0, 0.05), note="torchao quantize_",
                        weight_bytes=n * k + 4 * n))
    return out, ""


def measure_bandwidth_gbs(reps: int = 7, mib: int = 512, hugepages: bool = False) -> float:
    """Memory read bandwidth of this machine now: median of sums over a buffer far larger
    than any cache, with torch's current thread count (GB/s, 1e9 bytes); with hugepages
    the buffer is placed as pyfast places layer buffers (pyfast.memory.to_hugepages)."""
    import statistics
    import time

    from pyfast import memory
    buf = torch.ones(mib * 2**20 // 4)
    if hugepages:
        buf = memory.to_hugepages(buf)
    buf.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        buf.sum()
        times.append(time.perf_counter_ns() - t0)
    return nbytes(buf) / statistics.median(times)
