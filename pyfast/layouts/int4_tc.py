"""int4 weights in tensor-core fragment order: the layout int4_mm_tc's CUDA kernel reads.

The canonical int4 weight (pyfast/formats.py) is packed uint8 [N, K/2], row n holding
q[n, 0..K-1] two to a byte (low nibble = even k). `repack` rewrites it, once at layer
creation, so that each lane of a warp gets, with one 16-byte load, exactly the
mma.sync.m16n8k16 B-fragments it needs for 64 output columns and 16 k; `unrepack` is its
exact inverse. Scales and zeros are NOT repacked: the kernel reads the canonical float32
scales [N, G] and uint8 zeros [N, G].

Layout (the spec; csrc/cuda/int4_mm.cu reads exactly this)
-----------------------------------------------------------
    w_tc : int32 [NT, KT, 32, 4] contiguous,  NT = ceil(N / 64),  KT = ceil(K / 16)

The weight matrix W[n, k] (n < N, k < K; the codes q, 0..15) is zero-padded to
N_pad = 64 NT rows and K_pad = 16 KT columns (padding nibbles are 0), and cut into tiles of
16 k x 64 n. Tile (nt, kt) covers n in [64 nt, 64 nt + 64) and k in [16 kt, 16 kt + 16) and
is the 512 bytes w_tc[nt, kt] (so the tiles of one 64-column slice follow each other along
K: a warp streaming along K reads contiguous memory). Inside a tile, w_tc[nt, kt, lane]
is the 16 bytes (4 words) lane `lane` of a warp loads; with

    g = lane // 4          (PTX "groupID")
    t = lane % 4           (PTX "threadID_in_group")

word j (0..3) of that lane holds 8 nibbles, at bit 4 i + 16 e (i = 0..3, e = 0..1):

    q[n, k]  with  n = 64 nt + 8 (2 j + i // 2) + g
                   k = 16 kt + 8 (i % 2) + 2 t + e

Read as the kernel reads it: (word >> 4 i) & 0x000F000F puts nibble (i, e=0) in the low
16 bits and nibble (i, e=1) in the high 16 bits, i.e. one .f16x2/.bf16x2 register holding
k = ..+2t and k = ..+2t+1 of column n: for the 8-column block s = 2 j + i // 2 ("subtile"
s, columns 64 nt + 8 s .. + 7), i % 2 == 0 gives register b0 and i % 2 == 1 register b1
of that subtile's B fragment. That is the m16n8k16 B-fragment layout of PTX ISA 8.x,
section 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type",
multiplicand B (.f16/.bf16): b_r (r = 0..3) sits at row (k) = 2 t + (r & 1) + 8 (r >= 2),
column (n) = g, registers {b0, b1} then {b2, b3}. So one lane's 16 bytes are its B fragments
for the 8 subtiles (64 columns) of one k16 step, and a warp's 512 bytes are the whole
16 x 64 tile.

Words are 32-bit two's-complement integers (int32 because torch has no uint32 arithmetic
on every device); their bytes are little-endian on every CUDA device, which is how the
kernel reads them (16-byte cp.async, then 32-bit words). The layout is a permutation of
the nibbles plus zero padding, so `unrepack(repack(p), N, K) == p` bit for bit.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _checks, reference  # reference: the canonical nibble (un)packing
from . import check_dims, check_repacked_tensor

Tensor = torch.Tensor

TILE_N = 64            # output columns per tile (8 mma subtiles of n8)
TILE_K = 16            # k per tile (one mma k16 step)
LANES = 32             # lanes of a warp
WORDS = 4              # 32-bit words per lane per tile (16 bytes)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def repacked_shape(n: int, k: int) -> Tuple[int, ...]:
    """Shape of w_tc for an N x K weight: (ceil(N/64), ceil(K/16), 32, 4), int32.
    The weight is zero-padded to N_pad = 64 ceil(N/64) rows and K_pad = 16 ceil(K/16)."""
    check_dims(n, k)
    return (_ceil_div(n, TILE_N), _ceil_div(k, TILE_K), LANES, WORDS)


def repack(packed: Tensor) -> Tensor:
    """Canonical packed uint8 [N, K/2] -> w_tc int32 [ceil(N/64), ceil(K/16), 32, 4]
    (the layout in this module's docstring), on packed's device. Pure torch, shape-only
    control flow (it also runs on the fake tensors torch.compile traces with)."""
    _checks.tensor("packed", packed, dtypes=(torch.uint8,), dim=2, layout="[N, K/2]")
    n, k = packed.shape[0], 2 * packed.shape[1]
    nt, kt, _, _ = repacked_shape(n, k)
    q = reference.unpack_nibbles(packed).to(torch.int64)  # [N, K] codes 0..15
    q = torch.nn.functional.pad(q, (0, kt * TILE_K - k, 0, nt * TILE_N - n))  # zeros
    # n = 64 nt + 8 (2 j + i1) + g   and   k = 16 kt + 8 i0 + 2 t + e   (i = 2 i1 + i0)
    q = q.reshape(nt, 4, 2, 8, kt, 2, 4, 2)            # [nt, j, i1, g, kt, i0, t, e]
    q = q.permute(0, 4, 3, 6, 1, 7, 2, 5)              # [nt, kt, g, t, j, e, i1, i0]
    q = q.reshape(nt, kt, LANES, WORDS, 8)             # last axis: nibble slot 4 e + i
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * 4   # bit 16 e + 4 i
    words = (q << shifts).sum(dim=-1)                  # 0 .. 2**32 - 1
    words = words - (words >= 2 ** 31).to(torch.int64) * 2 ** 32       # as int32 bits
    return words.to(torch.int32).contiguous()


def unrepack(w_tc: Tensor, n: int, k: int) -> Tensor:
    """w_tc (from repack of an N x K weight) -> the canonical packed uint8 [N, K/2].
    Exact inverse of `repack`; the padding is dropped."""
    check_repacked(w_tc, n, k)
    nt, kt, _, _ = repacked_shape(n, k)
    words = w_tc.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=w_tc.device, dtype=torch.int64) * 4
    q = (words[..., None] >> shifts) & 0xF             # [nt, kt, lane, j, slot 4 e + i]
    q = q.reshape(nt, kt, 8, 4, 4, 2, 2, 2)            # [nt, kt, g, t, j, e, i1, i0]
    q = q.permute(0, 4, 6, 2, 1, 7, 3, 5)              # [nt, j, i1, g, kt, i0, t, e]
    q = q.reshape(nt * TILE_N, kt * TILE_K)[:n, :k]
    return reference.pack_nibbles(q.to(torch.uint8)).contiguous()


def check_repacked(w_tc: Tensor, n: int, k: int, name: str = "w_tc") -> None:
    """Raise TypeError / ValueError naming `name` unless w_tc is an int32 tensor of
    repacked_shape(n, k) (what repack gives for an N x K weight)."""
    if k % 2:
        raise ValueError(f"K = {k} must be even (two int4 per byte)")
    check_repacked_tensor(w_tc, name, torch.int32, repacked_shape(n, k), n, k,
                          "(ceil(N/64), ceil(K/16), 32, 4)", "repack_int4_tc",
                          "uint8 [N, K/2] weight")
