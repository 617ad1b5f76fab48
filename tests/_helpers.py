"""Independent oracles and tolerances shared by the op tests.

Nothing here calls pyfast.reference: these are second, differently written
implementations of the layouts in pyfast/formats.py, so that a bug in the
reference cannot hide by agreeing with itself.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from typing import List, Optional

import pytest

import torch
import torch.nn.functional as F

import pyfast
from pyfast import dispatch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) inside the block, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# --- backends ---------------------------------------------------------------------

def usable_families(op: str, device: str) -> List[str]:
    """Every backend family registered for op that can run on `device` on this machine."""
    return [fam for fam, be in dispatch.kernels(op).items()
            if device in be.devices and dispatch.unavailable_reason(fam, device) is None]


# Ops whose Triton kernels run tl.dot on float inputs: Triton's interpreter computes
# that wrongly for bfloat16 (upstream bug), so the harness, and only the harness,
# runs their bf16 cases in float32 there and rounds the result back to bf16.
# On a GPU the kernels run bf16 as they are.
FLOAT_DOT_OPS = ("int8_weight_mm", "int4_mm", "sparse24_mm", "sparse24_int4_mm")


def interpreter_upcasts(op: str, family: str, args) -> bool:
    return (family == "triton" and op in FLOAT_DOT_OPS
            and os.environ.get("TRITON_INTERPRET") == "1"
            and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                    and a.device.type == "cpu" for a in args))


def run_forced(op: str, family: str, *args):
    """Call torch.ops.pyfast.<op>(*args) with `family` forced for that op."""
    if interpreter_upcasts(op, family, args):
        up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a
              for a in args]
        return run_forced(op, family, *up).to(torch.bfloat16)
    with pyfast.use_backend(**{op: family}):
        return getattr(torch.ops.pyfast, op)(*args)


# --- independent decoders of the packed layouts --------------------------------------

def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 [N, K]: low nibble is the even k, high nibble the odd k."""
    n, half = packed.shape
    p = packed.to(torch.int64)
    q = torch.empty(n, 2 * half, dtype=torch.int64, device=packed.device)
    q[:, 0::2] = p % 16
    q[:, 1::2] = p // 16
    return q


def dequant_int4(packed, scales, zeros, group_size) -> torch.Tensor:
    """float64 [N, K]: w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k // group_size."""
    q = unpack_int4(packed).double()
    k = q.shape[1]
    gs = k if group_size == -1 else group_size
    z = zeros.double().repeat_interleave(gs, dim=1)
    s = scales.double().repeat_interleave(gs, dim=1)
    return (q - z) * s


def dequant_sparse24_int4(packed, meta, scales, zeros, group_size) -> torch.Tensor:
    """float64 dense [N, K] of a 2:4 + int4 weight (formats.py), written the long way:
    kept value i of a row is (q[i] - zero) * scale of dense group (4 * (i // 2)) // gs,
    placed at column 4 * (i // 2) + its 2-bit index (bits 2i, 2i+1 of the row's meta)."""
    q = unpack_int4(packed).double()                      # [N, K/2]
    n, half = q.shape
    gs = 2 * half if group_size == -1 else group_size
    z = zeros.double().repeat_interleave(gs // 2, dim=1)
    s = scales.double().repeat_interleave(gs // 2, dim=1)
    return decompress24((q - z) * s, unpack_int4(meta))


def decompress24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta uint8 [N, K/4]) -> dense [N, K] in values.dtype, by plain indexing."""
    n, groups = meta.shape
    m = meta.to(torch.int64)
    dense = torch.zeros(n, 4 * groups, dtype=values.dtype, device=values.device)
    rows = torch.arange(n, device=values.device)[:, None]
    base = 4 * torch.arange(groups, device=values.device)[None, :]
    dense[rows, base + (m & 0b11)] = values[:, 0::2]
    dense[rows, base + ((m >> 2) & 0b11)] = values[:, 1::2]
    return dense


def random_24(n: int, k: int, dtype=torch.float32, device="cpu", gen=None) -> torch.Tensor:
    """A 2:4 weight whose groups hold 0, 1 or 2 nonzeros at random positions."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    groups = w.reshape(n, k // 4, 4)
    rank = torch.rand(n, k // 4, 4, generator=gen).argsort(dim=2)
    keep = torch.randint(0, 3, (n, k // 4, 1), generator=gen)     # nonzeros in each group
    groups.mul_((rank < keep).to(dtype))
    return groups.reshape(n, k).to(device)


def quantize_rows_plain(x: torch.Tensor):
    """Per-row symmetric int8 written the long way, in float64 then float32 for the scale."""
    xf = x.to(torch.float32)
    rows = []
    scales = []
    for r in range(xf.shape[0]):
        row = xf[r]
        amax = float(row.abs().max()) if row.numel() else 0.0
        scale = torch.tensor(amax, dtype=torch.float32) / 127
        if not scale > 0:  # all-zero row, or amax so small that amax / 127 underflows
            scale = torch.tensor(1.0)
        q = torch.round(row / scale).clamp(-127, 127).to(torch.int8)
        rows.append(q)
        scales.append(scale)
    q = torch.stack(rows) if rows else xf.new_zeros(xf.shape, dtype=torch.int8)
    s = torch.stack(scales) if scales else xf.new_zeros(0)
    return q.to(x.device), s.to(x.device)


# --- tolerances ------------------------------------------------------------------------

def linear_tolerance(x: torch.Tensor, w64: torch.Tensor, bias: Optional[torch.Tensor],
                     dtype: torch.dtype) -> float:
    """How far a kernel's x @ w.T + bias in `dtype` may be from another correct one.

    FlashAttention's rule: twice the largest error PyTorch's own F.linear makes
    in that dtype against float64 on the same inputs, plus one ulp of the largest
    output so that a case where PyTorch happens to be exact does not demand
    bit-equality from a kernel that sums in another order.
    """
    if x.shape[0] == 0 or w64.shape[0] == 0:
        return 0.0
    b64 = None if bias is None else bias.double()
    exact = F.linear(x.double(), w64, b64)
    lowp = F.linear(x.to(dtype), w64.to(dtype), None if bias is None else bias.to(dtype))
    err = (lowp.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    return 2 * err + ulp


def assert_near_exact(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                      w64: torch.Tensor, bias: Optional[torch.Tensor], what: str = "") -> None:
    """FlashAttention's rule measured against the exact product: `out`, a kernel's
    x @ w64.T + bias, has the shape and dtype of `expected` (the op's reference) and is
    within linear_tolerance of x @ w64.T + bias computed in float64.

    Against the exact product, not the float32 reference: the reference has its own
    rounding error, so kernel - reference holds two errors, and on a few outputs they
    add past the bound by chance (seen in the Triton interpreter test of int8_weight_mm
    at M = 3, N = 7, float32, on a fresh install with numpy 2.4.6, and on an H100 in
    float32 for sparse24_mm)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype, (
        f"{what}: {tuple(out.shape)} {out.dtype} != {tuple(expected.shape)} {expected.dtype}")
    w64 = w64.to(device=x.device, dtype=torch.float64)
    exact = F.linear(x.double(), w64, None if bias is None else bias.double())
    assert_within(out.double(), exact, linear_tolerance(x, w64, bias, x.dtype), what)


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """Import into a GPU test module: keeps TF32 off while its tests run, so float32
    oracles computed on the GPU (F.linear, the references) are true float32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# Weight-only int4 tensor-core kernels (int4_mm_tc, sparse24_int4_mm_tc): u = unit
# roundoff of x.dtype, TINY = half its smallest subnormal step.
HALF_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
HALF_TINY = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def int4_tc_bound(x, w, bias, k, dtype, weight_term):
    """(x @ w^T + bias in float64, allowed |error|) of a kernel that rounds the dequantized
    weight to x.dtype (two roundings: the scale's cast, the product; weight_term = 1 when
    w is the unrounded float32 weight, 0 when it is the kernel's rounded one), multiplies
    exactly in float32, sums K terms plus up to 64 split-K partials in float32 and casts
    the result once to x.dtype."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if bias is None else bias.double())
    mag = xd.abs() @ wd.abs().T
    u = HALF_UNIT[dtype]
    tol = ((2 * u + u * u) * weight_term + (k + 64) * 2.0 ** -24) * mag * 1.01
    return ref, tol + u * ref.abs() + HALF_TINY[dtype]


def assert_within(out: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    if out.numel() == 0:
        return
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}"


# same-width integer views, to compare float outputs bit for bit
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape and bits; NaN matches any NaN (payloads are not specified)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    out, ref = out.cpu(), ref.cpu()
    if not out.is_floating_point():
        assert torch.equal(out, ref), f"{(out != ref).sum()} of {out.numel()} elements differ"
        return
    nan = out.isnan()
    assert torch.equal(nan, ref.isnan()), "NaN positions differ"
    ints = _INT_VIEW[out.dtype]
    o = torch.where(nan, 0, out.view(ints))
    r = torch.where(nan, 0, ref.view(ints))
    bad = o != r
    assert not bool(bad.any()), (f"{int(bad.sum())} of {out.numel()} elements differ, first at "
                                 f"{bad.nonzero()[0].tolist()}: {out[bad][0].item()!r} vs {ref[bad][0].item()!r}")


def special_rows(k: int) -> torch.Tensor:
    """x [6, k] float32 for the W8A8 kernels: a zero row (scale 1, output = bias), a NaN
    row (NaN out), an inf row, a row of subnormals, a row whose abs-max is one huge
    value, and an ordinary row; every kernel must treat them as the reference does."""
    x = torch.randn(6, k)
    x[0] = 0
    x[1, 4] = float("nan")
    x[2, 7] = float("inf")
    x[3] = 1e-40
    x[4, 11] = 3e38
    return x


# --- test-case helpers ------------------------------------------------------------------

def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor: a column slice of a wider buffer."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    out = wide[:, ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values, column-major: a transposed copy transposed back."""
    out = t.T.contiguous().T
    assert (min(t.shape) == 1 or not out.is_contiguous()) and torch.equal(out, t)
    return out


def rotated_product(*axes, rotate) -> list:
    """The product of `axes`, each case also taking the next value of every list in
    `rotate` in turn, so that every value of those appears without a full product."""
    cycles = [itertools.cycle(r) for r in rotate]
    return [(*case, *(next(c) for c in cycles)) for case in itertools.product(*axes)]


def slice_bound(x: torch.Tensor, w64: torch.Tensor) -> float:
    """The representation error bound of the CPU int8-slice kernels (int4_mm and
    sparse24_int4_mm at M = 1, float x; csrc/cpu/x_slices.h): max over outputs of the sum
    over 8-column lanes of 2^(e - 24) * sum |w| over the lane, e per lane with max|x| <
    0.99 * 2^e (x [1, K])."""
    k = x.shape[1]
    pad = (-k) % 8
    xa = F.pad(x.double().abs(), (0, pad)).view(-1, 8)
    wa = F.pad(w64.abs(), (0, pad)).view(w64.shape[0], -1, 8).sum(dim=2)  # [N, lanes]
    ulps = []
    for m in xa.max(dim=1).values.tolist():
        if m == 0.0:
            ulps.append(0.0)
            continue
        mant, ei = math.frexp(m)  # m = mant * 2^ei, mant in [0.5, 1): e = ei, or ei + 1
        e = ei + (1 if 2 * mant >= 1.98 else 0)
        ulps.append(2.0 ** (e - 24))
    return (wa @ torch.tensor(ulps, dtype=torch.float64)).max().item()


def slice_fallback_x(x: torch.Tensor, case: str) -> None:
    """Put into x [1, >= 128] in place what the slice kernels' fallback tests need: "nan"
    at column 100, "inf" at 7, "tiny_lane" (columns 16-23, one lane, 1e-25 < 2^-64: not
    held), "huge" (1e37 at column 11: held)."""
    if case == "nan":
        x[0, 100] = float("nan")
    elif case == "inf":
        x[0, 7] = float("inf")
    elif case == "tiny_lane":
        x[0, 16:24] = 1e-25
    elif case == "huge":
        x[0, 11] = 1e37
    else:
        raise ValueError(f"case is {case!r}; accepted: nan, inf, tiny_lane, huge")


# --- NaN / inf in x against 2:4 weights (tests/test_cpu_sparse_nonfinite.py, Triton tests) ---
# The reference multiplies x by the dense weight, pruned positions included: an inf at a
# column that weight row n pruned gives 0 * inf = NaN in out[:, n], at a kept column of
# nonzero weight +-inf. NONFINITE_COL is pruned in the even weight rows of
# weight_pruning_col and kept with a nonzero weight in the odd ones.
NONFINITE_COL = 5


def weight_pruning_col(n: int, k: int, dtype, gen) -> torch.Tensor:
    """A random 2:4 weight [n, k] whose column NONFINITE_COL is pruned in the even rows and
    kept with a nonzero weight in the odd ones (so an inf there gives the reference's
    output both NaN and inf)."""
    w = random_24(n, k, gen=gen)
    g = NONFINITE_COL // 4 * 4
    w[0::2, g:g + 4] = torch.tensor([1.0, 0.0, 0.0, 0.5])     # the column pruned
    w[1::2, g:g + 4] = torch.tensor([0.0, 0.75, -0.5, 0.0])   # the column kept, nonzero
    return w.to(dtype)


def x_with_nonfinite(m: int, k: int, kind: str, dtype, gen) -> torch.Tensor:
    """Random x [m, k] with float(kind) ('inf' or 'nan') at [m // 2, NONFINITE_COL]."""
    x = torch.randn(m, k, generator=gen)
    x[m // 2, NONFINITE_COL] = float(kind)
    return x.to(dtype)


def assert_same_nonfinite(out: torch.Tensor, want: torch.Tensor, kind: str, label: str) -> None:
    """NaN where the reference has NaN, inf of the same sign where it has inf, and the
    finite entries within a loose bound (the precision of each path is tested elsewhere;
    here only which entries are non-finite matters). The case can fail: the reference's
    row with the NaN / inf holds NaN (in every column for a NaN) and, for an inf, inf."""
    assert bool(want.isnan().any()), label
    assert kind == "nan" or bool(want.isinf().any()), label
    assert torch.equal(out.isnan(), want.isnan()), label
    assert torch.equal(out.isinf(), want.isinf()), label
    inf = want.isinf()
    assert torch.equal(out[inf], want[inf]), label
    fin = want.isfinite()
    torch.testing.assert_close(out[fin].float(), want[fin].float(), rtol=0.05, atol=0.05,
                               msg=label)


class TiedLM(torch.nn.Module):
    """An lm_head tied to the embedding, as in GPT-2 / T5: emb [16, 8] -> body Linear(8, 8)
    -> act -> head Linear(8, 16) whose weight is emb.weight."""

    def __init__(self, act=torch.tanh):
        super().__init__()
        torch.manual_seed(0)
        self.act = act
        self.emb = torch.nn.Embedding(16, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.act(self.body(self.emb(t))))
