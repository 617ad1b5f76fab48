"""torch.ops.pyfast_C.int4_mm_tc (csrc/cuda/int4_mm.cu) on a GPU against pyfast.reference.

The oracle is pyfast.reference.int4_mm on the canonical weight (the dequantized weight in
float32), evaluated in float64 here. The kernel differs from it in a known way, and the
tolerance is exactly that (u = unit roundoff of x.dtype: 2**-11 float16, 2**-8 bfloat16):
  - weight: x.dtype(x.dtype(q - z) * x.dtype(scale)); q - z is exact, so two roundings,
    |W_kernel - W| <= (2u + u**2) |W|  -> contributes (2u + u**2) * (|x| @ |W|^T);
  - products x * W_kernel are exact in float32 (11 x 11 or 8 x 8 significant bits); the
    float32 sum of K terms (plus up to `splits` partial sums) errs by at most
    (K + 64) * 2**-24 * (|x| @ |W_kernel|^T);
  - the final cast to x.dtype: u |out| (plus half the smallest subnormal step of x.dtype).
The tighter oracle (the weight rounded as the kernel rounds it) is checked too, without
the 2u weight term, so a wrong scale slot or zero point cannot hide inside the bound.
Marked `cuda`: skipped where torch sees no GPU.
"""
from __future__ import annotations

import pytest
import torch

from pyfast import reference
from pyfast.layouts import int4_tc

from _helpers import HALF_TINY, HALF_UNIT, exact_float32_matmul, int4_tc_bound as _bound  # noqa: F401

pytestmark = pytest.mark.cuda

DTYPES = (torch.float16, torch.bfloat16)
UNIT, TINY = HALF_UNIT, HALF_TINY


def _ops():
    import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
    return torch.ops.pyfast_C


def _problem(m, n, k, gs, symmetric, dtype, with_bias, seed):
    """Random int4 layer (canonical packed, scales, zeros) and activations, on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, scales, zeros = reference.pack_int4(w, gs, symmetric)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = (torch.randn(n, generator=gen) * 0.5).to(dtype) if with_bias else None
    return tuple(None if t is None else t.cuda() for t in (x, packed, scales, zeros, bias))


def _check(x, packed, scales, zeros, gs, bias):
    """Run the CUDA op and compare it with both oracles (see the module docstring)."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    w_tc = int4_tc.repack(packed)
    out = _ops().int4_mm_tc(x, w_tc, scales, zeros, gs, bias)
    assert out.dtype == x.dtype and tuple(out.shape) == (x.shape[0], n) and out.is_contiguous()
    got = out.double()
    assert torch.isfinite(got).all()

    w = reference.dequantize_int4(packed, scales, zeros, gs)               # the oracle's W
    ref, tol = _bound(x, w, bias, k, x.dtype, weight_term=1)
    err = (got - ref).abs()
    assert (err <= tol).all(), (f"max error {err.max().item():.3g}, "
                                f"worst excess {(err - tol).max().item():.3g}")
    # pyfast.reference.int4_mm itself rounds to x.dtype: within the same bound plus that
    want = reference.int4_mm(x, packed, scales, zeros, gs, bias).double()
    assert ((got - want).abs() <= tol + UNIT[x.dtype] * ref.abs() + TINY[x.dtype]).all()

    w_k = reference.dequantize_int4(packed, scales.to(x.dtype).float(), zeros, gs)
    w_k = w_k.to(x.dtype).float()                                          # the kernel's W
    ref_k, tol_k = _bound(x, w_k, bias, k, x.dtype, weight_term=0)
    assert ((got - ref_k).abs() <= tol_k).all()
    return out


# (N, K, group_size): N and K below, at and above the 64 x 16 tile and the stages
SMALL = [(n, k, gs) for n, k in [(5, 64), (70, 96), (130, 160), (64, 384), (257, 1024)]
         for gs in (32, 64, 128, -1) if gs == -1 or k % gs == 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric,with_bias", [(True, False), (False, True)],
                         ids=["sym-nobias", "asym-bias"])
@pytest.mark.parametrize("n,k,gs", SMALL, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 128, 130], ids=lambda m: f"M{m}")
def test_matches_reference(m, n, k, gs, symmetric, with_bias, dtype):
    x, packed, scales, zeros, bias = _problem(m, n, k, gs, symmetric, dtype, with_bias,
                                              seed=m * 7 + n + k)
    _check(x, packed, scales, zeros, gs, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", [128, -1], ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 128], ids=lambda m: f"M{m}")
def test_llm_layer_shapes(m, k, n, gs, dtype):
    x, packed, scales, zeros, bias = _problem(m, n, k, gs, False, dtype, True, seed=m + k)
    _check(x, packed, scales, zeros, gs, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(3, 5, 50), (17, 33, 34), (40, 100, 2), (1, 1, 100)])
def test_odd_k_per_channel(m, n, k, dtype):
    # K % 8 != 0: the launcher zero-pads x; K % 16 != 0: the last w_tc tile is padded
    x, packed, scales, zeros, bias = _problem(m, n, k, -1, True, dtype, True, seed=k)
    _check(x, packed, scales, zeros, -1, bias)


def test_strided_and_misaligned_inputs():
    x_big = torch.randn(9, 200, device="cuda").half()
    x = x_big[1:8, 3:131]                       # rows strided, start not 16-byte aligned
    _, packed, scales, zeros, bias = _problem(7, 40, 128, 32, False, torch.float16, True, 1)
    _check(x, packed, scales, zeros.t().contiguous().t(), 32, bias)   # zeros non-contiguous


def test_workspace_is_left_clean_across_calls():
    # split-K reuses one zeroed workspace per stream: a call that left it dirty would
    # shift the next result. Alternate shapes (different splits and tile counts).
    seq = [(1, 4096, 4096), (130, 512, 1024), (1, 4096, 4096), (16, 256, 8192), (1, 64, 8192)]
    for i, (m, n, k) in enumerate(seq * 2):
        x, packed, scales, zeros, bias = _problem(m, n, k, 128, i % 2 == 0, torch.float16,
                                                  i % 3 == 0, seed=i)
        _check(x, packed, scales, zeros, 128, bias)


def test_on_a_side_stream_and_repeatable():
    x, packed, scales, zeros, bias = _problem(4, 1024, 4096, 64, False, torch.bfloat16, True, 3)
    first = _check(x, packed, scales, zeros, 64, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())   # inputs were made on the default stream
    with torch.cuda.stream(stream):
        second = _check(x, packed, scales, zeros, 64, bias)
    stream.synchronize()
    # split-K sums in a run-dependent order: equal up to float32 rounding of the sums
    torch.testing.assert_close(first.float(), second.float(), rtol=2 * UNIT[torch.bfloat16],
                               atol=1e-6)


def test_errors():
    ops = _ops()
    dev = torch.device("cuda")
    x, packed, scales, zeros, _ = _problem(3, 70, 128, 32, True, torch.float16, False, 0)
    w_tc = int4_tc.repack(packed)
    with pytest.raises(RuntimeError, match="x has dtype Float"):
        ops.int4_mm_tc(x.float(), w_tc, scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match=r"w_tc has shape \[2, 7, 32, 4\]"):
        ops.int4_mm_tc(x, w_tc[:, :7].contiguous(), scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match="w_tc has dtype Byte"):
        ops.int4_mm_tc(x, packed, scales, zeros, 32, None)
    with pytest.raises(RuntimeError, match="group_size is 48"):
        ops.int4_mm_tc(x, w_tc, scales, zeros, 48, None)
    with pytest.raises(RuntimeError, match="zeros.size"):
        ops.int4_mm_tc(x, w_tc, scales, zeros[:, :3], 32, None)
    with pytest.raises(RuntimeError, match="bias.size"):
        ops.int4_mm_tc(x, w_tc, scales, zeros, 32, torch.zeros(69, device=dev))
    with pytest.raises(RuntimeError, match="x is on cpu"):
        ops.int4_mm_tc(x.cpu(), w_tc, scales, zeros, 32, None)
