"""pyfast.save / pyfast.load: bit-exact round trips, meta skeletons, file size, and
every refusal (no manifest, manifest and tensors disagree, unknown class, masks,
tied weights, a model the file does not fit)."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import pyfast
from pyfast import serialization


def _mlp(k=256, hidden=256, n=10):
    return nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n))


COMPRESS = {
    "int8": lambda m: pyfast.quantize(m, "int8"),
    "int8-weight": lambda m: pyfast.quantize(m, "int8-weight"),
    "int4-g32-asym": lambda m: pyfast.quantize(m, "int4", group_size=32, symmetric=False),
    "int4-channel": lambda m: pyfast.quantize(m, "int4", group_size=-1),
    "2:4": lambda m: pyfast.sparsify(m, "2:4"),
    "2:4-bf16": lambda m: pyfast.sparsify(m.to(torch.bfloat16), "2:4"),
    "int4-bf16": lambda m: pyfast.quantize(m.to(torch.bfloat16), "int4", group_size=32),
    "int8-fp16": lambda m: pyfast.quantize(m.half(), "int8"),
    # cast after compression: the bias becomes bfloat16 (the scales stay float32) while
    # each layer's config still names the float32 it was built from (the file's dtypes are
    # the ones to load)
    "int8-then-bf16": lambda m: pyfast.quantize(m, "int8").to(torch.bfloat16),
    "int4-then-bf16": lambda m: pyfast.quantize(m, "int4", group_size=32).to(torch.bfloat16),
    "2:4int4-then-bf16": lambda m: pyfast.sparsify(m, values="int4").to(torch.bfloat16),
    "int2-then-fp16": lambda m: pyfast.quantize(m, "int2", group_size=64).half(),
    "mixed": lambda m: pyfast.quantize(pyfast.sparsify(m, include="2"), "int4", include="0"),
}


@pytest.mark.parametrize("how", list(COMPRESS))
@pytest.mark.parametrize("skeleton_on", ["meta", "cpu"])
def test_round_trip_is_bit_exact(tmp_path, how, skeleton_on):
    torch.manual_seed(0)
    model = COMPRESS[how](_mlp())
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    torch.manual_seed(1)                       # a skeleton with other (random) float weights
    with torch.device(skeleton_on):
        skeleton = _mlp()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(how[-4:], torch.float32)
    skeleton = skeleton.to(dtype)
    loaded = pyfast.load(skeleton, path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    x = torch.randn(5, 256).to(dtype)
    assert torch.equal(loaded(x), model(x))
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))


@pytest.mark.parametrize("how", ["int8", "static"])
def test_conv_model_cast_after_compression_round_trips(tmp_path, how):
    """QuantConv2d keeps its tensors in a child layer (`inner`): the file's dtypes reach
    it too (a bfloat16 inner.bias was refused as 'manifest and tensors disagree')."""
    torch.manual_seed(0)
    model = _conv_net()
    if how == "int8":
        pyfast.quantize(model, "int8")
    else:
        pyfast.quant.quantize_static(model, [torch.randn(4, 3, 8, 8)], progress=False)
    assert any(isinstance(m, pyfast.nn.QuantConv2d) for m in model.modules())
    model.to(torch.bfloat16)
    pyfast.save(model, tmp_path / "c.safetensors")
    with torch.device("meta"):
        skeleton = _conv_net()
    loaded = pyfast.load(skeleton, tmp_path / "c.safetensors")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    assert torch.equal(loaded(x), model(x))


def test_int4_file_is_about_a_seventh_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = _mlp(1024, 1024, 16)
    fp32 = pyfast.save(model, tmp_path / "fp32.safetensors")
    int4 = pyfast.save(pyfast.quantize(model, "int4", group_size=128), tmp_path / "int4.safetensors")
    assert fp32 / int4 > 6.5      # 4.5 bits per weight (nibble + f32 scale + u8 zero per 128)
    assert int4 == os.path.getsize(tmp_path / "int4.safetensors")


def test_reshaped_torch_layers_are_rebuilt(tmp_path):
    """A model whose dense layers changed shape (structured pruning) loads into the
    skeleton of the original architecture."""
    torch.manual_seed(0)
    model = _mlp(64, 32, 10)
    model[0], model[2] = nn.Linear(64, 12), nn.Linear(12, 32)
    model.pyfast_skipped = {"4": "kept for accuracy"}
    pyfast.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = _mlp(64, 32, 10)
    loaded = pyfast.load(skeleton, tmp_path / "m.safetensors")
    assert loaded[0].weight.shape == (12, 64) and loaded[2].weight.shape == (32, 12)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))
    assert loaded.pyfast_skipped == {"4": "kept for accuracy"}


def test_conv_and_batchnorm_are_rebuilt(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, (3, 1), stride=2, padding=(1, 0), bias=False),
                          nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    model(torch.randn(4, 3, 8, 8))            # running stats move away from their defaults
    model.eval()
    pyfast.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Conv2d(3, 9, 3), nn.BatchNorm2d(9), nn.Flatten(),
                                 nn.Linear(7, 2))
    loaded = pyfast.load(skeleton, tmp_path / "m.safetensors").eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_load_never_unpickles(tmp_path, monkeypatch):
    model = pyfast.quantize(_mlp(), "int4")
    pyfast.save(model, tmp_path / "m.safetensors")

    def refuse(*a, **k):
        raise AssertionError("pyfast.load must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with torch.device("meta"):
        skeleton = _mlp()
    pyfast.load(skeleton, tmp_path / "m.safetensors")


# --- refusals --------------------------------------------------------------------------------

def _rewrite(path, out, edit_manifest=None, edit_tensors=None):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    man = json.loads(meta["pyfast_manifest"])
    if edit_manifest:
        edit_manifest(man)
    if edit_tensors:
        edit_tensors(tensors)
    meta["pyfast_manifest"] = json.dumps(man)
    save_file(tensors, str(out), metadata=meta)


@pytest.fixture
def int4_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    pyfast.save(pyfast.quantize(_mlp(), "int4", group_size=64), path)
    return path


def _skeleton():
    with torch.device("meta"):
        return _mlp()


def test_refuses_tensor_shape_that_disagrees_with_manifest(int4_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite(int4_file, bad, edit_tensors=lambda t: t.update({"0.packed": t["0.packed"][:, :64].contiguous()}))
    with pytest.raises(ValueError, match=r"manifest and tensors disagree: module '0' "
                       r"\(pyfast.nn.linear.Int4Linear\) declares packed uint8 \[256, 128\] "
                       r"but the file holds uint8 \[256, 64\]"):
        pyfast.load(_skeleton(), bad)


def test_refuses_missing_tensor(int4_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite(int4_file, bad, edit_tensors=lambda t: t.pop("2.scales"))
    with pytest.raises(ValueError, match="declares scales float32 \\[256, 4\\] but the file has "
                                         "no tensor '2.scales'"):
        pyfast.load(_skeleton(), bad)


def test_refuses_config_that_disagrees_with_tensors(int4_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite(int4_file, bad,
             edit_manifest=lambda m: m["modules"]["0"]["config"].update(group_size=32))
    with pytest.raises(ValueError, match=r"module '0' \(pyfast.nn.linear.Int4Linear\): its config "
                                         r".*group_size': 32.* manifest and tensors disagree"):
        pyfast.load(_skeleton(), bad)


def test_refuses_unknown_class(int4_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _rewrite(int4_file, bad,
             edit_manifest=lambda m: m["modules"]["0"].update({"class": "os.system"}))
    with pytest.raises(ValueError, match="class 'os.system' is not a pyfast layer.*accepted: "
                                         ".*pyfast.nn.linear.Int4Linear"):
        pyfast.load(_skeleton(), bad)


def test_refuses_a_file_without_manifest(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="has no pyfast manifest: it was not written by pyfast.save"):
        pyfast.load(_skeleton(), tmp_path / "plain.safetensors")


def test_refuses_a_model_the_file_does_not_fit(int4_file):
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    with pytest.raises(ValueError, match="the file has module '4' but the model has no such"):
        pyfast.load(other, int4_file)
    with torch.device("meta"):
        extra = nn.Sequential(*_mlp(), nn.Linear(10, 3))
    with pytest.raises(ValueError, match=r"does not fit this model: missing from the file: "
                                         r"\['5.weight', '5.bias'\]"):
        pyfast.load(extra, int4_file)


def test_refuses_unfinished_masks(tmp_path):
    model = _mlp()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match="module '0' still has parametrizations \\(weight\\).*"
                                         "pyfast.prune.finish"):
        pyfast.save(model, tmp_path / "m.safetensors")


def test_refuses_tied_weights(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="tensors '0.weight' and '1.weight' share memory"):
        pyfast.save(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("args,exc,msg", [
    (("not a model", "x"), TypeError, "model must be an nn.Module, got str"),
])
def test_argument_errors(tmp_path, args, exc, msg):
    with pytest.raises(exc, match=msg):
        pyfast.save(*args)
    with pytest.raises(exc, match=msg):
        pyfast.load(*args)
    with pytest.raises(TypeError, match="metadata must map str to str"):
        pyfast.save(_mlp(), tmp_path / "m.safetensors", metadata={"a": 1})


def test_manifest_lists_formats():
    model = pyfast.quantize(_mlp(), "int4", include="0")
    man = serialization.manifest(model)
    assert man["modules"]["0"]["class"] == "pyfast.nn.linear.Int4Linear"
    assert man["modules"]["0"]["config"]["group_size"] == 128
    assert man["modules"]["2"]["class"] == "torch.nn.Linear"


@pytest.mark.parametrize("how", ["2:4", "2:4+int4"])
def test_refuses_a_2_4_meta_byte_outside_the_format(tmp_path, how):
    """idx0 >= idx1 made each backend sum something different (the kernels rely on
    the format); the file's meta is checked once, at load."""
    torch.manual_seed(0)
    model = _mlp()
    pyfast.sparsify(model, "2:4", **({"values": "int4", "group_size": 64} if "int4" in how else {}))
    path, bad = tmp_path / "m.safetensors", tmp_path / "bad.safetensors"
    pyfast.save(model, path)
    pyfast.load(_mlp(), path)                                   # the valid file loads

    def corrupt(t):
        t["2.meta"][3, 5] = 0x05 if how == "2:4" else 0x55     # idx0 = idx1 = 1
    _rewrite(path, bad, edit_tensors=corrupt)
    where = r"meta\[3, 5\] = 5" if how == "2:4" else r"unpack_nibbles\(meta\)\[3, 1[01]\] = 5"
    with pytest.raises(ValueError, match=r"(?s)bad.safetensors.*at '2.': " + where
                       + r" is not a 2:4 index pair"):
        pyfast.load(_mlp(), bad)
