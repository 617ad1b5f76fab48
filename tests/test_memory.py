"""pyfast/memory.py and csrc/cpu/hugepages.cpp: layer buffers on transparent huge pages.

What is checked: the copy is exact and owns a 2 MiB-aligned mapping that the kernel
marks for huge pages (its VmFlags in /proc/self/smaps say "hg"); every way a layer's
buffer is set (construction, assignment, load, .to(), _apply) places it; what must not
be placed (small, non-CPU, fake, shared, Parameter) is returned as it is; and the
reasons pyfast.backends() gives where huge pages are off.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import pyfast
from pyfast import memory

HUGE = memory.HUGE_PAGE
usable = pytest.mark.skipif(memory.status() is not None,
                            reason=f"huge pages not usable here: {memory.status()}")


def _mapping(addr: int):
    """(start, end, VmFlags) of the /proc/self/smaps mapping that holds addr."""
    text = open("/proc/self/smaps").read()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?\n(.*?)(?=^[0-9a-f]+-[0-9a-f]+ |\Z)",
                         text, re.S | re.M):
        lo, hi = int(m.group(1), 16), int(m.group(2), 16)
        if lo <= addr < hi:
            flags = re.search(r"^VmFlags:(.*)$", m.group(3), re.M).group(1).split()
            return lo, hi, flags
    raise AssertionError(f"no mapping holds {addr:#x}")


@usable
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float32, torch.bfloat16])
def test_copy_exact_aligned_marked(dtype):
    src = (torch.randn(1543, 1549) * 50).to(dtype)       # >= 2 MiB in every dtype, odd sizes
    src = src.t()                                        # not contiguous: copied contiguous
    out = memory.to_hugepages(src)
    assert out is not src and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, src)
    assert out.data_ptr() % HUGE == 0
    assert memory.on_hugepages(out) and memory.on_hugepages(out[5:]) and not memory.on_hugepages(src)
    nbytes = out.numel() * out.element_size()
    assert out.untyped_storage().nbytes() == nbytes      # saved / moved as exactly its bytes
    lo, hi, flags = _mapping(out.data_ptr())
    assert lo == out.data_ptr() and hi - lo == (nbytes + 4095) // 4096 * 4096
    assert "hg" in flags                                 # MADV_HUGEPAGE took effect
    assert memory.to_hugepages(out) is out               # placed already: as it is


@usable
def test_mapping_freed_with_tensor():
    out = memory.to_hugepages(torch.ones(HUGE // 4 + 7))
    addr = out.data_ptr()
    del out
    text = open("/proc/self/smaps").read()
    starts = {int(m.group(1), 16) for m in re.finditer(r"^([0-9a-f]+)-", text, re.M)}
    assert addr not in starts


@pytest.mark.parametrize("make", [
    lambda: torch.ones(HUGE // 4 - 1),                               # one element short
    lambda: torch.ones(HUGE // 4, device="meta"),
    lambda: torch.ones(HUGE // 4, requires_grad=True),
    lambda: nn.Parameter(torch.ones(HUGE // 4)),
    lambda: torch.ones(HUGE // 4).share_memory_(),
], ids=["small", "meta", "requires_grad", "parameter", "shared"])
def test_left_as_is(make):
    t = make()
    assert memory.to_hugepages(t) is t


def test_fake_tensor_left_as_is():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        t = torch.ones(HUGE // 4)
    assert memory.to_hugepages(t) is t


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("PYFAST_NO_HUGEPAGES", "1")
    assert memory.status() == "disabled by PYFAST_NO_HUGEPAGES=1"
    t = torch.ones(HUGE // 4)
    assert memory.to_hugepages(t) is t
    assert "PYFAST_NO_HUGEPAGES=1" in str(pyfast.backends())
    layer = pyfast.nn.Int8Linear.from_linear(nn.Linear(2048, 1024))
    assert not memory.on_hugepages(layer.weight_int8)


@pytest.mark.parametrize("content, why", [
    ("always madvise [never]\n", ": never)"),
    (None, ": unreadable)"),
])
def test_thp_off_reason(monkeypatch, tmp_path, content, why):
    path = tmp_path / "enabled"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(memory, "THP_ENABLED", str(path))
    monkeypatch.delenv("PYFAST_NO_HUGEPAGES", raising=False)
    if not memory.sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert memory.status() == f"transparent huge pages are off ({path}{why}"
    t = torch.ones(HUGE // 4)
    assert memory.to_hugepages(t) is t


@pytest.mark.parametrize("fn", [memory.to_hugepages, memory.on_hugepages])
def test_type_errors(fn):
    with pytest.raises(TypeError, match="t must be a torch.Tensor, got list"):
        fn([1, 2])


@usable
def test_cpp_errors():
    with pytest.raises(RuntimeError, match="t is empty"):
        torch.ops.pyfast_C.hugepage_copy(torch.ones(0, 3))


# --- layers ------------------------------------------------------------------------------

def _placed(layer: nn.Module):
    """{buffer name: on huge pages} for the buffers of HUGE bytes or more."""
    return {n: memory.on_hugepages(b) for n, b in layer.named_buffers()
            if b.numel() * b.element_size() >= HUGE}


LAYERS = {
    "int8": lambda lin: pyfast.nn.Int8Linear.from_linear(lin),
    "int8-weight": lambda lin: pyfast.nn.Int8WeightOnlyLinear.from_linear(lin),
    "int4": lambda lin: pyfast.nn.Int4Linear.from_linear(lin, group_size=128),
    "2:4": lambda lin: pyfast.nn.Sparse24Linear.from_linear(lin, prune=True),
}


@usable
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layers_place_large_buffers(monkeypatch, kind):
    torch.manual_seed(0)
    lin = nn.Linear(2048, 2056)             # int4 packed: 2056 * 1024 bytes > 2 MiB
    layer = LAYERS[kind](lin)
    placed = _placed(layer)
    assert placed and all(placed.values()), placed
    monkeypatch.setenv("PYFAST_NO_HUGEPAGES", "1")
    plain = LAYERS[kind](lin)
    assert not any(_placed(plain).values())
    for m in (1, 3, 17):                    # M = 1: the GEMV kernels (int4: int8 slices)
        x = torch.randn(m, 2048)
        assert torch.equal(layer(x), plain(x))  # the same kernel on the same bytes
        with pyfast.use_backend("reference"):
            want = plain(x)
        err = (layer(x) - want).abs().max() / want.abs().max()
        assert err < 1e-3, (m, float(err))  # and the reference's answer (float32 sums)


@usable
def test_layer_paths_place(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2048, 2176), nn.ReLU(), nn.Linear(2176, 64))
    x = torch.randn(2, 2048)
    pyfast.quantize(model, "int4")
    want = model(x)
    assert _placed(model) == {"0.packed": True}
    # save / load: rebuilt from the config, the state copied in
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    loaded = pyfast.load(nn.Sequential(nn.Linear(2048, 2176), nn.ReLU(), nn.Linear(2176, 64)),
                         path)
    assert _placed(loaded) == {"0.packed": True} and torch.equal(loaded(x), want)
    # deepcopy and pickle (torch.save of the module) restore the layer by __setstate__
    fresh = copy.deepcopy(loaded)
    assert _placed(fresh) == {"0.packed": True} and torch.equal(fresh(x), want)
    torch.save(loaded, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert _placed(whole) == {"0.packed": True} and torch.equal(whole(x), want)
    # load_state_dict(assign=True) replaces the buffers: placed again
    fresh[0]._buffers["packed"] = fresh[0].packed.clone()    # behind the layer's back
    assert _placed(fresh) == {"0.packed": False}
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert _placed(fresh) == {"0.packed": True} and torch.equal(fresh(x), want)
    # _apply (.to(), .cpu(), .half()): buffers set behind the layer's back are placed
    layer = model[0]
    layer._buffers["packed"] = layer.packed.clone()
    assert not memory.on_hugepages(layer.packed)
    model.cpu()
    assert memory.on_hugepages(layer.packed) and torch.equal(model(x), want)
    # share_memory_() keeps the shared memory (placing would silently unshare it)
    model.share_memory()
    assert layer.packed.is_shared() and not memory.on_hugepages(layer.packed)
    assert torch.equal(model(x), want)


def test_backends_report_line():
    line = [n for n in pyfast.backends().notes() if "pyfast/memory.py" in n]
    assert line == [memory.describe() + " (pyfast/memory.py)"]
    assert ("on transparent huge pages" in line[0]) == (memory.status() is None)
