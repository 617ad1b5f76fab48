"""The Triton int8 kernels (kernels/quantize.py, kernels/int8_mm.py) against the
reference, bit for bit.

Both kernels are exact by construction (pyfast/formats.py): quantize_per_token
does IEEE float32 divisions and round-half-to-even; int8_mm accumulates in int32
and runs the reference's float32 epilogue in the same order with no fma
contraction. So every comparison here is exact: int8 and float32 outputs
bit-identical (NaN compared as NaN), fp16/bf16 outputs equal to the reference's
float32 result rounded once. On CPU the kernels run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1 without a GPU); the cuda variants compile them.
"""
import pytest
import torch

import pyfast
from pyfast import ops, reference
from _helpers import FLOAT_DTYPES, assert_bits_equal, dtype_id

from pyfast.kernels.int8_mm import int8_mm as triton_int8_mm
from pyfast.kernels.quantize import quantize_per_token as triton_quantize
from pyfast.kernels.quantize import quantize_static as triton_quantize_static

MS, KS, NS = (0, 1, 3, 17), (5, 64, 100), (7, 33, 130)
def check_quantize(x: torch.Tensor) -> None:
    rq, rs = reference.quantize_per_token(x.cpu())
    q, s = triton_quantize(x)
    assert q.device == x.device and s.device == x.device
    assert_bits_equal(q, rq)
    assert_bits_equal(s, rs)


# --- quantize_per_token -------------------------------------------------------------

def special_rows(k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that test each rule: zeros, NaN, +-inf, subnormals, exact .5 ties."""
    rows = torch.randn(8, k) * 3
    rows[0] = 0.0                                    # all zero: scale 1.0, q 0
    rows[1, k // 2] = float("nan")                   # NaN row: scale NaN, q 0
    rows[2, 0] = float("inf")                        # inf row: scale inf, q 0
    rows[3, -1] = -float("inf")
    tiny = torch.finfo(dtype).tiny                   # smallest normal of the dtype
    rows[4] = tiny * torch.linspace(-0.9, 0.5, k)    # subnormal inputs
    rows[5] = 1e-44                                  # float32 amax / 127 underflows: scale 1.0
    # amax 127 gives scale exactly 1.0, so q = rne(x): ties round to even
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5])
    rows[6] = ties.repeat(k // ties.numel() + 1)[:k]
    rows[6, 0] = 127.0
    rows[7] = -rows[6]                               # symmetric: -x quantizes to -q
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_quantize_random(m, k, dtype):
    check_quantize((torch.randn(m, k) * 4).to(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", KS)
def test_quantize_special_rows(k, dtype):
    check_quantize(special_rows(k, dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_non_contiguous(dtype):
    base = (torch.randn(40, 70) * 2).to(dtype)
    check_quantize(base.T)                    # column-major: stride (1, 40)
    check_quantize(base[::3, 1::2])           # strided rows and columns
    check_quantize(base[:5].expand(3, 5, 70)[1])  # a view with offset rows


def test_quantize_long_rows():
    # K beyond one block (2048) in both passes; the row maximum sits in a later block.
    x = torch.randn(3, 5001)
    x[1, 4500] = 50.0
    x[2, 4999] = float("nan")
    check_quantize(x)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_through_dispatch(dtype):
    x = special_rows(33, dtype)
    with pyfast.use_backend(quantize_per_token="triton"):
        q, s = ops.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert_bits_equal(q, rq)
    assert_bits_equal(s, rs)


# --- quantize_static ----------------------------------------------------------------

def check_static(x: torch.Tensor, scale: float) -> None:
    s = torch.tensor([scale], device=x.device)
    rq, rs = reference.quantize_static(x.cpu(), s.cpu())
    q, rows = triton_quantize_static(x, s)
    assert q.device == x.device and rows.device == x.device
    assert_bits_equal(q, rq)
    assert torch.equal(rows.isnan(), rs.isnan())
    assert torch.equal(rows.nan_to_num(), rs.nan_to_num())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k", KS + (0,))
@pytest.mark.parametrize("m", MS)
def test_quantize_static_random(m, k, dtype):
    check_static((torch.randn(m, k) * 4).to(dtype), 0.0173)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_quantize_static_special_rows_and_ties(dtype):
    """special_rows (zeros, NaN row -> row scale NaN and q 0, +-inf -> +-127, subnormals)
    at scale 1: the .5 ties round to even; at 0.01 most values clip."""
    x = special_rows(33, dtype)
    check_static(x, 1.0)
    check_static(x, 0.01)
    q, _ = triton_quantize_static(x, torch.tensor([1.0]))
    assert q[6, 1:4].tolist() == [0, 2, 2] and q[2, 0].item() == 127


def test_quantize_static_long_strided_rows_and_dispatch():
    x = torch.randn(3, 2 * 5001)[:, ::2] * 30        # K beyond one block, strided columns
    x[2, 4999] = float("nan")
    check_static(x, 0.05)
    with pyfast.use_backend(quantize_static="triton"):
        q, s = ops.quantize_static(x, torch.tensor([0.05]))
    rq, rs = reference.quantize_static(x, torch.tensor([0.05]))
    assert_bits_equal(q, rq)
    assert s[2].isnan() and torch.equal(s[:2], rs[:2])


# --- int8_mm ------------------------------------------------------------------------

def mm_inputs(m, k, n, device="cpu", scale_dtype=torch.float32, bias_dtype=torch.float32,
              with_bias=True):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    a_scale = (torch.rand(m, device=device) * 0.05 + 1e-3).to(scale_dtype)
    b_scale = (torch.rand(n, device=device) * 0.02 + 1e-4).to(scale_dtype)
    bias = (torch.randn(n, device=device) * 10).to(bias_dtype) if with_bias else None
    return a, b, a_scale, b_scale, bias


def check_int8_mm(a, b, a_scale, b_scale, bias, out_dtype):
    ref = reference.int8_mm(a.cpu(), b.cpu(), a_scale.cpu(), b_scale.cpu(),
                            None if bias is None else bias.cpu(),
                            torch.float32 if out_dtype is None else out_dtype)
    out = triton_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    assert out.device == a.device
    assert_bits_equal(out, ref)


@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_int8_mm(m, k, n, out_dtype, with_bias):
    check_int8_mm(*mm_inputs(m, k, n, with_bias=with_bias), out_dtype)


def test_int8_mm_out_dtype_none_is_float32():
    check_int8_mm(*mm_inputs(3, 64, 33), None)


@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", FLOAT_DTYPES, ids=dtype_id)
def test_int8_mm_scale_and_bias_dtypes(scale_dtype, bias_dtype):
    check_int8_mm(*mm_inputs(17, 100, 130, scale_dtype=scale_dtype, bias_dtype=bias_dtype),
                  torch.bfloat16)


def test_int8_mm_non_contiguous():
    a, b, a_scale, b_scale, bias = mm_inputs(17, 100, 33)
    a_t = a.T.contiguous().T                       # column-major a
    b_t = b.T.contiguous().T                       # b as the transpose of a [K, N] tensor
    wide_scale = torch.rand(130)[::2][:33]         # strided scale vectors and bias
    wide_bias = torch.randn(99)[::3]
    for out_dtype in FLOAT_DTYPES:
        check_int8_mm(a_t, b_t, a_scale, wide_scale, wide_bias, out_dtype)
        check_int8_mm(a[:, ::2], b[:, ::2], a_scale, b_scale, bias, out_dtype)


def test_int8_mm_extremes():
    # The largest K the op accepts, every product 128 * 128: the int32 sum is
    # 2147467264, one int32 step from overflow, and must come back exact.
    k = ops.MAX_INT8_K
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    b[1] = 127
    ones = torch.ones(3)
    check_int8_mm(a, b, torch.ones(2), ones, None, torch.float32)


def test_int8_mm_special_scales():
    a, b, a_scale, b_scale, bias = mm_inputs(5, 64, 33)
    a_scale[1] = float("nan")          # a NaN row of activations reaches its output row
    a_scale[2] = 1e-36                 # with b_scale 1e-8: subnormal results (no flush to zero)
    b_scale[3] = 1e-8
    bias[3] = 0.0
    a_scale[3] = 3e38                  # overflow to inf in float32, cast on to fp16/bf16
    bias[4] = float("inf")
    for out_dtype in FLOAT_DTYPES:
        for with_bias in (bias, None):
            check_int8_mm(a, b, a_scale, b_scale, with_bias, out_dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_int8_mm_subnormal_half_scales_and_bias(dtype):
    # fp16/bf16 subnormal scales and bias widen exactly to float32.
    a, b, a_scale, b_scale, bias = mm_inputs(3, 64, 33, scale_dtype=dtype, bias_dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    a_scale[0] = tiny * 0.375
    b_scale[:5] = torch.tensor([0.5, 0.25, 0.125, 0.9, 0.01]) * tiny
    bias[5:9] = torch.tensor([-0.5, 0.75, 0.03, 0.001]) * tiny
    for out_dtype in FLOAT_DTYPES:
        check_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
def test_int8_mm_through_dispatch(out_dtype):
    a, b, a_scale, b_scale, bias = mm_inputs(17, 100, 130)
    with pyfast.use_backend(int8_mm="triton"):
        out = ops.int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    assert_bits_equal(out, reference.int8_mm(a, b, a_scale, b_scale, bias, out_dtype))


def test_quantize_then_int8_mm_matches_reference_pipeline():
    # The W8A8 path as a layer runs it: quantize the activations, then int8_mm.
    x = torch.randn(17, 100, dtype=torch.float16)
    w_q, w_s = reference.quantize_rows_int8(torch.randn(130, 100))
    bias = torch.randn(130, dtype=torch.float16)
    with pyfast.use_backend(quantize_per_token="triton", int8_mm="triton"):
        q, s = ops.quantize_per_token(x)
        out = ops.int8_mm(q, w_q, s, w_s, bias, torch.float16)
    rq, rs = reference.quantize_per_token(x)
    assert_bits_equal(out, reference.int8_mm(rq, w_q, rs, w_s, bias, torch.float16))


# --- w8a8_mm: the two kernels behind one op (kernels/int8_mm.py: w8a8_mm) ---------------

def check_w8a8(x, w, w_scale, bias):
    from pyfast.kernels.int8_mm import w8a8_mm as triton_w8a8_mm
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    want = reference.w8a8_mm(x.cpu(), w.cpu(), w_scale.cpu(), cpu(bias))
    out = triton_w8a8_mm(x, w, w_scale, bias)
    assert out.dtype == x.dtype and out.device == x.device
    assert_bits_equal(out, want)
    with pyfast.use_backend(w8a8_mm="triton"):
        assert_bits_equal(ops.w8a8_mm(x, w, w_scale, bias), want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k, n", [(1, 5, 7), (3, 64, 33), (17, 100, 130)])
def test_w8a8_mm(m, k, n, dtype):
    x = (torch.randn(m, k) * 3).to(dtype)
    w_q, w_s = reference.quantize_rows_int8(torch.randn(n, k))
    check_w8a8(x, w_q, w_s, None)
    check_w8a8(x, w_q, w_s, torch.randn(n).to(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_w8a8_mm_special_rows(dtype):
    x = special_rows(64, dtype)
    w_q, w_s = reference.quantize_rows_int8(torch.randn(33, 64))
    check_w8a8(x, w_q, w_s, torch.randn(33).to(dtype))


# --- on the GPU: the compiled kernels (skipped without one) -------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k", [(1, 5), (17, 100), (33, 4096), (300, 5001)])
def test_quantize_cuda(m, k, dtype):
    x = torch.randn(m, k, device="cuda").to(dtype) * 4
    check_quantize(x)
    check_quantize(special_rows(k, dtype).cuda())
    check_quantize(x.T.contiguous().T)


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k, n", [(1, 5, 7), (3, 100, 130), (16, 4096, 4096),
                                     (17, 4095, 1000), (300, 1024, 2049), (1024, 512, 768)])
def test_int8_mm_cuda(m, k, n, out_dtype):
    # Large enough that an fma-contracted epilogue would differ somewhere.
    for with_bias in (False, True):
        check_int8_mm(*mm_inputs(m, k, n, device="cuda", with_bias=with_bias), out_dtype)


@pytest.mark.cuda
def test_int8_mm_cuda_special_and_strided():
    a, b, a_scale, b_scale, bias = mm_inputs(5, 64, 33, device="cuda")
    a_scale[1] = float("nan")
    a_scale[2] = 1e-36
    b_scale[3] = 1e-8
    bias[3] = 0.0
    bias[4] = float("inf")
    for out_dtype in FLOAT_DTYPES:
        for with_bias in (bias, None):
            check_int8_mm(a, b, a_scale, b_scale, with_bias, out_dtype)
            check_int8_mm(a.T.contiguous().T, b.T.contiguous().T, a_scale, b_scale, with_bias,
                          out_dtype)


@pytest.mark.cuda
def test_int8_mm_cuda_max_k():
    k = ops.MAX_INT8_K
    a = torch.full((2, k), -128, dtype=torch.int8, device="cuda")
    b = torch.full((3, k), -128, dtype=torch.int8, device="cuda")
    b[1] = 127
    ones = torch.ones(3, device="cuda")
    check_int8_mm(a, b, torch.ones(2, device="cuda"), ones, None, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k, n", [(1, 5, 7), (16, 4096, 4096), (300, 1024, 2049)])
def test_w8a8_mm_cuda(m, k, n, dtype):
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    w_q, w_s = reference.quantize_rows_int8(torch.randn(n, k, device="cuda"))
    check_w8a8(x, w_q, w_s, torch.randn(n, device="cuda").to(dtype))
    check_w8a8(special_rows(k, dtype).cuda(), w_q, w_s, None)
