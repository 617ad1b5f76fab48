"""2:4 sparse + int4 weight matmul in Triton: out = x @ W.T + bias, W given as codes.

    sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias)
W [N, K] is 2:4 sparse along K and its kept values are group-wise int4 codes
(pyfast/formats.py, "2:4 sparsity + int4"):
    packed [N, K/4] uint8  byte j = the codes of group j's two kept values
                           (low nibble the first, high nibble the second)
    meta   [N, K/8] uint8  group j's 2:4 nibble at bits 4 (j % 2) of byte j // 2;
                           in the nibble, bits 0-1 / 2-3 = position of kept value 0 / 1
    scales, zeros [N, G]   group g = dense k // group_size
    W[n, 4j + idx_i] = (q_i - zeros[n, g]) * scales[n, g]; the two other k of group j are 0.
The kernel reads about 3 bits per dense weight plus the scales (0.77x int4_mm's bytes
at group 128, 0.19x fp16's): at small M, where the matmul is bound by reading the
weight, that is the whole point.

Each K tile multiplies the kept values, dequantized in registers with int4_mm's integer
trick (kernels/weight_only.py): q - zero, an integer in [-15, 15] that is exact in
float16/bfloat16; the scale multiplies the float32 dot AFTER it (BLOCK_K divides the
group, so a K tile lies in one group), or once in the epilogue for one group per row.
So no weight is rounded to 16 bits and every rounding is a float32 one until the final
cast -- the reference's weight, (q - zero) * scale in float32, times x. Loads are
k-major like int4_mm's, so the per-row zero points and scales lie along their second
axis.
    codes [BLOCK_K/4, BLOCK_N]  byte per group  -> c0 = (b & 15) - z, c1 = (b >> 4) - z
                                (kept values only; _common.int4_minus_zero)
    meta  [BLOCK_K/8, BLOCK_N]  each byte loaded once, repeated for its two groups
                                in registers, shifted by 4 (j % 2) -> group j's nibble
Then, for BLOCK_K >= 64, sparse24_mm's four dots of depth BLOCK_K / 4, one per position
p in the groups (_common.sparse24_dots: position p of group j holds c0 or c1 or 0, as
its nibble says, the format's idx0 < idx1 used to save selects); sm_80 / sm_90 SASS of
every autotune config, against the dense tile below: loops 8-48% shorter, and on the
mma.sync tiles no 16-bit shared-memory store per dense value (wgmma tiles read the
weight from shared memory either way); the float16 grouped 128 x 64 and 128 x 128
tiles gained 4-41 spill instructions (up to 19 in the loop; scripts/triton_sass.py,
ahead of time, not timed). For BLOCK_K = 16 or 32
(the only K tiles for group size 32; four dots would be below tl.dot's K = 16) the dense
[BLOCK_K, BLOCK_N] tile, broadcast over p:
    w[j, p, n] = c0 if idx0 == p, c1 if idx1 == p, else 0   -> one tl.dot
Every load is contiguous along k (16-byte vectors where the alignment allows). No meta
byte can make the kernel read outside its tile; a nibble that breaks the format
(idx0 >= idx1) gives unspecified sums, as on the other backends.

Tensor cores, split-K at M <= SMALL_M (deterministic, no atomics), the workspace and
its reduction kernel, the configs and the launcher are int4_mm's (weight_only.py):
this kernel differs from it only in how a weight tile is loaded and expanded.
Under the Triton interpreter bfloat16 tl.dot is wrong (upstream bug): bfloat16 CPU
inputs are refused there, and the tests upcast them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ._common import config_subset, int4_minus_zero, sparse24_dots
from .weight_only import (_KEY, _check_config, _configs, _epilogue_store, _fits_groups,
                          _group_params, _int4_spec, _interpreted_bf16, _k_block_range,
                          _launch, _store_partial, _tile_ids)

Tensor = torch.Tensor

__all__ = ["sparse24_int4_mm", "supports_sparse24_int4_mm", "PTX_SPECS"]


@triton.jit
def _sparse24_int4_mm_kernel(
    # Pointers.
    x_ptr,       # [M, K] float32/float16/bfloat16, any strides
    p_ptr,       # [N, K/4] uint8: byte j = q0 | q1 << 4, the kept codes of group j
    meta_ptr,    # [N, K/8] uint8: byte j = nibble(group 2j) | nibble(group 2j+1) << 4
    scale_ptr,   # [N, G] any float dtype
    zero_ptr,    # [N, G] uint8, 0..15
    bias_ptr,    # [N] any float dtype (read only when HAS_BIAS)
    out_ptr,     # [M, N] x.dtype, written when not USE_WORKSPACE
    ws_ptr,      # [MAX_SPLIT_K, M, N] float32 partial sums, written when USE_WORKSPACE
    split_ptr,   # [1] int32, gets SPLIT_K when USE_WORKSPACE
    # Sizes; K is a multiple of 8; GROUP_SIZE is the group length in dense k (K itself
    # for per channel); K_PACKED = K / 4, the code bytes of a row (an argument of its
    # own for the JIT's divisibility hint, as in int4_mm).
    M, N, K, GROUP_SIZE, K_PACKED,
    # Strides, in elements; stride_ws = M * N, between the workspace's split slices.
    stride_ws,
    stride_xm, stride_xk,
    stride_pn, stride_pk,
    stride_mn, stride_mk,
    stride_sn, stride_sg,
    stride_zn, stride_zg,
    stride_bias,
    stride_om, stride_on,
    # Meta-parameters.
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,         # G == 1: scale applied once, in the epilogue
    USE_WORKSPACE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,           # power of 2, >= 16; divides GROUP_SIZE unless ONE_GROUP
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    QK: tl.constexpr = BLOCK_K // 4   # groups of 4 per K tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, QK)
    offs_b = tl.arange(0, QK // 2)   # the tile's meta bytes (two groups each)
    # A tile starts at an even group (BLOCK_K >= 16, a power of 2): group j's meta nibble is
    # byte j // 2 of the tile, shifted by 4 for odd j.
    meta_shift = ((offs_j % 2) * 4)[:, None]
    pos = tl.arange(0, 4)[None, :, None]                                # [1, 4, 1]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm          # [BLOCK_M, 1]
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn          # [1, BLOCK_N]
    m_cols = meta_ptr + offs_n.to(tl.int64)[None, :] * stride_mn       # [1, BLOCK_N]
    mask_m = offs_m[:, None] < M
    mask_n1 = offs_n < N
    mask_n = mask_n1[None, :]

    if ONE_GROUP:  # the zero point of the row, loaded once
        zero = tl.load(zero_ptr + offs_n * stride_zn, mask=mask_n1, other=0).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _k_block_range(K, BLOCK_K, SPLIT_K)
    for kb in range(first, last):
        k0 = kb * BLOCK_K
        k = k0 + offs_k
        j = k0 // 4 + offs_j                                             # global group
        # K tail: K % 8 == 0, so a group (and a meta byte) is wholly inside K or
        # wholly outside; masked groups read code 0 and meta 0, and meet x = 0.
        # k * stride in int64 (here and for j, b below): for a transposed view (stride =
        # M or N) it can pass 2**31. Unit strides are constexpr 1 on the contiguous path.
        x = tl.load(x_rows + k.to(tl.int64)[None, :] * stride_xk, mask=mask_m & (k[None, :] < K),
                    other=0.0)
        # Codes and meta are loaded k-major, [groups, BLOCK_N] like int4_mm's tile, so
        # that the per-row zero points and scales run along their second axis.
        codes = tl.load(p_cols + j.to(tl.int64)[:, None] * stride_pk,
                        mask=(j[:, None] < K_PACKED) & mask_n, other=0)  # [QK, BLOCK_N] uint8
        # Each meta byte is loaded once, [QK / 2, BLOCK_N], and repeated for its two
        # groups in registers. (Loading byte j // 2 per group instead made every meta
        # load a scalar ld.global.b8: the addresses repeat, so nothing vectorises.)
        b = k0 // 8 + offs_b
        meta = tl.load(m_cols + b.to(tl.int64)[:, None] * stride_mk,
                       mask=(b[:, None] < K_PACKED // 2) & mask_n, other=0)
        meta = tl.reshape(tl.broadcast_to(meta[:, None, :], (QK // 2, 2, BLOCK_N)), (QK, BLOCK_N))
        if ONE_GROUP:
            z = zero[None, :]
        else:
            g = k0 // GROUP_SIZE  # the whole tile lies in group g
            z, scale_g = _group_params(zero_ptr, scale_ptr, offs_n, mask_n1,
                                       stride_zn, stride_zg, stride_sn, stride_sg, g)
            z = z[None, :]
        # The kept values only (a quarter of the dense tile) are dequantized, in x's dtype.
        c0, c1 = int4_minus_zero(codes, z, x.dtype)                     # [QK, BLOCK_N] each
        # ONE_GROUP: the dots add into acc; else into a fresh tile, scaled after.
        into = acc if ONE_GROUP else tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if QK >= 16:
            # Four dots of depth QK, one per position in the groups (sparse24_mm's,
            # _common.sparse24_dots): no dense tile. The nibbles stay uint8 (as int32 the
            # loops were about 15% longer, sm_80 / sm_90 SASS).
            nib = (meta >> meta_shift.to(tl.uint8)) & 15                 # [QK, BLOCK_N]
            part = sparse24_dots(into, x, c0, c1, nib, BLOCK_M, QK, INPUT_PRECISION)
        else:
            # BLOCK_K = 16 or 32 (group size 32), too shallow for four dots on a GPU
            # (tl.dot's K >= 16): the dense tile, by a broadcast over the position p and
            # one reshape (not tl.join: sm_90's dot-operand hoisting aborts on a joined
            # operand, "Illegal shared layout", in Triton 3.7).
            meta = meta.to(tl.int32) >> meta_shift
            idx0 = (meta & 3)[:, None, :]
            idx1 = ((meta >> 2) & 3)[:, None, :]
            w = tl.where(idx0 == pos, c0[:, None, :],
                         tl.where(idx1 == pos, c1[:, None, :], 0.0).to(x.dtype))
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))                       # k = 4j + p
            part = tl.dot(x, w, into, input_precision=INPUT_PRECISION)
        if ONE_GROUP:
            acc = part
        else:
            acc += part * scale_g[None, :]

    if USE_WORKSPACE:
        _store_partial(acc, offs_m, offs_n, M, N, ws_ptr, stride_ws, split_ptr, SPLIT_K)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, scale_ptr, stride_sn, bias_ptr, stride_bias,
                        out_ptr, stride_om, stride_on, ONE_GROUP, HAS_BIAS)


# int4_mm's configs: every BLOCK_K there (32, 64, 128) holds whole meta bytes (8 k each).
_TUNED = {small: triton.autotune(config_subset(_configs(small, int4=True)),
                                 key=_KEY + ["GROUP_SIZE"],
                                 prune_configs_by={"early_config_prune": _fits_groups}
                                 )(_sparse24_int4_mm_kernel)
          for small in (True, False)}


def supports_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None) -> Optional[str]:
    return _interpreted_bf16(x)


def sparse24_int4_mm(x: Tensor, packed: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor,
                     group_size: int, bias: Optional[Tensor] = None, *,
                     config: Optional[Dict] = None) -> Tensor:
    """x [M, K] float (any strides), packed uint8 [N, K/4], meta uint8 [N, K/8],
    scales [N, G], zeros uint8 [N, G], group_size 32/64/128/-1, bias [N] or None
    -> [M, N] x.dtype. `config` (tests, tuning) bypasses the autotuner, as in int4_mm."""
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    gs = k if group_size == -1 else group_size
    if config is not None:
        _check_config(config, gs, k)
        if config["BLOCK_K"] < 16:  # powers of two from 16 on: whole meta bytes too
            raise ValueError(f"config BLOCK_K = {config['BLOCK_K']} must be at least 16 "
                             "(tl.dot's smallest K on the GPU)")
    if k == 0:  # an empty sum: out = bias, as the reference (G = 0: there is no scales[:, 0])
        return out.zero_() if bias is None else out.copy_(bias.float().expand(m, n))
    one_group = k <= gs

    def kernel_args(bias_arg, ws, split, stride_ws):
        return (x, packed, meta, scales, zeros, bias_arg, out, ws, split, m, n, k, gs, k // 4,
                stride_ws,
                x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
                meta.stride(0), meta.stride(1),
                scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
                0 if bias is None else bias.stride(0), out.stride(0), out.stride(1))

    return _launch(_TUNED, config, kernel_args, {"ONE_GROUP": one_group}, out, x,
                   scales[:, 0] if one_group else None, bias)


# --- ahead-of-time compile specs (tests/test_triton_ptx.py; see weight_only.py) -------------

def _ptx_spec(name, ty, one_group, block_m, block_n, block_k, split_k=1, num_warps=4):
    return _int4_spec(name, ty, one_group, block_m, block_n, block_k, split_k,
                      kernel=_sparse24_int4_mm_kernel, with_meta=True, num_warps=num_warps)


PTX_SPECS = [
    _ptx_spec("sparse24_int4_mm_fp16_grouped", "fp16", False, 64, 128, 64),
    _ptx_spec("sparse24_int4_mm_bf16_grouped", "bf16", False, 128, 128, 32, num_warps=8),
    _ptx_spec("sparse24_int4_mm_fp16_per_channel", "fp16", True, 64, 128, 64),
    _ptx_spec("sparse24_int4_mm_bf16_grouped_splitk", "bf16", False, 16, 64, 128, split_k=8),
]
