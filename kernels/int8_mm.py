"""Triton kernel of int8_mm (W8A8): int8 x int8 on tensor cores, int32 accumulator.

    a       int8 [M, K]   activations (quantize_per_token), any strides
    b       int8 [N, K]   weight as nn.Linear stores it, any strides; tiles are
                          loaded as [BLOCK_K, BLOCK_N] through the strides (b.T is
                          never materialised)
    a_scale [M], b_scale [N], bias [N] or None: any float dtype, widened to float32
    -> out  [M, N] out_dtype (None = float32)

    out[m, n] = float32(sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n] + bias[n]

Exactness (pyfast/formats.py, oracle pyfast/reference.py int8_mm): the int32 sum is
exact for K <= pyfast.ops.MAX_INT8_K (131071: 128 * 128 * K < 2**31); the epilogue
does the reference's float32 operations in the reference's order, each one
rounded: ((acc * a_scale) * b_scale) + bias. Left to itself, Triton (default
enable_fp_fusion=True) contracts the last multiply and the add into one fma.rn.f32
(seen in the PTX), which rounds once instead of twice and can differ from the
reference in the last bit. libdevice's __fmul_rn / __fadd_rn do not help: Triton
links libdevice in flush-to-zero mode, so they become mul.rn.ftz / add.rn.ftz,
which flush subnormals. On the GPU the epilogue therefore uses inline PTX
mul.rn.f32 / add.rn.f32 (an operation with an explicit rounding modifier is never
fused, and without .ftz subnormals are kept), whatever the compile options. The
interpreter computes the same operations in numpy float32, which never fuses.
So the float32 output is bit-identical to the reference, and fp16/bf16 outputs
are that float32 result rounded to nearest even (cvt.rn).

Tensor cores: tl.dot on int8 tiles emits mma.sync.aligned.m16n8k32 ... s32.s8.s8.s32
on sm_80 and wgmma.mma_async ... s32.s8.s8 on sm_90 (BLOCK_M >= 64, 4 or 8 warps).
Tile order is grouped (GROUP_M rows of tiles share their b tiles in L2), as in the
Triton matmul tutorial. Configurations are autotuned on (M, N, K); under Triton's
interpreter (CPU test runs) there is one configuration with large blocks.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import config_subset, grouped_tile, to_f32
from .quantize import quantize_per_token

__all__ = ["int8_mm", "w8a8_mm", "PTX_SPECS"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _mul_rn(x, y):
    # float32 x * y, rounded to nearest even, never contracted into an fma, subnormals kept
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _add_rn(x, y):
    # float32 x + y, rounded to nearest even, never contracted into an fma, subnormals kept
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [x, y],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _int8_mm_kernel(
    # pointers
    a_ptr,          # int8 [M, K]
    b_ptr,          # int8 [N, K]
    a_scale_ptr,    # float [M]
    b_scale_ptr,    # float [N]
    bias_ptr,       # float [N] (unused when HAS_BIAS is False)
    out_ptr,        # out_dtype [M, N]
    # sizes
    M, N, K,
    # strides (elements)
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_as, stride_bs, stride_bias,
    stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,   # True under Triton's interpreter: no inline PTX there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Row offsets in int64: M * K (up to 131071 per row) may exceed 2**31. The column
    # offsets and the K steps too (outside the loop, free): for a transposed view the
    # column stride is M or N, and BLOCK_K * stride passes 2**31 from 2**24 on.
    offs_k64 = offs_k.to(tl.int64)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k64[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k64[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += a_step
        b_ptrs += b_step

    # Epilogue, in float32 and in the reference's order, every operation rounded.
    a_s = to_f32(tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0))
    b_s = to_f32(tl.load(b_scale_ptr + offs_n * stride_bs, mask=mask_n, other=0.0))
    a_s = tl.broadcast_to(a_s[:, None], (BLOCK_M, BLOCK_N))
    b_s = tl.broadcast_to(b_s[None, :], (BLOCK_M, BLOCK_N))
    c = acc.to(tl.float32)
    if INTERPRET:
        c = c * a_s
        c = c * b_s
    else:
        c = _mul_rn(c, a_s)
        c = _mul_rn(c, b_s)
    if HAS_BIAS:
        bias = to_f32(tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0))
        bias = tl.broadcast_to(bias[None, :], (BLOCK_M, BLOCK_N))
        if INTERPRET:
            c = c + bias
        else:
            c = _add_rn(c, bias)

    out_ty = out_ptr.dtype.element_ty
    if INTERPRET and out_ty == tl.bfloat16:
        # The interpreter's float32 -> bfloat16 cast truncates; round to nearest
        # even on the bits instead (NaN -> 0x7FC0, as torch does).
        bits = c.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(c != c, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = c.to(out_ty)  # cvt.rn on the GPU
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


def _configs():
    if INTERPRET:
        # CPU test runs: few programs, each a large numpy matmul.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8},
                              num_warps=4, num_stages=1)]
    cfg = lambda bm, bn, bk, stages, warps: triton.Config(  # noqa: E731
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_stages=stages, num_warps=warps)
    return [
        # decode / small M: thin M tiles, wide N, deep pipelines
        cfg(16, 64, 128, 5, 4), cfg(16, 128, 128, 4, 4), cfg(16, 256, 128, 3, 4),
        cfg(32, 64, 128, 5, 4), cfg(32, 128, 128, 4, 4), cfg(32, 256, 128, 3, 8),
        # medium M (wgmma needs BLOCK_M >= 64)
        cfg(64, 64, 128, 4, 4), cfg(64, 128, 128, 4, 4), cfg(64, 256, 128, 3, 8),
        # large M (prefill)
        cfg(128, 128, 64, 4, 4), cfg(128, 128, 128, 3, 8), cfg(128, 256, 128, 3, 8),
        cfg(256, 128, 128, 3, 8),
    ]


_int8_mm_autotuned = triton.autotune(configs=config_subset(_configs()),
                                     key=["M", "N", "K"])(_int8_mm_kernel)


def int8_mm(a, b, a_scale, b_scale, bias, out_dtype):
    """a int8 [M,K], b int8 [N,K] -> [M,N] out_dtype (None = float32); see module doc."""
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    has_bias = bias is not None
    bias_arg = bias if has_bias else b_scale  # any valid pointer; never read
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_mm_autotuned[grid](
        a, b, a_scale, b_scale, bias_arg, out,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a_scale.stride(0), b_scale.stride(0), bias_arg.stride(0),
        out.stride(0), out.stride(1),
        HAS_BIAS=has_bias, INTERPRET=INTERPRET,
    )
    return out


def w8a8_mm(x, w_int8, w_scale, bias):
    """The w8a8_mm op on the GPU: the quantize_per_token kernel (kernels/quantize.py),
    then the int8_mm kernel above with out_dtype x.dtype. Two launches: the int8 x tile
    is made once by the first and read from L2 by every program of the second (one
    fused kernel would quantize each row of x once per column tile of the output)."""
    q, q_scale = quantize_per_token(x)
    return int8_mm(q, w_int8, q_scale, w_scale, bias, x.dtype)


# The JIT specializes a launch on contiguous, aligned tensors: strides equal to 1 become
# constexpr 1, and pointers and sizes divisible by 16 get a divisibility hint. The specs
# compile that specialization (without it every load is a scalar ld.global.b8 and the
# PTX checked is not the kernel that runs).
_UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_as", "stride_bs", "stride_bias", "stride_on")
_DIVISIBLE_16 = ("a_ptr", "b_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr", "out_ptr",
                 "N", "K", "stride_am", "stride_bn", "stride_om")


def _spec(name, out_ty, has_bias, bm, bn, bk, num_warps, num_stages):
    signature = {
        "a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
        "bias_ptr": "*fp32", "out_ptr": f"*{out_ty}",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_ak": "i32", "stride_bn": "i32", "stride_bk": "i32",
        "stride_as": "i32", "stride_bs": "i32", "stride_bias": "i32",
        "stride_om": "i32", "stride_on": "i32",
        "HAS_BIAS": "constexpr", "INTERPRET": "constexpr", "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
    }
    signature.update({a: "constexpr" for a in _UNIT_STRIDES})
    arg_index = _int8_mm_kernel.arg_names.index
    return {
        "name": name,
        "kernel": _int8_mm_kernel,
        "signature": {a: signature[a] for a in _int8_mm_kernel.arg_names},
        "constexprs": {"HAS_BIAS": has_bias, "INTERPRET": False,
                       "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                       **{a: 1 for a in _UNIT_STRIDES}},
        "attrs": {(arg_index(a),): [["tt.divisibility", 16]] for a in _DIVISIBLE_16},
        "num_warps": num_warps, "num_stages": num_stages,
        # int8 tensor-core MMA (Triton 3.7.1's exact spelling on sm_80; wgmma ... s32.s8.s8 on sm_90)
        "expect": {80: "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32",
                   90: "wgmma.mma_async.sync.aligned"},
        # the int8 tiles load as 16-byte vectors (cp.async), not byte by byte
        "limits": {"ld.global.b8": 0},
    }


# Compiled ahead of time for sm_80 / sm_90 by tests/test_triton_ptx.py: a prefill
# tile (float32 out, bias), a bf16-out tile and a decode tile, as autotuned. The
# first two have BLOCK_M >= 64, so sm_90 selects wgmma; the decode tile (BLOCK_M 16)
# is below wgmma's m64 and uses mma.sync on both.
PTX_SPECS = [
    _spec("int8_mm_128x128_fp32_bias", "fp32", True, 128, 128, 128, 8, 3),
    _spec("int8_mm_64x128_bf16", "bf16", False, 64, 128, 128, 4, 4),
    dict(_spec("int8_mm_16x128_fp16_decode", "fp16", True, 16, 128, 128, 4, 4),
         expect={80: "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32",
                 90: "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"}),
]
