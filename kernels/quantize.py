"""Triton kernels of quantize_per_token (symmetric per-row int8, fused in one kernel)
and of quantize_static (one calibrated scale; at the end of the file).

    x [M, K] float32/float16/bfloat16, any strides
    -> q     int8    [M, K] contiguous   round-half-to-even(x / scale) clamped to [-127, 127]
       scale float32 [M]                 amax(|x[m, :]|) / 127; 1.0 where that is 0; NaN for a
                                         row holding a NaN (its q are 0)
Layout and rounding rules: pyfast/formats.py. The result is bit-identical to
pyfast/reference.py (quantize_rows_int8), which is the oracle in the tests:
- every value is widened to float32 first (exact for fp16/bf16; bf16 by its bits,
  since the interpreter's bf16 -> fp32 cast is wrong for subnormals);
- the divisions are IEEE round-to-nearest (tl.div_rn -> div.rn.f32; a plain `/`
  on float32 becomes the approximate div.full.f32 on NVIDIA GPUs);
- round-half-to-even is the "magic number" addition: for |v| <= 2**22,
  (v + 1.5 * 2**23) lands in [2**23, 2**24) where the float32 spacing is 1, so the
  hardware's round-to-nearest-even addition does the rounding and the
  subtraction is exact. It is applied after clamping to [-127, 127], so it is
  always in range; it needs no libdevice (absent from Triton's interpreter).
- NaN is tracked separately from the abs-max, because max/maximum on the GPU
  drop NaNs (maxnum) while the interpreter's numpy propagates them.

One program takes BLOCK_M rows: a first loop over K finds each row's abs-max, a
second one quantizes (the rows are still in L2). Small K packs several rows per
program, large K streams one row per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import to_f32

__all__ = ["quantize_per_token", "quantize_static", "PTX_SPECS"]

# The largest block (elements) one program holds in registers at a time.
_MAX_TILE = 4096
_MAX_BLOCK_K = 2048


@triton.jit
def _row_block(x_ptr, q_ptr, M, stride_xm, stride_qm, BLOCK_M: tl.constexpr):
    """The BLOCK_M rows of this program: (row indices as int64, rows < M, x row pointers
    [BLOCK_M, 1], q row pointers [BLOCK_M, 1]); 64-bit, as M * K may exceed 2**31.
    The kernels widen the column offsets cols * stride_xk too: for a transposed x
    (stride_xk = M) they can pass 2**31 as well."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < M, x_ptr + rows[:, None] * stride_xm, q_ptr + rows[:, None] * stride_qm


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr,        # [M, K] fp32/fp16/bf16, strides (stride_xm, stride_xk)
    q_ptr,        # [M, K] int8, row stride stride_qm, unit column stride
    scale_ptr,    # [M] float32, contiguous
    # sizes
    M, K,
    # strides (elements)
    stride_xm, stride_xk, stride_qm,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows64, row_ok, x_rows, q_rows = _row_block(x_ptr, q_ptr, M, stride_xm, stride_qm, BLOCK_M)

    # Pass 1: abs-max of each row, NaN-free, and whether the row holds a NaN.
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    has_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = to_f32(tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0))
        is_nan = x != x
        amax = tl.maximum(amax, tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1))
        has_nan = tl.maximum(has_nan, tl.max(is_nan.to(tl.int32), axis=1))

    # scale = amax / 127 (IEEE division), 1.0 where it is 0, NaN for a NaN row.
    scale = tl.div_rn(amax, tl.full([BLOCK_M], 127.0, tl.float32))
    scale = tl.where(scale > 0.0, scale, 1.0)
    qnan = tl.full([BLOCK_M], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)  # quiet NaN
    scale = tl.where(has_nan != 0, qnan, scale)
    tl.store(scale_ptr + rows64, scale, mask=row_ok)

    # Pass 2: q = clamp(rne(x / scale), -127, 127); NaN (NaN row, inf / inf) -> 0.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = to_f32(tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0))
        v = tl.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K]))
        v = tl.where(v != v, 0.0, v)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = (v + 12582912.0) - 12582912.0  # round half to even, exact for |v| <= 2**22
        tl.store(q_rows + cols[None, :], v.to(tl.int8), mask=mask)


def _blocks(m: int, k: int):
    block_k = min(max(triton.next_power_of_2(k), 16), _MAX_BLOCK_K)
    block_m = min(max(_MAX_TILE // block_k, 1), max(triton.next_power_of_2(m), 1))
    num_warps = 8 if block_m * block_k >= 4096 else 4
    return block_m, block_k, num_warps


def quantize_per_token(x: torch.Tensor):
    """x [M, K] float (any strides) -> (int8 [M, K], float32 scale [M]); see module doc."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(1.0)
    block_m, block_k, num_warps = _blocks(m, k)
    grid = (triton.cdiv(m, block_m),)
    _quantize_per_token_kernel[grid](
        x, q, scale, m, k, x.stride(0), x.stride(1), q.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )
    return q, scale


# --- quantize_static ----------------------------------------------------------------

@triton.jit
def _quantize_static_kernel(
    x_ptr,        # [M, K] fp32/fp16/bf16, strides (stride_xm, stride_xk)
    s_ptr,        # float32, one value: the calibrated scale s (read on the device: no sync)
    q_ptr,        # [M, K] int8, row stride stride_qm, unit column stride
    rows_ptr,     # [M] float32 out: s, or NaN for a row holding a NaN
    M, K,
    stride_xm, stride_xk, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # q = clamp(rne(nan_to_0(x / s)), -127, 127) as pyfast/reference.py quantize_static
    # (the reference maps +-inf to +-FLT_MAX before clamping: the same int8). One pass.
    rows64, row_ok, x_rows, q_rows = _row_block(x_ptr, q_ptr, M, stride_xm, stride_qm, BLOCK_M)
    s = tl.load(s_ptr)
    has_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = to_f32(tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0))
        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32), axis=1))
        v = tl.div_rn(x, tl.full([BLOCK_M, BLOCK_K], 1.0, tl.float32) * s)  # IEEE x / s
        v = tl.where(v != v, 0.0, v)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        v = (v + 12582912.0) - 12582912.0  # round half to even, exact for |v| <= 2**22
        tl.store(q_rows + cols[None, :], v.to(tl.int8), mask=mask)
    qnan = tl.full([BLOCK_M], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)  # quiet NaN
    out = tl.where(has_nan != 0, qnan, tl.full([BLOCK_M], 1.0, tl.float32) * s)
    tl.store(rows_ptr + rows64, out, mask=row_ok)


def quantize_static(x: torch.Tensor, scale: torch.Tensor):
    """x [M, K] float (any strides), scale float32 (one value, on x's device) ->
    (int8 [M, K], float32 row scales [M]); see _quantize_static_kernel."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    rows = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, rows
    s = scale.reshape(1).to(torch.float32)
    if k == 0:
        return q, rows.copy_(s.expand(m))
    block_m, block_k, num_warps = _blocks(m, k)
    _quantize_static_kernel[(triton.cdiv(m, block_m),)](
        x, s, q, rows, m, k, x.stride(0), x.stride(1), q.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )
    return q, rows


def _spec(name, x_ty, block_m, block_k):
    return {
        "name": name,
        "kernel": _quantize_per_token_kernel,
        "signature": {"x_ptr": f"*{x_ty}", "q_ptr": "*i8", "scale_ptr": "*fp32",
                      "M": "i32", "K": "i32",
                      "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32"},
        "constexprs": {"BLOCK_M": block_m, "BLOCK_K": block_k},
        # No tensor-core instruction here; None = "must compile".
        "expect": {80: None, 90: None},
    }


def _static_spec(name, x_ty, block_m, block_k):
    return {
        "name": name,
        "kernel": _quantize_static_kernel,
        "signature": {"x_ptr": f"*{x_ty}", "s_ptr": "*fp32", "q_ptr": "*i8", "rows_ptr": "*fp32",
                      "M": "i32", "K": "i32",
                      "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32"},
        "constexprs": {"BLOCK_M": block_m, "BLOCK_K": block_k},
        "expect": {80: None, 90: None},  # no tensor-core instruction: must compile
    }


# Compiled ahead of time for sm_80 / sm_90 by tests/test_triton_ptx.py.
PTX_SPECS = [
    _spec("quantize_per_token_fp32_row", "fp32", 1, 2048),
    _spec("quantize_per_token_fp16_rows", "fp16", 16, 256),
    _spec("quantize_per_token_bf16_row", "bf16", 1, 2048),
    _static_spec("quantize_static_fp32_row", "fp32", 1, 2048),
    _static_spec("quantize_static_bf16_rows", "bf16", 16, 256),
]
