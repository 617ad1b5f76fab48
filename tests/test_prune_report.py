"""pyfast.prune reporting (pyfast.summary, prune.sparsity) and the training penalties."""
import math
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast import prune, quant


from test_prune_masks import convnet, mlp  # noqa: E402  (the same small models)


def zeros(m):
    return int((m.weight.detach() == 0).sum())


# --- reporting -----------------------------------------------------------------------------

def test_summary_and_sparsity_read_the_masked_weight_and_list_convs():
    net = convnet()
    prune.magnitude(net, 0.5)
    rows = {r.name: r for r in pyfast.summary(net, print_table=False)}
    assert set(rows) == {"0", "3"}
    assert rows["0"].type == "Conv2d" and rows["0"].format == "dense float32, masked"
    assert rows["0"].params == 8 * 4 * 9 + 8 and rows["0"].weights == 8 * 4 * 9
    assert rows["0"].sparsity == pytest.approx(round(0.5 * 288) / 288)
    assert rows["3"].type == "Linear" and rows["3"].sparsity == pytest.approx(0.5)
    s = prune.sparsity(net)
    n0, n3 = net[0].weight.numel(), net[3].weight.numel()
    assert s["0"] == pytest.approx(zeros(net[0]) / n0)
    assert s.overall == pytest.approx((zeros(net[0]) + zeros(net[3])) / (n0 + n3))
    assert s.weights == n0 + n3 and "overall" in str(s)


def test_summary_lists_a_wrapper_once_not_its_inner_layer():
    net = convnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyfast.quantize(net, "int8")
    s = pyfast.summary(net, print_table=False)
    rows = {r.name: r for r in s}
    assert set(rows) == {"0", "3"}                      # not "0.inner" as well
    assert rows["0"].type == "QuantConv2d" and "conv" in rows["0"].format
    assert rows["0"].params == 8 * 36 + 8
    assert rows["0"].bytes_after == net[0].inner.storage_bytes()
    assert s.total_before == sum(r.bytes_before for r in s)
    alone = pyfast.summary(net[0], print_table=False)   # the wrapper is the model itself
    assert [(r.name, r.type) for r in alone] == [("", "QuantConv2d")]


# --- penalties -------------------------------------------------------------------------------

def test_l1_and_slimming_penalties_and_their_gradients():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.0]))
    p = prune.l1_penalty(net, 1e-3)
    expected = 1e-3 * (net[0].weight.abs().sum() + net[4].weight.abs().sum())
    torch.testing.assert_close(p, expected)
    p.backward()
    torch.testing.assert_close(net[4].weight.grad, 1e-3 * net[4].weight.detach().sign())
    s = prune.slimming_penalty(net, 0.1)
    assert float(s.detach()) == pytest.approx(0.1 * 3.5)
    s.backward()
    torch.testing.assert_close(net[1].weight.grad, 0.1 * torch.tensor([1.0, -1.0, 1.0, 0.0]))
    assert float(prune.l1_penalty(net, 1.0, include="4").detach()) == pytest.approx(
        float(net[4].weight.detach().abs().sum()))


def test_penalty_errors():
    with pytest.raises(ValueError, match="no affine BatchNorm layer"):
        prune.slimming_penalty(mlp())
    with pytest.raises(ValueError, match="no nn.Linear / nn.Conv2d layer"):
        prune.l1_penalty(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"weight must be a float >= 0 .*got -1"):
        prune.l1_penalty(mlp(), -1)
    with pytest.raises(ValueError, match="weight must be a float >= 0"):
        prune.slimming_penalty(mlp(), "big")


@pytest.mark.parametrize("method", ["int8", "int8-weight", "int4", "static"])
def test_quantized_layers_report_the_zeros_of_their_weight(method):
    """A 50%-pruned layer stays 50% zeros once quantized (a zero weight is a zero int8
    code, or an int4 code equal to its zero point); summary said 0.0% for every
    quantized layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    prune.magnitude(model, 0.5)
    prune.finish(model)
    if method == "static":
        quant.quantize_static(model, [torch.randn(4, 128)], progress=False)
    else:
        pyfast.quantize(model, method, **({"group_size": 32} if method == "int4" else {}))
    row = pyfast.summary(model, print_table=False)[0]
    assert row.sparsity == pytest.approx(0.5, abs=0.01), row
    assert prune.sparsity(model)["0"] == pytest.approx(0.5, abs=0.01)


def test_summary_of_a_meta_model_has_no_sparsity_but_does_not_fail():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    rows = pyfast.summary(model, print_table=False)
    assert len(rows) == 2 and all(math.isnan(r.sparsity) for r in rows)
    assert rows[0].params == 64 * 32 + 32


def test_summary_lists_qat_layers_with_their_float_bytes():
    """A model prepared for QAT listed no rows at all (QATLinear is not an nn.Linear)."""
    net = convnet()
    quant.prepare_qat(net, "int4", group_size=-1, symmetric=False)
    rows = {r.name: r for r in pyfast.summary(net, print_table=False)}
    assert set(rows) == {"0", "3"}
    assert rows["0"].type == "QATConv2d" and rows["3"].type == "QATLinear"
    assert rows["3"].format == "QAT int4 per-channel asym, fp32"
    assert rows["3"].params == 8 * 16 * 4 + 4 and rows["3"].weights == 8 * 16 * 4
    assert rows["3"].bytes_before == rows["3"].bytes_after == (8 * 16 * 4 + 4) * 4
    net8 = quant.prepare_qat(mlp(), "int8")
    assert {r.format for r in pyfast.summary(net8, print_table=False)} == {"QAT int8 W8A8, fp32"}


def test_summary_lists_a_low_rank_pair_as_one_layer():
    """It showed `first` and `second` as two dense layers and the saving as 1.00x."""
    from pyfast import lowrank
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Conv2d(4, 16, 3, bias=False))
    lowrank.factorize(net, rank=4)
    s = pyfast.summary(net, print_table=False)
    rows = {r.name: r for r in s}
    assert set(rows) == {"0", "2"}
    lin, conv = rows["0"], rows["2"]
    assert (lin.type, lin.format) == ("LowRankLinear", "rank 4: dense float32")
    assert lin.params == 64 * 48 + 48 and lin.bytes_before == lin.params * 4
    assert lin.bytes_after == (4 * (64 + 48) + 48) * 4 and lin.weights == 4 * (64 + 48)
    assert conv.type == "LowRankConv2d" and conv.params == 16 * 4 * 9
    assert conv.bytes_after == 4 * (4 * 9 + 16) * 4
    assert s.total_after < s.total_before
    # compressing the factors afterwards: the row adds up what they store now
    prune.magnitude(net, 0.5)
    prune.finish(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyfast.quantize(net, "int8")
    rows = {r.name: r for r in pyfast.summary(net, print_table=False)}
    assert set(rows) == {"0", "2"}
    assert rows["0"].format.startswith("rank 4: int8 W8A8")
    assert rows["0"].bytes_after == (net[0].first.storage_bytes()
                                     + net[0].second.storage_bytes())
    assert rows["0"].bytes_before == (64 * 48 + 48) * 4
    assert rows["0"].sparsity == pytest.approx(0.5, abs=0.02)
    assert prune.sparsity(net)["0"] == pytest.approx(rows["0"].sparsity)
