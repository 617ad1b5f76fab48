"""pyfast.nn layers against the nn.Linear they came from.

Tolerances are bounds derived from the quantization step, not guesses:
- weight-only: |out - linear(x)| <= sum_k |x_k| * step_w(n, k) / 2, step_w the
  weight scale of that row (and group); rounding to nearest is off by at most
  half a step per weight.
- W8A8: with dx = s_x / 2 and dw = s_w / 2 the error per product is at most
  |x| dw + |w| dx + dx dw.
Float rounding of the matmul itself is covered by a small absolute slack.
"""
import copy

import pytest
import torch
from torch import nn

import pyfast
from pyfast.nn import Int4Linear, Int8Linear, Int8WeightOnlyLinear, Sparse24Linear
from pyfast.sparsity import magnitude_24_mask
from conftest import DEVICES

SLACK = 1e-4


def _linear(k, n, bias=True, device="cpu", dtype=torch.float32):
    return nn.Linear(k, n, bias=bias).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_int8_weight_only_within_half_step(device, m, bias):
    lin = _linear(96, 33, bias, device)
    layer = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(m, 96, device=device)
    bound = x.abs() @ (layer.weight_scale[:, None] / 2).expand(33, 96).T
    err = (layer(x) - lin(x)).abs()
    assert bool((err <= bound + SLACK).all()), float((err - bound).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int8_w8a8_within_bound(device, m):
    lin = _linear(64, 130, True, device)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(m, 64, device=device)
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    dx, dw = sx / 2, layer.weight_scale[None, :] / 2        # [M, 1], [1, N]
    w = lin.weight.detach()
    bound = x.abs().sum(1, keepdim=True) * dw + dx * w.abs().sum(1)[None, :] + 64 * dx * dw
    err = (layer(x) - lin(x)).abs()
    assert bool((err <= bound + SLACK).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_within_half_step(device, group_size, symmetric):
    k, n = 128, 17
    lin = _linear(k, n, True, device)
    layer = Int4Linear.from_linear(lin, group_size=group_size, symmetric=symmetric)
    x = torch.randn(5, k, device=device)
    gs = k if group_size == -1 else group_size
    step = layer.scales.repeat_interleave(gs, dim=1)         # [N, K]
    # symmetric clamps to [-8, 7] with scale amax/7: never clipped, so half a step holds
    bound = x.abs() @ (step / 2).T
    err = (layer(x) - lin(x)).abs()
    assert bool((err <= bound + SLACK).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse24_matches_pruned_linear(device, dtype):
    lin = _linear(64, 24, True, device, dtype)
    with torch.no_grad():
        lin.weight.mul_(magnitude_24_mask(lin.weight))
    layer = Sparse24Linear.from_linear(lin)
    x = torch.randn(3, 64, device=device, dtype=dtype)
    expected = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    out = layer(x)
    assert out.dtype == dtype
    # the only error is the final rounding to dtype (the reference works in float32)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_sparse24_prune_true_equals_magnitude_mask():
    lin = _linear(32, 8)
    layer = Sparse24Linear.from_linear(lin, prune=True)
    masked = copy.deepcopy(lin)
    with torch.no_grad():
        masked.weight.mul_(magnitude_24_mask(masked.weight))
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), masked(x), atol=1e-6, rtol=1e-6)


def test_sparse24_not_24_without_prune_names_group():
    lin = _linear(8, 2)
    with pytest.raises(ValueError, match=r"row 0, group 0"):
        Sparse24Linear.from_linear(lin)


@pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear, Int4Linear, Sparse24Linear])
def test_leading_dims_and_repr(cls):
    lin = _linear(128, 12)
    layer = cls.from_linear(lin, prune=True) if cls is Sparse24Linear else cls.from_linear(lin)
    x = torch.randn(2, 3, 128)
    assert layer(x).shape == (2, 3, 12)
    assert layer.format in repr(layer) and "in_features=128" in repr(layer)


@pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_dtype(cls, dtype):
    layer = cls.from_linear(_linear(128, 16))
    x = torch.randn(3, 128, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    ref = layer(x.float())
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)


# Every layer with a float32 scale buffer, from a bias-free Linear of small weights (a row
# of magnitude 2e-4: its int8 scale, about 1e-7, is subnormal in float16).
SCALED = {
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "int8-weight": lambda lin: Int8WeightOnlyLinear.from_linear(lin),
    "int4": lambda lin: Int4Linear.from_linear(lin, group_size=64),
    "2:4+int4": lambda lin: pyfast.nn.Sparse24Int4Linear.from_linear(lin, prune=True, group_size=64),
    "int2": lambda lin: pyfast.nn.LowBitLinear.from_linear(lin, bits=2, group_size=64),
    "static": lambda lin: pyfast.nn.StaticInt8Linear.from_linear(lin, torch.tensor([0.02])),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", list(SCALED))
def test_cast_keeps_scales_float32(kind, dtype):
    """model.to(dtype) leaves the scale buffers float32 and unrounded, so the cast layer
    gives exactly what the uncast one gives on the same 16-bit x (before, the scales were
    rounded to the dtype: 21% error in float16 here, and StaticInt8Linear refused its
    bfloat16 input_scale)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        lin.weight.mul_(2e-4)
    layer = SCALED[kind](lin)
    scales = {n: b.clone() for n, b in layer.named_buffers() if "scale" in n}
    assert scales and all(b.dtype == torch.float32 for b in scales.values())
    cast = copy.deepcopy(layer).to(dtype)
    for name, before in scales.items():
        assert torch.equal(cast.get_buffer(name), before), name
    x = torch.randn(3, 128).to(dtype)
    assert torch.equal(cast(x), layer(x))
    moved = cast.to("meta")
    assert all(moved.get_buffer(n).dtype == torch.float32 for n in scales)


def test_state_dict_holds_only_packed_tensors_and_int4_is_an_eighth():
    lin = _linear(4096, 256)
    layer = Int4Linear.from_linear(lin, group_size=128)
    sd = layer.state_dict()
    assert set(sd) == {"bias", "packed", "scales", "zeros"}
    fp32_weight = 4096 * 256 * 4
    assert sd["packed"].numel() * sd["packed"].element_size() == fp32_weight // 8
    extra = sum(sd[k].numel() * sd[k].element_size() for k in ("scales", "zeros", "bias"))
    assert layer.storage_bytes() == fp32_weight // 8 + extra
    assert set(Int8Linear.from_linear(lin).state_dict()) == {"bias", "weight_int8", "weight_scale"}
    assert set(Sparse24Linear.from_linear(lin, prune=True).state_dict()) == {"bias", "values", "meta"}


def _mixed_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))


def _compress_mixed(model):
    pyfast.quantize(model, "int8", include="0")
    pyfast.quantize(model, "int8-weight", include="2")
    pyfast.quantize(model, "int4", group_size=32, symmetric=False, include="4")
    pyfast.sparsify(model, include="6")
    return model


def test_state_dict_round_trip_into_fresh_model():
    src = _compress_mixed(_mixed_model(0))
    fresh = _compress_mixed(_mixed_model(1))  # same structure, other weights
    x = torch.randn(5, 64)
    assert not torch.equal(src(x), fresh(x))
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(src(x), fresh(x))


def test_torch_compile_of_swapped_model_matches_eager():
    model = _compress_mixed(_mixed_model(0))
    x = torch.randn(7, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


def test_layer_input_errors():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features = 100 is not a multiple of group_size 128"):
        Int4Linear(100, 8, group_size=128)
    with pytest.raises(ValueError, match="in_features = 6 is not a multiple of 4"):
        Sparse24Linear(6, 8)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 64\], got shape \(3, 32\)"):
        Int8Linear(64, 8)(torch.randn(3, 32))
    layer = Sparse24Linear.from_linear(_linear(8, 4), prune=True)
    with pytest.raises(TypeError, match="values are torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float16))
    assert layer.to(torch.float16)(torch.randn(2, 8, dtype=torch.float16)).dtype == torch.float16
    for bad in (torch.float64, torch.int64):   # advice to call layer.to(bad) would be refused
        with pytest.raises(TypeError, match=rf"input has dtype {bad}; accepted: float32, "
                                            "float16, bfloat16"):
            layer(torch.ones(2, 8, dtype=bad))


@pytest.mark.parametrize("method", ["int8", "int4", "2:4"])
def test_autocast_computes_in_x_dtype(method):
    """Under torch.autocast the layers compute in x's dtype (the pyfast ops have no
    autocast rule; README, Layers): an fp32 x gives the fp32 result of no autocast."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 128))
    model = pyfast.sparsify(base) if method == "2:4" else pyfast.quantize(base, method)
    x = torch.randn(3, 256)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, want)


@pytest.mark.parametrize("layout", ["canonical", "tc"])
@pytest.mark.parametrize("cls", ["Sparse24Linear", "Sparse24Int4Linear"])
def test_load_state_dict_refuses_a_meta_byte_outside_the_format(cls, layout):
    """The kernels assume idx0 < idx1 (pyfast/formats.py): load_state_dict checks it once,
    in either layout, and names the first bad group; a valid state dict still loads."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    kind = getattr(pyfast.nn, cls)
    make = lambda: (kind.from_linear(lin, prune=True, layout=layout) if cls == "Sparse24Linear"  # noqa: E731
                    else kind.from_linear(lin, prune=True, group_size=32, layout=layout))
    layer = make()
    good = {k: v.clone() for k, v in make().state_dict().items()}
    layer.load_state_dict(good)
    canonical = make().repack("canonical")
    sd = {k: v.clone() for k, v in canonical.state_dict().items()}
    sd["meta"][1, 2] = 0x0B if cls == "Sparse24Linear" else 0xB4      # idx0 = 3 > idx1 = 2
    if layout == "tc":   # the same corruption in the tensor-core image (the repack op
        # itself refuses such meta, so the layout's pure-torch function makes the image)
        from pyfast.layouts import sparse24_int4_tc, sparse24_tc
        if cls == "Sparse24Linear":
            sd["meta"] = sparse24_tc.repack_meta(sd["meta"])
        else:
            sd["packed"], sd["meta"] = sparse24_int4_tc.repack(sd["packed"], sd["meta"])
    with pytest.raises(RuntimeError, match=r"at '': (unpack_nibbles\()?meta\)?\[1, [245]\] = 11 "
                                           r"is not a 2:4 index pair"):
        layer.load_state_dict(sd)


def test_constructor_arguments_are_checked_like_the_others():
    """Int4Linear took symmetric="no" as True and None as False, Sparse24Linear took
    prune="yes", and from_int8 accepted a bias of the wrong size (refused at the first
    forward only): each now raises as Sparse24Int4Linear / pyfast.quantize do."""
    lin = nn.Linear(64, 8)
    with pytest.raises(TypeError, match="symmetric must be a bool, got 'no'"):
        pyfast.nn.Int4Linear.from_linear(lin, group_size=32, symmetric="no")
    with pytest.raises(TypeError, match="symmetric must be a bool, got None"):
        pyfast.nn.Int4Linear(64, 8, group_size=32, symmetric=None)
    with pytest.raises(TypeError, match="prune must be a bool, got 'yes'"):
        pyfast.nn.Sparse24Linear.from_linear(lin, prune="yes")
    w = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\): dimension 0 must be 4"):
        pyfast.nn.Int8Linear.from_int8(w, torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        pyfast.nn.Int8WeightOnlyLinear.from_int8(w, torch.ones(4), torch.ones(4, 1))
    with pytest.raises(TypeError, match=r"dtype 'float16' is not supported; accepted: torch.float32"):
        pyfast.nn.Sparse24Linear(64, 16, dtype="float16")


@pytest.mark.parametrize("cast", ["double", "complex"])
def test_a_cast_the_kernels_cannot_take_is_refused_before_anything_moves(cast):
    """model.double() made a float64 bias (2:4: float64 values, a dtype the layer's own
    constructor refuses), and every forward then failed naming the bias or the input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    pyfast.sparsify(model, "2:4", include="2")
    x = torch.randn(3, 64)
    before = model(x)
    with pytest.raises(TypeError, match=r"Sparse24Linear cannot be cast to torch\.(float64|complex64): "
                                        r"its kernels take float32, float16 or bfloat16"):
        model.double() if cast == "double" else model.to(torch.complex64)
    assert model[2].values.dtype == torch.float32 and model[2].bias.dtype == torch.float32
    if cast == "complex":   # the modules before it were cast (.float() keeps complex)
        return
    model.float()
    torch.testing.assert_close(model(x), before)
    for c in (torch.float16, torch.bfloat16, torch.float32):
        model.to(c)              # the casts the kernels take still work


@pytest.mark.parametrize("kind", list(SCALED))
def test_moves_and_casts_keep_trainable_scales(kind):
    """Scales being fine-tuned (requires_grad) stay the optimizer's tensors through a
    no-op move and a 16-bit cast: _apply's int32 views made fresh buffers without
    requires_grad, so the optimizer's tensors were orphaned and training silently stopped."""
    torch.manual_seed(0)
    layer = SCALED[kind](nn.Linear(128, 16, bias=False))
    names = [n for n, b in layer.named_buffers() if "scale" in n]
    scales = [layer.get_buffer(n).requires_grad_() for n in names]
    opt = torch.optim.SGD(scales, lr=0.1)
    layer.to("cpu").to(torch.bfloat16).float()
    assert all(layer.get_buffer(n) is s for n, s in zip(names, scales))
    before = [s.detach().clone() for s in scales]
    if kind in ("int8", "static"):   # W8A8: no gradient through the int8 matmul; just stay
        return
    layer(torch.randn(4, 128)).sum().backward()
    opt.step()
    assert all(not torch.equal(layer.get_buffer(n), b) for n, b in zip(names, before))


def test_a_moved_trainable_scale_stays_trainable():
    layer = SCALED["int4"](nn.Linear(128, 16, bias=False)).to("meta")
    layer.scales.requires_grad_()
    moved = layer.to_empty(device="cpu")
    assert moved.scales.dtype == torch.float32 and moved.scales.requires_grad


@pytest.mark.parametrize("kind", list(SCALED))
def test_type_casting_the_integer_codes_is_refused(kind):
    """module.type(torch.float32), a no-op on a float model, cast the int8 codes to float
    and the float32 scales (int32 views in _apply) to their bit patterns: the layer was
    destroyed for good. Refused before anything moves."""
    layer = SCALED[kind](nn.Linear(128, 16, bias=False))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"cannot cast its integer codes to torch\.float32"):
        layer.type(torch.float32)
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype
               for k, v in layer.state_dict().items())


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -0.5])
def test_load_state_dict_refuses_a_static_scale_that_is_not_positive_and_finite(value):
    """from_linear refuses these; a loaded one gave the bias alone (0) or NaN outputs."""
    layer = SCALED["static"](nn.Linear(128, 16))
    sd = layer.state_dict()
    sd["input_scale"] = torch.tensor([value])
    fresh = pyfast.nn.StaticInt8Linear(128, 16)
    with pytest.raises(RuntimeError, match=r"StaticInt8Linear at '': input_scale must be a "
                                           r"positive finite float32"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("cls", ["Int4Linear", "Sparse24Int4Linear"])
def test_load_state_dict_refuses_a_zero_point_outside_int4(cls):
    """The CPU 2:4 + int4 kernels assume zeros in 0..15 (pyfast/formats.py) and summed
    something else than the reference for 16 or more: checked once at load."""
    torch.manual_seed(0)
    layer = getattr(pyfast.nn, cls).from_linear(
        nn.Linear(64, 8), group_size=32, symmetric=False,
        **({"prune": True} if cls == "Sparse24Int4Linear" else {}), layout="canonical")
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd)
    sd["zeros"][5, 1] = 16
    with pytest.raises(RuntimeError, match=r"zeros\[5, 1\] = 16 is not an int4 zero point; "
                                           r"accepted: 0..15"):
        layer.load_state_dict(sd)
