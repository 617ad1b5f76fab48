"""What each benchmark row runs: its inputs, the call, FLOPs and bytes moved, its check.

A row is one op x backend (or one torch baseline) on one cell (M, K, N). Weights are
made once per layer shape (`Layer`) in every format, each as a list of copies for
rotation (bench/timing.py); activations once per cell (`Cell`).

Correctness: a pyfast row's first output is compared once with the reference
backend's output for the same inputs (`pyfast.use_backend(op="reference")`): same
shape, same dtype, values within tolerance; a torch baseline's output is checked for
its shape and spot-checked on a few columns against a float64 product. A check returns
(status, error) or, when it has something to say, (status, error, note).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import pyfast
from pyfast import dispatch, memory
from pyfast.layouts import int4_ksplit
from pyfast.sparsity import magnitude_24_mask

from .shapes import INT4_GROUP_SIZE

Tensor = torch.Tensor
PYFAST_OPS = ("int8_mm", "int8_mm_vnni", "w8a8_mm", "w8a8_mm_vnni", "int8_weight_mm", "int4_mm",
              "sparse24_mm", "sparse24_int4_mm", "quantize_per_token", "int4_mm_tc",
              "sparse24_mm_tc", "sparse24_int4_mm_tc", "int4_mm_ksplit")
# quantize_per_token then int8_mm as two op calls: W8A8 unfused, beside w8a8_mm (the one
# op Int8Linear calls), so the fusion's gain is measured in the same run
E2E = "w8a8_e2e"
# static W8A8 as StaticInt8Linear runs it on the VNNI layout: quantize_static (one
# calibrated scale: the input's abs-max / 127 here) then int8_mm_vnni, beside
# w8a8_mm_vnni (dynamic, one op)
STATIC_E2E = "w8a8_static_e2e"
TWO_OP_ROWS = {E2E: ("quantize_per_token", "int8_mm"),
               STATIC_E2E: ("quantize_static", "int8_mm_vnni")}
ALL_OPS = PYFAST_OPS + tuple(TWO_OP_ROWS)
# Ops on the tensor-core layouts (pyfast/layouts): only the CUDA C++ kernels read them
# fast; elsewhere the reference un-repacks per call, so they are benched by default on
# CUDA only (name them in --ops to time them elsewhere).
CUDA_LAYOUT_OPS = ("int4_mm_tc", "sparse24_mm_tc", "sparse24_int4_mm_tc")
# and on the CPU's VNNI and K-split layouts: only the C++ CPU kernels read them fast
# (benched on CPU only)
CPU_LAYOUT_OPS = ("w8a8_mm_vnni", "int8_mm_vnni", STATIC_E2E, "int4_mm_ksplit")

# Loose tolerances on max|out - ref| / max|ref|: they catch a wrong kernel (wrong layout,
# wrong scale, garbage), not last-bit differences in summation order.
TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}
SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def tolerance(dtype: torch.dtype) -> float:
    """TOL[dtype]; float32 outputs get bfloat16's when the run lets float32 matmuls compute
    in lower precision (--float32-matmul-precision high / medium: PyTorch's and pyfast's
    kernels may then round x to bfloat16 or TF32 inside)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TOL[torch.bfloat16]
    return TOL[dtype]


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _copies(first, n: int, place: bool) -> list:
    """n distinct buffers with the same values: [first, clone, clone, ...], or with place
    n copies each where a pyfast layer keeps its buffers (pyfast.memory.to_hugepages:
    transparent huge pages on a Linux CPU, else a plain clone)."""
    def one(t: Tensor) -> Tensor:
        return memory.to_hugepages(t.clone()) if place else t.clone()
    clone = (lambda v: tuple(one(t) for t in v)) if isinstance(first, tuple) else one
    return ([] if place else [first]) + [clone(first) for _ in range(n - (0 if place else 1))]


def _size(v) -> int:
    return sum(nbytes(t) for t in v) if isinstance(v, tuple) else nbytes(v)


@dataclass
class Layer:
    """One linear layer, K in and N out, in every format; each a list of copies.

    dense    float32 [N, K]                       F.linear fp32 baseline
    half     bf16 (CPU) / fp16 (GPU) [N, K]       F.linear half baseline
    int8     (w_int8 int8 [N, K], w_scale f32 [N])        int8_mm, int8_weight_mm
    int8_kn  int8 [K, N] row-major (w_int8.t().contiguous())   torch._int_mm
    int8_nk  int8 [N, K] (w_int8 as PyTorch allocates it)  torch._int_mm on its .t() view
    int8_vnni (repack_int8_vnni(w_int8), w_scale)         w8a8_mm_vnni, int8_mm_vnni
    int4     (packed u8 [N, K/2], scales f32 [N, K/128], zeros u8 [N, K/128])  symmetric
    sparse24 (values act_dtype [N, K/2], meta u8 [N, K/4])  of the 2:4-pruned weight
    sparse24_int4 (packed u8 [N, K/4], meta u8 [N, K/8], scales f32 [N, K/128],
             zeros u8 [N, K/128])  the same 2:4-pruned weight, kept values int4 symmetric
    int4_tc, sparse24_tc, sparse24_int4_tc  int4 / sparse24 / sparse24_int4 with the
             weight (or metadata) repacked for the CUDA kernels (pyfast/layouts)
    int4_ksplit (repack_int4_ksplit(packed, C), scales, zeros)  int4 cut into the C K
             chunks that layout "auto" uses (int4_ksplit.chunks_for; 1 where it gives none)
    """
    k: int
    n: int
    dense: list
    half: list
    int8: list
    int8_kn: list
    int8_nk: list
    int4: list
    sparse24: list
    sparse24_int4: list
    int4_tc: list
    sparse24_tc: list
    sparse24_int4_tc: list
    int8_vnni: list
    int4_ksplit: list
    torch_hugepages: bool = False   # TORCH_FORMATS placed like pyfast's too (make_layer)

    def copies(self) -> Dict[str, int]:
        return {name: len(getattr(self, name)) for name in LAYER_FORMATS}


LAYER_FORMATS = ("dense", "half", "int8", "int8_kn", "int8_nk", "int4", "sparse24",
                 "sparse24_int4", "int4_tc", "sparse24_tc", "sparse24_int4_tc", "int8_vnni",
                 "int4_ksplit")


TORCH_FORMATS = ("dense", "half", "int8_kn", "int8_nk")   # the torch baselines' weights
# The formats each row reads (and rotates through at small M): make_layer makes copies of
# these only, and bench.run sizes its memory cap by their number.
BASELINE_FORMATS = ("dense", "half", "int8", "int8_kn", "int8_nk")   # baseline_cases
CPU_BASELINE_FORMATS = ("int8", "int8_nk", "int4")                   # cpu_baselines.py
OP_FORMATS = {"quantize_per_token": (), "int8_mm": ("int8",), "int8_mm_vnni": ("int8_vnni",),
              "w8a8_mm": ("int8",), "w8a8_mm_vnni": ("int8_vnni",), "int8_weight_mm": ("int8",),
              "int4_mm": ("int4",), "sparse24_mm": ("sparse24",),
              "sparse24_int4_mm": ("sparse24_int4",), "int4_mm_tc": ("int4_tc",),
              "sparse24_mm_tc": ("sparse24_tc",), "sparse24_int4_mm_tc": ("sparse24_int4_tc",),
              "w8a8_e2e": ("int8",), "w8a8_static_e2e": ("int8_vnni",),
              "int4_mm_ksplit": ("int4_ksplit",)}


def formats_used(ops, cpu_baselines: bool) -> Tuple[str, ...]:
    """The Layer formats that the rows of `ops`, the torch baselines and (cpu_baselines)
    the CPU baselines read, in Layer.copies() order."""
    used = set(BASELINE_FORMATS) | (set(CPU_BASELINE_FORMATS) if cpu_baselines else set())
    used |= {f for op in ops for f in OP_FORMATS[op]}
    return tuple(f for f in LAYER_FORMATS if f in used)


def make_layer(k: int, n: int, device: str, act_dtype: torch.dtype, half_dtype: torch.dtype,
               copies_for: Callable[[int], int], torch_hugepages: bool = False,
               rotate_formats: Optional[Tuple[str, ...]] = None) -> Layer:
    """Random weight ~ N(0, 1/K), packed with the reference kernels; copies_for(bytes of
    one copy) says how many copies of each format in rotate_formats (default: all) to
    keep; the other formats get one copy (no row reads them). The pyfast formats' copies
    are placed as a pyfast layer places its buffers (pyfast/memory.py); the torch
    baselines' weights (TORCH_FORMATS) are PyTorch's own tensors, placed so too only
    with torch_hugepages."""
    g = torch.Generator().manual_seed(1000003 * k + n)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device)
    with pyfast.use_backend("reference"):
        int8 = torch.ops.pyfast.quantize_per_token(w)    # per output channel = per row of w
        int4 = torch.ops.pyfast.pack_int4(w, INT4_GROUP_SIZE, True)
        pruned = w * magnitude_24_mask(w)
        sparse = torch.ops.pyfast.sparse24_compress(pruned.to(act_dtype))
        sparse_int4 = torch.ops.pyfast.pack_sparse24_int4(pruned, INT4_GROUP_SIZE, True)
        int4_tc = (torch.ops.pyfast.repack_int4_tc(int4[0]), *int4[1:])
        sparse_tc = (sparse[0], torch.ops.pyfast.repack_sparse24_tc(sparse[1]))
        sparse_int4_tc = (*torch.ops.pyfast.repack_sparse24_int4_tc(*sparse_int4[:2]),
                          *sparse_int4[2:])
        int8_vnni = (torch.ops.pyfast.repack_int8_vnni(int8[0]), int8[1])
        chunks = int4_ksplit.chunks_for(k, INT4_GROUP_SIZE) or 1
        int4_ks = (torch.ops.pyfast.repack_int4_ksplit(int4[0], chunks, INT4_GROUP_SIZE),
                   *int4[1:])
    formats = {"dense": w, "half": w.to(half_dtype), "int8": int8,
               "int8_kn": int8[0].t().contiguous(), "int8_nk": int8[0], "int4": int4, "sparse24": sparse,
               "sparse24_int4": sparse_int4,
               "int4_tc": int4_tc, "sparse24_tc": sparse_tc,
               "sparse24_int4_tc": sparse_int4_tc, "int8_vnni": int8_vnni,
               "int4_ksplit": int4_ks}
    rotate = LAYER_FORMATS if rotate_formats is None else rotate_formats
    return Layer(k, n, **{name: _copies(v, copies_for(_size(v)) if name in rotate else 1,
                                        torch_hugepages or name not in TORCH_FORMATS)
                          for name, v in formats.items()}, torch_hugepages=torch_hugepages)


@dataclass
class Cell:
    """Activations for one M on one layer: x [M, K] in act_dtype, its float32 and half
    versions for the baselines, its per-token int8 quantization for int8_mm, and a static
    scale (abs-max / 127, float32 [1]) for quantize_static."""
    m: int
    layer: Layer
    device: str
    act_dtype: torch.dtype
    half_dtype: torch.dtype
    rotate: bool                        # False: every call uses copy 0
    x: Tensor = field(init=False)
    x32: Tensor = field(init=False)
    xh: Tensor = field(init=False)
    a: Tensor = field(init=False)
    a_scale: Tensor = field(init=False)
    static_scale: Tensor = field(init=False)
    _oracle: Dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self):
        g = torch.Generator().manual_seed(7 * self.m + self.layer.k)
        x = torch.randn(self.m, self.layer.k, generator=g).to(self.device)
        self.x, self.x32, self.xh = x.to(self.act_dtype), x, x.to(self.half_dtype)
        with pyfast.use_backend(quantize_per_token="reference"):
            self.a, self.a_scale = torch.ops.pyfast.quantize_per_token(self.x)
        amax = float(self.x.float().abs().max()) if self.x.numel() else 0.0
        self.static_scale = torch.tensor([amax / 127 if amax > 0 else 1.0], device=self.device)

    def pick(self, fmt: str, i: int):
        copies = getattr(self.layer, fmt)
        return copies[i % len(copies)] if self.rotate else copies[0]

    def copies(self, fmt: Optional[str]) -> int:
        return len(getattr(self.layer, fmt)) if (fmt and self.rotate) else 1

    def weight_bytes(self, fmt: Optional[str]) -> int:
        """Bytes of one copy of the weight in fmt (0 for a row without a weight)."""
        return _size(getattr(self.layer, fmt)[0]) if fmt else 0

    def reference(self, op: str, run: Callable[[int], Any]) -> Any:
        """The reference backend's output on copy 0, computed once per op and cell."""
        if op not in self._oracle:
            with pyfast.use_backend(**{o: "reference" for o in forced_ops(op)}):
                self._oracle[op] = run(0)
        return self._oracle[op]


@dataclass
class Case:
    """One row to time. call(i) runs it on weight copy i % copies."""
    op: str
    backend: str
    dtype: str
    call: Callable[[int], Any]
    copies: int
    flops: Optional[int]
    bytes: int
    check: Callable[[Any], tuple]            # first output -> (status, error[, note])
    force: Dict[str, str] = field(default_factory=dict)   # use_backend(**force) while timing
    default: bool = False                                 # what a plain call runs here
    note: str = ""
    weight_bytes: Optional[int] = None  # one copy of the weight the row reads (rotation)


def forced_ops(op: str) -> Tuple[str, ...]:
    return TWO_OP_ROWS.get(op, (op,))


# --- checks --------------------------------------------------------------------------

def relative_error(out: Tensor, ref: Tensor) -> float:
    """max|out - ref| / max|ref| (NaN in either gives NaN, which fails every check)."""
    diff = (out.double() - ref.double()).abs().max()
    return float(diff / ref.double().abs().max().clamp_min(1e-30))


def _status(err: float, tol: float) -> str:
    return "ok" if err <= tol else "MISMATCH"      # NaN <= tol is False


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{SHORT.get(t.dtype, str(t.dtype).replace('torch.', ''))}{list(t.shape)}"
    return type(t).__name__


def unlike(out: Any, ref: Tensor, what: str = "output") -> Optional[str]:
    """Why out cannot stand for ref (not a tensor, another shape or dtype), else None."""
    if isinstance(out, Tensor) and out.shape == ref.shape and out.dtype == ref.dtype:
        return None
    return f"{what} is {_describe(out)}, the reference's {_describe(ref)}"


def compare_to(ref: Any, out_dtype: torch.dtype) -> Callable[[Any], tuple]:
    """out against the reference's output: same shape and dtype, values within tolerance."""
    def check(out):
        why = unlike(out, ref)
        if why:
            return "MISMATCH", None, why
        err = relative_error(out, ref)
        return _status(err, tolerance(out_dtype)), err
    return check


def compare_quantized(ref: Tuple[Tensor, Tensor]) -> Callable[[Any], tuple]:
    """quantize_per_token: q and scales of the reference's shapes and dtypes, q within 1
    step of the reference (x/scale vs x*(1/scale) can round differently at .5), scales
    within 1e-5 relative. Error reported: max |q diff|."""
    def check(out):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            return "MISMATCH", None, f"output is {type(out).__name__}, not (q, scale)"
        q, s = out
        why = unlike(q, ref[0], "q") or unlike(s, ref[1], "scale")
        if why:
            return "MISMATCH", None, why
        q_err = float((q.int() - ref[0].int()).abs().max()) if q.numel() else 0.0
        s_err = relative_error(s, ref[1])
        return ("ok" if q_err <= 1 and s_err <= 1e-5 else "MISMATCH"), q_err
    return check


def spot_check(x: Tensor, w: Tensor, tol: float) -> Callable[[Any], tuple]:
    """Baselines: an output of shape [M, N], 8 of its columns against
    x.double() @ w[cols].double().T."""
    cols = torch.linspace(0, w.shape[0] - 1, 8, device=w.device).long()
    ref = x.double() @ w[cols].double().T
    shape = (x.shape[0], w.shape[0])

    def check(out):
        if not isinstance(out, Tensor) or tuple(out.shape) != shape:
            return "MISMATCH", None, f"output is {_describe(out)}, expected shape {list(shape)}"
        err = relative_error(out[:, cols], ref)
        return _status(err, tol), err
    return check


# --- the rows ------------------------------------------------------------------------

def baseline_cases(cell: Cell) -> List[Case]:
    """torch's own GEMMs on the same shape: F.linear fp32 and half, torch._int_mm."""
    m, k, n = cell.m, cell.layer.k, cell.layer.n
    flops, half = 2 * m * n * k, SHORT[cell.half_dtype]
    lin = lambda x, w: nbytes(x) + nbytes(w) + m * n * x.element_size()  # noqa: E731
    w0, h0, q0 = cell.layer.dense[0], cell.layer.half[0], cell.layer.int8[0][0]
    int_mm_bytes = nbytes(cell.a) + nbytes(q0) + 4 * m * n
    return [
        Case("F.linear", "torch", "f32", lambda i: F.linear(cell.x32, cell.pick("dense", i)),
             cell.copies("dense"), flops, lin(cell.x32, w0),
             spot_check(cell.x32, w0, tolerance(torch.float32)), note="dense baseline",
             weight_bytes=nbytes(w0)),
        Case("F.linear", "torch", half, lambda i: F.linear(cell.xh, cell.pick("half", i)),
             cell.copies("half"), flops, lin(cell.xh, h0),
             spot_check(cell.xh, h0, tolerance(cell.half_dtype)), note="dense baseline",
             weight_bytes=nbytes(h0)),
        Case("torch._int_mm", "torch", "i8->i32",
             lambda i: torch._int_mm(cell.a, cell.pick("int8_nk", i).t()),
             cell.copies("int8_nk"), flops, int_mm_bytes, spot_check(cell.a, q0, 0.0),
             note="b = w.t(): [K,N] view, column-major", weight_bytes=nbytes(q0)),
        Case("torch._int_mm", "torch", "i8->i32",
             lambda i: torch._int_mm(cell.a, cell.pick("int8_kn", i)),
             cell.copies("int8_kn"), flops, int_mm_bytes, spot_check(cell.a, q0, 0.0),
             note="b = [K,N] contiguous copy", weight_bytes=nbytes(q0)),
    ]


def _pyfast_call(op: str, cell: Cell):
    """(call(i), weight format rotated, FLOPs, bytes, dtype label, output dtype)."""
    m, k, n, act = cell.m, cell.layer.k, cell.layer.n, cell.act_dtype
    x_bytes, out_bytes = nbytes(cell.x), m * n * cell.x.element_size()
    ops, a_s = torch.ops.pyfast, SHORT[act]
    if op == "quantize_per_token":
        return (lambda i: ops.quantize_per_token(cell.x), None, None,
                x_bytes + m * k + 4 * m, f"{a_s}->i8", None)
    if op == "int8_mm":
        w_bytes = _size(cell.layer.int8[0])

        def call(i):
            w, w_scale = cell.pick("int8", i)
            return ops.int8_mm(cell.a, w, cell.a_scale, w_scale, None, act)
        return (call,
                "int8", 2 * m * n * k, nbytes(cell.a) + 4 * m + w_bytes + out_bytes,
                f"i8->{a_s}", act)
    if op == "int8_mm_vnni":
        w_bytes = _size(cell.layer.int8_vnni[0])

        def call(i):
            w, w_scale = cell.pick("int8_vnni", i)
            return ops.int8_mm_vnni(cell.a, w, cell.a_scale, w_scale, None, act)
        return (call,
                "int8_vnni", 2 * m * n * k, nbytes(cell.a) + 4 * m + w_bytes + out_bytes,
                f"i8->{a_s}.vnni", act)
    if op == "w8a8_mm":
        return (lambda i: ops.w8a8_mm(cell.x, *cell.pick("int8", i), None),
                "int8", 2 * m * n * k, x_bytes + _size(cell.layer.int8[0]) + out_bytes,
                f"{a_s}->i8->{a_s}", act)
    if op == "w8a8_mm_vnni":
        return (lambda i: ops.w8a8_mm_vnni(cell.x, *cell.pick("int8_vnni", i), None),
                "int8_vnni", 2 * m * n * k, x_bytes + _size(cell.layer.int8_vnni[0]) + out_bytes,
                f"{a_s}->i8->{a_s}.vnni", act)
    if op == "int8_weight_mm":
        return (lambda i: ops.int8_weight_mm(cell.x, *cell.pick("int8", i), None),
                "int8", 2 * m * n * k, x_bytes + _size(cell.layer.int8[0]) + out_bytes,
                f"{a_s}.w8", act)
    if op == "int4_mm":
        return (lambda i: ops.int4_mm(cell.x, *cell.pick("int4", i), INT4_GROUP_SIZE, None),
                "int4", 2 * m * n * k, x_bytes + _size(cell.layer.int4[0]) + out_bytes,
                f"{a_s}.w4g{INT4_GROUP_SIZE}", act)
    if op == "sparse24_mm":
        return (lambda i: ops.sparse24_mm(cell.x, *cell.pick("sparse24", i), None),
                "sparse24", 2 * m * n * k, x_bytes + _size(cell.layer.sparse24[0]) + out_bytes,
                f"{a_s}.2:4", act)
    if op == "sparse24_int4_mm":
        return (lambda i: ops.sparse24_int4_mm(cell.x, *cell.pick("sparse24_int4", i),
                                               INT4_GROUP_SIZE, None),
                "sparse24_int4", 2 * m * n * k,
                x_bytes + _size(cell.layer.sparse24_int4[0]) + out_bytes,
                f"{a_s}.2:4w4g{INT4_GROUP_SIZE}", act)
    if op == "int4_mm_tc":
        return (lambda i: ops.int4_mm_tc(cell.x, *cell.pick("int4_tc", i), INT4_GROUP_SIZE, None),
                "int4_tc", 2 * m * n * k, x_bytes + _size(cell.layer.int4_tc[0]) + out_bytes,
                f"{a_s}.w4g{INT4_GROUP_SIZE}.tc", act)
    if op == "int4_mm_ksplit":
        chunks = cell.layer.int4_ksplit[0][0].shape[0]
        return (lambda i: ops.int4_mm_ksplit(cell.x, *cell.pick("int4_ksplit", i),
                                             INT4_GROUP_SIZE, None),
                "int4_ksplit", 2 * m * n * k,
                x_bytes + _size(cell.layer.int4_ksplit[0]) + out_bytes,
                f"{a_s}.w4g{INT4_GROUP_SIZE}.ks{chunks}", act)
    if op == "sparse24_mm_tc":
        return (lambda i: ops.sparse24_mm_tc(cell.x, *cell.pick("sparse24_tc", i), None),
                "sparse24_tc", 2 * m * n * k,
                x_bytes + _size(cell.layer.sparse24_tc[0]) + out_bytes, f"{a_s}.2:4.tc", act)
    if op == "sparse24_int4_mm_tc":
        return (lambda i: ops.sparse24_int4_mm_tc(cell.x, *cell.pick("sparse24_int4_tc", i),
                                                  INT4_GROUP_SIZE, None),
                "sparse24_int4_tc", 2 * m * n * k,
                x_bytes + _size(cell.layer.sparse24_int4_tc[0]) + out_bytes,
                f"{a_s}.2:4w4g{INT4_GROUP_SIZE}.tc", act)
    if op == E2E:
        def call(i):
            q, q_scale = ops.quantize_per_token(cell.x)
            w, w_scale = cell.pick("int8", i)
            return ops.int8_mm(q, w, q_scale, w_scale, None, act)
        quant_bytes = x_bytes + 2 * (m * k + 4 * m)      # x in, q and scale out and back in
        return (call, "int8", 2 * m * n * k,
                quant_bytes + _size(cell.layer.int8[0]) + out_bytes, f"{a_s}->i8->{a_s}", act)
    if op == STATIC_E2E:
        def call(i):
            q, q_scale = ops.quantize_static(cell.x, cell.static_scale)
            w, w_scale = cell.pick("int8_vnni", i)
            return ops.int8_mm_vnni(q, w, q_scale, w_scale, None, act)
        quant_bytes = x_bytes + 2 * (m * k + 4 * m)
        return (call, "int8_vnni", 2 * m * n * k,
                quant_bytes + _size(cell.layer.int8_vnni[0]) + out_bytes,
                f"{a_s}->i8(static)->{a_s}.vnni", act)
    raise ValueError(f"unknown op {op!r}; ops: {', '.join(ALL_OPS)}")


def usable_families(op: str, device: str, requested: Optional[List[str]]
                    ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(families to time, [(family, why not)]) for op on device, reference first.

    A family is timed if it has a kernel for the op on this device and can run here.
    Families that run on a device only when forced (Triton on CPU, in its interpreter)
    are timed only when named in `requested` (--backends): they are not a fast path.
    """
    usable, skipped = [], []
    table = dispatch.kernels(op)
    for family in dispatch.FAMILIES:
        backend = table.get(family)
        if requested is not None and family not in requested:
            continue
        if backend is None or device not in backend.devices:
            if requested is not None:        # asked for by name: say why there is no row
                skipped.append((family, f"no {family} kernel for {op} on {device}"))
            continue
        reason = dispatch.unavailable_reason(family, device)
        if reason is None and requested is None and family not in dispatch.PRIORITY.get(device, ()):
            reason = f"runs on {device} only when forced; name it in --backends to time it"
        if reason is None:
            usable.append(family)
        else:
            skipped.append((family, reason))
    return usable, skipped


def _chosen(op: str, cell: Cell, force: Dict[str, str]) -> Tuple[str, ...]:
    """The family each op of the row runs under use_backend(**force); raises
    BackendUnavailableError (with the reason) if a forced one cannot take these inputs."""
    with pyfast.use_backend(**force):
        return tuple(dispatch.choose(o, cell.device, _pyfast_args(o, cell)).family
                     for o in forced_ops(op))


def _pyfast_args(op: str, cell: Cell) -> tuple:
    """op's arguments on weight copy 0, for dispatch.choose (which kernel would run).
    (In the two-op rows the matmul gets the quantizer's output: same shapes as (a, a_scale).)"""
    layer, x = cell.layer, cell.x
    return {
        "quantize_per_token": lambda: (x,),
        "int8_mm": lambda: (cell.a, layer.int8[0][0], cell.a_scale, layer.int8[0][1], None,
                            cell.act_dtype),
        "int8_weight_mm": lambda: (x, *layer.int8[0], None),
        "w8a8_mm": lambda: (x, *layer.int8[0], None),
        "w8a8_mm_vnni": lambda: (x, *layer.int8_vnni[0], None),
        "int8_mm_vnni": lambda: (cell.a, layer.int8_vnni[0][0], cell.a_scale,
                                 layer.int8_vnni[0][1], None, cell.act_dtype),
        "quantize_static": lambda: (x, cell.static_scale),
        "int4_mm": lambda: (x, *layer.int4[0], INT4_GROUP_SIZE, None),
        "sparse24_mm": lambda: (x, *layer.sparse24[0], None),
        "sparse24_int4_mm": lambda: (x, *layer.sparse24_int4[0], INT4_GROUP_SIZE, None),
        "int4_mm_tc": lambda: (x, *layer.int4_tc[0], INT4_GROUP_SIZE, None),
        "int4_mm_ksplit": lambda: (x, *layer.int4_ksplit[0], INT4_GROUP_SIZE, None),
        "sparse24_mm_tc": lambda: (x, *layer.sparse24_tc[0], None),
        "sparse24_int4_mm_tc": lambda: (x, *layer.sparse24_int4_tc[0], INT4_GROUP_SIZE, None),
    }[op]()


def pyfast_cases(op: str, cell: Cell, requested: Optional[List[str]]
                 ) -> Tuple[List[Case], List[Tuple[str, str]]]:
    """One row per backend family that can run op here, and [(family, why not)].

    For the two-op rows (w8a8_e2e, w8a8_static_e2e) a family is forced on each of its
    ops where it has a kernel; the other op runs what the dispatcher picks, and the row
    is named "<quantize>+<mm>".
    """
    call, fmt, flops, nbytes_moved, dtype, out_dtype = _pyfast_call(op, cell)
    per_op = {o: usable_families(o, cell.device, requested) for o in forced_ops(op)}
    skipped = list(dict.fromkeys(s for _, (_, sk) in per_op.items() for s in sk))
    families = list(dict.fromkeys(f for usable, _ in per_op.values() for f in usable))
    default = _chosen(op, cell, {})
    cases, seen = [], set()
    for family in families:
        force = {o: family for o in forced_ops(op) if family in per_op[o][0]}
        try:
            chosen = _chosen(op, cell, force)
        except pyfast.BackendUnavailableError as exc:
            skipped.append((family, str(exc)))
            continue
        if chosen in seen:
            continue
        seen.add(chosen)
        label = chosen[0] if len(set(chosen)) == 1 else "+".join(chosen)
        is_reference = set(chosen) == {"reference"}
        note = "the oracle" if is_reference else ""
        if op in TWO_OP_ROWS and len(set(chosen)) > 1:
            note = ", ".join(f"{o}={f}" for o, f in zip(TWO_OP_ROWS[op], chosen))
        cases.append(Case(op, label, dtype, call, cell.copies(fmt), flops, nbytes_moved,
                          _oracle_check(op, cell, call, out_dtype, is_reference),
                          force, chosen == default, note, cell.weight_bytes(fmt)))
    return cases, skipped


def _oracle_check(op: str, cell: Cell, call: Callable[[int], Any], out_dtype, is_reference: bool):
    def check(out):
        if is_reference:                 # the reference is the oracle: keep its output
            cell._oracle.setdefault(op, out)
            return "ok", 0.0
        ref = cell.reference(op, call)
        return (compare_quantized(ref) if out_dtype is None else compare_to(ref, out_dtype))(out)
    return check
