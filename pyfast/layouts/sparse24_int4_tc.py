"""2:4 + int4 weights in sparse-tensor-core order (the CUDA kernel of sparse24_int4_mm_tc).

Input: the canonical 2:4 + int4 weight of pyfast/formats.py ("2:4 sparsity + int4
values"): packed uint8 [N, K/4] (byte G of row n holds the two kept codes of 4-group G:
low nibble = the first kept value, lower k; high nibble = the second) and meta uint8
[N, K/8] (two 2:4 meta nibbles per byte; reference.unpack_nibbles(meta) is the canonical
2:4 meta uint8 [N, K/4] of sparse24_mm). Both are repacked; scales float32 [N, G] and
zeros uint8 [N, G] stay canonical (the kernel reads them as they are). K must be a
multiple of 8, as in the canonical format.

codes_tc : int32 [ceil(N/16), ceil(K/64), 32, 2]
    Word codes_tc[t, j, 4*g + q, s] (t: 16-row tile, j: 64-k block, lane = 4*g + q with
    g = 0..7, q = 0..3, s = 0/1 the k32 step of the block) packs eight 4-bit nibbles.
    Nibble i, at bits [4i+3 : 4i], with r = i % 4 and h = i // 4, is code h (h = 0: the
    first kept value = low nibble of the canonical byte; h = 1: the second = high nibble)
    of 4-group G = 16j + 8s + q + 4*(r >> 1) of row n = 16t + g + 8*(r & 1):
        nibble i = (packed[n, G] >> (4*h)) & 0xF
    Padding: rows n >= N and groups G >= K/4 hold nibble 0. That code is not a zero
    weight (it dequantizes to -zero * scale), so the kernel must zero-fill x beyond K
    and never store the output rows n >= N.
meta_tc : int32 [ceil(N/16), ceil(K/64), 32]
    sparse24_tc.repack_meta(unpack_nibbles(meta)): sparse24_mm_tc's metadata order,
    exactly (pyfast/layouts/sparse24_tc.py; padding nibble 0b0100).
Words are the two's-complement int32 view of 32 bits (torch has no uint32 arithmetic on
every device), little-endian in memory. Both are permutations plus padding, so
`unrepack(*repack(packed, meta), N, K) == (packed, meta)` bit for bit.

Why this order (PTX ISA 9.1, 9.7.14.6.2.2 "Matrix Fragments for sparse mma.m16n8k32 with
.f16 and .bf16 types"): register r (r = 0..3) of the sparse A fragment of mma.sp m16n8k32
for lane (g, q) holds the two kept values of row g + 8*(r & 1), chunk q + 4*(r >> 1) of the
k32 step (chunk c of step s of block j = group 16j + 8s + c), the first kept value (lower
k, idx0 of the metadata nibble) in the low 16 bits. The kernel gets register r of step s
as lop3((word >> 4r) & 0x000F000F | MAGIC) from word codes_tc[t, j, lane, s]: nibble r
(h = 0) lands in the low half and nibble r + 4 (h = 1) in the high half. MAGIC = 0x6400
per half (1024.0 in fp16) or 0x4300 (128.0 in bf16) puts the code in the mantissa's low
bits, so each half is exactly MAGIC + code, and subtracting MAGIC + zero gives q - zero
exactly (|q - zero| <= 15 is exact in both types). One 8-byte load per lane per (tile,
64-k block) gives both steps' registers, the warp reading 256 contiguous bytes; meta_tc
is one 4-byte word per lane for the same (tile, block), as in sparse24_mm_tc.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _checks, reference  # reference: the canonical nibble (un)packing
from . import check_dims, check_repacked_tensor, sparse24_tc

Tensor = torch.Tensor

TILE_N = sparse24_tc.TILE_N            # 16 rows of W per mma.sp tile (m16 of m16n8k32)
BLOCK_K = sparse24_tc.BLOCK_K          # 64 k per block (two k32 steps)
LANES = sparse24_tc.LANES              # 32 lanes of a warp
STEPS = 2                              # k32 steps per block: one word per step per lane
GROUPS_PER_BLOCK = BLOCK_K // 4


def _check_nk(n, k) -> None:
    check_dims(n, k)
    if k % 8 != 0:
        raise ValueError(f"k must be a multiple of 8 (2:4 + int4 stores the indices of two "
                         f"groups of 4 per meta byte), got {k}")


def repacked_shape(n: int, k: int) -> Tuple[int, int, int, int]:
    """Shape of codes_tc for a weight of n rows and k columns:
    (ceil(n/16), ceil(k/64), 32, 2). meta_tc's is sparse24_tc.repacked_shape(n, k)."""
    _check_nk(n, k)
    return (-(-n // TILE_N), -(-k // BLOCK_K), LANES, STEPS)


def _check_packed(packed: Tensor) -> Tuple[int, int]:
    """(N, K) of a canonical packed uint8 [N, K/4]; TypeError / ValueError otherwise."""
    _checks.tensor("packed", packed, dtypes=(torch.uint8,), dim=2, layout="[N, K/4]")
    n, k = packed.shape[0], 4 * packed.shape[1]
    if k % 8:
        raise ValueError(f"packed has shape {tuple(packed.shape)}: dimension 1 (K/4) must be "
                         f"even, K = {k} must be a multiple of 8 (2:4 + int4 stores the "
                         "indices of two groups of 4 per meta byte)")
    return n, k


def check_canonical(packed: Tensor, meta: Tensor) -> Tuple[int, int]:
    """(N, K) of a canonical 2:4 + int4 weight: packed uint8 [N, K/4] with K % 8 == 0 and
    meta uint8 [N, K/8]; TypeError / ValueError naming the argument otherwise. Shapes and
    dtypes only (check_meta_values reads the values)."""
    n, k = _check_packed(packed)
    _checks.tensor("meta", meta, dtypes=(torch.uint8,), dim=2, layout="[N, K/8]")
    _checks.size("meta", meta, 0, n, "one row per output row N of packed")
    _checks.size("meta", meta, 1, k // 8, "meta is [N, K/8]: the indices of two groups of "
                 "4 per byte")
    return n, k


def check_meta_values(meta: Tensor) -> None:
    """ValueError unless every nibble of meta uint8 [N, K/8] is an ordered 2:4 index pair
    (idx0 < idx1): sparse24_tc.check_meta_values on the unpacked meta [N, K/4], whose
    message names the group as unpack_nibbles(meta)[n, G] (G = 2 * byte + nibble). Reads
    the data (one host sync): the op runs it on real tensors only."""
    sparse24_tc.check_meta_values(reference.unpack_nibbles(meta), "unpack_nibbles(meta)")


def repack_codes(packed: Tensor) -> Tensor:
    """Canonical packed uint8 [N, K/4] -> codes_tc int32 [ceil(N/16), ceil(K/64), 32, 2]
    (this module's docstring), on packed's device. Pure torch, shape-only control flow (it
    also runs on meta and fake tensors)."""
    n, k = _check_packed(packed)
    t, kb, _, _ = repacked_shape(n, k)
    p = packed.to(torch.int64)
    p = torch.nn.functional.pad(p, (0, kb * GROUPS_PER_BLOCK - k // 4, 0, t * TILE_N - n))
    shifts2 = torch.tensor([0, 4], device=packed.device, dtype=torch.int64)
    c = (p[..., None] >> shifts2) & 0xF                  # [n, G, h]: code h of group G
    # n = 16t + 8 r0 + g,  G = 16j + 8s + 4 r1 + q,  nibble i = 4h + 2 r1 + r0
    c = c.reshape(t, 2, 8, kb, 2, 2, 4, 2)               # [t, r0, g, j, s, r1, q, h]
    c = c.permute(0, 3, 2, 6, 4, 7, 5, 1)                # [t, j, g, q, s, h, r1, r0]
    c = c.reshape(t, kb, LANES, STEPS, 8)                # lane = 4g + q; last axis: i
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int64)
    words = (c << shifts).sum(dim=-1)                    # 0 .. 2**32 - 1
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)   # two's-complement int32
    return words.to(torch.int32).contiguous()


def unrepack_codes(codes_tc: Tensor, n: int, k: int) -> Tensor:
    """Exact inverse of repack_codes: codes_tc (of an N x K weight) -> the canonical packed
    uint8 [n, k/4] (padding dropped)."""
    check_repacked_codes(codes_tc, n, k)
    t, kb, _, _ = codes_tc.shape
    w = codes_tc.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=codes_tc.device, dtype=torch.int64)
    c = (w[..., None] >> shifts) & 0xF                   # [t, j, lane, s, i]
    c = c.reshape(t, kb, 8, 4, STEPS, 2, 2, 2)           # [t, j, g, q, s, h, r1, r0]
    c = c.permute(0, 7, 2, 1, 4, 6, 3, 5)                # [t, r0, g, j, s, r1, q, h]
    c = c.reshape(t * TILE_N, kb * GROUPS_PER_BLOCK, 2)[:n, : k // 4]
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).contiguous()


def repack(packed: Tensor, meta: Tensor) -> Tuple[Tensor, Tensor]:
    """Canonical (packed uint8 [N, K/4], meta uint8 [N, K/8]) -> (codes_tc, meta_tc), the
    reference of the op repack_sparse24_int4_tc. Does not read meta's values
    (check_meta_values does; the op runs it first), so it also runs on meta tensors."""
    check_canonical(packed, meta)
    return repack_codes(packed), sparse24_tc.repack_meta(reference.unpack_nibbles(meta))


def unrepack(codes_tc: Tensor, meta_tc: Tensor, n: int, k: int) -> Tuple[Tensor, Tensor]:
    """Exact inverse of repack: (codes_tc, meta_tc) of an N x K weight -> the canonical
    (packed uint8 [n, k/4], meta uint8 [n, k/8])."""
    check_repacked(codes_tc, meta_tc, n, k)
    meta24 = sparse24_tc.unrepack_meta(meta_tc, n, k)    # [n, k/4]
    return unrepack_codes(codes_tc, n, k), reference.pack_nibbles(meta24).contiguous()


def check_repacked_codes(codes_tc: Tensor, n: int, k: int, name: str = "codes_tc") -> None:
    """TypeError / ValueError naming `name` unless codes_tc is an int32 tensor of
    repacked_shape(n, k)."""
    check_repacked_tensor(codes_tc, name, torch.int32, repacked_shape(n, k), n, k,
                          "(ceil(N/16), ceil(K/64), 32, 2)", "repack_sparse24_int4_tc",
                          "uint8 [N, K/4] packed")


def check_repacked(codes_tc: Tensor, meta_tc: Tensor, n: int, k: int,
                   names: Tuple[str, str] = ("codes_tc", "meta_tc")) -> None:
    """TypeError / ValueError naming the argument unless codes_tc and meta_tc are the
    int32 tensors repack gives for an N x K weight."""
    check_repacked_codes(codes_tc, n, k, names[0])
    check_repacked_tensor(meta_tc, names[1], torch.int32, sparse24_tc.repacked_shape(n, k),
                          n, k, "(ceil(N/16), ceil(K/64), 32)", "repack_sparse24_int4_tc",
                          "uint8 [N, K/8] meta")
