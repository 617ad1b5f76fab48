"""Models built from nn.TransformerEncoderLayer / nn.TransformerEncoder after each workflow.

In eval mode torch's fused fast path reads linear1.weight / linear2.weight directly; a
pyfast layer there has none, so every eval forward raised AttributeError (and GPTQ,
whose calibration runs such forwards, stopped halfway). pyfast/_torch_fastpath.py turns
the fast path off where it placed a layer; the plain forward then calls the modules.
"""
import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast import lowrank, prune, quant


def encoder_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def slow_path(model, x, **kw):
    """The reference: the same model with torch's fast path off globally."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(x, **kw)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


X = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
CALIB = [torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))]

WORKFLOWS = {
    "int8": lambda m: pyfast.quantize(m, "int8"),
    "int4": lambda m: pyfast.quantize(m, "int4", group_size=32),
    "2:4": lambda m: pyfast.sparsify(m, "2:4"),
    "lowrank": lambda m: lowrank.factorize(m, rank=8),
    "static": lambda m: quant.quantize_static(m, CALIB, progress=False),
    "qat": lambda m: quant.prepare_qat(m, "int8").eval(),
    "gptq": lambda m: quant.gptq_quantize(m, CALIB, bits=4, group_size=32, progress=False),
    "prune 2:4 + finish": lambda m: prune.finish(prune.n_m(m, 2, 4), to_sparse24=True),
}


@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_eval_forward_after_each_workflow(workflow):
    model = encoder_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        WORKFLOWS[workflow](model)
    converted = [n for n, m in model.named_modules() if n.endswith(("linear1", "linear2"))
                 and type(m) is not nn.Linear]
    assert converted, "the workflow converted no feed-forward layer"
    with torch.no_grad():
        got = model(X)
        mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
        got_masked = model(X, src_key_padding_mask=mask)
        torch.testing.assert_close(got, slow_path(model, X))
        torch.testing.assert_close(got_masked, slow_path(model, X, src_key_padding_mask=mask))


def test_the_fast_path_stays_on_where_nothing_was_converted():
    model = encoder_model()
    pyfast.quantize(model, "int8", include="layers.1.*")
    layers = model.layers
    assert layers[0].activation_relu_or_gelu and not layers[1].activation_relu_or_gelu
    assert model.use_nested_tensor is False


def test_save_and_load_keep_the_fast_path_off(tmp_path):
    model = encoder_model()
    pyfast.quantize(model, "int4", group_size=32)
    pyfast.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = encoder_model()
    loaded = pyfast.load(skeleton, tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X))
