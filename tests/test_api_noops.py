"""Calls that used to change nothing and say nothing: compressing an already compressed (or
QAT) model, include/exclude that select no layer, sparsify's unused int4 arguments and an
uninitialized lazy layer. Each now warns (the reason in model.pyfast_skipped) or raises,
and the workflows that meet pyfast layers on purpose stay quiet."""
import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import pyfast
from pyfast import lowrank, prune, quant
from pyfast.nn import Int4Linear, Int8Linear, QuantConv2d, Sparse24Linear
from pyfast.sparsity import magnitude_24_mask

ALREADY = "already compressed"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


@contextlib.contextmanager
def quiet():
    """Any warning fails the test: the workflow must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- an already compressed model is reported, not silently kept ---------------------------

AGAIN = {
    "quantize": lambda m: pyfast.quantize(m, "int4", group_size=32),
    "sparsify": lambda m: pyfast.sparsify(m, "2:4"),
    "sparsify-int4": lambda m: pyfast.sparsify(m, "2:4", values="int4", group_size=32),
    "gptq": lambda m: quant.gptq_quantize(m, [torch.randn(8, 64)], group_size=32,
                                          progress=False),
    "prepare_qat": lambda m: quant.prepare_qat(m, "int8"),
    "prepare_static": lambda m: quant.prepare_static(m),
}


@pytest.mark.parametrize("how", AGAIN)
def test_compressing_a_quantized_model_again_names_each_layer(how):
    model = pyfast.quantize(mlp(), "int8")
    with pytest.warns(UserWarning, match=r"0: already compressed \(Int8Linear, int8 W8A8\); "
                                         r"pyfast does not compress a layer twice"):
        AGAIN[how](model)
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)
    assert set(model.pyfast_skipped) == {"0", "2"}
    assert "start from the float model" in model.pyfast_skipped["2"]


def test_quantize_of_a_qat_model_points_to_convert_qat():
    model = quant.prepare_qat(mlp(), "int8")
    with pytest.warns(UserWarning, match=r"0: QAT layer \(QATLinear, qat=int8 W8A8\); "
                                         r"pyfast.quant.convert_qat\(model\)"):
        pyfast.quantize(model, "int4", group_size=32)
    assert set(model.pyfast_skipped) == {"0", "2"}
    assert type(model[0]).__name__ == "QATLinear"


def test_a_quantconv2d_is_one_entry_and_only_where_convs_are_converted():
    model = nn.Sequential(nn.Conv2d(8, 8, 2), nn.Flatten(), nn.Linear(8, 8))
    pyfast.quantize(model, "int8")
    with pytest.warns(UserWarning, match=r"0: already compressed \(QuantConv2d"):
        pyfast.quantize(model, "int4", group_size=32)
    assert set(model.pyfast_skipped) == {"0", "2"}      # not its inner layer "0.inner"
    del model.pyfast_skipped
    with pytest.warns(UserWarning, match=ALREADY):       # sparsify converts no conv
        pyfast.sparsify(model)
    assert set(model.pyfast_skipped) == {"2"}


def test_filters_decide_which_compressed_layers_are_reported():
    model = pyfast.quantize(mlp(), "int8", include="0")
    with quiet():
        pyfast.quantize(model, "int4", group_size=32, include="2")   # mixed precision
    assert isinstance(model[2], Int4Linear) and model.pyfast_skipped == {}
    with pytest.warns(UserWarning, match=ALREADY) as caught:
        pyfast.quantize(model, "int8-weight", include="0")
    assert "select" not in str(caught[0].message)   # the filter did select a layer
    assert set(model.pyfast_skipped) == {"0"}


# --- what a call would make anyway, and the workflows that meet pyfast layers -------------

@pytest.mark.parametrize("method,kwargs", [("int8", {}), ("int4", dict(group_size=32)),
                                           ("int2", dict(group_size=32)), ("binary", {})])
def test_quantize_twice_with_the_same_arguments_is_quiet(method, kwargs):
    model = pyfast.quantize(mlp(), method, **kwargs)
    with quiet():
        pyfast.quantize(model, method, **kwargs)
    assert model.pyfast_skipped == {}


def test_sparsify_twice_with_the_same_arguments_is_quiet():
    model = pyfast.sparsify(mlp())
    with quiet():
        pyfast.sparsify(model)
    model = pyfast.sparsify(mlp(), values="int4", group_size=32)
    with quiet():
        pyfast.sparsify(model, values="int4", group_size=32)
    with pytest.warns(UserWarning, match=r"already compressed \(Sparse24Int4Linear"):
        pyfast.sparsify(model, values="int4", group_size=64)


def test_gptq_then_quantize_the_convs_is_quiet():
    """The digits demo's int4 GPTQ recipe: GPTQ quantizes the Linear layers, then
    quantize with the same arguments converts the convs and keeps GPTQ's layers."""
    model = nn.Sequential(nn.Conv2d(8, 8, 2), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
                          nn.Linear(64, 8))
    calib = [torch.randn(4, 8, 3, 3)]
    quant.gptq_quantize(model, calib, group_size=32, progress=False)
    gptq_layer = model[2]
    with quiet():
        pyfast.quantize(model, "int4", group_size=32, symmetric=False)
    assert isinstance(model[0], QuantConv2d) and model[2] is gptq_layer


def test_quantize_the_factors_of_a_low_rank_pair_is_quiet():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with quiet():
        lowrank.factorize(model, rank=8)
        pyfast.quantize(model, "int8")
    assert isinstance(model[0].first, Int8Linear) and isinstance(model[2].second, Int8Linear)


def test_finish_and_swap_do_not_report_the_pyfast_layers_they_do_not_convert():
    model = pyfast.quantize(mlp(), "int8", include="2")
    prune.n_m(model, 2, 4, include="0")
    with quiet():
        prune.finish(model, to_sparse24=True)
    assert isinstance(model[0], Sparse24Linear) and model.pyfast_skipped == {}
    model = pyfast.quantize(mlp(), "int8", include="2")
    torch_prune.custom_from_mask(model[0], "weight", magnitude_24_mask(model[0].weight.detach()))
    with quiet():
        pyfast.swap(model)
    assert isinstance(model[0], Sparse24Linear) and model.pyfast_skipped == {}


# --- include / exclude that select nothing -------------------------------------------------

WALKS = {
    "quantize": lambda m, kw: pyfast.quantize(m, "int8", **kw),
    "sparsify": lambda m, kw: pyfast.sparsify(m, **kw),
    "gptq": lambda m, kw: quant.gptq_quantize(m, [torch.randn(8, 64)], group_size=32,
                                              progress=False, **kw),
    "prepare_qat": lambda m, kw: quant.prepare_qat(m, "int8", **kw),
    "prepare_static": lambda m, kw: quant.prepare_static(m, **kw),
    "factorize": lambda m, kw: lowrank.factorize(m, rank=4, **kw),
}


@pytest.mark.parametrize("how", WALKS)
def test_a_filter_that_selects_nothing_lists_the_layer_names(how):
    model = mlp()
    with pytest.warns(UserWarning) as caught:
        WALKS[how](model, {"include": "layers.*"})
    message = str(caught[0].message)
    assert message.startswith("include='layers.*' selects none of the model's 2 nn.Linear")
    assert "('0', '2'); nothing was converted" in message
    assert caught[0].filename == __file__          # points at the caller's line
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_include_and_exclude_together_and_a_long_list_of_names():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(7)])
    with pytest.warns(UserWarning, match=r"include='\*' and exclude='\*' select none of the "
                                         r"model's 7 nn.Linear / nn.Conv2d layers "
                                         r"\('0', '1', '2', '3', '4', \.\.\.\)"):
        pyfast.quantize(model, "int8", include="*", exclude="*")


def test_a_model_without_a_layer_to_convert_says_so():
    with pytest.warns(UserWarning, match="pyfast found no nn.Linear / nn.Conv2d layers in the "
                                         "model; nothing was converted"):
        pyfast.quantize(nn.Sequential(nn.ReLU()), "int8")
    with pytest.warns(UserWarning, match="found no nn.Linear layers in the model"):
        pyfast.sparsify(nn.Sequential(nn.Conv2d(4, 4, 1)))
    with pytest.warns(UserWarning, match="found no layers pruned by torch.nn.utils.prune"):
        pyfast.swap(mlp())


# --- sparsify refuses the int4 arguments without values="int4" ---------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=64), r"group_size=64: sparsify with values=None does not take group_size"),
    (dict(group_size=128), r"group_size=128: sparsify with values=None"),
    (dict(symmetric=False), r"symmetric=False: sparsify with values=None does not take "
                            r"symmetric \(the kept weights stay in the layer's float dtype\); "
                            r"symmetric applies to values='int4'"),
])
def test_sparsify_refuses_int4_arguments_without_int4_values(kwargs, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        pyfast.sparsify(model, "2:4", **kwargs)
    assert type(model[0]) is nn.Linear


def test_sparsify_int4_still_takes_them():
    model = pyfast.sparsify(mlp(), values="int4", group_size=32, symmetric=False)
    assert (model[0].group_size, model[0].symmetric) == (32, False)
    assert pyfast.sparsify(nn.Sequential(nn.Linear(128, 8)), values="int4")[0].group_size == 128


# --- uninitialized lazy layers ----------------------------------------------------------

LAZY = {"LazyLinear": (lambda: nn.Linear(8, 8), lambda: nn.LazyLinear(4), (2, 8)),
        "LazyConv2d": (lambda: nn.Conv2d(8, 8, 1), lambda: nn.LazyConv2d(4, 1), (2, 8, 3, 3))}


@pytest.mark.parametrize("kind", LAZY)
def test_an_uninitialized_lazy_layer_is_skipped_with_the_reason(kind):
    """It used to fail with "in_features must be a positive int, got 0" after the layers
    before it were converted, and without model.pyfast_skipped."""
    first, lazy, shape = LAZY[kind]
    model = nn.Sequential(first(), lazy())
    with pytest.warns(UserWarning, match=rf"1: uninitialized lazy layer \({kind}\); "
                                         "run a forward first"):
        pyfast.quantize(model, "int8")
    assert type(model[0]) is not type(first()) and set(model.pyfast_skipped) == {"1"}
    model = nn.Sequential(first(), lazy())
    model(torch.randn(shape))                      # initializes it: then it converts
    with quiet():
        pyfast.quantize(model, "int8")
    assert model.pyfast_skipped == {}
