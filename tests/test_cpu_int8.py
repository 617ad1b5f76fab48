"""pyfast_C::int8_mm on CPU, every ISA path (avx512 / avx2 / scalar) forced in turn.

The kernels (csrc/cpu/int8_mm.cpp + int8_gemm_*.cpp) must match the reference
pyfast.reference.int8_mm exactly: the int32 product is exact, and the float32
epilogue ((acc * a_scale) * b_scale) + bias is evaluated in the same order with
one rounding per operation, then cast once (float16 / bfloat16: round to nearest
even, as torch's .to()). So every comparison is torch.equal, or assert_close with
zero tolerance where NaN is expected.

Shapes are odd on purpose: K not a multiple of the vector widths (16 for AVX2,
64 for AVX-512) exercises the masked / scalar K tails, N not a multiple of the 4
output columns of a tile exercises the column tail, M not a multiple of the row
tile (6 / 2 / 1) the row tail; larger shapes cross the K blocks (2048) and N
panels (64) of the blocking and split the work over threads.
"""
import pytest
import torch

import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import special_rows

ops = torch.ops.pyfast_C

ISAS = ["avx512", "avx2", "scalar"]  # see the isa fixture in conftest.py
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]






def expected(a, b, a_scale, b_scale, bias, out_dtype, monkeypatch):
    """pyfast.reference.int8_mm (its int32 product avoids torch 2.13's _int_mm at K = 1,
    which returns garbage there; test_reference checks that case)."""
    return reference.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)


def inputs(m, k, n, fill_a=None, fill_b=None):
    a = (torch.randint(-128, 128, (m, k), dtype=torch.int8) if fill_a is None
         else torch.full((m, k), fill_a, dtype=torch.int8))
    b = (torch.randint(-128, 128, (n, k), dtype=torch.int8) if fill_b is None
         else torch.full((n, k), fill_b, dtype=torch.int8))
    a_scale = torch.rand(m) * 0.1 + 1e-3
    b_scale = torch.rand(n) * 0.1 + 1e-3
    return a, b, a_scale, b_scale


def check(isa, a, b, a_scale, b_scale, bias, out_dtype, monkeypatch):
    out = ops.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    m, n = a.shape[0], b.shape[0]
    assert out.shape == (m, n) and out.dtype == out_dtype and out.is_contiguous()
    want = expected(a, b, a_scale, b_scale, bias, out_dtype, monkeypatch)
    assert torch.equal(out, want), (
        f"isa {isa}, shape M={m} K={a.shape[1]} N={n}, {out_dtype}, "
        f"bias {None if bias is None else bias.dtype}: "
        f"max diff {(out.float() - want.float()).abs().max()}")


@pytest.mark.parametrize("n", [1, 7, 33, 130], ids=lambda v: f"N{v}")
@pytest.mark.parametrize("k", [1, 3, 64, 100, 257], ids=lambda v: f"K{v}")
@pytest.mark.parametrize("m", [0, 1, 3, 17, 64], ids=lambda v: f"M{v}")
def test_int8_mm_exact(isa, threads, m, k, n, monkeypatch):
    a, b, a_scale, b_scale = inputs(m, k, n)
    bias = torch.randn(n)
    for out_dtype in OUT_DTYPES:
        check(isa, a, b, a_scale, b_scale, None, out_dtype, monkeypatch)
        check(isa, a, b, a_scale, b_scale, bias, out_dtype, monkeypatch)


@pytest.mark.parametrize("m,k,n", [(7, 2049, 130), (20, 4500, 200), (13, 6000, 65), (1, 4500, 300),
                                   (50, 4500, 70)], ids=lambda v: str(v))
def test_int8_mm_blocked(isa, threads, m, k, n, monkeypatch):
    """Long K and several N panels, M split over threads: M = 1 streams one row tile;
    7..20 are a few row tiles (b tiles outer, K whole); 50 > 4 row tiles of every ISA
    (mr <= 8) takes the K blocks (partial sums accumulated across blocks)."""
    a, b, a_scale, b_scale = inputs(m, k, n)
    bias = torch.randn(n).to(torch.bfloat16)
    for out_dtype in OUT_DTYPES:
        check(isa, a, b, a_scale, b_scale, bias, out_dtype, monkeypatch)


@pytest.mark.parametrize("fill_a,fill_b", [(-128, -128), (-128, 127), (127, -128), (127, 127)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("k", [3, 257, 131071], ids=lambda v: f"K{v}")
def test_int8_mm_extremes(isa, threads, fill_a, fill_b, k, monkeypatch):
    """The extreme sums: K = 131071 (the largest accepted) of (-128) * (-128) is
    2147467264, just below 2**31. The AVX-512 path feeds b + 128 (0..255) to
    vpdpbusd, whose int32 lanes then wrap around; subtracting 128 * sum(a) must
    still give the exact sum."""
    a, b, a_scale, b_scale = inputs(3, k, 5, fill_a, fill_b)
    acc = ops.int8_mm(a, b, torch.ones(3), torch.ones(5), None, torch.float32)
    assert torch.equal(acc, torch.full((3, 5), float(fill_a * fill_b * k)))
    for out_dtype in OUT_DTYPES:
        check(isa, a, b, a_scale, b_scale, None, out_dtype, monkeypatch)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_int8_mm_bias_dtypes(isa, bias_dtype, monkeypatch):
    a, b, a_scale, b_scale = inputs(5, 70, 19)
    bias = torch.randn(19).to(bias_dtype)
    for out_dtype in OUT_DTYPES:
        check(isa, a, b, a_scale, b_scale, bias, out_dtype, monkeypatch)


def test_int8_mm_special_values(isa, monkeypatch):
    """NaN / inf scales give NaN / inf; large values overflow float16 to inf; tiny ones
    round to float16 / bfloat16 subnormals. All as the reference (NaN compared as NaN)."""
    a, b, _, _ = inputs(4, 80, 35)
    a_scale = torch.tensor([float("nan"), float("inf"), 1e3, 1e-30])
    b_scale = torch.rand(35) + 0.5
    b_scale[3] = float("nan")
    bias = torch.randn(35)
    for out_dtype in OUT_DTYPES:
        out = ops.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
        want = expected(a, b, a_scale, b_scale, bias, out_dtype, monkeypatch)
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
        assert out.isnan().any() and out.isinf().any()


def test_int8_mm_non_contiguous(isa, monkeypatch):
    a = torch.randint(-128, 128, (9, 2 * 101), dtype=torch.int8)[:, ::2]  # stride (202, 2)
    b = torch.randint(-128, 128, (101, 37), dtype=torch.int8).T          # [37, 101] transposed
    a_scale = (torch.rand(18) + 0.5)[::2]
    b_scale = torch.rand(37) + 0.5
    check(isa, a, b, a_scale, b_scale, torch.randn(74)[::2], torch.float32, monkeypatch)


# --- w8a8_mm: per-token quantization and the GEMM in one call --------------------------

def check_w8a8(isa, x, w, w_scale, bias):
    """Bit-exact against the op's definition (reference quantize_per_token, then
    reference int8_mm with out_dtype x.dtype); NaN rows compared as NaN."""
    out = ops.w8a8_mm(x, w, w_scale, bias)
    want = reference.w8a8_mm(x, w, w_scale, bias)
    assert out.dtype == x.dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"isa {isa}, x {tuple(x.shape)} {x.dtype}: {m}")


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n", [1, 7, 33], ids=lambda v: f"N{v}")
@pytest.mark.parametrize("k", [1, 3, 100, 257], ids=lambda v: f"K{v}")
@pytest.mark.parametrize("m", [0, 1, 3, 17], ids=lambda v: f"M{v}")
def test_w8a8_mm_exact(isa, threads, m, k, n, dtype):
    x = (torch.randn(m, k) * 3).to(dtype)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n) * 0.1 + 1e-3
    check_w8a8(isa, x, w, w_scale, None)
    check_w8a8(isa, x, w, w_scale, torch.randn(n).to(dtype))


@pytest.mark.parametrize("m,k,n", [(7, 2049, 130), (20, 4500, 200), (1, 4500, 300), (50, 4500, 70)],
                         ids=lambda v: str(v))
def test_w8a8_mm_blocked(isa, threads, m, k, n):
    """Several K blocks and N panels, rows split over threads, as in test_int8_mm_blocked."""
    x = torch.randn(m, k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    for dtype in OUT_DTYPES:
        check_w8a8(isa, x.to(dtype), w, torch.rand(n) + 0.5, torch.randn(n))


def test_w8a8_mm_special_rows(isa, threads):
    """_helpers.special_rows, as the reference."""
    k, n = 70, 9
    x = special_rows(k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    bias = torch.randn(n)
    check_w8a8(isa, x, w, torch.rand(n) + 0.5, bias)
    out = ops.w8a8_mm(x, w, torch.ones(n), bias)
    assert torch.equal(out[0], bias) and bool(out[1].isnan().all())


def test_w8a8_mm_non_contiguous(isa):
    x = torch.randn(9, 2 * 101)[:, ::2]                                  # stride (202, 2)
    w = torch.randint(-128, 128, (101, 37), dtype=torch.int8).T          # [37, 101] transposed
    check_w8a8(isa, x, w, (torch.rand(74) + 0.5)[::2], torch.randn(74)[::2])


def test_isa_restored():
    """The fixture gave the level back: the best the CPU has is active again."""
    assert ops.cpu_isa() == ops.cpu_isa_detected()


# --- quantize_static: one calibrated scale (csrc/cpu/quantize.cpp) ----------------------

def check_static(x, scale):
    """Bit-exact against reference.quantize_static: q equal, row scales equal (NaN where
    the reference has NaN)."""
    q, s = ops.quantize_static(x, scale)
    want_q, want_s = reference.quantize_static(x, scale)
    assert q.dtype == torch.int8 and q.is_contiguous() and s.dtype == torch.float32
    assert torch.equal(q, want_q), f"x {tuple(x.shape)} {x.dtype}, scale {float(scale)}"
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("k", [0, 1, 17, 100, 257], ids=lambda v: f"K{v}")
@pytest.mark.parametrize("m", [0, 1, 3, 17], ids=lambda v: f"M{v}")
def test_quantize_static_exact(threads, m, k, dtype):
    x = (torch.randn(m, k) * 3).to(dtype)
    check_static(x, torch.tensor([0.0173]))
    check_static(x, torch.tensor([0.5]))       # a coarse scale: most values in range


def test_quantize_static_special_rows_and_ties(threads):
    """special_rows (zero, NaN, inf, subnormal, huge): NaN -> q 0 and row scale NaN,
    +-inf and huge values clip to +-127, subnormals round to 0. Exact ties (x / s =
    j + 0.5) round half to even, as torch.round; -inf too."""
    check_static(special_rows(70), torch.tensor([0.02]))
    ties = (torch.arange(-140, 140, dtype=torch.float32) + 0.5) * 2.0   # x / 2 = j + 0.5
    x = torch.stack([ties, -ties])
    x[1, 3] = float("-inf")
    check_static(x, torch.tensor([2.0]))
    q, _ = ops.quantize_static(x, torch.tensor([2.0]))
    assert q[0, 140].item() == 0 and q[0, 141].item() == 2 and q[1, 3].item() == -127


def test_quantize_static_any_scale_as_the_reference():
    """The op does not check the scale (pyfast.ops.quantize_static and the layers do);
    with a zero, negative, inf or NaN scale the kernel still gives the reference's q."""
    x = special_rows(40)
    for bad in (0.0, -0.3, float("inf"), float("nan")):
        check_static(x, torch.tensor([bad]))


def test_quantize_static_non_contiguous():
    x = torch.randn(9, 2 * 101)[:, ::2] * 4
    check_static(x, torch.tensor([0.03]))
    check_static(x.T.contiguous().T, torch.tensor([0.03]))


@pytest.mark.parametrize("args,match", [
    (lambda x, s: (x.to(torch.int8), s), "x has dtype Char"),
    (lambda x, s: (x[0], s), "x must be 2-D"),
    (lambda x, s: (x, s.double()), "scale has dtype Double"),
    (lambda x, s: (x, torch.ones(2)), r"scale has shape \[2\]; accepted: one value"),
])
def test_quantize_static_cpp_errors(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.quantize_static(*args(torch.randn(3, 8), torch.tensor([0.1])))
