"""2:4 sparse weight matmul in Triton: out = x @ W.T + bias, W given compressed.

W [N, K] is 2:4 sparse along K and stored as (values [N, K/2], meta uint8 [N, K/4])
(pyfast/formats.py). The kernel reads only the compressed form -- half the weight
values plus a byte per group of four, about 56% (fp16/bf16) or 53% (fp32) of the
dense weight bytes -- and rebuilds the dense weight in registers for dense
tensor-core `tl.dot`s. At small M the matmul is bound by reading the weight, so
reading fewer bytes is the whole win; the tensor cores do the zeros too (this is not
the sparse-tensor-core mma.sp path, which needs another metadata layout and a repack
op of its own).

One K tile, k-major ([k, n]) so that the loads run along the contiguous K axis of
each weight row (16-byte vectors, cp.async on sm_80+):
    v      [BLOCK_K/2, BLOCK_N]  loaded -> v0, v1 [BLOCK_K/4, BLOCK_N]: the first /
                                           second kept value of each group of 4
    meta   [BLOCK_K/4, BLOCK_N]  loaded -> idx0 = bits 0-1, idx1 = bits 2-3
    x      [BLOCK_M, BLOCK_K]    loaded -> x_p [BLOCK_M, BLOCK_K/4], p = 0..3: the
                                           columns k = 4j + p, split in registers
    w_p[j, n] = v0 if idx0 == p, v1 if idx1 == p, else 0
    acc += x_0 @ w_0 + x_1 @ w_1 + x_2 @ w_2 + x_3 @ w_3      (four dots of BLOCK_K / 4)
Four dots of a quarter depth instead of one dense [BLOCK_K, BLOCK_N] tile: the dense
tile had to be built by a broadcast over p and a reshape, which Triton lowered to one
16-bit shared-memory store per dense value and a reload (sm_90 SASS of the split-K fp16
spec, scripts/triton_sass.py: 986 instructions per K block, 64 STS.U16; then 592 and
none).

The dots and the selection are _common.sparse24_dots (shared with sparse24_int4_mm); it
relies on the format's idx0 < idx1 and zero bits 4-7 (formats.py; a meta byte is one of
6) to test the byte itself, 6 selects instead of 8 and no shifts. Against testing both
slots at every position, over every autotune config's sm_80 and sm_90 SASS: the main
loop is 5-20% shorter, except the 128 x 256 8-warp tile on sm_80, which spills
registers either way (about 2400 local loads/stores; 2% longer). A byte outside the
format gives an unspecified sum, as on the other backends.

Tensor cores: fp16/bf16 -> mma.sync (sm_80), wgmma (sm_90, when BLOCK_M >= 64 and
num_warps is a multiple of 4); float32 runs with input_precision="ieee" (no TF32)
so a float32 layer stays as accurate as F.linear in float32.

Split-K at M <= SMALL_M (16), with int4_mm's workspace, reduction kernel and launcher
(kernels/weight_only.py): deterministic, no atomics. Without it N / BLOCK_N programs
alone (64 for N = 4096) leave most of a large GPU idle where the weight read is the
whole cost.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ._common import config_subset, sparse24_dots
from .weight_only import (SMALL_M, _check_config, _epilogue_store, _interpreted_bf16,
                          _k_block_range, _launch, _store_partial, _tile_ids)

Tensor = torch.Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def _config(bm, bn, bk, split, warps=4, stages=4):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


def _configs(small_m: bool):
    if _INTERPRET:
        # The interpreter runs one NumPy program per tile: few, big tiles keep the CPU
        # tests fast, and one config means nothing is benchmarked. The small-M config
        # splits K in two, so the CPU tests run the workspace + reduction path too.
        return [_config(16, 128, 128, 2, stages=1)] if small_m else [_config(32, 128, 128, 1, stages=1)]
    if small_m:
        # Decode-like M: thin M tiles, long K tiles to keep many loads in flight, and
        # split-K so that N / BLOCK_N tiles fill the SMs (4096 / 64 = 64 programs alone
        # leave half of an H100's 132 SMs idle, at M = 1 as at M = 16).
        tiles = [(64, 128), (128, 128), (64, 256), (32, 256)]
        return [_config(16, bn, bk, split, stages=3 if bk == 256 else 4)
                for bn, bk in tiles for split in (1, 2, 4, 8)]
    # Prefill-like M: square-ish tiles; BLOCK_M >= 64 lets sm_90 use wgmma.
    return [_config(64, 128, 64, 1), _config(128, 128, 64, 1, warps=8, stages=3),
            _config(128, 64, 64, 1), _config(128, 256, 64, 1, warps=8, stages=3)]


@triton.jit
def _sparse24_mm_kernel(
    # Pointers.
    x_ptr,       # [M, K]   float32/float16/bfloat16, any strides
    v_ptr,       # [N, K/2] same dtype as x: the 2 kept values of each group of 4 along K
    meta_ptr,    # [N, K/4] uint8: bits 0-1 idx0, bits 2-3 idx1 (position in the group)
    bias_ptr,    # [N] any float dtype (read only when HAS_BIAS)
    out_ptr,     # [M, N]   x.dtype, written when not USE_WORKSPACE
    ws_ptr,      # [MAX_SPLIT_K, M, N] float32 partial sums, written when USE_WORKSPACE
    split_ptr,   # [1] int32, gets SPLIT_K when USE_WORKSPACE
    # Sizes; K is a multiple of 4.
    M, N, K,
    # Strides, in elements; stride_ws = M * N, between the workspace's split slices.
    stride_ws,
    stride_xm, stride_xk,
    stride_vn, stride_vk,
    stride_mn, stride_mk,
    stride_bias,
    stride_om, stride_on,
    # Meta-parameters.
    HAS_BIAS: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,     # split-K path: partial sums to ws, no epilogue
    INPUT_PRECISION: tl.constexpr,   # "ieee" for float32 (no TF32); ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # >= 64 on a GPU
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)

    QK: tl.constexpr = BLOCK_K // 4   # groups of 4 per K tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)        # dense k in the tile (x columns)
    offs_h = tl.arange(0, 2 * QK)         # kept-value slot in the tile (values columns)
    offs_g = tl.arange(0, QK)             # group in the tile (meta columns)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm      # [BLOCK_M, 1]
    v_cols = v_ptr + offs_n.to(tl.int64)[None, :] * stride_vn      # [1, BLOCK_N]
    m_cols = meta_ptr + offs_n.to(tl.int64)[None, :] * stride_mn   # [1, BLOCK_N]
    mask_n = mask_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _k_block_range(K, BLOCK_K, SPLIT_K)
    for kb in range(first, last):
        k_start = kb * BLOCK_K
        # K tail: K % 4 == 0, so a group is either wholly inside K or wholly outside,
        # and masking x, values and meta separately keeps them consistent.
        # k * stride in int64 (x, values, meta): for a transposed view (stride = M or N)
        # it can pass 2**31. Unit strides are constexpr 1 on the contiguous path.
        x = tl.load(x_rows + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K - k_start), other=0.0)
        h = k_start // 2 + offs_h                                      # kept-value slot
        v = tl.load(v_cols + h.to(tl.int64)[:, None] * stride_vk,
                    mask=(h[:, None] < K // 2) & mask_n, other=0.0)
        j = k_start // 4 + offs_g                                      # group of 4
        meta = tl.load(m_cols + j.to(tl.int64)[:, None] * stride_mk,
                       mask=(j[:, None] < K // 4) & mask_n, other=0)
        # [2 QK, BLOCK_N] -> [QK, BLOCK_N, 2] -> the first and second kept values
        v0, v1 = tl.split(tl.permute(tl.reshape(v, (QK, 2, BLOCK_N)), (0, 2, 1)))
        acc = sparse24_dots(acc, x, v0, v1, meta, BLOCK_M, QK, INPUT_PRECISION)

    if USE_WORKSPACE:
        _store_partial(acc, offs_m, offs_n, M, N, ws_ptr, stride_ws, split_ptr, SPLIT_K)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, bias_ptr, 0, bias_ptr, stride_bias,
                        out_ptr, stride_om, stride_on, False, HAS_BIAS)


_TUNED = {small: triton.autotune(config_subset(_configs(small)), key=["M", "N", "K"])(
              _sparse24_mm_kernel)
          for small in (True, False)}


def supports_sparse24_mm(x, values, meta, bias=None) -> Optional[str]:
    """bfloat16 on CPU (the interpreter) is refused, as int4_mm's: it returned garbage."""
    return _interpreted_bf16(x)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], *,
                config: Optional[Dict] = None) -> Tensor:
    """x [M, K] float (any strides), values [N, K/2] x.dtype, meta uint8 [N, K/4],
    bias [N] float or None -> x @ W.T + bias as [M, N] x.dtype (float32 accumulation).

    M <= SMALL_M takes the split-K path (workspace + reduction kernel, as int4_mm);
    `config` (tests, tuning: BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K and optionally
    num_warps, num_stages) bypasses the autotuner, SPLIT_K > 1 taking the split path."""
    m, k = x.shape
    n = values.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if config is not None:
        _check_config(config)
        if config["BLOCK_K"] < 64:
            raise ValueError(f"config BLOCK_K = {config['BLOCK_K']} must be at least 64 (four dots "
                             "of BLOCK_K / 4, one per position in a group of 4; tl.dot needs "
                             "K >= 16 on a GPU)")

    def kernel_args(bias_arg, ws, split, stride_ws):
        return (x, values, meta, bias_arg, out, ws, split, m, n, k, stride_ws,
                x.stride(0), x.stride(1), values.stride(0), values.stride(1),
                meta.stride(0), meta.stride(1), 0 if bias is None else bias.stride(0),
                out.stride(0), out.stride(1))

    return _launch(_TUNED, config, kernel_args, {}, out, x, None, bias)


# Compiled ahead of time for sm_80 and sm_90 by tests/test_triton_ptx.py: the
# 16-bit variants must reach the tensor cores. BLOCK_M = 64 with 4 warps (one
# warpgroup) is the smallest tile for which sm_90 emits wgmma (BLOCK_M = 16, the
# small-M configs, gives mma.sync there). The unit strides are constexpr 1 and
# "attrs" marks pointers and the other strides 16-divisible, as the JIT specializes
# a launch on contiguous, aligned tensors; without those hints every load is a
# scalar ld.global and some compiler paths (sm_90 operand hoisting) never run.
_UNIT_STRIDES = ("stride_xk", "stride_vk", "stride_mk", "stride_bias", "stride_on")
_DIVISIBLE_16 = ("x_ptr", "v_ptr", "meta_ptr", "bias_ptr", "out_ptr", "ws_ptr", "split_ptr", "K",
                 "stride_xm", "stride_vn", "stride_mn", "stride_om")


def _ptx_spec(name: str, dtype: str, has_bias: bool, block_m: int = 64, block_n: int = 128,
              block_k: int = 64, split_k: int = 1) -> dict:
    signature = {
        "x_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "meta_ptr": "*u8",
        "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "ws_ptr": "*fp32", "split_ptr": "*i32",
        "M": "i32", "N": "i32", "K": "i32", "stride_ws": "i32",
        "stride_xm": "i32", "stride_xk": "i32",
        "stride_vn": "i32", "stride_vk": "i32",
        "stride_mn": "i32", "stride_mk": "i32",
        "stride_bias": "i32",
        "stride_om": "i32", "stride_on": "i32",
        "HAS_BIAS": "constexpr", "USE_WORKSPACE": "constexpr", "INPUT_PRECISION": "constexpr",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "SPLIT_K": "constexpr",
    }
    signature.update({s: "constexpr" for s in _UNIT_STRIDES})
    signature = {a: signature[a] for a in _sparse24_mm_kernel.arg_names}  # argument order
    arg_index = _sparse24_mm_kernel.arg_names.index
    return {
        "name": name,
        "kernel": _sparse24_mm_kernel,
        "signature": signature,
        "constexprs": {"HAS_BIAS": has_bias, "USE_WORKSPACE": split_k > 1,
                       "INPUT_PRECISION": "tf32", "BLOCK_M": block_m, "BLOCK_N": block_n,
                       "BLOCK_K": block_k, "SPLIT_K": split_k,
                       **{s: 1 for s in _UNIT_STRIDES}},
        # triton.compiler.ASTSource(attrs=...): {(argument index,): [[attribute, value]]}
        "attrs": {(arg_index(a),): [["tt.divisibility", 16]] for a in _DIVISIBLE_16},
        "num_warps": 4,
        "num_stages": 3,
        # wgmma covers 64 rows per warp group: the BLOCK_M = 16 split-K tiles use mma.sync
        "expect": {80: "mma.sync", 90: "wgmma" if block_m >= 64 else "mma.sync"},
    }


PTX_SPECS = [
    _ptx_spec("sparse24_mm_fp16", "fp16", has_bias=True),
    _ptx_spec("sparse24_mm_bf16", "bf16", has_bias=False),
    _ptx_spec("sparse24_mm_fp16_splitk", "fp16", True, 16, 64, 128, split_k=4),
    _ptx_spec("sparse24_mm_bf16_splitk", "bf16", False, 16, 128, 256, split_k=8),
]
