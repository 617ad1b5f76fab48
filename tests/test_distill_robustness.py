"""pyfast.distill on inputs the digits recipe does not exercise: a FeatureDistiller whose
construction fails, float16 embeddings, masked (-inf) logits, a relation layer whose
output is not batch-first, Conv1d / Conv3d feature maps, and a student sharing modules
with its teacher. Each used to leak hooks, give NaN or silently train on the wrong axis.

Oracles: hook counts, torch.isfinite, the same loss over the unmasked classes and
F.kl_div, F.mse_loss on hand-pooled maps, the module's training flag seen by a hook."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfast
from pyfast.distill import (FeatureDistiller, distill, kd_loss, response_loss, rkd_angle_loss,
                            rkd_distance_loss)


def _hooks(*mods):
    return [len(m._forward_hooks) for m in mods]


# --- a failed FeatureDistiller leaves no hook behind ----------------------------------------

class _AuxNet(nn.Module):
    """`aux` runs in training mode only (an Inception-style auxiliary branch)."""

    def __init__(self, w):
        super().__init__()
        self.body, self.aux, self.head = nn.Linear(8, w), nn.Linear(w, w), nn.Linear(w, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.training:
            h = h + self.aux(h)
        return self.head(h)


def test_feature_distiller_failing_in_the_model_removes_its_hooks():
    s, t = _AuxNet(16), _AuxNet(32)
    # the model's own error on a wrong example_input (a RuntimeError, not a ValueError)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        FeatureDistiller(s, t, {"body": "body"}, example_input=torch.randn(4, 9))
    assert _hooks(s.body, t.body) == [0, 0]


def test_feature_distiller_on_a_train_only_layer_says_so_and_removes_its_hooks():
    s, t = _AuxNet(16), _AuxNet(32)
    with pytest.raises(ValueError, match="student module 'aux' did not run in the eval-mode "
                                         "forward of example_input"):
        FeatureDistiller(s, t, {"aux": "aux"}, example_input=torch.randn(4, 8))
    assert _hooks(s.aux, t.aux) == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyfast.quantize(s, "int8")
    assert "aux" not in s.pyfast_skipped and type(s.aux).__name__ == "Int8Linear"


def test_distill_with_a_failing_pairs_dict_leaves_no_hook():
    s, t = _AuxNet(16), _AuxNet(32)
    data = [(torch.randn(8, 8), torch.randint(0, 3, (8,)))]
    with pytest.raises((ValueError, RuntimeError), match="student module 'aux'"):
        distill(s, t, data, epochs=1, lr=1e-3, features={"aux": "aux"}, progress=False)
    assert _hooks(s.aux, t.aux) == [0, 0]


# --- float16 embeddings: finite RKD gradients -------------------------------------------------

@pytest.mark.parametrize("loss", [rkd_angle_loss, rkd_distance_loss])
def test_rkd_gradients_are_finite_for_float16_embeddings(loss):
    torch.manual_seed(0)
    student = nn.Linear(8, 16)                         # float32 weights, float16 output
    x = torch.randn(8, 8)
    x[1] = x[0]                                        # two equal samples: distance 0
    emb = student(x).half()                            # what a CUDA autocast forward gives
    t_emb = torch.randn(8, 32, dtype=torch.float16)
    out = loss(emb, t_emb)
    out.backward()
    assert torch.isfinite(out) and bool(student.weight.grad.isfinite().all())
    want = loss(emb.detach().float(), t_emb.float())   # the float32 value, up to fp16 input
    torch.testing.assert_close(out.float(), want, rtol=1e-3, atol=1e-4)


def test_rkd_angle_gradient_stays_bounded_for_coincident_samples():
    """Two equal samples (duplicates, dead-ReLU zeros) have no direction between them: the
    angles through that pair count 0 with no gradient, instead of a 1/eps (1e9) gradient."""
    torch.manual_seed(0)
    e, t = torch.randn(8, 16), torch.randn(8, 32)
    e[1] = e[0]
    e.requires_grad_()
    rkd_angle_loss(e, t).backward()
    assert float(e.grad.abs().max()) < 1.0
    # the value is unchanged: F.normalize also gives the zero vector a unit of 0
    def cosines(x):
        unit = F.normalize(x[None] - x[:, None], dim=2)
        return unit @ unit.transpose(1, 2)
    idx = torch.arange(8)
    distinct = (idx[:, None, None] != idx[None, :, None]) & \
        (idx[:, None, None] != idx[None, None, :]) & (idx[None, :, None] != idx[None, None, :])
    want = F.smooth_l1_loss(cosines(e.detach())[distinct], cosines(t)[distinct])
    torch.testing.assert_close(rkd_angle_loss(e.detach(), t), want)


# --- masked (-inf) logits -------------------------------------------------------------------

def test_response_loss_with_masked_classes():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False, False])
    s_m = s.masked_fill(~mask, float("-inf")).requires_grad_()
    t_m = t.masked_fill(~mask, float("-inf"))
    got = response_loss(s_m, t_m, temperature=2.0)
    torch.testing.assert_close(got, response_loss(s[:, :4], t[:, :4], temperature=2.0))
    got.backward()
    assert bool(s_m.grad.isfinite().all())
    # teacher masked only: the KL over probability targets, 0 log 0 = 0, as F.kl_div
    want = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t_m / 2, 1), reduction="batchmean") * 4
    torch.testing.assert_close(response_loss(s, t_m, temperature=2.0), want)
    y = torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(kd_loss(s_m, t_m, y, temperature=2.0))


# --- relation_layer must give batch-first outputs ---------------------------------------------

class _Seq(nn.Module):
    """emb -> [T, B, d] -> TransformerEncoder (batch_first=False) -> proj -> mean over T."""

    def __init__(self, d, batch_first=False):
        super().__init__()
        self.emb = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.proj = nn.Identity()
        self.head = nn.Linear(d, 5)

    def forward(self, x):                              # x [B, T, 8]
        h = self.emb(x).transpose(0, 1)                # [T, B, d]
        return self.head(self.proj(self.enc(h)).mean(0))


def test_relation_layer_with_time_first_output_is_refused_before_any_update():
    torch.manual_seed(0)
    teacher, student = _Seq(32), _Seq(16)
    before = [p.detach().clone() for p in student.parameters()]
    data = [(torch.randn(16, 5, 8), torch.randint(0, 5, (16,))) for _ in range(2)]
    with pytest.raises(ValueError, match=r"the student layer 'proj' gives an output of shape "
                                         r"\(5, 16, 16\), whose dim 0 is not the batch of 16"):
        distill(student, teacher, data, epochs=1, lr=1e-3, relation="distance",
                relation_layer=("proj", "proj"), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert _hooks(student.proj, teacher.proj) == [0, 0]
    # T == B would pass the shape check: a batch_first=False transformer is refused by type
    data = [(torch.randn(5, 5, 8), torch.randint(0, 5, (5,)))]
    with pytest.raises(ValueError, match="the student layer 'enc' is an nn.TransformerEncoder "
                                         "with batch_first=False"):
        distill(student, teacher, data, epochs=1, lr=1e-3, relation="angle",
                relation_layer=("enc", "enc"), progress=False)
    assert _hooks(student.enc, teacher.enc) == [0, 0]


# --- Conv1d / Conv3d feature maps: adapters on the channels ------------------------------------

def _conv_net(conv, c, stride):
    pool = {nn.Conv1d: nn.AdaptiveAvgPool1d, nn.Conv3d: nn.AdaptiveAvgPool3d}[conv]
    return nn.Sequential(conv(4, c, 3, stride=stride, padding=1), nn.ReLU(), pool(1),
                         nn.Flatten(), nn.Linear(c, 3))


@pytest.mark.parametrize("conv, x", [(nn.Conv1d, torch.randn(3, 4, 12)),
                                     (nn.Conv3d, torch.randn(2, 4, 6, 6, 6))])
def test_conv1d_and_conv3d_features_get_channel_adapters(conv, x):
    torch.manual_seed(0)
    student, teacher = _conv_net(conv, 6, 2), _conv_net(conv, 10, 1)   # C 6 -> 10, size halved
    for example in (x, None):                          # measured, or read from the layer
        with FeatureDistiller(student, teacher, {"0": "0"}, example_input=example) as fd:
            adapter = fd.adapters[0]
            assert isinstance(adapter, conv) and (adapter.in_channels,
                                                  adapter.out_channels) == (6, 10)
            assert set(adapter.kernel_size) == {1}
            s, t = student[0](x), teacher[0](x).detach()
            student(x)
            teacher(x)
            pool = F.adaptive_avg_pool1d if conv is nn.Conv1d else F.adaptive_avg_pool3d
            want = F.mse_loss(adapter(s), pool(t, s.shape[2:]))
            torch.testing.assert_close(fd.loss(), want)


def test_conv1d_features_that_cannot_compare_fail_at_construction():
    x = torch.randn(3, 4, 12)
    student, teacher = _conv_net(nn.Conv1d, 6, 1), _conv_net(nn.Conv1d, 10, 1)
    with pytest.raises(ValueError, match="student width 6 != teacher width 10 and adapters=False"):
        FeatureDistiller(student, teacher, {"0": "0"}, adapters=False, example_input=x)
    # a [B, C, L] map against a [B, ..., D] feature: refused, not adapted over time
    with pytest.raises(ValueError, match=r"one feature is a \[B, C, L\] map and the other is not"):
        FeatureDistiller(student, teacher, {"0": "4"}, example_input=x)
    assert _hooks(student[0], teacher[0], teacher[4]) == [0, 0, 0]


# --- a module shared by student and teacher runs in eval mode -----------------------------

def test_shared_frozen_backbone_stays_in_eval_mode():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5))
    backbone.requires_grad_(False)
    teacher = nn.Sequential(backbone, nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    student = nn.Sequential(backbone, nn.Linear(32, 4))
    before = backbone[1].running_mean.clone()
    modes = []
    h = teacher[1].register_forward_pre_hook(lambda m, a: modes.append(backbone.training))
    data = [(torch.randn(16, 8) + 3.0, torch.randint(0, 4, (16,))) for _ in range(2)]
    try:
        distill(student, teacher, data, epochs=1, lr=1e-3, progress=False)
    finally:
        h.remove()
    assert modes == [False, False]
    assert torch.equal(backbone[1].running_mean, before)
