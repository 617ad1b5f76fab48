"""pyfast.prune.iterative and the Zhu & Gupta (2017) sparsity schedule."""
import functools
import warnings

import pytest
import torch
from torch import nn

from pyfast import prune


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3))


def layer_zeros(model):
    return {n: int((m.weight.detach() == 0).sum()) for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def test_cubic_and_linear_schedules():
    cubic = prune.sparsity_schedule(0.8, 4)
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3 with s_i = 0: 0.8 * (1 - (1 - t/4)^3)
    assert cubic == pytest.approx([0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3),
                                   0.8 * (1 - 0.25 ** 3), 0.8])
    assert prune.sparsity_schedule(0.6, 3, "linear", initial_amount=0.3) == pytest.approx([0.4, 0.5, 0.6])
    assert prune.sparsity_schedule(0.5, 1) == [0.5]
    steps = prune.sparsity_schedule(0.9, 10)
    gains = [b - a for a, b in zip([0.0] + steps, steps)]
    assert all(x > y for x, y in zip(gains, gains[1:])), "cubic prunes less and less each step"


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(steps=0), ValueError, "steps must be an int >= 1, got 0"),
    (dict(steps=2.5), ValueError, "steps must be an int >= 1, got 2.5"),
    (dict(schedule="exp"), ValueError, "schedule 'exp' is not supported; accepted: cubic, linear"),
    (dict(initial_amount=0.9), ValueError, "initial_amount 0.9 is larger than final_amount 0.5"),
    (dict(final_amount=1.0), ValueError, r"final_amount must be a fraction in \[0, 1\)"),
])
def test_schedule_errors(kwargs, err, msg):
    args = dict(final_amount=0.5, steps=3)
    args.update(kwargs)
    with pytest.raises(err, match=msg):
        prune.sparsity_schedule(**args)
    with pytest.raises(err, match=msg):
        prune.iterative(mlp(), **args)


def test_iterative_magnitude_reaches_the_final_sparsity_and_finetunes_each_step():
    net = mlp()
    seen = []
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))

    def finetune(model, step):
        assert model is net
        seen.append((step, prune.sparsity(model).overall))
        for _ in range(3):      # the optimizer holds the original parameters: masks stay
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    out = prune.iterative(net, 0.75, 3, finetune=finetune)
    assert out is net
    assert [s for s, _ in seen] == [1, 2, 3]
    sizes = {n: m.weight.numel() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    total = sum(sizes.values())
    for (step, overall), target in zip(seen, prune.sparsity_schedule(0.75, 3)):
        expected = sum(round(target * n) for n in sizes.values()) / total
        assert overall == pytest.approx(expected, abs=1e-9), f"step {step}"
    assert layer_zeros(net) == {n: round(0.75 * k) for n, k in sizes.items()}


def test_iterative_global_random_and_finish():
    net = mlp()
    prune.iterative(net, 0.5, 2, prune_fn=prune.random, schedule="linear", seed=4, finish=True)
    assert not any(prune.is_masked(m) for m in net.modules())
    assert sum(layer_zeros(net).values()) == sum(round(0.5 * m.weight.numel())
                                                 for m in net.modules() if isinstance(m, nn.Linear))
    glob = mlp()
    prune.iterative(glob, 0.6, 3, scope="global")
    n = sum(m.weight.numel() for m in glob.modules() if isinstance(m, nn.Linear))
    assert abs(sum(layer_zeros(glob).values()) - 0.6 * n) <= 0.5


def test_iterative_structured_shrinks_each_step():
    net = mlp()
    widths = []

    def finetune(model, step):
        widths.append((model[0].out_features, model[2].out_features))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune.iterative(net, 0.5, 3, prune_fn=functools.partial(prune.structured,
                                                                 example_input=torch.randn(1, 20)),
                        finetune=finetune, schedule="linear")
    # linear 1/6, 1/3, 1/2 of the original 30 / 10; each step removes a fraction of what is
    # left (0.2 then 0.25), rounded per step: 10 -> 8 -> 6 -> 4 (one off 5 by the rounding)
    assert widths[0] == (25, 8) and widths[-1][0] == 15 and abs(widths[-1][1] - 5) <= 1
    assert widths[0][0] > widths[1][0] > widths[2][0]
    assert net(torch.randn(2, 20)).shape == (2, 3)


@pytest.mark.parametrize("initial_amount", [0.25, 0.5])
def test_iterative_structured_reaches_final_amount_whatever_initial_amount(initial_amount):
    """Step 1 used to assume initial_amount of the channels already gone: with 0.5, only
    19% of them were removed instead of 60%."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the output layer is reported as kept
        prune.iterative(net, 0.6, 3, initial_amount=initial_amount,
                        prune_fn=prune.structured, example_input=torch.randn(2, 8))
    assert abs(net[0].out_features - 0.4 * 64) <= 1.5     # per-step rounding


def test_iterative_argument_errors():
    with pytest.raises(TypeError, match="prune_fn must be a callable"):
        prune.iterative(mlp(), 0.5, 2, prune_fn="magnitude")
    with pytest.raises(TypeError, match="finetune must be a callable"):
        prune.iterative(mlp(), 0.5, 2, finetune=3)
    with pytest.raises(TypeError, match="finish must be a bool"):
        prune.iterative(mlp(), 0.5, 2, finish=1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prune.iterative(None, 0.5, 2)
