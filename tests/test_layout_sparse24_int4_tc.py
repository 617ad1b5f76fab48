"""pyfast/layouts/sparse24_int4_tc.py: 2:4 + int4 weights in sparse-tensor-core order, on CPU.

1. repack / unrepack are exact inverses on odd shapes (padding included), each word of
   codes_tc holds the nibbles the module docstring says (plain loops), padding nibbles
   are 0, words are two's-complement int32, meta_tc is sparse24_tc's order exactly.
2. Bad input raises TypeError / ValueError naming the argument; meta and fake tensors.
3. The kernel contract, emulated lane by lane: each A-fragment register of mma.sp
   m16n8k32 is built from codes_tc as the CUDA kernel builds it ((word >> 4r) &
   0x000F000F, then | MAGIC), paired with the metadata nibble PTX ISA 9.1 9.7.14.6.2.2
   assigns to that row and chunk (from meta_tc: step s reads the words of lanes 4g + 2s
   (chunks 0-3) and 4g + 2s + 1 (chunks 4-7); bits [4c+3:4c] row g, [16+4c+3:16+4c] row
   g + 8), and scattered to its dense k by the 2-bit indices. The dense weight so rebuilt
   must equal reference.dequantize_sparse24_int4 exactly. The register -> (row, chunk)
   map here is the PTX one (register r of lane (g, q): row g + 8*(r & 1), chunk
   q + 4*(r >> 1)), written independently of the layout module's reshapes.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pyfast
from pyfast import reference
from pyfast.layouts import sparse24_int4_tc as L
from pyfast.layouts import sparse24_tc

ORDERED = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)   # idx0 < idx1 (PTX 9.7.14.6.1)
SHAPES = [(n, k) for n in (1, 15, 17, 33) for k in (8, 56, 64, 72, 200)]


def random_weight(n, k, seed=0):
    """Random codes (every value 0..15), ordered metadata, scales and zero points."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, generator=g)
    nib = torch.tensor(ORDERED, dtype=torch.uint8)[
        torch.randint(0, len(ORDERED), (n, k // 4), generator=g)]
    meta = reference.pack_nibbles(nib)
    return packed, meta


# --- 1. round trip and the documented bit layout ---------------------------------------

@pytest.mark.parametrize("n,k", SHAPES + [(0, 8), (5, 0), (130, 520)], ids=str)
def test_round_trip(n, k):
    packed, meta = random_weight(n, k, seed=n * 1000 + k)
    codes_tc, meta_tc = L.repack(packed, meta)
    assert codes_tc.dtype == meta_tc.dtype == torch.int32
    assert codes_tc.is_contiguous() and meta_tc.is_contiguous()
    t, j = math.ceil(n / 16), math.ceil(k / 64)
    assert tuple(codes_tc.shape) == L.repacked_shape(n, k) == (t, j, 32, 2)
    assert tuple(meta_tc.shape) == sparse24_tc.repacked_shape(n, k) == (t, j, 32)
    assert torch.equal(meta_tc, sparse24_tc.repack_meta(reference.unpack_nibbles(meta)))
    back_packed, back_meta = L.unrepack(codes_tc, meta_tc, n, k)
    assert back_packed.dtype == back_meta.dtype == torch.uint8
    assert torch.equal(back_packed, packed) and torch.equal(back_meta, meta)
    assert torch.equal(L.unrepack_codes(L.repack_codes(packed), n, k), packed)


@pytest.mark.parametrize("n,k", [(17, 72), (33, 200), (15, 56)], ids=str)
def test_word_bits_match_docstring(n, k):
    """codes_tc[t, j, 4g + q, s] nibble i (r = i % 4, h = i // 4) = code h of group
    16j + 8s + q + 4(r >> 1) of row 16t + g + 8(r & 1); padding 0. Plain loops."""
    packed, _ = random_weight(n, k, seed=3)
    words = L.repack_codes(packed)
    t_n, k_b, _, _ = words.shape
    for t in range(t_n):
        for j in range(k_b):
            for lane in range(32):
                g, q = lane // 4, lane % 4
                for s in range(2):
                    word = int(words[t, j, lane, s]) & 0xFFFFFFFF
                    for i in range(8):
                        r, h = i % 4, i // 4
                        row, group = 16 * t + g + 8 * (r & 1), 16 * j + 8 * s + q + 4 * (r >> 1)
                        want = ((int(packed[row, group]) >> (4 * h)) & 0xF
                                if row < n and group < k // 4 else 0)
                        assert (word >> (4 * i)) & 0xF == want, (t, j, lane, s, i)


def test_padding_nibbles_are_zero():
    n, k = 17, 72          # 15 padding rows, 56 padding k (14 groups) in the last block
    packed = torch.full((n, k // 4), 0xFF, dtype=torch.uint8)
    words = L.repack_codes(packed).to(torch.int64) & 0xFFFFFFFF
    nib = (words[..., None] >> (4 * torch.arange(8))) & 0xF       # [t, j, lane, s, i]
    assert int((nib == 15).sum()) == n * k // 2                    # every real code, once
    assert int((nib == 0).sum()) == nib.numel() - n * k // 2       # the rest is padding


def test_twos_complement_words():
    """Code 15 in nibble 7 sets bit 31: the int32 is negative and still round-trips."""
    packed = torch.full((16, 16), 0xFF, dtype=torch.uint8)
    words = L.repack_codes(packed)
    assert int(words.min()) == -1 and bool((words == -1).all())    # 0xFFFFFFFF
    packed[0, 0] = 0x0F                     # row 0, group 0: second code (h = 1) = 0
    words = L.repack_codes(packed)
    assert int(words[0, 0, 0, 0]) == 0xFFF0FFFF - 2 ** 32          # nibble 4 = bits 16..19
    assert (int(words[0, 0, 0, 0]) & 0x000F000F) == 0x0000000F    # register 0: (15, 0)
    assert torch.equal(L.unrepack_codes(words, 16, 64), packed)


# --- 2. errors, meta and fake tensors ----------------------------------------------------

def test_errors():
    packed, meta = random_weight(4, 16)
    with pytest.raises(TypeError, match="packed has dtype torch.int8; accepted: uint8"):
        L.repack_codes(packed.to(torch.int8))
    with pytest.raises(TypeError, match="packed must be a torch.Tensor, got list"):
        L.repack_codes([[1, 2]])
    with pytest.raises(ValueError, match=r"packed must be 2-D \[N, K/4\]"):
        L.repack_codes(packed[0])
    with pytest.raises(ValueError, match=r"packed has shape \(4, 3\): .*K = 12 must be a "
                                         "multiple of 8"):
        L.repack_codes(torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="meta has dtype torch.float32; accepted: uint8"):
        L.repack(packed, meta.float())
    with pytest.raises(ValueError, match=r"meta has shape \(4, 4\): dimension 1 must be 2"):
        L.repack(packed, torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"meta has shape \(3, 2\): dimension 0 must be 4"):
        L.repack(packed, meta[:3])
    with pytest.raises(ValueError, match="k must be a multiple of 8"):
        L.repacked_shape(4, 12)
    with pytest.raises(ValueError, match="n must be >= 0"):
        L.repacked_shape(-1, 8)
    with pytest.raises(TypeError, match="k must be an int"):
        L.repacked_shape(4, 8.0)
    codes_tc, meta_tc = L.repack(packed, meta)
    L.check_repacked(codes_tc, meta_tc, 4, 16)
    with pytest.raises(ValueError, match=r"codes_tc has shape \(1, 1, 32, 2\); for N = 17, "
                                         r"K = 16 it must be \(2, 1, 32, 2\)"):
        L.unrepack(codes_tc, meta_tc, 17, 16)
    with pytest.raises(ValueError, match="k must be a multiple of 8"):
        L.unrepack_codes(codes_tc, 4, 12)
    with pytest.raises(TypeError, match="codes_tc has dtype torch.int64; accepted: int32 "
                                        r"\(the output of repack_sparse24_int4_tc"):
        L.check_repacked(codes_tc.long(), meta_tc, 4, 16)
    with pytest.raises(ValueError, match=r"meta_tc has shape \(1, 1, 32, 2\)"):
        L.check_repacked(codes_tc, codes_tc, 4, 16)
    with pytest.raises(TypeError, match="my_meta must be a torch.Tensor"):
        L.check_repacked(codes_tc, None, 4, 16, names=("my_codes", "my_meta"))
    with pytest.raises(TypeError, match="codes_tc has dtype torch.uint8"):
        L.check_repacked(packed, meta_tc, 4, 16)       # a canonical weight is refused


@pytest.mark.parametrize("byte,group", [(0x40, 0), (0x04, 1), (0x54, 1), (0x74, 1)])
def test_meta_values_are_checked_by_the_op(byte, group):
    """Nibbles with idx0 >= idx1: the op names the first one as the unpacked [N, K/4]
    meta's group (G = 2 * byte + nibble); the layout function itself does not read values."""
    packed, meta = random_weight(3, 16)
    meta[2, 1] = byte                      # groups 2 (low nibble) and 3 (high nibble)
    msg = rf"unpack_nibbles\(meta\)\[2, {2 + group}\] = {(byte >> (4 * group)) & 0xF} is not"
    with pytest.raises(ValueError, match=msg):
        L.check_meta_values(meta)
    with pytest.raises(ValueError, match=msg):
        pyfast.ops.repack_sparse24_int4_tc(packed, meta)
    with pytest.raises(ValueError, match=msg):
        torch.ops.pyfast.repack_sparse24_int4_tc(packed, meta)
    L.repack(packed, meta)                 # shapes only


def test_meta_and_fake_tensors():
    packed = torch.empty(70, 50, dtype=torch.uint8, device="meta")
    meta = torch.empty(70, 25, dtype=torch.uint8, device="meta")
    codes_tc, meta_tc = L.repack(packed, meta)
    assert codes_tc.device.type == "meta" and tuple(codes_tc.shape) == (5, 4, 32, 2)
    assert tuple(meta_tc.shape) == (5, 4, 32)
    back = L.unrepack(codes_tc, meta_tc, 70, 200)
    assert [tuple(b.shape) for b in back] == [(70, 50), (70, 25)]
    # the op's fake: no data is read, so no value check either
    with FakeTensorMode():
        c, m = torch.ops.pyfast.repack_sparse24_int4_tc(
            torch.empty(17, 18, dtype=torch.uint8), torch.empty(17, 9, dtype=torch.uint8))
        assert tuple(c.shape) == (2, 2, 32, 2) and c.dtype == torch.int32
        assert tuple(m.shape) == (2, 2, 32) and m.dtype == torch.int32


# --- 3. the kernel contract, emulated ---------------------------------------------------

MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


def emulate_dense_codes(codes_tc, meta_tc, n_pad, k_pad):
    """The code of every dense position as the kernel's mma.sp sees it: [n_pad, k_pad]
    codes (int64) and a kept mask, from the A registers and metadata of every
    (tile t, block j, step s)."""
    codes = [[int(v) & 0xFFFFFFFF for v in lane_words]
             for lane_words in codes_tc.reshape(-1, 2).tolist()]
    metas = [int(v) & 0xFFFFFFFF for v in meta_tc.flatten().tolist()]
    t_n, k_b = codes_tc.shape[:2]
    dense = torch.full((n_pad, k_pad), -1, dtype=torch.int64)
    for t in range(t_n):
        for j in range(k_b):
            base = (t * k_b + j) * 32
            for s in range(2):
                # the four A registers of each lane for step s, as the kernel builds them
                regs = {}
                for lane in range(32):
                    word = codes[base + lane][s]
                    for r in range(4):
                        reg = (word >> (4 * r)) & 0x000F000F
                        regs[lane, r] = (reg & 0xFFFF, reg >> 16)   # (first, second) code
                for row in range(16):                # local row of the m16 tile
                    g, half = row % 8, row // 8
                    for c in range(8):               # chunk (4 k) of the k32 step
                        # metadata (PTX 9.7.14.6.2.2): thread 4g + 2s for chunks 0-3, the
                        # next one for chunks 4-7; row g in bits 0-15, row g + 8 in 16-31
                        e = metas[base + 4 * g + 2 * s + c // 4]
                        nib = (e >> (16 * half + 4 * (c % 4))) & 0xF
                        assert nib in ORDERED, (t, j, s, row, c, nib)
                        # A fragment: register r of lane (g, q) holds row g + 8 (r & 1),
                        # chunk q + 4 (r >> 1)
                        first, second = regs[4 * g + c % 4, half + 2 * (c // 4)]
                        k0 = 64 * j + 32 * s + 4 * c
                        n = 16 * t + row
                        dense[n, k0 + (nib & 3)] = first
                        dense[n, k0 + (nib >> 2)] = second
    return dense


@pytest.mark.parametrize("dtype", list(MAGIC), ids=str)
@pytest.mark.parametrize("n,k,gs", [(1, 64, 32), (15, 56, -1), (17, 72, -1), (33, 200, -1),
                                    (31, 192, 64), (17, 256, 128)], ids=str)
def test_kernel_emulation_matches_reference(n, k, gs, dtype):
    packed, meta = random_weight(n, k, seed=n + k)
    g = torch.Generator().manual_seed(k)
    groups = 1 if gs == -1 else k // gs
    scales = torch.rand(n, groups, generator=g) + 0.01
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=g)
    codes_tc, meta_tc = pyfast.ops.repack_sparse24_int4_tc(packed, meta)
    t_n, k_b = codes_tc.shape[:2]
    dense = emulate_dense_codes(codes_tc, meta_tc, 16 * t_n, 64 * k_b)
    kept = dense >= 0
    # padding: zero codes at the padding metadata's positions (idx 0 and 1 of each group)
    pad = torch.ones_like(kept)
    pad[:n, :k] = False
    assert bool((dense[pad & kept] == 0).all())
    assert int(kept[pad].sum()) == int(pad.sum()) // 2
    dense, kept = dense[:n, :k], kept[:n, :k]
    assert int(kept.sum()) == n * k // 2           # two kept values per group, no overlap
    # q - zero as the kernel gets it: MAGIC | code is MAGIC + code, minus (MAGIC + zero)
    bits, magic = MAGIC[dtype]
    gl = k if gs == -1 else gs
    z = zeros.repeat_interleave(gl, dim=1)
    halves = (bits | dense.clamp(min=0)).to(torch.int16).view(dtype)
    assert torch.equal(halves.double(), magic + dense.clamp(min=0).double())
    q_minus_z = (halves - (magic + z.to(dtype))).float()
    assert torch.equal(q_minus_z, (dense.clamp(min=0) - z.long()).float())
    w = torch.where(kept, q_minus_z * scales.repeat_interleave(gl, dim=1), 0.0)
    want = reference.dequantize_sparse24_int4(packed, meta, scales, zeros, gs)
    assert torch.equal(w, want)
