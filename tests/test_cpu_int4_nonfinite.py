"""NaN, inf and very large x through the CPU int4_mm kernels, against the reference.

The reference multiplies x by the dequantized weight: an inf meets an exact 0 weight
(q == zero) as 0 * inf = NaN and a nonzero weight as +-inf. Every path of int4_mm's rule
(csrc/cpu/weight_only.cpp) must give the same: the bfloat16-dot kernel (bfloat16 x at
M <= 16; float32 x too when bfloat16 is allowed in float32 matmuls), the int8-slice
kernel (M = 1), the small-M kernels and the panels. The bfloat16-dot kernel sums
(128 + q) x and subtracts (128 + zero) times x's lane sum, so it gave NaN for every inf
and overflowed at |x| near 1e36 with finite outputs; such x now takes the next rule.
"""
import pytest
import torch

import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import FLOAT_DTYPES, NONFINITE_COL, assert_same_nonfinite, dtype_id, x_with_nonfinite

OPS = torch.ops.pyfast_C
N, K = 37, 256
M_VALUES = [1, 3, 17, 40]   # slices / bf16-dot, bf16-dot tiles, small-M, panels
SWITCHES = [None, "PYFAST_NO_BF16DOT", "PYFAST_NO_INT8_SLICES"]


def _weight(group_size, gen):
    """Symmetric int4 of a weight whose column NONFINITE_COL is 0 in the even rows (code
    8 = zero: an exact 0) and 0.75 in the odd ones; the others of about 0.1, so that the
    outputs' bfloat16 rounding stays inside assert_same_nonfinite's bound."""
    w = 0.1 * torch.randn(N, K, generator=gen)
    w[0::2, NONFINITE_COL] = 0.0
    w[1::2, NONFINITE_COL] = 0.75
    return reference.pack_int4(w, group_size, True)


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s or "default")
@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nonfinite_x_reaches_output(isa, dtype, kind, switch, monkeypatch):
    if switch is not None:
        monkeypatch.setenv(switch, "1")
    gen = torch.Generator().manual_seed(5)
    for group_size in (64, -1):
        args = (*_weight(group_size, gen), group_size)
        for m in M_VALUES:
            x = x_with_nonfinite(m, K, kind, dtype, gen)
            assert_same_nonfinite(OPS.int4_mm(x, *args, None), reference.int4_mm(x, *args, None),
                                  kind, f"int4_mm {isa} {switch} M={m} g={group_size} {dtype} {kind}")


def test_nonfinite_float32_x_with_bf16_matmuls(isa):
    """float32 x under torch.set_float32_matmul_precision("medium") may run the
    bfloat16-dot kernel: an inf there too."""
    gen = torch.Generator().manual_seed(6)
    args = (*_weight(64, gen), 64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for m in (1, 3):
            x = x_with_nonfinite(m, K, "inf", torch.float32, gen)
            out = OPS.int4_mm(x, *args, None)
            torch.set_float32_matmul_precision(before)
            assert_same_nonfinite(out, reference.int4_mm(x, *args, None), "inf", f"{isa} M={m}")
            torch.set_float32_matmul_precision("medium")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("scale_exp", [100, 116, 120])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_very_large_finite_bfloat16_x(isa, m, scale_exp):
    """|x| up to about 2^122 with outputs below float32's maximum: finite, and within
    bfloat16's rounding of the reference (from 2^116 on x takes the float32 kernels; at
    2^120 the bfloat16-dot kernel's lane sums overflowed; 2^100 still runs it)."""
    gen = torch.Generator().manual_seed(7)
    packed, scales, zeros = _weight(64, gen)
    x = (torch.randn(m, K, generator=gen) * 2.0 ** scale_exp).to(torch.bfloat16)
    out = OPS.int4_mm(x, packed, scales, zeros, 64, None)
    want = reference.int4_mm(x.float(), packed, scales, zeros, 64, None)   # float32 output
    assert torch.isfinite(want).all() and torch.isfinite(out).all()
    err = (out.float() - want).abs().max()
    assert err <= 2.0 ** -7 * want.abs().max(), (err, want.abs().max())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_subnormal_bfloat16_x(isa, m, symmetric):
    """vdpbf16ps takes subnormal inputs as zero while the kernel's float lane sums kept
    them: outputs were 30-3000x the true ones (about 1e-36), of either sign. Such x now
    takes the next rule: within bfloat16's rounding of the reference (plus 2^-126: the
    bfloat16 conversion flushes subnormal outputs), or 0 where PyTorch's own bfloat16
    F.linear on the dequantized weight flushes the subnormal x too (the panels' GEMM)."""
    gen = torch.Generator().manual_seed(3)
    packed, scales, zeros = reference.pack_int4(torch.randn(N, K, generator=gen), 64, symmetric)
    x = (torch.randn(m, K, generator=gen) * 1e-39).to(torch.bfloat16)
    assert (x.float().abs() < 2.0 ** -126).all() and (x != 0).any()
    out = OPS.int4_mm(x, packed, scales, zeros, 64, None).float()
    want = reference.int4_mm(x.float(), packed, scales, zeros, 64, None)
    torch_bf16 = torch.nn.functional.linear(
        x, reference.dequantize_int4(packed, scales, zeros, 64).to(torch.bfloat16)).float()
    ok = (out - want).abs() <= 2.0 ** -7 * want.abs().max() + 2.0 ** -126
    ok |= (out == 0) & (torch_bf16 == 0)
    assert ok.all(), (out[~ok][:4], want[~ok][:4])
