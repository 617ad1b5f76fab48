"""int2 and binary weights: pack_lowbit / lowbit_mm against an independent oracle written
here from pyfast/formats.py, LowBitLinear (RTN) and its save/load protocol, and the
accuracy of RTN int2 / binary Linear layers of a trained DigitsCNN.

Tolerances: pack_lowbit is exact (element-wise float32 formulas), except binary scales,
which are a mean and may differ from this oracle's exactly rounded one (math.fsum) by
one float32 ulp; lowbit_mm as the float matmuls of tests/test_ops.py (linear_tolerance).
"""
import copy
import math
import re

import pytest
import torch
from torch import nn

import pyfast
from pyfast import ops
from pyfast.digits import DigitsCNN, accuracy, load_digits, train
from pyfast.nn import LowBitLinear
from _helpers import FLOAT_DTYPES, assert_within, dtype_id, linear_tolerance

DTYPES = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]
# (bits, K, N, group_size): odd N, K not a multiple of 16 where the format allows it
SHAPES = [(2, 36, 7, -1), (2, 96, 33, 32), (2, 128, 1, 64), (2, 256, 5, 128),
          (1, 40, 7, -1), (1, 96, 33, 32), (1, 128, 3, 64), (1, 256, 5, 128)]
SHAPE_IDS = [f"int{b}-K{k}-N{n}-g{g}" for b, k, n, g in SHAPES]


# --- the oracle: formats.py written out group by group -------------------------------------

def oracle_pack(w, bits, group_size):
    """-> (codes int64 [N, K], scales float32 [N, G], zeros int64 [N, G] or [N, 0])."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wf = w.float()
    codes = torch.zeros(n, k, dtype=torch.int64)
    scales = torch.zeros(n, k // gs)
    zeros = torch.zeros(n, k // gs if bits == 2 else 0, dtype=torch.int64)
    for r in range(n):
        for g in range(k // gs):
            grp = wf[r, g * gs:(g + 1) * gs]
            if bits == 1:
                codes[r, g * gs:(g + 1) * gs] = (grp >= 0).long()
                vals = grp.tolist()
                scales[r, g] = (float("nan") if any(map(math.isnan, vals))
                                else math.fsum(abs(v) for v in vals) / gs)
                continue
            lo, hi = min(float(grp.min()), 0.0), max(float(grp.max()), 0.0)
            s = torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)
            s = s / 3
            if math.isnan(float(s)):
                z = torch.tensor(0.0)
            else:
                s = s if float(s) > 0 else torch.tensor(1.0)
                z = torch.round(-torch.tensor(lo, dtype=torch.float32) / s).clamp(0, 3)
            scales[r, g], zeros[r, g] = s, int(z)
            q = torch.round(grp / s) + z
            codes[r, g * gs:(g + 1) * gs] = q.nan_to_num(0.0).clamp(0, 3).long()
    return codes, scales, zeros


def oracle_unpack(packed, bits):
    """uint8 [N, K*bits/8] -> int64 [N, K]: element k at bit (k % (8/bits)) * bits of byte k // (8/bits)."""
    per = 8 // bits
    p = packed.long()
    out = torch.empty(p.shape[0], p.shape[1] * per, dtype=torch.int64)
    for i in range(per):
        out[:, i::per] = (p // 2 ** (i * bits)) % 2 ** bits
    return out


def oracle_weight(packed, scales, zeros, bits, group_size):
    """float64 [N, K]: (q - zero) * scale (int2) or (2q - 1) * scale (binary)."""
    q = oracle_unpack(packed, bits).double()
    gs = q.shape[1] if group_size == -1 else group_size
    s = scales.double().repeat_interleave(gs, dim=1)
    if bits == 1:
        return (2 * q - 1) * s
    return (q - zeros.double().repeat_interleave(gs, dim=1)) * s


def _weights(n, k, dtype):
    w = torch.randn(n, k) * 3
    if n > 2:
        w[1] = 0                     # an all-zero row: int2 scale 1.0, binary scale 0
        w[2, : k // 2] = -w[2, : k // 2].abs()   # a group below zero (min <= 0 <= max forced)
    return w.to(dtype)


# --- pack_lowbit ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,k,n,group_size", SHAPES, ids=SHAPE_IDS)
def test_pack_lowbit_matches_oracle(bits, k, n, group_size, dtype):
    w = _weights(n, k, dtype)
    packed, scales, zeros = ops.pack_lowbit(w, bits, group_size)
    codes, want_s, want_z = oracle_pack(w, bits, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k * bits // 8)
    assert torch.equal(oracle_unpack(packed, bits), codes)
    assert zeros.dtype == torch.uint8 and torch.equal(zeros.long(), want_z)
    assert scales.dtype == torch.float32
    if bits == 2:
        assert torch.equal(scales, want_s)
    else:
        torch.testing.assert_close(scales, want_s, rtol=2 ** -23, atol=0)
    # int2: rounding to nearest is off by at most half a step (the zero point keeps the range)
    if bits == 2:
        deq = oracle_weight(packed, scales, zeros, bits, group_size)
        gs = k if group_size == -1 else group_size
        step = scales.double().repeat_interleave(gs, dim=1)
        assert bool(((deq - w.double()).abs() <= 0.5 * step * (1 + 2 ** -20)).all())


def test_pack_lowbit_byte_layout_by_hand():
    # binary: signs + - - + - - - - | + + + + + + + + -> bytes 0b00001001, 0b11111111
    w = torch.tensor([[1.0, -1, -2, 3, -1, -1, -1, -1, 2, 2, 2, 2, 2, 2, 2, 0.0]])
    packed, scales, zeros = ops.pack_lowbit(w, 1, -1)
    assert packed.tolist() == [[0b00001001, 0b11111111]] and zeros.shape == (1, 0)
    assert scales.tolist() == [[1.5625]]                 # mean |w| = 25 / 16
    # int2 on [-3, 0, 3, 1]: scale 6 / 3 = 2, zero round(1.5) = 2 (half to even);
    # codes round(-1.5) + 2 = 0, 0 + 2 = 2, round(1.5) + 2 = 4 clamped to 3, round(0.5) + 2 = 2
    w2 = torch.tensor([[-3.0, 0.0, 3.0, 1.0] * 2])
    packed, scales, zeros = ops.pack_lowbit(w2, 2, -1)
    assert scales.tolist() == [[2.0]] and zeros.tolist() == [[2]]
    codes = [0, 2, 3, 2]
    byte = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
    assert packed.tolist() == [[byte, byte]]


def test_pack_lowbit_nan_group_gives_nan_scale():
    w = torch.randn(2, 64)
    w[1, 40] = float("nan")
    for bits in (1, 2):
        packed, scales, zeros = ops.pack_lowbit(w, bits, 32)
        assert not bool(scales[:, :1].isnan().any()) and not bool(scales[0].isnan().any())
        assert bool(scales[1, 1].isnan())
        out = ops.lowbit_mm(torch.randn(3, 64), packed, scales, zeros, bits, 32)
        assert bool(out[:, 1].isnan().all()) and bool(out[:, 0].isfinite().all())


# --- lowbit_mm --------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,k,n,group_size", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("m", [0, 1, 3, 17], ids=lambda m: f"M{m}")
def test_lowbit_mm_matches_oracle(m, bits, k, n, group_size, dtype, bias):
    x = torch.randn(m, k).to(dtype)
    packed, scales, zeros = ops.pack_lowbit(torch.randn(n, k), bits, group_size)
    bias_t = torch.randn(n).to(dtype) if bias else None
    w64 = oracle_weight(packed, scales, zeros, bits, group_size)
    want = nn.functional.linear(x.double(), w64, None if bias_t is None else bias_t.double())
    tol = linear_tolerance(x, w64, bias_t, dtype)
    for out in (ops.lowbit_mm(x, packed, scales, zeros, bits, group_size, bias_t),
                torch.ops.pyfast.lowbit_mm(x, packed, scales, zeros, bits, group_size, bias_t)):
        assert_within(out, want.to(dtype), tol, "lowbit_mm")


def test_binary_zero_weights_stay_zero():
    packed, scales, zeros = ops.pack_lowbit(torch.zeros(3, 64), 1, 32)
    assert bool((scales == 0).all())
    out = ops.lowbit_mm(torch.randn(2, 64), packed, scales, zeros, 1, 32, torch.ones(3))
    assert torch.equal(out, torch.ones(2, 3))


# --- LowBitLinear -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,fmt", [
    (2, 64, "int2 weight-only g64 asym"), (2, -1, "int2 weight-only per-channel asym"),
    (1, -1, "binary weight-only per-channel"), (1, 32, "binary weight-only g32")])
def test_layer_from_linear_is_rtn(bits, group_size, fmt):
    lin = nn.Linear(128, 9)
    layer = LowBitLinear.from_linear(lin, bits=bits, group_size=group_size)
    assert layer.format == fmt and fmt in repr(layer)
    packed, scales, zeros = oracle_pack(lin.weight.detach(), bits, group_size)
    w64 = oracle_weight(layer.packed, layer.scales, layer.zeros, bits, group_size)
    assert torch.equal(oracle_unpack(layer.packed, bits), packed)
    x = torch.randn(2, 5, 128)                       # any leading shape
    want = nn.functional.linear(x.double(), w64, lin.bias.double())
    assert_within(layer(x), want.float(), 1e-4, "LowBitLinear")
    g = 1 if group_size == -1 else 128 // group_size
    assert layer.storage_bytes() == 9 * 128 * bits // 8 + 9 * g * 4 + (9 * g if bits == 2 else 0) + 9 * 4


@pytest.mark.parametrize("bits", [1, 2])
def test_layer_save_load_protocol(tmp_path, bits):
    layer = LowBitLinear.from_linear(nn.Linear(64, 6).to(torch.bfloat16), bits=bits, group_size=32)
    cfg = layer.pyfast_config()
    assert cfg == {"in_features": 64, "out_features": 6, "bias": True, "orig_dtype": "bfloat16",
                   "bits": bits, "group_size": 32}
    rebuilt = LowBitLinear.from_config(cfg)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(rebuilt(x), layer(x)) and rebuilt.orig_dtype == torch.bfloat16
    model = nn.Sequential(layer, nn.ReLU())
    pyfast.save(model, tmp_path / "m.safetensors")
    loaded = pyfast.load(nn.Sequential(nn.Linear(64, 6), nn.ReLU()), tmp_path / "m.safetensors")
    assert isinstance(loaded[0], LowBitLinear) and torch.equal(loaded(x), model(x))


def test_load_refuses_int2_zero_points_above_3(tmp_path):
    """As from_quantized (and Int4Linear's load with zero points above 15): a file with
    int2 zero points outside 0..3 is refused by load_state_dict and pyfast.load, naming
    the layer and the value, and leaves the layer as it was."""
    layer = LowBitLinear.from_linear(nn.Linear(64, 8), 2, 32)
    bad = layer.state_dict()
    bad["zeros"] = bad["zeros"].clone()
    bad["zeros"][1, 0] = 200
    fresh = LowBitLinear(64, 8, bits=2, group_size=32)
    want = re.escape("LowBitLinear at '': zeros holds 200 at (1, 0); accepted: integers 0..3")
    with pytest.raises(RuntimeError, match=want):
        fresh.load_state_dict(bad)
    good = nn.Sequential(layer)
    pyfast.save(good, tmp_path / "ok.safetensors")
    good[0].zeros[1, 0] = 4
    pyfast.save(good, tmp_path / "bad.safetensors")
    skeleton = nn.Sequential(nn.Linear(64, 8))
    want = re.escape("LowBitLinear at '0.': zeros holds 4 at (1, 0)")
    with pytest.raises(ValueError, match=want):
        pyfast.load(skeleton, tmp_path / "bad.safetensors")
    assert type(skeleton[0]) is nn.Linear                    # a refused file changes nothing
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(64, 8))
    pyfast.load(skeleton, tmp_path / "ok.safetensors")        # 0..3 loads, meta skeleton too
    binary = LowBitLinear.from_linear(nn.Linear(64, 8), 1, 32)
    LowBitLinear(64, 8, bits=1, group_size=32).load_state_dict(binary.state_dict())


def test_from_quantized_matches_the_codes():
    q = torch.randint(0, 4, (5, 64))
    scales, zeros = torch.rand(5, 2) + 0.1, torch.randint(0, 4, (5, 2))
    layer = LowBitLinear.from_quantized(q, scales, zeros, 2, 32, torch.zeros(5))
    assert torch.equal(oracle_unpack(layer.packed, 2), q)
    qb = torch.randint(0, 2, (5, 64), dtype=torch.uint8)
    layer = LowBitLinear.from_quantized(qb, scales, None, 1, 32)
    assert torch.equal(oracle_unpack(layer.packed, 1), qb.long()) and layer.bias is None


@pytest.mark.parametrize("call,exc,message", [
    (lambda: LowBitLinear(64, 4, bits=3), ValueError, "bits 3 is not supported; accepted: 1 (binary)"),
    (lambda: LowBitLinear(36, 4, bits=1, group_size=-1), ValueError,
     "in_features = 36 must be a multiple of 8 to pack eight 1-bit values per byte"),
    (lambda: LowBitLinear(96, 4, group_size=64), ValueError,
     "in_features = 96 is not a multiple of group_size 64"),
    (lambda: LowBitLinear.from_linear(nn.Conv2d(1, 1, 1)), TypeError,
     "linear must be an nn.Linear, got Conv2d"),
    (lambda: LowBitLinear.from_quantized(torch.full((2, 32), 4), torch.ones(2, 1),
                                         torch.zeros(2, 1, dtype=torch.long), 2, 32), ValueError,
     "q holds 4 at (0, 0); accepted: integers 0..3"),
    (lambda: LowBitLinear.from_quantized(torch.zeros(2, 32), torch.ones(2, 1), None, 1, 32),
     TypeError, "q has dtype torch.float32; accepted: an integer dtype (codes)"),
    (lambda: LowBitLinear.from_quantized(torch.zeros(2, 32, dtype=torch.long), torch.ones(2, 2),
                                         None, 1, 32), ValueError,
     "scales has shape (2, 2); expected (2, 1) (N, K / group_size)"),
    (lambda: LowBitLinear.from_quantized(torch.zeros(2, 32, dtype=torch.long), torch.ones(2, 1),
                                         torch.zeros(2, 1, dtype=torch.long), 1, 32), ValueError,
     "zeros has shape (2, 1); expected (2, 0) (binary weights have no zero point)"),
    (lambda: LowBitLinear.from_quantized(torch.zeros(2, 32, dtype=torch.long), torch.ones(2, 1),
                                         None, 2, 32), TypeError,
     "zeros must be a torch.Tensor, got NoneType"),
    (lambda: LowBitLinear(64, 4, group_size=32)(torch.randn(3, 32)), ValueError,
     "LowBitLinear expects input [..., 64], got shape (3, 32)"),
])
def test_layer_errors(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()


def test_unsupported_reason():
    from pyfast.nn.lowbit import unsupported_reason
    assert unsupported_reason(64, 2, 32) is None
    assert unsupported_reason(36, 1, -1) == ("in_features = 36 must be a multiple of 8 to pack "
                                             "eight 1-bit values per byte (binary)")


# --- digits: RTN int2 and binary Linear layers of a trained CNN ---------------------------------

@pytest.fixture(scope="module")
def digits_model():
    data = load_digits()
    torch.manual_seed(0)
    return data, train(DigitsCNN(width=8), data, epochs=6, progress=False)


# Measured (width 8, 6 epochs, seed 0): float 0.978; int2 g32 0.929, per-channel 0.956;
# binary g32 0.816, per-channel 0.824 (chance is 0.10). Thresholds leave a margin.
@pytest.mark.parametrize("bits,group_size,at_least", [(2, 32, 0.88), (2, -1, 0.88),
                                                      (1, 32, 0.6), (1, -1, 0.6)])
def test_digits_rtn_accuracy(digits_model, record_property, bits, group_size, at_least):
    data, base = digits_model
    model = copy.deepcopy(base)
    for i in (8, 10):                       # the two Linear layers of DigitsCNN
        model[i] = LowBitLinear.from_linear(model[i], bits=bits, group_size=group_size)
    acc = accuracy(model, data.x_test, data.y_test)
    record_property("accuracy", acc)
    record_property("float_accuracy", accuracy(base, data.x_test, data.y_test))
    assert acc >= at_least
