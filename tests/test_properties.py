"""Hypothesis property tests: random shapes (M 0..40, K and N fitted to each format),
value patterns (zeros, all-equal rows, large and tiny magnitudes), group sizes,
symmetric flag and dtypes. Every usable backend is forced and compared with the
reference (tolerances as in tests/test_ops.py), and the reference with the
independent checks of tests/test_reference.py where they are cheap.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pyfast import ops, reference
from _helpers import (FLOAT_DTYPES, assert_within, decompress24, dequant_int4, linear_tolerance,
                      run_forced, usable_families)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
DEVICE = "cpu"      # properties run on CPU; tests/test_ops.py covers the cuda device

dtypes = st.sampled_from(FLOAT_DTYPES)
ms = st.integers(0, 40)
patterns = st.sampled_from(["randn", "zeros", "equal_rows", "mixed"])
seeds = st.integers(0, 2 ** 31 - 1)


def _max_magnitude(dtype):
    return 1e4 if dtype == torch.float16 else 1e30


def make_values(shape, dtype, pattern, magnitude, seed):
    """A float tensor of `shape` with the given pattern, scaled to `magnitude`, in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).clamp_(-6, 6) * magnitude
    if pattern == "zeros":
        x.zero_()
    elif pattern == "equal_rows" and x.numel():
        x[:] = x[:, :1]
    elif pattern == "mixed" and x.numel():
        kind = torch.randint(0, 4, (shape[0],), generator=g)
        x[kind == 0] = 0                                     # zero rows
        x[kind == 1] = x[kind == 1][:, :1]                   # all-equal rows
        spike = torch.randint(0, shape[1], (shape[0],), generator=g)
        rows = torch.nonzero(kind == 2).flatten()
        x[rows, spike[rows]] *= 1000 if dtype != torch.float16 else 8   # one large entry
    return x.clamp_(-6e4, 6e4).to(dtype) if dtype == torch.float16 else x.to(dtype)


@st.composite
def magnitudes(draw, dtype, matmul=False):
    top = 10.0 if matmul else _max_magnitude(dtype)
    return draw(st.sampled_from([m for m in (1e-6, 1e-2, 1.0, 10.0, 1e4, 1e30) if m <= top]))


def _forced_results(op, *args):
    families = usable_families(op, DEVICE)
    assert "reference" in families
    return [(family, run_forced(op, family, *args)) for family in families]


# --- quantize_per_token -----------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), m=ms, k=st.integers(1, 80), dtype=dtypes, pattern=patterns, seed=seeds)
def test_quantize_per_token(data, m, k, dtype, pattern, seed):
    x = make_values((m, k), dtype, pattern, data.draw(magnitudes(dtype)), seed)
    q, scale = ops.quantize_per_token(x)
    for family, (qf, sf) in _forced_results("quantize_per_token", x):
        assert torch.equal(qf, q) and torch.equal(sf, scale), family
    xd = x.double()
    # independent checks: reconstruction within half a step, amax -> +-127, zero rows
    err = (q.double() * scale.double()[:, None] - xd).abs()
    assert bool((err <= scale.double()[:, None] * 0.5 + xd.abs() * 2 ** -23).all())
    amax = xd.abs().amax(dim=1)
    nonzero = (amax.float() / 127) > 0   # rows whose scale did not underflow to 1.0
    assert bool((q.abs().amax(dim=1)[nonzero] == 127).all())
    assert bool((scale[~nonzero] == 1).all()) and not bool(q[~nonzero].any())
    assert q.numel() == 0 or int(q.min()) >= -127
    qn, sn = ops.quantize_per_token(-x)
    assert torch.equal(qn, -q) and torch.equal(sn, scale)


# --- int8_mm -----------------------------------------------------------------------------------

@SETTINGS
@given(m=ms, n=st.integers(0, 40), k=st.integers(0, 300), seed=seeds, bias=st.booleans(),
       out_dtype=st.sampled_from([None, *FLOAT_DTYPES]), extreme=st.booleans())
def test_int8_mm(m, n, k, seed, bias, out_dtype, extreme):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if extreme:                                  # largest products: every entry -128
        a.fill_(-128)
        b.fill_(-128)
    a_scale = torch.rand(m, generator=g) / 64
    b_scale = torch.rand(n, generator=g) / 64
    bias_t = torch.randn(n, generator=g) if bias else None
    expected = (a.long() @ b.long().T).float() * a_scale[:, None] * b_scale[None, :]
    if bias_t is not None:
        expected = expected + bias_t
    expected = expected.to(out_dtype or torch.float32)
    assert torch.equal(ops.int8_mm(a, b, a_scale, b_scale, bias_t, out_dtype or torch.float32),
                       expected)
    for family, out in _forced_results("int8_mm", a, b, a_scale, b_scale, bias_t, out_dtype):
        if expected.dtype == torch.float32:
            assert torch.equal(out, expected), family
        else:   # one ulp of the output dtype (see tests/test_ops.py)
            tol = torch.finfo(expected.dtype).eps * expected.double().abs() + 1e-30
            assert bool(((out.double() - expected.double()).abs() <= tol).all()), family


# --- int8_weight_mm -----------------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), m=ms, n=st.integers(1, 40), k=st.integers(1, 160), dtype=dtypes,
       pattern=patterns, seed=seeds, bias=st.booleans())
def test_int8_weight_mm(data, m, n, k, dtype, pattern, seed, bias):
    x = make_values((m, k), dtype, pattern, data.draw(magnitudes(dtype, matmul=True)), seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) / 128
    bias_t = torch.randn(n, generator=g).to(dtype) if bias else None
    w64 = w.double() * w_scale.double()[:, None]
    tol = linear_tolerance(x, w64, bias_t, dtype)
    ref = reference.int8_weight_mm(x, w, w_scale, bias_t)
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    assert_within(ref, exact.to(dtype), tol, "reference vs float64")
    for family, out in _forced_results("int8_weight_mm", x, w, w_scale, bias_t):
        assert_within(out, ref, tol, family)


# --- pack_int4 / int4_mm ----------------------------------------------------------------------------

@st.composite
def int4_shapes(draw):
    group_size = draw(st.sampled_from([32, 64, 128, -1]))
    if group_size == -1:
        k = 2 * draw(st.integers(1, 80))
    else:
        k = group_size * draw(st.integers(1, 3))
    return group_size, k


@SETTINGS
@given(data=st.data(), n=st.integers(1, 24), shape=int4_shapes(), dtype=dtypes, pattern=patterns,
       seed=seeds, symmetric=st.booleans())
def test_pack_int4(data, n, shape, dtype, pattern, seed, symmetric):
    group_size, k = shape
    w = make_values((n, k), dtype, pattern, data.draw(magnitudes(dtype)), seed)
    packed, scales, zeros = ops.pack_int4(w, group_size, symmetric)
    for family, got in _forced_results("pack_int4", w, group_size, symmetric):
        for g, r in zip(got, (packed, scales, zeros)):
            assert torch.equal(g, r), family
    gs = k if group_size == -1 else group_size
    assert scales.shape == zeros.shape == (n, k // gs)
    assert bool((scales > 0).all())
    assert bool((zeros == 8).all()) if symmetric else int(zeros.max()) <= 15
    deq = dequant_int4(packed, scales, zeros, group_size)
    step = scales.double().repeat_interleave(gs, dim=1)
    err = (deq - w.double()).abs()
    bound = 0.5 * step + 4 * 2 ** -24 * (w.double().abs() + 16 * step)
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@SETTINGS
@given(data=st.data(), m=ms, n=st.integers(1, 24), shape=int4_shapes(), dtype=dtypes,
       pattern=patterns, seed=seeds, symmetric=st.booleans(), bias=st.booleans())
def test_int4_mm(data, m, n, shape, dtype, pattern, seed, symmetric, bias):
    group_size, k = shape
    x = make_values((m, k), dtype, pattern, data.draw(magnitudes(dtype, matmul=True)), seed)
    w = make_values((n, k), torch.float32, "mixed", 1.0, seed + 1)
    packed, scales, zeros = ops.pack_int4(w, group_size, symmetric)
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = dequant_int4(packed, scales, zeros, group_size)
    tol = linear_tolerance(x, w64, bias_t, dtype)
    ref = reference.int4_mm(x, packed, scales, zeros, group_size, bias_t)
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    assert_within(ref, exact.to(dtype), tol, "reference vs float64")
    for family, out in _forced_results("int4_mm", x, packed, scales, zeros, group_size, bias_t):
        assert_within(out, ref, tol, family)


# --- 2:4 sparsity ------------------------------------------------------------------------------------

def make_24(n, k, dtype, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=g) * magnitude
    keep = torch.randint(0, 3, (n, k // 4, 1), generator=g)
    rank = torch.rand(n, k // 4, 4, generator=g).argsort(dim=2)
    return (w * (rank < keep)).reshape(n, k).to(dtype)


@SETTINGS
@given(data=st.data(), n=st.integers(0, 24), groups=st.integers(1, 24), dtype=dtypes, seed=seeds)
def test_sparse24_compress(data, n, groups, dtype, seed):
    w = make_24(n, 4 * groups, dtype, seed, data.draw(magnitudes(dtype)))
    values, meta = ops.sparse24_compress(w)
    for family, (v, mt) in _forced_results("sparse24_compress", w):
        assert torch.equal(v, values) and torch.equal(mt, meta), family
    assert torch.equal(decompress24(values, meta), w)
    mi = meta.long()
    assert not bool((mi >> 4).any()) and bool(((mi & 3) < ((mi >> 2) & 3)).all())
    # groups with fewer than 2 nonzeros: every unkept position is a zero above a kept zero
    nz = (w.reshape(n, groups, 4) != 0)
    kept = torch.zeros_like(nz)
    kept.scatter_(2, torch.stack((mi & 3, (mi >> 2) & 3), dim=2), True)
    assert bool((kept | ~nz).all())                                   # all nonzeros kept
    first_unkept_zero = torch.where(~kept & ~nz, torch.arange(4), 4).amin(dim=2)
    last_kept_zero = torch.where(kept & ~nz, torch.arange(4), -1).amax(dim=2)
    assert bool((last_kept_zero < first_unkept_zero).all())          # lowest zeros kept


@SETTINGS
@given(data=st.data(), m=ms, n=st.integers(1, 24), groups=st.integers(1, 24), dtype=dtypes,
       pattern=patterns, seed=seeds, bias=st.booleans())
def test_sparse24_mm(data, m, n, groups, dtype, pattern, seed, bias):
    k = 4 * groups
    x = make_values((m, k), dtype, pattern, data.draw(magnitudes(dtype, matmul=True)), seed)
    values, meta = ops.sparse24_compress(make_24(n, k, dtype, seed + 1, 1.0))
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = decompress24(values, meta).double()
    tol = linear_tolerance(x, w64, bias_t, dtype)
    ref = reference.sparse24_mm(x, values, meta, bias_t)
    exact = F.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    assert_within(ref, exact.to(dtype), tol, "reference vs float64")
    for family, out in _forced_results("sparse24_mm", x, values, meta, bias_t):
        assert_within(out, ref, tol, family)


def test_value_patterns_are_what_they_say():
    x = make_values((8, 16), torch.float32, "equal_rows", 1.0, 0)
    assert bool((x == x[:, :1]).all()) and bool(x.any())
    assert not bool(make_values((8, 16), torch.bfloat16, "zeros", 1e30, 0).any())
    assert make_values((3, 4), torch.float16, "randn", 1e4, 0).isfinite().all()
    w = make_24(6, 32, torch.float32, 0, 1.0)
    assert int((w.reshape(6, 8, 4) != 0).sum(dim=2).max()) <= 2
    with pytest.raises(ValueError):
        ops.sparse24_compress(make_values((4, 8), torch.float32, "randn", 1.0, 0))
