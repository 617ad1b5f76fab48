"""Gradients through the ops equal autograd through the same math written in torch;
ops whose gradient is meaningless raise on backward instead of being wrong."""
import pytest
import torch
import torch.nn.functional as F

import pyfast
from pyfast.sparsity import magnitude_24_mask


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return [t.grad for t in tensors]


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_int8_weight_mm_grads_x_scale_bias():
    x, w, b = torch.randn(5, 64), torch.randn(9, 64), torch.randn(9)
    q, s = pyfast.ops.quantize_per_token(w)
    got = _grads(lambda x, s, b: pyfast.ops.int8_weight_mm(x, q, s, b), x, s, b)
    want = _grads(lambda x, s, b: F.linear(x, q.float() * s[:, None], b), x, s, b)
    _close(got, want)


@pytest.mark.parametrize("group_size", [32, -1])
def test_int4_mm_grads_x_scales_bias(group_size):
    x, w, b = torch.randn(3, 64), torch.randn(7, 64), torch.randn(7)
    packed, scales, zeros = pyfast.ops.pack_int4(w, group_size, False)
    q = pyfast.reference.unpack_nibbles(packed).float()
    gs = 64 if group_size == -1 else group_size

    def by_hand(x, s, b):
        w = (q - zeros.float().repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)
        return F.linear(x, w, b)

    got = _grads(lambda x, s, b: pyfast.ops.int4_mm(x, packed, s, zeros, group_size, b),
                 x, scales, b)
    _close(got, _grads(by_hand, x, scales, b))


@pytest.mark.parametrize("bits,group_size", [(2, 32), (2, -1), (1, 32), (1, -1)])
def test_lowbit_mm_grads_x_scales_bias(bits, group_size):
    x, w, b = torch.randn(3, 64), torch.randn(7, 64), torch.randn(7)
    packed, scales, zeros = pyfast.ops.pack_lowbit(w, bits, group_size)
    q = pyfast.reference.unpack_bits(packed, bits).float()
    gs = 64 if group_size == -1 else group_size
    unit = 2 * q - 1 if bits == 1 else q - zeros.float().repeat_interleave(gs, 1)

    def by_hand(x, s, b):
        return F.linear(x, unit * s.repeat_interleave(gs, 1), b)

    got = _grads(lambda x, s, b: pyfast.ops.lowbit_mm(x, packed, s, zeros, bits, group_size, b),
                 x, scales, b)
    _close(got, _grads(by_hand, x, scales, b))


@pytest.mark.parametrize("group_size", [32, -1])
def test_sparse24_int4_mm_grads_x_scales_bias(group_size):
    """By hand: the kept codes' (q - z) * s scattered into the 2:4 positions."""
    x, w, b = torch.randn(3, 64), torch.randn(7, 64), torch.randn(7)
    mask = magnitude_24_mask(w)
    packed, meta, scales, zeros = pyfast.ops.pack_sparse24_int4(w * mask, group_size, False)
    q = pyfast.reference.unpack_nibbles(packed).float()    # [7, 32] kept codes, k order
    half = 32 if group_size == -1 else group_size // 2

    def by_hand(x, s, b):
        v = (q - zeros.float().repeat_interleave(half, 1)) * s.repeat_interleave(half, 1)
        return F.linear(x, torch.zeros(7, 64).masked_scatter(mask, v), b)

    got = _grads(lambda x, s, b: pyfast.ops.sparse24_int4_mm(x, packed, meta, s, zeros,
                                                             group_size, b), x, scales, b)
    _close(got, _grads(by_hand, x, scales, b))


def test_pack_sparse24_int4_backward_raises():
    w = torch.zeros(4, 32, requires_grad=True)
    _, _, scales, _ = pyfast.ops.pack_sparse24_int4(w, 32, True)
    with pytest.raises(RuntimeError, match="pyfast.pack_sparse24_int4 has no gradient"):
        scales.sum().backward()


def test_pack_lowbit_backward_raises():
    w = torch.randn(4, 32, requires_grad=True)
    _, scales, _ = pyfast.ops.pack_lowbit(w, 1, 32)
    with pytest.raises(RuntimeError, match="pyfast.pack_lowbit has no gradient: packing rounds"):
        scales.sum().backward()


def test_sparse24_mm_grads_x_values_bias():
    x, w, b = torch.randn(4, 32), torch.randn(6, 32), torch.randn(6)
    w = w * magnitude_24_mask(w)
    values, meta = pyfast.ops.sparse24_compress(w)
    mask = magnitude_24_mask(w)

    def by_hand(x, v, b):  # scatter v into the kept positions, row-major order
        dense = torch.zeros(6, 32).masked_scatter(mask, v)
        return F.linear(x, dense, b)

    got = _grads(lambda x, v, b: pyfast.ops.sparse24_mm(x, v, meta, b), x, values, b)
    _close(got, _grads(by_hand, x, values, b))


@pytest.mark.parametrize("layout", ["canonical", "vnni"])
def test_w8a8_forward_works_with_grad_but_backward_raises(layout):
    layer = pyfast.nn.Int8Linear.from_linear(torch.nn.Linear(16, 4), layout=layout)
    y = layer(torch.randn(2, 16, requires_grad=True))
    op = "w8a8_mm_vnni" if layout == "vnni" else "w8a8_mm"
    with pytest.raises(RuntimeError, match=f"pyfast.{op} has no gradient: W8A8 rounds"):
        y.sum().backward()


def test_every_op_has_an_autograd_kernel():
    """Each op has a gradient formula or a backward that raises: without an autograd
    kernel PyTorch only warns and passes no gradient (quantize_static had none)."""
    missing = [op for op in pyfast.ops.SCHEMAS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfast::{op}", "Autograd")]
    assert not missing


def test_quantize_static_backward_raises():
    scale = torch.tensor([0.1], requires_grad=True)
    _, rows = pyfast.ops.quantize_static(torch.randn(5, 64), scale)
    with pytest.raises(RuntimeError, match="pyfast.quantize_static has no gradient"):
        rows.sum().backward()


@pytest.mark.parametrize("method", ["int8", "static"])
def test_compile_of_a_forward_whose_input_requires_grad(method):
    """A LayerNorm in front makes the W8A8 layer's input require grad: torch.compile
    traces the backward while compiling the forward, and the backward's Python raise
    failed the compile of a forward that eager runs. Now the compiled forward runs and
    its backward raises as eager's does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    if method == "static":
        pyfast.quant.quantize_static(model, [torch.randn(8, 64)], progress=False)
    else:
        pyfast.quantize(model, "int8")
    x = torch.randn(4, 64)
    y = torch.compile(model)(x)
    assert y.requires_grad
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    # static: quantize_static's or int8_mm's, whichever the compiled backward runs first
    op = "(int8_mm|quantize_static)" if method == "static" else "w8a8_mm"
    with pytest.raises(RuntimeError, match=f"pyfast.{op} has no gradient"):
        y.sum().backward()
