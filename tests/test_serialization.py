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


def _conv_bn(channels):
    return nn.Sequential(nn.Conv2d(3, channels, (3, 1), stride=2, padding=(1, 0), bias=False),
                         nn.BatchNorm2d(channels), nn.Flatten(), nn.Linear(channels * 16, 2))


def test_conv_and_batchnorm_are_rebuilt(tmp_path):
    """Fewer channels than the skeleton (as pyfast.prune.structured leaves them): the
    Conv2d, BatchNorm2d and Linear are rebuilt with the file's sizes."""
    torch.manual_seed(0)
    model = _conv_bn(5)
    model(torch.randn(4, 3, 8, 8))            # running stats move away from their defaults
    model.eval()
    pyfast.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = _conv_bn(9)
    loaded = pyfast.load(skeleton, tmp_path / "m.safetensors").eval()
    assert loaded[0].out_channels == 5 and loaded[1].num_features == 5
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


# --- load checks that each module of the file fits the skeleton's --------------------------------

def _two_linears():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


class _ConvAndEmbedding(nn.Module):
    """Another architecture with modules named "0" and "2" (as _two_linears's)."""

    def __init__(self, first: nn.Module):
        super().__init__()
        self.add_module("0", first)
        self.add_module("2", nn.Embedding(50, 10))


def _file_of(tmp_path, model):
    path = tmp_path / "file.safetensors"
    pyfast.save(model, path)
    return path


@pytest.mark.parametrize("file_model,skeleton,msg", [
    (lambda: pyfast.quantize(_two_linears(), "int8"),
     lambda: _ConvAndEmbedding(nn.Conv2d(3, 8, 3)),
     r"module '0': the model has Conv2d\(3, 8, kernel_size=\(3, 3\).*the file "
     r"pyfast.nn.linear.Int8Linear \(in_features=32.*the model's layer is conv, the "
     r"file's linear"),
    (lambda: pyfast.quantize(_two_linears(), "int8"),
     lambda: _ConvAndEmbedding(nn.Linear(32, 64)),
     r"module '2': the model has Embedding\(50, 10\).*Embedding is not a layer that a "
     r"compression replaces"),
    (lambda: _mlp(32, 64, 10), lambda: _mlp(8, 16, 3),
     r"module '0': the model has Linear\(in_features=8, out_features=16.*the file "
     r"torch.nn.Linear.*larger: in_features 32 > 8, out_features 64 > 16"),
    (lambda: pyfast.quantize(_mlp(32, 64, 10), "int4", group_size=32), lambda: _mlp(32, 48, 10),
     r"module '0'.*Int4Linear.*larger: out_features 64 > 48"),
    (lambda: _conv_bn(5), lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)),
     r"module '0'.*settings differ \(model, file\): bias True vs False, kernel_size \[3, 3\] "
     r"vs \[3, 1\], padding \[0, 0\] vs \[1, 0\], stride \[1, 1\] vs \[2, 2\]"),
    (lambda: pyfast.quantize(_conv_net(), "int8"),
     lambda: nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10)),
     r"module '0'.*QuantConv2d.*kernel_size \[5, 5\] vs \[3, 3\]"),
    (lambda: _conv_bn(5), lambda: nn.Sequential(_conv_bn(5)[0], nn.BatchNorm1d(5)),
     r"module '1'.*the model's layer is BatchNorm1d, the file's BatchNorm2d"),
    # a QuantConv2d keeps its padding as (top, bottom, left, right): it loaded into a
    # skeleton Conv2d of other padding (another output size) without a word
    (lambda: pyfast.quantize(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), "int8"),
     lambda: nn.Sequential(nn.Conv2d(16, 32, 3)),
     r"module '0'.*QuantConv2d.*settings differ \(model, file\): pads \[0, 0, 0, 0\] vs "
     r"\[1, 1, 1, 1\]"),
    (lambda: pyfast.quantize(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), "int8"),
     lambda: nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect")),
     r"module '0'.*QuantConv2d.*settings differ \(model, file\): padding_mode reflect vs zeros"),
], ids=["conv-for-linear", "embedding", "larger-linear", "larger-int4", "conv-geometry",
        "quantconv-geometry", "batchnorm-kind", "quantconv-padding", "quantconv-padding-mode"])
def test_refuses_a_module_the_file_cannot_replace(tmp_path, file_model, skeleton, msg):
    """load rebuilt any module of the file over whatever the skeleton had at that name
    (a Conv2d and an Embedding became Int8Linear; an 8->16->3 MLP became 32->64->10)."""
    torch.manual_seed(0)
    path = _file_of(tmp_path, file_model())
    with torch.device("meta"):
        model = skeleton()
    with pytest.raises(ValueError, match=r"file.safetensors' does not fit this model at " + msg):
        pyfast.load(model, path)


@pytest.mark.parametrize("skeleton", [lambda: _mlp(32, 64, 10),
                                      lambda: pyfast.quantize(_mlp(32, 64, 10), "int8")])
def test_a_compressed_layer_replaces_a_layer_of_its_sizes(tmp_path, skeleton):
    torch.manual_seed(0)
    model = pyfast.quantize(_mlp(32, 64, 10), "int4", group_size=32)
    loaded = pyfast.load(skeleton(), _file_of(tmp_path, model))
    assert isinstance(loaded[0], pyfast.nn.Int4Linear)
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), model(x))


def _live_int8_file(tmp_path):
    torch.manual_seed(0)
    return _file_of(tmp_path, pyfast.quantize(_mlp(32, 16, 4), "int8"))


def _with_extra_layer(tmp_path, live):
    live.add_module("5", nn.Linear(4, 4))      # refused once the layers are rebuilt
    return _live_int8_file(tmp_path)


def _with_unknown_second_class(tmp_path, live):
    bad = tmp_path / "bad.safetensors"        # refused while building layer "2"
    _rewrite(_live_int8_file(tmp_path), bad, edit_manifest=lambda m: m["modules"]["2"].update(
        {"class": "pyfast.nn.linear.FutureLinear"}))
    return bad


def _with_bad_value(tmp_path, live):
    torch.manual_seed(0)                      # refused by load_state_dict (a 2:4 meta byte)
    path, bad = _file_of(tmp_path, pyfast.sparsify(_mlp(32, 16, 4), "2:4")), tmp_path / "bad.st"
    _rewrite(path, bad, edit_tensors=lambda t: t["2.meta"].__setitem__((3, 1), 0x05))
    return bad


@pytest.mark.parametrize("refused_file", [_with_extra_layer, _with_unknown_second_class,
                                          _with_bad_value])
def test_a_refused_load_leaves_the_model_as_it_was(tmp_path, refused_file):
    """Modules were swapped in one at a time: a file refused later left the live model
    with meta-device layers that fail on every call."""
    torch.manual_seed(2)
    live = _mlp(32, 16, 4)
    path = refused_file(tmp_path, live)
    modules = dict(live.named_modules())
    state = live.state_dict(keep_vars=True)
    x = torch.randn(2, 32)
    want = live(x)
    with pytest.raises(ValueError):
        pyfast.load(live, path)
    assert dict(live.named_modules()).items() == modules.items()
    after = live.state_dict(keep_vars=True)
    assert after.keys() == state.keys() and all(after[k] is state[k] for k in state)
    assert torch.equal(live(x), want)


def test_a_file_of_another_dtype_keeps_the_skeletons_modules(tmp_path):
    """A float16 file replaced the float32 skeleton's nn.Linear objects (their config names
    the dtype), losing hooks, frozen flags and outside references to them."""
    torch.manual_seed(0)
    model = _mlp(16, 16, 4).half()
    path = _file_of(tmp_path, model)
    skeleton = _mlp(16, 16, 4)
    first, calls = skeleton[0], []
    first.register_forward_hook(lambda *args: calls.append(1))
    first.requires_grad_(False)
    loaded = pyfast.load(skeleton, path)
    assert loaded[0] is first
    assert first.weight.dtype == torch.float16 and torch.equal(first.weight, model[0].weight)
    assert not first.weight.requires_grad and not first.bias.requires_grad
    x = torch.randn(2, 16, dtype=torch.float16)
    assert torch.equal(loaded(x), model(x)) and calls == [1]


# --- malformed manifests -----------------------------------------------------------------------

def _write_manifest(src, out, text):
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={"pyfast_manifest": text})


def _edited(edit):
    def text(man):
        edit(man)
        return json.dumps(man)
    return text


@pytest.mark.parametrize("make_text,msg", [
    (lambda man: "{not json", "its pyfast manifest is not valid JSON"),
    (lambda man: "[]", "its pyfast manifest is a JSON list; pyfast.save writes an object"),
    (_edited(lambda m: m.pop("modules")), "manifest 'modules' is None; accepted: an object"),
    (_edited(lambda m: m.update(modules=[1])), r"manifest 'modules' is \[1\]; accepted"),
    (_edited(lambda m: m["modules"].update({"0": "x"})),
     r"entry for module '0': it is 'x'; accepted: \{'class': str"),
    (_edited(lambda m: m["modules"]["0"].pop("config")), r"module '0': 'config' is None"),
    (_edited(lambda m: m["modules"]["0"]["tensors"].update(packed="x")),
     r"module '0': tensor 'packed' is 'x', not \[dtype, \[sizes\]\]"),
    (_edited(lambda m: m["modules"]["0"]["tensors"].update(packed=["uint8", [-1]])),
     r"module '0': tensor 'packed' is \['uint8', \[-1\]\]"),
    (_edited(lambda m: m.update(skipped=[1, 2])), r"manifest 'skipped' is \[1, 2\]; accepted"),
    (_edited(lambda m: m["modules"]["0"]["config"].update(bogus=1)),
     r"module '0' \(pyfast.nn.linear.Int4Linear\) cannot be built from its config .*'bogus': "
     r"1\}: .*unexpected keyword argument 'bogus'"),
    (_edited(lambda m: m["modules"]["2"].update({"class": "pyfast.nn.linear.Int8Linear"})),
     r"module '2' \(pyfast.nn.linear.Int8Linear\) cannot be built from its config"),
    (_edited(lambda m: m["modules"]["0"]["config"].update(orig_dtype="Tensor")),
     r"module '0' .* cannot be built from its config .*unknown dtype name 'Tensor'"),
], ids=["not-json", "list", "no-modules", "modules-list", "entry-str", "no-config",
        "tensor-spec-str", "negative-size", "skipped-list", "unknown-config-key", "wrong-class",
        "bad-dtype-name"])
def test_refuses_a_malformed_manifest(int4_file, tmp_path, make_text, msg):
    """A hand-edited or corrupt manifest gave raw AttributeError / KeyError / TypeError."""
    with safe_open(str(int4_file), framework="pt") as f:
        man = json.loads(f.metadata()["pyfast_manifest"])
    bad = tmp_path / "bad.safetensors"
    _write_manifest(int4_file, bad, make_text(man))
    with pytest.raises(ValueError, match=r"bad.safetensors'?:? .*" + msg):
        pyfast.load(_skeleton(), bad)


def test_refuses_torch_prune_masks(tmp_path):
    """A torch.nn.utils.prune mask was saved as weight_orig / weight_mask, and the file
    then fitted no model ("missing from the file: ['0.weight']")."""
    torch.manual_seed(0)
    model = _mlp(16, 8, 4)
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", 0.5)
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) still has a "
                       r"torch.nn.utils.prune mask on weight \(weight_orig and weight_mask\).*"
                       r"torch.nn.utils.prune.remove\(module, 'weight'\).*pyfast.swap\(model\)"):
        pyfast.save(model, tmp_path / "m.safetensors")
    torch.nn.utils.prune.remove(model[2], "weight")
    loaded = pyfast.load(_mlp(16, 8, 4), _file_of(tmp_path, model))
    assert torch.equal(loaded[2].weight, model[2].weight)
