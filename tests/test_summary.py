"""pyfast.summary on models it must count truthfully: uninitialized lazy layers, torch
convs other than Conv2d, and layers that share (tie) a weight tensor."""
import math
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast.nn import Int8Linear, Int8WeightOnlyLinear, QuantConv2d


def distinct_bytes(model):
    """Bytes of the model's distinct parameter and buffer tensors (the same data once)."""
    seen = {}
    for t in model.state_dict(keep_vars=True).values():
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- uninitialized lazy layers ---------------------------------------------------------

def test_uninitialized_lazy_layers_are_rows_counted_as_zero():
    """summary raised torch's 'Attempted to use an uninitialized parameter', though
    quantize skipped the layers and its warning pointed to summary."""
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.Flatten(), nn.LazyLinear(4), nn.Linear(4, 2))
    quiet(pyfast.quantize, model, "int8")
    s = pyfast.summary(model, print_table=False)
    rows = {r.name: r for r in s}
    assert [(rows[n].type, rows[n].format) for n in ("0", "2")] == \
        [("LazyConv2d", "uninitialized (lazy)"), ("LazyLinear", "uninitialized (lazy)")]
    for n in ("0", "2"):
        assert (rows[n].params, rows[n].bytes_before, rows[n].bytes_after) == (0, 0, 0)
        assert math.isnan(rows[n].sparsity)
    assert rows["3"].type == "Int8Linear"
    assert s.total_before == rows["3"].bytes_before and s.total_after == rows["3"].bytes_after
    text = str(s)
    assert ("uninitialized lazy layers (params and bytes unknown, counted as 0; run a forward "
            "first): 0, 2") in text
    assert "left as is: 0: uninitialized lazy layer (LazyConv2d)" in text

    model(torch.randn(1, 3, 6, 6))                  # a forward gives them their shapes
    rows = {r.name: r for r in pyfast.summary(model, print_table=False)}
    assert (rows["0"].type, rows["0"].params) == ("Conv2d", 8 * 3 * 9 + 8)
    assert (rows["2"].type, rows["2"].params) == ("Linear", 4 * 8 * 16 + 4)


# --- every torch conv ------------------------------------------------------------------

@pytest.mark.parametrize("conv", [nn.Conv1d(6, 5, 3), nn.Conv3d(6, 5, 3, bias=False),
                                  nn.ConvTranspose1d(6, 5, 3), nn.ConvTranspose2d(6, 5, 3),
                                  nn.ConvTranspose3d(6, 5, 3)],
                         ids=lambda c: type(c).__name__)
def test_other_convs_are_dense_rows_in_the_totals(conv):
    """Only nn.Conv2d was listed: the totals and the 'x smaller' left the other convs out."""
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn((2, 6) + (5,) * (conv.weight.dim() - 2)))
    dense = distinct_bytes(model)
    s = pyfast.summary(model, print_table=False)
    assert [(r.name, r.type, r.format) for r in s][0] == \
        ("0", type(conv).__name__, "dense float32")
    assert s[0].params == sum(p.numel() for p in conv.parameters())
    assert s.total_before == s.total_after == dense
    quiet(pyfast.quantize, model, "int8")
    s = pyfast.summary(model, print_table=False)
    assert s.total_before == dense                  # the conv is counted, dense, as it stays
    assert s.total_after == distinct_bytes(model)


# --- tied tensors ------------------------------------------------------------------------

def tied_convs():
    a, b = nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3)
    b.weight = a.weight                              # one weight Parameter, two biases
    return nn.Sequential(a, nn.ReLU(), b)


def test_a_tied_weight_is_counted_once():
    """Two layers sharing one weight Parameter: the totals counted it twice."""
    model = tied_convs()
    s = pyfast.summary(model, print_table=False)
    first, second = s
    assert (first.tied_with, second.tied_with) == ("", "0")
    assert (second.tied_params, second.tied_before, second.tied_after) == \
        (16 * 16 * 9,) + (16 * 16 * 9 * 4,) * 2
    assert second.params == first.params           # the row still shows the layer itself
    assert s.total_before == s.total_after == distinct_bytes(model) == 9344
    assert s.total_params == sum(p.numel() for p in model.parameters())
    text = str(s)
    assert text.splitlines()[3].endswith("  tied with 0")
    assert "the totals count them once" in text
    assert f"{s.total_params:,}" in text.splitlines()[-2]


def test_tied_weights_count_once_after_quantize():
    """Whatever quantize does with the tie (keeps it float, or converts each layer),
    the summary's totals are the bytes the model holds."""
    model = nn.Sequential(*tied_convs(), nn.Flatten(), nn.Linear(16 * 2 * 2, 4))
    before = distinct_bytes(model)
    quiet(pyfast.quantize, model, "int8")
    assert pyfast.summary(model, print_table=False).total_after == distinct_bytes(model)
    # the tie kept float next to a compressed layer
    model = nn.Sequential(*tied_convs(), nn.Flatten(),
                          Int8Linear.from_linear(nn.Linear(16 * 2 * 2, 4)))
    s = pyfast.summary(model, print_table=False)
    assert s.total_after == distinct_bytes(model)
    assert s.total_before == before


def test_wrappers_sharing_one_compressed_layer_count_it_once():
    a = QuantConv2d.from_conv(nn.Conv2d(4, 8, 3), Int8WeightOnlyLinear.from_linear)
    b = QuantConv2d.from_conv(nn.Conv2d(4, 8, 3), Int8WeightOnlyLinear.from_linear)
    b.inner = a.inner
    model = nn.Sequential(a, b)
    s = pyfast.summary(model, print_table=False)
    assert [r.tied_with for r in s] == ["", "0"]
    assert s.total_after == distinct_bytes(model) == a.storage_bytes()
    assert s.total_before == a.dense_bytes() and s.total_params == s[0].params


def test_compressed_layers_sharing_only_their_codes():
    """Shared int8 codes with own scales: two different dense weights (before counts
    both), stored codes once (after counts them once)."""
    a, b = (Int8WeightOnlyLinear.from_linear(nn.Linear(32, 16)) for _ in range(2))
    b.weight_int8 = a.weight_int8
    model = nn.Sequential(a, b)
    s = pyfast.summary(model, print_table=False)
    assert s[1].tied_with == "0"
    assert s.total_before == 2 * a.dense_bytes()
    assert s.total_after == distinct_bytes(model) == 2 * a.storage_bytes() - 16 * 32


def test_a_module_used_twice_and_meta_ties():
    conv = nn.Conv2d(4, 4, 3)
    s = pyfast.summary(nn.Sequential(conv, nn.ReLU(), conv), print_table=False)
    assert len(s) == 1 and s[0].tied_with == ""     # one row, nothing tied
    with torch.device("meta"):
        a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    s = pyfast.summary(nn.Sequential(a, b), print_table=False)
    assert s[1].tied_with == "0" and s.total_before == (64 + 8 + 8) * 4


def test_ties_through_parametrized_weights():
    """A masked weight (pyfast.prune) is held by its parametrization's original, a
    weight_norm one by original0/original1: the tie is seen there, nothing crashes."""
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    # magnitude now leaves tied layers alone: mask one directly
    pyfast.prune.apply_mask(a, torch.rand(16, 16) > 0.5)
    assert pyfast.prune.is_masked(a) and not pyfast.prune.is_masked(b)
    s = pyfast.summary(model, print_table=False)
    assert s[1].tied_with == "0" and s.total_params == 16 * 16 + 2 * 16
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    s = pyfast.summary(nn.Sequential(normed, nn.Linear(8, 8)), print_table=False)
    assert [r.tied_with for r in s] == ["", ""] and s.total_params == 2 * (64 + 8)
