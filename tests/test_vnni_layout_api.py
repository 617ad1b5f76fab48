"""The int8 VNNI layout through the public API: Int8Linear and StaticInt8Linear in
either layout, layout "auto", pyfast.repack, quantize / sparsify / convert_static
arguments, save/load, the reference fallback.

The layout itself and the C++ kernel that reads it are tested in
tests/test_cpu_int8_vnni.py; here the point is that a layer gives the same answer in
either layout and that the layout is chosen, kept and refused as documented.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfast
from pyfast import ops
from pyfast import quant
from pyfast.nn import Int4Linear, Int8Linear, QuantConv2d, StaticInt8Linear
from pyfast.nn import layout as L

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _linear(k=100, n=50, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_output_in_both_layouts(dtype):
    lin = _linear()
    canon = Int8Linear.from_linear(lin, layout="canonical")
    vnni = Int8Linear.from_linear(lin, layout="vnni")
    assert canon.layout == "canonical" and vnni.layout == "vnni"
    assert tuple(vnni.weight_int8.shape) == (2, 25, 48, 4)
    assert torch.equal(vnni.canonical_weight(), canon.weight_int8)
    assert canon.canonical_weight() is canon.weight_int8
    x = torch.randn(2, 3, 100).to(dtype)
    assert torch.equal(vnni(x), canon(x))              # bit-exact: same int32 sums
    with pyfast.use_backend("reference"):               # the reference un-repacks
        assert torch.equal(vnni(x), canon(x))


def test_repack_round_trip_and_format():
    lin = _linear()
    layer = Int8Linear.from_linear(lin, layout="canonical")
    w = layer.weight_int8.clone()
    x = torch.randn(5, 100)
    y = layer(x)
    assert layer.repack("vnni") is layer and layer.layout == "vnni"
    assert "VNNI layout" in layer.format and "VNNI layout" in repr(layer)
    assert layer.storage_bytes() == 2 * 25 * 48 * 4 + 50 * 4 + 50 * 4   # padded weight, scales, bias
    assert torch.equal(layer(x), y)
    layer.repack("canonical")
    assert layer.format == "int8 W8A8" and torch.equal(layer.weight_int8, w)


def test_auto_is_vnni_exactly_where_the_kernel_runs():
    why = L.why_not_vnni(torch.device("cpu"))
    layer = Int8Linear.from_linear(_linear(n=96))          # 96 = 2 panels: no padding
    assert layer.layout == ("vnni" if why is None else "canonical")
    if why is None:  # the CPU has AVX-512 VNNI: force the AVX2 level of the C++ kernels
        cops = torch.ops.pyfast_C
        previous = cops.set_cpu_isa("avx2")
        try:
            why2 = L.why_not_vnni("cpu")
            assert "avx2 level" in why2 and "AVX-512 VNNI" in why2
            assert Int8Linear.from_linear(_linear(n=96)).layout == "canonical"
        finally:
            cops.set_cpu_isa(previous)
    assert "cuda" in L.why_not_vnni(torch.device("cuda"))


@pytest.mark.parametrize("n,k,auto_vnni", [(50, 100, False), (256, 64, False), (96, 100, True),
                                           (512, 70, True), (10, 3, False)],
                         ids=lambda v: str(v))
def test_auto_keeps_small_layers_canonical(n, k, auto_vnni):
    """"auto" takes the VNNI panels only where they pad the weight by at most 1/16
    (N = 50 and 256 pad by 92% and 12.5%; 96 and 512 by 0% and 3.1%, K = 70 by 1.4%);
    layout="vnni" still forces them, with the same output."""
    pad = L.vnni_padding(n, k)
    assert (pad <= L.VNNI_MAX_PADDING) == auto_vnni
    kernel_runs = L.why_not_vnni("cpu") is None
    lin = _linear(k, n)
    auto = Int8Linear.from_linear(lin)
    assert auto.layout == ("vnni" if kernel_runs and auto_vnni else "canonical")
    if kernel_runs and not auto_vnni:
        assert f"N = {n}, K = {k}: VNNI panels would pad the weight by {pad:.1%}" in \
            L.why_not_vnni("cpu", shape=(n, k))
    forced = Int8Linear.from_linear(lin, layout="vnni")
    assert forced.layout == "vnni"
    x = torch.randn(3, k)
    assert torch.equal(forced(x), auto(x))


@pytest.mark.parametrize("bad", ["tc", "VNNI", None, 1])
def test_bad_layout_is_rejected_with_the_choices(bad):
    with pytest.raises(ValueError, match="accepted: 'canonical', 'vnni', 'auto'"):
        Int8Linear.from_linear(_linear(), layout=bad)
    with pytest.raises(ValueError, match="not supported by Int8Linear"):
        Int8Linear(100, 50, layout="auto" if bad is None else bad)
    with pytest.raises(ValueError, match="by method 'int8'"):
        pyfast.quantize(nn.Sequential(_linear()), "int8", layout=bad)


def test_each_method_takes_only_its_own_layout():
    with pytest.raises(ValueError, match="'vnni' is not supported by method 'int4'"):
        pyfast.quantize(nn.Sequential(_linear(k=128)), "int4", layout="vnni")
    with pytest.raises(ValueError, match="'vnni' is not supported by method 'int8-weight'"):
        pyfast.quantize(nn.Sequential(_linear()), "int8-weight", layout="vnni")
    with pytest.raises(ValueError, match="'vnni' is not supported by sparsify"):
        pyfast.sparsify(nn.Sequential(_linear()), layout="vnni")
    with pytest.raises(ValueError, match="not supported by Int4Linear"):
        Int4Linear.from_linear(_linear(k=128), group_size=32, layout="vnni")


def test_model_api_layout_and_repack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    x = torch.randn(3, 64)
    pyfast.quantize(model, "int8", layout="vnni", include=["0", "2"])
    pyfast.quantize(model, "int4", group_size=32, layout="tc", include="4")
    def ref():  # the int4 layer sums in another order on its C++ kernel
        return pyfast.use_backend("reference")

    with ref():
        y = model(x)
    assert [model[i].layout for i in (0, 2, 4)] == ["vnni", "vnni", "tc"]
    pyfast.repack(model, "tc")                        # only the layers that have "tc"
    assert [model[i].layout for i in (0, 2, 4)] == ["vnni", "vnni", "tc"]
    pyfast.repack(model, "canonical")
    assert [model[i].layout for i in (0, 2, 4)] == ["canonical"] * 3
    with ref():
        assert torch.equal(model(x), y)
    pyfast.repack(model, "vnni")                      # only the Int8Linear layers
    assert [model[i].layout for i in (0, 2, 4)] == ["vnni", "vnni", "canonical"]
    with ref():
        assert torch.equal(model(x), y)


def test_save_load_keeps_the_layout(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 8))
    pyfast.quantize(model, "int8", layout="vnni", include="0")
    pyfast.quantize(model, "int8", layout="canonical", include="2")
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    loaded = pyfast.load(nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 8)), path)
    assert loaded[0].layout == "vnni" and loaded[2].layout == "canonical"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 64)
    assert torch.equal(model(x), loaded(x))


def test_torch_ao_swap_and_conv_get_the_auto_layout():
    why = L.why_not_vnni("cpu")
    want = "vnni" if why is None else "canonical"
    conv = pyfast.quantize(nn.Sequential(nn.Conv2d(3, 96, 3)), "int8")
    x = torch.randn(1, 3, 6, 6)
    assert conv[0].inner.layout == want
    y = conv(x)
    pyfast.repack(conv, "canonical")
    assert torch.equal(conv(x), y)


def test_op_wrappers():
    w = torch.randint(-128, 128, (50, 13), dtype=torch.int8)
    x, s = torch.randn(3, 13), torch.rand(50) + 0.5
    v = ops.repack_int8_vnni(w)
    assert torch.equal(ops.w8a8_mm_vnni(x, v, s), ops.w8a8_mm(x, w, s))

    a, sa, b = torch.randint(-128, 128, (3, 13), dtype=torch.int8), torch.rand(3), torch.randn(50)
    assert torch.equal(ops.int8_mm_vnni(a, v, sa, s), ops.int8_mm(a, w, sa, s))
    out = ops.int8_mm_vnni(a, v, sa, s, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ops.int8_mm(a, w, sa, s, b, torch.bfloat16))
    with pytest.raises(ValueError, match="a has K = 131072; int8_mm_vnni accepts K <= 131071"):
        big = torch.zeros(1, 131072, dtype=torch.int8)
        ops.int8_mm_vnni(big, ops.repack_int8_vnni(torch.zeros(2, 131072, dtype=torch.int8)),
                         torch.ones(1), torch.ones(2))


# --- StaticInt8Linear (quantize_static + int8_mm, or int8_mm_vnni on the VNNI weight) ----

def _static(layout, lin=None, scale=0.02):
    return StaticInt8Linear.from_linear(lin or _linear(), torch.tensor([scale]), layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_static_same_output_in_both_layouts(dtype):
    lin = _linear()
    canon, vnni = _static("canonical", lin), _static("vnni", lin)
    assert canon.layout == "canonical" and vnni.layout == "vnni"
    assert tuple(vnni.weight_int8.shape) == (2, 25, 48, 4)
    assert torch.equal(vnni.canonical_weight(), canon.weight_int8)
    assert "VNNI layout" in vnni.format and canon.format == "int8 W8A8 static"
    x = torch.randn(2, 3, 100).to(dtype)
    x[0, 1, 7] = float("nan")                          # that row is NaN in both layouts
    y = canon(x)
    assert y[0, 1].isnan().all() and not y[0, 0].isnan().any()
    torch.testing.assert_close(vnni(x), y, rtol=0, atol=0, equal_nan=True)
    with pyfast.use_backend("reference"):               # the reference un-repacks
        torch.testing.assert_close(vnni(x), y, rtol=0, atol=0, equal_nan=True)


def test_static_auto_layout_follows_int8_mm_vnni(monkeypatch):
    why = L.why_not_vnni("cpu", "int8_mm_vnni")
    assert _static("auto", _linear(n=96)).layout == ("vnni" if why is None else "canonical")
    assert _static("auto").layout == "canonical"            # N = 50: 92% padding
    # an extension without int8_mm_vnni (built from older sources): StaticInt8Linear
    # stays canonical even where Int8Linear's w8a8_mm_vnni would run
    kernels = L.dispatch.kernels
    monkeypatch.setattr(L.dispatch, "kernels", lambda op: {} if op == "int8_mm_vnni" else kernels(op))
    assert L.why_not_vnni("cpu", "int8_mm_vnni") == "no C++ CPU kernel is registered for int8_mm_vnni"
    assert _static("auto", _linear(n=96)).layout == "canonical"
    assert Int8Linear.from_linear(_linear(n=96)).layout == (
        "vnni" if L.why_not_vnni("cpu") is None else "canonical")
    with pytest.raises(ValueError, match="not supported by StaticInt8Linear"):
        _static("tc")
    with pytest.raises(ValueError, match="not supported by StaticInt8Linear"):
        StaticInt8Linear(100, 50, layout="auto")


def test_static_convert_repack_save_load(tmp_path):
    """convert_static's layout reaches every layer (Conv2d ones too), pyfast.repack
    re-lays them, save/load keeps the layout and the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    quant.quantize_static(model, batches, layout="vnni", progress=False)
    assert isinstance(model[0], QuantConv2d) and model[0].inner.layout == "vnni"
    assert isinstance(model[3], StaticInt8Linear) and model[3].layout == "vnni"
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    pyfast.repack(model, "canonical")
    assert model[0].inner.layout == "canonical" and model[3].layout == "canonical"
    assert torch.equal(model(x), y)
    pyfast.repack(model, "vnni")
    path = tmp_path / "static.safetensors"
    pyfast.save(model, path)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    loaded = pyfast.load(fresh, path)
    assert loaded[0].inner.layout == "vnni" and loaded[3].layout == "vnni"
    assert torch.equal(loaded(x), y)
    with pytest.raises(ValueError, match="not supported by convert_static"):
        quant.convert_static(nn.Sequential(nn.Linear(4, 4)), layout="tc")
    with pytest.raises(ValueError, match="not supported by quantize_static"):
        quant.quantize_static(nn.Sequential(nn.Linear(4, 4)), batches, layout="tc")
