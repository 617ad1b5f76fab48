"""QuantConv2d (im2col + a pyfast matmul layer) and pyfast.quantize on Conv2d.

Every output is compared with an independent computation: F.conv2d with the weight
dequantized here by the formats.py rules (and, for W8A8, with each receptive field
quantized here per token, position by position, without F.unfold)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfast
from pyfast.digits import DigitsCNN, accuracy, load_digits, train
from pyfast.nn import (Int4Linear, Int8Linear, Int8WeightOnlyLinear, QuantConv2d,
                       StaticInt8Linear)


def _int8_rows(w):
    """Symmetric per-row int8 (formats.py), dequantized: w [R, C] -> float32 [R, C]."""
    s = w.abs().amax(dim=1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(w / s), -127, 127) * s


def _int4_sym(w, gs):
    """Symmetric group-wise int4 (formats.py), dequantized: w [N, K] -> float32 [N, K]."""
    n, k = w.shape
    g = w.reshape(n, k // gs, gs)
    s = g.abs().amax(dim=2, keepdim=True) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(n, k)


def _w8a8_conv_loop(x, w_dq, bias, conv):
    """Dynamic W8A8 conv, one output position at a time: each receptive field (zero
    padded) quantized per token, dotted with the dequantized weight."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    b, _, hp, wp = xp.shape
    h_out, w_out = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty(b, w_dq.shape[0], h_out, w_out)
    for i in range(h_out):
        for j in range(w_out):
            patch = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            out[:, :, i, j] = _int8_rows(patch.reshape(b, -1)) @ w_dq.T + bias
    return out


GEOMETRIES = [  # (C_in, C_out, kernel, stride, padding, dilation, batch, H, W)
    (3, 5, 3, 1, 1, 1, 3, 8, 8),
    (2, 4, (3, 2), 2, (1, 0), 1, 1, 9, 7),
    (4, 6, 3, (2, 1), 2, 2, 3, 11, 10),
    (1, 3, (1, 5), 1, (0, 2), (1, 2), 2, 5, 13),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"k{g[2]}s{g[3]}p{g[4]}d{g[5]}b{g[6]}")
def test_int8_weight_and_w8a8_conv_match_independent_conv(geom):
    c_in, c_out, k, s, p, d, b, h, w = geom
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d)
    x = torch.randn(b, c_in, h, w)
    w_dq = _int8_rows(conv.weight.detach().reshape(c_out, -1))
    bias = conv.bias.detach()
    ref = F.conv2d(x, w_dq.reshape(conv.weight.shape), bias, s, p, d)
    wo = QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear)
    torch.testing.assert_close(wo(x), ref, rtol=1e-5, atol=1e-5)
    w8a8 = QuantConv2d.from_conv(conv, Int8Linear.from_linear)
    torch.testing.assert_close(w8a8(x), _w8a8_conv_loop(x, w_dq, bias, conv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w8a8(x[0]), w8a8(x[:1])[0])          # unbatched input


def test_static_w8a8_conv_is_conv_of_dequantized_input_and_weight():
    conv = nn.Conv2d(3, 8, (2, 3), stride=(1, 2), padding=1)
    x = torch.randn(2, 3, 7, 9) * 2
    s = torch.tensor([0.02], dtype=torch.float32)        # clips |x| > 2.54: that is part of it
    q = QuantConv2d.from_conv(conv, lambda lin: StaticInt8Linear.from_linear(lin, s))
    x_dq = torch.clamp(torch.round(x / s), -127, 127) * s
    w_dq = _int8_rows(conv.weight.detach().reshape(8, -1)).reshape(conv.weight.shape)
    ref = F.conv2d(x_dq, w_dq, conv.bias.detach(), (1, 2), 1)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gs", [32, -1])
def test_int4_conv_matches_conv_with_dequantized_weight(gs):
    conv = nn.Conv2d(8, 6, (2, 2), stride=2, padding=(0, 1), dilation=(2, 1), bias=False)
    x = torch.randn(3, 8, 9, 6)
    q = QuantConv2d.from_conv(conv, lambda lin: Int4Linear.from_linear(lin, group_size=gs))
    w2 = conv.weight.detach().reshape(6, -1)                  # K = 8 * 2 * 2 = 32
    w_dq = _int4_sym(w2, w2.shape[1] if gs == -1 else gs)
    ref = F.conv2d(x, w_dq.reshape(conv.weight.shape), None, 2, (0, 1), (2, 1))
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 4, (2, 3)])
def test_same_and_valid_padding_strings(kernel):
    x = torch.randn(2, 3, 7, 8)
    for padding in ("same", "valid"):
        conv = nn.Conv2d(3, 4, kernel, padding=padding)
        q = QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear)
        w_dq = _int8_rows(conv.weight.detach().reshape(4, -1)).reshape(conv.weight.shape)
        ref = nn.Conv2d(3, 4, kernel, padding=padding)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch: 'same' with an even kernel pads a copy
            ref.weight.copy_(w_dq)
            ref.bias.copy_(conv.bias)
            torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)


def test_quantize_converts_convs_skips_with_reasons_and_opts_out():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(8, 16, 1))
    with pytest.warns(UserWarning, match="1: groups=2 .grouped/depthwise conv."):
        pyfast.quantize(model, "int8")
    assert isinstance(model[0], QuantConv2d) and isinstance(model[0].inner, Int8Linear)
    assert isinstance(model[3], QuantConv2d)
    assert type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d
    assert "padding_mode 'reflect'" in model.pyfast_skipped["2"]
    int4 = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 2))   # K = 36 and 32
    with pytest.warns(UserWarning, match="0: in_channels\\*kh\\*kw 36 is not a multiple of group_size 32"):
        pyfast.quantize(int4, "int4", group_size=32)
    assert isinstance(int4[1].inner, Int4Linear) and int4[1].inner.group_size == 32
    kept = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    pyfast.quantize(kept, "int8-weight", conv=False)
    assert type(kept[0]) is nn.Conv2d and isinstance(kept[2], Int8WeightOnlyLinear)
    with pytest.raises(TypeError, match="conv must be a bool, got 'no'"):
        pyfast.quantize(kept, "int8", conv="no")


def _memory_format(t):
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "other"


def test_output_has_the_memory_format_torch_conv_gives():
    """It was channels_last-strided for every input, so x.view(B, -1) after it failed."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    qat = pyfast.quant.QATConv2d.from_conv(copy.deepcopy(conv), "int8")
    for q in (QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear), qat):
        y = q(x)
        assert _memory_format(y) == "contiguous"
        assert y.view(2, -1).shape == (2, 8 * 36)                     # LeNet-style flatten
        assert _memory_format(q(x[0])) == "contiguous"                 # unbatched
    q = QuantConv2d.from_conv(conv, Int8WeightOnlyLinear.from_linear)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _memory_format(q(cl)) == _memory_format(conv(cl)) == "channels_last"
    assert torch.equal(q(cl), q(x))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    net[1] = type("ViewFlatten", (nn.Module,), {"forward": lambda self, t: t.view(t.shape[0], -1)})()
    pyfast.quantize(net, "int8")
    assert net(x).shape == (2, 2)


def test_conv_subclass_overriding_conv_forward_is_left_with_the_reason():
    class WSConv2d(nn.Conv2d):          # weight standardization: changes the weight it uses
        def _conv_forward(self, x, w, b):
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    model = nn.Sequential(WSConv2d(3, 4, 3))
    with pytest.warns(UserWarning, match=r"0: WSConv2d overrides nn.Conv2d._conv_forward"):
        pyfast.quantize(model, "int8-weight")
    assert type(model[0]) is WSConv2d
    with pytest.raises(ValueError, match="overrides nn.Conv2d._conv_forward"):
        QuantConv2d.from_conv(WSConv2d(3, 4, 3), Int8Linear.from_linear)


def test_int2_conv_skip_names_the_conv_k():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))                 # K = 27
    with pytest.warns(UserWarning, match=r"0: in_channels\*kh\*kw = 27 must be a multiple of 4"):
        pyfast.quantize(model, "int2")
    assert "in_features" not in model.pyfast_skipped["0"]


def test_other_conv_kinds_are_left_with_the_reason():
    """Conv1d, Conv3d and ConvTranspose2d were left without a note or a warning."""
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Conv3d(2, 2, 3), nn.ConvTranspose2d(4, 4, 3),
                          nn.Flatten(), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0: Conv1d: pyfast compresses nn.Conv2d only \(im2col\); "
                                         r"1: Conv3d: .*; 2: ConvTranspose2d: pyfast compresses"):
        pyfast.quantize(model, "int8")
    assert set(model.pyfast_skipped) == {"0", "1", "2"} and isinstance(model[4], Int8Linear)
    assert type(model[0]) is nn.Conv1d and type(model[2]) is nn.ConvTranspose2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyfast.quantize(nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(2, 2)), "int8", conv=False)
    # the filter warning counts only the nn.Linear / nn.Conv2d layers it names
    with pytest.warns(UserWarning, match="pyfast found no nn.Linear / nn.Conv2d layers in the model"):
        pyfast.quantize(nn.Sequential(nn.Conv1d(4, 4, 3)), "int8", include="nothing")


@pytest.mark.parametrize("prepare", ["static", "qat"])
def test_prepare_static_and_qat_leave_other_conv_kinds_with_the_reason(prepare):
    """prepare_static and prepare_qat passed over them without a note."""
    from pyfast.quant import prepare_qat, prepare_static
    run = prepare_static if prepare == "static" else (lambda m, **kw: prepare_qat(m, "int8", **kw))
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(),
                          nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0: Conv1d: pyfast compresses nn.Conv2d only \(im2col\); "
                                         r"1: ConvTranspose2d: pyfast compresses"):
        run(model)
    assert set(model.pyfast_skipped) == {"0", "1"}
    assert type(model[0]) is nn.Conv1d and type(model[1]) is nn.ConvTranspose2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(2, 2)), conv=False)


@pytest.mark.parametrize("make", [Int8Linear.from_linear, Int8WeightOnlyLinear.from_linear,
                                  lambda lin: Int4Linear.from_linear(lin, 32, symmetric=False),
                                  lambda lin: StaticInt8Linear.from_linear(lin, torch.tensor([0.03]))],
                         ids=["int8", "int8-weight", "int4", "static"])
def test_from_config_rebuilds_and_loads(make):
    conv = nn.Conv2d(8, 5, (2, 2), stride=2, padding="valid")
    q = QuantConv2d.from_conv(conv, make)
    rebuilt = QuantConv2d.from_config(q.pyfast_config())
    rebuilt.load_state_dict(q.state_dict())
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(rebuilt(x), q(x))
    with torch.device("meta"):
        meta = QuantConv2d.from_config(q.pyfast_config(), device="meta")
    assert {k: (v.dtype, v.shape) for k, v in meta.state_dict().items()} == \
        {k: (v.dtype, v.shape) for k, v in q.state_dict().items()}


def test_errors():
    conv = nn.Conv2d(3, 4, 3)
    q = QuantConv2d.from_conv(conv, Int8Linear.from_linear)
    with pytest.raises(ValueError, match=r"expects input \[B, 3, H, W\] or \[3, H, W\], got shape \(2, 4, 5, 5\)"):
        q(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="spatial size 2x5 is smaller than the"):
        q(torch.randn(1, 3, 2, 5))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        q([1.0])
    with pytest.raises(ValueError, match="cannot quantize this Conv2d: groups=3"):
        QuantConv2d.from_conv(nn.Conv2d(3, 3, 3, groups=3), Int8Linear.from_linear)
    with pytest.raises(TypeError, match="inner must be a pyfast layer"):
        QuantConv2d(3, 4, 3, inner=nn.Linear(27, 4))
    with pytest.raises(ValueError, match="expected in_channels\\*kh\\*kw = 27 and out_channels = 4"):
        QuantConv2d(3, 4, 3, inner=Int8Linear(26, 4))
    with pytest.raises(ValueError, match="stride must be an int >= 1 or a pair of them, got 0"):
        QuantConv2d(3, 4, 3, stride=0, inner=Int8Linear(27, 4))
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        QuantConv2d(3, 4, 3, padding=(1, 2, 3), inner=Int8Linear(27, 4))
    with pytest.raises(TypeError, match=r"input has dtype torch.int64; accepted: float32, "
                                        r"float16, bfloat16"):
        q(torch.randint(0, 5, (2, 3, 5, 5)))
    padded = QuantConv2d.from_conv(nn.Conv2d(3, 4, 1, padding=1), Int8Linear.from_linear)
    with pytest.raises(ValueError, match=r"input has spatial size 0x5 \(shape \(2, 3, 0, 5\)\); "
                                         "H and W must be > 0"):
        padded(torch.randn(2, 3, 0, 5))      # padding would make the output 3x7
    cfg = q.pyfast_config()
    cfg["inner"]["class"] = "os.system"
    with pytest.raises(ValueError, match="inner layer class 'os.system' is not a pyfast layer"):
        QuantConv2d.from_config(cfg)


# --- the digits CNN: accuracy, and pyfast.save / pyfast.load --------------------------

@pytest.fixture(scope="module")
def digits_teacher():
    data = load_digits()
    torch.manual_seed(0)
    return data, train(DigitsCNN(width=8), data, epochs=6, progress=False)


# Measured (width 8, 6 epochs, seed 0): fp32 97.8%; int8 W8A8 98.0%, int8-weight 97.8%,
# int4 per-channel (conv1 stays float: K = 9 is odd) 97.8%. Thresholds: 1 point for
# int8, 2 points for int4 (4 bits per weight cost more, and 450 test images make one
# image 0.22 points).
@pytest.mark.parametrize("method,kwargs,drop", [("int8", {}, 0.01), ("int8-weight", {}, 0.01),
                                                ("int4", {"group_size": -1}, 0.02)])
def test_quantized_digits_cnn_keeps_accuracy(digits_teacher, method, kwargs, drop):
    data, teacher = digits_teacher
    fp32 = accuracy(teacher, data.x_test, data.y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pyfast.quantize(copy.deepcopy(teacher), method, **kwargs)
    assert sum(isinstance(m, QuantConv2d) for m in model.modules()) == (2 if method != "int4" else 1)
    assert accuracy(model, data.x_test, data.y_test) >= fp32 - drop


def test_quantized_digits_cnn_saves_and_loads_bit_exactly(digits_teacher, tmp_path):
    data, teacher = digits_teacher
    model = pyfast.quantize(copy.deepcopy(teacher), "int8")
    pyfast.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = DigitsCNN(width=8)
    loaded = pyfast.load(skeleton, tmp_path / "m.safetensors")
    assert isinstance(loaded[0], QuantConv2d) and isinstance(loaded[0].inner, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(data.x_test[:64]), model(data.x_test[:64]))


def test_backends_report_explains_conv_and_static():
    text = str(pyfast.backends())
    assert "Conv2d layers (QuantConv2d) run as im2col (F.unfold)" in text
    assert "no direct conv kernel" in text
    assert "quantize_static" not in pyfast.backends().reference_only()   # csrc/cpu/quantize.cpp
    assert ("static int8 (StaticInt8Linear) = quantize_static (its kernels above) + int8_mm "
            "(int8_mm_vnni on a VNNI-layout weight)") in text
