"""The C++ CPU weight-only kernels (csrc/cpu/weight_only*.cpp) against the reference.

torch.ops.pyfast_C.int8_weight_mm / int4_mm are called directly, with each ISA
path forced in turn (torch.ops.pyfast_C.set_cpu_isa; "best" restored after) and
with 1 and 2 threads. M covers both paths of each kernel: the small-M register
kernels (M <= 4 for bfloat16 x, <= 32 otherwise, <= 4 on the scalar ISA) and the
dequantized-panel + at::mm path above. K values are not multiples of the vector
widths (66, 130: per-channel int4 with a K tail) besides group-aligned ones.

Tolerance (tests/_helpers.py linear_tolerance, FlashAttention's rule): twice the
error PyTorch's own F.linear makes in x's dtype against float64, on the
dequantized float64 weight, plus one ulp of the largest output. PyTorch's error
is measured over x plus 16 more random rows of the same layer (_tolerance), so
that a call with one or two outputs (M = 1, N = 1) is not held to whatever
rounding luck PyTorch had on that single sum: any two correct float32 sums of
130 products can differ by a few ulp.
"""
import itertools

import pytest
import torch

import pyfast
from pyfast import reference
from _helpers import assert_bits_equal, assert_within, dequant_int4, dtype_id, linear_tolerance

pyfast._ext.load()
OPS = torch.ops.pyfast_C

ISAS = ("avx512", "avx2", "scalar")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MS = (0, 1, 3, 17, 64)
NS = (1, 7, 33, 130)
INT8_KS = (66, 130, 256)
# (K, group_size): per channel with a K tail, and group-aligned K
INT4_KG = ((66, -1), (130, -1), (96, 32), (256, 128), (128, 64))






def _x(m, k, dtype, contiguous=True):
    if contiguous:
        return torch.randn(m, k).to(dtype)
    return torch.randn(k, 2 * m).to(dtype).t()[::2]  # strides (1, 2 * m): not contiguous


def _tolerance(x, w64, bias, dtype):
    """linear_tolerance with PyTorch's error taken over x and 16 more random rows."""
    more = torch.randn(16, x.shape[1]).to(x.dtype)
    return linear_tolerance(torch.cat([x, more]), w64, bias, dtype)


def _bias(n, with_bias, dtype):
    return torch.randn(n).to(dtype) if with_bias else None


# --- int8_weight_mm ----------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_weight_mm(isa, threads, dtype, with_bias):
    for m, n, k in itertools.product(MS, NS, INT8_KS):
        x = _x(m, k, dtype, contiguous=(m + n) % 2 == 0)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) * 0.02 + 1e-3
        b = _bias(n, with_bias, dtype)
        out = OPS.int8_weight_mm(x, w, s, b)
        tol = _tolerance(x, w.double() * s.double()[:, None], b, dtype)
        assert_within(out, reference.int8_weight_mm(x, w, s, b), tol,
                      f"{isa} M={m} N={n} K={k}")


@pytest.mark.parametrize("scale_dtype", (torch.bfloat16, torch.float16, torch.float64),
                         ids=dtype_id)
def test_int8_weight_mm_scale_dtypes(isa, scale_dtype):
    x = torch.randn(5, 130)
    w = torch.randint(-128, 128, (33, 130), dtype=torch.int8)
    s = (torch.rand(33) * 0.02 + 1e-3).to(scale_dtype)
    b = torch.randn(33, dtype=torch.float64)
    out = OPS.int8_weight_mm(x, w, s, b)
    tol = _tolerance(x, w.double() * s.float().double()[:, None], b, x.dtype)
    assert_within(out, reference.int8_weight_mm(x, w, s, b), tol, "scale dtype")


# --- int4_mm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int4_mm(isa, threads, dtype, symmetric, with_bias):
    for m, n, (k, gs) in itertools.product(MS, NS, INT4_KG):
        x = _x(m, k, dtype, contiguous=(m + n) % 2 == 0)
        w = torch.randn(n, k) + (0.0 if symmetric else 0.7)  # asymmetric: zero points != 8
        packed, scales, zeros = reference.pack_int4(w, gs, symmetric)
        b = _bias(n, with_bias, dtype)
        out = OPS.int4_mm(x, packed, scales, zeros, gs, b)
        tol = _tolerance(x, dequant_int4(packed, scales, zeros, gs), b, dtype)
        assert_within(out, reference.int4_mm(x, packed, scales, zeros, gs, b), tol,
                      f"{isa} M={m} N={n} K={k} group={gs}")


def test_int4_mm_half_scales(isa):
    x = torch.randn(3, 256)
    packed, scales, zeros = reference.pack_int4(torch.randn(7, 256), 32, False)
    scales = scales.to(torch.float16)
    out = OPS.int4_mm(x, packed, scales, zeros, 32, None)
    tol = _tolerance(x, dequant_int4(packed, scales.float(), zeros, 32), None, x.dtype)
    assert_within(out, reference.int4_mm(x, packed, scales, zeros, 32, None), tol, "fp16 scales")


@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
def test_int4_decode_long_rows(isa, threads, group_size):
    """M = 1 with K past one 4096-k chunk of x (the AVX-512 kernel's x blocking;
    K = 8448: two whole chunks and a partial one), N not a multiple of its 8-row
    group, and zero points 0..15 (an earlier kernel split the sum around z = 8 and
    failed here)."""
    k, n = 8448, 13
    x = torch.randn(1, k)
    w = torch.randn(n, k) + torch.linspace(-3.0, 3.0, n)[:, None]  # skewed rows
    packed, scales, zeros = reference.pack_int4(w, group_size, False)
    assert zeros.min() < 4 and zeros.max() > 12
    tol = _tolerance(x, dequant_int4(packed, scales, zeros, group_size), None, x.dtype)
    assert_within(OPS.int4_mm(x, packed, scales, zeros, group_size, None),
                  reference.int4_mm(x, packed, scales, zeros, group_size, None), tol,
                  f"{isa} group={group_size}")


@pytest.mark.parametrize("bf16_dot", (True, False), ids=("bf16dot", "nobf16dot"))
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
def test_int4_bfloat16_small_m(isa, threads, group_size, bf16_dot, monkeypatch):
    """bfloat16 x at M <= 17: with AVX512_BF16 (isa avx512 on a CPU that has it) M <= 16
    runs the vdpbf16ps kernel (weight_only_bf16dot.cpp), in x tiles of 4 rows (M = 5,
    16: a full and a partial tile), over whole rows where the x tile fits its 28 KiB
    (K = 384 at every tile height, K = 8448 at M = 1) and in K chunks elsewhere
    (K = 8448 from M = 2, K = 12160 at every height: two full chunks and a partial
    one); PYFAST_NO_BF16DOT sends the same calls to the float32 kernels and panels.
    Zero points span 0..15, so the kernel's offset of 128 is cancelled per lane."""
    if not bf16_dot:
        monkeypatch.setenv("PYFAST_NO_BF16DOT", "1")
    gen = torch.Generator().manual_seed(7)
    for k, n in ((8448, 13), (12160, 13), (384, 9)):
        if group_size == -1 and k == 384:
            k = 390  # per channel with a K tail inside the last 128-k block
        w = torch.randn(n, k, generator=gen) + torch.linspace(-4.0, 4.0, n)[:, None]
        packed, scales, zeros = reference.pack_int4(w, group_size, False)
        assert zeros.min() < 4 and zeros.max() > 12
        wq = dequant_int4(packed, scales, zeros, group_size)
        b = torch.randn(n, generator=gen)
        for m in (1, 4, 5, 16, 17):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            tol = _tolerance(x, wq, b, torch.bfloat16)
            assert_within(OPS.int4_mm(x, packed, scales, zeros, group_size, b),
                          reference.int4_mm(x, packed, scales, zeros, group_size, b), tol,
                          f"{isa} K={k} M={m} group={group_size}")


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.fixture
def fp32_matmul_precision():
    """Sets torch.backends.mkldnn.matmul.fp32_precision (PyTorch >= 2.9) for the test,
    restored after."""
    mk = torch.backends.mkldnn.matmul
    if not hasattr(mk, "fp32_precision"):
        pytest.skip("this PyTorch has no torch.backends.mkldnn.matmul.fp32_precision")
    before = mk.fp32_precision

    def set_to(value):
        mk.fp32_precision = value

    yield set_to
    mk.fp32_precision = before


@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_int4_float32_with_bf16_matmul_precision(isa, threads, group_size, fp32_matmul_precision):
    """With bfloat16 allowed inside float32 matmuls (fp32_precision "bf16", which
    torch.set_float32_matmul_precision("medium") sets), float32 x at M <= 16 runs the
    bf16-dot kernel where it runs for bfloat16 x: x is rounded to bfloat16 once and the
    float32 sums are the output. So the result is the float32 product of the rounded x
    (float32's tolerance) and is farther than that from the unrounded product (the path
    was taken). Other ISA levels and CPUs without AVX512_BF16: the float32 small-M
    kernels, bit for bit the output under "ieee" (the scalar level hands M > 4 to panels
    and at::mm, which follows PyTorch's own rule for the setting). References are computed with the setting at "ieee"."""
    bf16 = isa == "avx512" and _cpu_has_avx512_bf16()
    gen = torch.Generator().manual_seed(11)
    for k, n in ((8448, 13), (384, 9)):
        if group_size == -1 and k == 384:
            k = 390
        w = torch.randn(n, k, generator=gen) + torch.linspace(-4.0, 4.0, n)[:, None]
        packed, scales, zeros = reference.pack_int4(w, group_size, False)
        wq = dequant_int4(packed, scales, zeros, group_size)
        b = torch.randn(n, generator=gen)
        for m in (1, 5, 16):
            x = torch.randn(m, k, generator=gen)
            fp32_matmul_precision("bf16")
            out = OPS.int4_mm(x, packed, scales, zeros, group_size, b)
            fp32_matmul_precision("ieee")
            assert out.dtype == torch.float32
            if not bf16:
                if isa != "scalar" or m <= 4:  # else the panels' at::mm: PyTorch's own rule
                    assert_bits_equal(out, OPS.int4_mm(x, packed, scales, zeros, group_size, b))
                continue
            xr = x.bfloat16().float()
            tol = _tolerance(xr, wq, b, torch.float32)
            label = f"K={k} M={m} group={group_size}"
            assert_within(out, reference.int4_mm(xr, packed, scales, zeros, group_size, b), tol,
                          label)
            unrounded = reference.int4_mm(x, packed, scales, zeros, group_size, b)
            assert (out - unrounded).abs().max().item() > tol, label + ": x was not rounded"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_paths_agree_on_a_large_layer(dtype):
    """Small-M and panel paths, every ISA, on K = 4096, N = 600 (group 128): the
    panel path then uses several panels (256 float32 / 512 bfloat16 rows each)."""
    x = torch.randn(40, 4096).to(dtype)
    packed, scales, zeros = reference.pack_int4(torch.randn(600, 4096), 128, False)
    w = torch.randint(-128, 128, (600, 4096), dtype=torch.int8)
    s = torch.rand(600) * 0.02 + 1e-3
    b = torch.randn(600)
    expected4 = reference.int4_mm(x, packed, scales, zeros, 128, b)
    expected8 = reference.int8_weight_mm(x, w, s, b)
    tol4 = _tolerance(x, dequant_int4(packed, scales, zeros, 128), b, dtype)
    tol8 = _tolerance(x, w.double() * s.double()[:, None], b, dtype)
    try:
        for name in ISAS:
            OPS.set_cpu_isa(name)
            for rows in (1, 3, 40):  # 40: the panel path for every dtype
                assert_within(OPS.int4_mm(x[:rows], packed, scales, zeros, 128, b),
                              expected4[:rows], tol4, f"int4 {name} M={rows}")
                assert_within(OPS.int8_weight_mm(x[:rows], w, s, b), expected8[:rows], tol8,
                              f"int8 {name} M={rows}")
    finally:
        OPS.set_cpu_isa("best")


# --- bad inputs: a RuntimeError that names the argument -----------------------------------------

def _int8_args():
    return [torch.randn(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3), None]


def _int4_args():
    packed, scales, zeros = reference.pack_int4(torch.randn(3, 64), 32, True)
    return [torch.randn(2, 64), packed, scales, zeros, 32, None]


INT8_BAD = [
    ("x", 0, torch.zeros(2, 64, dtype=torch.int32)),
    ("x", 0, torch.randn(2, 2, 64)),
    ("w_int8", 1, torch.zeros(3, 64, dtype=torch.uint8)),
    ("w_int8", 1, torch.zeros(3, 63, dtype=torch.int8)),
    ("w_scale", 2, torch.ones(4)),
    ("w_scale", 2, torch.ones(3, dtype=torch.int32)),
    ("bias", 3, torch.ones(5)),
    ("bias", 3, torch.ones(3, dtype=torch.int64)),
]

INT4_BAD = [
    ("x", 0, torch.zeros(2, 64, dtype=torch.int8)),
    ("packed", 1, torch.zeros(3, 31, dtype=torch.uint8)),
    ("packed", 1, torch.zeros(3, 32, dtype=torch.int8)),
    ("scales", 2, torch.ones(3, 3)),
    ("scales", 2, torch.ones(4, 2)),
    ("zeros", 3, torch.zeros(3, 2, dtype=torch.int32)),
    ("zeros", 3, torch.zeros(3, 1, dtype=torch.uint8)),
    ("group_size", 4, 48),
    ("group_size", 4, 128),  # K = 64 is not a multiple of 128
    ("bias", 5, torch.ones(2)),
]


@pytest.mark.parametrize("name,index,value", INT8_BAD,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(INT8_BAD)])
def test_int8_weight_mm_bad_input(name, index, value):
    args = _int8_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=name):
        OPS.int8_weight_mm(*args)


@pytest.mark.parametrize("name,index,value", INT4_BAD,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(INT4_BAD)])
def test_int4_mm_bad_input(name, index, value):
    args = _int4_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=name):
        OPS.int4_mm(*args)


def test_good_inputs_of_the_error_tests_pass():
    """The error tests change one argument of a call that is otherwise valid."""
    assert OPS.int8_weight_mm(*_int8_args()).shape == (2, 3)
    assert OPS.int4_mm(*_int4_args()).shape == (2, 3)
