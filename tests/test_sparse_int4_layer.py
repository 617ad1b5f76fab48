"""Sparse24Int4Linear and sparsify(values="int4"): 2:4 sparsity with int4 kept values.

The layer's weight is, exactly, int4's dequantized 2:4-pruned weight (the pruned zeros
change no group's scale or zero point), so its outputs are held to int4's half-step
bound against the pruned dense layer, and to the op's reference exactly.
"""
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast import reference
from pyfast.nn import Int4Linear, Sparse24Int4Linear
from pyfast.sparsity import magnitude_24_mask
from conftest import DEVICES

SLACK = 1e-4


def _pruned(k, n, bias=True, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(magnitude_24_mask(lin.weight))
    return lin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_within_half_step_of_the_pruned_layer(device, m, group_size, symmetric):
    k, n = 128, 17
    lin = _pruned(k, n, device=device)
    layer = Sparse24Int4Linear.from_linear(lin, group_size=group_size, symmetric=symmetric)
    x = torch.randn(m, k, device=device)
    gs = k if group_size == -1 else group_size
    step = layer.scales.repeat_interleave(gs, dim=1)                  # [N, K]
    kept = (layer.dequantized_weight() != 0) | (lin.weight != 0)
    bound = x.abs() @ (step * kept / 2).T
    err = (layer(x) - lin(x)).abs()
    assert bool((err <= bound + SLACK).all()), float((err - bound).max())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_weight_is_int4_of_the_pruned_weight(symmetric):
    lin = _pruned(256, 40)
    layer = Sparse24Int4Linear.from_linear(lin, group_size=64, symmetric=symmetric)
    int4 = Int4Linear.from_linear(lin, group_size=64, symmetric=symmetric, layout="canonical")
    dense4 = reference.dequantize_int4(int4.packed, int4.scales, int4.zeros, 64)
    assert torch.equal(layer.dequantized_weight(), dense4)
    assert torch.equal(layer.scales, int4.scales) and torch.equal(layer.zeros, int4.zeros)
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), int4(x), rtol=1e-5, atol=1e-5)


def test_forward_is_the_op_and_keeps_leading_dims():
    lin = _pruned(64, 24)
    layer = Sparse24Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(2, 3, 64)
    want = reference.sparse24_int4_mm(x.reshape(6, 64), layer.packed, layer.meta, layer.scales,
                                      layer.zeros, 32, layer.bias).reshape(2, 3, 24)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 64\], got shape \(2, 63\)"):
        layer(torch.randn(2, 63))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_layer(dtype):
    lin = _pruned(64, 24, dtype=dtype)
    layer = Sparse24Int4Linear.from_linear(lin, group_size=32)
    x = torch.randn(3, 64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and layer.bias.dtype == dtype
    want = torch.nn.functional.linear(x.float(), layer.dequantized_weight(), layer.bias.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_prune_flag_and_not_24_error():
    torch.manual_seed(0)
    dense = nn.Linear(32, 8)
    with pytest.raises(ValueError, match=r"w is not 2:4 sparse: row 0, group 0"):
        Sparse24Int4Linear.from_linear(dense, group_size=32)
    layer = Sparse24Int4Linear.from_linear(dense, prune=True, group_size=32)
    want = Sparse24Int4Linear.from_linear(_pruned_copy(dense), group_size=32)
    assert torch.equal(layer.packed, want.packed) and torch.equal(layer.meta, want.meta)
    with pytest.raises(TypeError, match="prune must be a bool, got 'yes'"):
        Sparse24Int4Linear.from_linear(dense, prune="yes")
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv2d"):
        Sparse24Int4Linear.from_linear(nn.Conv2d(3, 4, 1))


def _pruned_copy(lin):
    out = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        out.weight.copy_(lin.weight * magnitude_24_mask(lin.weight))
        out.bias.copy_(lin.bias)
    return out


@pytest.mark.parametrize("k,group_size,message", [
    (36, -1, "in_features = 36 must be a multiple of 8"),
    (64, 48, "group_size 48 is not supported"),
    (96, 64, "in_features = 96 is not a multiple of group_size 64"),
])
def test_constructor_errors(k, group_size, message):
    with pytest.raises(ValueError, match=message):
        Sparse24Int4Linear(k, 4, group_size=group_size)


def test_storage_is_about_three_bits_per_weight():
    layer = Sparse24Int4Linear.from_linear(_pruned(4096, 256, bias=False), group_size=128)
    bits = 8 * layer.storage_bytes() / (4096 * 256)
    # 2 (codes) + 1 (indices) + 40 bits of scale and zero per 128 weights
    assert bits == pytest.approx(3 + 40 / 128)
    assert layer.storage_bytes() < 0.8 * Int4Linear.from_linear(
        _pruned(4096, 256, bias=False), group_size=128, layout="canonical").storage_bytes()


def test_sparsify_values_int4_converts_and_skips_with_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10), nn.Linear(10, 4))
    x = torch.randn(5, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfast.sparsify(model, "2:4", values="int4", group_size=32, symmetric=False)
    assert isinstance(model[0], Sparse24Int4Linear) and isinstance(model[2], Sparse24Int4Linear)
    assert model[0].format == "2:4 sparse + int4 g32 asym"
    assert type(model[3]) is nn.Linear
    assert model.pyfast_skipped == {
        "3": "in_features = 10 is not a multiple of group_size 32 (2:4 + int4)"}
    assert any("in_features = 10" in str(w.message) for w in caught)
    assert model(x).shape == (5, 4)
    rows = pyfast.summary(model, print_table=False)
    assert rows[0].sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(values="int8"), ValueError, "values 'int8' is not supported; accepted: None"),
    (dict(values="int4", group_size=48), ValueError, "group_size 48 is not supported"),
    (dict(values="int4", symmetric=1), TypeError, "symmetric must be a bool, got 1"),
    (dict(values="int4", layout="vnni"), ValueError,
     "layout 'vnni' is not supported by sparsify; accepted: 'canonical', 'tc', 'auto'"),
])
def test_sparsify_argument_errors(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        pyfast.sparsify(nn.Sequential(nn.Linear(64, 8)), "2:4", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_save_load_round_trip(tmp_path, dtype):
    def build():
        return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8)).to(dtype)

    model = build()
    pyfast.sparsify(model, "2:4", values="int4", group_size=-1)
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    loaded = pyfast.load(build(), path)
    assert isinstance(loaded[0], Sparse24Int4Linear) and loaded[0].group_size == -1
    x = torch.randn(3, 64).to(dtype)
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].bias.dtype == dtype


def test_sparsify_keeps_a_trained_24_mask():
    """prune.n_m, then finish, then sparsify(values="int4"): the mask is the trained one
    (magnitude 2:4 of a weight that is already 2:4 keeps its nonzeros)."""
    from pyfast import prune
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32))
    prune.n_m(model, 2, 4)
    with torch.no_grad():                 # "training" moves the kept weights, not the mask
        model[0].weight.mul_(3.0)
    prune.finish(model)
    w = model[0].weight.detach().clone()
    pyfast.sparsify(model, "2:4", values="int4", group_size=32)
    dense = model[0].dequantized_weight()
    assert torch.equal(dense != 0, (w != 0) & (dense != 0))    # no pruned weight comes back
    packed4, s4, z4 = pyfast.ops.pack_int4(w, 32, True)
    assert torch.equal(dense, reference.dequantize_int4(packed4, s4, z4, 32))


def test_extension_without_the_kernel_falls_back_and_says_why(monkeypatch):
    """A pyfast._C built from older sources (no pyfast_C::sparse24_int4_mm): a plain call
    runs the reference, and forcing cpp raises with the rebuild advice."""
    from pyfast import dispatch
    from pyfast.backends import cpp
    original = dispatch.kernels("sparse24_int4_mm").get("cpp")
    if original is None or dispatch.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built here (test_fallback covers that case)")
    stale = dispatch.Backend("cpp", "sparse24_int4_mm", original.fn, original.devices,
                             cpp._built("sparse24_int4_mm_of_a_newer_build"), original.source)
    monkeypatch.setitem(dispatch._REGISTRY.kernels["sparse24_int4_mm"], "cpp", stale)
    layer = Sparse24Int4Linear.from_linear(_pruned(64, 8), group_size=32)
    x = torch.randn(3, 64)
    with pyfast.use_backend(sparse24_int4_mm="reference"):
        want = layer(x)
    assert torch.equal(layer(x), want)
    with pytest.raises(pyfast.BackendUnavailableError, match="built from older sources"):
        with pyfast.use_backend(sparse24_int4_mm="cpp"):
            layer(x)
