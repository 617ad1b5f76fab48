"""Edges of the Triton kernels (kernels/) that the per-kernel tests do not reach:

- K = 0 in int4_mm / sparse24_int4_mm (an empty sum: the bias, as the reference);
- column offsets k * stride past 2**31: a view whose column stride is huge (what a
  transposed weight or activation of more than 2**31 elements has), built over a
  lazily mapped buffer so that only a few pages are touched;
- bfloat16 scales and biases with subnormal values (the interpreter's bf16 -> fp32
  cast is wrong for them; the kernels must widen through _common.to_f32);
- the `config=` argument's types.

DEVICE is the interpreter's CPU, or the GPU where there is one (as in the other
tests/test_triton_*.py files).
"""
import mmap
import os
import re
import sys

import pytest
import torch

from pyfast import ops, reference
from pyfast.kernels import int8_mm as i8
from pyfast.kernels import quantize as qk
from pyfast.kernels import sparse24 as s24
from pyfast.kernels import sparse24_int4 as s24i4
from pyfast.kernels import weight_only as wo
from _helpers import run_forced

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "") == "1" else "cuda"


# --- K = 0 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["int4_mm", "sparse24_int4_mm"])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_int4_kernels_k0_give_the_bias(op, group_size, dtype, bias):
    """The op takes K = 0 for group sizes 32/64/128 (G = 0); the launchers passed
    scales[:, 0] of a [N, 0] tensor and raised IndexError (the reference and the C++
    kernels return the bias)."""
    m, n = 3, 5
    x = torch.randn(m, 0, dtype=dtype, device=DEVICE)
    u8 = dict(dtype=torch.uint8, device=DEVICE)
    scales, zeros = torch.ones(n, 0, device=DEVICE), torch.zeros(n, 0, **u8)
    b = torch.arange(n, dtype=torch.float32, device=DEVICE) - 2.5 if bias else None
    if op == "int4_mm":
        args = (x, torch.zeros(n, 0, **u8), scales, zeros, group_size, b)
    else:
        args = (x, torch.zeros(n, 0, **u8), torch.zeros(n, 0, **u8), scales, zeros, group_size, b)
    out = run_forced(op, "triton", *args)
    expected = run_forced(op, "reference", *args)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(out, (b.to(dtype).expand(m, n) if bias else torch.zeros(m, n, dtype=dtype,
                                                                               device=DEVICE)))


# --- column offsets past 2**31 -----------------------------------------------------------

def _lazy_zeros(numel, dtype):
    """A zero tensor of numel elements whose pages are mapped only when touched (on the
    GPU: a plain allocation, at most 8 GiB here)."""
    if DEVICE == "cuda":
        return torch.zeros(numel, dtype=dtype, device=DEVICE)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # MAP_NORESERVE (Linux 0x4000; Python >= 3.13 names it): no swap reserved for the
    # untouched pages, so heuristic overcommit does not refuse a mapping this size.
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
    flags = mmap.MAP_PRIVATE | noreserve
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=dtype)


def _far_columns(t, decoy):
    """(view, wrapped): t [R, C] as a view whose column k lies k * S elements after its
    column 0, S = 2**31 // (C - 1) + 1, so that the last columns' k * S reach 2**31;
    `wrapped` is t with those columns taken from decoy [R, C] -- what a kernel that
    computes k * S in int32 reads: the offset wraps to k * S - 2**32, and the view starts
    2**31 elements into its buffer so that this lands inside it, on decoy's values."""
    r, c = t.shape
    s = 2 ** 31 // (c - 1) + 1
    buf = _lazy_zeros(2 ** 31 + (c - 1) * s + r, t.dtype)
    view = buf.as_strided((r, c), (1, s), 2 ** 31)
    view.copy_(t)
    wrapped = t.clone()
    for k in range(c):
        if k * s >= 2 ** 31:
            buf[k * s - 2 ** 31: k * s - 2 ** 31 + r] = decoy[:, k]
            wrapped[:, k] = decoy[:, k]
    assert not torch.equal(wrapped, t)
    return view, wrapped


def _ints(*shape, lo=-4, hi=5, dtype=torch.float16):
    # small integers: every product and sum below is exact in float16 / float32
    return torch.randint(lo, hi, shape).to(dtype).to(DEVICE)


def _sparse24_weight(n, k, shift=0):
    """A 2:4 weight of nonzero small integers; group j keeps positions (j + shift) % 3 and
    3, so the last column is kept (a decoy there changes the result), and shift changes
    every group's meta nibble."""
    w = torch.zeros(n, k)
    for j in range(k // 4):
        for p in ((j + shift) % 3, 3):
            w[:, 4 * j + p] = torch.randint(1, 8, (n,)) * (1 - 2 * torch.randint(0, 2, (n,)))
    w[:, -1] = 7  # a row abs-max of 7: symmetric int4 scale 1, codes w + 8 (exact)
    return w


def _case_int8_weight_mm():
    x, w = _ints(2, 3), torch.randint(-100, 100, (4, 3), dtype=torch.int8).to(DEVICE)
    args = (x, w, torch.full((4,), 0.5, device=DEVICE), _ints(4, dtype=torch.float32))
    decoys = {0: x + 16, 1: -w}
    return wo.int8_weight_mm, reference.int8_weight_mm, args, decoys


def _case_int4_mm():
    x, q = _ints(2, 6), torch.randint(0, 16, (4, 6))
    packed = reference.pack_nibbles(q.to(torch.uint8)).to(DEVICE)               # [4, 3]
    scales = torch.full((4, 1), 0.5, device=DEVICE)
    zeros = torch.full((4, 1), 8, dtype=torch.uint8, device=DEVICE)
    args = (x, packed, scales, zeros, -1, None)
    decoys = {0: x + 16, 1: packed ^ 0x55}
    return wo.int4_mm, reference.int4_mm, args, decoys


def _case_sparse24_mm():
    x = _ints(2, 12)
    values, meta = (t.to(DEVICE) for t in ops.sparse24_compress(_sparse24_weight(4, 12).half()))
    _, meta2 = (t.to(DEVICE) for t in ops.sparse24_compress(_sparse24_weight(4, 12, 1).half()))
    args = (x, values, meta, None)
    decoys = {0: x + 16, 1: values + 16, 2: meta2}
    return s24.sparse24_mm, reference.sparse24_mm, args, decoys


def _case_sparse24_int4_mm():
    x = _ints(2, 24)
    packed, meta, scales, zeros = (t.to(DEVICE) for t in
                                   ops.pack_sparse24_int4(_sparse24_weight(4, 24), -1, True))
    meta2 = ops.pack_sparse24_int4(_sparse24_weight(4, 24, 1), -1, True)[1].to(DEVICE)
    args = (x, packed, meta, scales, zeros, -1, None)
    decoys = {0: x + 16, 1: packed ^ 0x55, 2: meta2}
    return s24i4.sparse24_int4_mm, reference.sparse24_int4_mm, args, decoys


def _case_quantize_per_token():
    x = torch.tensor([[1.0, -2.0, 127.0], [3.0, 0.5, -64.0]], dtype=torch.float16, device=DEVICE)
    return qk.quantize_per_token, reference.quantize_per_token, (x,), {0: x / 4}


def _case_quantize_static():
    x = torch.tensor([[1.0, -2.0, 12.0], [3.0, 0.5, -6.0]], dtype=torch.float16, device=DEVICE)
    args = (x, torch.tensor(0.25, device=DEVICE))
    return qk.quantize_static, reference.quantize_static, args, {0: x + 3}


def _case_int8_mm(k):
    # k = 129: the last column is reached by the loop's K step (BLOCK_K * stride), not
    # by the first tile's offsets (BLOCK_K = 128 in the interpreter)
    def case():
        a = torch.randint(-100, 100, (2, k), dtype=torch.int8).to(DEVICE)
        b = torch.randint(-100, 100, (3, k), dtype=torch.int8).to(DEVICE)
        args = (a, b, torch.rand(2, device=DEVICE), torch.rand(3, device=DEVICE), None, None)
        return i8.int8_mm, reference.int8_mm, args, {0: -a, 1: -b}
    return case


CASES = {"int8_weight_mm": _case_int8_weight_mm, "int4_mm": _case_int4_mm,
         "sparse24_mm": _case_sparse24_mm, "sparse24_int4_mm": _case_sparse24_int4_mm,
         "quantize_per_token": _case_quantize_per_token,
         "quantize_static": _case_quantize_static,
         "int8_mm_k3": _case_int8_mm(3), "int8_mm_k129": _case_int8_mm(129)}
FAR = [pytest.param(name, i, id=f"{name}-{what}") for name, whats in [
    ("int8_weight_mm", ("x", "w")), ("int4_mm", ("x", "packed")),
    ("sparse24_mm", ("x", "values", "meta")), ("sparse24_int4_mm", ("x", "packed", "meta")),
    ("quantize_per_token", ("x",)), ("quantize_static", ("x",)),
    ("int8_mm_k3", ("a", "b")), ("int8_mm_k129", ("a", "b"))] for i, what in enumerate(whats)]


def _cpu(*args):
    # the references run on CPU: exact there, subnormals included (no flush to zero)
    return [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]


def _same(out, expected):
    if isinstance(out, tuple):
        return all(_same(o, e) for o, e in zip(out, expected))
    return torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("name,index", FAR)
def test_column_offsets_past_2_31(name, index):
    """Argument `index` as a view whose k * stride passes 2**31 (the transpose of a
    tensor of more than 2**31 elements, e.g. an lm_head-sized int8 weight): the column
    offsets were int32 and wrapped (the interpreter read the decoys or crashed; on a GPU,
    an illegal address or another allocation). Every value below is an exact small
    integer sum, so the kernel must equal the reference bit for bit."""
    kernel, ref, args, decoys = CASES[name]()
    view, wrapped = _far_columns(args[index], decoys[index])
    expected = ref(*_cpu(*args))
    with_decoys = ref(*_cpu(*args[:index], wrapped, *args[index + 1:]))
    assert not _same(with_decoys, expected)        # a wrapped read would be seen
    out = kernel(*args[:index], view, *args[index + 1:])
    assert _same(out, expected), (out, expected)
    del view
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# --- bfloat16 subnormal scales and biases --------------------------------------------------

def _sub_bf16(*shape):
    """bfloat16 values of both signs around 1e-39 (subnormal in float32 and bfloat16)."""
    v = torch.randint(1, 128, shape) * (1 - 2 * torch.randint(0, 2, shape))
    return (v * 2.0 ** -133).to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("op,m", [("int8_weight_mm", 3), ("int8_weight_mm", 17),
                                  ("int4_mm", 3), ("int4_mm", 17), ("sparse24_mm", 3),
                                  ("sparse24_int4_mm", 3), ("sparse24_int4_mm", 17)])
def test_bf16_subnormal_scales_and_bias(op, m):
    """float32 activations with bfloat16 scales / bias: the epilogues (split-K at M = 3,
    fused at M = 17) and the int4 group scales widened them with .to(tl.float32), which
    the interpreter gets wrong for subnormals (~4x off). Integer x and codes make every
    product and sum exact (multiples of 2**-133 below 2**24 of them), so the kernel must
    equal the reference bit for bit."""
    n, k = 4, 64
    x = torch.randint(-4, 5, (m, k)).float().to(DEVICE)
    bias = _sub_bf16(n)
    if op == "int8_weight_mm":
        w = torch.randint(-8, 9, (n, k), dtype=torch.int8).to(DEVICE)
        args = (x, w, _sub_bf16(n), bias)
        out = wo.int8_weight_mm(*args)
    elif op == "int4_mm":   # M = 3: 32-groups (scales in the loop); M = 17: one group (epilogue)
        gs = 32 if m == 3 else -1
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8).to(DEVICE)
        g = k // 32 if gs == 32 else 1
        zeros = torch.randint(0, 16, (n, g), dtype=torch.uint8).to(DEVICE)
        args = (x, packed, _sub_bf16(n, g), zeros, gs, bias)
        out = wo.int4_mm(*args)
    elif op == "sparse24_mm":   # the bias only (no scale)
        values, meta = (t.to(DEVICE) for t in ops.sparse24_compress(_sparse24_weight(n, k)))
        args = (x, values, meta, bias)
        out = s24.sparse24_mm(*args)
    else:
        gs = 32 if m == 3 else -1
        packed, meta, scales, zeros = (t.to(DEVICE) for t in
                                       ops.pack_sparse24_int4(_sparse24_weight(n, k), gs, True))
        args = (x, packed, meta, _sub_bf16(*scales.shape), zeros, gs, bias)
        out = s24i4.sparse24_int4_mm(*args)
    expected = getattr(reference, op)(*_cpu(*args))
    assert expected.abs().max() > 0
    assert torch.equal(out.cpu(), expected), (out.cpu() - expected).abs().max()


# --- config types ---------------------------------------------------------------------------

def _cfg(**over):
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, **over}


_WRONG_TYPES = [("SPLIT_K", 2.5), ("SPLIT_K", 2.0), ("SPLIT_K", True), ("BLOCK_M", True),
                ("BLOCK_N", 32.0), ("num_warps", 4.0), ("num_stages", "2")]


@pytest.mark.parametrize("kernel", ["int8_weight_mm", "sparse24_mm"])
@pytest.mark.parametrize("key,value", _WRONG_TYPES, ids=[f"{k}={v!r}" for k, v in _WRONG_TYPES])
def test_config_of_the_wrong_type_is_a_type_error(kernel, key, value):
    """A float SPLIT_K failed in the launch with a TypeError that did not name it, and a
    bool was run as 0 / 1."""
    config = _cfg(**{key: value})
    match = rf"config {key} = {re.escape(repr(value))} \({type(value).__name__}\) must be an int"
    x = torch.randn(3, 64, device=DEVICE)
    if kernel == "int8_weight_mm":
        w = torch.randint(-128, 128, (5, 64), dtype=torch.int8, device=DEVICE)
        call = lambda: wo.int8_weight_mm(x, w, torch.rand(5, device=DEVICE), None,  # noqa: E731
                                         config=config)
    else:
        values, meta = (t.to(DEVICE) for t in ops.sparse24_compress(_sparse24_weight(5, 64)))
        call = lambda: s24.sparse24_mm(x, values, meta, None, config=config)  # noqa: E731
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("config,match", [
    (_cfg(num_warps=3), "config num_warps = 3 must be a power of two"),
    (_cfg(num_stages=0), "config num_stages = 0 must be at least 1")])
def test_config_num_warps_and_stages_are_checked(config, match):
    x = torch.randn(3, 64, device=DEVICE)
    w = torch.randint(-128, 128, (5, 64), dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        wo.int8_weight_mm(x, w, torch.rand(5, device=DEVICE), None, config=config)
