"""Compressing a model while a pyfast.distill.FeatureDistiller is open on it: the layers
carrying its capture hooks are left as they are, with a reason that names the
FeatureDistiller and the order that works (it used to be a generic "foreign hook"
message naming Capture._hook.<locals>.hook). Closed, the same layers convert."""
import warnings

import torch
from torch import nn

import pyfast
from pyfast.distill import FeatureDistiller, distill
from pyfast.quant import QATLinear, convert_qat, prepare_qat


def _nets():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    t = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    return s, t


def _quantize(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfast.quantize(model, "int8")
    return [str(w.message) for w in caught]


def test_quantize_names_an_open_feature_distiller():
    s, t = _nets()
    fd = FeatureDistiller(s, t, {"0": "0"}, example_input=torch.randn(4, 8))
    messages = _quantize(s)
    reason = s.pyfast_skipped["0"]
    assert reason.startswith("carries the capture hook of an open "
                             "pyfast.distill.FeatureDistiller")
    assert "fd.close()" in reason and "prepare_qat" in reason and "Capture" not in reason
    assert any("0: carries the capture hook" in m for m in messages)
    assert isinstance(s[0], nn.Linear) and len(s[0]._forward_hooks) == 1   # hook kept
    assert type(s[2]).__name__ == "Int8Linear"                            # no hook: converts
    fd.close()
    _quantize(s)
    assert type(s[0]).__name__ == "Int8Linear"


def test_quantization_aware_distillation_in_the_order_the_reason_gives():
    """prepare_qat, then the FeatureDistiller on the QAT layers, distill, convert_qat."""
    s, t = _nets()
    prepare_qat(s, "int8")
    assert isinstance(s[0], QATLinear)
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    with FeatureDistiller(s, t, {"0": "0"}, example_input=data[0][0]) as fd:
        distill(s, t, data, epochs=1, lr=1e-3, features=fd, progress=False)
    convert_qat(s)
    assert type(s[0]).__name__ == "Int8Linear" and not s[0]._forward_hooks
