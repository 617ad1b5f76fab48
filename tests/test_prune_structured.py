"""pyfast.prune.structured: channels really removed, same output as zeroing them, skips."""
import copy

import pytest
import torch
from torch import nn

import pyfast
from pyfast import prune
from pyfast.digits import DigitsCNN


pytestmark = pytest.mark.usefixtures("one_thread", "quiet_prune")   # tests/conftest.py




def randomize_bn(model):
    """Non-trivial BatchNorm statistics and affine parameters, so slicing them matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def lowest_l1(weight, n_remove):
    """Independent choice: the n_remove output channels with the smallest sum |w|."""
    return weight.detach().reshape(weight.shape[0], -1).abs().sum(1).argsort()[:n_remove]


def zero_inputs(layer, channels, group=1):
    """Zero the consumer's input columns that belong to `channels` (group columns each)."""
    cols = (channels[:, None] * group + torch.arange(group)[None, :]).flatten()
    with torch.no_grad():
        layer.weight[:, cols] = 0


# --- MLP and CNN: shapes, and the output equals the reference with channels zeroed ----------------

@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)], ids=["2d", "3d-tokens"])
def test_mlp_neurons_removed_same_output_as_zeroed_inputs(shape):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 8),
                        nn.GELU(), nn.Linear(8, 3)).eval()
    ref = copy.deepcopy(net)
    zero_inputs(ref[3], lowest_l1(net[0].weight, 8))
    zero_inputs(ref[5], lowest_l1(net[3].weight, 4))
    x = torch.randn(*shape)
    prune.structured(net, 0.5, x)
    assert [tuple(net[i].weight.shape) for i in (0, 3, 5)] == [(8, 12), (4, 8), (3, 4)]
    assert type(net[0]) is nn.Linear
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)
    assert net.pyfast_skipped == {"5": "its output is (part of) the model output; the last "
                                       "layer keeps its size"}


def test_cnn_channels_removed_through_bn_pool_and_flatten():
    torch.manual_seed(0)
    net = randomize_bn(DigitsCNN(width=8))
    before = sum(p.numel() for p in net.parameters())
    ref = copy.deepcopy(net)
    gone0 = lowest_l1(net[0].weight, 4)
    gone3 = lowest_l1(net[3].weight, 8)
    gone8 = lowest_l1(net[8].weight, 16)
    zero_inputs(ref[3], gone0)
    zero_inputs(ref[8], gone3, group=16)           # 8x8 pooled to 4x4: 16 columns per channel
    zero_inputs(ref[10], gone8)
    kept0 = sorted(set(range(8)) - set(gone0.tolist()))
    bn1 = copy.deepcopy(net[1])
    x = torch.rand(6, 1, 8, 8)
    prune.structured(net, 0.5, x[:1])
    shapes = {n: tuple(m.weight.shape) for n, m in net.named_modules() if hasattr(m, "weight")}
    assert shapes == {"0": (4, 1, 3, 3), "1": (4,), "3": (8, 4, 3, 3), "4": (8,),
                      "8": (16, 8 * 16), "10": (10, 16)}
    assert sum(p.numel() for p in net.parameters()) < before / 3
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(net[1], key), getattr(bn1, key)[kept0])
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
    assert prune.channel_counts(net) == {"0": 4, "3": 8, "8": 16, "10": 10}


def test_structured_model_saves_and_loads(tmp_path):
    net = randomize_bn(DigitsCNN(width=8))
    x = torch.rand(3, 1, 8, 8)
    prune.structured(net, 0.25, x)
    pyfast.save(net, tmp_path / "small.pyfast")
    with torch.device("meta"):
        skeleton = DigitsCNN(width=8)
    loaded = pyfast.load(skeleton, tmp_path / "small.pyfast").eval()
    assert tuple(loaded[8].weight.shape) == (24, 12 * 16)
    torch.testing.assert_close(loaded(x), net(x))


def test_l2_and_l1_choose_differently():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [2.0, 2.0]]))   # l1: 3 < 4; l2: 3 > 2.83
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    prune.structured(a, 0.5, torch.randn(1, 2), criterion="l1")
    prune.structured(b, 0.5, torch.randn(1, 2), criterion="l2")
    assert a[0].weight.tolist() == [[2.0, 2.0]] and b[0].weight.tolist() == [[3.0, 0.0]]


def test_bn_criterion_global_threshold_and_per_layer():
    net = randomize_bn(DigitsCNN(width=4))
    g0 = torch.tensor([0.1, -0.4, 0.2, 0.3])
    g3 = torch.tensor([0.5, 4.0, -1.0, 3.5, 2.0, 1.5, 3.0, 2.5])
    with torch.no_grad():
        net[1].weight.copy_(g0)
        net[4].weight.copy_(g3)
    x = torch.rand(1, 1, 8, 8)
    glob = prune.structured(copy.deepcopy(net), 0.5, x, criterion="bn")
    # 6 of the 12 lowest |gamma|: all of layer 0 (one kept: the largest, -0.4), then 0.5, -1.0
    assert glob[1].weight.tolist() == pytest.approx([-0.4])
    assert glob[4].weight.tolist() == pytest.approx([4.0, 3.5, 2.0, 1.5, 3.0, 2.5])
    assert glob.pyfast_skipped["8"] == "criterion 'bn' needs an affine BatchNorm right after the layer"
    layer = prune.structured(copy.deepcopy(net), 0.5, x, criterion="bn", scope="layer")
    assert layer[1].weight.tolist() == pytest.approx([-0.4, 0.3])
    assert layer[4].weight.tolist() == pytest.approx([4.0, 3.5, 3.0, 2.5])
    assert tuple(layer[3].weight.shape) == (4, 2, 3, 3)


def test_at_least_one_channel_and_include_exclude():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    prune.structured(net, 0.99, torch.randn(1, 4), include="0")
    assert net[0].out_features == 1 and net[2].in_features == 1 and net[2].out_features == 5
    prune.structured(net, 0.6, torch.randn(1, 4), exclude=["0", "4"])   # 3 of 5
    assert (net[0].out_features, net[2].out_features, net[4].in_features) == (1, 2, 2)


def test_masks_are_carried_to_the_smaller_layers():
    net = DigitsCNN(width=8).eval()
    prune.magnitude(net, 0.5)
    ref = copy.deepcopy(net)
    x = torch.rand(4, 1, 8, 8)
    prune.structured(net, 0.5, x)
    assert prune.is_masked(net[3]) and tuple(prune.get_mask(net[3]).shape) == (8, 4, 3, 3)
    assert torch.equal(net[3].weight.detach() == 0, ~prune.get_mask(net[3]))
    assert ref(x).shape == net(x).shape


# --- what cannot be pruned: skipped with the reason, or a clear error ---------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_residual_model_prunes_inside_the_block_and_skips_the_rest():
    torch.manual_seed(0)
    net = randomize_bn(Residual())
    ref = copy.deepcopy(net)
    zero_inputs(ref.conv2, lowest_l1(net.conv1.weight, 4))
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="stem: output feeds an add at node add; removing "
                                         "channels would break it"):
        prune.structured(net, 0.5, x)
    assert set(net.pyfast_skipped) == {"stem", "conv2", "head"}
    assert "an add at node add" in net.pyfast_skipped["conv2"]
    assert (net.stem.out_channels, net.conv1.out_channels, net.conv2.in_channels,
            net.conv2.out_channels) == (8, 4, 4, 8)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_global_average_pooling_by_mean_is_seen_through():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)

    class Gap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = net, nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))

    model = Gap()
    ref = copy.deepcopy(model)
    zero_inputs(ref.head, lowest_l1(net[0].weight, 4))
    prune.structured(model, 0.5, x)
    assert model.body[0].out_channels == 4 and model.head.in_features == 4
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:           # data-dependent control flow: fx cannot trace it
            h = h * 2
        return self.out(h)


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(prune.TraceError, match="needs torch.fx.symbolic_trace.*failed with TraceError"):
        prune.structured(Branchy(), 0.5, torch.randn(1, 4))
    assert issubclass(prune.TraceError, ValueError)
    with pytest.raises(prune.TraceError, match=r"running the traced model on example_input "
                                               r"\(shapes \[\(1, 5\)\]\) failed"):
        prune.structured(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), 0.5, torch.randn(1, 5))


class Viewy(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Linear(16, 16)
        self.fc = nn.Linear({"view": 64, "chmean": 16}.get(mode, 128), 3)

    def forward(self, x):
        if self.mode == "view":
            return self.fc(self.a(x).view(x.size(0), -1))
        if self.mode == "chmean":
            return self.fc(self.a(x).mean(1).flatten(1))
        if self.mode == "cat":
            return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(1))
        h = self.shared(self.shared(torch.relu(self.a(x) + self.b(x)).flatten(2)))
        return h.flatten(1)


@pytest.mark.parametrize("mode,name,reason", [
    ("view", "a", "output feeds tensor.view() at node view"),
    ("cat", "a", "output feeds a concat at node cat"),
    ("chmean", "a", "a reduction at node mean runs over the channel dim"),
    ("shared", "shared", "module 'shared' is called at 2 places (shared weights)"),
])
def test_reshape_concat_and_shared_modules_are_skipped(mode, name, reason):
    net = Viewy(mode)
    prune.structured(net, 0.5, torch.randn(2, 1, 4, 4))
    assert reason in net.pyfast_skipped[name]
    assert net.a.out_channels == 4


def test_grouped_convs_are_skipped():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=4),
                        nn.Flatten(), nn.Linear(4, 2))
    prune.structured(net, 0.5, torch.randn(1, 2, 3, 3))
    assert net.pyfast_skipped["0"] == "grouped Conv2d (groups=2): its output channels come in groups"
    assert "grouped Conv2d (groups=4)" in net.pyfast_skipped["2"]
    assert net[0].out_channels == 4 and net[2].out_channels == 4


def test_structured_argument_errors():
    net, x = DigitsCNN(width=4), torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="criterion 'l3' is not supported; accepted: l1, l2, bn"):
        prune.structured(net, 0.5, x, criterion="l3")
    with pytest.raises(ValueError, match="scope 'global' needs criterion 'bn'"):
        prune.structured(net, 0.5, x, scope="global")
    with pytest.raises(ValueError, match="scope 'all' is not supported"):
        prune.structured(net, 0.5, x, criterion="bn", scope="all")
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)"):
        prune.structured(net, 1.0, x)
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor or a tuple"):
        prune.structured(net, 0.5, [x])


class _Aliased(nn.Module):
    """b registered under two names (b and c), called once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        self.c = self.b
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.c(torch.relu(self.a(x)))))


def test_a_module_registered_under_two_names_is_replaced_at_both():
    """Only the first name got the sliced layer; the other kept the old one, and the
    forward then failed on mismatched shapes."""
    torch.manual_seed(0)
    model, x = _Aliased(), torch.randn(2, 8)
    prune.structured(model, 0.5, example_input=x)
    assert model.b is model.c and model.a.out_features == model.b.in_features < 16
    assert model(x).shape == (2, 3)
