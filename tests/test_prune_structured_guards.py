"""pyfast.prune.structured on layers a rebuild would change silently: hooks, weight_norm,
torch.nn.utils.prune masks, tied weights (left with the reason), frozen biases (kept
frozen); a 2-d pool on a 3-d tensor; filters that select nothing; and a failure half way,
which must leave the model as it was."""
import copy
import importlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pyfast import prune
from _helpers import TiedLM

# the module (pyfast.prune.structured, the attribute, is the function)
structured_mod = importlib.import_module("pyfast.prune.structured")


pytestmark = pytest.mark.usefixtures("one_thread", "quiet_prune")   # tests/conftest.py




def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# --- 4. what a rebuilt layer would drop ------------------------------------------------------

def test_a_hooked_producer_is_left_and_its_hook_still_runs():
    model, x = mlp(), torch.randn(2, 8)
    seen = []
    model[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))   # feature capture
    prune.structured(model, 0.5, x)
    assert model[0].out_features == 16 and model[2].out_features == 8     # 2 still pruned
    seen.clear()
    model(x)
    assert seen == [torch.Size([2, 16])]
    assert model.pyfast_skipped["0"].startswith("has a forward hook")


def test_weight_norm_and_torch_masks_block_the_producers_that_would_rebuild_them():
    """The rebuilt layers used to be plain layers: weight_norm and the torch mask were gone."""
    model, x = mlp(), torch.randn(2, 8)
    nn.utils.parametrizations.weight_norm(model[2])
    torch_prune.l1_unstructured(model[6], "weight", 0.5)
    ref = model(x)
    prune.structured(model, 0.5, x)
    # 0 feeds 2 (weight_norm), 2 is weight-normed itself, 4 feeds 6 (torch mask)
    assert [model[i].out_features for i in (0, 2, 4)] == [16, 16, 16]
    assert [type(p).__name__ for p in model[2].parametrizations.weight] == ["_WeightNorm"]
    assert torch_prune.is_pruned(model[6]) and model[6].weight_mask.shape == (4, 16)
    assert model.pyfast_skipped["0"].startswith("its consumer '2' cannot be rebuilt smaller: "
                                                "has the parametrization _WeightNorm on weight")
    assert model.pyfast_skipped["2"].startswith("has the parametrization _WeightNorm on weight, "
                                                "which the smaller layer would drop")
    assert model.pyfast_skipped["4"].startswith("its consumer '6' cannot be rebuilt smaller: "
                                                "pruned with torch.nn.utils.prune (weight)")
    assert torch.equal(model(x), ref)


def test_a_frozen_bias_and_a_frozen_batchnorm_stay_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    model[0].bias.requires_grad_(False)
    model[1].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    prune.structured(model, 0.5, torch.randn(2, 3, 6, 6))
    assert model[0].out_channels == 4 and model[4].in_features == 4 * 4 * 4
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[4].weight.requires_grad and not model[4].bias.requires_grad


def test_a_tied_consumer_is_not_sliced():
    """Slicing the head's input columns gave it a copy of its own: the tie was gone."""
    model, t = TiedLM(torch.relu), torch.randint(0, 16, (2, 5))
    ref = model(t)
    prune.structured(model, 0.5, t)
    assert model.head.weight is model.emb.weight and model.body.out_features == 8
    assert model.pyfast_skipped["body"].startswith(
        "its consumer 'head' cannot be rebuilt smaller: its weight is tied to emb.weight")
    assert torch.equal(model(t), ref)


# --- 7. a filter that selects nothing, and the other convs ---------------------------------------

def test_a_filter_that_selects_nothing_warns():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"include='fc1' selects none of the model's 2 "
                                         r"nn\.Linear / nn\.Conv2d layers \('0', '2'\); nothing was pruned"):
        prune.structured(model, 0.5, torch.randn(2, 8), include="fc1")
    assert prune.channel_counts(model) == {"0": 16, "2": 4}


def test_a_conv1d_is_named_as_left():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 8),
                          nn.ReLU(), nn.Linear(8, 2))
    prune.structured(model, 0.5, torch.randn(2, 4, 8))
    assert model.pyfast_skipped["0"] == ("Conv1d: structured pruning rebuilds nn.Linear / "
                                         "nn.Conv2d layers only")
    assert model[0].out_channels == 8 and model[3].out_features == 4


# --- 9. pooling of the wrong rank; all or nothing ------------------------------------------------

class Pool3d(nn.Module):
    """AdaptiveAvgPool2d on [B, C, L]: PyTorch reads it as unbatched [C, H, W] and pools
    over the channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.p = nn.AdaptiveAvgPool2d((4, 1))
        self.l = nn.Linear(4, 5)

    def forward(self, x):
        return self.l(self.p(torch.flatten(self.c(x), 2)).flatten(1))


def test_a_2d_pool_of_a_3d_tensor_blocks_the_producer():
    """structured used to raise an IndexError with c already replaced, l not."""
    model, x = Pool3d(), torch.randn(2, 3, 4, 4)
    ref = model(x)
    prune.structured(model, 0.5, x)
    assert model.pyfast_skipped["c"] == ("pooling at node p would pool over the channels "
                                         "(a 2-d pool of a 3-d tensor)")
    assert prune.channel_counts(model) == {"c": 8, "l": 5} and torch.equal(model(x), ref)


def test_a_failing_rebuild_leaves_the_model_as_it_was(monkeypatch):
    model, x = mlp(), torch.randn(2, 8)
    before = copy.deepcopy(model)
    rebuild, calls = structured_mod._rebuild, []

    def failing(mod, out_idx, in_idx):   # the third layer to rebuild fails
        calls.append(mod)
        if len(calls) == 3:
            raise RuntimeError("rebuild failed")
        return rebuild(mod, out_idx, in_idx)

    monkeypatch.setattr(structured_mod, "_rebuild", failing)
    with pytest.raises(RuntimeError, match="rebuild failed"):
        prune.structured(model, 0.5, x)
    assert prune.channel_counts(model) == prune.channel_counts(before)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), before.state_dict().values()))
    assert torch.equal(model(x), before(x))
