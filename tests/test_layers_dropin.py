"""pyfast.nn layers as drop-in modules: load_state_dict (refused loads, other layouts),
casts and moves of trainable tensors, orig_dtype after a cast, conv memory format.

Each test here pins down a behaviour a torch module user relies on and that a layer
got wrong before (the docstrings say what it did).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyfast
from pyfast.nn import (Int4Linear, Int8Linear, Int8WeightOnlyLinear, LowBitLinear, QuantConv2d,
                       Sparse24Int4Linear, Sparse24Linear, StaticInt8Linear)
from pyfast.nn import layout as L

K, N = 128, 40


def _lin(seed=0, k=K, n=N, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


# Every layer that stores its weight in one of two layouts, made in a given layout.
LAYOUTS = {
    "int8": (("canonical", "vnni"), lambda lin, lay: Int8Linear.from_linear(lin, layout=lay)),
    "static": (("canonical", "vnni"), lambda lin, lay: StaticInt8Linear.from_linear(
        lin, torch.tensor([0.02]), layout=lay)),
    "int4": (("canonical", "tc"), lambda lin, lay: Int4Linear.from_linear(
        lin, group_size=32, symmetric=False, layout=lay)),
    "2:4": (("canonical", "tc"), lambda lin, lay: Sparse24Linear.from_linear(
        lin, prune=True, layout=lay)),
    "2:4+int4": (("canonical", "tc"), lambda lin, lay: Sparse24Int4Linear.from_linear(
        lin, prune=True, group_size=32, symmetric=False, layout=lay)),
}


def _state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _same_state(layer, state):
    now = layer.state_dict()
    return now.keys() == state.keys() and all(
        now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k], v)
        for k, v in state.items())


def _canonical_state(layer):
    return _state(copy.deepcopy(layer).repack("canonical"))


# --- a refused load_state_dict leaves the layer as it was ------------------------------

def _bad_int4(sd):
    sd["scales"] *= 3                     # valid on its own: must not stay either
    sd["zeros"][0, 0] = 200


def _bad_static(sd):
    sd["weight_scale"] *= 2
    sd["input_scale"] = torch.tensor([0.0])


def _bad_24(sd):
    sd["values"] *= 2
    sd["meta"][1, 2] = 0x0B               # idx0 = 3 > idx1 = 2


def _bad_24int4(sd):
    sd["scales"] *= 2
    sd["meta"][1, 2] = 0xB4


def _bad_lowbit(sd):
    sd["scales"] *= 2
    sd["zeros"][1, 0] = 200


def _bad_shape(sd):                       # torch's own refusal, after copying the others
    sd["scales"] *= 3
    sd["zeros"] = sd["zeros"][:, :1].clone()


REFUSED = {
    "int4-zero-point": (lambda: Int4Linear.from_linear(_lin(), group_size=32, symmetric=False,
                                                       layout="canonical"), _bad_int4),
    "static-scale": (lambda: StaticInt8Linear.from_linear(_lin(), torch.tensor([0.02])),
                     _bad_static),
    "2:4-meta": (lambda: Sparse24Linear.from_linear(_lin(), prune=True, layout="canonical"),
                 _bad_24),
    "2:4+int4-meta": (lambda: Sparse24Int4Linear.from_linear(
        _lin(), prune=True, group_size=32, layout="canonical"), _bad_24int4),
    "int2-zero-point": (lambda: LowBitLinear.from_linear(_lin(), bits=2, group_size=32),
                        _bad_lowbit),
    "int4-shape": (lambda: Int4Linear.from_linear(_lin(), group_size=32, symmetric=False,
                                                  layout="canonical"), _bad_shape),
}


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_load_state_dict_leaves_the_layer_as_it_was(case, assign):
    """README: 'A refused load leaves the model as it was.' The layer copied (or assigned)
    every tensor first and checked the values after, so after the caught error it kept
    the refused ones (an int4 zero point of 200, an input scale of 0 that gave the bias
    alone) and computed garbage; the valid tensors of the refused dict stayed in too."""
    make, spoil = REFUSED[case]
    layer = make()
    objects = dict(layer._buffers)
    before = _state(layer)
    x = torch.randn(3, K)
    want = layer(x)
    sd = _state(layer)
    spoil(sd)
    with pytest.raises(RuntimeError):
        layer.load_state_dict(sd, assign=assign)
    assert _same_state(layer, before)
    assert all(layer._buffers[n] is t for n, t in objects.items())
    assert torch.equal(layer(x), want)
    layer.load_state_dict(_state(make()), assign=assign)     # a valid dict still loads
    assert torch.equal(layer(x), want)


def test_a_refused_load_inside_a_model_names_the_layer_and_keeps_it():
    model = nn.Sequential(REFUSED["2:4-meta"][0](), nn.ReLU())
    before = _state(model)
    sd = _state(model)
    sd["0.meta"][1, 2] = 0x0B
    with pytest.raises(RuntimeError, match=r"Sparse24Linear at '0\.': meta\[1, 2\] = 11"):
        model.load_state_dict(sd)
    assert _same_state(model, before)


# --- a state_dict of the other layout loads -----------------------------------------------

@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("to_fast", [True, False], ids=["into-fast", "into-canonical"])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_a_state_dict_of_the_other_layout_loads_into_the_layers_own(kind, to_fast, assign):
    """layout="auto" resolves by machine and device (VNNI on an AVX-512 VNNI CPU, tc on a
    CUDA GPU in fp16/bf16, canonical elsewhere and on the meta device), so a state_dict
    saved on one machine failed to load into the same model quantized on another with a
    bare 'size mismatch for weight_int8'. The incoming weight is now re-laid into the
    layer's own layout: the layer keeps its layout and computes what the source did."""
    (canonical, fast), make = LAYOUTS[kind]
    src_layout, dst_layout = (canonical, fast) if to_fast else (fast, canonical)
    src = make(_lin(0), src_layout)
    dst = make(_lin(1), dst_layout)
    incoming = src.state_dict()
    kept = _state(src)
    dst.load_state_dict(incoming, assign=assign)
    assert dst.layout == dst_layout
    assert _same_state(src, kept)                            # the source is not touched
    assert all(torch.equal(a, b) for a, b in zip(_canonical_state(dst).values(),
                                                 _canonical_state(src).values()))
    assert _same_state(dst, _state(copy.deepcopy(src).repack(dst_layout)))
    x = torch.randn(4, K)
    with pyfast.use_backend("reference"):
        assert torch.equal(dst(x), src(x))


def test_a_meta_skeleton_loads_a_state_dict_of_the_vnni_layout():
    """The usual 'build on meta, load_state_dict(assign=True)': the skeleton resolves
    "auto" to canonical on the meta device, the real layer to VNNI (forced here, as
    auto does on an AVX-512 VNNI CPU)."""
    real = nn.Sequential(Int8Linear.from_linear(_lin(0, 1024, 1024), layout="vnni"))
    with torch.device("meta"):
        skeleton = nn.Sequential(Int8Linear.from_linear(nn.Linear(1024, 1024)))
    assert skeleton[0].layout == "canonical"
    skeleton.load_state_dict(real.state_dict(), assign=True)
    assert skeleton[0].weight_int8.device.type == "cpu"
    x = torch.randn(2, 1024)
    assert torch.equal(skeleton(x), real(x))


def test_a_conv_state_dict_of_the_other_layout_loads():
    conv = nn.Conv2d(8, 48, 3)
    vnni = QuantConv2d.from_conv(conv, lambda lin: Int8Linear.from_linear(lin, layout="vnni"))
    canon = QuantConv2d.from_conv(nn.Conv2d(8, 48, 3),
                                  lambda lin: Int8Linear.from_linear(lin, layout="canonical"))
    canon.load_state_dict(vnni.state_dict())
    x = torch.randn(2, 8, 6, 6)
    assert canon.inner.layout == "canonical" and torch.equal(canon(x), vnni(x))


@pytest.mark.parametrize("kind", ["2:4", "2:4+int4"])
def test_a_bad_meta_byte_in_the_other_layout_is_refused_and_changes_nothing(kind):
    """A canonical meta byte outside the format, loaded into a tc layer: the repack that
    re-lays it refuses it; reported as load_state_dict reports a bad value."""
    (canonical, fast), make = LAYOUTS[kind]
    layer = make(_lin(1), fast)
    before = _state(layer)
    sd = _state(make(_lin(0), canonical))
    sd["meta"][1, 2] = 0x0B if kind == "2:4" else 0xB4
    name = "Sparse24Linear" if kind == "2:4" else "Sparse24Int4Linear"
    with pytest.raises(RuntimeError, match=rf"{name} at '': .*meta\)?\[1, [245]\] = 11 "
                                           r"is not a 2:4 index pair"):
        layer.load_state_dict(sd)
    assert _same_state(layer, before) and layer.layout == fast


# --- trainable bias / 2:4 values through casts and moves ---------------------------------

TRAINABLE = {
    "int4-bias": (lambda: Int4Linear.from_linear(_lin(), group_size=32), "bias"),
    "int8-weight-bias": (lambda: Int8WeightOnlyLinear.from_linear(_lin()), "bias"),
    "2:4-values": (lambda: Sparse24Linear.from_linear(_lin(), prune=True), "values"),
    "2:4-bias": (lambda: Sparse24Linear.from_linear(_lin(), prune=True), "bias"),
    "2:4+int4-bias": (lambda: Sparse24Int4Linear.from_linear(_lin(), prune=True,
                                                             group_size=32), "bias"),
    "int2-bias": (lambda: LowBitLinear.from_linear(_lin(), bits=2, group_size=32), "bias"),
}


@pytest.mark.parametrize("case", list(TRAINABLE))
def test_casts_keep_a_trainable_bias_or_values_the_optimizers_tensor(case):
    """After .bfloat16() a trainable bias (or 2:4 values) was a non-leaf copy with a
    ToCopyBackward0 to the old float32 tensor: the gradient went there, the optimizer
    updated a tensor the layer no longer read, training silently stopped, and deepcopy
    raised. It now stays the same leaf tensor, as nn.Module keeps a Parameter."""
    make, name = TRAINABLE[case]
    layer = make()
    t = layer.get_buffer(name).requires_grad_()
    opt = torch.optim.SGD([t], lr=0.5)
    layer.to("cpu").bfloat16()
    assert layer.get_buffer(name) is t and t.is_leaf and t.dtype == torch.bfloat16
    x = torch.randn(4, K, dtype=torch.bfloat16)
    layer(x).float().pow(2).sum().backward()
    assert t.grad is not None and t.grad.dtype == torch.bfloat16
    before = t.detach().clone()
    opt.step()
    assert not torch.equal(layer.get_buffer(name).detach(), before)
    copy.deepcopy(layer)
    layer.float()                         # the gradient follows the cast, as a Parameter's
    assert layer.get_buffer(name) is t and t.dtype == t.grad.dtype == torch.float32
    layer(x.float()).sum().backward()


@pytest.mark.parametrize("case", ["int4-bias", "2:4-values"])
def test_a_move_to_another_device_keeps_a_trainable_tensor_a_trainable_leaf(case):
    make, name = TRAINABLE[case]
    layer = make()
    layer.get_buffer(name).requires_grad_()
    moved = layer.to("meta").get_buffer(name)
    assert moved.device.type == "meta" and moved.requires_grad and moved.is_leaf
    torch.optim.SGD([moved], lr=0.1)


# --- orig_dtype follows casts ---------------------------------------------------------

ORIG = {
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "int8-weight": lambda lin: Int8WeightOnlyLinear.from_linear(lin),
    "static": lambda lin: StaticInt8Linear.from_linear(lin, torch.tensor([0.02])),
    "int4": lambda lin: Int4Linear.from_linear(lin, group_size=32),
    "2:4": lambda lin: Sparse24Linear.from_linear(lin, prune=True),
    "2:4+int4": lambda lin: Sparse24Int4Linear.from_linear(lin, prune=True, group_size=32),
    "int2": lambda lin: LowBitLinear.from_linear(lin, bits=2, group_size=32),
}


@pytest.mark.parametrize("kind", list(ORIG))
def test_orig_dtype_follows_a_cast_of_the_model(kind):
    """orig_dtype is the dtype of the dense layer a layer stands for. It stayed float32
    after model.half(), so pyfast_config() (what pyfast.save records) and dense_bytes()
    (summary's 'before') described an fp32 model; moves leave it alone."""
    layer = ORIG[kind](_lin())
    for cast, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.to("cpu"), torch.float16),
                        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                        (lambda m: m.float(), torch.float32)):
        cast(layer)
        assert layer.orig_dtype == dtype and layer.bias.dtype == dtype
        assert layer.pyfast_config()["orig_dtype"] == str(dtype).replace("torch.", "")
        assert layer.dense_bytes() == (N * K + N) * dtype.itemsize


def test_repack_auto_after_a_cast_asks_about_the_cast_dtype(monkeypatch):
    """Quantize in fp32, model.half(), move, pyfast.repack(model): Int4Linear and
    Sparse24Int4Linear asked the tensor-core check about float32 (their stale orig_dtype)
    and stayed canonical, while Sparse24Linear (its values' dtype) went tc. Here a
    stand-in for 'a GPU with the kernels' takes fp16/bf16 on any device."""
    asked = []

    def why_not_tc(op, device, dtype):
        asked.append((op, dtype))
        return None if dtype in (torch.float16, torch.bfloat16) else "not fp16/bf16"

    monkeypatch.setattr(L, "why_not_tc", why_not_tc)
    model = nn.Sequential(ORIG["int4"](_lin(0, K, K)), ORIG["2:4"](_lin(1, K, K)),
                          ORIG["2:4+int4"](_lin(2, K, N)))
    assert [m.layout for m in model] == ["canonical"] * 3
    x = torch.randn(2, K, dtype=torch.float16)
    with pyfast.use_backend("reference"):
        want = model.half()(x)
    asked.clear()
    pyfast.repack(model)
    assert {dtype for _, dtype in asked} == {torch.float16}
    assert [m.layout for m in model] == ["tc"] * 3
    with pyfast.use_backend("reference"):
        assert torch.equal(model(x), want)


def test_a_cast_model_saves_and_loads_its_dtype(tmp_path):
    def build():
        return nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))

    model = build()
    pyfast.quantize(model, "int4", group_size=32)
    model.half()
    pyfast.save(model, tmp_path / "new.safetensors")
    model[2].orig_dtype = torch.float32   # what this version saved for a cast model
    pyfast.save(model, tmp_path / "old.safetensors")
    for name in ("new", "old"):
        with torch.device("meta"):
            skeleton = build()
        loaded = pyfast.load(skeleton, tmp_path / f"{name}.safetensors")
        assert loaded[0].orig_dtype == loaded[2].orig_dtype == torch.float16, name
        x = torch.randn(2, K, dtype=torch.float16)
        assert torch.equal(loaded(x), model(x))


# --- conv output memory format ----------------------------------------------------------

@pytest.mark.parametrize("c_in", [1, 3])
@pytest.mark.parametrize("how", ["to", "contiguous", "plain"])
def test_conv_output_memory_format_is_nn_conv2ds(c_in, how):
    """A channels_last [B, 1, H, W] input is also contiguous; the layer read that as 'not
    channels_last' and returned a contiguous output where nn.Conv2d gives channels_last
    (grayscale images: every later layer of a channels_last CNN got the other format)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 16, 3, padding=1)
    x = torch.randn(2, c_in, 6, 6)
    if how == "to":
        x = x.to(memory_format=torch.channels_last)
    elif how == "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    want = conv(x)
    qat = pyfast.quant.QATConv2d.from_conv(copy.deepcopy(conv), "int8")
    for q in (QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear), qat):
        got = q(x)
        for fmt in (torch.channels_last, torch.contiguous_format):
            assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt)
        assert got.stride() == want.stride()
    assert torch.allclose(QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear)(x), want,
                          atol=0.05)
