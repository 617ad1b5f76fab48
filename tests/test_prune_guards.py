"""pyfast.prune's mask pruners (magnitude, random, custom, n_m) on layers they cannot mask
as they are: tied weights, weight_norm, torch.nn.utils.prune, uninitialized lazy layers,
other convs, nn.MultiheadAttention's in_proj_weight. Such a layer is left with the reason
in model.pyfast_skipped and a warning, as pyfast.quantize does; the pruners used to
prune a tied weight under its other holder, crash half way, or say nothing."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pyfast import prune
from _helpers import TiedLM


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


PRUNERS = {"magnitude": lambda m, **kw: prune.magnitude(m, 0.5, **kw),
           "magnitude_global": lambda m, **kw: prune.magnitude(m, 0.5, "global", **kw),
           "random": lambda m, **kw: prune.random(m, 0.5, **kw),
           "custom": lambda m, **kw: prune.custom(m, lambda n, mod, w: w.abs() > w.abs().median(),
                                                  **kw),
           "n_m": lambda m, **kw: prune.n_m(m, 2, 4, **kw)}


def _record(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught]


# --- 1. tied weights -------------------------------------------------------------------------

@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_tied_lm_head_is_left_with_the_tie_reason(pruner):
    """The mask used to zero the embedding's rows too; its training then revived them,
    and prune.finish changed the model's output."""
    model = TiedLM()
    emb = model.emb.weight.detach().clone()
    messages = _record(lambda: PRUNERS[pruner](model))
    assert not prune.is_masked(model.head) and prune.is_masked(model.body)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight.detach(), emb)
    assert model.pyfast_skipped["head"].startswith(
        "its weight is tied to emb.weight (the same Parameter), which a mask would break")
    assert "untie it first: layer.weight = nn.Parameter(layer.weight.detach().clone())" \
        in model.pyfast_skipped["head"]
    assert any("head: its weight is tied to emb.weight" in m for m in messages)


def test_two_linears_sharing_a_weight_are_both_left_and_prune_after_untying():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.warns(UserWarning, match=r"0: its weight is tied to 2\.weight"):
        prune.magnitude(model, 0.5)
    assert set(model.pyfast_skipped) == {"0", "2"} and not prune.is_masked(a)
    b.weight = nn.Parameter(b.weight.detach().clone())     # as the reason says
    prune.magnitude(model, 0.5)
    assert prune.is_masked(a) and prune.is_masked(b) and model.pyfast_skipped == {}


# --- 3. weight_norm and torch.nn.utils.prune: left, decided before any mask ------------------

def _mixed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    nn.utils.parametrizations.weight_norm(model[2])
    torch_prune.l1_unstructured(model[4], "weight", 0.25)
    return model


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_weight_norm_and_torch_pruned_layers_are_left_with_the_reason(pruner):
    """These used to raise (AttributeError / torch's ValueError) after the layers before
    them had been masked."""
    model, x = _mixed(), torch.randn(3, 8)
    wn_out = model[2](x).detach()
    messages = _record(lambda: PRUNERS[pruner](model))
    assert prune.is_masked(model[0])
    assert not prune.is_masked(model[2]) and not prune.is_masked(model[4])
    assert [type(p).__name__ for p in model[2].parametrizations.weight] == ["_WeightNorm"]
    assert torch.equal(model[2](x), wn_out) and torch_prune.is_pruned(model[4])
    assert "its weight has the parametrization _WeightNorm" in model.pyfast_skipped["2"]
    assert model.pyfast_skipped["4"].startswith("pruned with torch.nn.utils.prune")
    assert "torch.nn.utils.prune.remove(module, 'weight')" in model.pyfast_skipped["4"]
    assert any(m.startswith("pyfast.prune left these layers as they were: 2:") for m in messages)


def test_old_style_weight_norm_is_left_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.nn.utils.weight_norm is deprecated
        nn.utils.weight_norm(model[1])
    with pytest.warns(UserWarning, match="1: its weight is neither a Parameter nor a buffer"):
        prune.magnitude(model, 0.5)
    assert prune.is_masked(model[0]) and not prune.is_masked(model[1])


def test_custom_checks_every_mask_before_applying_any():
    """A bad mask for the second layer used to raise after the first was masked."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def fn(name, mod, w):
        return torch.ones(3, 3, dtype=torch.bool) if name == "2" else w > 0

    with pytest.raises(ValueError, match=r"mask for layer '2' has shape \(3, 3\)"):
        prune.custom(model, fn)
    assert not prune.is_masked(model[0]) and not prune.is_masked(model[2])


# --- 6. nn.MultiheadAttention: in_proj_weight named and counted --------------------------------

def _encoder(**kw):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, **kw)


def test_attention_in_proj_is_named_and_counted_by_sparsity():
    """prune.sparsity said 0.5 while the dense Q/K/V projections (3*16*16 weights) were
    left out of it, and no pruner said they were not pruned."""
    model = _encoder()
    with pytest.warns(UserWarning, match=r"self_attn: nn\.MultiheadAttention holds its Q/K/V "
                                         r"projections as raw Parameters \(in_proj_weight\)"):
        prune.magnitude(model, 0.5)
    assert prune.is_masked(model.self_attn.out_proj) and prune.is_masked(model.linear1)
    mats = [model.self_attn.in_proj_weight, model.self_attn.out_proj.weight,
            model.linear1.weight, model.linear2.weight]
    s = prune.sparsity(model)
    assert s["self_attn.in_proj_weight"] == 0.0
    assert s.weights == sum(w.numel() for w in mats) == 3 * 256 + 256 + 2 * 512
    assert s.zeros == sum(int((w == 0).sum()) for w in mats)
    assert s.overall == pytest.approx(0.5 * (256 + 2 * 512) / s.weights)
    # not selected (its out_proj excluded): not named
    other = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.magnitude(other, 0.5, exclude="self_attn.*")
    assert other.pyfast_skipped == {}


def test_attention_with_separate_q_k_v_names_them():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.warns(UserWarning, match=r"\(q_proj_weight, k_proj_weight, v_proj_weight\)"):
        prune.n_m(model, 2, 4)
    s = prune.sparsity(model)
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"} <= set(s)
    assert s.weights == 16 * 16 + 2 * 16 * 8 + 16 * 16


# --- 7. nothing selected, and the other convs ---------------------------------------------------

@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_filter_that_selects_nothing_warns(pruner):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"include='fc\*' selects none of the model's 2 "
                                         r"nn\.Linear / nn\.Conv2d layers \('0', '2'\); nothing was pruned"):
        PRUNERS[pruner](model, include="fc*")
    assert not prune.is_masked(model[0])


@pytest.mark.parametrize("conv", [nn.Conv1d(8, 8, 3), nn.Conv3d(8, 8, 1),
                                  nn.ConvTranspose2d(8, 8, 3)], ids=lambda c: type(c).__name__)
def test_other_convs_are_named_as_left(conv):
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=f"0: {type(conv).__name__}: pyfast.prune prunes "
                                         r"nn\.Linear and nn\.Conv2d layers"):
        prune.magnitude(model, 0.5, scope="global")
    assert prune.is_masked(model[2]) and set(model.pyfast_skipped) == {"0"}


# --- 8. uninitialized lazy layers ---------------------------------------------------------------

@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_an_uninitialized_lazy_layer_is_left_with_the_reason(pruner):
    """torch's raw 'Attempted to use an uninitialized parameter' error used to escape."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"0: uninitialized lazy layer \(LazyLinear\); run a "
                                         "forward first"):
        PRUNERS[pruner](model)
    assert prune.is_masked(model[2]) and not prune.is_masked(model[0])
    penalty = prune.l1_penalty(model, 1.0).detach()    # used to fail on the lazy layer too
    assert float(penalty) == pytest.approx(float(model[2].weight.detach().abs().sum()))


# --- 10. what an optimizer holding state from before the pruning does -------------------------

def test_an_optimizer_with_earlier_state_keeps_the_masked_weight_at_zero():
    """Its momentum moves the stored entries (README: build the optimizer after pruning
    if they must stay 0); the weight the layer computes with stays 0, and finish keeps it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 16), torch.randn(64, 4)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    prune.magnitude(model, 0.5)
    mask = prune.get_mask(model[0]).clone()
    for _ in range(3):
        step()
    assert bool((model[0].weight.detach()[~mask] == 0).all())
    out = model(x)
    prune.finish(model)
    assert torch.equal(model(x), out) and bool((model[0].weight.detach()[~mask] == 0).all())
