"""The one pure-torch reference of every pyfast op.

Each function here is both the fallback that runs wherever no kernel can (CPU
without the extension, old GPUs, unusual shapes) and the oracle that every
backend is tested against. They favour obviously-correct arithmetic over speed:
int8 products accumulate exactly in int32, everything else is computed in float32 and
cast once at the end. Layouts follow pyfast/formats.py.

Inputs are assumed checked (pyfast.ops checks them before dispatch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --- int8 -------------------------------------------------------------------

def quantize_rows_int8(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric per-row int8: x [R, C] float -> (int8 [R, C], float32 scale [R])."""
    xf = x.float()
    amax = xf.abs().amax(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    scale = safe_scale(amax, 127.0)
    q = torch.round(xf / scale[:, None]).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    return q, scale


def safe_scale(span: Tensor, levels: float) -> Tensor:
    """span / levels, but 1.0 where that is 0 (all-zero group, or a subnormal span
    that underflows) and NaN where span is NaN, so a NaN input shows in the output."""
    scale = span / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(torch.isnan(span), span, scale)


def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    return quantize_rows_int8(x)


def quantize_static(x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """int8 with one calibrated scale: values beyond 127 * scale are clipped (the
    calibration chose that range). Row scales [M] are the scale, NaN for a NaN row."""
    xf = x.float()
    s = scale.float().reshape(())
    q = torch.round(xf / s).nan_to_num_(0.0).clamp_(-127, 127).to(torch.int8)
    nan_row = torch.isnan(xf).any(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0], dtype=torch.bool)
    rows = torch.where(nan_row, torch.full_like(nan_row, float("nan"), dtype=torch.float32),
                       s.expand(xf.shape[0]))
    return q, rows.contiguous()


def int8_matmul_int32(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 a[M,K] @ b[N,K].T.

    On CPU torch._int_mm is exact and takes any shape (10-60x faster than the
    float64 product, which matters when no pyfast kernel is built); on other
    devices it has shape limits, so use float64, exact for K < 2**37."""
    if a.device.type == "cpu" and a.shape[1] > 1:   # torch 2.13's _int_mm is wrong at K = 1
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().T).to(torch.int32)


def int8_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor,
            bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    acc = int8_matmul_int32(a, b).float()
    out = acc * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_weight_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                   bias: Optional[Tensor]) -> Tensor:
    out = F.linear(x.float(), w_int8.float()) * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- int4 -------------------------------------------------------------------

def pack_int4(w: Tensor, group_size: int, symmetric: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float -> (packed uint8 [N, K/2], scales float32 [N, G], zeros uint8 [N, G])."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = w.float().reshape(n, k // gs, gs)
    if symmetric:
        scales = safe_scale(g.abs().amax(dim=2), 7.0)
        zeros = torch.full_like(scales, 8.0)
    else:
        lo = g.amin(dim=2).clamp(max=0.0)
        hi = g.amax(dim=2).clamp(min=0.0)
        scales = safe_scale(hi - lo, 15.0)
        zeros = torch.round(-lo / scales).nan_to_num_(0.0).clamp_(0, 15)
    q = torch.round(g / scales[:, :, None]) + zeros[:, :, None]
    q = q.nan_to_num_(0.0).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return pack_nibbles(q), scales, zeros.to(torch.uint8)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [N, K] with values 0..15 -> uint8 [N, K/2], low nibble = even k."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] with values 0..15."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The float32 weight [N, K] that an int4 matmul multiplies by."""
    q = unpack_nibbles(packed).float()
    n, k = q.shape
    gs = k if group_size == -1 else group_size
    g = q.reshape(n, k // gs, gs)
    w = (g - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(n, k)


def int4_mm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor,
            group_size: int, bias: Optional[Tensor]) -> Tensor:
    w = dequantize_int4(packed, scales, zeros, group_size)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


# --- 2:4 sparsity ---------------------------------------------------------------

def sparse24_violations(w: Tensor) -> Tensor:
    """Bool [N, K/4]: which groups of four hold more than two nonzeros."""
    n, k = w.shape
    return (w.reshape(n, k // 4, 4) != 0).sum(dim=2) > 2


def sparse24_compress(w: Tensor) -> Tuple[Tensor, Tensor]:
    """w [N, K] (already 2:4) -> (values [N, K/2] w.dtype, meta uint8 [N, K/4])."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    nonzero = (g != 0).to(torch.int16)
    # Rank the positions: nonzeros first, then zeros by increasing index
    # (key = 8*nonzero + (3 - index)); keep the top two, in increasing k order.
    key = nonzero * 8 + (3 - torch.arange(4, device=w.device, dtype=torch.int16))
    idx = key.topk(2, dim=2).indices.sort(dim=2).values
    values = g.gather(2, idx).reshape(n, k // 2)
    meta = (idx[:, :, 0] | (idx[:, :, 1] << 2)).to(torch.uint8)
    return values, meta


def sparse24_decompress(values: Tensor, meta: Tensor) -> Tensor:
    """(values [N, K/2], meta uint8 [N, K/4]) -> the dense w [N, K] in values.dtype."""
    n, groups = meta.shape
    m = meta.to(torch.int64)
    idx = torch.stack((m & 3, (m >> 2) & 3), dim=2)
    dense = values.new_zeros(n, groups, 4)
    dense.scatter_(2, idx, values.reshape(n, groups, 2))
    return dense.reshape(n, groups * 4)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = sparse24_decompress(values, meta).float()
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)
