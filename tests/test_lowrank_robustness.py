"""pyfast.lowrank.factorize on models the digits recipe does not exercise: layers with
non-finite weights, frozen layers of an eval-mode model, and a model that an earlier
workflow left reasons on. factorize used to stop half-way (NaN), build all-NaN pairs
(inf), unfreeze layers, and report other calls' reasons as its own.

Oracles: the model's layer types and outputs, requires_grad / training flags of the
dense layers, model.pyfast_skipped before the call."""
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast.lowrank import LowRankConv2d, LowRankLinear, factorize

NON_FINITE = "weight has non-finite values (NaN or inf); the SVD needs finite ones"


def _mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_skipped_and_the_others_factorized(bad):
    torch.manual_seed(0)
    m = _mlp()
    with torch.no_grad():
        m[2].weight[3, 5] = bad
    with pytest.warns(UserWarning, match="2: weight has non-finite values"):
        rep = factorize(m, rank=8)
    assert [type(l).__name__ for l in m] == ["LowRankLinear", "ReLU", "Linear", "ReLU",
                                             "LowRankLinear"]
    assert rep.skipped == {"2": NON_FINITE} and m.pyfast_skipped == {"2": NON_FINITE}
    assert [r.name for r in rep] == ["0", "4"]


def test_factorize_keeps_frozen_layers_frozen_and_eval_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 36, 10))
    m[0].requires_grad_(False)                  # frozen backbone, only the head trains
    m[2].bias.requires_grad_(False)
    m.eval()
    factorize(m, rank=4)
    assert isinstance(m[0], LowRankConv2d) and isinstance(m[2], LowRankLinear)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["2.first.weight", "2.second.weight"]
    assert [n for n, mod in m.named_modules() if mod.training] == []


def test_factorize_pairs_of_a_training_model_train():
    m = _mlp().train()
    factorize(m, rank=8)
    assert all(mod.training for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())


def test_report_skipped_names_only_this_calls_layers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyfast.quantize(m, "int4", include="4")   # '4' skipped: K=64 < group 128
    earlier = dict(m.pyfast_skipped)
    assert list(earlier) == ["4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the walk's warning repeats model.pyfast_skipped
        rep = factorize(m, rank=8, include="0")
    assert [r.name for r in rep] == ["0"]
    assert rep.skipped == {}
    assert "left as is" not in str(rep)
    assert m.pyfast_skipped == earlier          # the model's record stays cumulative
    # a layer this call leaves is reported, also when an earlier call left it alike
    for _ in range(2):
        with pytest.warns(UserWarning, match="2: no parameter saving"):
            rep = factorize(m, rank=40, include="2")
        assert list(rep.skipped) == ["2"] and "left as is: 2: no parameter" in str(rep)
        assert list(m.pyfast_skipped) == ["4", "2"]
