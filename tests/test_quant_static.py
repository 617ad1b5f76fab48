"""Calibrated static int8: StaticInt8Linear, prepare_static / calibrate / convert_static,
and the digits CNN with every observer."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfast
from pyfast import quant
from pyfast.digits import DigitsCNN, accuracy, load_digits, train
from pyfast.nn import QuantConv2d, StaticInt8Linear


def _int8_rows(w):
    s = w.abs().amax(dim=1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(w / s), -127, 127) * s


def test_static_linear_matches_dequantized_matmul_and_clips():
    lin = nn.Linear(40, 7)
    x = torch.randn(3, 5, 40) * 2                       # leading dims [3, 5]
    s = torch.tensor([0.03])                            # clips |x| > 3.81
    layer = StaticInt8Linear.from_linear(lin, s)
    x_dq = torch.clamp(torch.round(x / s), -127, 127) * s
    ref = F.linear(x_dq, _int8_rows(lin.weight.detach()), lin.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert float((x.abs() > 127 * 0.03).float().mean()) > 0.01   # the test really clips
    assert "int8 W8A8 static" in repr(layer) and "input_scale=0.03" in repr(layer)


def test_static_linear_half_input_and_nan_row():
    lin = nn.Linear(16, 4)
    layer = StaticInt8Linear.from_linear(lin, torch.tensor([0.01]))
    x = torch.randn(3, 16)
    x[1, 2] = float("nan")
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()


def test_static_linear_config_round_trip():
    layer = StaticInt8Linear.from_linear(nn.Linear(24, 6, bias=False), torch.tensor([0.05]))
    rebuilt = StaticInt8Linear.from_config(layer.pyfast_config())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, 24)
    assert torch.equal(rebuilt(x), layer(x))
    assert float(rebuilt.input_scale) == pytest.approx(0.05)


def test_static_linear_errors():
    lin = nn.Linear(8, 2)
    with pytest.raises(ValueError, match="input_scale is required"):
        StaticInt8Linear.from_linear(lin)
    with pytest.raises(ValueError, match=r"input_scale has shape \(2,\); accepted: one value"):
        StaticInt8Linear.from_linear(lin, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="input_scale has dtype torch.float64; accepted: float32"):
        StaticInt8Linear.from_linear(lin, torch.tensor([0.1], dtype=torch.float64))
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="input_scale must be a positive finite float32"):
            StaticInt8Linear.from_linear(lin, torch.tensor([bad]))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_minmax_scales_are_the_input_ranges_of_each_layer():
    torch.manual_seed(0)
    model = MLP()
    batches = [torch.randn(8, 12) * (i + 1) for i in range(3)]
    with torch.no_grad():   # the inputs each layer sees, computed by hand
        h1 = [torch.relu(model.fc1(x)) for x in batches]
        h2 = [torch.relu(model.fc2(h)) for h in h1]
    expected = {name: max(float(t.abs().max()) for t in ins) / 127
                for name, ins in (("fc1", batches), ("fc2", h1), ("head", h2))}
    model.train()
    quant.prepare_static(model)
    quant.calibrate(model, [(x, torch.zeros(8)) for x in batches[:2]] + [batches[2]],
                    progress=False)
    assert model.training                                # mode restored
    quant.convert_static(model)
    for name, scale in expected.items():
        layer = getattr(model, name)
        assert isinstance(layer, StaticInt8Linear)
        assert float(layer.input_scale) == pytest.approx(scale, rel=1e-6)
        assert not layer._forward_pre_hooks               # hooks are gone


def test_include_exclude_and_skipped_convs():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 2))
    with pytest.warns(UserWarning, match="0: groups=2"):
        quant.prepare_static(model, "percentile", percentile=99.0, exclude="4")
    quant.calibrate(model, [torch.randn(4, 2, 8, 8)], progress=False)
    quant.convert_static(model)
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Linear
    assert isinstance(model[1], QuantConv2d) and isinstance(model[1].inner, StaticInt8Linear)
    assert isinstance(model[3], StaticInt8Linear)
    assert "0" in model.pyfast_skipped


def test_workflow_errors():
    with pytest.raises(ValueError, match="model has no observers: call pyfast.quant.prepare_static"):
        quant.calibrate(MLP(), [torch.randn(2, 12)])
    with pytest.raises(ValueError, match="model has no observers"):
        quant.convert_static(MLP())
    model = quant.prepare_static(MLP(), "mse")
    with pytest.raises(ValueError, match="layer 'fc1': MSEObserver has observed no data: calibrate first"):
        quant.convert_static(model)
    with pytest.raises(ValueError, match="layer 'fc1' already has an observer"):
        quant.prepare_static(model)
    with pytest.raises(ValueError, match="batches is empty"):
        quant.calibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="each calibration batch must be a tensor x or a tuple"):
        quant.calibrate(model, [{"x": torch.randn(2, 12)}], progress=False)
    with pytest.raises(ValueError, match="observer 'ema' is not supported; accepted: minmax"):
        quant.prepare_static(MLP(), "ema")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quant.convert_static("model")
    zeros = quant.prepare_static(MLP())
    quant.calibrate(zeros, [torch.zeros(2, 12)], progress=False)
    with pytest.raises(ValueError, match="layer 'fc1': MinMaxObserver observed only zeros"):
        quant.convert_static(zeros)
    assert isinstance(zeros.fc1, nn.Linear) and hasattr(zeros.fc2, "_pyfast_observer")  # untouched


class _WithAuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 8)
        self.aux_head = nn.Linear(32, 8)        # never called by forward

    def forward(self, x):
        return self.body(x)


def test_a_layer_no_batch_reached_is_left_with_the_reason():
    """It was refused with 'calibrate first' although calibrate had run: now it is left as
    it is, with the reason, as gptq_quantize leaves such a layer; the others convert."""
    model = _WithAuxHead()
    x = torch.randn(4, 32)
    with pytest.warns(UserWarning, match=r"aux_head: no calibration batch reached it .* "
                                         "calibrate on inputs that reach it"):
        quant.quantize_static(model, [x], progress=False)
    assert isinstance(model.body, StaticInt8Linear) and type(model.aux_head) is nn.Linear
    assert "no calibration batch reached it" in model.pyfast_skipped["aux_head"]
    assert _no_observers(model)
    model.aux_head(x)                                     # a plain Linear again, no hook
    with pytest.raises(ValueError, match="observed no data"):   # no layer saw data at all
        quant.convert_static(quant.prepare_static(_WithAuxHead()))


@pytest.mark.parametrize("kwargs, warning", [
    (dict(include="blocks.*"), "include='blocks.*' selects none of the model's 2 nn.Linear / "
                               "nn.Conv2d layers"),
    (dict(exclude="*"), "exclude='*' selects none of the model's 2"),
    (dict(conv=False, include="0"), "include='0' selects none"),
], ids=["include", "exclude", "conv-off"])
def test_filters_selecting_nothing_warn_and_return_the_model_unchanged(kwargs, warning):
    """As pyfast.quantize: a warning, and the model back as it was (it said 'call
    prepare_static', which quantize_static had just called)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.warns(UserWarning, match=re.escape(warning)):
        out = quant.quantize_static(model, [torch.randn(2, 2, 8, 8)], progress=False, **kwargs)
    assert out is model and _no_observers(model)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear


def test_only_unconvertible_layers_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.warns(UserWarning, match="0: groups=2"):
        quant.quantize_static(model, [torch.randn(1, 2, 8, 8)], progress=False)
    assert type(model[0]) is nn.Conv2d and "0" in model.pyfast_skipped and _no_observers(model)


@pytest.mark.parametrize("layer", [nn.Linear(32, 8), nn.Conv2d(3, 4, 3)], ids=["linear", "conv"])
def test_prepare_static_refuses_a_bare_layer_up_front(layer):
    """convert_static cannot replace the model itself: say so before calibration, with no
    observer or hook left on the layer."""
    kind = type(layer).__name__
    with pytest.raises(ValueError, match=f"model is itself an nn.{kind}; wrap it in a container"):
        quant.prepare_static(layer)
    assert _no_observers(layer)
    model = quant.prepare_static(nn.Sequential(layer))       # the fix the message gives
    assert hasattr(model[0], "_pyfast_observer")


def test_one_tensor_is_one_batch():
    """A bare tensor [B, ...] is one batch, as gptq_quantize takes it; it used to be
    iterated row by row (B unbatched forwards: another moving-average scale, a CNN
    failing on unbatched images)."""
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    a = quant.quantize_static(copy.deepcopy(base), [x], observer="moving_average", progress=False)
    b = quant.quantize_static(copy.deepcopy(base), x, observer="moving_average", progress=False)
    assert torch.equal(a[0].input_scale, b[0].input_scale)
    assert torch.equal(a[2].input_scale, b[2].input_scale)
    prepared = quant.prepare_static(copy.deepcopy(base))
    quant.calibrate(prepared, x, progress=False)
    assert prepared[0]._pyfast_observer.batches == 1
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    quant.quantize_static(cnn, torch.randn(16, 3, 8, 8), progress=False)
    assert isinstance(cnn[3], StaticInt8Linear) and isinstance(cnn[0], QuantConv2d)


def _no_observers(model):
    return all(not m._forward_pre_hooks and not hasattr(m, "_pyfast_observer")
               for m in model.modules())


@pytest.mark.parametrize("batches, exc, match", [
    ([torch.randn(4, 31)], RuntimeError, "shapes cannot be multiplied"),
    ([], ValueError, "batches is empty"),
    ([torch.zeros(4, 32)], ValueError, "layer '0': MinMaxObserver observed only zeros"),
], ids=["wrong-width", "empty", "zeros"])
def test_failed_quantize_static_leaves_the_model_as_it_was(batches, exc, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        quant.quantize_static(model, batches, progress=False)
    assert _no_observers(model) and not hasattr(model, "pyfast_skipped")
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 32)
    quant.quantize_static(model, [x], progress=False)          # the retry works
    assert isinstance(model[0], StaticInt8Linear) and isinstance(model[2], StaticInt8Linear)


def test_failed_quantize_static_keeps_earlier_observers_and_skipped():
    """Only what the failed call attached goes: a prepare_static the user made before
    stays, and model.pyfast_skipped is as it was (the call added a skipped conv)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    quant.prepare_static(model, include="1")
    for call in (lambda: quant.quantize_static(model, [torch.randn(2, 8)], progress=False),
                 lambda: quant.prepare_static(model)):               # prepare_static alone too
        with pytest.raises(ValueError, match="layer '1' already has an observer"):
            call()
        assert _no_observers(model[0]) and len(model[1]._forward_pre_hooks) == 1
    convs = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    convs.pyfast_skipped = {"x": "earlier"}
    with pytest.warns(UserWarning, match="0: groups=2"):
        with pytest.raises(RuntimeError, match="channels"):
            quant.quantize_static(convs, [torch.randn(1, 3, 8, 8)], progress=False)
    assert _no_observers(convs) and convs.pyfast_skipped == {"x": "earlier"}


# --- digits CNN: every observer, and save / load -----------------------------------------

@pytest.fixture(scope="module")
def digits_teacher():
    data = load_digits()
    torch.manual_seed(0)
    model = train(DigitsCNN(width=8), data, epochs=6, progress=False)
    calib = [b for _, b in zip(range(8), data.batches(64, seed=100))]   # 8 (x, y) batches
    return data, model, calib


# Measured (width 8, 6 epochs, seed 0, 8 batches of 64): fp32 97.8%; static int8 with
# minmax 97.8%, moving_average 98.0%, percentile 98.0%, mse 98.0%. Threshold: 1.5 points.
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_static_int8_digits_cnn_keeps_accuracy(digits_teacher, observer):
    data, teacher, calib = digits_teacher
    fp32 = accuracy(teacher, data.x_test, data.y_test)
    model = quant.quantize_static(copy.deepcopy(teacher), calib, observer=observer,
                                  progress=False)
    assert sum(isinstance(m, StaticInt8Linear) for m in model.modules()) == 4   # 2 conv + 2 fc
    assert accuracy(model, data.x_test, data.y_test) >= fp32 - 0.015


def test_static_digits_cnn_saves_and_loads_bit_exactly(digits_teacher, tmp_path):
    data, teacher, calib = digits_teacher
    model = quant.quantize_static(copy.deepcopy(teacher), calib, observer="mse", progress=False)
    pyfast.save(model, tmp_path / "static.safetensors")
    with torch.device("meta"):
        skeleton = DigitsCNN(width=8)
    loaded = pyfast.load(skeleton, tmp_path / "static.safetensors").eval()
    assert isinstance(loaded[8], StaticInt8Linear) and isinstance(loaded[3].inner, StaticInt8Linear)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(loaded(data.x_test[:64]), model(data.x_test[:64]))
