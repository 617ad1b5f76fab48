"""pyfast.distill: response (Hinton 2015), feature (FitNets 2015) and relation (RKD 2019)
distillation, and the training loop on digits.

Oracles: the KL written out with softmax sums and F.kl_div, RKD written as Python loops
over pairs and triplets, pooled MSE written by hand, pyfast.digits.train as the
supervised baseline, accuracy thresholds measured with fixed seeds."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfast.digits import DigitsCNN, accuracy, load_digits, train
from pyfast.distill import (FeatureDistiller, distill, kd_loss, response_loss, rkd_angle_loss,
                            rkd_distance_loss)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def teacher(digits):
    torch.manual_seed(0)
    return train(DigitsCNN(32), digits, epochs=10, progress=False)   # 98.9% test accuracy


# --- response distillation -----------------------------------------------------------------

def kl_by_hand(s, t, T):
    """sum_c p_t,c (log p_t,c - log p_s,c), averaged over rows, times T^2; softmax by exp/sum."""
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T


@pytest.mark.parametrize("T", [1.0, 4.0, 8.0])
def test_response_loss_is_the_scaled_kl(T):
    s, t = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    got = response_loss(s, t, T)
    torch.testing.assert_close(got, kl_by_hand(s, t, T))
    want = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    torch.testing.assert_close(got, want)
    assert float(response_loss(t, t, T)) == pytest.approx(0.0, abs=1e-12)
    assert float(got) > 0


def test_response_loss_gradient_scale_does_not_depend_on_T():
    """The T^2 factor: the gradient norm at T=8 stays within 2x of T=1 (without it, it
    would be ~64x smaller); the loss value is exactly T^2 times the softened KL."""
    torch.manual_seed(0)
    t = torch.randn(32, 10)
    norms = {}
    for T in (1.0, 8.0):
        s = torch.randn(32, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
        response_loss(s, t, T).backward()
        norms[T] = s.grad.norm().item()
    assert 0.5 < norms[8.0] / norms[1.0] < 2.0
    s = torch.randn(32, 10)
    unscaled = F.kl_div(F.log_softmax(s / 8, 1), F.softmax(t / 8, 1), reduction="batchmean")
    torch.testing.assert_close(response_loss(s, t, 8.0), 64 * unscaled)


def test_kd_loss_mixes_soft_and_hard_terms():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    want = 0.3 * kl_by_hand(s, t, 2.0) + 0.7 * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, alpha=0.3, temperature=2.0), want)
    t.requires_grad_()
    kd_loss(s.requires_grad_(), t, y).backward()
    assert t.grad is None                     # the teacher is a target, never trained


# --- relation distillation ------------------------------------------------------------------

def rkd_distance_by_loop(s, t):
    def dists(e):
        d = [torch.dist(e[i], e[j]) for i in range(len(e)) for j in range(i + 1, len(e))]
        d = torch.stack(d)
        return d / d.mean()
    return F.smooth_l1_loss(dists(s), dists(t))


def rkd_angle_by_loop(s, t):
    def cosines(e):
        out = []
        for i in range(len(e)):
            for j in range(len(e)):
                for k in range(len(e)):
                    if len({i, j, k}) == 3:
                        a, b = e[i] - e[j], e[k] - e[j]
                        out.append(torch.dot(a, b) / (a.norm() * b.norm()))
        return torch.stack(out)
    return F.smooth_l1_loss(cosines(s), cosines(t))


def test_rkd_losses_match_loops():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    torch.testing.assert_close(rkd_distance_loss(s, t), rkd_distance_by_loop(s, t))
    torch.testing.assert_close(rkd_angle_loss(s, t), rkd_angle_by_loop(s, t))
    assert float(rkd_distance_loss(s, t)) > 1e-3 and float(rkd_angle_loss(s, t)) > 1e-3
    # features of any shape are flattened per sample
    s4 = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    t4 = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(rkd_distance_loss(s4, t4), rkd_distance_by_loop(s4.flatten(1), t4))


def test_rkd_invariances():
    s, t = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))      # a rotation/reflection
    dist, ang = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
    torch.testing.assert_close(rkd_distance_loss(3.7 * s, t), dist)
    torch.testing.assert_close(rkd_angle_loss(3.7 * s, t), ang)
    torch.testing.assert_close(rkd_distance_loss(s @ q + 2.0, t), dist)
    torch.testing.assert_close(rkd_angle_loss(s @ q + 2.0, t), ang)
    # a non-rigid change is seen
    warp = s * torch.tensor([1.0, 1, 1, 1, 1, 5], dtype=torch.float64)
    assert abs(float(rkd_distance_loss(warp, t) - dist)) > 1e-3
    assert abs(float(rkd_angle_loss(warp, t) - ang)) > 1e-3


# --- feature distillation -------------------------------------------------------------------

def upto(model: nn.Sequential, i: int, x):
    """The output of module i of a Sequential, by running its modules 0..i in turn."""
    for mod in list(model)[:i + 1]:
        x = mod(x)
    return x


def test_feature_distiller_adapters_hooks_and_loss():
    student, teacher = DigitsCNN(4).eval(), DigitsCNN(8).eval()
    x = torch.randn(5, 1, 8, 8)
    fd = FeatureDistiller(student, teacher, {"5": "5", "8": "8", "3": "0"}, example_input=x)
    conv, lin, same = fd.adapters
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and \
        (conv.in_channels, conv.out_channels) == (8, 16)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (16, 32)
    assert isinstance(same, nn.Identity)          # 8 channels on both sides
    assert [p.shape for p in fd.parameters()] == [p.shape for p in [*conv.parameters(),
                                                                     *lin.parameters()]]
    with torch.no_grad():
        teacher(x)
        student(x)
        got = fd.loss()
        want = (F.mse_loss(conv(upto(student, 5, x)), upto(teacher, 5, x))
                + F.mse_loss(lin(upto(student, 8, x)), upto(teacher, 8, x))
                + F.mse_loss(upto(student, 3, x), upto(teacher, 0, x))) / 3
    torch.testing.assert_close(got, want)
    fd.close()
    assert not student[5]._forward_hooks and not teacher[5]._forward_hooks
    with pytest.raises(RuntimeError, match="hooks are closed"):
        fd.loss()


def test_feature_distiller_pools_the_larger_map_and_reads_widths_from_layers():
    student = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1))            # 8x8 maps
    teacher = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1))  # 4x4 maps
    with FeatureDistiller(student, teacher, {"0": "0"}) as fd:       # widths from Conv2d
        x = torch.randn(2, 1, 8, 8)
        teacher(x)
        out = student(x)
        want = F.mse_loss(F.avg_pool2d(fd.adapters[0](out), 2), teacher(x).detach())
        torch.testing.assert_close(fd.loss(), want)
    assert not student[0]._forward_hooks                             # the context closed it


def test_feature_distiller_errors():
    s, t = DigitsCNN(4), DigitsCNN(8)
    with pytest.raises(ValueError, match=r"the teacher has no module named 'conv9'; available: '0', '1'"):
        FeatureDistiller(s, t, {"0": "conv9"})
    assert not s[0]._forward_hooks                # the student's hook was removed again
    with pytest.raises(ValueError, match="cannot tell the output width of '2'.*example_input="):
        FeatureDistiller(s, t, {"2": "2"})
    with pytest.raises(ValueError, match="student width 8 != teacher width 16 and adapters=False"):
        FeatureDistiller(s, t, {"3": "3"}, adapters=False)
    with pytest.raises(ValueError, match="one feature is a \\[B, C, H, W\\] map and the other"):
        FeatureDistiller(s, t, {"3": "8"})
    with pytest.raises(TypeError, match="pairs must be a non-empty dict"):
        FeatureDistiller(s, t, {})
    with pytest.raises(ValueError, match="student and teacher are the same module"):
        FeatureDistiller(s, s, {"0": "0"})
    fd = FeatureDistiller(s, t, {"0": "0"})
    with pytest.raises(RuntimeError, match="no output of student module '0' captured yet"):
        fd.loss()
    fd.close()


# --- the training loop ----------------------------------------------------------------------

def test_alpha_zero_trains_exactly_like_digits_train(digits):
    torch.manual_seed(3)
    student, teacher = DigitsCNN(4), DigitsCNN(8).eval()
    baseline = train(copy.deepcopy(student), digits, epochs=2, lr=3e-3, seed=5, progress=False)
    teacher_state = copy.deepcopy(teacher.state_dict())
    out, history = distill(student, teacher, digits, epochs=2, lr=3e-3, alpha=0.0, seed=5,
                           progress=False)
    for (name, a), b in zip(out.state_dict().items(), baseline.state_dict().values()):
        assert torch.equal(a, b), name
    assert not out.training and not teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert [set(h) for h in history] == [{"loss", "ce", "kd"}] * 2
    assert history[1]["loss"] == pytest.approx(history[1]["ce"])


def test_two_steps_match_a_hand_written_update(digits):
    """Two batches, two Adam steps of alpha*KD + (1-alpha)*CE + w*(RKD-D + RKD-A) on the
    logits (the second Adam step depends on the ratio of the two gradients' sizes)."""
    torch.manual_seed(0)
    # no BatchNorm in the student: the bias of a conv before a BN gets a ~0 gradient, whose
    # float noise Adam (g / sqrt(g^2)) turns into a full +-lr step
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    teacher = DigitsCNN(8).eval()
    batches = [(digits.x_train[i:i + 32], digits.y_train[i:i + 32]) for i in (0, 32)]
    manual = copy.deepcopy(student).train()
    opt = torch.optim.Adam(manual.parameters(), lr=1e-2)
    total = 0.0
    for x, y in batches:
        s_logits, t_logits = manual(x), teacher(x).detach()
        loss = (0.3 * kl_by_hand(s_logits, t_logits, 2.0) + 0.7 * F.cross_entropy(s_logits, y)
                + 0.5 * (rkd_distance_by_loop(s_logits, t_logits)
                         + rkd_angle_loss(s_logits, t_logits)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) / 2
    out, history = distill(student, teacher, batches, epochs=1, lr=1e-2, temperature=2.0,
                           alpha=0.3, relation=("distance", "angle"), relation_weight=0.5,
                           progress=False)
    assert history[0]["loss"] == pytest.approx(total, rel=1e-5)
    for a, b in zip(out.state_dict().values(), manual.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)   # 1e-4: 1% of lr


def test_distilled_half_width_student_on_digits(digits, teacher):
    """Measured (1 thread, seed 0, 3 epochs): teacher 98.9%, student CE alone 98.0%,
    distilled (T=4, alpha=0.7) 97.6%."""
    torch.manual_seed(0)
    student = DigitsCNN(16)
    ce_only = train(copy.deepcopy(student), digits, epochs=3, lr=3e-3, seed=0, progress=False)
    student, history = distill(student, teacher, digits, epochs=3, lr=3e-3, seed=0,
                               progress=False)
    acc = accuracy(student, digits.x_test, digits.y_test)
    assert acc >= accuracy(ce_only, digits.x_test, digits.y_test) - 0.01
    assert acc >= 0.97
    assert history[-1]["kd"] < history[0]["kd"]


def test_feature_and_relation_terms_train_the_adapters(digits, teacher):
    torch.manual_seed(0)
    student = DigitsCNN(8)
    x0 = digits.x_train[:64]
    fd = FeatureDistiller(student, teacher, {"5": "5"}, example_input=x0)
    before = fd.adapters[0].weight.detach().clone()
    _, history = distill(student, teacher, digits, epochs=2, lr=3e-3, features=fd,
                         feature_weight=1.0, relation=("distance", "angle"),
                         relation_layer=("8", "8"), relation_weight=2.0, progress=False)
    assert fd.adapters[0].weight.shape == (64, 16, 1, 1)
    assert (fd.adapters[0].weight - before).abs().max() > 1e-3
    assert history[1]["feature"] < history[0]["feature"]
    assert history[1]["relation"] < history[0]["relation"]
    h = history[1]
    assert h["loss"] == pytest.approx(0.7 * h["kd"] + 0.3 * h["ce"] + h["feature"]
                                      + 2.0 * h["relation"], rel=1e-5)
    assert student[5]._forward_hooks                   # a FeatureDistiller passed in stays open
    fd.close()
    assert not student[8]._forward_hooks and not teacher[8]._forward_hooks


def test_pairs_dict_and_batch_list(digits, teacher):
    student = DigitsCNN(8)
    batches = list(digits.batches(128, seed=0))[:4]
    _, history = distill(student, teacher, batches, epochs=2, lr=3e-3, features={"2": "2"},
                         relation="distance", progress=False)
    assert len(history) == 2 and {"feature", "relation"} <= set(history[0])
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert not student[2]._forward_hooks and not teacher[2]._forward_hooks


def test_relation_skips_a_batch_too_small_for_it():
    """A DataLoader without drop_last ends on a batch of 2 (66 = 32 + 32 + 2): RKD is
    undefined there, so that batch trains on the other terms only, exactly as a
    hand-written loop would, and history["relation"] counts it 0."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(20, 5), nn.Linear(20, 5)
    x, y = torch.randn(66, 20), torch.randint(0, 5, (66,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    manual = copy.deepcopy(student).train()
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3)
    relation_sum = 0.0
    for xb, yb in loader:
        s_logits, t_logits = manual(xb), teacher(xb).detach()
        loss = 0.7 * response_loss(s_logits, t_logits) + 0.3 * F.cross_entropy(s_logits, yb)
        if len(xb) >= 3:
            relation = rkd_distance_loss(s_logits, t_logits)
            loss = loss + relation
            relation_sum += float(relation.detach()) * len(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, history = distill(student, teacher, loader, epochs=1, lr=1e-3, relation="distance",
                           progress=False)
    for a, b in zip(out.state_dict().values(), manual.state_dict().values()):
        torch.testing.assert_close(a, b)
    h = history[0]
    assert h["relation"] == pytest.approx(relation_sum / 66, rel=1e-5)
    assert h["loss"] == pytest.approx(0.7 * h["kd"] + 0.3 * h["ce"] + h["relation"], rel=1e-5)


def test_relation_with_batches_all_too_small_fails_before_training(digits):
    s, t = DigitsCNN(4), DigitsCNN(8)
    before = copy.deepcopy(s.state_dict())
    small = [(digits.x_train[i:i + 2], digits.y_train[i:i + 2]) for i in (0, 2)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(digits.x_train[:8], digits.y_train[:8]), batch_size=2)
    for data, kwargs, what in ((digits, dict(batch_size=2), "batch_size"),
                               (loader, {}, "data.batch_size"),
                               (small, {}, "the batches of data")):
        with pytest.raises(ValueError, match=f"relation needs batches of at least 3 samples "
                                             f".*but {what} gives at most 2"):
            distill(s, t, data, epochs=1, lr=1e-3, relation="angle", progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in s.state_dict().items())
    # batch sizes known only by running the data: the epoch is checked at its end
    with pytest.raises(ValueError, match="no batch of epoch 0 had that many"):
        distill(s, t, _Reiterable(small), epochs=1, lr=1e-3, relation="angle",
                progress=False)


class _Reiterable:
    """A re-iterable of batches that is no list, tuple or DataLoader."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_distill_errors(digits):
    s, t = DigitsCNN(4), DigitsCNN(8)
    ok = dict(epochs=1, lr=1e-3, progress=False)
    cases = [
        (dict(epochs=0), ValueError, "epochs must be a positive int, got 0"),
        (dict(lr=-1.0), ValueError, "lr must be a number > 0, got -1.0"),
        (dict(temperature=0), ValueError, "temperature must be a number > 0, got 0"),
        (dict(alpha=1.5), ValueError, r"alpha must be a float in \[0, 1\], got 1.5"),
        (dict(relation="cosine"), ValueError, "relation must be None, 'distance', 'angle'"),
        (dict(relation_layer=("8", "8")), ValueError, "needs relation='distance'"),
        (dict(relation="angle", relation_layer="8"), ValueError, "relation_layer must be None"),
        (dict(features=["5"]), TypeError, "features must be None, a FeatureDistiller or a dict"),
        (dict(feature_weight=-1), ValueError, "feature_weight must be a number >= 0, got -1"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            distill(s, t, digits, **{**ok, **kwargs})
    other = FeatureDistiller(DigitsCNN(4), t, {"0": "0"})
    with pytest.raises(ValueError, match="built on other models"):
        distill(s, t, digits, features=other, **ok)
    other.close()
    with pytest.raises(TypeError, match="one-shot iterator"):
        distill(s, t, (b for b in digits.batches()), **ok)
    with pytest.raises(TypeError, match="data must be a pyfast.digits.Digits or an iterable"):
        distill(s, t, 3, **ok)
    with pytest.raises(TypeError, match=r"each batch of data must be a pair \(x, y\)"):
        distill(s, t, [digits.x_train[:8]], **ok)
    for features in (None, {"0": "0"}):
        with pytest.raises(ValueError, match="data gave no batches in epoch 0"):
            distill(s, t, [], features=features, **ok)
    with pytest.raises(ValueError, match="student and teacher are the same module"):
        distill(s, s, digits, **ok)
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"must have the same shape \[B, C, \.\.\.\]"):
        response_loss(x, torch.randn(2, 9))
    with pytest.raises(TypeError, match="teacher_logits has dtype torch.int64"):
        response_loss(x, torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="the batch must hold at least 3, got 2"):
        rkd_distance_loss(x, x)
    with pytest.raises(ValueError, match="batches \\[B, ...\\] of the same B"):
        rkd_angle_loss(torch.randn(4, 3), torch.randn(5, 3))
