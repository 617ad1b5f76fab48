"""The int8 weight in VNNI panel order (the CPU kernel of w8a8_mm_vnni).

Input: the canonical int8 weight [N, K] (pyfast/formats.py: nn.Linear's [out, in]).

w_vnni : int8 [ceil(N/48), ceil(K/4), 48, 4]
    w_vnni[j, t, c, q] = w[48 j + c, 4 t + q]; zero where 48 j + c >= N or 4 t + q >= K.
    A panel j is the 48 output columns 48 j .. 48 j + 47 over all of K, one contiguous
    run of 192 * ceil(K/4) bytes.

Why this order (Intel SDM vol. 2C, VPDPBUSD; csrc/cpu/int8_vnni_avx512.cpp): vpdpbusd
adds to each of the 16 int32 lanes of a zmm the dot product of 4 consecutive bytes of
each source. With 4 consecutive k of one output column per lane, one 64-byte load is 16
columns x 4 k, and one 4-byte value of x broadcast to all lanes feeds all 16 columns:
an outer-product kernel with one int32 accumulator lane per output, no horizontal sums
and no repeated loads of x per column. Three such vectors (48 columns) per k step are
one 192-byte run, so the kernel streams each panel sequentially from memory, which
the hardware prefetchers follow; the canonical [N, K] weight is read as 4 separate rows
per tile instead. The zero padding multiplies zero-padded x, so it adds exactly 0.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import check_dims, check_repacked_tensor

Tensor = torch.Tensor

PANEL_N = 48     # output columns per panel: 3 zmm of 16 int32 accumulators
GROUP_K = 4      # bytes of K per vpdpbusd lane


def repacked_shape(n: int, k: int) -> Tuple[int, int, int, int]:
    """Shape of w_vnni for a weight of n rows and k columns: (ceil(n/48), ceil(k/4), 48, 4)."""
    check_dims(n, k)
    return (-(-n // PANEL_N), -(-k // GROUP_K), PANEL_N, GROUP_K)


def repack(w: Tensor) -> Tensor:
    """Canonical int8 [N, K] -> w_vnni int8 [ceil(N/48), ceil(K/4), 48, 4] on w's device.
    Exact: a permutation of the bytes plus zero padding."""
    n, k = w.shape
    nt, kt, _, _ = repacked_shape(n, k)
    wp = torch.nn.functional.pad(w, (0, kt * GROUP_K - k, 0, nt * PANEL_N - n))  # zeros
    return wp.reshape(nt, PANEL_N, kt, GROUP_K).permute(0, 2, 1, 3).contiguous()


def unrepack(w_vnni: Tensor, n: int, k: int) -> Tensor:
    """w_vnni (from repack of an N x K weight) -> the canonical int8 [N, K]; exact
    inverse of `repack`, the padding dropped."""
    check_repacked(w_vnni, n, k)
    nt, kt, _, _ = repacked_shape(n, k)
    w = w_vnni.permute(0, 2, 1, 3).reshape(nt * PANEL_N, kt * GROUP_K)
    return w[:n, :k].contiguous()


def check_repacked(w_vnni: Tensor, n: int, k: int, name: str = "w_vnni") -> None:
    """Raise TypeError / ValueError naming `name` unless w_vnni is an int8 tensor of
    repacked_shape(n, k) (what repack gives for an N x K weight)."""
    check_repacked_tensor(w_vnni, name, torch.int8, repacked_shape(n, k), n, k,
                          "(ceil(N/48), ceil(K/4), 48, 4)", "repack_int8_vnni",
                          "int8 [N, K] weight")
