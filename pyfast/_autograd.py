"""Gradients of the pyfast ops, so autograd never gets a silently wrong answer.

Without a registered autograd formula PyTorch would pass gradients through a
custom op as if it were not there. Instead:
- the weight-only and 2:4 matmuls are linear in x (and in the float scales or
  values), so they get exact gradients, computed from the reference's
  dequantized weight in float32: this lets a user fine-tune around compressed
  layers (LoRA on a quantized base, 2:4 sparse fine-tuning);
- quantize_per_token, quantize_static, int8_mm(_vnni), w8a8_mm(_vnni), pack_int4, pack_lowbit, sparse24_compress,
  pack_sparse24_int4
  and the repack ops round or repack, so their true gradient is zero almost everywhere and useless:
  backward raises and says what to use instead. Forward passes with requires_grad inputs
  work, eager and under torch.compile (the raise is an op of the backward, no_gradient).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import reference
from .layouts import int4_ksplit, int4_tc, sparse24_int4_tc, sparse24_tc


def _float_grad(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype)


# --- int8_weight_mm(x, w_int8, w_scale, bias) ------------------------------------

def _setup_int8_weight_mm(ctx, inputs, output):
    x, w_int8, w_scale, bias = inputs
    ctx.save_for_backward(x, w_int8, w_scale, bias)


def _backward_int8_weight_mm(ctx, grad):
    x, w_int8, w_scale, bias = ctx.saved_tensors
    g, wf = grad.float(), w_int8.float()
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        gx = _float_grad((g * w_scale.float()) @ wf, x)
    if ctx.needs_input_grad[2]:
        gs = _float_grad((g * (x.float() @ wf.T)).sum(0), w_scale)
    if bias is not None and ctx.needs_input_grad[3]:
        gb = _float_grad(g.sum(0), bias)
    return gx, None, gs, gb


# --- int4_mm(x, packed, scales, zeros, group_size, bias) ------------------------------

def _setup_int4_mm(ctx, inputs, output):
    x, packed, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(x, packed, scales, zeros, bias)
    ctx.group_size = group_size


def _backward_int4_mm(ctx, grad):
    x, packed, scales, zeros, bias = ctx.saved_tensors
    g = grad.float()
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_int4(packed, scales, zeros, ctx.group_size)
        gx = _float_grad(g @ w, x)
    if ctx.needs_input_grad[2]:
        # out = x @ ((q - z) * s).T, so d out / d s[n, g] sums (q - z) * (g.T @ x) over group g
        n, groups = scales.shape
        q_minus_z = reference.dequantize_int4(packed, torch.ones_like(scales), zeros,
                                              ctx.group_size)
        gs = _float_grad(((g.T @ x.float()) * q_minus_z).reshape(n, groups, -1).sum(2), scales)
    if bias is not None and ctx.needs_input_grad[5]:
        gb = _float_grad(g.sum(0), bias)
    return gx, None, gs, None, None, gb


# --- lowbit_mm(x, packed, scales, zeros, bits, group_size, bias) -------------------------

def _setup_lowbit_mm(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(x, packed, scales, zeros, bias)
    ctx.bits, ctx.group_size = bits, group_size


def _backward_lowbit_mm(ctx, grad):
    x, packed, scales, zeros, bias = ctx.saved_tensors
    g = grad.float()
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_lowbit(packed, scales, zeros, ctx.bits, ctx.group_size)
        gx = _float_grad(g @ w, x)
    if ctx.needs_input_grad[2]:
        # linear in each scale, as int4_mm: the weight with unit scales is q - z (int2)
        # or 2q - 1 (binary); sum its product with g.T @ x over each group
        n, groups = scales.shape
        unit = reference.dequantize_lowbit(packed, torch.ones_like(scales), zeros, ctx.bits,
                                           ctx.group_size)
        gs = _float_grad(((g.T @ x.float()) * unit).reshape(n, groups, -1).sum(2), scales)
    if bias is not None and ctx.needs_input_grad[6]:
        gb = _float_grad(g.sum(0), bias)
    return gx, None, gs, None, None, None, gb


# --- sparse24_mm(x, values, meta, bias) ------------------------------------------

def _setup_sparse24_mm(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta, bias)


def _backward_sparse24_mm(ctx, grad):
    x, values, meta, bias = ctx.saved_tensors
    g = grad.float()
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = _float_grad(g @ reference.sparse24_decompress(values, meta).float(), x)
    if ctx.needs_input_grad[1]:
        # the dense weight gradient g.T @ x, read at the kept positions only
        n, groups = meta.shape
        m = meta.to(torch.int64)
        idx = torch.stack((m & 3, (m >> 2) & 3), dim=2)
        dense = (g.T @ x.float()).reshape(n, groups, 4)
        gv = _float_grad(dense.gather(2, idx).reshape(n, groups * 2), values)
    if bias is not None and ctx.needs_input_grad[3]:
        gb = _float_grad(g.sum(0), bias)
    return gx, gv, None, gb


# --- sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias) -------------------

def _setup_sparse24_int4_mm(ctx, inputs, output):
    x, packed, meta, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(x, packed, meta, scales, zeros, bias)
    ctx.group_size = group_size


def _backward_sparse24_int4_mm(ctx, grad):
    x, packed, meta, scales, zeros, bias = ctx.saved_tensors
    g = grad.float()
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_sparse24_int4(packed, meta, scales, zeros, ctx.group_size)
        gx = _float_grad(g @ w, x)
    if ctx.needs_input_grad[3]:
        # as int4_mm: linear in each scale; the dense weight with unit scales is q - z at
        # the kept positions and 0 elsewhere (pruned weights have no scale to train)
        n, groups = scales.shape
        unit = reference.dequantize_sparse24_int4(packed, meta, torch.ones_like(scales), zeros,
                                                  ctx.group_size)
        gs = _float_grad(((g.T @ x.float()) * unit).reshape(n, groups, -1).sum(2), scales)
    if bias is not None and ctx.needs_input_grad[6]:
        gb = _float_grad(g.sum(0), bias)
    return gx, None, None, gs, None, None, gb


# --- the same matmuls on tensor-core layouts: undo the repack (exact), then as above ---

def _setup_int4_mm_tc(ctx, inputs, output):
    x, w_tc, scales, zeros, group_size, bias = inputs
    packed = int4_tc.unrepack(w_tc, scales.shape[0], x.shape[1])
    _setup_int4_mm(ctx, (x, packed, scales, zeros, group_size, bias), output)


def _setup_int4_mm_ksplit(ctx, inputs, output):
    x, w_ks, scales, zeros, group_size, bias = inputs
    _setup_int4_mm(ctx, (x, int4_ksplit.unrepack(w_ks), scales, zeros, group_size, bias), output)


def _setup_sparse24_mm_tc(ctx, inputs, output):
    x, values, meta_tc, bias = inputs
    meta = sparse24_tc.unrepack_meta(meta_tc, values.shape[0], x.shape[1])
    _setup_sparse24_mm(ctx, (x, values, meta, bias), output)


def _setup_sparse24_int4_mm_tc(ctx, inputs, output):
    x, codes_tc, meta_tc, scales, zeros, group_size, bias = inputs
    packed, meta = sparse24_int4_tc.unrepack(codes_tc, meta_tc, scales.shape[0], x.shape[1])
    _setup_sparse24_int4_mm(ctx, (x, packed, meta, scales, zeros, group_size, bias), output)


# --- ops without a useful gradient ------------------------------------------------

_NO_GRAD_ADVICE = {
    "quantize_per_token": "rounding has zero gradient; train in float, or with "
                          "fake quantization (straight-through), then convert",
    "quantize_static": "rounding has zero gradient; calibrate the scale (pyfast.quant."
                       "prepare_static / calibrate) or train with fake quantization "
                       "(pyfast.quant.prepare_qat), then convert",
    "int8_mm": "W8A8 rounds its activations; use Int8WeightOnlyLinear "
               "('int8-weight'), which has exact input gradients, or train in float",
    "w8a8_mm": "W8A8 rounds its activations; use Int8WeightOnlyLinear "
               "('int8-weight'), which has exact input gradients, or train in float",
    "w8a8_mm_vnni": "W8A8 rounds its activations; use Int8WeightOnlyLinear "
                    "('int8-weight'), which has exact input gradients, or train in float",
    "int8_mm_vnni": "W8A8 rounds its activations; use Int8WeightOnlyLinear "
                    "('int8-weight'), which has exact input gradients, or train in float",
    "pack_int4": "packing rounds the weight; pack a trained weight under torch.no_grad()",
    "pack_lowbit": "packing rounds the weight; pack a trained weight under torch.no_grad()",
    "pack_sparse24_int4": "packing rounds the weight; pack a trained weight under "
                          "torch.no_grad()",
    "sparse24_compress": "compression is a re-layout; train the dense or the Sparse24Linear "
                         "values (sparse24_mm has gradients) instead",
    "repack_int4_tc": "repacking is a re-layout of packed integers; repack under torch.no_grad()",
    "repack_int4_ksplit": "repacking is a re-layout of packed integers; repack under "
                          "torch.no_grad()",
    "repack_sparse24_tc": "repacking is a re-layout of integer metadata; repack under "
                          "torch.no_grad()",
    "repack_sparse24_int4_tc": "repacking is a re-layout of int4 codes and integer metadata; "
                               "repack under torch.no_grad()",
    "repack_int8_vnni": "repacking is a re-layout of an int8 weight; repack under "
                        "torch.no_grad()",
}


# The backward of these ops is a call to pyfast::no_gradient, which raises when it runs,
# not a Python raise: torch.compile traces the backward of every op whose input requires
# grad (a LayerNorm before a W8A8 layer) while compiling the forward, and a raise there
# failed the compile of a forward that eager mode runs. Traced, the op's fake returns a
# gradient of the input's shape; run, it raises with the advice, as eager backward does.
@torch.library.custom_op("pyfast::no_gradient", mutates_args=())
def no_gradient(grads: List[Optional[torch.Tensor]], shape: List[int], dtype: torch.dtype,
                op: str) -> torch.Tensor:
    """Raise the RuntimeError of pyfast.<op>'s missing gradient. grads: all the output
    gradients of the backward (all of them, for the data dependency: one may be zeros that
    autograd made, which the compiler could hoist into the forward); shape, dtype: the
    input's."""
    raise RuntimeError(f"pyfast.{op} has no gradient: {_NO_GRAD_ADVICE[op]}")


@no_gradient.register_fake
def _(grads, shape, dtype, op):
    return next(g for g in grads if g is not None).new_empty(shape, dtype=dtype)


def _raising_backward(op: str):
    def backward(ctx, *grads):
        return tuple(None if like is None or not needed else
                     torch.ops.pyfast.no_gradient(list(grads), list(like[0]), like[1], op)
                     for like, needed in zip(ctx.inputs, ctx.needs_input_grad))
    return backward


def _no_setup(ctx, inputs, output):
    """(shape, dtype) of each tensor input, for the gradients no_gradient stands for."""
    ctx.inputs = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None for t in inputs]


def register() -> None:
    reg = torch.library.register_autograd
    reg("pyfast::int8_weight_mm", _backward_int8_weight_mm, setup_context=_setup_int8_weight_mm)
    reg("pyfast::int4_mm", _backward_int4_mm, setup_context=_setup_int4_mm)
    reg("pyfast::lowbit_mm", _backward_lowbit_mm, setup_context=_setup_lowbit_mm)
    reg("pyfast::sparse24_mm", _backward_sparse24_mm, setup_context=_setup_sparse24_mm)
    reg("pyfast::sparse24_int4_mm", _backward_sparse24_int4_mm,
        setup_context=_setup_sparse24_int4_mm)
    # the saved tensors are canonical, so the backward formulas are the ones above
    reg("pyfast::int4_mm_tc", _backward_int4_mm, setup_context=_setup_int4_mm_tc)
    reg("pyfast::int4_mm_ksplit", _backward_int4_mm, setup_context=_setup_int4_mm_ksplit)
    reg("pyfast::sparse24_mm_tc", _backward_sparse24_mm, setup_context=_setup_sparse24_mm_tc)
    reg("pyfast::sparse24_int4_mm_tc", _backward_sparse24_int4_mm,
        setup_context=_setup_sparse24_int4_mm_tc)
    for op in _NO_GRAD_ADVICE:
        reg(f"pyfast::{op}", _raising_backward(op), setup_context=_no_setup)
