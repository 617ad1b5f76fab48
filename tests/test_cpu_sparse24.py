"""pyfast_C::sparse24_mm on CPU, every ISA path (avx512 / avx2 / scalar) forced in turn.

Oracle: pyfast.reference.sparse24_mm (dense weight rebuilt, float32 F.linear). The kernel
sums in another order (and bfloat16 x on AVX512_BF16 CPUs multiplies with vdpbf16ps),
so the tolerance is FlashAttention's rule from tests/_helpers.py: twice PyTorch's own
F.linear error in x's dtype against float64, plus one ulp of the largest output.

Weights come from pyfast.ops.sparse24_compress of random 2:4 matrices whose groups hold
0, 1 or 2 nonzeros (tests/_helpers.py random_24). K values are not multiples of the
vector steps (16 k for AVX2, 32 / 64 for AVX-512), exercising the masked / scalar tails;
N not a multiple of the tiles' weight rows; M in each regime of the kernel's rule
(csrc/cpu/sparse24.cpp): 1 (GEMV tiles), 3, 17 and 40 (row tiles with N < 256; for
bfloat16 on AVX512_BF16 from M = 8 the pair kernel, also tested on its own shapes), 64
(row tiles, or the dense-panel path for bfloat16 on AVX512_BF16), 512 (dense-panel path
for every dtype); the transposed-x kernel (M >= 12 and N >= 256 on AVX-512) on shapes of
its own (test_transposed_x_kernel).
"""
import pytest
import torch

import pyfast
import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import FLOAT_DTYPES, assert_within, decompress24, dtype_id, linear_tolerance, random_24

ops = torch.ops.pyfast_C

ISAS = ["avx512", "avx2", "scalar"]  # see the isa fixture in conftest.py
NO_BF16DOT = "PYFAST_NO_BF16DOT"






def compressed(n, k, dtype, gen=None):
    w = random_24(n, k, dtype, gen=gen)
    values, meta = pyfast.ops.sparse24_compress(w)
    return w, values, meta


def check(x, values, meta, bias, what=""):
    """out within tol of the exact (float64) product, tol = twice PyTorch's own F.linear
    error in x.dtype; and within tol + the reference's own error of the reference (the
    reference is a float32 F.linear, with an error of its own of the same size)."""
    out = ops.sparse24_mm(x, values, meta, bias)
    assert out.is_contiguous()
    want = reference.sparse24_mm(x, values, meta, bias)
    # The dense weight decoded independently of the reference (tests/_helpers.py).
    w64 = decompress24(values, meta).double()
    tol = linear_tolerance(x, w64, bias, x.dtype)
    label = (f"{what} M={x.shape[0]} K={x.shape[1]} N={values.shape[0]} {x.dtype} "
             f"bias={None if bias is None else bias.dtype}")
    if out.numel() == 0:
        assert_within(out, want, 0.0, label)
        return
    exact = torch.nn.functional.linear(x.double(), w64, None if bias is None else bias.double())
    assert_within(out, exact.to(x.dtype), tol, label + " vs float64")
    ref_err = (want.double() - exact).abs().max().item()
    assert_within(out, want, tol + ref_err, label + " vs reference")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [0, 1, 3, 17, 40, 64], ids=lambda v: f"M{v}")
def test_matches_reference(isa, threads, m, dtype):
    gen = torch.Generator().manual_seed(m)
    for k in (4, 12, 36, 100, 260):
        for n in (1, 7, 33, 130):
            _, values, meta = compressed(n, k, dtype, gen)
            x = torch.randn(m, k, generator=gen).to(dtype)
            check(x, values, meta, None, isa)
            check(x, values, meta, torch.randn(n, generator=gen), isa)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_many_rows_dense_panels(isa, threads, dtype):
    """M = 512: the dense-panel + at::mm path for every dtype, several panels of W."""
    gen = torch.Generator().manual_seed(1)
    for k, n in ((36, 33), (100, 300)):
        _, values, meta = compressed(n, k, dtype, gen)
        x = torch.randn(512, k, generator=gen).to(dtype)
        check(x, values, meta, torch.randn(n, generator=gen).to(torch.bfloat16), isa)


@pytest.mark.parametrize("m", [1, 3, 17, 40, 70], ids=lambda v: f"M{v}")
def test_blocked(isa, threads, m):
    """K = 4100 (1025 groups) spans several K blocks of every kernel (partial sums carried
    across blocks, a masked last step); N = 200 spans several blocks of W rows and threads."""
    gen = torch.Generator().manual_seed(2)
    for dtype in FLOAT_DTYPES:
        _, values, meta = compressed(200, 4100, dtype, gen)
        x = torch.randn(m, 4100, generator=gen).to(dtype)
        check(x, values, meta, torch.randn(200, generator=gen), isa)


@pytest.mark.parametrize("m", [11, 12, 17, 40, 70], ids=lambda v: f"M{v}")
def test_transposed_x_kernel(isa, threads, m):
    """M >= 12 and N >= 256 on AVX-512: the transposed-x kernel (M = 11 and N = 255: the
    tiles beside it). Row blocks of 16 with a partial last one (12, 17, 40, 70), K with a
    partial group step (36, 100) and several K blocks (4100), N across blocks of weight
    rows and threads; bfloat16 x through the float32 kernels (PYFAST_NO_BF16DOT) too."""
    gen = torch.Generator().manual_seed(200 + m)
    for k, n in ((36, 256), (100, 300), (4100, 255), (4100, 260)):
        for dtype in FLOAT_DTYPES:
            _, values, meta = compressed(n, k, dtype, gen)
            x = torch.randn(m, k, generator=gen).to(dtype)
            check(x, values, meta, torch.randn(n, generator=gen), isa)


def test_transposed_x_kernel_bfloat16_without_bf16_dot(isa, monkeypatch):
    monkeypatch.setenv(NO_BF16DOT, "1")
    gen = torch.Generator().manual_seed(300)
    _, values, meta = compressed(300, 1028, torch.bfloat16, gen)
    check(torch.randn(17, 1028, generator=gen).to(torch.bfloat16), values, meta, None, isa)


@pytest.mark.parametrize("m", [1, 3, 17, 64], ids=lambda v: f"M{v}")
def test_bfloat16_without_bf16_dot(isa, threads, m, monkeypatch):
    """bfloat16 x on the float32 kernels (values widened by a shift), the path of CPUs
    without AVX512_BF16; forced here with the kernel's environment switch."""
    monkeypatch.setenv(NO_BF16DOT, "1")
    gen = torch.Generator().manual_seed(3)
    for k, n in ((36, 33), (260, 7), (2052, 40)):
        _, values, meta = compressed(n, k, torch.bfloat16, gen)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        check(x, values, meta, torch.randn(n, generator=gen), isa)


@pytest.mark.parametrize("m", [8, 9, 16, 24, 25, 33, 63], ids=lambda v: f"M{v}")
def test_bfloat16_pair_kernel(isa, threads, m):
    """bfloat16 x from 8 rows, on AVX512_BF16 CPUs at the avx512 level the pair kernel
    (csrc/cpu/sparse24_bf16pairs.cpp; elsewhere the paths of the other levels): blocks of
    16 rows of x and a last block of at most 8 (M = 9, 25, 33); odd N (the last weight row
    paired with itself) and N below one pair; K blocks of 512 k (K = 1028 and 2052: sums
    carried across blocks and a masked last step of 1 group; K = 36 and 100: one partial
    step); weights with all-zero groups (random_24)."""
    gen = torch.Generator().manual_seed(100 + m)
    for k, n in ((4, 1), (36, 3), (100, 17), (1028, 40), (2052, 33)):
        _, values, meta = compressed(n, k, torch.bfloat16, gen)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        check(x, values, meta, None, isa)
        check(x, values, meta, torch.randn(n, generator=gen), isa)


@pytest.mark.parametrize("m", [1, 17, 64], ids=lambda v: f"M{v}")
def test_non_contiguous_and_bias_dtypes(isa, m):
    gen = torch.Generator().manual_seed(4)
    for dtype in FLOAT_DTYPES:
        _, values, meta = compressed(33, 100, dtype, gen)
        x = torch.randn(100, 2 * m, generator=gen).to(dtype).T[::2]  # [m, 100], strides (2, 2m)
        assert not x.is_contiguous()
        for bias_dtype in (torch.float16, torch.bfloat16, torch.float64):
            bias = torch.randn(66, generator=gen).to(bias_dtype)[::2]
            check(x, values, meta, bias, isa)
        # values / meta given as non-contiguous views of the same numbers
        check(x, values.T.contiguous().T, meta.T.contiguous().T, None, isa)


def test_group_patterns(isa):
    """Every kept-index pair (i0 < i1) and groups with 0, 1, 2 nonzeros, with x holding
    distinct powers of two per column so a wrong gather cannot cancel out."""
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    k = 4 * 48
    w = torch.zeros(6, k)
    for r in range(6):
        for g in range(48):
            i0, i1 = pairs[(r + g) % 6]
            nz = (r + g) % 3  # 0, 1 or 2 nonzeros in the group
            if nz >= 1:
                w[r, 4 * g + i1] = 1 + g
            if nz == 2:
                w[r, 4 * g + i0] = -(1 + r)
    x = torch.ldexp(torch.ones(5, k), -(torch.arange(k) % 20)).float() * torch.arange(1, 6)[:, None]
    for dtype in FLOAT_DTYPES:
        values, meta = pyfast.ops.sparse24_compress(w.to(dtype))
        check(x.to(dtype), values, meta, None, isa)


def test_k_zero_and_empty(isa):
    values = torch.zeros(5, 0)
    meta = torch.zeros(5, 0, dtype=torch.uint8)
    out = ops.sparse24_mm(torch.zeros(3, 0), values, meta, torch.arange(5.0))
    assert torch.equal(out, torch.arange(5.0).expand(3, 5))
    assert ops.sparse24_mm(torch.zeros(0, 8), torch.zeros(5, 4), torch.zeros(5, 2, dtype=torch.uint8),
                           None).shape == (0, 5)
    assert ops.sparse24_mm(torch.zeros(2, 8), torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.uint8),
                           None).shape == (2, 0)


@pytest.mark.parametrize("m", [3, 17], ids=lambda v: f"M{v}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_meta_high_bits_ignored(isa, m, dtype):
    """Only meta bits 0-3 are read: setting bits 4-7 changes nothing (and reads nothing
    outside the group), on every kernel of the rule (M = 17: the transposed-x kernel, or
    the bfloat16 pair kernel)."""
    gen = torch.Generator().manual_seed(5)
    _, values, meta = compressed(9, 100, dtype, gen)
    x = torch.randn(m, 100, generator=gen).to(dtype)
    out = ops.sparse24_mm(x, values, meta, None)
    assert torch.equal(ops.sparse24_mm(x, values, meta | 0xF0, None), out)


def _bad_inputs():
    x = torch.randn(3, 8)
    v = torch.randn(5, 4)
    m = torch.zeros(5, 2, dtype=torch.uint8)
    yield "x", (torch.randn(8), v, m, None)                         # 1-D x
    yield "x", (x.to(torch.int32), v, m, None)                      # integer x
    yield "x", (torch.randn(3, 6), torch.randn(5, 3), torch.zeros(5, 1, dtype=torch.uint8), None)
    yield "values", (x, v.double(), m, None)                        # dtype != x.dtype
    yield "values", (x, torch.randn(5, 5), m, None)                 # not K/2 wide
    yield "values", (x, torch.randn(20), m, None)                   # 1-D
    yield "meta", (x, v, m.to(torch.int8), None)                    # not uint8
    yield "meta", (x, v, torch.zeros(4, 2, dtype=torch.uint8), None)  # not N rows
    yield "meta", (x, v, torch.zeros(5, 3, dtype=torch.uint8), None)  # not K/4 wide
    yield "bias", (x, v, m, torch.randn(4))                         # not N
    yield "bias", (x, v, m, torch.arange(5))                        # integer
    yield "bias", (x, v, m, torch.randn(5, 1))                      # 2-D


@pytest.mark.parametrize("name,args", list(_bad_inputs()),
                         ids=[f"{n}{i}" for i, (n, _) in enumerate(_bad_inputs())])
def test_bad_input_names_argument(name, args):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        ops.sparse24_mm(*args)


def test_isa_restored():
    """The fixture gave the level back: the best the CPU has is active again."""
    assert ops.cpu_isa() == ops.cpu_isa_detected()
