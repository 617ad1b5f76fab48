"""GPTQ: post-training weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", Algorithm 1. For a linear layer with
calibration inputs X [rows, K], GPTQ minimises ||X W^T - X W_q^T||^2 row by row of W:
it quantizes the columns of W one at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian H^-1, H = 2 X^T X
(averaged over rows). It works in blocks of `block_size` columns so that the update of
the remaining columns is one matrix product per block ("lazy batch updates"), and reads
H^-1 through its upper Cholesky factor (numerically stable form of the row updates).

The result is exactly the pyfast int4 format (Int4Linear) or the int2 format
(LowBitLinear), layouts in pyfast/formats.py: every group's scale and zero point are
computed by the same function as pack_int4 / pack_lowbit (reference.affine_params),
from the error-updated weights of the group when the group starts.

Calibration is sequential: layers are quantized in module order (model.named_modules(),
the execution order of nn.Sequential and of typical blocks), and each layer's H is
collected by running the calibration batches through the model as it is then, with
the earlier layers already quantized, so each layer compensates the error of the ones
before it (the paper's setup). That costs one forward pass over the calibration data
per layer, and needs only one K x K H in memory at a time. Only nn.Linear layers are
quantized (Conv2d is not: pyfast has no compressed conv layer).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .. import _checks as chk
from .. import _progress, _torch_fastpath, reference
from ..api import (Filter, _matcher, _param_holders, _tied_reason, _walk, _why_not_linear,
                   positions, replace_module)
from ..nn import Int4Linear, LowBitLinear

Tensor = torch.Tensor
GPTQ_BITS = (4, 2)


def _check_options(bits, group_size, symmetric, damp, block_size, act_order) -> None:
    chk.int_arg("bits", bits)        # 4.0 == 4 would pass the test below
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits {bits!r} is not supported by GPTQ; accepted: 4 (Int4Linear) "
                         "or 2 (LowBitLinear, int2)")
    chk.group_size(group_size, 4 * abs(group_size) if isinstance(group_size, int) else 0,
                   bits=bits)   # validates the value itself
    for name, v in (("symmetric", symmetric), ("act_order", act_order)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if bits == 2 and symmetric:
        raise ValueError("symmetric=True is not available for bits=2: int2 weights are "
                         "asymmetric (pyfast/formats.py); pass symmetric=False")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (
            damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a finite number >= 0 (the fraction of mean(diag H) "
                         f"added to H's diagonal), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if group_size != -1 and not act_order and block_size % group_size:
        raise ValueError(f"block_size {block_size} is not a multiple of group_size {group_size}; "
                         "each group must lie in one block, so that its scale is computed "
                         "from its error-updated weights")


def gptq_weight(weight: Tensor, hessian: Tensor, *, bits: int = 4, group_size: int = 128,
                symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                act_order: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Alg. 1) of one weight [N, K] given H [K, K] = 2 X^T X / rows.

    Returns (q uint8 [N, K] codes 0..2**bits-1, scales float32 [N, G], zeros uint8 [N, G]);
    the quantized weight is (q - zeros) * scales group-wise (formats.py). act_order
    quantizes the columns by decreasing H_ii; the groups are then fixed up front from the
    original weights ("static groups" of the GPTQ code), since their columns are no longer
    quantized together. Inputs that were always 0 (H_ii = 0) get a zero weight; the
    damping is damp * mean(H_ii) over the other inputs, so the result is the same for
    H and c * H (inputs X and sqrt(c) * X).
    """
    _check_options(bits, group_size, symmetric, damp, block_size, act_order)
    chk.tensor("weight", weight, dtypes=chk.FLOAT_DTYPES, dim=2)
    n, k = weight.shape
    chk.tensor("hessian", hessian, dtypes=chk.FLOAT_DTYPES, dim=2)
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected ({k}, {k}), "
                         f"K x K for a weight with K = {k} inputs")
    gs = chk.group_size(group_size, k, k_name="weight.shape[1] (K)", bits=bits)
    if not bool(weight.isfinite().all()):
        raise ValueError("weight holds NaN or infinite values; GPTQ needs a finite weight")
    maxq, groups = 2 ** bits - 1, k // gs
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone().to(w.device)
    if not bool(h.isfinite().all()):
        raise ValueError("hessian holds NaN or infinite values; GPTQ needs a finite H "
                         "(from finite calibration inputs)")
    # Inputs that were always 0 (dead ReLU units, padding): their weight is irrelevant.
    # They get the live inputs' mean diagonal, so that mean(diag H), and with it the
    # damping, scales with H: the result is the same for inputs X and c * X.
    dead = torch.diag(h) == 0
    live = torch.diag(h)[~dead]
    h[dead, dead] = live.mean() if live.numel() else 1.0
    w[:, dead] = 0
    static = act_order or group_size == -1
    if static:
        scales, zeros = reference.affine_params(w.reshape(n, groups, gs), maxq, symmetric)
    else:
        scales = w.new_empty(n, groups)
        zeros = w.new_empty(n, groups)
    perm = (torch.argsort(torch.diag(h), descending=True) if act_order
            else torch.arange(k, device=w.device))
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0 or not bool(chol.isfinite().all()):
        raise ValueError(f"H + damp * mean(diag H) * I is not positive definite (damp = {damp}); "
                         "raise damp or calibrate on more data")
    group_of = perm // gs                  # group of each (permuted) column
    q = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, err1, u1 = w[:, i1:i2].clone(), w.new_zeros(n, i2 - i1), chol[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:   # a group starts: params from current weights
                s, z = reference.affine_params(w1[:, i:i + gs], maxq, symmetric)
                scales[:, col // gs], zeros[:, col // gs] = s, z
            g = int(group_of[col])
            s, z = scales[:, g], zeros[:, g]
            code = reference.affine_codes(w1[:, i], s, z, maxq)
            q[:, col] = code
            err = (w1[:, i] - (code - z) * s) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ chol[i1:i2, i2:]      # the lazy batch update of later columns
    q = q[:, torch.argsort(perm)]
    return q.to(torch.uint8), scales, zeros.to(torch.uint8)


def _calibration_inputs(batches) -> List[Tensor]:
    if isinstance(batches, Tensor):
        return [batches]          # one batch
    try:
        items = list(batches)
    except TypeError:
        raise TypeError("batches must be an iterable of tensors or (x, y) tuples, got "
                        f"{type(batches).__name__}") from None
    out = []
    for i, b in enumerate(items):
        x = b[0] if isinstance(b, (tuple, list)) and len(b) else b
        if not isinstance(x, Tensor):
            raise TypeError(f"batches[{i}] must be a tensor or an (x, y) tuple whose first item "
                            f"is the model input tensor, got {type(b).__name__}")
        out.append(x)
    if not out:
        raise ValueError("batches is empty; GPTQ needs calibration inputs "
                         "(an iterable of tensors or (x, y) tuples)")
    return out


def collect_hessian(model: nn.Module, layer: nn.Linear, inputs: Iterable[Tensor]) -> Tuple[Tensor, int]:
    """H = 2 X^T X / rows [K, K] float32 of `layer`'s inputs while `model` runs on each
    input (forward pre-hook; every call of the layer counts), and the number of rows."""
    k = layer.in_features
    h = torch.zeros(k, k, device=layer.weight.device)
    rows = [0]

    def hook(mod, args):
        x = args[0].detach().reshape(-1, k).float()
        h.addmm_(x.T, x)
        rows[0] += x.shape[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            model(x)
    finally:
        handle.remove()
    return h * (2.0 / max(rows[0], 1)), rows[0]


def _build(lin: nn.Linear, q: Tensor, scales: Tensor, zeros: Tensor, bits: int,
           group_size: int, symmetric: bool) -> nn.Module:
    bias = None if lin.bias is None else lin.bias.detach()
    if bits == 2:
        layer = LowBitLinear.from_quantized(q, scales, zeros, 2, group_size, bias)
    else:
        layer = Int4Linear(lin.in_features, lin.out_features, bias is not None,
                           group_size=group_size, symmetric=symmetric, device=q.device)
        layer.packed.copy_(reference.pack_nibbles(q))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias = bias.clone()
    layer.orig_dtype = lin.weight.dtype
    return layer


def gptq_quantize(model: nn.Module, batches, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, include: Filter = None, exclude: Filter = None,
                  progress: Optional[bool] = None) -> nn.Module:
    """Replace nn.Linear layers of `model` by GPTQ-quantized ones, in place; returns model.

    batches: calibration inputs, an iterable of tensors or (x, y) tuples (x is fed to
    the model; kept in a list, since every layer runs them again), or one tensor, which
    is one batch (as in pyfast.quant.calibrate).
    bits 4 -> Int4Linear (symmetric or not), bits 2 -> LowBitLinear (int2, asymmetric);
    group_size 32/64/128/-1; damp: fraction of mean(diag H) added to H's diagonal
    (the mean over inputs that are not always 0, so scaling the inputs changes nothing);
    block_size: columns per lazy batch update (a multiple of group_size unless act_order);
    act_order: quantize columns by decreasing H_ii. include/exclude as pyfast.quantize.
    Layers whose in_features the format cannot take, or that no calibration batch
    reaches, stay as they are, with the reason in model.pyfast_skipped. The model runs
    in eval mode during calibration (its mode is restored). If a layer fails (e.g. H not
    positive definite, NaN inputs) or the run is interrupted (Ctrl-C), the layers already
    quantized are put back as they were and model.pyfast_skipped is restored before the
    error propagates: the model is as it was, and the call can be retried.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_options(bits, group_size, symmetric, damp, block_size, act_order)
    inputs = _calibration_inputs(batches)
    inc, exc = _matcher(include, "include", True), _matcher(exclude, "exclude", False)
    parents = {id(c): m for m in model.modules() for c in m.children()}
    holders = _param_holders(model)
    total = sum(1 for name, m in model.named_modules() if isinstance(m, nn.Linear)
                and inc(name, m) and not exc(name, m)
                and _why_not_linear(name, m, parents.get(id(m))) is None
                and _tied_reason(m, holders) is None)   # the layers _walk will convert
    bar = _progress.bar(total=total, desc=f"gptq int{bits}", progress=progress)

    def convert(name: str, lin: nn.Linear):
        bar.set_postfix_str(name)
        try:
            return quantize_one(name, lin)
        finally:
            bar.update(1)

    def quantize_one(name: str, lin: nn.Linear):
        try:
            chk.group_size(group_size, lin.in_features, k_name="in_features", bits=bits)
        except ValueError as err:
            return f"{err} (GPTQ int{bits})"
        h, rows = collect_hessian(model, lin, inputs)
        if rows == 0:
            return "no calibration batch reached it (GPTQ needs its inputs)"
        if not bool(h.isfinite().all()):
            raise ValueError(f"the calibration inputs of layer {name!r} contain NaN/inf (or "
                             "values whose squares overflow float32), so its Hessian "
                             "2 X^T X / rows is not finite and no damp can help; calibrate "
                             "on finite data")
        try:
            q, scales, zeros = gptq_weight(lin.weight, h, bits=bits, group_size=group_size,
                                           symmetric=symmetric, damp=damp,
                                           block_size=block_size, act_order=act_order)
        except ValueError as err:
            raise ValueError(f"GPTQ of layer {name!r}: {err}") from None
        return _build(lin, q, scales, zeros, bits, group_size, symmetric)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _restored_on_error(model):
            return _walk(model, include, exclude, convert,
                         is_target=lambda m: isinstance(m, nn.Linear))
    finally:
        model.train(was_training)
        bar.close()


@contextlib.contextmanager
def _restored_on_error(model: nn.Module) -> Iterator[None]:
    """If the body raises (Ctrl-C included), put every nn.Linear back at each of its
    names, restore model.pyfast_skipped and the Transformer fast-path flags that putting
    a pyfast layer in turned off, then re-raise: the model is as it was found."""
    linears = positions(model, lambda m: isinstance(m, nn.Linear))
    fast_path = [(m, attr, getattr(m, attr)) for m in model.modules()
                 for cls, attr, _ in _torch_fastpath.FLAGS
                 if isinstance(m, cls) and hasattr(m, attr)]
    missing = object()
    skipped = model.__dict__.get("pyfast_skipped", missing)
    try:
        yield
    except BaseException:
        for lin, names in linears.values():
            for name in names:
                if name and model.get_submodule(name) is not lin:
                    replace_module(model, [name], lin)
        for mod, attr, value in fast_path:
            setattr(mod, attr, value)
        if skipped is missing:
            model.__dict__.pop("pyfast_skipped", None)
        else:
            model.pyfast_skipped = skipped
        raise

