"""The int4 K-split layout (pyfast/layouts/int4_ksplit.py) and its public API: the layout
functions, Int4Linear in it, layout "auto", pyfast.repack, quantize, state_dict loads
across layouts, save/load, autograd, the reference fallback.

The C++ kernel that reads the layout is tested in tests/test_cpu_int4_ksplit.py; here the
point is that a layer gives the same answer in any layout and that the layout is chosen,
kept and refused as documented.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfast
from pyfast import ops, reference
from pyfast.layouts import int4_ksplit
from pyfast.nn import Int4Linear
from pyfast.nn import layout as L
from _helpers import assert_within, dequant_int4, linear_tolerance

AVX512 = L.why_not_ksplit("cpu", torch.float32, 12288, 128) is None


def _linear(k=768, n=20, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(dtype)


# --- the layout ----------------------------------------------------------------------------

@pytest.mark.parametrize("k,chunks", [(11008, 2), (14336, 4), (13824, 3), (8192, 2),
                                      (6144, None), (4096, None), (6272, 7), (128 * 97, None)])
def test_chunks_for(k, chunks):
    """The fewest chunks of whole 128-column blocks of at most 6144 columns, for K > 6144."""
    assert int4_ksplit.chunks_for(k, 128) == chunks


def test_repack_round_trip_is_exact():
    packed = torch.randint(0, 256, (7, 384), dtype=torch.uint8)
    for c in (1, 2, 3, 4, 6, 12):
        w_ks = int4_ksplit.repack(packed, c)
        assert w_ks.shape == (c, 7, 384 // c) and w_ks.is_contiguous()
        assert torch.equal(w_ks[1 % c], packed[:, (1 % c) * 384 // c:(1 % c + 1) * 384 // c])
        assert torch.equal(int4_ksplit.unrepack(w_ks), packed)
        if (768 // c) % 32 == 0:                      # the op takes chunks of 32 columns up
            assert torch.equal(ops.repack_int4_ksplit(packed, c, 32), w_ks)


@pytest.mark.parametrize("chunks,group_size,exc,message", [
    (2.0, 128, TypeError, "chunks must be an int, got float 2.0"),
    (True, 128, TypeError, "chunks must be an int, got bool True"),
    (0, 128, ValueError, "chunks must be >= 1, got 0"),
    (5, 128, ValueError, "chunks = 5 does not cut K = 768 into equal chunks of whole groups"),
    (4, 128, ValueError, "K / C a multiple of 128"),              # 192 columns: 1.5 groups
    (8, -1, ValueError, "into equal chunks of a multiple of 32 columns"),   # 96: fine
])
def test_check_chunks(chunks, group_size, exc, message):
    if chunks == 8:
        int4_ksplit.check_chunks(768, chunks, group_size)          # 96 columns per chunk
        chunks = 16                                                 # 48: not a multiple of 32
    with pytest.raises(exc, match=message):
        int4_ksplit.check_chunks(768, chunks, group_size)


# --- the layer -----------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", (32, 128, -1))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_same_output_in_every_layout(group_size, dtype):
    lin = _linear()
    canon = Int4Linear.from_linear(lin, group_size=group_size, layout="canonical")
    ks = Int4Linear.from_linear(lin, group_size=group_size, layout="ksplit")
    # K = 768 has no "auto" chunking (K <= 6144): a forced "ksplit" keeps one chunk
    assert ks.layout == "ksplit" and ks.packed.shape == (1, 20, 384)
    ks.repack("canonical")
    assert torch.equal(ks.packed, canon.packed)
    ks._set_layout("canonical")
    w_ks = ops.repack_int4_ksplit(canon.packed, 3, group_size)
    ks = Int4Linear(768, 20, group_size=group_size, layout="ksplit")
    ks.load_state_dict({**canon.state_dict(), "packed": w_ks})   # 3 chunks in, re-split
    assert torch.equal(ks.canonical_packed(), canon.packed)
    assert "K-split layout" in ks.format and "K-split layout" in repr(ks)
    w64 = dequant_int4(canon.packed, canon.scales, canon.zeros, group_size)
    for m in (1, 5, 40):
        x = torch.randn(m, 768).to(dtype)
        tol = linear_tolerance(torch.cat([x, torch.randn(16, 768).to(dtype)]), w64,
                               canon.bias.to(dtype), dtype)
        assert_within(ks(x), canon(x), 2 * tol, f"M={m}")
        with pyfast.use_backend("reference"):             # the reference un-repacks
            assert torch.equal(ks(x), canon(x))


def test_load_state_dict_across_layouts():
    """A state_dict in any layout (any chunk count for "ksplit") loads into a layer in any
    layout; a packed tensor of no layout is refused with torch's size mismatch."""
    lin = _linear(k=12288, n=6)
    canon = Int4Linear.from_linear(lin, layout="canonical")
    sd = {"canonical": canon.state_dict()}
    for c in (2, 4):
        sd[f"ksplit{c}"] = {**sd["canonical"],
                            "packed": ops.repack_int4_ksplit(canon.packed, c, 128)}
    for layout in ("canonical", "ksplit"):
        for name, state in sd.items():
            layer = Int4Linear(12288, 6, layout=layout)
            layer.load_state_dict(state)
            assert layer.layout == layout, name
            assert torch.equal(layer.canonical_packed(), canon.packed), (layout, name)
            if layout == "ksplit":
                assert layer.packed.shape == (2, 6, 3072)         # its own chunking
    bad = {**sd["canonical"], "packed": torch.zeros(3, 6, 100, dtype=torch.uint8)}
    with pytest.raises(RuntimeError, match="size mismatch for packed"):
        Int4Linear(12288, 6, layout="ksplit").load_state_dict(bad)


@pytest.mark.skipif(not AVX512, reason="the K-split layout is 'auto' only with the AVX-512 C++ "
                                       "kernels (pyfast.nn.layout.why_not_ksplit)")
def test_auto_is_ksplit_exactly_where_it_is_faster():
    assert Int4Linear.from_linear(_linear(k=12288, n=4)).layout == "ksplit"
    assert Int4Linear.from_linear(_linear(k=12288, n=4)).packed.shape == (2, 4, 3072)
    assert Int4Linear.from_linear(_linear(k=4096, n=4)).layout == "canonical"
    bf16 = Int4Linear.from_linear(_linear(k=12288, n=4, dtype=torch.bfloat16))
    assert bf16.layout == "canonical"
    assert "bfloat16" in L.why_not_ksplit("cpu", torch.bfloat16, 12288, 128)
    assert "fit in L1" in L.why_not_ksplit("cpu", torch.float32, 4096, 128)
    assert "no chunk count" in L.why_not_ksplit("cpu", torch.float32, 128 * 97, 128)
    assert "meta" in L.why_not_ksplit("meta", torch.float32, 12288, 128)
    previous = torch.ops.pyfast_C.set_cpu_isa("avx2")
    try:
        assert "avx2" in L.why_not_ksplit("cpu", torch.float32, 12288, 128)
        assert Int4Linear.from_linear(_linear(k=12288, n=4)).layout == "canonical"
    finally:
        torch.ops.pyfast_C.set_cpu_isa(previous)
    # a bfloat16 layer cast to float32 takes the layout at its next repack("auto")
    bf16.float()
    assert bf16.repack().layout == "ksplit"


def test_model_api_layout_and_repack(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 6400), nn.ReLU(), nn.Linear(6400, 8))
    pyfast.quantize(model, "int4", layout="ksplit")
    assert [model[i].layout for i in (0, 2)] == ["ksplit", "ksplit"]
    assert model[0].packed.shape == (1, 6400, 64)                  # K = 128: one chunk
    assert model[2].packed.shape == (2, 8, 1600)                   # chunks_for(6400) = 2
    x = torch.randn(3, 128)
    y = model(x)
    pyfast.repack(model, "vnni")                                   # not an int4 layout
    assert [model[i].layout for i in (0, 2)] == ["ksplit", "ksplit"]
    pyfast.repack(model, "canonical")
    assert [model[i].layout for i in (0, 2)] == ["canonical", "canonical"]
    with pyfast.use_backend("reference"):
        y_ref = model(x)
    assert_within(y, y_ref, 1e-3 * y_ref.abs().max().item())
    pyfast.repack(model, "ksplit")
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    loaded = pyfast.load(nn.Sequential(nn.Linear(128, 6400), nn.ReLU(), nn.Linear(6400, 8)),
                         path)
    assert [loaded[i].layout for i in (0, 2)] == ["ksplit", "ksplit"]
    assert torch.equal(loaded(x), model(x))
    rows = {r.name: r for r in pyfast.summary(loaded)}
    assert rows["2"].params == 6400 * 8 + 8 and "K-split layout" in rows["2"].format
    assert rows["2"].bytes_after == 6400 * 8 // 2 + 50 * 8 * 5 + 8 * 4   # packed, scales+zeros, bias


def test_gradients_match_the_canonical_layer():
    lin = _linear(k=512, n=9)
    canon = Int4Linear.from_linear(lin, group_size=64, layout="canonical")
    ks = Int4Linear.from_linear(lin, group_size=64, layout="canonical")
    ks.packed = ops.repack_int4_ksplit(ks.packed, 4, 64)
    ks.layout = "ksplit"
    x1 = torch.randn(3, 512, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    canon(x1).square().sum().backward()
    ks(x2).square().sum().backward()
    assert_within(x2.grad, x1.grad, 1e-4 * x1.grad.abs().max().item())


def test_op_wrappers_and_reference():
    torch.manual_seed(0)
    w = torch.randn(9, 256)
    packed, scales, zeros = ops.pack_int4(w, 64, False)
    w_ks = ops.repack_int4_ksplit(packed, 2, 64)
    x = torch.randn(4, 256)
    b = torch.randn(9)
    assert torch.equal(reference.int4_mm_ksplit(x, w_ks, scales, zeros, 64, b),
                       reference.int4_mm(x, packed, scales, zeros, 64, b))
    tol = linear_tolerance(x, dequant_int4(packed, scales, zeros, 64), b, x.dtype)
    assert_within(ops.int4_mm_ksplit(x, w_ks, scales, zeros, 64, b),
                  reference.int4_mm(x, packed, scales, zeros, 64, b), 2 * tol)
    report = str(pyfast.backends())
    assert "int4_mm_ksplit" in report and "repack_int4_ksplit" in report
