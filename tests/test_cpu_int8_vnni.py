"""The int8 VNNI layout (pyfast/layouts/int8_vnni.py) and the CPU kernels of
pyfast_C::w8a8_mm_vnni and pyfast_C::int8_mm_vnni (csrc/cpu/int8_vnni*.cpp), every
ISA path forced in turn.

1. repack / unrepack: exact round trip on odd shapes, zero padding, the documented
   position of single bytes, shape and dtype errors.
2. The kernel must equal the reference w8a8_mm on the canonical weight bit for bit:
   the int32 sums are exact and the quantizer and epilogue are the ones of w8a8_mm.
   Shapes are odd on purpose: K not a multiple of 4 (the tail of a vpdpbusd lane),
   N not a multiple of the 48-column panel, M not a multiple of the 8-row tile; larger
   shapes give several panels, and few panels split the rows over threads.
3. int8_mm_vnni (int8 activations given with their scales, as static int8 runs) must
   equal the reference int8_mm on the canonical weight bit for bit, for every output
   dtype, NaN row scales included.
"""
import pytest
import torch

import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import ops as pops
from pyfast import reference
from pyfast.layouts import int8_vnni

from _helpers import special_rows

ops = torch.ops.pyfast_C
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- 1. the layout ------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (48, 4), (49, 100), (100, 257), (3, 1030)])
def test_round_trip_and_zero_padding(n, k):
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    v = int8_vnni.repack(w)
    assert v.dtype == torch.int8 and v.is_contiguous()
    assert tuple(v.shape) == int8_vnni.repacked_shape(n, k) == (-(-n // 48), -(-k // 4), 48, 4)
    assert torch.equal(int8_vnni.unrepack(v, n, k), w)
    ones = int8_vnni.repack(torch.full((n, k), 1, dtype=torch.int8))
    assert int(ones.sum()) == n * k and int((ones == 0).sum()) == ones.numel() - n * k


def test_single_byte_lands_where_the_spec_says():
    n, k = 100, 19
    for nn, kk in [(0, 0), (n - 1, k - 1), (47, 4), (48, 3), (77, 13)]:
        w = torch.zeros(n, k, dtype=torch.int8)
        w[nn, kk] = -7
        v = int8_vnni.repack(w)
        assert int(v[nn // 48, kk // 4, nn % 48, kk % 4]) == -7
        assert int((v != 0).sum()) == 1


def test_op_repack_is_the_layout_and_runs_on_meta():
    w = torch.randint(-128, 128, (50, 13), dtype=torch.int8)
    assert torch.equal(pops.repack_int8_vnni(w), int8_vnni.repack(w))
    fake = torch.ops.pyfast.repack_int8_vnni(w.to("meta"))
    assert fake.shape == (2, 4, 48, 4) and fake.dtype == torch.int8


def test_layout_errors():
    w = torch.randint(-128, 128, (50, 13), dtype=torch.int8)
    with pytest.raises(TypeError, match="w_int8 has dtype torch.float32"):
        pops.repack_int8_vnni(w.float())
    with pytest.raises(ValueError, match=r"w_int8 must be 2-D \[N, K\]"):
        pops.repack_int8_vnni(w[0])
    v = int8_vnni.repack(w)
    with pytest.raises(ValueError, match=r"w_vnni has shape \(2, 4, 48, 4\); for N = 97, K = 13 it must be \(3, 4, 48, 4\)"):
        int8_vnni.unrepack(v, 49 + 48, 13)
    with pytest.raises(TypeError, match="w_vnni has dtype torch.uint8"):
        int8_vnni.check_repacked(v.view(torch.uint8), 50, 13)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        int8_vnni.check_repacked([1], 50, 13)
    for bad in (-1, 2.0, True):
        with pytest.raises((TypeError, ValueError), match="n must be"):
            int8_vnni.repacked_shape(bad, 4)


# --- 2. the kernel ------------------------------------------------------------------

def check(isa, x, w, w_scale, bias):
    v = int8_vnni.repack(w)
    out = ops.w8a8_mm_vnni(x, v, w_scale, bias)
    want = reference.w8a8_mm(x, w, w_scale, bias)
    assert out.dtype == x.dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"isa {isa}, x {tuple(x.shape)} {x.dtype}, "
                                             f"N {w.shape[0]}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n", [1, 47, 49], ids=lambda v: f"N{v}")
@pytest.mark.parametrize("k", [1, 3, 100, 257], ids=lambda v: f"K{v}")
@pytest.mark.parametrize("m", [0, 1, 3, 17], ids=lambda v: f"M{v}")
def test_exact(isa, threads, m, k, n, dtype):
    x = (torch.randn(m, k) * 3).to(dtype)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n) * 0.1 + 1e-3
    check(isa, x, w, w_scale, None)
    check(isa, x, w, w_scale, torch.randn(n).to(dtype))


@pytest.mark.parametrize("m,k,n", [(50, 300, 70), (9, 1030, 300), (1, 4500, 100), (1, 77, 250),
                                   (130, 64, 20)],
                         ids=lambda v: str(v))
def test_panels_and_row_split(isa, threads, m, k, n):
    """Several panels, few panels (N <= 96) with the rows split over the threads, and
    decode (M = 1) over groups of 4 panels and a shorter last group."""
    x = torch.randn(m, k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    for dtype in DTYPES:
        check(isa, x.to(dtype), w, torch.rand(n) + 0.5, torch.randn(n))


def test_extreme_values(isa):
    """x quantizes to -127 or 127, w is -128 (w ^ 0x80 = 0 in the AVX-512 tiles) or 127.
    K = 70001: with x = -127 and w = 127 the AVX-512 lane sums, 255 * (-127) * K, wrap
    around 2**32 before comp is removed; the true sums fit int32."""
    k, n = 70001, 50
    for xa, wb in [(-1.0, -128), (1.0, 127), (-1.0, 127)]:
        x = torch.full((9, k), xa)
        check(isa, x, torch.full((n, k), wb, dtype=torch.int8), torch.ones(n), None)


def test_special_rows(isa, threads):
    """_helpers.special_rows (zero, NaN, inf, subnormal, huge), as the reference."""
    k, n = 70, 9
    x = special_rows(k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    check(isa, x, w, torch.rand(n) + 0.5, torch.randn(n))


def test_non_contiguous_and_bias_dtypes(isa):
    x = torch.randn(9, 2 * 101)[:, ::2]
    w = torch.randint(-128, 128, (37, 101), dtype=torch.int8)
    check(isa, x, w, (torch.rand(74) + 0.5)[::2], torch.randn(74)[::2])
    for bias_dtype in (torch.float16, torch.bfloat16, torch.float64):
        check(isa, x, w, torch.rand(37) + 0.5, torch.randn(37).to(bias_dtype))


@pytest.mark.parametrize("args,match", [
    (lambda x, v, s: (x.to(torch.int8), v, s, None), "x has dtype Char"),
    (lambda x, v, s: (x[0], v, s, None), "x must be 2-D"),
    (lambda x, v, s: (x, v.view(torch.uint8), s, None), "w_vnni has dtype Byte"),
    (lambda x, v, s: (x, v[0], s, None), "w_vnni must be 4-D"),
    (lambda x, v, s: (x, v, s[:48], None), r"w_vnni.size\(0\) is 2 .* ceil\(N / 48\)"),
    (lambda x, v, s: (x[:, :8], v, s, None), r"w_vnni.size\(1\) is 4 .* ceil\(K / 4\)"),
    (lambda x, v, s: (x, v, s.half(), None), "w_scale has dtype Half"),
    (lambda x, v, s: (x, v, s, torch.zeros(3)), r"bias.size\(0\) is 3"),
])
def test_cpp_errors(args, match):
    x, w = torch.randn(3, 13), torch.randint(-128, 128, (50, 13), dtype=torch.int8)
    v, s = int8_vnni.repack(w), torch.rand(50)
    with pytest.raises(RuntimeError, match=match):
        ops.w8a8_mm_vnni(*args(x, v, s))


# --- 3. int8_mm_vnni -----------------------------------------------------------------

def check_int8(isa, a, w, a_scale, w_scale, bias, out_dtype):
    out = ops.int8_mm_vnni(a, int8_vnni.repack(w), a_scale, w_scale, bias, out_dtype)
    want = reference.int8_mm(a, w, a_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"isa {isa}, a {tuple(a.shape)}, N {w.shape[0]}, "
                                             f"{out_dtype}: {m}")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n", [1, 47, 49], ids=lambda v: f"N{v}")
@pytest.mark.parametrize("k", [1, 3, 100, 257], ids=lambda v: f"K{v}")
@pytest.mark.parametrize("m", [0, 1, 3, 17], ids=lambda v: f"M{v}")
def test_int8_mm_vnni_exact(isa, threads, m, k, n, out_dtype):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a_scale, w_scale = torch.rand(m) * 0.1 + 1e-3, torch.rand(n) * 0.1 + 1e-3
    check_int8(isa, a, w, a_scale, w_scale, None, out_dtype)
    check_int8(isa, a, w, a_scale, w_scale, torch.randn(n), out_dtype)


@pytest.mark.parametrize("m,k,n", [(50, 300, 70), (9, 1030, 300), (1, 4500, 100), (130, 64, 20)],
                         ids=lambda v: str(v))
def test_int8_mm_vnni_panels_and_row_split(isa, threads, m, k, n):
    """As test_panels_and_row_split, with a = -128 included (the quantizers never make
    it, the op accepts it) and a NaN row scale (a NaN row of static int8)."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    a[0, :5] = -128
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a_scale = torch.rand(m) + 0.5
    a_scale[-1] = float("nan")
    for out_dtype in DTYPES:
        check_int8(isa, a, w, a_scale, torch.rand(n) + 0.5, torch.randn(n), out_dtype)


def test_int8_mm_vnni_non_contiguous(isa):
    a = torch.randint(-128, 128, (9, 2 * 101), dtype=torch.int8)[:, ::2]
    w = torch.randint(-128, 128, (37, 101), dtype=torch.int8)
    check_int8(isa, a, w, (torch.rand(18) + 0.5)[::2], (torch.rand(74) + 0.5)[::2],
               torch.randn(74)[::2].half(), torch.float32)


@pytest.mark.parametrize("args,match", [
    (lambda a, v, sa, s: (a.float(), v, sa, s, None, torch.float32), "a has dtype Float"),
    (lambda a, v, sa, s: (a[0], v, sa, s, None, torch.float32), "a must be 2-D"),
    (lambda a, v, sa, s: (a, v, sa[:2], s, None, torch.float32), r"a_scale.size\(0\) is 2"),
    (lambda a, v, sa, s: (a, v, sa.half(), s, None, torch.float32), "a_scale has dtype Half"),
    (lambda a, v, sa, s: (a, v, sa, s, None, torch.int32), "out_dtype is Int; accepted: Float"),
    (lambda a, v, sa, s: (a, v.view(torch.uint8), sa, s, None, torch.float32),
     "w_vnni has dtype Byte"),
    (lambda a, v, sa, s: (a[:, :8], v, sa, s, None, torch.float32),
     r"w_vnni.size\(1\) is 4 .* ceil\(K / 4\)"),
    (lambda a, v, sa, s: (a, v, sa, s[:48], None, torch.float32),
     r"w_vnni.size\(0\) is 2 .* ceil\(N / 48\)"),
    (lambda a, v, sa, s: (a, v, sa, s, torch.zeros(3), torch.float32), r"bias.size\(0\) is 3"),
])
def test_int8_mm_vnni_cpp_errors(args, match):
    a, w = torch.randint(-128, 128, (3, 13), dtype=torch.int8), torch.randint(-128, 128, (50, 13), dtype=torch.int8)
    v, sa, s = int8_vnni.repack(w), torch.rand(3), torch.rand(50)
    with pytest.raises(RuntimeError, match=match):
        ops.int8_mm_vnni(*args(a, v, sa, s))
