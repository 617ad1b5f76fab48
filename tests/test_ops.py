"""Every op through torch.ops.pyfast and pyfast.ops, every usable backend forced in
turn, against the reference; opcheck on every op; the dispatch rule branch by branch.

Tolerances (stated once, used below):
  * exact where the arithmetic is exact: quantize_per_token (int8 values and float32
    scales), pack_int4, pack_lowbit and sparse24_compress (element-wise formulas of
    formats.py),
    int8_mm with float32 out (int32 accumulation, float32 epilogue in a fixed order);
  * int8_mm with float16/bfloat16 out: one ulp of the output dtype (a kernel whose
    float32 epilogue rounds differently by one float32 ulp can flip the final cast);
  * float matmuls (int8_weight_mm, int4_mm, lowbit_mm, sparse24_mm): twice the error PyTorch's
    own F.linear makes in the same dtype against float64, plus one ulp of the largest
    output (FlashAttention's rule; tests/_helpers.py: linear_tolerance).
"""
import json
from pathlib import Path

import pytest
import torch

import pyfast
from pyfast import dispatch, ops, reference
from conftest import DEVICES
from _helpers import (FLOAT_DTYPES, assert_within, decompress24, dequant_int4,
                      dequant_sparse24_int4, dtype_id,
                      linear_tolerance, random_24, run_forced, slice_bound, strided, transposed,
                      usable_families)

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]
MS = [pytest.param(m, id=f"M{m}") for m in (0, 1, 3, 17, 128)]
BIAS = [pytest.param(False, id="nobias"), pytest.param(True, id="bias")]
# (K, N): odd N everywhere, K unaligned to 16 where the format allows it
KN_DENSE = [pytest.param(64, 33, id="K64-N33"), pytest.param(96, 7, id="K96-N7"),
            pytest.param(256, 130, id="K256-N130"), pytest.param(50, 3, id="K50-N3")]
KN_24 = [pytest.param(64, 33, id="K64-N33"), pytest.param(96, 7, id="K96-N7"),
         pytest.param(256, 130, id="K256-N130"), pytest.param(20, 5, id="K20-N5")]
# (K, N, group_size): every group size, K a multiple of it
KNG_INT4 = [pytest.param(64, 33, 32, id="K64-N33-g32"), pytest.param(192, 7, 64, id="K192-N7-g64"),
            pytest.param(256, 130, 128, id="K256-N130-g128"),
            pytest.param(96, 9, -1, id="K96-N9-gchannel")]


def _bias(n, dtype, device, on):
    return torch.randn(n, device=device).to(dtype) if on else None


def _one_ulp_close(out, ref):
    """|out - ref| <= one ulp of ref in its dtype (see module docstring)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.numel():
        tol = torch.finfo(ref.dtype).eps * ref.double().abs() + torch.finfo(ref.dtype).tiny
        assert bool(((out.double() - ref.double()).abs() <= tol).all())


def _slice_tol(x, w64, who):
    """What the CPU int8-slice kernels (int4_mm and sparse24_int4_mm at M = 1 with float x,
    the cpp backend and the default rule on CPU) may add to PyTorch's float32 error: they
    hold x as 24-bit fixed point per 8-column lane, whose representation error is at most
    slice_bound (tests/_helpers.py; csrc/cpu/weight_only_slices.cpp, accuracy)."""
    if x.device.type == "cpu" and x.shape[0] == 1 and who in ("cpp", "default", "pyfast.ops"):
        return slice_bound(x.float(), w64)
    return 0.0


def _every_backend(op, device, args, compare):
    """Run op(*args) with each usable backend forced, and with the default rule."""
    families = usable_families(op, device)
    assert "reference" in families
    for family in families:
        compare(run_forced(op, family, *args), family)
    compare(getattr(torch.ops.pyfast, op)(*args), "default")


# --- quantize_per_token -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 33, 256], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_per_token(device, m, k, dtype):
    x = (torch.randn(m, k) * 10).to(dtype).to(device)
    if m > 2:
        x[1] = 0
        x[2] = -3.5
    ref_q, ref_s = reference.quantize_per_token(x)

    def compare(got, who):
        q, s = got
        assert torch.equal(q, ref_q), who
        assert torch.equal(s, ref_s), who

    _every_backend("quantize_per_token", device, (x,), compare)
    compare(ops.quantize_per_token(x), "pyfast.ops")


# --- quantize_static ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_static(device, m, dtype):
    """Against an independent float64 oracle: clip to +-127 steps, round half to even."""
    x = (torch.randn(m, 33) * 3).to(dtype).to(device)
    if m > 2:
        x[1, 5] = float("nan")
        x[2] = 1e4        # far beyond the calibrated range: clips to 127
    scale = torch.tensor([0.0173], device=device)
    xd = x.double().nan_to_num(0.0)
    want_q = torch.round(xd / scale.double()).clamp(-127, 127).to(torch.int8)
    want_s = torch.full((m,), 0.0173, device=device)
    if m > 2:
        want_s[1] = float("nan")

    def compare(got, who):
        q, s = got
        assert torch.equal(q, want_q), who
        assert torch.allclose(s, want_s, equal_nan=True, rtol=0, atol=0), who

    _every_backend("quantize_static", device, (x, scale), compare)
    compare(ops.quantize_static(x, scale), "pyfast.ops")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_quantize_static_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match=f"scale must be a positive finite float32, got {bad}"):
        ops.quantize_static(torch.randn(2, 4), torch.tensor([bad]))


def test_quantize_static_wrapper_on_meta_and_compiled():
    """The wrapper's host read of the scale failed on meta tensors (Tensor.item) and under
    torch.compile(fullgraph=True) (a data-dependent guard); it is skipped there."""
    x, scale = torch.randn(3, 8), torch.tensor([0.05])
    q, s = ops.quantize_static(x.to("meta"), scale.to("meta"))
    assert q.shape == (3, 8) and q.dtype == torch.int8 and s.shape == (3,)
    torch._dynamo.reset()
    got = torch.compile(ops.quantize_static, fullgraph=True)(x, scale)
    for g, e in zip(got, ops.quantize_static(x, scale)):
        assert torch.equal(g, e)


# --- int8_mm -----------------------------------------------------------------------------

def _int8(shape, device):
    return torch.randint(-128, 128, shape, dtype=torch.int8).to(device)


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("out_dtype", [None] + DTYPES, ids=lambda d: f"out-{d}")
@pytest.mark.parametrize("k,n", KN_DENSE)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_int8_mm(device, m, k, n, out_dtype, bias):
    a, b = _int8((m, k), device), _int8((n, k), device)
    a_scale = (torch.rand(m) / 100).to(device)
    b_scale = (torch.rand(n) / 100).to(device)
    bias_t = _bias(n, torch.float32, device, bias)
    args = (a, b, a_scale, b_scale, bias_t, out_dtype)
    ref = reference.int8_mm(a, b, a_scale, b_scale, bias_t, out_dtype or torch.float32)
    assert ref.dtype == (out_dtype or torch.float32)

    def compare(out, who):
        if ref.dtype == torch.float32:
            assert torch.equal(out, ref), who
        else:
            _one_ulp_close(out, ref)

    _every_backend("int8_mm", device, args, compare)
    compare(ops.int8_mm(*args[:5], out_dtype=out_dtype or torch.float32), "pyfast.ops")


@pytest.mark.parametrize("device", DEVICES)
def test_int8_mm_float16_scales_and_bias(device):
    a, b = _int8((5, 64), device), _int8((9, 64), device)
    a_scale = torch.rand(5, device=device).half()
    b_scale = torch.rand(9, device=device).bfloat16()
    bias_t = torch.randn(9, device=device).half()
    ref = reference.int8_mm(a, b, a_scale, b_scale, bias_t, torch.float32)

    def compare(out, who):
        assert torch.equal(out, ref), who

    _every_backend("int8_mm", device, (a, b, a_scale, b_scale, bias_t, None), compare)


@pytest.mark.parametrize("out_dtype", [None] + DTYPES, ids=lambda d: f"out-{d}")
@pytest.mark.parametrize("k,n", KN_DENSE)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_int8_mm_vnni(device, m, k, n, out_dtype):
    """int8_mm on the VNNI-repacked weight: every backend equals int8_mm on the [N, K]
    weight (float32 out bit for bit; float16/bfloat16 out within one ulp, as int8_mm);
    float16/bfloat16 scales and bias are taken as int8_mm takes them."""
    a, b = _int8((m, k), device), _int8((n, k), device)
    a_scale = (torch.rand(m) / 100).to(device).half()
    b_scale = (torch.rand(n) / 100).to(device)
    bias_t = torch.randn(n, device=device).bfloat16()
    ref = reference.int8_mm(a, b, a_scale, b_scale, bias_t, out_dtype or torch.float32)

    def compare(out, who):
        if ref.dtype == torch.float32:
            assert torch.equal(out, ref), who
        else:
            _one_ulp_close(out, ref)

    args = (a, ops.repack_int8_vnni(b), a_scale, b_scale, bias_t, out_dtype)
    _every_backend("int8_mm_vnni", device, args, compare)
    compare(ops.int8_mm_vnni(*args[:5], out_dtype=out_dtype or torch.float32), "pyfast.ops")


# --- w8a8_mm ------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", KN_DENSE)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_w8a8_mm(device, m, k, n, dtype, bias):
    """The fused op against its definition: quantize_per_token, then int8_mm with
    out_dtype x.dtype (both references). Rows with a zero, a NaN and one huge value
    exercise the scale rules; exact in float32, one ulp in float16/bfloat16 (the
    rule of int8_mm's half outputs)."""
    x = (torch.randn(m, k) * 4).to(dtype).to(device)
    if m > 2:
        x[0] = 0
        x[1, 3] = float("nan")
        x[2, 5] = 3e4
    w8, w_scale = _int8((n, k), device), (torch.rand(n) / 100).to(device)
    bias_t = _bias(n, dtype, device, bias)
    q, q_scale = reference.quantize_per_token(x)
    ref = reference.int8_mm(q, w8, q_scale, w_scale, bias_t, dtype)
    assert torch.equal(reference.w8a8_mm(x, w8, w_scale, bias_t).nan_to_num(7.0),
                       ref.nan_to_num(7.0))

    def compare(out, who):
        assert out.dtype == dtype and out.shape == (m, n), who
        if m > 2:   # the NaN row stays NaN, and only that row
            assert bool(out[1].isnan().all()) and not bool(out[[0, 2]].isnan().any()), who
        if dtype == torch.float32:
            assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0)), who
        else:
            _one_ulp_close(out.nan_to_num(7.0), ref.nan_to_num(7.0))

    _every_backend("w8a8_mm", device, (x, w8, w_scale, bias_t), compare)
    compare(ops.w8a8_mm(x, w8, w_scale, bias_t), "pyfast.ops")


# --- int8_weight_mm ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", KN_DENSE)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_int8_weight_mm(device, m, k, n, dtype, bias):
    x = torch.randn(m, k).to(dtype).to(device)
    w = _int8((n, k), device)
    w_scale = (torch.rand(n) / 100).to(device)
    bias_t = _bias(n, dtype, device, bias)
    args = (x, w, w_scale, bias_t)
    ref = reference.int8_weight_mm(*args)
    # A kernel may apply the scale before the dot (dequantized weight) or after it
    # (x @ w_int8, then * w_scale): allow PyTorch's own error for either order.
    tol = (linear_tolerance(x.cpu(), (w.double() * w_scale.double()[:, None]).cpu(),
                            None if bias_t is None else bias_t.cpu(), dtype)
           + linear_tolerance(x.cpu(), w.double().cpu(), None, dtype) * float(w_scale.max()))
    compare = lambda out, who: assert_within(out, ref, tol, who)  # noqa: E731
    _every_backend("int8_weight_mm", device, args, compare)
    compare(ops.int8_weight_mm(*args), "pyfast.ops")


# --- pack_int4 / int4_mm ---------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,group_size", KNG_INT4)
@pytest.mark.parametrize("device", DEVICES)
def test_pack_int4(device, k, n, group_size, dtype, symmetric):
    w = torch.randn(n, k).to(dtype).to(device)
    w[0] = 0
    ref = reference.pack_int4(w, group_size, symmetric)

    def compare(got, who):
        for name, g, r in zip(("packed", "scales", "zeros"), got, ref):
            assert torch.equal(g, r), f"{who}: {name}"

    _every_backend("pack_int4", device, (w, group_size, symmetric), compare)
    compare(ops.pack_int4(w, group_size, symmetric), "pyfast.ops")


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,group_size", KNG_INT4)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_int4_mm(device, m, k, n, group_size, dtype, bias):
    x = torch.randn(m, k).to(dtype).to(device)
    w = torch.randn(n, k).to(device)
    packed, scales, zeros = ops.pack_int4(w, group_size, symmetric=bool(n % 2))
    bias_t = _bias(n, dtype, device, bias)
    args = (x, packed, scales, zeros, group_size, bias_t)
    ref = reference.int4_mm(*args)
    w64 = dequant_int4(packed, scales, zeros, group_size).cpu()
    tol = linear_tolerance(x.cpu(), w64, None if bias_t is None else bias_t.cpu(), dtype)
    compare = lambda out, who: assert_within(out, ref, tol + _slice_tol(x, w64, who), who)  # noqa: E731
    _every_backend("int4_mm", device, args, compare)
    compare(ops.int4_mm(*args), "pyfast.ops")


# --- sparse24 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", KN_24)
@pytest.mark.parametrize("device", DEVICES)
def test_sparse24_compress(device, k, n, dtype):
    w = random_24(n, k, dtype, device)
    ref_v, ref_m = reference.sparse24_compress(w)

    def compare(got, who):
        assert torch.equal(got[0], ref_v), f"{who}: values"
        assert torch.equal(got[1], ref_m), f"{who}: meta"
        assert torch.equal(decompress24(*got), w), f"{who}: round trip"

    _every_backend("sparse24_compress", device, (w,), compare)
    compare(ops.sparse24_compress(w), "pyfast.ops")


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", KN_24)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_sparse24_mm(device, m, k, n, dtype, bias):
    x = torch.randn(m, k).to(dtype).to(device)
    values, meta = ops.sparse24_compress(random_24(n, k, dtype, device))
    bias_t = _bias(n, dtype, device, bias)
    args = (x, values, meta, bias_t)
    ref = reference.sparse24_mm(*args)
    w64 = decompress24(values, meta).double().cpu()
    tol = linear_tolerance(x.cpu(), w64, None if bias_t is None else bias_t.cpu(), dtype)
    compare = lambda out, who: assert_within(out, ref, tol, who)  # noqa: E731
    _every_backend("sparse24_mm", device, args, compare)
    compare(ops.sparse24_mm(*args), "pyfast.ops")


# --- pack_sparse24_int4 / sparse24_int4_mm ---------------------------------------------------

# (K, N, group_size): every group size; K = 40 is a multiple of 8 but not of 16
KNG_24_INT4 = [pytest.param(64, 33, 32, id="K64-N33-g32"),
               pytest.param(192, 7, 64, id="K192-N7-g64"),
               pytest.param(256, 130, 128, id="K256-N130-g128"),
               pytest.param(40, 5, -1, id="K40-N5-gchannel")]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,group_size", KNG_24_INT4)
@pytest.mark.parametrize("device", DEVICES)
def test_pack_sparse24_int4(device, k, n, group_size, dtype, symmetric):
    """Exact against an independent oracle: the dense weight it stores is int4's
    dequantized 2:4 weight (pruned zeros do not change a group's scale or zero)."""
    w = random_24(n, k, dtype, device)
    w[0] = 0
    ref = reference.pack_sparse24_int4(w, group_size, symmetric)
    want = dequant_int4(*ops.pack_int4(w, group_size, symmetric), group_size)

    def compare(got, who):
        for name, g, r in zip(("packed", "meta", "scales", "zeros"), got, ref):
            assert torch.equal(g, r), f"{who}: {name}"
        assert torch.equal(dequant_sparse24_int4(*got, group_size), want), who

    _every_backend("pack_sparse24_int4", device, (w, group_size, symmetric), compare)
    compare(ops.pack_sparse24_int4(w, group_size, symmetric), "pyfast.ops")


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,group_size", KNG_24_INT4)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("device", DEVICES)
def test_sparse24_int4_mm(device, m, k, n, group_size, dtype, bias):
    x = torch.randn(m, k).to(dtype).to(device)
    packed = ops.pack_sparse24_int4(random_24(n, k, device=device), group_size,
                                    symmetric=bool(n % 2))
    bias_t = _bias(n, dtype, device, bias)
    args = (x, *packed, group_size, bias_t)
    ref = reference.sparse24_int4_mm(*args)
    w64 = dequant_sparse24_int4(*packed, group_size).cpu()
    tol = linear_tolerance(x.cpu(), w64, None if bias_t is None else bias_t.cpu(), dtype)
    compare = lambda out, who: assert_within(out, ref, tol + _slice_tol(x, w64, who), who)  # noqa: E731
    _every_backend("sparse24_int4_mm", device, args, compare)
    compare(ops.sparse24_int4_mm(*args), "pyfast.ops")


# --- non-contiguous inputs -----------------------------------------------------------------

def _noncontiguous_cases(device, dtype):
    m, k, n = 17, 64, 33
    x = torch.randn(m, k).to(dtype).to(device)
    a, b = _int8((m, k), device), _int8((n, k), device)
    a_s, b_s = torch.rand(m, device=device) / 100, torch.rand(n, device=device) / 100
    w8, w8_s = _int8((n, k), device), torch.rand(n, device=device) / 100
    w = torch.randn(n, k).to(dtype).to(device)
    p4 = ops.pack_int4(torch.randn(n, k, device=device), 32, False)
    p2 = ops.pack_lowbit(torch.randn(n, k, device=device), 2, 32)
    w24 = random_24(n, k, dtype, device)
    v, mt = ops.sparse24_compress(w24)
    s4 = ops.pack_sparse24_int4(w24, 32, False)
    bias = torch.randn(n, device=device).to(dtype)
    return {
        "quantize_per_token": ((x,), (0,)),
        "quantize_static": ((x, torch.tensor([0.02], device=device)), (0,)),
        "int8_mm": ((a, b, a_s, b_s, bias.float(), None), (0, 1)),
        "int8_weight_mm": ((x, w8, w8_s, bias), (0, 1)),
        "w8a8_mm": ((x, w8, w8_s, bias), (0, 1)),
        "pack_int4": ((w, 32, True), (0,)),
        "int4_mm": ((x,) + tuple(p4) + (32, bias), (0, 1, 2, 3)),
        "pack_lowbit": ((w, 1, 32), (0,)),
        "lowbit_mm": ((x,) + tuple(p2) + (2, 32, bias), (0, 1, 2, 3)),
        "sparse24_compress": ((w24,), (0,)),
        "sparse24_mm": ((x, v, mt, bias), (0, 1, 2)),
        "pack_sparse24_int4": ((w24, 64, True), (0,)),
        "sparse24_int4_mm": ((x, *s4, 32, bias), (0, 1, 2, 3, 4)),
        "repack_int4_tc": ((p4[0],), (0,)),
        # the repacked tensors have one fixed layout (made by the repack ops): contiguous
        "int4_mm_tc": ((x, ops.repack_int4_tc(p4[0])) + tuple(p4[1:]) + (32, bias), (0, 2, 3)),
        "repack_int4_ksplit": ((p4[0], 2, 32), (0,)),
        "int4_mm_ksplit": ((x, ops.repack_int4_ksplit(p4[0], 2, 32)) + tuple(p4[1:]) + (32, bias),
                           (0, 2, 3)),
        "repack_sparse24_tc": ((mt,), (0,)),
        "sparse24_mm_tc": ((x, v, ops.repack_sparse24_tc(mt), bias), (0, 1)),
        "repack_sparse24_int4_tc": ((s4[0], s4[1]), (0, 1)),
        "sparse24_int4_mm_tc": ((x, *ops.repack_sparse24_int4_tc(*s4[:2]), *s4[2:], 32, bias),
                                (0, 3, 4)),
        "repack_int8_vnni": ((w8,), (0,)),
        "w8a8_mm_vnni": ((x, ops.repack_int8_vnni(w8), w8_s, bias), (0,)),
        "int8_mm_vnni": ((a, ops.repack_int8_vnni(w8), a_s, w8_s, bias.float(), None), (0,)),
    }


# Ops whose every backend must be bit-exact: integer arithmetic, or float32 steps in
# an order the format fixes (int8_mm's epilogue). Float matmuls may sum in any order.
BIT_EXACT_OPS = ("quantize_per_token", "quantize_static", "int8_mm", "w8a8_mm", "w8a8_mm_vnni",
                 "int8_mm_vnni", "pack_int4", "pack_lowbit", "sparse24_compress",
                 "pack_sparse24_int4")


def _same(got, ref, dtype, op):
    if isinstance(ref, tuple):
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
    elif ref.dtype == torch.float32 and op in BIT_EXACT_OPS:
        assert torch.equal(got, ref)
    else:  # a float32-accumulating matmul in another order: a few ulps of the output
        tol = 4 * torch.finfo(dtype).eps * (ref.double().abs().max().item() + 1)
        assert_within(got, ref, tol)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("which", ["x", "all"], ids=["x-only", "all-tensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", sorted(ops.SCHEMAS))
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device, op, dtype, which, layout):
    args, tensor_positions = _noncontiguous_cases(device, dtype)[op]
    with pyfast.use_backend(**{op: "reference"}):
        ref = getattr(torch.ops.pyfast, op)(*args)
    make = strided if layout == "sliced" else transposed
    positions = tensor_positions[:1] if which == "x" else tensor_positions
    nc = tuple(make(a) if i in positions else a for i, a in enumerate(args))
    for family in usable_families(op, device):
        _same(run_forced(op, family, *nc), ref, dtype, op)
    _same(getattr(torch.ops.pyfast, op)(*nc), ref, dtype, op)


# --- opcheck: schema, fake, autograd registration, aot dispatch ----------------------------

def _opcheck_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=g)
    a = torch.randint(-128, 128, (5, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (7, 64), dtype=torch.int8, generator=g)
    s5, s7 = torch.rand(5, generator=g), torch.rand(7, generator=g)
    w = torch.randn(7, 64, generator=g)
    p32 = reference.pack_int4(w, 32, True)
    pch = reference.pack_int4(w, -1, False)
    l2 = reference.pack_lowbit(w, 2, 32)
    l1 = reference.pack_lowbit(w, 1, -1)
    v, m = reference.sparse24_compress(random_24(7, 64, gen=g))
    vh, mh = reference.sparse24_compress(random_24(7, 64, torch.float16, gen=g))
    w24 = random_24(7, 64, gen=g)
    s32 = reference.pack_sparse24_int4(w24, 32, True)
    sch = reference.pack_sparse24_int4(w24, -1, False)
    return [
        ("quantize_per_token", (x,)),
        ("quantize_per_token", (x[:0].bfloat16(),)),
        ("quantize_static", (x, torch.tensor([0.01]))),
        ("quantize_static", (x[:3].half(), torch.tensor([0.5]))),
        ("int8_mm", (a, b, s5, s7, None, None)),
        ("int8_mm", (a, b, s5, s7, torch.randn(7), torch.bfloat16)),
        ("w8a8_mm", (x, b, s7, None)),
        ("w8a8_mm", (x.bfloat16(), b, s7, torch.randn(7).bfloat16())),
        ("int8_weight_mm", (x, b, s7, None)),
        ("int8_weight_mm", (x.half(), b, s7, torch.randn(7).half())),
        ("pack_int4", (w, 32, True)),
        ("pack_int4", (w.bfloat16(), -1, False)),
        ("int4_mm", (x, *p32, 32, None)),
        ("int4_mm", (x.bfloat16(), *pch, -1, torch.randn(7).bfloat16())),
        ("pack_lowbit", (w, 2, 32)),
        ("pack_lowbit", (w.half(), 1, -1)),
        ("lowbit_mm", (x, *l2, 2, 32, None)),
        ("lowbit_mm", (x.bfloat16(), *l1, 1, -1, torch.randn(7).bfloat16())),
        ("sparse24_compress", (random_24(7, 64, gen=g),)),
        ("sparse24_compress", (random_24(3, 20, torch.float16, gen=g),)),
        ("sparse24_mm", (x, v, m, None)),
        ("sparse24_mm", (x.half(), vh, mh, torch.randn(7).half())),
        ("pack_sparse24_int4", (w24, 32, True)),
        ("pack_sparse24_int4", (w24.bfloat16(), -1, False)),
        ("sparse24_int4_mm", (x, *s32, 32, None)),
        ("sparse24_int4_mm", (x.half(), *sch, -1, torch.randn(7).half())),
        ("repack_int4_tc", (p32[0],)),
        ("repack_int4_tc", (pch[0],)),
        ("int4_mm_tc", (x, reference.repack_int4_tc(p32[0]), *p32[1:], 32, None)),
        ("int4_mm_tc", (x.bfloat16(), reference.repack_int4_tc(pch[0]), *pch[1:], -1,
                        torch.randn(7).bfloat16())),
        ("repack_int4_ksplit", (p32[0], 2, 32)),
        ("repack_int4_ksplit", (pch[0], 2, -1)),
        ("int4_mm_ksplit", (x, reference.repack_int4_ksplit(p32[0], 2, 32), *p32[1:], 32, None)),
        ("int4_mm_ksplit", (x.bfloat16(), reference.repack_int4_ksplit(pch[0], 2, -1), *pch[1:],
                            -1, torch.randn(7).bfloat16())),
        ("repack_sparse24_tc", (m,)),
        ("repack_sparse24_tc", (mh,)),
        ("sparse24_mm_tc", (x, v, reference.repack_sparse24_tc(m), None)),
        ("sparse24_mm_tc", (x.half(), vh, reference.repack_sparse24_tc(mh),
                            torch.randn(7).half())),
        ("repack_sparse24_int4_tc", s32[:2]),
        ("repack_sparse24_int4_tc", sch[:2]),
        ("sparse24_int4_mm_tc", (x, *reference.repack_sparse24_int4_tc(*s32[:2]), *s32[2:], 32,
                                 None)),
        ("sparse24_int4_mm_tc", (x.half(), *reference.repack_sparse24_int4_tc(*sch[:2]),
                                 *sch[2:], -1, torch.randn(7).half())),
        ("repack_int8_vnni", (b,)),
        ("repack_int8_vnni", (a[:, :13],)),
        ("w8a8_mm_vnni", (x, reference.repack_int8_vnni(b), s7, None)),
        ("w8a8_mm_vnni", (x.bfloat16(), reference.repack_int8_vnni(b), s7,
                          torch.randn(7).bfloat16())),
        ("int8_mm_vnni", (a, reference.repack_int8_vnni(b), s5, s7, None, None)),
        ("int8_mm_vnni", (a, reference.repack_int8_vnni(b), s5, s7, torch.randn(7),
                          torch.bfloat16)),
    ]


@pytest.mark.parametrize("op,args", [pytest.param(op, args, id=f"{op}-{i % 2}")
                                     for i, (op, args) in enumerate(_opcheck_cases())])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.pyfast, op).default, args)


def _column_major(a):
    return a.T.contiguous().T if isinstance(a, torch.Tensor) and a.dim() == 2 else a


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("op,args", [pytest.param(op, args, id=f"{op}-{i % 2}")
                                     for i, (op, args) in enumerate(_opcheck_cases())])
def test_opcheck_column_major_inputs(op, args, backend):
    """The same with every 2-D input column-major, on the backend the rule picks and on
    the reference: each output's strides must be the fake's (contiguous), or
    torch.compile miscompiles views of it (pack_int4, and quantize_per_token /
    quantize_static on the reference, kept their input's strides)."""
    forced = pyfast.use_backend("reference") if backend == "reference" else pyfast.use_backend()
    with forced:
        torch.library.opcheck(getattr(torch.ops.pyfast, op).default,
                              tuple(map(_column_major, args)))


def test_every_op_has_an_opcheck_case():
    assert {op for op, _ in _opcheck_cases()} == set(ops.SCHEMAS) == set(dispatch.ops())


# --- the dispatch rule ---------------------------------------------------------------------

def _args(op):
    """The first opcheck case of op: valid CPU inputs."""
    return next(args for o, args in _opcheck_cases() if o == op)


def test_default_on_cpu_is_first_usable_in_priority():
    for op in dispatch.ops():
        table = dispatch.kernels(op)
        first = next(f for f in dispatch.PRIORITY["cpu"]
                     if f in table and "cpu" in table[f].devices
                     and dispatch.unavailable_reason(f, "cpu") is None)
        chosen = dispatch.choose(op, "cpu", _args(op))
        assert chosen.family == first, op
        assert pyfast.backends().default(op, "cpu") == first, op
    assert dispatch.PRIORITY["cpu"][-1] == "reference"


def _spy_on(monkeypatch, op, family):
    """Replace one registered kernel by a recording wrapper; returns the call list."""
    calls = []
    original = dispatch.kernels(op)[family]

    def spy(*args):
        calls.append(family)
        return original.fn(*args)

    monkeypatch.setitem(dispatch._REGISTRY.kernels[op], family,
                        dispatch.Backend(family, op, spy, original.devices, original.supports,
                                         original.source))
    return calls


def test_use_backend_reference_forces_the_reference(monkeypatch):
    calls = _spy_on(monkeypatch, "quantize_per_token", "reference")
    x = torch.randn(3, 8)
    with pyfast.use_backend("reference"):
        torch.ops.pyfast.quantize_per_token(x)
        assert dispatch.choose("int8_mm", "cpu", _args("int8_mm")).family == "reference"
    assert calls == ["reference"]
    with pyfast.use_backend(quantize_per_token="reference"):
        ops.quantize_per_token(x)
    assert calls == ["reference"] * 2


def test_default_call_runs_the_default_backend(monkeypatch):
    default = pyfast.backends().default("quantize_per_token", "cpu")
    calls = _spy_on(monkeypatch, "quantize_per_token", default)
    torch.ops.pyfast.quantize_per_token(torch.randn(2, 4))
    assert calls == [default]


@pytest.mark.parametrize("op", ["int4_mm", "sparse24_mm", "pack_int4"])
def test_forcing_a_family_without_kernel_raises(op):
    missing = next(f for f in dispatch.FAMILIES if f not in dispatch.kernels(op))
    args = _args(op)
    with pyfast.use_backend(**{op: missing}):
        with pytest.raises(pyfast.BackendUnavailableError,
                           match=rf"pyfast\.{op}: backend '{missing}' was forced but cannot "
                                 r"run this call: no kernel for this op"):
            getattr(torch.ops.pyfast, op)(*args)


def test_forcing_a_kernel_for_another_device_raises():
    # the cuda kernel of quantize_per_token runs on cuda only
    with pyfast.use_backend(quantize_per_token="cuda"):
        with pytest.raises(pyfast.BackendUnavailableError,
                           match=r"pyfast\.quantize_per_token: backend 'cuda' .*runs on cuda, not cpu"):
            ops.quantize_per_token(torch.randn(2, 8))


def test_forcing_an_unavailable_family_says_why():
    reason = dispatch.unavailable_reason("cpp", "cpu")
    with pyfast.use_backend(int8_mm="cpp"):
        call = lambda: ops.int8_mm(torch.ones(2, 4, dtype=torch.int8),  # noqa: E731
                                   torch.ones(3, 4, dtype=torch.int8), torch.ones(2), torch.ones(3))
        if reason is None:      # extension built: the C++ kernel must run and be exact
            assert torch.equal(call(), torch.full((2, 3), 4.0))
        else:
            with pytest.raises(pyfast.BackendUnavailableError) as info:
                call()
            assert "pyfast.int8_mm" in str(info.value) and reason in str(info.value)


def test_global_force_skips_ops_without_that_family():
    # use_backend("triton") is non-strict: ops with no Triton kernel follow the rule
    assert "triton" not in dispatch.kernels("pack_int4")
    w = torch.randn(4, 32)
    with pyfast.use_backend("triton"):
        got = ops.pack_int4(w, 32, True)
        chosen = dispatch.choose("pack_int4", "cpu", (w, 32, True)).family
    assert chosen == pyfast.backends().default("pack_int4", "cpu")
    for g, r in zip(got, reference.pack_int4(w, 32, True)):
        assert torch.equal(g, r)


def test_innermost_use_backend_wins():
    with pyfast.use_backend(quantize_per_token="cuda"):
        with pyfast.use_backend(quantize_per_token="reference"):
            assert dispatch.choose("quantize_per_token", "cpu", _args("quantize_per_token")).family == "reference"
        with pytest.raises(pyfast.BackendUnavailableError):
            dispatch.choose("quantize_per_token", "cpu", _args("quantize_per_token"))
    assert dispatch.choose("quantize_per_token", "cpu", _args("quantize_per_token")).family == \
        pyfast.backends().default("quantize_per_token", "cpu")


def test_env_var_forces_like_use_backend(monkeypatch):
    calls = _spy_on(monkeypatch, "quantize_per_token", "reference")
    monkeypatch.setenv("PYFAST_BACKEND", "reference")
    torch.ops.pyfast.quantize_per_token(torch.randn(2, 4))
    assert calls == ["reference"]
    monkeypatch.setenv("PYFAST_BACKEND", "int8_mm=reference, quantize_per_token=cuda")
    assert dispatch.choose("int8_mm", "cpu", _args("int8_mm")).family == "reference"
    with pytest.raises(pyfast.BackendUnavailableError, match="quantize_per_token.*'cuda'"):
        ops.quantize_per_token(torch.randn(2, 4))
    with pyfast.use_backend(quantize_per_token="reference"):   # use_backend beats the env
        ops.quantize_per_token(torch.randn(2, 4))
    assert calls == ["reference"] * 2


@pytest.mark.parametrize("value", ["bogus", "int8_mm=gpu", "reference,int4_mm=fast"])
def test_env_var_with_a_bad_backend_name_raises(monkeypatch, value):
    monkeypatch.setenv("PYFAST_BACKEND", value)
    with pytest.raises(ValueError, match=r"PYFAST_BACKEND names backend '\w+'; accepted: "
                                         "reference, cpp, cuda, triton"):
        ops.quantize_per_token(torch.randn(2, 4))


def test_env_var_with_an_unknown_op_raises(monkeypatch):
    # use_backend(bogus_op=...) is an error; a typo in the env var must not be silently ignored
    monkeypatch.setenv("PYFAST_BACKEND", "int8mm=reference")
    with pytest.raises(ValueError, match="int8mm"):
        ops.quantize_per_token(torch.randn(2, 4))


def test_use_backend_rejects_unknown_op_and_family():
    with pytest.raises(ValueError, match=r"use_backend got unknown op 'bogus_op'; ops: int4_mm"):
        with pyfast.use_backend(bogus_op="cpp"):
            pass
    with pytest.raises(ValueError, match=r"backend 'gpu' for 'int8_mm' is not one of reference"):
        with pyfast.use_backend(int8_mm="gpu"):
            pass
    with pytest.raises(ValueError, match=r"backend 'fast' for '\*'"):
        with pyfast.use_backend("fast"):
            pass


def test_backends_report_covers_every_op_family_device():
    report = pyfast.backends()
    keys = [(r.op, r.family, r.device) for r in report]
    assert sorted(keys) == sorted((op, fam, dev) for op in dispatch.ops()
                                  for fam in dispatch.FAMILIES for dev in dispatch.PRIORITY)
    for op in dispatch.ops():
        for dev in dispatch.PRIORITY:
            defaults = [r for r in report if r.op == op and r.device == dev and r.default]
            assert len(defaults) == 1, (op, dev)
            assert defaults[0].available
        ref = next(r for r in report if (r.op, r.family, r.device) == (op, "reference", "cpu"))
        assert ref.available and ref.source == "pyfast/reference.py"
    text = str(report)
    for op in dispatch.ops():
        assert op in text
    cpp_reason = dispatch.unavailable_reason("cpp", "cpu")
    assert cpp_reason is None or cpp_reason in text


# --- the dispatcher's own cost and argument filling ----------------------------------------

def test_dropped_default_arguments_reach_every_backend_filled_in():
    """torch drops trailing arguments equal to their schema default; the dispatcher fills
    them back (bias=None, out_dtype=None -> float32) so a backend sees the full list."""
    a, b, s5, s7 = _args("int8_mm")[:4]
    seen = []
    table = dispatch.kernels("int8_mm")
    ref = table["reference"]
    spy = dispatch.Backend("reference", "int8_mm", lambda *args: seen.append(args) or ref.fn(*args),
                           ref.devices, source=ref.source)
    dispatch.register(spy)
    try:
        with pyfast.use_backend(int8_mm="reference"):
            out = torch.ops.pyfast.int8_mm(a, b, s5, s7)
    finally:
        dispatch.register(ref)
    assert len(seen) == 1 and len(seen[0]) == 6 and seen[0][4:] == (None, None)
    assert out.dtype == torch.float32


def test_availability_is_asked_once_per_family_and_device():
    calls = []
    original = dispatch._REGISTRY.availability["reference"] if "reference" in \
        dispatch._REGISTRY.availability else None
    dispatch.set_availability("reference", lambda d: calls.append(d))
    try:
        for _ in range(3):
            assert dispatch.unavailable_reason("reference", "cpu") is None
        assert calls == ["cpu"]
    finally:
        if original is None:
            del dispatch._REGISTRY.availability["reference"]
            dispatch._REGISTRY.available.clear()
        else:
            dispatch.set_availability("reference", original)


# --- batch-size rules (dispatch.M_RULES) ---------------------------------------------------

def _fake_gpu_families(monkeypatch, op):
    """Kernels of every family in op's M rule, all runnable on 'cuda', recording calls."""
    calls = []
    for family in dispatch.M_RULES[(op, "cuda")][1]:
        def fn(*args, _family=family):
            calls.append(_family)
        monkeypatch.setitem(dispatch._REGISTRY.kernels[op], family,
                            dispatch.Backend(family, op, fn, ("cuda",)))
        monkeypatch.setitem(dispatch._REGISTRY.available, (family, "cuda"), None)
    return calls


@pytest.mark.parametrize("op", sorted({op for op, _ in dispatch.M_RULES}))
def test_m_rule_switches_order_at_its_threshold(monkeypatch, op):
    min_m, order = dispatch.M_RULES[(op, "cuda")]
    _fake_gpu_families(monkeypatch, op)
    below = (torch.empty(min_m - 1, 8),)
    at = (torch.empty(min_m, 8),)
    assert dispatch.priority(op, "cuda", below) == dispatch.PRIORITY["cuda"]
    assert dispatch.priority(op, "cuda", at) == order
    assert dispatch.choose(op, "cuda", below).family == dispatch.PRIORITY["cuda"][0]
    assert dispatch.choose(op, "cuda", at).family == order[0]
    with pyfast.use_backend(**{op: "cuda"}):          # forcing still wins over the rule
        assert dispatch.choose(op, "cuda", at).family == "cuda"
    assert dispatch.priority(op, "cpu", at) == dispatch.PRIORITY["cpu"]
    assert f"from M = {min_m}: {op} on cuda: {' > '.join(order)}" in str(pyfast.backends())


@pytest.mark.parametrize("op", sorted({op for op, _ in dispatch.M_RULES}))
def test_m_rule_is_what_its_bench_file_shows(op):
    """The rule's first family is faster than the default's first family on every shape
    of the cited bench file from the threshold on, and not on every shape below it."""
    min_m, order = dispatch.M_RULES[(op, "cuda")]
    rows = json.loads((ROOT / dispatch.M_RULES_SOURCE).read_text())["rows"]
    ms = {}
    for r in rows:
        if r["op"] == op and r["backend"] in (order[0], dispatch.PRIORITY["cuda"][0]):
            ms.setdefault((r["M"], r["K"], r["N"]), {})[r["backend"]] = r["median_ms"]
    faster = {}
    for (m, k, n), t in ms.items():
        faster.setdefault(m, []).append(t[order[0]] < t[dispatch.PRIORITY["cuda"][0]])
    assert any(m >= min_m for m in faster) and any(m < min_m for m in faster)
    for m, wins in faster.items():
        assert all(wins) if m >= min_m else not all(wins), (m, wins)


def test_gpu_defaults_are_faster_in_the_bench_file():
    """Where two GPU kernels do one job, what runs by default was the faster one in every
    cell of dispatch.M_RULES_SOURCE that measured kernels: the CUDA C++
    quantize_per_token over Triton's, and the tensor-core layouts' CUDA C++ kernels
    (layout="auto" on a GPU) over the canonical layouts' Triton kernels. Left out: the
    4096 x 4096 cells at M <= 128, which measured something else (README, Performance,
    GPU); there sparse24_mm_tc's median at M = 1 was 5.5x its minimum."""
    pairs = [("quantize_per_token", "cuda", "quantize_per_token", "triton"),
             ("int4_mm_tc", "cuda", "int4_mm", "triton"),
             ("sparse24_mm_tc", "cuda", "sparse24_mm", "triton"),
             ("sparse24_int4_mm_tc", "cuda", "sparse24_int4_mm", "triton")]
    assert dispatch.PRIORITY["cuda"].index("cuda") < dispatch.PRIORITY["cuda"].index("triton")
    rows = json.loads((ROOT / dispatch.M_RULES_SOURCE).read_text())["rows"]
    ms = {(r["op"], r["backend"], r["M"], r["K"], r["N"]): r["median_ms"] for r in rows}
    cells = {(r["M"], r["K"], r["N"]) for r in rows} - {(m, 4096, 4096) for m in (1, 16, 128)}
    assert len(cells) == 9
    for op, fam, other_op, other_fam in pairs:
        for cell in cells:
            assert ms[(op, fam, *cell)] < ms[(other_op, other_fam, *cell)], (op, other_op, cell)
