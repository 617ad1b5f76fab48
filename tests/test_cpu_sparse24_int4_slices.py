"""sparse24_int4_mm at M = 1 on the AVX-512 level with AVX512_VBMI: the int8-slice kernel
(csrc/cpu/sparse24_int4_slices.cpp).

x is held per 8-column lane as X * 2^(e - 23), |X| < 0.99 * 2^23 (csrc/cpu/x_slices.h),
in three unsigned byte slices of X + 2^23; vpermt2b picks the kept columns' digits and
vpdpbusd multiplies them with q - z exactly. So an output may differ from the exact
product of x and the dequantized weight by at most slice_bound (tests/test_cpu_int4_slices.py:
sum over lanes of 2^(e - 24) * sum |w| over the lane) plus float32 rounding; the zero
point is exact here. The tests hold the kernel to PyTorch-based tolerance (the rule of
tests/test_cpu_sparse24_int4.py) on every group size, symmetric and asymmetric weights,
partial blocks (K not a multiple of 128), odd N (a row left after the pairs) and x
dtypes; to the bound on a lane with a 2^30 dynamic range; and check that x the slices
cannot hold runs the tiles. PYFAST_NO_INT8_SLICES sends the same call to the tiles. Other
ISA levels, and CPUs without VBMI, never run this kernel; there the same calls check the
tiles.
"""
import pytest
import torch

import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import (FLOAT_DTYPES, assert_bits_equal, dequant_sparse24_int4, dtype_id, slice_bound,
                      slice_fallback_x)
from test_cpu_sparse24_int4 import check, packed

OPS = torch.ops.pyfast_C
NO_SLICES = "PYFAST_NO_INT8_SLICES"


def slices_run(isa: str) -> bool:
    return isa == "avx512" and OPS.cpu_has_vbmi()


# (K, group): partial last blocks (40, 136 per channel; 96 and 4160 with group 32; 448
# with group 64), whole blocks (256, 4096 with group 128; 11008 with group 64)
KG = [(8, -1), (40, -1), (136, -1), (96, 32), (4160, 32), (448, 64), (11008, 64),
      (256, 128), (4096, 128)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_m1_slices(isa, threads, symmetric, dtype):
    """Against the exact product (float64) and the reference, N = 1, 2, 7 and 34 (a single
    row, one pair, pairs and a row left over), with bias."""
    gen = torch.Generator().manual_seed(3 + symmetric)
    for k, group_size in KG:
        for n in (1, 2, 7, 34):
            args = packed(n, k, group_size, symmetric, gen)
            x = torch.randn(1, k, generator=gen).to(dtype)
            check(x, args, group_size, torch.randn(n, generator=gen), f"{isa} slices")


def test_m1_slices_outliers(isa, threads):
    """x with outlier channels (x100) and tiny values (x1e-3), as LLM activations have,
    asymmetric weights: within the tolerance (tighter than slice_bound)."""
    gen = torch.Generator().manual_seed(9)
    for k, group_size in ((4096, 128), (4096, 32), (11008, -1)):
        args = packed(48, k, group_size, False, gen)
        x = torch.randn(1, k, generator=gen)
        x[0, torch.randint(0, k, (k // 200,), generator=gen)] *= 100.0
        x[0, torch.randint(0, k, (k // 10,), generator=gen)] *= 1e-3
        check(x, args, group_size, None, f"{isa} outliers")


def _two_lanes():
    """K = 256, group 128, scale 1, zero 8 (weight q - 8): w = 1 at columns 1 and 8, else 0.
    Every group of 4 keeps its columns 0 and 1 (meta 0x44: indices 0, 1, 0, 1); codes 8
    (weight 0) except kept value 1 (column 1) and kept value 4 (column 8): 9.
    x: 1.0 at column 0 and 2^-30 at column 1 (lane 0), 2^-30 at column 8 (lane 1)."""
    codes = torch.full((1, 64), 0x88, dtype=torch.uint8)
    codes[0, 0] = 0x98   # kept 0 (column 0): 8, kept 1 (column 1): 9
    codes[0, 2] = 0x89   # kept 4 (column 8): 9, kept 5 (column 9): 8
    meta = torch.full((1, 32), 0x44, dtype=torch.uint8)
    scales = torch.ones(1, 2)
    zeros = torch.full((1, 2), 8, dtype=torch.uint8)
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1], x[0, 8] = 1.0, 2.0 ** -30, 2.0 ** -30
    return x, (codes, meta, scales, zeros)


def test_m1_slices_lane_precision(isa, monkeypatch):
    """The exact output is 2^-29, which the tiles get exactly. The slice kernel holds lane
    0 to one ulp of its 1.0 (2^-23), where 2^-30 rounds to 0, and lane 1 exactly: 2^-30,
    within slice_bound (2^-23 + 2^-53). This is also how the test knows the kernel ran."""
    x, args = _two_lanes()
    w64 = dequant_sparse24_int4(*args, 128)
    assert torch.equal(w64.nonzero()[:, 1], torch.tensor([1, 8]))
    assert torch.equal(w64[0, [1, 8]], torch.ones(2, dtype=w64.dtype))
    out = OPS.sparse24_int4_mm(x, *args, 128, None)
    monkeypatch.setenv(NO_SLICES, "1")
    out_tiles = OPS.sparse24_int4_mm(x, *args, 128, None)
    assert out_tiles.item() == 2.0 ** -29
    if slices_run(isa):
        assert out.item() == 2.0 ** -30
        bound = slice_bound(x, w64)
        assert bound == 2.0 ** -23 + 2.0 ** -53
        assert abs(out.item() - 2.0 ** -29) <= bound
    else:
        assert out.item() == 2.0 ** -29


@pytest.mark.parametrize("case", ("nan", "inf", "tiny_lane", "huge"))
def test_m1_slices_fallback(isa, threads, case, monkeypatch):
    """x the slices cannot hold runs the tiles (bit for bit the output with
    PYFAST_NO_INT8_SLICES): a NaN, an inf, a lane whose largest |x| is 1e-25 (< 2^-64).
    A huge value (1e37) is held (the output is not the tiles'), within slice_bound."""
    gen = torch.Generator().manual_seed(13)
    k = 1024
    args = packed(20, k, 128, False, gen)
    w64 = dequant_sparse24_int4(*args, 128)
    x = torch.randn(1, k, generator=gen)
    slice_fallback_x(x, case)
    out = OPS.sparse24_int4_mm(x, *args, 128, None)
    monkeypatch.setenv(NO_SLICES, "1")
    out_tiles = OPS.sparse24_int4_mm(x, *args, 128, None)
    expected = reference.sparse24_int4_mm(x, *args, 128, None)
    if case in ("nan", "inf"):
        # Every row that keeps the column (its kept value multiplies the NaN or inf) is
        # NaN or inf, as in the reference. A row that pruned it does not see it in the
        # tiles (they skip pruned positions, as PyTorch's CUDA 2:4 kernels do), while the
        # reference's dense product makes 0 * inf = NaN there: not compared.
        assert_bits_equal(out, out_tiles)
        col = 100 if case == "nan" else 7
        keeps = w64[:, col] != 0
        assert bool((~out[0, keeps].isfinite()).all())
        assert torch.equal(out[0, keeps].isnan(), expected[0, keeps].isnan())
    elif case == "tiny_lane":
        assert_bits_equal(out, out_tiles)
        check(x, args, 128, None, "tiny lane")
    else:  # held: the other x of its lane are below its ulp (2^100), within the bound
        exact = x.double() @ w64.T
        err = (out.double() - exact).abs().max().item()
        assert err <= slice_bound(x, w64) * (1 + 2.0 ** -20), (err, slice_bound(x, w64))
        assert torch.equal(out, out_tiles) == (not slices_run(isa))


def test_m1_slices_zero_x_and_zero_lanes(isa, threads):
    """x = 0: exactly the bias; x with whole zero lanes and blocks among ordinary ones."""
    gen = torch.Generator().manual_seed(17)
    args = packed(12, 512, 64, False, gen)
    b = torch.randn(12, generator=gen)
    out = OPS.sparse24_int4_mm(torch.zeros(1, 512), *args, 64, b)
    assert torch.equal(out[0], b)
    x = torch.randn(1, 512, generator=gen)
    x[0, 8:16] = 0.0
    x[0, 128:256] = 0.0
    check(x, args, 64, b, "zero lanes")


def test_m1_slices_extreme_codes(isa, threads):
    """Every code 0 or 15 against zero points 0 and 15 (|q - z| = 15, the largest the
    int32 lane sums take) with x near the top of each lane's range: within the
    tolerance, no overflow. The indices come from a packed random 2:4 weight."""
    gen = torch.Generator().manual_seed(19)
    n, k = 6, 512
    _, meta, _, _ = packed(n, k, 128, False, gen)
    codes = torch.where(torch.rand(n, k // 4, generator=gen) < 0.5, 0x00, 0xFF).to(torch.uint8)
    codes[::2] = 0xFF
    zeros = torch.tensor([[0, 15, 0, 15]], dtype=torch.uint8).repeat(n, 1)
    zeros[1::2] = 15 - zeros[1::2]
    scales = torch.rand(n, k // 128, generator=gen) + 0.5
    sign = torch.where(torch.rand(1, k, generator=gen) < 0.5, -1.0, 1.0)
    x = torch.full((1, k), 0.985) * sign
    check(x, (codes, meta, scales, zeros), 128, None, "extreme codes")
    check(x.abs(), (codes, meta, scales, zeros), 128, None, "extreme codes, x > 0")
