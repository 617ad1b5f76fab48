"""pyfast.prune masks: unstructured, N:M, custom; masks survive training; finish."""
import pytest
import torch
from torch import nn

import pyfast
from pyfast import prune, quant
from pyfast.nn import QuantConv2d, Sparse24Linear
from pyfast.quant import QATConv2d, QATLinear
from pyfast.sparsity import is_24, magnitude_24_mask


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def zeros(m):
    return int((m.weight.detach() == 0).sum())


# --- unstructured -------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_layer_keeps_the_largest_of_each_layer(amount):
    net = mlp()
    orig = {n: m.weight.detach().clone() for n, m in layers(net)}
    prune.magnitude(net, amount)
    for name, m in layers(net):
        w0 = orig[name].abs().flatten()
        n_prune = round(amount * w0.numel())
        assert zeros(m) == n_prune
        # independent: the n_prune smallest |w| (random weights: no ties) are the zeros
        expected = torch.ones_like(w0, dtype=torch.bool)
        expected[w0.argsort()[:n_prune]] = False
        assert torch.equal(m.weight.detach().flatten() != 0, expected)
        assert torch.equal(m.weight.detach(), orig[name] * expected.reshape(orig[name].shape))


def test_magnitude_global_uses_one_threshold():
    net = mlp()
    all_w = torch.cat([m.weight.detach().abs().flatten() for _, m in layers(net)])
    n_prune = round(0.6 * all_w.numel())
    threshold = all_w.sort().values[n_prune - 1]          # the largest pruned |w|
    prune.magnitude(net, 0.6, scope="global")
    total = 0
    for _, m in layers(net):
        w = m.parametrizations.weight.original.detach()   # pruned entries zeroed in place too
        eff = m.weight.detach()
        total += zeros(m)
        assert torch.equal(eff != 0, prune.get_mask(m))
        kept = eff[eff != 0].abs()
        assert kept.numel() == 0 or float(kept.min()) > float(threshold)
        assert torch.equal(w, eff)
    assert total == n_prune
    per_layer = [zeros(m) / m.weight.numel() for _, m in layers(net)]
    assert max(per_layer) - min(per_layer) > 0.05      # layers differ: it is not per layer


def test_repruning_is_monotone_and_amount_counts_pruned_weights():
    net = mlp()
    prune.magnitude(net, 0.5)
    first = {n: prune.get_mask(m).clone() for n, m in layers(net)}
    prune.magnitude(net, 0.2)                  # less than there is: nothing changes
    for n, m in layers(net):
        assert torch.equal(prune.get_mask(m), first[n])
    prune.random(net, 0.75, seed=3)            # more: only kept weights are added
    for n, m in layers(net):
        mask = prune.get_mask(m)
        assert not bool((mask & ~first[n]).any()), "a pruned weight came back"
        assert zeros(m) == round(0.75 * m.weight.numel())


def test_random_is_seeded_and_exact():
    a, b, c = mlp(), mlp(), mlp()
    prune.random(a, 0.4, seed=1)
    prune.random(b, 0.4, seed=1)
    prune.random(c, 0.4, seed=2)
    for (_, ma), (_, mb), (_, mc) in zip(layers(a), layers(b), layers(c)):
        assert torch.equal(prune.get_mask(ma), prune.get_mask(mb))
        assert zeros(ma) == round(0.4 * ma.weight.numel())
    assert any(not torch.equal(prune.get_mask(ma), prune.get_mask(mc))
               for (_, ma), (_, mc) in zip(layers(a), layers(c)))


def test_custom_mask_and_its_errors():
    net = mlp()
    seen = []

    def positive_only(name, module, weight):
        seen.append(name)
        return weight > 0

    ref = {n: m.weight.detach().clone() for n, m in layers(net)}
    prune.custom(net, positive_only, exclude="4")
    assert seen == ["0", "2"]
    assert torch.equal(net[0].weight.detach(), ref["0"].clamp(min=0))
    assert not prune.is_masked(net[4])
    with pytest.raises(ValueError, match=r"mask for layer '0' has shape \(3, 3\); it must have "
                                         r"the weight's shape \(12, 16\)"):
        prune.custom(net, lambda n, m, w: torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask for layer '0' has dtype torch.float32; accepted: torch.bool"):
        prune.custom(net, lambda n, m, w: torch.ones_like(w))
    with pytest.raises(TypeError, match="fn returned list for layer '0'"):
        prune.custom(net, lambda n, m, w: [1])
    with pytest.raises(TypeError, match="fn must be a callable"):
        prune.custom(net, "abs")


@pytest.mark.parametrize("bad", [1.0, -0.1, 50, 1.5])
def test_bad_amount_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"amount must be a fraction in \[0, 1\).*got {bad!r}"):
        prune.magnitude(mlp(), bad)


@pytest.mark.parametrize("bad", ["0.5", True, None])
def test_amount_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"amount must be a float in \[0, 1\)"):
        prune.random(mlp(), bad)


def test_other_argument_errors():
    with pytest.raises(ValueError, match="scope 'net' is not supported; accepted: layer, global"):
        prune.magnitude(mlp(), 0.5, scope="net")
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        prune.magnitude("model", 0.5)
    with pytest.raises(TypeError, match="seed must be an int, got 1.5"):
        prune.random(mlp(), 0.5, seed=1.5)
    with pytest.raises(TypeError, match="include must be a glob string"):
        prune.magnitude(mlp(), 0.5, include=[3])
    with pytest.raises(TypeError, match="to_sparse24 must be a bool, got 'yes'"):
        prune.finish(mlp(), to_sparse24="yes")


# --- N:M ------------------------------------------------------------------------------------

def test_2_4_reproduces_magnitude_24_mask_on_linear_and_flattened_conv():
    net = convnet()
    w_conv = net[0].weight.detach().clone()
    w_lin = net[3].weight.detach().clone()
    prune.n_m(net, 2, 4)
    assert torch.equal(prune.get_mask(net[3]), magnitude_24_mask(w_lin))
    flat = w_conv.reshape(8, -1)                              # [C_out, C_in*kh*kw] = [8, 36]
    assert torch.equal(prune.get_mask(net[0]).reshape(8, -1), magnitude_24_mask(flat))
    assert is_24(net[0].weight.detach().reshape(8, -1)) and is_24(net[3].weight.detach())


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (3, 4)])
def test_n_m_keeps_n_largest_of_every_m(n, m):
    net = mlp()
    w = net[0].weight.detach().clone()                        # [12, 16]
    prune.n_m(net, n, m, include="0")
    groups = net[0].weight.detach().reshape(12, 16 // m, m)
    assert bool(((groups != 0).sum(dim=2) == n).all())
    ref = w.abs().reshape(12, 16 // m, m)
    kth = ref.sort(dim=2, descending=True).values[:, :, n - 1:n]
    assert torch.equal(groups != 0, ref >= kth)               # no ties in random weights


def test_n_m_skips_layers_with_the_reason():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="0: input size 6 is not a multiple of m=4"):
        prune.n_m(net, 2, 4)
    assert not prune.is_masked(net[0]) and prune.is_masked(net[2])
    assert net.pyfast_skipped == {"0": "input size 6 is not a multiple of m=4 (2:4 pruning)"}
    assert "left as is: 0: input size 6" in str(pyfast.summary(net, print_table=False))


def test_2_4_breaks_ties_as_magnitude_24_mask():
    """Equal |w| go to the lower index, as magnitude_24_mask's stable sort does (topk
    kept [0, 0, 1, 1, 0, 0, 1, 1] for the first row)."""
    w = torch.tensor([[1., 1, 1, 1, -1, 1, -1, 1],
                      [2, 1, 1, 2, 0, 0, 0, 3],
                      [-3, 3, 0.5, -3, 0, 0, 0, 0]])
    net = nn.Sequential(nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.copy_(w)
    prune.n_m(net, 2, 4)
    expected = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0],
                             [1, 0, 0, 1, 1, 0, 0, 1],
                             [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(prune.get_mask(net[0]), expected)
    assert torch.equal(magnitude_24_mask(w), expected)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (5, 8), (1, 2)])
def test_n_m_ties_go_to_the_lower_index(n, m):
    net = nn.Sequential(nn.Linear(3 * m, 5))
    with torch.no_grad():
        net[0].weight.fill_(-0.25)                          # every |w| equal
    prune.n_m(net, n, m)
    expected = (torch.arange(3 * m) % m < n).expand(5, -1)  # the first n of each group
    assert torch.equal(prune.get_mask(net[0]), expected)


@pytest.mark.parametrize("n,m,err,msg", [(4, 4, ValueError, "n:m = 4:4 is not supported"),
                                         (0, 4, ValueError, "n:m = 0:4"),
                                         (1, 1, ValueError, "n:m = 1:1"),
                                         (2.0, 4, TypeError, "n must be an int, got 2.0"),
                                         (2, "4", TypeError, "m must be an int, got '4'")])
def test_bad_n_m(n, m, err, msg):
    with pytest.raises(err, match=msg):
        prune.n_m(mlp(), n, m)


# --- masks stay applied while training; finish --------------------------------------------

@pytest.mark.parametrize("opt_name", ["adam_wd", "adamw", "sgd_momentum"])
def test_no_optimizer_revives_pruned_weights(opt_name):
    net = convnet()
    prune.magnitude(net, 0.6, scope="global")
    masks = {n: prune.get_mask(m).clone() for n, m in layers(net)}
    params = list(net.parameters())
    opt = {"adam_wd": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
           "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-1),
           "sgd_momentum": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9,
                                                   weight_decay=1e-2)}[opt_name]()
    x, y = torch.randn(32, 4, 4, 4), torch.randint(0, 4, (32,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        for n, m in layers(net):   # d loss / d original is exactly 0 where pruned
            assert float(m.parametrizations.weight.original.grad[~masks[n]].abs().max()) == 0.0
        opt.step()
    for n, m in layers(net):
        assert bool((m.weight.detach()[~masks[n]] == 0).all())
        assert bool((m.parametrizations.weight.original.detach()[~masks[n]] == 0).all())
        assert bool((m.weight.detach()[masks[n]] != 0).all()), "training should move kept weights"
    out = net(x)
    prune.finish(net)
    for n, m in layers(net):
        assert type(m) in (nn.Linear, nn.Conv2d) and isinstance(m.weight, nn.Parameter)
        assert not prune.is_masked(m) and not hasattr(m, "parametrizations")
        assert torch.equal(m.weight.detach() == 0, ~masks[n])
    assert set(net.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert torch.equal(net(x), out)


def test_finish_to_sparse24_gives_kernel_layers_with_the_same_output():
    net = convnet()
    net.add_module("4", nn.ReLU())
    net.add_module("5", nn.Linear(4, 3))
    prune.n_m(net, 2, 4)
    x = torch.randn(5, 4, 4, 4)
    with torch.no_grad():
        ref = net(x)
    prune.finish(net, to_sparse24=True)
    assert isinstance(net[0], QuantConv2d) and isinstance(net[0].inner, Sparse24Linear)
    assert isinstance(net[3], Sparse24Linear) and isinstance(net[5], Sparse24Linear)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_finish_to_sparse24_leaves_non_24_layers_dense_with_the_reason():
    net = mlp()
    prune.n_m(net, 2, 4, include="0")
    prune.magnitude(net, 0.5, include="2")
    with pytest.warns(UserWarning, match="2: weight is not 2:4"):
        prune.finish(net, to_sparse24=True)
    assert isinstance(net[0], Sparse24Linear)
    assert type(net[2]) is nn.Linear and zeros(net[2]) == 48
    assert type(net[4]) is nn.Linear                   # never masked: not touched, not listed
    assert set(net.pyfast_skipped) == {"2"}


# --- QAT layers are prunable ----------------------------------------------------------------

def _inner_weight(layer):
    """The weight [N, K] a converted layer multiplies by, read through its forward:
    layer(I) - layer(0) (an exact 0 wherever the stored weight is 0: 0 + b - b)."""
    lin = layer.inner if isinstance(layer, QuantConv2d) else layer
    k = lin.in_features
    with torch.no_grad():
        return (lin(torch.eye(k)) - lin(torch.zeros(1, k))).T


@pytest.mark.parametrize("method,kw", [("int8", {}), ("int4", {"group_size": -1}),
                                       ("int4", {"group_size": -1, "symmetric": False})])
def test_qat_layers_are_pruned_and_convert_with_their_zeros(method, kw):
    """prepare_qat then prune: QATLinear / QATConv2d get masks as Linear / Conv2d do (they
    were left dense, sparsity 0.0, with no reason), the masks survive QAT training, and
    convert_qat quantizes the masked weights, so the zeros stay."""
    net = convnet()                       # Conv2d K = 36, Linear K = 128
    quant.prepare_qat(net, method, **kw)
    prune.magnitude(net, 0.5)
    assert isinstance(net[0], QATConv2d) and isinstance(net[3], QATLinear)
    assert prune.sparsity(net).overall == 0.5 and getattr(net, "pyfast_skipped", {}) == {}
    masks = {i: prune.get_mask(net[i]).clone() for i in (0, 3)}
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-2)
    x, y = torch.randn(16, 4, 4, 4), torch.randint(0, 4, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for i, mask in masks.items():
        assert bool((net[i].parametrizations.weight.original.detach()[~mask] == 0).all())
    with torch.no_grad():
        fake = net(x)
    quant.convert_qat(net)
    for i, mask in masks.items():
        assert bool((_inner_weight(net[i])[~mask.reshape(mask.shape[0], -1)] == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(net(x), fake, rtol=1e-4, atol=1e-5)


def test_finish_makes_qat_masks_permanent_and_keeps_the_qat_layers():
    net = convnet()
    quant.prepare_qat(net, "int8")
    prune.n_m(net, 2, 4)
    with pytest.warns(UserWarning, match="3: QATLinear: mask made permanent, stays a QAT layer"):
        prune.finish(net, to_sparse24=True)   # no 2:4 QAT format: convert_qat quantizes it
    assert type(net[0]) is QATConv2d and type(net[3]) is QATLinear
    assert isinstance(net[3].weight, nn.Parameter) and is_24(net[3].weight.detach())
    assert set(net.pyfast_skipped) == {"0", "3"}
    quant.convert_qat(net)
    assert is_24(_inner_weight(net[3])) and is_24(_inner_weight(net[0]))
