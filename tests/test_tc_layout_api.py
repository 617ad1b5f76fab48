"""The tensor-core layouts through the public API: repack ops, *_tc matmul ops,
layers that store either layout, pyfast.repack, save/load, gradients.

The CUDA kernels that read these layouts run only on a GPU (tests/test_cuda_*.py);
here every *_tc op runs its reference (un-repack, then the canonical reference), so
these tests pin down that a layer gives the same answer in either layout and that
the layout survives repack, save and load. The layouts themselves (bit by bit, and
as the kernels' lanes read them) are tested in tests/test_layout_*_tc.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyfast
from pyfast import dispatch, ops, reference
from pyfast.nn import Int4Linear, Sparse24Int4Linear, Sparse24Linear
from pyfast.nn import layout as L

from _helpers import random_24

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,gs", [(1, 64, 32), (7, 64, 64), (33, 256, 128), (5, 50, -1),
                                    (130, 384, 128)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int4_mm_tc_equals_int4_mm(m, n, k, gs, dtype):
    g = _gen(n * k + m)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    packed, scales, zeros = ops.pack_int4(w, gs, False)
    w_tc = ops.repack_int4_tc(packed)
    assert torch.equal(reference.repack_int4_tc(packed), w_tc)
    for b in (None, bias):
        got = ops.int4_mm_tc(x, w_tc, scales, zeros, gs, b)
        # the reference of int4_mm_tc is int4_mm's on the un-repacked weight: bit-equal
        with pyfast.use_backend("reference"):
            want = ops.int4_mm(x, packed, scales, zeros, gs, b)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 4), (7, 12), (33, 36), (16, 64), (130, 260)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_sparse24_mm_tc_equals_sparse24_mm(m, n, k, dtype):
    g = _gen(n * k + m)
    w = random_24(n, k, dtype, gen=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    values, meta = ops.sparse24_compress(w)
    meta_tc = ops.repack_sparse24_tc(meta)
    for b in (None, bias):
        with pyfast.use_backend("reference"):
            want = ops.sparse24_mm(x, values, meta, b)
        assert torch.equal(ops.sparse24_mm_tc(x, values, meta_tc, b), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,gs", [(1, 64, 32), (7, 64, 64), (33, 256, 128), (5, 56, -1),
                                    (17, 200, -1), (130, 384, 128)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_sparse24_int4_mm_tc_equals_sparse24_int4_mm(m, n, k, gs, dtype):
    g = _gen(n * k + m)
    w = random_24(n, k, gen=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    packed, meta, scales, zeros = ops.pack_sparse24_int4(w, gs, False)
    codes_tc, meta_tc = ops.repack_sparse24_int4_tc(packed, meta)
    for got, want in zip(reference.repack_sparse24_int4_tc(packed, meta), (codes_tc, meta_tc)):
        assert torch.equal(got, want)
    for b in (None, bias):
        got = ops.sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, gs, b)
        # the reference of sparse24_int4_mm_tc is sparse24_int4_mm's on the un-repacked
        # weight: bit-equal
        with pyfast.use_backend("reference"):
            want = ops.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b)
        assert torch.equal(got, want)


def test_tc_ops_reject_a_canonical_weight():
    w = torch.randn(8, 64)
    packed, scales, zeros = ops.pack_int4(w, 32, True)
    x = torch.randn(2, 64)
    if tuple(ops.repack_int4_tc(packed).shape) != tuple(packed.shape) or \
            ops.repack_int4_tc(packed).dtype != packed.dtype:
        with pytest.raises((TypeError, ValueError), match="w_tc"):
            ops.int4_mm_tc(x, packed, scales, zeros, 32)
    values, meta = ops.sparse24_compress(random_24(8, 64))
    if tuple(ops.repack_sparse24_tc(meta).shape) != tuple(meta.shape) or \
            ops.repack_sparse24_tc(meta).dtype != meta.dtype:
        with pytest.raises((TypeError, ValueError), match="meta_tc"):
            ops.sparse24_mm_tc(x, values, meta)
    packed, meta, scales, zeros = ops.pack_sparse24_int4(random_24(8, 64), 32, True)
    with pytest.raises(TypeError, match="codes_tc has dtype torch.uint8; accepted: int32"):
        ops.sparse24_int4_mm_tc(x, packed, meta, scales, zeros, 32)
    codes_tc, meta_tc = ops.repack_sparse24_int4_tc(packed, meta)
    with pytest.raises(TypeError, match="meta_tc has dtype torch.uint8; accepted: int32"):
        ops.sparse24_int4_mm_tc(x, codes_tc, meta, scales, zeros, 32)
    with pytest.raises(ValueError, match="meta_tc has shape"):
        ops.sparse24_int4_mm_tc(x, codes_tc, ops.repack_sparse24_tc(
            reference.unpack_nibbles(meta))[:, :, :16], scales, zeros, 32)


def test_tc_op_errors_name_the_argument():
    w_tc = ops.repack_int4_tc(ops.pack_int4(torch.randn(8, 64), 32, True)[0])
    scales, zeros = torch.ones(8, 2), torch.full((8, 2), 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="zeros"):
        ops.int4_mm_tc(torch.randn(2, 64), w_tc, scales, zeros[:7], 32)
    with pytest.raises(ValueError, match="group_size"):
        ops.int4_mm_tc(torch.randn(2, 64), w_tc, scales, zeros, 48)
    with pytest.raises(TypeError, match="packed"):
        ops.repack_int4_tc(torch.zeros(8, 32, dtype=torch.int8))
    with pytest.raises(TypeError, match="meta"):
        ops.repack_sparse24_tc(torch.zeros(8, 16))
    packed, meta, scales, zeros = ops.pack_sparse24_int4(random_24(8, 64), 32, True)
    codes_tc, meta_tc = ops.repack_sparse24_int4_tc(packed, meta)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"zeros has shape \(7, 2\): dimension 0 must be 8"):
        ops.sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros[:7], 32)
    with pytest.raises(ValueError, match="group_size 48 is not supported"):
        ops.sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"codes_tc has shape \(1, 1, 32, 2\); for N = 8, "
                                         r"K = 128 it must be \(1, 2, 32, 2\)"):
        ops.sparse24_int4_mm_tc(torch.randn(2, 128), codes_tc, meta_tc, scales.repeat(1, 2),
                                zeros.repeat(1, 2), 32)
    with pytest.raises(ValueError, match="x.shape\\[1\\] \\(K\\) = 60 must be a multiple of 8"):
        ops.sparse24_int4_mm_tc(torch.randn(2, 60), codes_tc, meta_tc, scales[:, :1],
                                zeros[:, :1], -1)
    with pytest.raises(ValueError, match=r"meta has shape \(8, 16\): dimension 1 must be 8"):
        ops.repack_sparse24_int4_tc(packed, torch.zeros(8, 16, dtype=torch.uint8))


def test_tc_repack_has_no_gradient_but_matmuls_do():
    g = _gen(3)
    w = torch.randn(6, 64, generator=g)
    packed, scales, zeros = ops.pack_int4(w, 32, False)
    w_tc = ops.repack_int4_tc(packed)
    x1 = torch.randn(3, 64, generator=g, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    s1, s2 = scales.clone().requires_grad_(True), scales.clone().requires_grad_(True)
    with pyfast.use_backend("reference"):   # same forward bits, so the same gradients
        ops.int4_mm(x1, packed, s1, zeros, 32).square().sum().backward()
        ops.int4_mm_tc(x2, w_tc, s2, zeros, 32).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(s1.grad, s2.grad)

    values, meta = ops.sparse24_compress(random_24(6, 64, gen=g))
    v1, v2 = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    ops.sparse24_mm(x1.detach(), v1, meta).sum().backward()
    ops.sparse24_mm_tc(x1.detach(), v2, ops.repack_sparse24_tc(meta)).sum().backward()
    assert torch.equal(v1.grad, v2.grad)


@pytest.mark.parametrize("gs", [32, -1])
def test_sparse24_int4_tc_matmul_has_the_canonical_gradients(gs):
    g = _gen(4)
    packed, meta, scales, zeros = ops.pack_sparse24_int4(random_24(6, 64, gen=g), gs, False)
    codes_tc, meta_tc = ops.repack_sparse24_int4_tc(packed, meta)
    bias = torch.randn(6, generator=g)
    grads = []
    for tc in (False, True):
        x = torch.randn(3, 64, generator=_gen(5)).requires_grad_(True)
        s, b = scales.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        with pyfast.use_backend("reference"):   # same forward bits, so the same gradients
            out = (ops.sparse24_int4_mm_tc(x, codes_tc, meta_tc, s, zeros, gs, b) if tc else
                   ops.sparse24_int4_mm(x, packed, meta, s, zeros, gs, b))
        out.square().sum().backward()
        grads.append((x.grad, s.grad, b.grad))
    for a, b in zip(*grads):
        assert a is not None and torch.equal(a, b)


# --- layers -----------------------------------------------------------------------------

def _linear(k=128, n=24, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_layer_same_output_in_both_layouts(dtype):
    lin = _linear(dtype=dtype)
    canon = Int4Linear.from_linear(lin, group_size=32, layout="canonical")
    tc = Int4Linear.from_linear(lin, group_size=32, layout="tc")
    assert (canon.layout, tc.layout) == ("canonical", "tc")
    assert "tensor-core" in repr(tc) and "tensor-core" not in repr(canon)
    x = torch.randn(2, 5, 128).to(dtype)
    with pyfast.use_backend("reference"):
        assert torch.equal(canon(x), tc(x))
    # repack both ways is exact and in place
    packed = canon.packed.clone()
    assert canon.repack("tc") is canon and torch.equal(canon.packed, tc.packed)
    canon.repack("canonical")
    assert canon.layout == "canonical" and torch.equal(canon.packed, packed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse24_layer_same_output_in_both_layouts(dtype):
    lin = _linear(dtype=dtype)
    canon = Sparse24Linear.from_linear(lin, prune=True, layout="canonical")
    tc = Sparse24Linear.from_linear(lin, prune=True, layout="tc")
    x = torch.randn(4, 128).to(dtype)
    with pyfast.use_backend("reference"):
        assert torch.equal(canon(x), tc(x))
    meta = canon.meta.clone()
    canon.repack("tc")
    assert torch.equal(canon.meta, tc.meta)
    assert torch.equal(canon.repack("canonical").meta, meta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [32, 33])
def test_sparse24_int4_layer_same_output_in_both_layouts(n, dtype):
    lin = _linear(n=n, dtype=dtype)
    canon = Sparse24Int4Linear.from_linear(lin, prune=True, group_size=32, layout="canonical")
    tc = Sparse24Int4Linear.from_linear(lin, prune=True, group_size=32, layout="tc")
    assert (canon.layout, tc.layout) == ("canonical", "tc")
    assert (canon.pyfast_config()["layout"], tc.pyfast_config()["layout"]) == ("canonical", "tc")
    assert "tensor-core" in repr(tc) and "tensor-core" not in repr(canon)
    assert tc.packed.dtype == tc.meta.dtype == torch.int32
    assert torch.equal(canon.dequantized_weight(), tc.dequantized_weight())
    for a, b in zip(canon.canonical_weight(), tc.canonical_weight()):
        assert torch.equal(a, b)
    # storage_bytes counts the buffers held: the same bytes where nothing is padded
    # (N % 16 == 0, K % 64 == 0), more where the tiles pad N = 33 up to 48
    assert (tc.storage_bytes() == canon.storage_bytes()) == (n % 16 == 0)
    assert tc.storage_bytes() == sum(t.numel() * t.element_size() for t in tc.buffers())
    x = torch.randn(2, 5, 128).to(dtype)
    with pyfast.use_backend("reference"):
        assert torch.equal(canon(x), tc(x))
    # repack both ways is exact and in place
    packed, meta = canon.packed.clone(), canon.meta.clone()
    assert canon.repack("tc") is canon and canon.layout == "tc"
    assert torch.equal(canon.packed, tc.packed) and torch.equal(canon.meta, tc.meta)
    canon.repack("canonical")
    assert canon.layout == "canonical"
    assert torch.equal(canon.packed, packed) and torch.equal(canon.meta, meta)
    assert canon.repack("auto").layout == "canonical" and tc.repack("auto").layout == "canonical"


def test_sparse24_int4_layer_made_in_the_tc_layout():
    """The constructor's tc buffers (what load fills) have the repacked shapes."""
    layer = Sparse24Int4Linear(200, 17, group_size=-1, layout="tc")
    assert tuple(layer.packed.shape) == (2, 4, 32, 2) and tuple(layer.meta.shape) == (2, 4, 32)
    assert torch.equal(layer.canonical_weight()[1], torch.full((17, 25), 0x44, dtype=torch.uint8))
    with torch.device("meta"):
        on_meta = Sparse24Int4Linear(200, 17, group_size=-1, layout="tc")
    assert on_meta.packed.shape == layer.packed.shape and on_meta.packed.is_meta


def test_auto_is_canonical_on_cpu_and_says_why_not_tc():
    lin = _linear(dtype=torch.float16)
    assert Int4Linear.from_linear(lin, group_size=32).layout == "canonical"
    assert Sparse24Linear.from_linear(lin, prune=True).layout == "canonical"
    assert Sparse24Int4Linear.from_linear(lin, prune=True, group_size=32).layout == "canonical"
    assert "cpu" in L.why_not_tc("int4_mm_tc", torch.device("cpu"), torch.float16)
    assert "cpu" in L.why_not_tc("sparse24_int4_mm_tc", torch.device("cpu"), torch.float16)
    assert "float32" in L.why_not_tc("int4_mm_tc", torch.device("cuda"), torch.float32)
    why = L.why_not_tc("sparse24_mm_tc", torch.device("cuda"), torch.bfloat16)
    assert why == dispatch.unavailable_reason("cuda", "cuda")
    if not torch.cuda.is_available():
        assert why  # no GPU here: the reason is reported, never None


@pytest.mark.parametrize("bad", ["TC", "fast", None, 1])
def test_bad_layout_is_rejected_with_the_choices(bad):
    with pytest.raises(ValueError, match="accepted: 'canonical', 'tc', 'ksplit', 'auto'"):
        Int4Linear.from_linear(_linear(), group_size=32, layout=bad)
    with pytest.raises(ValueError, match="layout"):
        Int4Linear(128, 8, group_size=32, layout="auto" if bad is None else bad)
    with pytest.raises(ValueError, match="layout"):
        pyfast.quantize(nn.Sequential(_linear()), "int4", layout=bad)
    with pytest.raises(ValueError, match="layout"):
        pyfast.sparsify(nn.Sequential(_linear()), layout=bad)
    with pytest.raises(ValueError, match="accepted: 'canonical', 'tc', 'auto'"):
        Sparse24Int4Linear.from_linear(_linear(), prune=True, layout=bad)
    with pytest.raises(ValueError, match="layout .* by Sparse24Int4Linear"):
        Sparse24Int4Linear(128, 8, layout="auto" if bad is None else bad)
    with pytest.raises(ValueError, match="layout"):
        pyfast.sparsify(nn.Sequential(_linear()), values="int4", layout=bad)
    with pytest.raises(ValueError, match="layout"):
        pyfast.repack(nn.Sequential(_linear()), bad)


def test_model_api_layout_and_repack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    x = torch.randn(3, 64)
    q = pyfast.quantize(model, "int4", group_size=32, layout="tc", include="0")
    pyfast.sparsify(q, include="2", layout="tc")
    assert q[0].layout == "tc" and q[2].layout == "tc"
    with pyfast.use_backend("reference"):
        y_tc = q(x)
    assert pyfast.repack(q, "auto") is q               # auto on a CPU: canonical
    assert q[0].layout == "canonical" and q[2].layout == "canonical"
    with pyfast.use_backend("reference"):
        assert torch.equal(q(x), y_tc)
    with pytest.raises(TypeError, match="nn.Module"):
        pyfast.repack("model")


def test_model_api_sparse24_int4_layout_and_repack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(3, 64)
    pyfast.sparsify(model, values="int4", group_size=-1, layout="tc")
    assert isinstance(model[0], Sparse24Int4Linear) and model[0].layout == model[2].layout == "tc"
    with pyfast.use_backend("reference"):
        y_tc = model(x)
    assert pyfast.repack(model, "vnni") is model and model[0].layout == "tc"   # not its layout
    pyfast.repack(model)                             # auto on a CPU: canonical
    assert model[0].layout == model[2].layout == "canonical"
    with pyfast.use_backend("reference"):
        assert torch.equal(model(x), y_tc)
    pyfast.repack(model, "tc")
    assert model[0].layout == "tc"


def test_save_load_keeps_the_layout(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    pyfast.quantize(model, "int4", group_size=32, layout="tc", include="0")
    pyfast.sparsify(model, include="2", layout="tc")
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    skeleton = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    loaded = pyfast.load(skeleton, path)
    assert loaded[0].layout == "tc" and loaded[2].layout == "tc"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 64)
    with pyfast.use_backend("reference"):
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_save_load_keeps_the_sparse24_int4_layout(tmp_path, dtype):
    def build():
        return nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8)).to(dtype)

    torch.manual_seed(0)
    model = build()
    pyfast.sparsify(model, values="int4", group_size=-1, layout="tc", include="0")
    pyfast.sparsify(model, values="int4", group_size=-1, layout="canonical", include="2")
    path = tmp_path / "m.safetensors"
    pyfast.save(model, path)
    with torch.device("meta"):
        skeleton = build()
    loaded = pyfast.load(skeleton, path)
    assert isinstance(loaded[0], Sparse24Int4Linear)
    assert (loaded[0].layout, loaded[2].layout) == ("tc", "canonical")
    assert loaded[0].orig_dtype == dtype
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(2, 64).to(dtype)
    with pyfast.use_backend("reference"):
        assert torch.equal(model(x), loaded(x))


# --- on a GPU ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_auto_picks_tc_where_the_cuda_kernel_runs(dtype):
    lin = _linear(k=256, n=64, dtype=dtype).cuda()
    layer = Int4Linear.from_linear(lin, group_size=128)
    sparse = Sparse24Linear.from_linear(lin, prune=True)
    why = L.why_not_tc("int4_mm_tc", torch.device("cuda"), dtype)
    assert layer.layout == ("tc" if why is None else "canonical"), why
    assert sparse.layout == layer.layout
    x = torch.randn(5, 256, device="cuda", dtype=dtype)
    want = Int4Linear.from_linear(lin, group_size=128, layout="canonical")(x)
    torch.testing.assert_close(layer(x), want, rtol=2e-2, atol=2e-2)
    # a model quantized on the CPU and then moved: pyfast.repack picks the GPU layout
    on_cpu = nn.Sequential(Int4Linear.from_linear(_linear(k=256, n=64, dtype=dtype),
                                                  group_size=128))
    assert on_cpu[0].layout == "canonical"
    moved = pyfast.repack(on_cpu.cuda())
    assert moved[0].layout == layer.layout
    torch.testing.assert_close(moved(x), want, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_auto_picks_tc_for_sparse24_int4_where_the_cuda_kernel_runs(dtype):
    lin = _linear(k=256, n=64, dtype=dtype).cuda()
    layer = Sparse24Int4Linear.from_linear(lin, prune=True, group_size=128)
    why = L.why_not_tc("sparse24_int4_mm_tc", torch.device("cuda"), dtype)
    assert layer.layout == ("tc" if why is None else "canonical"), why
    x = torch.randn(5, 256, device="cuda", dtype=dtype)
    want = Sparse24Int4Linear.from_linear(lin, prune=True, group_size=128,
                                          layout="canonical")(x)
    torch.testing.assert_close(layer(x), want, rtol=2e-2, atol=2e-2)


def test_sparse24_int4_mm_tc_cuda_kernel_is_registered_and_refuses_cpu_clearly():
    """The CUDA C++ kernel is the op's 'cuda' backend (csrc/cuda/sparse24_int4_mm.cu);
    forced on CPU tensors it raises, naming the op and why, instead of running anything."""
    assert dispatch.kernels("sparse24_int4_mm_tc")["cuda"].source == \
        "csrc/cuda/sparse24_int4_mm.cu"
    w = torch.randn(8, 64) * torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(16)
    packed, meta, scales, zeros = ops.pack_sparse24_int4(w, 32, True)
    codes_tc, meta_tc = ops.repack_sparse24_int4_tc(packed, meta)
    with pyfast.use_backend("cuda"):
        with pytest.raises(pyfast.BackendUnavailableError, match="sparse24_int4_mm_tc.*'cuda'"):
            ops.sparse24_int4_mm_tc(torch.randn(2, 64), codes_tc, meta_tc, scales, zeros, 32)
