"""pyfast_C::sparse24_mm_tc (csrc/cuda/sparse24_mm.cu) on a GPU, against the reference.

Oracle: pyfast.reference.sparse24_mm on (values, unrepack_meta(meta_tc)), the oracle of
the public op sparse24_mm_tc. The kernel accumulates in float32 in another order, so
the tolerance is tests/_helpers.py's rule (FlashAttention's): twice PyTorch's own
F.linear error in x's dtype against float64, plus one ulp of the largest output; and
against the float32 reference that tolerance plus the reference's own error.

Shapes cover both kernel configurations (SmallM for M <= 16, LargeM above), both load
paths (16-byte cp.async for K % 16 == 0, 4-byte otherwise), split-K (small N with
large K) and no split, N not a multiple of the 64 / 128 row tiles, K not a multiple
of 32 / 64 (zero-filled tail), M = 1 .. 1024.
"""
import pytest
import torch

import pyfast
from pyfast import _ext, reference
from pyfast.layouts import sparse24_tc

from _helpers import assert_within, decompress24, dtype_id, linear_tolerance, random_24

_ext.load()   # registers torch.ops.pyfast_C where the extension is built; never raises

pytestmark = pytest.mark.cuda

DTYPES = (torch.float16, torch.bfloat16)
MS = (1, 3, 16, 17, 64, 130, 1024)
KS_ODD = (4, 12, 36, 4100)          # 4-byte path, tails of every size
KS_ALIGNED = (64, 160, 4096)        # 16-byte path (K % 16 == 0), 160: half a 128 tile
NS = (7, 130)


def compressed(n, k, dtype, gen):
    w = random_24(n, k, dtype, gen=gen)
    values, meta = pyfast.ops.sparse24_compress(w)
    return values.cuda(), meta.cuda()


def run_tc(x, values, meta, bias):
    meta_tc = sparse24_tc.repack_meta(meta)
    return torch.ops.pyfast_C.sparse24_mm_tc(x, values, meta_tc, bias)


def check(x, values, meta, bias, what=""):
    out = run_tc(x, values, meta, bias)
    assert out.is_cuda and out.is_contiguous() and out.dtype == x.dtype
    want = reference.sparse24_mm(x, values, meta, bias)
    label = (f"{what} M={x.shape[0]} K={x.shape[1]} N={values.shape[0]} {x.dtype} "
             f"bias={None if bias is None else bias.dtype}")
    if out.numel() == 0:
        assert_within(out, want, 0.0, label)
        return out
    w64 = decompress24(values, meta).double()
    tol = linear_tolerance(x, w64, bias, x.dtype)
    exact = torch.nn.functional.linear(x.double(), w64, None if bias is None else bias.double())
    assert_within(out, exact.to(x.dtype), tol, label + " vs float64")
    ref_err = (want.double() - exact).abs().max().item()
    assert_within(out, want, tol + ref_err, label + " vs reference")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", MS, ids=lambda v: f"M{v}")
def test_matches_reference(m, dtype):
    gen = torch.Generator().manual_seed(m)
    for k in KS_ODD + KS_ALIGNED:
        for n in NS:
            values, meta = compressed(n, k, dtype, gen)
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            check(x, values, meta, None)
            check(x, values, meta, torch.randn(n, generator=gen).cuda())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 11008, 4096), (64, 4096, 4096),
                                   (1024, 2048, 256), (1024, 1024, 1024), (3, 2048, 1028)],
                         ids=lambda v: str(v))
def test_layer_shapes(m, n, k, dtype):
    """Real layer sizes: split-K on small M (many k tiles, few row tiles), no split for
    M = 1024 x N = 2048 x K = 256 (4 k tiles), the 4-byte path at K = 1028."""
    gen = torch.Generator().manual_seed(n + k)
    values, meta = compressed(n, k, dtype, gen)
    x = (torch.randn(m, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    check(x, values, meta, torch.randn(n, generator=gen).to(dtype).cuda(), "layer")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic(dtype):
    """Split-K reduces in split order: two calls give identical bits."""
    gen = torch.Generator().manual_seed(3)
    values, meta = compressed(130, 4100, dtype, gen)
    x = torch.randn(5, 4100, generator=gen).to(dtype).cuda()
    a, b = run_tc(x, values, meta, None), run_tc(x, values, meta, None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_and_offset_inputs(dtype):
    """Non-contiguous x, and x / values whose data pointers are only 2-byte aligned (a
    storage offset of one element): the launcher copies them to aligned storage."""
    gen = torch.Generator().manual_seed(5)
    n, k, m = 33, 96, 17
    values, meta = compressed(n, k, dtype, gen)
    x_t = torch.randn(k, m, generator=gen).to(dtype).cuda().t()          # stride (1, m)
    check(x_t, values, meta, None, "transposed x")
    buf = torch.zeros(m * k + 1, dtype=dtype, device="cuda")
    x_off = buf[1:].view(m, k)
    x_off.copy_(torch.randn(m, k, generator=gen).to(dtype))
    vbuf = torch.zeros(values.numel() + 1, dtype=dtype, device="cuda")
    v_off = vbuf[1:].view(n, k // 2)
    v_off.copy_(values)
    check(x_off, v_off, meta, None, "offset pointers")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bias_dtypes(dtype):
    gen = torch.Generator().manual_seed(9)
    values, meta = compressed(40, 36, dtype, gen)
    x = torch.randn(3, 36, generator=gen).to(dtype).cuda()
    for bias_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        check(x, values, meta, torch.randn(40, generator=gen).to(bias_dtype).cuda(), "bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty_shapes(dtype):
    gen = torch.Generator().manual_seed(11)
    values, meta = compressed(7, 12, dtype, gen)
    out = run_tc(torch.zeros(0, 12, dtype=dtype, device="cuda"), values, meta, None)
    assert out.shape == (0, 7)
    values0, meta0 = compressed(0, 12, dtype, gen)
    out = run_tc(torch.randn(3, 12).to(dtype).cuda(), values0, meta0, None)
    assert out.shape == (3, 0)
    # K = 0: the product is empty, out is the bias rounded to x.dtype.
    bias = torch.randn(7, generator=gen).cuda()
    out = run_tc(torch.zeros(3, 0, dtype=dtype, device="cuda"),
                 torch.zeros(7, 0, dtype=dtype, device="cuda"),
                 torch.zeros(7, 0, dtype=torch.uint8, device="cuda"), bias)
    assert torch.equal(out, bias.to(dtype).expand(3, 7))


def test_errors():
    gen = torch.Generator().manual_seed(13)
    values, meta = compressed(20, 36, torch.float16, gen)
    meta_tc = sparse24_tc.repack_meta(meta)
    x = torch.randn(3, 36).half().cuda()
    op = torch.ops.pyfast_C.sparse24_mm_tc
    with pytest.raises(RuntimeError, match="x has dtype Float.*float16, bfloat16"):
        op(x.float(), values.float(), meta_tc, None)
    with pytest.raises(RuntimeError, match="values has dtype BFloat16"):
        op(x, values.bfloat16(), meta_tc, None)
    with pytest.raises(RuntimeError, match=r"meta_tc.size\(1\) is 1"):
        op(torch.randn(3, 100).half().cuda(), torch.zeros(20, 50).half().cuda(), meta_tc, None)
    with pytest.raises(RuntimeError, match="meta_tc has dtype Byte"):
        op(x, values, meta, None)
    with pytest.raises(RuntimeError, match=r"values.size\(1\) is 18"):
        op(torch.randn(3, 40).half().cuda(), values, meta_tc, None)
    with pytest.raises(RuntimeError, match="K % 4 == 0"):
        op(torch.randn(3, 38).half().cuda(), torch.zeros(20, 19).half().cuda(), meta_tc, None)
    with pytest.raises(RuntimeError, match=r"bias.size\(0\) is 21"):
        op(x, values, meta_tc, torch.zeros(21).cuda())
    with pytest.raises(RuntimeError, match="x is on cpu"):
        op(x.cpu(), values, meta_tc, None)
    with pytest.raises(RuntimeError, match="meta_tc is on cpu"):
        op(x, values, meta_tc.cpu(), None)
