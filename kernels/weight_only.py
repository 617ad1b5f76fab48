"""Weight-only quantized matmuls in Triton: int8 per-channel and int4 group-wise.

    int8_weight_mm(x, w_int8, w_scale, bias) = (x @ w_int8.T) * w_scale + bias
    int4_mm(x, packed, scales, zeros, group_size, bias) = x @ W.T + bias,
        W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k // group_size
Layouts: pyfast/formats.py. x [M, K] is float32/float16/bfloat16 with any strides;
the output is [M, N] in x.dtype.

The weight stays quantized in memory (1 or 1/2 byte per value) and is expanded
in registers, tile by tile, right before the tensor-core `tl.dot`:
- int8: a [BLOCK_K, BLOCK_N] tile is loaded through the strides of w_int8 [N, K]
  (no transposed copy) and converted to x's dtype (_common.int8_to_float: for
  float16 on the GPU by inline PTX, 4 bytes per instance). Every int8 value, -128
  included, is exact in float16 and bfloat16, so the dot sees the true weights.
- int4: a K tile loads its [BLOCK_K/2, BLOCK_N] packed bytes once, as 16-byte
  vectors; the low nibbles are the even k, the high nibbles the odd k. The x tile
  is split in registers into its even and odd columns, and the tile's product is
  two dots of half the depth. q - zero is an integer in [-15, 15], exact in
  float16 and bfloat16, made without int -> float conversions
  (_common.int4_minus_zero: on the GPU inline PTX on packed registers, 4 bytes
  per instance, in Triton's arithmetic elsewhere); the scale multiplies AFTER the
  dots, in float32:
      acc += (dot(x_even, q_low - zero) + dot(x_odd, q_high - zero)) * scale[g]
                                   (BLOCK_K divides group_size, so a K tile lies in one group)
  or, for one group per row (group_size = -1, or = K), once in the epilogue like
  the int8 scale. So no weight is ever rounded to 16 bits: every rounding is a
  float32 one (sums, the scale product) until the final cast to x.dtype --
  unlike PyTorch's own F.linear in float16/bfloat16, which rounds every weight.
Accumulation is float32; float32 activations use tl.dot(input_precision="ieee"),
i.e. true float32 FMAs and no TF32, so a float32 layer stays as accurate as
F.linear in float32 (at CUDA-core speed). float16/bfloat16 run on the tensor cores:
mma.sync on sm_80; wgmma on sm_90 for BLOCK_M >= 64 with 4 warps (the large-M
configs); the BLOCK_M = 16 small-M tiles stay on mma.sync on sm_90 too, since a
wgmma instruction covers 64 rows per warp group.

Split-K for small M (M <= SMALL_M): there the matmul is bound by reading the
weight, and N / BLOCK_N tiles alone may not fill the GPU. The K blocks are then
cut into SPLIT_K contiguous ranges (grid axis 1); each program writes its float32
partial sum to its own slice of a workspace [MAX_SPLIT_K, M, N], and a second
small kernel adds the SPLIT_K slices in a fixed order (0, 1, ...) and applies the
epilogue. No atomics, so the result is deterministic run to run. SPLIT_K is an
autotuned meta-parameter (1, 2, 4, 8): the matmul kernel stores the value it ran
with in a one-element device buffer that the reduction kernel reads, so the
host never needs to know which config the autotuner picked. (The autotuner times
the matmul kernel alone; the reduction moves SPLIT_K * M * N * 4 bytes, small
next to the N * K weight bytes.) Large M needs no split: the epilogue is fused.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) each autotuner has
ONE config with big tiles, so nothing is benchmarked and the CPU tests stay fast.
The interpreter computes tl.dot on bfloat16 wrongly (an upstream bug), so
supports_* refuse bfloat16 CPU inputs there rather than return wrong numbers;
on a GPU bfloat16 is a regular, tested path.

Tests and tuning may pass `config=` (a dict of BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
and optionally num_warps, num_stages) to bypass the autotuner: SPLIT_K > 1 then
takes the workspace path at any M, SPLIT_K = 1 the fused epilogue.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl

from ._common import config_subset, int4_minus_zero, int8_to_float, to_f32

Tensor = torch.Tensor

__all__ = ["int8_weight_mm", "int4_mm", "supports_int8_weight_mm", "supports_int4_mm",
           "PTX_SPECS", "SMALL_M", "MAX_SPLIT_K"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

SMALL_M = 16        # M <= SMALL_M: the split-K path (workspace + reduction kernel)
MAX_SPLIT_K = 8     # the workspace holds this many partial sums


# --- shared pieces ------------------------------------------------------------------

@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Consecutive programs share one column tile (pid_n) and walk the row tiles, so
    # a weight tile -- the expensive one to load and expand -- is reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    return pid % num_pid_m, pid // num_pid_m


@triton.jit
def _k_block_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # The K blocks of split program_id(1): a contiguous range, possibly empty.
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_k_blocks, SPLIT_K)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, num_k_blocks)


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N,
                    scale_ptr, stride_scale, bias_ptr, stride_bias,
                    out_ptr, stride_om, stride_on,
                    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    # out = acc * scale[n] + bias[n] in float32 (the reference's order), cast once.
    # to_f32: exact for bfloat16 subnormals in the interpreter too.
    mask_n = offs_n < N
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n * stride_scale, mask=mask_n, other=0.0)
        acc = acc * to_f32(scale)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc = acc + to_f32(bias)[None, :]
    out_ptrs = (out_ptr + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & mask_n[None, :])


@triton.jit
def _store_partial(acc, offs_m, offs_n, M, N, ws_ptr, stride_ws, split_ptr, SPLIT_K: tl.constexpr):
    # ws [MAX_SPLIT_K, M, N] float32, contiguous: this split's slice. Every program
    # also records SPLIT_K (the same value) for the reduction kernel.
    ws_ptrs = (ws_ptr + tl.program_id(1).to(tl.int64) * stride_ws
               + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :])
    tl.store(ws_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    tl.store(split_ptr + tl.arange(0, 1), tl.full([1], SPLIT_K, tl.int32))


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr,      # [MAX_SPLIT_K, M, N] float32: the first split_ptr[0] slices are written
    split_ptr,   # [1] int32: SPLIT_K the matmul kernel ran with
    scale_ptr,   # [N] any float dtype (read only when HAS_SCALE)
    bias_ptr,    # [N] any float dtype (read only when HAS_BIAS)
    out_ptr,     # [M, N] x.dtype, written
    M, N,
    stride_ws,   # M * N: between split slices
    stride_scale, stride_bias, stride_om, stride_on,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    split_k = tl.load(split_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, split_k):  # slices 0, 1, ... in order: deterministic
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += stride_ws
    _epilogue_store(acc, offs_m, offs_n, M, N, scale_ptr, stride_scale, bias_ptr, stride_bias,
                    out_ptr, stride_om, stride_on, HAS_SCALE, HAS_BIAS)


@triton.jit
def _group_params(zero_ptr, scale_ptr, offs_n, mask_n, stride_zn, stride_zg, stride_sn, stride_sg, g):
    """(zero int32 [BLOCK_N], scale float32 [BLOCK_N]) of group g of weight rows offs_n
    (zeros uint8 [N, G], scales any float dtype [N, G]); 0 for masked-off rows."""
    zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0)
    scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
    return zero.to(tl.int32), to_f32(scale)


# --- int8 weights ---------------------------------------------------------------------

@triton.jit
def _int8_weight_mm_kernel(
    # Pointers.
    x_ptr,       # [M, K] float32/float16/bfloat16, any strides
    w_ptr,       # [N, K] int8, any strides (row-major in pyfast)
    scale_ptr,   # [N] any float dtype: per-output-channel scale
    bias_ptr,    # [N] any float dtype (read only when HAS_BIAS)
    out_ptr,     # [M, N] x.dtype, written when not USE_WORKSPACE
    ws_ptr,      # [MAX_SPLIT_K, M, N] float32 partial sums, written when USE_WORKSPACE
    split_ptr,   # [1] int32, gets SPLIT_K when USE_WORKSPACE
    # Sizes.
    M, N, K,
    # Strides, in elements; stride_ws = M * N, between the workspace's split slices.
    stride_ws,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_scale, stride_bias,
    stride_om, stride_on,
    # Meta-parameters.
    HAS_BIAS: tl.constexpr,
    USE_WORKSPACE: tl.constexpr,     # split-K path: partial sums to ws, no epilogue
    INPUT_PRECISION: tl.constexpr,   # "ieee" for float32 (no TF32); ignored for 16-bit inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm      # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn      # [1, BLOCK_N]
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _k_block_range(K, BLOCK_K, SPLIT_K)
    for kb in range(first, last):
        k = kb * BLOCK_K + offs_k
        # k * stride in int64: for a transposed view (stride = M or N) it can pass 2**31.
        # (Unit strides are constexpr 1 on the contiguous path: no multiply there.)
        k64 = k.to(tl.int64)
        x = tl.load(x_rows + k64[None, :] * stride_xk, mask=mask_m & (k[None, :] < K), other=0.0)
        # The weight tile as [BLOCK_K, BLOCK_N] straight from w [N, K] (k contiguous).
        w = tl.load(w_cols + k64[:, None] * stride_wk, mask=(k[:, None] < K) & mask_n, other=0)
        acc = tl.dot(x, int8_to_float(w, x.dtype), acc, input_precision=INPUT_PRECISION)

    if USE_WORKSPACE:
        _store_partial(acc, offs_m, offs_n, M, N, ws_ptr, stride_ws, split_ptr, SPLIT_K)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, scale_ptr, stride_scale, bias_ptr, stride_bias,
                        out_ptr, stride_om, stride_on, True, HAS_BIAS)


# --- int4 weights, group-wise ------------------------------------------------------------

@triton.jit
def _int4_mm_kernel(
    # Pointers.
    x_ptr,       # [M, K] float32/float16/bfloat16, any strides
    p_ptr,       # [N, K/2] uint8: packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4
    scale_ptr,   # [N, G] any float dtype
    zero_ptr,    # [N, G] uint8, 0..15
    bias_ptr,    # [N] any float dtype (read only when HAS_BIAS)
    out_ptr,     # [M, N] x.dtype, written when not USE_WORKSPACE
    ws_ptr,      # [MAX_SPLIT_K, M, N] float32 partial sums, written when USE_WORKSPACE
    split_ptr,   # [1] int32, gets SPLIT_K when USE_WORKSPACE
    # Sizes; K is even; GROUP_SIZE is the group length in k (K itself for per channel);
    # K_PACKED = K / 2, the bytes of a packed row: an argument of its own, so that the
    # JIT sees it 16-divisible when it is and vectorises the masked weight loads (the
    # compiler proves only 8-divisibility for K // 2 from a 16-divisible K).
    M, N, K, GROUP_SIZE, K_PACKED,
    # Strides, in elements; stride_ws = M * N, between the workspace's split slices.
    stride_ws,
    stride_xm, stride_xk,
    stride_pn, stride_pk,
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
    BLOCK_K: tl.constexpr,           # even; divides GROUP_SIZE unless ONE_GROUP
    SPLIT_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)  # the tile's bytes along a weight row
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm      # [BLOCK_M, 1]
    p_cols = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn      # [1, BLOCK_N]
    mask_m = offs_m[:, None] < M
    mask_n1 = offs_n < N
    mask_n = mask_n1[None, :]

    first, last = _k_block_range(K, BLOCK_K, SPLIT_K)
    if ONE_GROUP:  # the zero point of the row, loaded once
        zero = tl.load(zero_ptr + offs_n * stride_zn, mask=mask_n1, other=0).to(tl.int32)
    else:
        # Group g of the first K block. Its scale is loaded one block ahead (loop-carried)
        # so that a cache miss overlaps a block's work; the scales are plain loads, which
        # Triton does not pipeline (they feed no dot operand). The zero point is loaded in
        # its block: 32 groups share a 32-byte sector, so after a row's first group it
        # comes from L1, and loading it ahead too made Triton convert the whole dequantized
        # tile through shared memory (STS/LDS per value, sm_90 bf16 split-K spec) instead
        # of the zero vector. A counter replaces the division k0 // GROUP_SIZE.
        blocks_per_group = GROUP_SIZE // BLOCK_K   # BLOCK_K divides GROUP_SIZE here
        g = tl.minimum(first // blocks_per_group, (K - 1) // GROUP_SIZE)  # empty split: in bounds
        left = blocks_per_group - first % blocks_per_group  # blocks of group g from `first`
        scale_next = to_f32(tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n1,
                                    other=0.0))

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        k0 = kb * BLOCK_K
        k = k0 + offs_k
        # int64 k * stride (and b * stride_pk below), as in the int8 kernel: a transposed
        # view can pass 2**31
        x = tl.load(x_rows + k.to(tl.int64)[None, :] * stride_xk, mask=mask_m & (k[None, :] < K),
                    other=0.0)
        # The activations' even and odd columns, [BLOCK_M, BLOCK_K / 2] each, split in
        # registers from the contiguous x tile.
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        # The weight tile as bytes, [BLOCK_K / 2, BLOCK_N], each byte loaded once:
        # contiguous along k, so the loads are 16-byte vectors that cp.async pipelines.
        # Byte b holds k = 2b (low nibble) and 2b + 1 (high nibble). (Indexing a
        # [BLOCK_K, BLOCK_N] tile by byte k // 2 instead made every load a scalar
        # ld.global.b8, outside the pipeline: the kernel the H100 run measured.)
        b = k0 // 2 + offs_b
        p = tl.load(p_cols + b.to(tl.int64)[:, None] * stride_pk,
                    mask=(b[:, None] < K_PACKED) & mask_n, other=0)
        if ONE_GROUP:
            w_even, w_odd = int4_minus_zero(p, zero[None, :], x.dtype)
            acc = tl.dot(x_even, w_even, acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(x_odd, w_odd, acc, input_precision=INPUT_PRECISION)
        else:
            # This block lies in group g (BLOCK_K divides group_size). Then the next
            # block's scale: the same group, the next one, or past the last block the
            # last group again (an in-bounds load, never used).
            scale_g = scale_next
            zero_g = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n1,
                             other=0).to(tl.int32)
            left -= 1
            if left == 0:
                g = tl.minimum(g + 1, (K - 1) // GROUP_SIZE)
                left = blocks_per_group
            scale_next = to_f32(tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg,
                                        mask=mask_n1, other=0.0))
            w_even, w_odd = int4_minus_zero(p, zero_g[None, :], x.dtype)
            part = tl.dot(x_even, w_even, input_precision=INPUT_PRECISION)
            part = tl.dot(x_odd, w_odd, part, input_precision=INPUT_PRECISION)
            acc += part * scale_g[None, :]

    if USE_WORKSPACE:
        _store_partial(acc, offs_m, offs_n, M, N, ws_ptr, stride_ws, split_ptr, SPLIT_K)
    else:
        _epilogue_store(acc, offs_m, offs_n, M, N, scale_ptr, stride_sn, bias_ptr, stride_bias,
                        out_ptr, stride_om, stride_on, ONE_GROUP, HAS_BIAS)


# --- configs and autotuners -----------------------------------------------------------------

def _config(bm, bn, bk, split, warps=4, stages=4):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


def _configs(small_m: bool, int4: bool) -> List[triton.Config]:
    if _INTERPRET:
        # One NumPy program per tile: few, big tiles. BLOCK_K = 32 divides every int4
        # group size. The small-M config splits K in two, so the CPU tests run the
        # workspace + reduction path too.
        bk = 32 if int4 else 128
        return [_config(16, 256, bk, 2, stages=1)] if small_m else [_config(32, 256, bk, 1, stages=1)]
    if small_m:
        # Thin M tiles, long K tiles for many loads in flight, and split-K to fill the
        # SMs when N / BLOCK_N tiles alone do not.
        tiles = ([(32, 128), (64, 64), (64, 128), (128, 64), (64, 32), (128, 32)] if int4
                 else [(32, 128), (64, 128), (64, 256), (128, 128)])
        return [_config(16, bn, bk, split) for bn, bk in tiles for split in (1, 2, 4, 8)]
    # Prefill-like M: square-ish tiles; BLOCK_M >= 64 with 4 warps gives wgmma on sm_90.
    bk = (32, 64) if int4 else (64, 128)
    # int4 keeps a second accumulator (`part`, scaled per group), so a 128 x 128 tile
    # takes 8 warps: with 4, 2 x 128 float32 per thread spill (sm_90 SASS: 38 STL per
    # K block, scripts/triton_sass.py).
    return [_config(64, 128, bk[1], 1), _config(128, 128, bk[1], 1, warps=8 if int4 else 4, stages=3),
            _config(128, 64, bk[1], 1), _config(64, 64, bk[0], 1),
            _config(128, 128, bk[0], 1, warps=8, stages=3), _config(128, 256, bk[0], 1, warps=8, stages=3)]


def _fits_groups(configs, nargs, **kwargs):
    """Keep the int4 configs whose K tile lies inside one group."""
    k, gs = nargs["K"], nargs["GROUP_SIZE"]
    return [c for c in configs if k <= gs or gs % c.kwargs["BLOCK_K"] == 0]


_KEY = ["M", "N", "K"]
_INT8 = {small: triton.autotune(config_subset(_configs(small, int4=False)),
                                key=_KEY)(_int8_weight_mm_kernel)
         for small in (True, False)}
_INT4 = {small: triton.autotune(config_subset(_configs(small, int4=True)),
                                key=_KEY + ["GROUP_SIZE"],
                                prune_configs_by={"early_config_prune": _fits_groups})(_int4_mm_kernel)
         for small in (True, False)}


# --- launch ------------------------------------------------------------------------------------

def _input_precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


def _check_config(config: Dict, group_size: Optional[int] = None, k: int = 0) -> Dict:
    need = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"}
    allowed = need | {"num_warps", "num_stages"}
    if not need <= config.keys() or not config.keys() <= allowed:
        raise ValueError(f"config {config} must give {sorted(need)} (and may give num_warps, num_stages)")
    for key, v in config.items():
        # Only ints: a float SPLIT_K failed inside the launch with an error that did not
        # name it, and a bool was taken as 0 / 1.
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"config {key} = {v!r} ({type(v).__name__}) must be an int")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):  # tl.arange: powers of two only
        v = config.get(key, 1)
        if v < 1 or v & (v - 1):
            raise ValueError(f"config {key} = {v!r} must be a power of two")
    if not 1 <= config["SPLIT_K"] <= MAX_SPLIT_K:
        raise ValueError(f"config SPLIT_K = {config['SPLIT_K']} must be in 1..{MAX_SPLIT_K}")
    if config.get("num_stages", 1) < 1:
        raise ValueError(f"config num_stages = {config['num_stages']} must be at least 1")
    if group_size is not None and k > group_size and group_size % config["BLOCK_K"]:
        raise ValueError(f"config BLOCK_K = {config['BLOCK_K']} must divide group_size {group_size} "
                         "(a K tile has to lie inside one group)")
    return config


def _launch(tuned: Dict[bool, triton.runtime.Autotuner], config: Optional[Dict],
            kernel_args: Callable[..., tuple], meta: Dict, out: Tensor, x: Tensor,
            epilogue_scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Run the matmul kernel, then the split-K reduction if it used the workspace.

    tuned: {small M: autotuner} for the kernel; config: fixed meta-parameters
    instead (tests, tuning); kernel_args(bias_arg, ws, split, stride_ws): the
    kernel's positional arguments; meta: extra constexprs; epilogue_scale: the
    [N] per-channel scale the reduction applies (None: already applied)."""
    m, n = out.shape
    if config is None:
        use_ws = m <= SMALL_M
        kernel, fixed = tuned[use_ws], {}
    else:
        use_ws = config["SPLIT_K"] > 1
        kernel, fixed = tuned[use_ws].fn, config
    # Workspace: MAX_SPLIT_K slices of [M, N] float32, only on the split-K path;
    # `split` receives the SPLIT_K the kernel ran with (written by the kernel).
    ws = torch.empty((MAX_SPLIT_K, m, n) if use_ws else (1,), dtype=torch.float32, device=x.device)
    split = torch.empty(1, dtype=torch.int32, device=x.device)
    stride_ws = m * n
    bias_arg = out if bias is None else bias  # any pointer; not read without HAS_BIAS

    def grid(c):
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])

    kernel[grid](*kernel_args(bias_arg, ws, split, stride_ws),
                 HAS_BIAS=bias is not None, USE_WORKSPACE=use_ws,
                 INPUT_PRECISION=_input_precision(x), **meta, **fixed)
    if use_ws:
        block_m, block_n = 16, 128
        scale_arg = out if epilogue_scale is None else epilogue_scale
        _split_k_reduce_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
            ws, split, scale_arg, bias_arg, out, m, n, stride_ws,
            0 if epilogue_scale is None else epilogue_scale.stride(0),
            0 if bias is None else bias.stride(0), out.stride(0), out.stride(1),
            HAS_SCALE=epilogue_scale is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def _interpreted_bf16(x: Tensor) -> Optional[str]:
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return ("the Triton interpreter computes tl.dot on bfloat16 wrongly (upstream bug); "
                "run bfloat16 on a GPU, or pass float16/float32 activations on CPU")
    return None


def supports_int8_weight_mm(x, w_int8, w_scale, bias=None) -> Optional[str]:
    return _interpreted_bf16(x)


def supports_int4_mm(x, packed, scales, zeros, group_size, bias=None) -> Optional[str]:
    return _interpreted_bf16(x)


def int8_weight_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                   *, config: Optional[Dict] = None) -> Tensor:
    """x [M, K] float, w_int8 [N, K] int8, w_scale [N], bias [N] or None -> [M, N] x.dtype."""
    m, k = x.shape
    n = w_int8.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if config is not None:
        _check_config(config)

    def kernel_args(bias_arg, ws, split, stride_ws):
        return (x, w_int8, w_scale, bias_arg, out, ws, split, m, n, k, stride_ws,
                x.stride(0), x.stride(1), w_int8.stride(0), w_int8.stride(1),
                w_scale.stride(0), 0 if bias is None else bias.stride(0),
                out.stride(0), out.stride(1))

    return _launch(_INT8, config, kernel_args, {}, out, x, w_scale, bias)


def int4_mm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
            bias: Optional[Tensor] = None, *, config: Optional[Dict] = None) -> Tensor:
    """x [M, K] float, packed uint8 [N, K/2], scales [N, G], zeros uint8 [N, G],
    group_size 32/64/128/-1, bias [N] or None -> [M, N] x.dtype."""
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    gs = k if group_size == -1 else group_size
    if config is not None:
        _check_config(config, gs, k)
        if config["BLOCK_K"] < 32:  # two dots of BLOCK_K / 2, and tl.dot needs K >= 16 on a GPU
            raise ValueError(f"config BLOCK_K = {config['BLOCK_K']} must be at least 32 for int4_mm "
                             "(the tile's even and odd k make two dots of BLOCK_K / 2)")
    if k == 0:  # an empty sum: out = bias, as the reference (G = 0: there is no scales[:, 0])
        return out.zero_() if bias is None else out.copy_(bias.float().expand(m, n))
    one_group = k <= gs  # G == 1: scales[:, 0] is a per-channel scale for the epilogue

    def kernel_args(bias_arg, ws, split, stride_ws):
        return (x, packed, scales, zeros, bias_arg, out, ws, split, m, n, k, gs, k // 2, stride_ws,
                x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
                scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
                0 if bias is None else bias.stride(0), out.stride(0), out.stride(1))

    return _launch(_INT4, config, kernel_args, {"ONE_GROUP": one_group}, out, x,
                   scales[:, 0] if one_group else None, bias)


# --- ahead-of-time compile specs (tests/test_triton_ptx.py) ----------------------------------
#
# Each spec mirrors a JIT launch on contiguous, 16-aligned tensors: the strides that
# are 1 there are constexpr 1 (the JIT specializes on the value 1), and "attrs"
# marks the pointers and sizes/strides that the JIT sees 16-divisible -- without
# those hints every load is a scalar ld.global and some compiler paths (sm_90 dot
# operand hoisting) never run. BLOCK_M >= 64 with 4 warps (one warp group) is what
# sm_90 needs for wgmma; the small-M split-K tiles (BLOCK_M = 16) give mma.sync there.

def _spec(name, kernel, pointers, ints, unit, div16, constexprs, num_warps=4, num_stages=3):
    signature = {**pointers, **{a: "i32" for a in ints}, **{a: "constexpr" for a in unit},
                 **{a: "constexpr" for a in constexprs}}
    signature = {a: signature[a] for a in kernel.arg_names}  # argument order
    return {
        "name": name,
        "kernel": kernel,
        "signature": signature,
        "constexprs": {**{a: 1 for a in unit}, **constexprs},
        # triton.compiler.ASTSource(attrs=...): {(argument index,): [[attribute, value]]}
        "attrs": {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16},
        "num_warps": num_warps, "num_stages": num_stages,
        "expect": {80: "mma.sync", 90: "wgmma" if constexprs["BLOCK_M"] >= 64 else "mma.sync"},
    }


def _int8_spec(name, ty, block_m, block_n, block_k, split_k=1):
    pointers = {"x_ptr": f"*{ty}", "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": f"*{ty}",
                "out_ptr": f"*{ty}", "ws_ptr": "*fp32", "split_ptr": "*i32"}
    unit = ("stride_xk", "stride_wk", "stride_scale", "stride_bias", "stride_on")
    ints = ("M", "N", "K", "stride_ws", "stride_xm", "stride_wn", "stride_om")
    div16 = (*pointers, "N", "K", "stride_xm", "stride_wn", "stride_om")
    spec = _spec(name, _int8_weight_mm_kernel, pointers, ints, unit, div16, {
        "HAS_BIAS": True, "USE_WORKSPACE": split_k > 1, "INPUT_PRECISION": "tf32",
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k})
    if ty == "fp16":
        # tests/test_triton_ptx.py: the int8 weights reach float16 through
        # _common.int8_to_float's inline PTX, with no int -> float16 cvt per value (128 per
        # thread and tile in the 64 x 128 x 128 spec before).
        spec["limits"] = {"cvt int->16-bit float": 0}
        spec["minimums"] = {"int8 inline PTX": 1}
    return spec


def _int4_spec(name, ty, one_group, block_m, block_n, block_k, split_k=1,
               kernel=None, with_meta=False, num_warps=4):
    """A spec of _int4_mm_kernel, or of `kernel` with int4's arguments plus, when
    with_meta, a uint8 meta_ptr with strides (stride_mn, stride_mk): the 2:4 + int4
    kernel of kernels/sparse24_int4.py."""
    pointers = {"x_ptr": f"*{ty}", "p_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*u8",
                "bias_ptr": f"*{ty}", "out_ptr": f"*{ty}", "ws_ptr": "*fp32", "split_ptr": "*i32"}
    unit = ["stride_xk", "stride_pk", "stride_sg", "stride_zg", "stride_bias", "stride_on"]
    ints = ["M", "N", "K", "GROUP_SIZE", "K_PACKED", "stride_ws", "stride_xm", "stride_pn",
            "stride_om"]
    if with_meta:
        pointers["meta_ptr"] = "*u8"
        unit.append("stride_mk")
        ints.append("stride_mn")
    # scales/zeros [N, G]: row stride G, 1 for per channel (G = 1), else e.g. K / 128
    (unit if one_group else ints).extend(["stride_sn", "stride_zn"])
    div16 = [*pointers, "N", "K", "GROUP_SIZE", "K_PACKED", "stride_xm", "stride_pn", "stride_om"]
    div16 += ["stride_mn"] if with_meta else []
    if not one_group:
        div16 += ["stride_sn", "stride_zn"]
    spec = _spec(name, kernel or _int4_mm_kernel, pointers, ints, unit, div16, {
        "HAS_BIAS": True, "ONE_GROUP": one_group, "USE_WORKSPACE": split_k > 1,
        "INPUT_PRECISION": "tf32",
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
        num_warps=num_warps)
    # Upper bounds on PTX instructions (tests/test_triton_ptx.py): the packed weights
    # are not loaded byte by byte (what is left are the zero points' loads, one per
    # column a thread holds: up to 16 in the 8-warp 128 x 128 tile on sm_80; a weight
    # tile loaded per k had 64-80 ld.global.b8), and the nibbles reach float16/bfloat16
    # without int -> float conversions (left: the zero points', at most 4). And a lower
    # bound: the nibbles go through _common.int4_minus_zero's inline PTX; in int4_mm no
    # byte is unpacked into a 16-bit register of its own (shr.u16: 32 per tile before).
    spec["limits"] = {"ld.global.b8": 16, "cvt int->16-bit float": 4}
    if kernel is None:
        spec["limits"]["shr.u16"] = 0
    spec["minimums"] = {"int4 inline PTX": 1}
    return spec


PTX_SPECS = [
    _int8_spec("int8_weight_mm_fp16", "fp16", 64, 128, 128),
    _int8_spec("int8_weight_mm_bf16", "bf16", 128, 128, 64),
    _int8_spec("int8_weight_mm_fp16_splitk", "fp16", 16, 64, 128, split_k=4),
    _int8_spec("int8_weight_mm_bf16_splitk", "bf16", 16, 128, 128, split_k=8),
    _int4_spec("int4_mm_fp16_grouped", "fp16", False, 64, 128, 64),
    _int4_spec("int4_mm_bf16_grouped", "bf16", False, 128, 128, 32, num_warps=8),
    _int4_spec("int4_mm_fp16_per_channel", "fp16", True, 64, 128, 64),
    _int4_spec("int4_mm_bf16_per_channel", "bf16", True, 64, 64, 32),
    _int4_spec("int4_mm_fp16_grouped_splitk", "fp16", False, 16, 128, 64, split_k=2),
    _int4_spec("int4_mm_bf16_grouped_splitk", "bf16", False, 16, 64, 128, split_k=8),
]
