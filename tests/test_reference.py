"""pyfast/reference.py against plain computations written independently here.

The reference is the oracle of every other op test, so it is itself checked
against the layouts of pyfast/formats.py decoded by hand (tests/_helpers.py),
with integer arithmetic where the format promises exactness.
"""
import pytest
import torch
import torch.nn.functional as F

from pyfast import reference
from _helpers import (FLOAT_DTYPES, decompress24, dequant_int4, dtype_id, linear_tolerance,
                      quantize_rows_plain, random_24, unpack_int4, assert_within)

DTYPES = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]
GROUP_SIZES = [32, 64, 128, -1]


# --- quantize_per_token -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_reconstructs_within_half_a_step(dtype):
    x = (torch.randn(9, 70) * torch.logspace(-3, 3, 9)[:, None]).to(dtype)
    q, scale = reference.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (9,)
    err = (q.double() * scale.double()[:, None] - x.double()).abs()
    # half a step, plus float32 rounding of x / scale (relative 2**-24 of |x|)
    bound = scale.double()[:, None] * 0.5 + x.double().abs() * 2 ** -23
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_plain_loop(dtype):
    x = torch.randn(6, 33).to(dtype)
    x[2] = 0
    x[4] = 3.0                     # all-equal row
    q, scale = reference.quantize_per_token(x)
    q2, scale2 = quantize_rows_plain(x)
    assert torch.equal(q, q2)
    assert torch.equal(scale, scale2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_amax_maps_to_127_and_zero_row_to_scale_one(dtype):
    x = torch.randn(4, 40).to(dtype)
    x[1, 7] = -50.0                # the row's amax is negative
    x[3] = 0
    q, scale = reference.quantize_per_token(x)
    amax_idx = x.float().abs().argmax(dim=1)
    for r in (0, 1, 2):
        expected = 127 if x[r, amax_idx[r]] > 0 else -127
        assert int(q[r, amax_idx[r]]) == expected
    assert int(q[1, 7]) == -127
    assert float(scale[3]) == 1.0 and not bool(q[3].any())
    assert int(q.min()) >= -127          # -128 is never produced


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_symmetric(dtype):
    x = torch.randn(5, 64).to(dtype)
    x[0, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]).to(dtype) * (x[0].float().abs().max() / 127)
    q, scale = reference.quantize_per_token(x)
    qn, scalen = reference.quantize_per_token(-x)
    assert torch.equal(qn, -q)
    assert torch.equal(scalen, scale)


@pytest.mark.parametrize("m,k,n", [(1, 1, 2), (3, 1, 33), (17, 2, 7), (5, 19, 130)])
def test_int8_product_is_exact_at_small_k(m, k, n):
    # torch 2.13's torch._int_mm returns uninitialised memory at K = 1, N > 1:
    # the reference must not inherit that
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(reference.int8_matmul_int32(a, b), (a.long() @ b.long().T).int())


def test_quantize_handles_k_zero_and_m_zero():
    q, s = reference.quantize_per_token(torch.empty(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.ones(3))
    q, s = reference.quantize_per_token(torch.empty(0, 8))
    assert q.shape == (0, 8) and s.shape == (0,)


def test_quantize_subnormal_row_keeps_a_positive_scale():
    # amax / 127 underflows to 0 for amax below ~1.8e-43; formats.py promises that
    # q * scale reconstructs x within scale / 2, impossible with scale == 0.
    x = torch.tensor([[1e-44, 0.0, -1e-44]])
    q, scale = reference.quantize_per_token(x)
    assert float(scale[0]) > 0, f"scale {float(scale[0])} for a row with amax 1e-44"
    assert not q.any()


def test_quantize_nan_row_gets_nan_scale_so_the_matmul_shows_it():
    x = torch.tensor([[float("nan"), 1.0, 2.0], [1.0, -2.0, 3.0]])
    q, scale = reference.quantize_per_token(x)
    assert torch.isnan(scale[0]) and not q[0].any() and float(scale[1]) == float(torch.tensor(3.0) / 127)
    out = reference.int8_mm(q, q, scale, torch.ones(2), None, torch.float32)
    assert bool(torch.isnan(out[0]).all()) and bool(torch.isfinite(out[1]).all())


# --- int8_mm ---------------------------------------------------------------------------

def _int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_int8_mm_is_int64_matmul_then_float32_epilogue(out_dtype, bias):
    m, n, k = 7, 13, 300
    a, b = _int8(m, k), _int8(n, k)
    a[0] = -128                       # extreme products: |sum| up to 128 * 128 * K
    b[0] = -128
    a_scale, b_scale = torch.rand(m) + 0.01, torch.rand(n) + 0.01
    bias_t = torch.randn(n) if bias else None
    acc = a.long() @ b.long().T
    assert int(acc[0, 0]) == 128 * 128 * k
    expected = acc.float() * a_scale[:, None] * b_scale[None, :]
    if bias_t is not None:
        expected = expected + bias_t
    out = reference.int8_mm(a, b, a_scale, b_scale, bias_t, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, expected.to(out_dtype))


def test_int8_mm_empty_shapes():
    out = reference.int8_mm(_int8(0, 16), _int8(5, 16), torch.ones(0), torch.ones(5), None,
                            torch.float32)
    assert out.shape == (0, 5)
    out = reference.int8_mm(_int8(3, 0), _int8(5, 0), torch.ones(3), torch.ones(5),
                            torch.arange(5.0), torch.float32)
    assert torch.equal(out, torch.arange(5.0).expand(3, 5))


# --- int8_weight_mm --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_mm_is_linear_with_dequantized_weight(dtype, bias):
    m, n, k = 5, 11, 96
    x = torch.randn(m, k).to(dtype)
    w = _int8(n, k)
    w_scale = torch.rand(n) / 64
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = w.double() * w_scale.double()[:, None]
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    out = reference.int8_weight_mm(x, w, w_scale, bias_t)
    assert_within(out, exact.to(dtype), linear_tolerance(x, w64, bias_t, dtype), "int8_weight_mm")


# --- int4 -----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_int4_round_trip_within_half_a_step(dtype, group_size, symmetric):
    n, k = 10, 256
    w = torch.randn(n, k)
    w[1] = 0                        # all-zero row: scale 1
    w[2] = 0.75                     # all-equal positive row
    w[3] = -0.5                     # all-equal negative row
    w[4, : k // 2] *= 100           # large magnitudes in part of the row
    w = w.to(dtype)
    packed, scales, zeros = reference.pack_int4(w, group_size, symmetric)
    groups = 1 if group_size == -1 else k // group_size
    gs = k if group_size == -1 else group_size
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert scales.shape == (n, groups) and scales.dtype == torch.float32
    assert zeros.shape == (n, groups) and zeros.dtype == torch.uint8
    if symmetric:
        assert bool((zeros == 8).all())
    else:
        assert int(zeros.max()) <= 15
    assert bool((scales > 0).all())
    assert bool((scales[1] == 1).all())
    deq = dequant_int4(packed, scales, zeros, group_size)
    step = scales.double().repeat_interleave(gs, dim=1)
    err = (deq - w.double()).abs()
    # half a step, plus float32 rounding in w / scale and (q - zero) * scale
    bound = 0.5 * step + 4 * 2 ** -24 * (w.double().abs() + step * 16)
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_pack_int4_scale_and_zero_follow_formats(symmetric):
    w = torch.tensor([[-3.0, 0.0, 1.0, 4.5] * 8, [0.5] * 32, [-2.0] * 32, [0.0] * 32])
    packed, scales, zeros = reference.pack_int4(w, 32, symmetric)
    if symmetric:
        assert scales.flatten().tolist() == pytest.approx([4.5 / 7, 0.5 / 7, 2.0 / 7, 1.0])
        assert zeros.flatten().tolist() == [8, 8, 8, 8]
    else:
        # min <= 0 <= max forced: [0, 0.5] and [-2, 0]; all-zero group -> scale 1, zero 0
        assert scales.flatten().tolist() == pytest.approx([7.5 / 15, 0.5 / 15, 2.0 / 15, 1.0])
        assert zeros.flatten().tolist() == [6, 0, 15, 0]
    q = unpack_int4(packed)
    assert int(q.max()) <= 15 and int(q.min()) >= 0
    if symmetric:
        assert q[0, :4].tolist() == [8 + round(-3.0 / (4.5 / 7)), 8, 8 + round(7 / 4.5), 15]


@pytest.mark.parametrize("pack", ["int4", "int2"])
def test_asymmetric_range_wider_than_float32_max_keeps_a_finite_scale(pack):
    """hi - lo overflowed to inf for a group whose max - min passes float32's maximum:
    an inf scale, every code 0 and a NaN / inf dequantized weight. Now the scale is
    hi / maxq - lo / maxq."""
    # (within a rounded zero point of float32's maximum a code may still dequantize to inf)
    w = torch.tensor([[1e38, -3e38, 1e37, 0.0] * 8, [3e38, -1e38, 2.0, -1.0] * 8])
    if pack == "int4":
        packed, scales, zeros = reference.pack_int4(w, 32, False)
        q, maxq = unpack_int4(packed).float(), 15
    else:
        packed, scales, zeros = reference.pack_lowbit(w, 2, 32)
        q, maxq = reference.unpack_bits(packed, 2).float(), 3
    assert bool(torch.isfinite(scales).all())
    hi, lo = w.amax(dim=1), w.amin(dim=1)
    assert torch.equal(scales.flatten(), hi / maxq - lo / maxq)
    deq = (q - zeros.float()) * scales        # one group per row
    assert bool(torch.isfinite(deq).all())
    # each weight within half a step (plus the zero point's rounding) of its code
    assert bool(((deq - w).abs() <= scales).all())


def test_pack_int4_nibble_order_low_is_even_k():
    # symmetric, amax 7 in the group: scale 1, q = w + 8
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 31] = -7.0, 5.0, 7.0
    packed, scales, _ = reference.pack_int4(w, 32, True)
    assert float(scales[0, 0]) == 1.0
    assert int(packed[0, 0]) == (8 - 7) | ((8 + 5) << 4)
    assert int(packed[0, 15]) == 8 | ((8 + 7) << 4)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_mm_is_linear_with_hand_dequantized_weight(dtype, group_size, bias):
    m, n, k = 6, 9, 256
    x = torch.randn(m, k).to(dtype)
    # arbitrary packed bytes, scales and zeros: int4_mm must follow the layout for any of them
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    groups = 1 if group_size == -1 else k // group_size
    scales = torch.rand(n, groups) / 8
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8)
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = dequant_int4(packed, scales, zeros, group_size)
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    out = reference.int4_mm(x, packed, scales, zeros, group_size, bias_t)
    assert_within(out, exact.to(dtype), linear_tolerance(x, w64, bias_t, dtype), "int4_mm")


# --- 2:4 sparsity ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_round_trip_is_exact(dtype):
    w = random_24(12, 64, dtype)
    values, meta = reference.sparse24_compress(w)
    assert values.shape == (12, 32) and values.dtype == dtype
    assert meta.shape == (12, 16) and meta.dtype == torch.uint8
    assert torch.equal(decompress24(values, meta), w)
    assert torch.equal(reference.sparse24_decompress(values, meta), w)


def test_sparse24_meta_bits_and_order():
    w = random_24(16, 128)
    values, meta = reference.sparse24_compress(w)
    m = meta.long()
    assert not bool((m >> 4).any()), "bits 4-7 of meta must be zero"
    assert bool(((m & 3) < ((m >> 2) & 3)).all()), "idx0 < idx1 in every group"
    # every nonzero of w is kept
    assert int((values != 0).sum()) == int((w != 0).sum())


@pytest.mark.parametrize("group,kept", [
    ([0.0, 0.0, 0.0, 0.0], (0, 1)),
    ([0.0, 0.0, 0.0, 5.0], (0, 3)),
    ([0.0, 0.0, 5.0, 0.0], (0, 2)),
    ([5.0, 0.0, 0.0, 0.0], (0, 1)),
    ([0.0, 5.0, 0.0, 0.0], (0, 1)),
    ([0.0, 0.0, 5.0, 6.0], (2, 3)),
    ([0.0, 5.0, 0.0, 6.0], (1, 3)),
    ([5.0, 0.0, 6.0, 0.0], (0, 2)),
], ids=lambda v: str(v).replace(" ", ""))
def test_sparse24_underfull_group_fills_lowest_zero_positions(group, kept):
    w = torch.tensor([group + [1.0, 0.0, 0.0, 2.0]])
    values, meta = reference.sparse24_compress(w)
    assert int(meta[0, 0]) == kept[0] | (kept[1] << 2)
    assert values[0, :2].tolist() == [group[kept[0]], group[kept[1]]]
    assert int(meta[0, 1]) == 0 | (3 << 2)


def test_sparse24_nan_counts_as_nonzero():
    w = torch.tensor([[float("nan"), 0.0, 0.0, 1.0], [float("nan"), 1.0, 2.0, 0.0]])
    assert reference.sparse24_violations(w).tolist() == [[False], [True]]
    values, meta = reference.sparse24_compress(w[:1])
    assert int(meta[0, 0]) == 0 | (3 << 2)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_mm_is_linear_with_hand_decompressed_weight(dtype, bias):
    m, n, k = 5, 10, 128
    x = torch.randn(m, k).to(dtype)
    w = random_24(n, k, dtype)
    values, meta = reference.sparse24_compress(w)
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = decompress24(values, meta).double()
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    out = reference.sparse24_mm(x, values, meta, bias_t)
    assert_within(out, exact.to(dtype), linear_tolerance(x, w64, bias_t, dtype), "sparse24_mm")
