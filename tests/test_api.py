"""pyfast.quantize / sparsify / swap / summary on small models."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import pyfast
from pyfast.nn import Int4Linear, Int8Linear, Int8WeightOnlyLinear, Sparse24Linear
from pyfast.sparsity import is_24, magnitude_24_mask


class Net(nn.Module):
    def __init__(self, k_odd=96):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
        self.head = nn.Linear(128, 10)
        self.odd = nn.Linear(k_odd, 8)   # K = 96: not a multiple of 128

    def forward(self, x):
        return self.head(self.encoder(x))


# Relative output error on uniform-random weights: int8 rounds to 1/254 of the range,
# int4 to 1/14 of it (about 8% RMS per weight), so the thresholds differ by ~16x.
@pytest.mark.parametrize("method,cls,max_rel_err", [
    ("int8", Int8Linear, 0.02), ("int8-weight", Int8WeightOnlyLinear, 0.02),
    ("int4", Int4Linear, 0.15)])
def test_quantize_replaces_linears_in_place(method, cls, max_rel_err):
    net = Net(k_odd=128)
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = net(x)
    out = pyfast.quantize(net, method)
    assert out is net
    assert all(isinstance(m, cls) for m in (net.encoder[0], net.encoder[2], net.head, net.odd))
    assert not any(type(m) is nn.Linear for m in net.modules())
    with torch.no_grad():
        assert float((net(x) - ref).norm() / ref.norm()) < max_rel_err


def test_quantize_int4_skips_layer_with_reason():
    net = Net()
    with pytest.warns(UserWarning, match="odd: in_features 96 is not a multiple of group_size 128"):
        pyfast.quantize(net, "int4", group_size=128)
    assert type(net.odd) is nn.Linear
    assert isinstance(net.head, Int4Linear)
    assert "odd" in net.pyfast_skipped
    text = str(pyfast.summary(net, print_table=False))
    assert "left as is: odd: in_features 96 is not a multiple of group_size 128" in text


def test_include_exclude_globs_and_callables():
    net = Net()
    pyfast.quantize(net, "int8", include="encoder.*", exclude=["encoder.2"])
    assert isinstance(net.encoder[0], Int8Linear)
    assert type(net.encoder[2]) is nn.Linear and type(net.head) is nn.Linear
    net2 = Net()
    pyfast.quantize(net2, "int8-weight", include=lambda name, mod: mod.out_features == 10)
    assert isinstance(net2.head, Int8WeightOnlyLinear) and type(net2.encoder[0]) is nn.Linear
    with pytest.raises(TypeError, match="include must be a glob string"):
        pyfast.quantize(Net(), "int8", include=[3])


FILTER_ACCEPTED = r"must be a glob string, a list of them or a callable\(name, module\)"


@pytest.mark.parametrize("arg", ["include", "exclude"])
@pytest.mark.parametrize("call", [
    lambda m, kw: pyfast.quantize(m, "int8", **kw),
    lambda m, kw: pyfast.prune.magnitude(m, 0.5, **kw),
    lambda m, kw: pyfast.prune.random(m, 0.5, **kw),
    lambda m, kw: pyfast.prune.n_m(m, 2, 4, **kw),
    lambda m, kw: pyfast.prune.custom(m, lambda n, mod, w: w != 0, **kw),
    lambda m, kw: pyfast.prune.structured(m, 0.5, torch.randn(2, 128), **kw),
], ids=["quantize", "magnitude", "random", "n_m", "custom", "structured"])
def test_filter_that_is_not_iterable_is_named(call, arg):
    """include=5 used to fail inside list(spec) with "'int' object is not iterable"."""
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(TypeError, match=f"{arg} {FILTER_ACCEPTED}; got 5"):
        call(model, {arg: 5})
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


@pytest.mark.parametrize("call", [
    lambda m: pyfast.quantize(m, "int4", group_size="32"),
    lambda m: pyfast.quantize(m, "int2", group_size="32"),
    lambda m: pyfast.sparsify(m, values="int4", group_size="32"),
    lambda m: pyfast.quant.prepare_qat(m, "int4", group_size="32"),
], ids=["quantize-int4", "quantize-int2", "sparsify-int4", "prepare_qat"])
def test_group_size_of_the_wrong_type_is_named(call):
    """group_size="32" used to fail inside abs() with "bad operand type for abs()"."""
    with pytest.raises(TypeError, match="group_size must be an int, got '32'"):
        call(nn.Sequential(nn.Linear(64, 8)))


@pytest.mark.parametrize("method,kwargs,match", [
    ("int8", dict(symmetric=False), "symmetric=False: method 'int8' does not take symmetric"),
    ("int8-weight", dict(symmetric=False), "method 'int8-weight' does not take symmetric"),
    ("binary", dict(symmetric=False), "method 'binary' does not take symmetric"),
    ("int8", dict(group_size=32), "group_size=32: method 'int8' does not take group_size"),
    ("int8-weight", dict(group_size=-1), "method 'int8-weight' does not take group_size"),
    ("int8", dict(group_size=128), "method 'int8' does not take group_size"),
])
def test_quantize_refuses_arguments_the_method_does_not_take(method, kwargs, match):
    """As prepare_qat refuses int8 with symmetric=False: an ignored argument would
    quantize otherwise than the caller asked, silently."""
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=match):
        pyfast.quantize(model, method, **kwargs)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("method,kwargs", [
    ("int8", {}), ("int8", dict(symmetric=True)), ("int8-weight", {}), ("int2", {}),
    ("int2", dict(group_size=32)), ("int2", dict(symmetric=False)), ("binary", dict(group_size=64)),
    ("int4", dict(group_size=32, symmetric=False))])
def test_quantize_takes_defaults_and_the_method_own_arguments(method, kwargs):
    model = nn.Sequential(nn.Linear(128, 8))
    pyfast.quantize(model, method, **kwargs)
    assert type(model[0]) is not nn.Linear


def test_multihead_attention_projection_is_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    with pytest.warns(UserWarning, match="inside nn.MultiheadAttention"):
        pyfast.quantize(model, "int8")
    assert type(model[0].out_proj) is not Int8Linear


def test_bad_method_and_pattern():
    with pytest.raises(ValueError, match="method 'int3' is not supported; accepted: int8, int8-weight, int4"):
        pyfast.quantize(Net(), "int3")
    with pytest.raises(ValueError, match="group_size 48 is not supported"):
        pyfast.quantize(Net(), "int4", group_size=48)
    with pytest.raises(ValueError, match="pattern '1:4' is not supported"):
        pyfast.sparsify(Net(), "1:4")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pyfast.quantize("model", "int8")
    with pytest.raises(ValueError, match="wrap it in a container"):
        pyfast.quantize(nn.Linear(8, 8), "int8")


def test_sparsify_prunes_by_magnitude_and_matches_masked_dense():
    net = Net(k_odd=98)
    dense = Net(k_odd=98)
    dense.load_state_dict(net.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfast.sparsify(net)
    assert "odd: in_features 98 is not a multiple of 4" in str(caught[0].message)
    with torch.no_grad():
        for m in (dense.encoder[0], dense.encoder[2], dense.head):
            m.weight.mul_(magnitude_24_mask(m.weight))
    x = torch.randn(3, 128)
    torch.testing.assert_close(net(x), dense(x), atol=1e-5, rtol=1e-5)
    assert isinstance(net.head, Sparse24Linear) and type(net.odd) is nn.Linear


def test_swap_turns_24_prune_mask_into_sparse24():
    net = Net(k_odd=128)
    w = net.head.weight.detach()
    prune.custom_from_mask(net.head, "weight", magnitude_24_mask(w))
    x = torch.randn(3, 128)
    ref = net(x)
    pyfast.swap(net)
    assert isinstance(net.head, Sparse24Linear)
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    assert type(net.encoder[0]) is nn.Linear and "encoder.0" not in net.pyfast_skipped


def test_swap_makes_other_masks_permanent_and_stays_dense():
    net = Net()
    prune.l1_unstructured(net.encoder[0], "weight", amount=0.5)
    x = torch.randn(3, 128)
    ref = net(x)
    with pytest.warns(UserWarning, match="not 2:4; made permanent"):
        pyfast.swap(net)
    layer = net.encoder[0]
    assert type(layer) is nn.Linear and not hasattr(layer, "weight_orig")
    assert not prune.is_pruned(layer) and not is_24(layer.weight)
    assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(net(x), ref)


def test_swap_converts_quantize_dynamic_model():
    net = Net(k_odd=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated upstream
        qnet = torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)
    qweight = qnet.head.weight()
    x = torch.randn(4, 128)
    pyfast.swap(qnet)
    assert isinstance(qnet.head, Int8Linear) and isinstance(qnet.encoder[0], Int8Linear)
    # the int8 weight moves over bit for bit, with its (per-tensor) scale
    assert torch.equal(qnet.head.canonical_weight(), qweight.int_repr())
    assert torch.allclose(qnet.head.weight_scale, torch.tensor(qweight.q_scale(), dtype=torch.float32))
    # and the layer computes W8A8 with that weight: compare with the dequantized weight
    h = torch.randn(4, 128)
    deq = torch.nn.functional.linear(h, qweight.dequantize(), qnet.head.bias)
    assert float((qnet.head(h) - deq).norm() / deq.norm()) < 0.02
    assert qnet(x).shape == (4, 10)


def test_summary_rows_and_totals():
    net = Net()
    pyfast.quantize(net, "int8", include="encoder.*", layout="canonical")  # VNNI pads N to 48
    pyfast.sparsify(net, include="head")
    s = pyfast.summary(net, print_table=False)
    rows = {r.name: r for r in s}
    assert set(rows) == {"encoder.0", "encoder.2", "head", "odd"}
    r = rows["encoder.0"]
    assert r.type == "Int8Linear" and r.format == "int8 W8A8"
    assert r.params == 128 * 256 + 256
    assert r.bytes_before == (128 * 256 + 256) * 4
    assert r.bytes_after == 128 * 256 + 256 * 4 + 256 * 4      # int8 weight, scales, bias
    assert rows["head"].sparsity == pytest.approx(0.5, abs=0.02)
    assert rows["odd"].format == "dense float32" and rows["odd"].bytes_after == rows["odd"].bytes_before
    assert s.total_before == sum(x.bytes_before for x in s)
    assert "total" in str(s) and "x smaller" in str(s)


# --- low-bit methods: int2 and binary through the same API -----------------------------------

@pytest.mark.parametrize("method,group_size,bits,gs", [("int2", 32, 2, 32), ("int2", None, 2, 128),
                                                       ("binary", None, 1, -1), ("binary", 64, 1, 64)])
def test_quantize_lowbit_methods(method, group_size, bits, gs):
    from pyfast.nn import LowBitLinear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = {n: m.weight.detach().clone() for n, m in model.named_children() if isinstance(m, nn.Linear)}
    kw = {} if group_size is None else {"group_size": group_size}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pyfast.quantize(model, method, **kw)
    assert isinstance(model[0], LowBitLinear) and (model[0].bits, model[0].group_size) == (bits, gs)
    # independent check of the layer's weight: the op's packing of the same weight
    packed, scales, zeros = pyfast.ops.pack_lowbit(ref["0"], bits, gs)
    assert torch.equal(model[0].packed, packed) and torch.equal(model[0].scales, scales)
    if group_size == 32 or (method == "int2" and group_size is None):
        assert "2" in model.pyfast_skipped        # 16 inputs: no whole group of 32 / 128
    x = torch.randn(3, 128)
    assert model(x).shape == (3, 4)


def test_quantize_lowbit_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size 48 is not supported"):
        pyfast.quantize(nn.Sequential(nn.Linear(64, 4)), "int2", group_size=48)


def test_magnitude_24_mask_breaks_ties_by_lower_index():
    """As its docstring says: equal |w| in a group keep the lower positions, on any
    device (a stable sort; topk gave positions 2 and 3 for four equal values)."""
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    assert magnitude_24_mask(w).tolist() == [[True, True, False, False,
                                              False, True, True, False,
                                              True, True, False, False]]


def test_the_warning_names_only_what_this_call_left():
    """model.pyfast_skipped keeps every call's reasons, but the warning repeated those of
    earlier calls, for layers this call did not even look at."""
    model = nn.Sequential(nn.Linear(30, 8), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"0: in_features 30 .*; 1: in_features 8"):
        pyfast.quantize(model, "int4", group_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfast.quantize(model, "int4", group_size=32, include="1")
    assert [str(w.message).split(": ", 1)[1][:2] for w in caught] == ["1:"]
    assert set(model.pyfast_skipped) == {"0", "1"}
