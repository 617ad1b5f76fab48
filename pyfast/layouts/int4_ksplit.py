"""int4 weights cut into chunks along K: the layout int4_mm_ksplit's C++ CPU kernel reads.

The canonical int4 weight (pyfast/formats.py) is packed uint8 [N, K/2], row n holding
q[n, 0..K-1] two to a byte (low nibble = even k). `repack` cuts its columns into C equal
chunks and stores them one after the other; `unrepack` is its exact inverse. Scales and
zeros are NOT repacked: the kernel reads the canonical float32 scales [N, G] and uint8
zeros [N, G] (chunk c uses the columns of its own groups; per channel, column 0).

Layout
------
    w_ks : uint8 [C, N, K / (2 C)] contiguous,  w_ks[c] = packed[:, c K/(2C) : (c+1) K/(2C)]

so chunk c is itself a canonical packed weight of the K/C columns [c K/C, (c + 1) K/C).
K / C must be a multiple of the group size (32, 64 or 128: a chunk holds whole groups)
and, per channel, of 32 (check_chunks says why).

Why: at M = 1 the CPU kernel holds x, cut into int8 slices (4 bytes per column,
csrc/cpu/weight_only_slices.cpp), in the 32 KiB L1 while it streams the weight. Up to
K = 6144 a whole row's x fits and each thread reads its rows as long sequential streams;
past that, in the canonical layout, it reads each row in segments (one chunk of x at a
time), and the hardware prefetchers serve that pattern about 37 GB/s against 48 for
sequential streams (a C++ model of both on this project's Zen 4, 2 threads, K = 11008,
weights rotated past the L3; ad hoc). In this layout each chunk of every row is one
contiguous [N, K/(2C)] block: a thread reads its rows of chunk 0 sequentially, then
those of chunk 1. `chunks_for` gives the C that "auto" uses.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import check_dims

Tensor = torch.Tensor

# The most columns whose x slices fit in L1 beside the weight stream: 6144 columns are
# 48 blocks of 512 bytes, 24 KiB (weight_only_slices.cpp, kChunkBytes and one_chunk).
MAX_CHUNK_K = 6144
BLOCK_K = 128          # the kernel's block of columns (one 64-byte load of nibbles)
MAX_CHUNKS = 16        # "auto" looks no further (K up to 98304)
PANEL_K = 32           # columns the AVX-512 large-M panels permute within


def chunks_for(k: int, group_size: int) -> Optional[int]:
    """The chunk count "auto" stores an N x K int4 weight in: the fewest C >= 2 with
    K / C a multiple of 128 (whole kernel blocks, so whole groups) and at most
    MAX_CHUNK_K; None when K <= MAX_CHUNK_K (one chunk already fits: the canonical layout
    is as fast) or no such C <= MAX_CHUNKS exists."""
    check_dims(0, k)
    del group_size  # a multiple of 128 is a multiple of every group size (32, 64, 128, K)
    if k <= MAX_CHUNK_K:
        return None
    for c in range(2, MAX_CHUNKS + 1):
        if k % c == 0 and (k // c) % BLOCK_K == 0 and k // c <= MAX_CHUNK_K:
            return c
    return None


def check_chunks(k: int, chunks, group_size: int) -> None:
    """TypeError / ValueError unless `chunks` (an int >= 1) cuts K columns into equal
    chunks of whole groups of group_size and of a multiple of 32 columns (per channel,
    group_size -1: the AVX-512 panels of the large-M path permute x in blocks of 32
    columns, which must not straddle two chunks)."""
    if isinstance(chunks, bool) or not isinstance(chunks, (int, torch.SymInt)):
        raise TypeError(f"chunks must be an int, got {type(chunks).__name__} {chunks!r}")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    unit = PANEL_K if group_size == -1 else max(group_size, PANEL_K)
    if k % chunks or (k // chunks) % unit:
        what = (f"a multiple of {unit} columns" if group_size == -1 else
                f"whole groups of {group_size}")
        raise ValueError(f"chunks = {chunks} does not cut K = {k} into equal chunks of {what}; "
                         f"accepted: a divisor C of K with K / C a multiple of {unit}")


def repack(packed: Tensor, chunks: int) -> Tensor:
    """Canonical packed uint8 [N, K/2] -> w_ks uint8 [C, N, K/(2C)] (C = chunks), on
    packed's device. Exact (a permutation of the bytes)."""
    n, half = packed.shape
    return packed.reshape(n, chunks, half // chunks).transpose(0, 1).contiguous()


def unrepack(w_ks: Tensor) -> Tensor:
    """w_ks uint8 [C, N, K/(2C)] -> the canonical packed uint8 [N, K/2]. Exact inverse of
    `repack`."""
    c, n, part = w_ks.shape
    return w_ks.transpose(0, 1).reshape(n, c * part)


def check_repacked(w_ks: Tensor, n: int, k: int, group_size: int, name: str = "w_ks") -> None:
    """Raise TypeError / ValueError naming `name` unless w_ks is a uint8 [C, N, K/(2C)]
    tensor whose C chunks hold whole groups of group_size (what repack gives)."""
    if not isinstance(w_ks, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (from repack_int4_ksplit), got "
                        f"{type(w_ks).__name__}")
    if w_ks.dtype != torch.uint8:
        raise TypeError(f"{name} has dtype {w_ks.dtype}; accepted: uint8 (the output of "
                        "repack_int4_ksplit)")
    spec = "[C, N, K / (2 C)] (repack_int4_ksplit of the packed uint8 [N, K/2])"
    if w_ks.dim() != 3 or w_ks.shape[1] != n or w_ks.shape[0] < 1 or \
            2 * w_ks.shape[0] * w_ks.shape[2] != k:
        raise ValueError(f"{name} has shape {tuple(w_ks.shape)}; for N = {n}, K = {k} it must "
                         f"be {spec}")
    check_chunks(k, int(w_ks.shape[0]), group_size)
