"""pyfast_C::sparse24_int4_mm on CPU, every ISA path (avx512 / avx2 / scalar) forced in turn,
1 and 2 threads.

Oracle: the dense weight decoded independently (tests/_helpers.py dequant_sparse24_int4)
in float64; tolerance FlashAttention's rule (twice PyTorch's own F.linear error in x's
dtype, plus one ulp of the largest output) plus one ulp of the largest sum of |x w|
(see check), and the same plus the reference's own error against
pyfast.reference.sparse24_int4_mm. Shapes cover each branch of the kernel's rule
(csrc/cpu/sparse24_int4.cpp): M = 1 (on AVX-512 with VBMI the int8-slice kernel,
tests/test_cpu_sparse24_int4_slices.py; the 4-row tiles with PYFAST_NO_INT8_SLICES or
without VBMI), 3 and 17 (x-row tiles; bfloat16 from
M = 5 on takes the bfloat16 panels, except on the vdpbf16ps tiles: K a multiple of 64 on an
AVX512_BF16 CPU, up to M = 32), 33 and 64 (dense panels); K = 8, 40, 200 (per
channel: not multiples of the 32- / 16-column chunks, so the scalar tail runs), 96, 256
and 4160 (grouped; 4160 spans two K blocks of the blocked driver at M = 1 .. 4); N not a
multiple of the 4- or 3-row weight tiles.
"""
import pytest
import torch

import pyfast
import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import (FLOAT_DTYPES, assert_within, dequant_sparse24_int4, dtype_id,
                      linear_tolerance, random_24)

OPS = torch.ops.pyfast_C
ISAS = ["avx512", "avx2", "scalar"]  # the isa fixture (conftest.py) forces each
# (K, group_size): per channel with a tail, then each group size
# K a multiple of 64 (per channel, groups 32 / 64 / 128) also takes the vdpbf16ps tiles for
# bfloat16 x on AVX512_BF16 CPUs; the others the float32 tiles
KG = [(8, -1), (40, -1), (200, -1), (128, -1), (96, 32), (256, 32), (256, 64), (256, 128),
      (4160, 64)]


def packed(n, k, group_size, symmetric, gen):
    return pyfast.ops.pack_sparse24_int4(random_24(n, k, gen=gen), group_size, symmetric)


def check(x, args, group_size, bias, what):
    out = OPS.sparse24_int4_mm(x, *args, group_size, bias)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], args[0].shape[0])
    want = reference.sparse24_int4_mm(x, *args, group_size, bias)
    if out.numel() == 0:
        return
    w64 = dequant_sparse24_int4(*args, group_size)
    # + one ulp of the largest sum of |products|: with N = 1 the rule's floor (one ulp of
    # the output) can sit below what any summation order gives when the products cancel
    terms = (x.double().abs() @ w64.abs().T).max().item()
    tol = linear_tolerance(x, w64, bias, x.dtype) + torch.finfo(x.dtype).eps * terms
    exact = torch.nn.functional.linear(x.double(), w64, None if bias is None else bias.double())
    label = f"{what} M={x.shape[0]} K={x.shape[1]} N={args[0].shape[0]} {x.dtype}"
    rounded = exact.to(x.dtype)   # the triangle inequality below holds against this one
    assert_within(out, rounded, tol, label + " vs float64")
    ref_err = (want.double() - rounded.double()).abs().max().item()
    assert_within(out, want, tol + ref_err, label + " vs reference")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [0, 1, 3, 17, 33, 64], ids=lambda v: f"M{v}")
def test_matches_reference(isa, threads, m, dtype):
    gen = torch.Generator().manual_seed(m)
    for k, group_size in KG:
        for n in (1, 7, 33):
            args = packed(n, k, group_size, bool(n % 2), gen)
            x = torch.randn(m, k, generator=gen).to(dtype)
            check(x, args, group_size, None, isa)
            check(x, args, group_size, torch.randn(n, generator=gen), isa)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_m1_tiles(isa, threads, dtype, monkeypatch):
    """M = 1 with PYFAST_NO_INT8_SLICES: the 4-row tiles (float32; bfloat16 x on the
    vdpbf16ps tiles where K is a multiple of 64 on AVX512_BF16 CPUs), which the slice
    kernel replaces at M = 1 on AVX-512 CPUs with VBMI."""
    monkeypatch.setenv("PYFAST_NO_INT8_SLICES", "1")
    gen = torch.Generator().manual_seed(21)
    for k, group_size in KG:
        for n in (1, 7, 33):
            args = packed(n, k, group_size, bool(n % 2), gen)
            x = torch.randn(1, k, generator=gen).to(dtype)
            check(x, args, group_size, torch.randn(n, generator=gen), f"{isa} tiles")


@pytest.mark.parametrize("m", [1, 3, 4, 17, 32], ids=lambda v: f"M{v}")
@pytest.mark.parametrize("bf16_dot", [True, False], ids=["bf16dot", "float32"])
def test_bfloat16_both_kernels(isa, threads, m, bf16_dot, monkeypatch):
    """bfloat16 x with K a multiple of 64 (every group size, several K blocks at 4160):
    the vdpbf16ps tiles where the CPU has AVX512_BF16 (up to M = 32), and without it,
    forced with PYFAST_NO_BF16DOT, the float32 tiles (M <= 4) or the bfloat16 panels.
    PYFAST_NO_INT8_SLICES keeps M = 1 on these tiles (else the slice kernel runs)."""
    monkeypatch.setenv("PYFAST_NO_INT8_SLICES", "1")
    if not bf16_dot:
        monkeypatch.setenv("PYFAST_NO_BF16DOT", "1")
    gen = torch.Generator().manual_seed(10 + m)
    for k, group_size in ((64, -1), (192, 32), (192, 64), (256, 128), (4160, 32)):
        for n in (5, 33):
            args = packed(n, k, group_size, bool(n % 2), gen)
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            check(x, args, group_size, torch.randn(n, generator=gen), f"{isa} dot={bf16_dot}")


@pytest.mark.parametrize("slices", [True, False], ids=["slices", "tiles"])
def test_decode_long_rows_many_tiles(isa, threads, slices, monkeypatch):
    """M = 1 on a layer several tiles and row blocks wide (N = 130, K = 4096): the
    prefetch offsets and the 64-row blocks, in both symmetric and asymmetric form; the
    slice kernel's row pairs and prefetch, and (PYFAST_NO_INT8_SLICES) the tiles."""
    if not slices:
        monkeypatch.setenv("PYFAST_NO_INT8_SLICES", "1")
    gen = torch.Generator().manual_seed(7)
    for symmetric in (True, False):
        args = packed(130, 4096, 128, symmetric, gen)
        for dtype in FLOAT_DTYPES:
            check(torch.randn(1, 4096, generator=gen).to(dtype), args, 128,
                  torch.randn(130, generator=gen), f"{isa} sym={symmetric}")


def test_nan_and_inf_reach_the_output(isa):
    """A NaN in x or in a group's scale shows in every output it touches, as in the
    reference (no path may drop it by skipping pruned or zero weights it multiplies)."""
    gen = torch.Generator().manual_seed(3)
    p, meta, scales, zeros = packed(5, 64, 32, True, gen)
    scales = scales.clone()
    scales[2, 1] = float("nan")
    x = torch.randn(3, 64, generator=gen)
    x[1, 0] = float("inf")
    out = OPS.sparse24_int4_mm(x, p, meta, scales, zeros, 32, None)
    want = reference.sparse24_int4_mm(x, p, meta, scales, zeros, 32, None)
    assert torch.equal(out.isnan(), want.isnan()) and bool(out[:, 2].isnan().all())
    assert torch.equal(out.isinf(), want.isinf())


def test_noncontiguous_x_and_half_scales(isa):
    gen = torch.Generator().manual_seed(5)
    p, meta, scales, zeros = packed(9, 128, 64, False, gen)
    x = torch.randn(128, 4, generator=gen).T          # [4, 128], column-major
    out = OPS.sparse24_int4_mm(x, p, meta, scales.half(), zeros, 64, None)
    want = reference.sparse24_int4_mm(x.contiguous(), p, meta, scales.half().float(), zeros,
                                      64, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- bad inputs: a RuntimeError that names the argument -----------------------------------------

def _args():
    p, meta, scales, zeros = reference.pack_sparse24_int4(torch.zeros(3, 64), 32, True)
    return [torch.randn(2, 64), p, meta, scales, zeros, 32, None]


BAD = [
    ("x", 0, torch.zeros(2, 64, dtype=torch.int8)),
    ("x", 0, torch.randn(2, 60)),                     # K not a multiple of 8
    ("packed", 1, torch.zeros(3, 32, dtype=torch.uint8)),
    ("packed", 1, torch.zeros(3, 16, dtype=torch.int8)),
    ("meta", 2, torch.zeros(3, 16, dtype=torch.uint8)),
    ("meta", 2, torch.zeros(4, 8, dtype=torch.uint8)),
    ("scales", 3, torch.ones(3, 3)),
    ("scales", 3, torch.ones(3, 2, dtype=torch.int32)),
    ("zeros", 4, torch.zeros(3, 2, dtype=torch.int32)),
    ("zeros", 4, torch.zeros(3, 1, dtype=torch.uint8)),
    ("group_size", 5, 48),
    ("group_size", 5, 128),  # K = 64 is not a multiple of 128
    ("bias", 6, torch.ones(2)),
]


@pytest.mark.parametrize("name,index,value", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input(name, index, value):
    args = _args()
    args[index] = value
    with pytest.raises(RuntimeError, match=name):
        OPS.sparse24_int4_mm(*args)


def test_good_inputs_of_the_error_tests_pass():
    """The error tests change one argument of a call that is otherwise valid."""
    assert OPS.sparse24_int4_mm(*_args()).shape == (2, 3)
