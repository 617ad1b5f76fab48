"""pyfast/layouts/sparse24_tc.py: the sparse-tensor-core metadata order, on CPU.

1. repack_meta / unrepack_meta are exact inverses on odd shapes, and each word holds the
   nibbles the module docstring says (checked bit by bit with plain loops).
2. Bad input raises TypeError / ValueError naming the argument.
3. An emulation of csrc/cuda/sparse24_mm.cu, lane by lane, for both kernel
   configurations, both load paths and split-K: cp.async into the swizzled stage,
   ldmatrix.x4 as PTX ISA 9.7.14.5.15 defines it, the metadata word each lane reads, and
   mma.sp m16n8k32 with the sparsity selector as PTX ISA 9.7.14.6.1 / 9.7.14.6.2.2
   define it (thread pair 2*sel, 2*sel+1 of each quad supplies the metadata; the even
   thread chunks 0-3, the odd one chunks 4-7; row g in bits 0-15, row g+8 in bits
   16-31; A register r of thread (g, tig) holds the kept pair of row g + 8*(r % 2),
   chunk tig + 4*(r // 2); B register j holds rows 8j + 2tig, +1 of column g;
   accumulators c0..c3 at (g, 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)). The
   emulated output must equal the float64 dense product. The emulator is
   tests/_sparse_tc_emu.py (shared with the 2:4 + int4 kernel's test); every index
   formula there is the kernel's (same names): a change to one side must be mirrored.
"""
from __future__ import annotations

import math

import pytest
import torch

import pyfast
from pyfast import reference
from pyfast.layouts import sparse24_tc as L

from _helpers import dtype_id, random_24
from _sparse_tc_emu import LARGE, SMALL, Emu, make_plan



def canonical(n, k, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = random_24(n, k, dtype, gen=gen)
    values, meta = reference.sparse24_compress(w)
    return w, values, meta


# --- 1. round trip and the documented bit layout ------------------------------------

@pytest.mark.parametrize("n,k", [(1, 4), (3, 12), (16, 64), (17, 36), (40, 260), (33, 4100),
                                 (0, 8), (5, 0), (130, 68)], ids=lambda v: str(v))
def test_round_trip(n, k):
    _, _, meta = canonical(n, k, seed=n * 1000 + k)
    tc = L.repack_meta(meta)
    assert tc.dtype == torch.int32 and tc.is_contiguous()
    assert tuple(tc.shape) == L.repacked_shape(n, k) == (math.ceil(n / 16), math.ceil(k / 64), 32)
    back = L.unrepack_meta(tc, n, k)
    assert back.dtype == torch.uint8 and torch.equal(back, meta)


@pytest.mark.parametrize("n,k", [(17, 36), (40, 260)], ids=lambda v: str(v))
def test_word_bits_match_docstring(n, k):
    """meta_tc[t, j, 4g + q] bits [4c+3:4c] = nibble(16t + g, 16j + 4q + c), bits
    [16+4c+3:16+4c] = nibble(16t + g + 8, ...); padding 0b0100. Plain loops."""
    _, _, meta = canonical(n, k, seed=7)
    tc = L.repack_meta(meta)
    t_n, k_b, _ = tc.shape
    for t in range(t_n):
        for j in range(k_b):
            for lane in range(32):
                g, q = lane // 4, lane % 4
                word = int(tc[t, j, lane]) & 0xFFFFFFFF
                for half in range(2):
                    for c in range(4):
                        row, group = 16 * t + g + 8 * half, 16 * j + 4 * q + c
                        want = int(meta[row, group]) if row < n and group < k // 4 else 0b0100
                        assert (word >> (16 * half + 4 * c)) & 0xF == want, (t, j, lane, half, c)


def test_negative_words_round_trip():
    """Rows g + 8 with idx0 = 2, idx1 = 3 in the top nibble set bit 31 (negative int32)."""
    meta = torch.full((16, 16), 0b1110, dtype=torch.uint8)
    tc = L.repack_meta(meta)
    assert int(tc.min()) < 0
    assert torch.equal(L.unrepack_meta(tc, 16, 64), meta)


# --- 2. errors -------------------------------------------------------------------------

def test_errors():
    meta = torch.full((4, 3), 0b0100, dtype=torch.uint8)
    with pytest.raises(TypeError, match="meta has dtype torch.int32"):
        L.repack_meta(meta.to(torch.int32))
    with pytest.raises(TypeError, match="meta must be a torch.Tensor"):
        L.repack_meta([[4]])
    with pytest.raises(ValueError, match="meta must be 2-D"):
        L.repack_meta(meta[0])
    for bad in (0b0000, 0b0101, 0b0001, 0b1011, 0b0100 | 0x10):  # idx0 >= idx1 or bits 4-7
        m = meta.clone()
        m[2, 1] = bad
        with pytest.raises(ValueError, match=rf"meta\[2, 1\] = {bad} is not a 2:4 index pair"):
            L.check_meta_values(m)
        with pytest.raises(ValueError, match=rf"meta\[2, 1\] = {bad} is not a 2:4 index pair"):
            pyfast.ops.repack_sparse24_tc(m)       # the op runs the value check first
        with pytest.raises(ValueError, match=rf"meta\[2, 1\] = {bad} is not a 2:4 index pair"):
            torch.ops.pyfast.repack_sparse24_tc(m)
    with pytest.raises(ValueError, match="k must be a multiple of 4"):
        L.repacked_shape(4, 10)
    with pytest.raises(ValueError, match="n must be >= 0"):
        L.repacked_shape(-1, 8)
    with pytest.raises(TypeError, match="k must be an int"):
        L.repacked_shape(4, 8.0)
    tc = L.repack_meta(meta)
    with pytest.raises(ValueError, match=r"meta_tc has shape \(1, 1, 32\); for N = 17"):
        L.unrepack_meta(tc, 17, 12)
    with pytest.raises(TypeError, match="w_meta has dtype torch.int64"):
        L.check_repacked(tc.long(), 4, 12, name="w_meta")
    with pytest.raises(TypeError, match="meta_tc must be a torch.Tensor"):
        L.check_repacked(None, 4, 12)
    L.check_repacked(tc, 4, 12)


# --- 3. emulation of csrc/cuda/sparse24_mm.cu (tests/_sparse_tc_emu.py) --------------

EMU_CASES = [
    # (cfg, M, N, K, aligned (16-byte path), num_sms, split-K expected from make_plan)
    pytest.param(SMALL, 1, 40, 36, False, 132, False, id="small-M1-K36-4B"),
    pytest.param(SMALL, 3, 70, 160, True, 1, False, id="small-M3-K160-16B"),
    pytest.param(SMALL, 16, 17, 160, False, 1, False, id="small-M16-K160-4B"),
    pytest.param(SMALL, 5, 20, 784, True, 132, True, id="small-M5-K784-16B-splitK"),
    pytest.param(LARGE, 17, 20, 100, False, 1, False, id="large-M17-K100-4B"),
    pytest.param(LARGE, 130, 24, 144, True, 1, False, id="large-M130-K144-16B"),
    pytest.param(LARGE, 20, 9, 516, False, 132, True, id="large-M20-K516-4B-splitK"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("cfg,m,n,k,aligned,num_sms,want_split", EMU_CASES)
def test_kernel_emulation_matches_dense(cfg, m, n, k, aligned, num_sms, want_split, dtype):
    assert (cfg is SMALL) == (m <= 16), "the launcher picks SmallM exactly for M <= 16"
    assert not aligned or k % 16 == 0, "the launcher takes the 16-byte path only for K % 16 == 0"
    _, values, meta = canonical(n, k, dtype, seed=m + n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    out, splits = Emu(x, values, L.repack_meta(meta), bias, aligned).run(cfg, num_sms)
    assert (splits > 1) == want_split, f"make_plan gave {splits} splits"
    exact = torch.nn.functional.linear(x.double(), reference.sparse24_decompress(values, meta).double(),
                                       bias.double())
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


def test_plan_splits_cover_k_once():
    """Every k tile belongs to exactly one split, no split is empty, and small problems
    on many SMs split while large ones do not."""
    for cfg in (SMALL, LARGE):
        for m, n, k in [(1, 4096, 4096), (16, 11008, 4096), (64, 4096, 4096), (4096, 4096, 4096),
                        (1, 64, 8), (3, 1, 0), (17, 130, 516)]:
            if (cfg is SMALL) != (m <= 16):
                continue
            _, _, k_tiles, kps, splits = make_plan(cfg, m, n, k, 132)
            covered = [t for z in range(splits) for t in range(z * kps, min((z + 1) * kps, k_tiles))]
            assert covered == list(range(k_tiles))
            assert all(min((z + 1) * kps, k_tiles) > z * kps for z in range(splits)) or k_tiles == 0
    assert make_plan(SMALL, 1, 4096, 4096, 132)[4] > 1
    assert make_plan(LARGE, 4096, 4096, 4096, 132)[4] == 1
