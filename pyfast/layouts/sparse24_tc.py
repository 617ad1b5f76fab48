"""2:4 metadata in sparse-tensor-core order (the CUDA kernel of sparse24_mm_tc).

Input: the canonical meta uint8 [N, K/4] of pyfast/formats.py (one byte per group of 4 k:
bits 0-1 idx0, bits 2-3 idx1, idx0 < idx1, bits 4-7 zero). Only the metadata changes
order; the values stay canonical [N, K/2] (the kernel's ldmatrix reads them as they are).

meta_tc : int32 [ceil(N/16), ceil(K/64), 32]
    Word meta_tc[t, j, 4*g + q] (t: 16-row tile, j: 64-k block, lane = 4*g + q with
    g = 0..7, q = 0..3) packs eight 4-bit nibbles, nibble = meta byte & 0xF:
        bits [4c+3 : 4c]        nibble of row 16t + g,     group 16j + 4q + c   (c = 0..3)
        bits [16+4c+3 : 16+4c]  nibble of row 16t + g + 8, group 16j + 4q + c
    (a group is 4 consecutive k: group G covers k = 4G .. 4G+3). The int32 is the
    two's-complement view of that 32-bit word.
    Padding: rows >= N and groups >= K/4 hold nibble 0b0100 (idx0 = 0, idx1 = 1), a
    valid ordered-metadata value; the kernel zero-fills the values and x there, so the
    padding adds exactly 0.

Why this order (PTX ISA 9.1, 9.7.14.6.1 "Sparse matrix storage" and 9.7.14.6.2.2
"Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16 types", Figure 122):
mma.sp m16n8k32 takes one 32-bit metadata register per thread; for sparsity selector s
the thread pair (T2s, T2s+1) of each quad g supplies it, T2s for chunks 0-3 (k 0..15 of
the k32 step) and T2s+1 for chunks 4-7, each with row g in bits 0-15 and row g+8 in
bits 16-31, chunk c at bits 4c (+16). The kernel runs a 64-k block as two k32 steps
with selectors s = 0 and 1, so lane q = 2s + h of quad g supplies chunks 4h..4h+3 of
step s = groups 8s + 4h + c = 4q + c of the block: one word per lane per (tile, block),
read by the warp as one contiguous 128-byte line.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _checks
from . import check_dims, check_repacked_tensor

Tensor = torch.Tensor

TILE_N = 16      # rows of W per mma.sp tile (m16 of m16n8k32)
BLOCK_K = 64     # k per metadata word set (two k32 steps)
LANES = 32
GROUPS_PER_BLOCK = BLOCK_K // 4
PAD_NIBBLE = 0b0100   # idx0 = 0, idx1 = 1


def _check_nk(n, k) -> None:
    check_dims(n, k)
    if k % 4 != 0:
        raise ValueError(f"k must be a multiple of 4 (2:4 groups along K), got {k}")


def repacked_shape(n: int, k: int) -> Tuple[int, int, int]:
    """Shape of meta_tc for a weight of n rows and k columns: (ceil(n/16), ceil(k/64), 32)."""
    _check_nk(n, k)
    return (-(-n // TILE_N), -(-k // BLOCK_K), LANES)


def check_meta_values(meta: Tensor, name: str = "meta") -> None:
    """Raise ValueError naming the first byte of meta uint8 [N, K/4] that is not a valid
    2:4 index pair (bits 4-7 set, or idx0 >= idx1): the tensor cores' behaviour on such
    metadata is undefined. Reads the data (one host sync), so the op runs it on real
    tensors only (pyfast/ops.py VALUE_CHECKS), never on the fake ones of torch.compile."""
    m = meta.to(torch.int64)
    bad = ((m >> 4) != 0) | ((m & 3) >= ((m >> 2) & 3))
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{r}, {c}] = {int(meta[r, c])} is not a 2:4 index pair: accepted bytes "
            "have bits 4-7 zero and idx0 = bits 0-1 < idx1 = bits 2-3 (pyfast/formats.py)")


def repack_meta(meta: Tensor) -> Tensor:
    """Canonical meta uint8 [N, K/4] -> meta_tc int32 [ceil(N/16), ceil(K/64), 32] on
    meta's device. Does not read the values' validity (check_meta_values does; the op
    repack_sparse24_tc runs it first), so it also runs on meta and fake tensors."""
    _checks.tensor("meta", meta, dtypes=(torch.uint8,), dim=2, layout="[N, K/4]")
    n, groups = meta.shape
    m = meta.to(torch.int64)
    t, kb, _ = repacked_shape(n, 4 * groups)
    padded = torch.full((t * TILE_N, kb * GROUPS_PER_BLOCK), PAD_NIBBLE, dtype=torch.int64,
                        device=meta.device)
    padded[:n, :groups] = m
    # [t, half, g, j, q, c]: row = 16t + 8*half + g, group = 16j + 4q + c.
    p = padded.reshape(t, 2, 8, kb, 4, 4)
    shifts = 4 * torch.arange(4, device=meta.device, dtype=torch.int64)
    halves = (p << shifts).sum(dim=5)                      # [t, half, g, j, q] 16-bit each
    words = halves[:, 0] | (halves[:, 1] << 16)            # [t, g, j, q]
    words = words.permute(0, 2, 1, 3).reshape(t, kb, LANES)  # lane = 4g + q
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's-complement int32
    return words.to(torch.int32).contiguous()


def unrepack_meta(meta_tc: Tensor, n: int, k: int) -> Tensor:
    """Exact inverse of repack_meta: meta_tc int32 [ceil(n/16), ceil(k/64), 32] ->
    canonical meta uint8 [n, k/4] (padding dropped)."""
    check_repacked(meta_tc, n, k)
    t, kb, _ = meta_tc.shape
    w = meta_tc.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=meta_tc.device, dtype=torch.int64)
    nib = (w[..., None] >> shifts) & 0xF                   # [t, j, lane, 8]
    # lane = 4g + q; nibble index = 4*half + c  ->  [t, j, g, q, half, c]
    nib = nib.reshape(t, kb, 8, 4, 2, 4)
    dense = nib.permute(0, 4, 2, 1, 3, 5).reshape(t * TILE_N, kb * GROUPS_PER_BLOCK)
    return dense[:n, : k // 4].to(torch.uint8).contiguous()


def check_repacked(meta_tc: Tensor, n: int, k: int, name: str = "meta_tc") -> None:
    """Raise TypeError / ValueError unless meta_tc is an int32 tensor of
    repacked_shape(n, k)."""
    check_repacked_tensor(meta_tc, name, torch.int32, repacked_shape(n, k), n, k,
                          "(ceil(N/16), ceil(K/64), 32)", "repack_sparse24_tc",
                          "uint8 [N, K/4] meta")