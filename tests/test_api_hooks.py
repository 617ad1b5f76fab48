"""Layers the float model computes with more than their own weight: pruned with
torch.nn.utils.prune (a forward pre-hook recomputes .weight), carrying other forward
hooks, or holding a weight Parameter another module holds too (tied weights). The walks
used to convert them from a stale weight, drop the hooks and untie the weights, all
silently."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import pyfast
from pyfast.nn import (Int8Linear, Int8WeightOnlyLinear, QuantConv2d, Sparse24Linear,
                       StaticInt8Linear)
from pyfast.sparsity import magnitude_24_mask


def _net():
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))


def _quiet_quantize(model, method="int8-weight"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return pyfast.quantize(model, method)


# --- torch.nn.utils.prune: convert from the weight its pre-hook computes ------------------

def _pruned(seed, bias=False):
    torch.manual_seed(seed)
    model = _net()
    for layer in (model[0], model[2]):
        torch_prune.l1_unstructured(layer, "weight", amount=0.5)
        torch_prune.random_unstructured(layer, "weight", amount=0.2)   # a PruningContainer
        if bias:
            torch_prune.l1_unstructured(layer, "bias", amount=0.5)
    return model


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "weight+bias"])
def test_a_torch_pruned_layer_loaded_from_a_checkpoint_converts_its_masked_weight(bias):
    """After load_state_dict, .weight is the fresh model's until the next forward."""
    x = torch.randn(2, 4, 6, 6)
    trained = _pruned(0, bias)
    with torch.no_grad():
        ref = trained(x)                               # the checkpoint model's output
    expected = copy.deepcopy(trained)
    for layer in (expected[0], expected[2]):
        for name in pyfast.api.torch_pruned(layer):
            torch_prune.remove(layer, name)            # weight = weight_orig * mask, as is
    _quiet_quantize(expected)
    model = _pruned(1, bias)
    model.load_state_dict(trained.state_dict())
    _quiet_quantize(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[2], Int8WeightOnlyLinear)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))
        torch.testing.assert_close(model(x), ref, atol=0.02, rtol=0.02)


def test_sparsify_of_a_torch_pruned_linear_uses_the_masked_weight():
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(16, 8))
    torch_prune.l1_unstructured(trained[0], "weight", amount=0.3)
    effective = (trained[0].weight_orig * trained[0].weight_mask).detach()
    model = nn.Sequential(nn.Linear(16, 8))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.3)
    model.load_state_dict(trained.state_dict())
    pyfast.sparsify(model)
    assert isinstance(model[0], Sparse24Linear)
    with torch.no_grad():
        dense = nn.Linear(16, 8)
        dense.weight.copy_(effective)
        dense.bias.copy_(trained[0].bias)
    want = Sparse24Linear.from_linear(dense, prune=True)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), want(x))


# --- other forward hooks: the layer is left, naming the hook ---------------------------------

def _clamp(mod, args, out):
    return out.clamp(min=0)


def _double_input(mod, args):
    return (args[0] * 2,)


HOOKED = {
    "forward hook": (lambda m: m.register_forward_hook(_clamp), r"has a forward hook "
                     r"test_api_hooks\._clamp, which a pyfast layer would not run"),
    "forward pre-hook": (lambda m: m.register_forward_pre_hook(_double_input),
                         r"has a forward pre-hook test_api_hooks\._double_input"),
    "spectral_norm": (torch.nn.utils.spectral_norm, r"has a forward pre-hook torch\.nn\.utils\."
                      r"spectral_norm\.SpectralNorm.*remove_spectral_norm"),
}


@pytest.mark.parametrize("hook", HOOKED)
@pytest.mark.parametrize("index", [0, 2], ids=["conv", "linear"])
def test_a_layer_with_a_forward_hook_is_left_with_the_reason(hook, index):
    attach, match = HOOKED[hook]
    torch.manual_seed(0)
    model = _net().eval()
    attach(model[index])
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=rf"{index}: {match}"):
        pyfast.quantize(model, "int8-weight")
    assert set(model.pyfast_skipped) == {str(index)}
    assert type(model[index]) in (nn.Conv2d, nn.Linear)
    assert isinstance(model[2 - index], (QuantConv2d, Int8WeightOnlyLinear))
    with torch.no_grad():                      # the hook still runs: only int8 error
        assert float((model(x) - ref).norm() / ref.norm()) < 0.02
    if index == 2:
        with pytest.warns(UserWarning, match=rf"2: {match}"):
            pyfast.sparsify(model)
        assert type(model[2]) is nn.Linear


def test_pyfast_own_hooks_do_not_stop_a_conversion():
    """prepare_static's observers stay until convert_static; GPTQ's hook is temporary."""
    torch.manual_seed(0)
    model = pyfast.quant.prepare_static(_net())
    pyfast.quant.calibrate(model, [torch.randn(2, 4, 6, 6)], progress=False)
    assert model.pyfast_skipped == {}
    pyfast.quant.convert_static(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[2], StaticInt8Linear)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    pyfast.quant.gptq_quantize(mlp, [torch.randn(8, 64)], group_size=32, progress=False)
    assert mlp.pyfast_skipped == {} and not mlp[0]._forward_pre_hooks


# --- tied weights: left, naming the other holders ----------------------------------------------

def test_two_layers_sharing_a_weight_are_left_and_say_how_to_untie():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight                                  # tied weight, own biases
    model = nn.Sequential(a, nn.ReLU(), b)
    with pytest.warns(UserWarning, match=r"0: its weight is tied to 2\.weight \(the same "
                                         r"Parameter\), which a pyfast layer would untie; to "
                                         r"compress it anyway, untie it first: layer\.weight = "
                                         r"nn\.Parameter\(layer\.weight\.detach\(\)\.clone\(\)\)"):
        pyfast.quantize(model, "int8")
    assert set(model.pyfast_skipped) == {"0", "2"} and model[0].weight is model[2].weight
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())   # as the reason says
    _quiet_quantize(model, "int8")
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)


def test_an_lm_head_tied_to_an_embedding_is_left():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 32, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(torch.relu(self.body(self.embed(ids))))

    model = LM()
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to embed\.weight"):
        pyfast.quantize(model, "int8")
    assert isinstance(model.body, Int8Linear) and model.lm_head.weight is model.embed.weight
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to embed\.weight"):
        pyfast.quant.gptq_quantize(LM(), [torch.randint(0, 32, (4, 8))], group_size=-1,
                                   progress=False)
    shared = nn.Linear(16, 16)        # one module at two places is not a tie: it converts
    _quiet_quantize(nn.Sequential(shared, nn.ReLU(), shared), "int8")


def test_a_masked_tied_lm_head_is_left_too():
    """A pyfast.prune mask moves the weight Parameter under parametrizations.weight.original,
    where the tie check did not look: sparsify / quantize then silently untied the head."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.lm_head = nn.Linear(16, 32, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(torch.tanh(self.embed(ids)))

    for call in (pyfast.sparsify, lambda m: pyfast.quantize(m, "int8")):
        model = LM()
        pyfast.prune.apply_mask(model.lm_head, magnitude_24_mask(model.lm_head.weight))
        with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to embed\.weight "
                                             r"\(the same Parameter\), which a pyfast layer would "
                                             r"untie"):
            call(model)
        assert type(model.lm_head).__bases__[0] is nn.Linear     # masked, not converted
        assert model.lm_head.parametrizations.weight.original is model.embed.weight
    # the hint unties a masked weight; then it converts
    hint = ("layer.parametrizations.weight.original = "
            "nn.Parameter(layer.parametrizations.weight.original.detach().clone())")
    assert model.pyfast_skipped["lm_head"].endswith(hint)
    layer = model.lm_head
    layer.parametrizations.weight.original = nn.Parameter(
        layer.parametrizations.weight.original.detach().clone())
    _quiet_quantize(model, "int8")
    assert isinstance(model.lm_head, Int8Linear)
    # a masked layer that is not tied still converts
    lone = nn.Sequential(nn.Linear(16, 8))
    pyfast.prune.n_m(lone, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfast.sparsify(lone)
    assert isinstance(lone[0], Sparse24Linear)


# --- swap: a torch-pruned layer that is not an nn.Linear --------------------------------------

def test_swap_names_a_pruned_conv_instead_of_saying_there_is_none():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch_prune.l1_unstructured(model[2], "weight", amount=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfast.swap(model)
    messages = [str(w.message) for w in caught]
    assert not any("found no" in m for m in messages)
    assert messages[-1].startswith("pyfast left these layers as they were: 0: Conv2d pruned "
                                   "with torch.nn.utils.prune: swap converts nn.Linear only")
    assert "torch.nn.utils.prune.remove(module, 'weight')" in model.pyfast_skipped["0"]
    assert torch_prune.is_pruned(model[0]) and not torch_prune.is_pruned(model[2])
    # a container holding a pruned layer is not itself a pruned layer
    outer = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 1)))
    torch_prune.l1_unstructured(outer[0][0], "weight", amount=0.5)
    with pytest.warns(UserWarning, match=r"^pyfast left these layers as they were: 0\.0: Conv2d"):
        pyfast.swap(outer)
