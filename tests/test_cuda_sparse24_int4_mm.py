"""torch.ops.pyfast_C.sparse24_int4_mm_tc (csrc/cuda/sparse24_int4_mm.cu) on a GPU.

Oracle: pyfast.reference.sparse24_int4_mm on the canonical (packed, meta, scales, zeros),
the oracle of the public op sparse24_int4_mm_tc, evaluated in float64 here. The kernel
rounds each dequantized kept value to x.dtype (as int4_mm_tc) and sums in float32 in
another order; the bound is tests/_helpers.py's int4_tc_bound (see test_cuda_int4_mm.py).
The tighter oracle, the weight rounded exactly as the kernel rounds it, is checked too,
so a wrong code nibble, index, scale slot or zero point cannot hide inside the bound.

Shapes cover both configurations (SmallM for M <= 16, LargeM above), split-K (small N,
large K) and no split, N not a multiple of the 16 / 64 / 128 row tiles, K not a
multiple of 32 / 64 / 128 (tail steps and padded 64-k blocks), every group size,
symmetric and asymmetric zero points. Marked `cuda`: skipped where torch sees no GPU.
"""
from __future__ import annotations

import pytest
import torch

from pyfast import reference
from pyfast.layouts import sparse24_int4_tc

from _helpers import exact_float32_matmul, int4_tc_bound, random_24  # noqa: F401

pytestmark = pytest.mark.cuda

DTYPES = (torch.float16, torch.bfloat16)


def _ops():
    import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
    return torch.ops.pyfast_C


def _problem(m, n, k, gs, symmetric, dtype, with_bias, seed):
    """Random 2:4 + int4 layer (canonical) and activations, on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    w = random_24(n, k, gen=gen) * 0.05
    packed, meta, scales, zeros = reference.pack_sparse24_int4(w, gs, symmetric)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = (torch.randn(n, generator=gen) * 0.5).to(dtype) if with_bias else None
    return tuple(None if t is None else t.cuda()
                 for t in (x, packed, meta, scales, zeros, bias))


def _run(x, packed, meta, scales, zeros, gs, bias):
    codes_tc, meta_tc = sparse24_int4_tc.repack(packed, meta)
    return _ops().sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, gs, bias)


def _check(x, packed, meta, scales, zeros, gs, bias):
    n, k = packed.shape[0], x.shape[1]
    out = _run(x, packed, meta, scales, zeros, gs, bias)
    assert out.dtype == x.dtype and tuple(out.shape) == (x.shape[0], n) and out.is_contiguous()
    got = out.double()
    assert torch.isfinite(got).all()

    w = reference.dequantize_sparse24_int4(packed, meta, scales, zeros, gs)   # oracle's W
    ref, tol = int4_tc_bound(x, w, bias, k, x.dtype, weight_term=1)
    err = (got - ref).abs()
    assert (err <= tol).all(), (f"max error {err.max().item():.3g}, "
                                f"worst excess {(err - tol).max().item():.3g}")
    w_k = reference.dequantize_sparse24_int4(packed, meta, scales.to(x.dtype).float(), zeros, gs)
    w_k = w_k.to(x.dtype).float()                                             # kernel's W
    ref_k, tol_k = int4_tc_bound(x, w_k, bias, k, x.dtype, weight_term=0)
    assert ((got - ref_k).abs() <= tol_k).all()
    return out


# (N, K, group_size): below, at and above the 16 / 64 / 128 row tiles; K with tail
# steps (K % 32 != 0: only per-channel), padded 64-k blocks and whole 128-k stages
SMALL = [(n, k, gs) for n, k in [(5, 64), (70, 96), (130, 160), (64, 384), (257, 1024),
                                  (33, 200), (17, 8), (7, 40)]
         for gs in (32, 64, 128, -1) if gs == -1 or k % gs == 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric,with_bias", [(True, False), (False, True)],
                         ids=["sym-nobias", "asym-bias"])
@pytest.mark.parametrize("n,k,gs", SMALL, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 130], ids=lambda m: f"M{m}")
def test_matches_reference(m, n, k, gs, symmetric, with_bias, dtype):
    x, packed, meta, scales, zeros, bias = _problem(m, n, k, gs, symmetric, dtype, with_bias,
                                                    seed=m * 7 + n + k)
    _check(x, packed, meta, scales, zeros, gs, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", [128, -1], ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 128, 1024], ids=lambda m: f"M{m}")
def test_llm_layer_shapes(m, k, n, gs, dtype):
    x, packed, meta, scales, zeros, bias = _problem(m, n, k, gs, False, dtype, True, m + k)
    _check(x, packed, meta, scales, zeros, gs, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    """Split-K reduces in split order: two calls give identical bits."""
    x, packed, meta, scales, zeros, _ = _problem(5, 130, 4096, 64, False, dtype, False, 3)
    a = _run(x, packed, meta, scales, zeros, 64, None)
    assert torch.equal(a, _run(x, packed, meta, scales, zeros, 64, None))


def test_inf_scale_in_the_tail_group():
    """An inf scale in the last group of a K with a tail step (K = 200, per channel): the
    kernel zeroes the padded registers, so the padding cannot turn +-inf into NaN; the
    NaN/inf pattern of the output equals the reference's."""
    x, packed, meta, scales, zeros, _ = _problem(4, 48, 200, -1, False, torch.float16, False, 7)
    scales = scales.clone()
    scales[::5] = float("inf")
    x = x.abs()                                   # one sign: no inf - inf from x
    out = _run(x, packed, meta, scales, zeros, -1, None).float()
    want = reference.sparse24_int4_mm(x, packed, meta, scales, zeros, -1, None).float()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.equal(out[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    assert finite[:, 1].all() and not finite[:, 0].all()   # the test is not vacuous


def test_strided_and_misaligned_inputs():
    x_big = torch.randn(9, 200, device="cuda").half()
    x = x_big[1:8, 3:131]                       # rows strided, start not 16-byte aligned
    _, packed, meta, scales, zeros, bias = _problem(7, 40, 128, 32, False, torch.float16,
                                                    True, 1)
    _check(x, packed, meta, scales, zeros.t().contiguous().t(), 32, bias)


def test_empty_shapes():
    x, packed, meta, scales, zeros, bias = _problem(3, 7, 64, 32, True, torch.float16, True, 2)
    out = _run(x[:0], packed, meta, scales, zeros, 32, bias)
    assert out.shape == (0, 7)
    _, p0, m0, s0, z0, _ = _problem(3, 0, 64, 32, True, torch.float16, False, 2)
    assert _run(x, p0, m0, s0, z0, 32, None).shape == (3, 0)


def test_errors():
    ops = _ops()
    x, packed, meta, scales, zeros, _ = _problem(3, 70, 128, 32, True, torch.float16, False, 0)
    codes_tc, meta_tc = sparse24_int4_tc.repack(packed, meta)
    op = ops.sparse24_int4_mm_tc
    with pytest.raises(RuntimeError, match="x has dtype Float"):
        op(x.float(), codes_tc, meta_tc, scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match=r"codes_tc has shape \[5, 1, 32, 2\]"):
        op(x, codes_tc[:, :1].contiguous(), meta_tc, scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match="meta_tc has dtype Byte"):
        op(x, codes_tc, meta, scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match="group_size is 48"):
        op(x, codes_tc, meta_tc, scales, zeros, 48, None)
    with pytest.raises(RuntimeError, match="zeros.size"):
        op(x, codes_tc, meta_tc, scales, zeros[:, :3], 32, None)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        op(x.cpu(), codes_tc, meta_tc, scales, zeros, 32, None)
