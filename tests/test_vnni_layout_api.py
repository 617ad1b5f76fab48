"""The int8 VNNI layout through the public API: Int8Linear in either layout, layout
"auto", pyfast.repack, quantize / sparsify arguments, save/load, the reference fallback.

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
from pyfast.nn import Int4Linear, Int8Linear
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
    layer = Int8Linear.from_linear(_linear())
    assert layer.layout == ("vnni" if why is None else "canonical")
    if why is None:  # the CPU has AVX-512 VNNI: force the AVX2 level of the C++ kernels
        cops = torch.ops.pyfast_C
        previous = cops.set_cpu_isa("avx2")
        try:
            why2 = L.why_not_vnni("cpu")
            assert "avx2 level" in why2 and "AVX-512 VNNI" in why2
            assert Int8Linear.from_linear(_linear()).layout == "canonical"
        finally:
            cops.set_cpu_isa(previous)
    assert "cuda" in L.why_not_vnni(torch.device("cuda"))


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
    conv = pyfast.quantize(nn.Sequential(nn.Conv2d(3, 8, 3)), "int8")
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
