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
    return q.contiguous(), scale   # contiguous whatever x's strides, as the fake says (ops.py)


def safe_scale(span: Tensor, levels: float) -> Tensor:
    """span / levels, but 1.0 where that is 0 (all-zero group, or a subnormal span
    that underflows) and NaN where span is NaN, so a NaN input shows in the output."""
    # A tensor divisor, not a Python float: PyTorch's CUDA division by a CPU scalar
    # multiplies by its reciprocal, which differs from span / levels in the last bit for
    # some spans (seen on an H100), while every pyfast kernel divides (IEEE, rounded once).
    scale = span / torch.full_like(span, levels)
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
    return q.contiguous(), rows.contiguous()


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


def w8a8_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """W8A8 in one op: x quantized per token (quantize_per_token), then int8_mm
    with its scale, out in x.dtype. Defined as exactly that composition."""
    q, q_scale = quantize_per_token(x)
    return int8_mm(q, w_int8, q_scale, w_scale, bias, x.dtype)


def int8_weight_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                   bias: Optional[Tensor]) -> Tensor:
    out = F.linear(x.float(), w_int8.float()) * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- int4 -------------------------------------------------------------------

def affine_params(g: Tensor, maxq: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Group parameters of the integer formats (formats.py) from float32 g [..., gs]:
    (scales float32 [...], zeros float32 [...], integer-valued). maxq = 15 (int4) or
    3 (int2); symmetric (int4 only): scale amax / 7, zero 8. Shared with GPTQ, so its
    scales are computed exactly as the pack ops compute them."""
    if symmetric:
        scales = safe_scale(g.abs().amax(dim=-1), float(maxq // 2))
        return scales, torch.full_like(scales, float(maxq // 2 + 1))
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    span = hi - lo
    # a finite range wider than float32's maximum (hi - lo = inf, |w| > 1.7e38) has the
    # finite scale hi / maxq - lo / maxq; elsewhere (hi - lo) / maxq, rounded as before
    wide = torch.isinf(span) & torch.isfinite(hi) & torch.isfinite(lo)
    scales = torch.where(wide, hi / maxq - lo / maxq, safe_scale(span, float(maxq)))
    zeros = torch.round(-lo / scales).nan_to_num_(0.0).clamp_(0, maxq)
    return scales, zeros


def affine_codes(w: Tensor, scales: Tensor, zeros: Tensor, maxq: int) -> Tensor:
    """q = clamp(round(w / scale) + zero, 0, maxq) as float32 (NaN -> 0); shapes broadcast."""
    return (torch.round(w / scales) + zeros).nan_to_num_(0.0).clamp_(0, maxq)


def pack_int4(w: Tensor, group_size: int, symmetric: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float -> (packed uint8 [N, K/2], scales float32 [N, G], zeros uint8 [N, G])."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = w.float().reshape(n, k // gs, gs)
    scales, zeros = affine_params(g, 15, symmetric)
    q = affine_codes(g, scales[:, :, None], zeros[:, :, None], 15)
    return pack_nibbles(q.to(torch.uint8).reshape(n, k)), scales, zeros.to(torch.uint8)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [N, K] with values 0..15 -> uint8 [N, K/2], low nibble = even k."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] with values 0..15."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], 2 * packed.shape[1])


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


# --- int2 and binary (pack_lowbit, lowbit_mm) -------------------------------------------

def pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 [N, K] with values < 2**bits -> uint8 [N, K*bits/8], low bits = lowest k."""
    n, k = q.shape
    per = 8 // bits
    g = q.reshape(n, k // per, per)
    out = torch.zeros(n, k // per, dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= g[:, :, i] << (i * bits)
    return out


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """uint8 [N, K*bits/8] -> uint8 [N, K] with values 0 .. 2**bits - 1."""
    per = 8 // bits
    parts = [(packed >> (i * bits)) & (2 ** bits - 1) for i in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)


def binary_scales(g: Tensor) -> Tensor:
    """XNOR-Net's L2-optimal scale mean(|w|) over the last dim of g, as float32; 0 for an
    all-zero group (which then dequantizes to 0), NaN for a group holding a NaN. Summed
    in float64, so the result does not depend on the summation order (memory layout,
    threads) and cannot overflow where the mean itself fits in float32."""
    return g.double().abs().mean(dim=-1).float()


def pack_lowbit(w: Tensor, bits: int, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """w [N, K] float -> (packed uint8 [N, K*bits/8], scales float32 [N, G],
    zeros uint8 [N, G] for bits 2, [N, 0] for bits 1)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = w.float().contiguous().reshape(n, k // gs, gs)
    if bits == 1:
        q = (g >= 0).to(torch.uint8).reshape(n, k)
        scales = binary_scales(g)
        zeros = torch.zeros(n, 0, dtype=torch.uint8, device=w.device)
        return pack_bits(q, 1), scales, zeros
    scales, zeros = affine_params(g, 3, False)
    q = affine_codes(g, scales[:, :, None], zeros[:, :, None], 3)
    return pack_bits(q.to(torch.uint8).reshape(n, k), 2), scales, zeros.to(torch.uint8)


def dequantize_lowbit(packed: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                      group_size: int) -> Tensor:
    """The float32 weight [N, K] that lowbit_mm multiplies by."""
    q = unpack_bits(packed, bits).float()
    n, k = q.shape
    gs = k if group_size == -1 else group_size
    g = q.reshape(n, k // gs, gs)
    if bits == 1:
        w = (2 * g - 1) * scales.float()[:, :, None]
    else:
        w = (g - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(n, k)


def lowbit_mm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bits: int,
              group_size: int, bias: Optional[Tensor]) -> Tensor:
    w = dequantize_lowbit(packed, scales, zeros, bits, group_size)
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


# --- 2:4 sparsity + int4 values -----------------------------------------------------------

def pack_sparse24_int4(w: Tensor, group_size: int,
                       symmetric: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """w [N, K] (already 2:4) -> (packed uint8 [N, K/4], meta uint8 [N, K/8],
    scales float32 [N, G], zeros uint8 [N, G]): int4's group parameters of the dense
    groups, applied to the kept values only."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wf = w.float()
    scales, zeros = affine_params(wf.reshape(n, k // gs, gs), 15, symmetric)
    values, meta = sparse24_compress(wf)
    # kept value i lies in dense group (4 * (i // 2)) // gs = i // (gs / 2)
    q = affine_codes(values.reshape(n, k // gs, gs // 2), scales[:, :, None],
                     zeros[:, :, None], 15)
    packed = pack_nibbles(q.to(torch.uint8).reshape(n, k // 2))
    return packed, pack_nibbles(meta), scales, zeros.to(torch.uint8)


def dequantize_sparse24_int4(packed: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor,
                             group_size: int) -> Tensor:
    """The float32 dense weight [N, K] that sparse24_int4_mm multiplies by."""
    q = unpack_nibbles(packed).float()   # [N, K/2]
    n, half = q.shape
    k = 2 * half
    gs = k if group_size == -1 else group_size
    g = q.reshape(n, k // gs, gs // 2)
    values = (g - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return sparse24_decompress(values.reshape(n, half), unpack_nibbles(meta))


def sparse24_int4_mm(x: Tensor, packed: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor,
                     group_size: int, bias: Optional[Tensor]) -> Tensor:
    w = dequantize_sparse24_int4(packed, meta, scales, zeros, group_size)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


# --- kernel layouts (repack once at layer creation; pyfast/layouts) ------------------
# The CUDA kernels read the weights in fragment order, the CPU int8 kernel in VNNI
# panel order, the CPU int4 kernel (optionally) in K chunks. The reference of each matmul
# on a repacked weight undoes the repack (an exact permutation) and runs the canonical
# reference above, so it is the same oracle; it is slow by design (one unrepack per
# call) and is only the fallback where the layout's kernel cannot run.

# (pyfast.layouts imports this module for the canonical helpers, hence the local imports)
def repack_int4_tc(packed: Tensor) -> Tensor:
    from .layouts import int4_tc
    return int4_tc.repack(packed)


def int4_mm_tc(x: Tensor, w_tc: Tensor, scales: Tensor, zeros: Tensor,
               group_size: int, bias: Optional[Tensor]) -> Tensor:
    from .layouts import int4_tc
    packed = int4_tc.unrepack(w_tc, scales.shape[0], x.shape[1])
    return int4_mm(x, packed, scales, zeros, group_size, bias)


def repack_int4_ksplit(packed: Tensor, chunks: int, group_size: int) -> Tensor:
    from .layouts import int4_ksplit
    return int4_ksplit.repack(packed, chunks)


def int4_mm_ksplit(x: Tensor, w_ks: Tensor, scales: Tensor, zeros: Tensor,
                   group_size: int, bias: Optional[Tensor]) -> Tensor:
    from .layouts import int4_ksplit
    return int4_mm(x, int4_ksplit.unrepack(w_ks), scales, zeros, group_size, bias)


def repack_sparse24_tc(meta: Tensor) -> Tensor:
    from .layouts import sparse24_tc
    return sparse24_tc.repack_meta(meta)


def sparse24_mm_tc(x: Tensor, values: Tensor, meta_tc: Tensor, bias: Optional[Tensor]) -> Tensor:
    from .layouts import sparse24_tc
    meta = sparse24_tc.unrepack_meta(meta_tc, values.shape[0], x.shape[1])
    return sparse24_mm(x, values, meta, bias)


def repack_sparse24_int4_tc(packed: Tensor, meta: Tensor) -> Tuple[Tensor, Tensor]:
    from .layouts import sparse24_int4_tc
    return sparse24_int4_tc.repack(packed, meta)


def sparse24_int4_mm_tc(x: Tensor, codes_tc: Tensor, meta_tc: Tensor, scales: Tensor,
                        zeros: Tensor, group_size: int, bias: Optional[Tensor]) -> Tensor:
    from .layouts import sparse24_int4_tc
    packed, meta = sparse24_int4_tc.unrepack(codes_tc, meta_tc, scales.shape[0], x.shape[1])
    return sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias)


def repack_int8_vnni(w_int8: Tensor) -> Tensor:
    from .layouts import int8_vnni
    return int8_vnni.repack(w_int8)


def w8a8_mm_vnni(x: Tensor, w_vnni: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    from .layouts import int8_vnni
    return w8a8_mm(x, int8_vnni.unrepack(w_vnni, w_scale.shape[0], x.shape[1]), w_scale, bias)


def int8_mm_vnni(a: Tensor, w_vnni: Tensor, a_scale: Tensor, w_scale: Tensor,
                 bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    from .layouts import int8_vnni
    w = int8_vnni.unrepack(w_vnni, w_scale.shape[0], a.shape[1])
    return int8_mm(a, w, a_scale, w_scale, bias, out_dtype)
