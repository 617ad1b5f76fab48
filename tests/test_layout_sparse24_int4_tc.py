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
4. The whole kernel csrc/cuda/sparse24_int4_mm.cu, emulated lane by lane with the
   emulator of sparse24_mm.cu (tests/_sparse_tc_emu.py): its stage (codes chunks, the
   swizzled x tile, metadata, scale slots and zero words), the zero-point byte of each
   row, dequant2 in x.dtype, the mask of the k32 step that crosses K, mma.sp, split-K and
   the epilogue, for both configurations; the output must equal the float64 product with
   the weight rounded as the kernel rounds it.
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

from _sparse_tc_emu import LARGE, SMALL, Emu, swizzle

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


# --- 4. emulation of csrc/cuda/sparse24_int4_mm.cu (tests/_sparse_tc_emu.py) ------------

class Int4Emu(Emu):
    """sparse24_mm.cu's emulator with sparse24_int4_mm.cu's stage (codes, x, metadata,
    scale slots and zero words) and its in-register dequantization; every index formula
    is the kernel's (same names)."""

    def __init__(self, x, codes_tc, meta_tc, scales, zeros, group_size, bias):
        self.M, self.K = x.shape
        self.N, self.G = scales.shape
        self.dtype = x.dtype
        self.x = x.contiguous().view(torch.int16).flatten().tolist()
        self.codes = [w & 0xFFFFFFFF for w in codes_tc.flatten().tolist()]
        self.meta = [w & 0xFFFFFFFF for w in meta_tc.flatten().tolist()]
        self.T16, self.K64 = meta_tc.shape[0], meta_tc.shape[1]
        self.scales = scales.float().flatten().tolist()
        zb = zeros.flatten().tolist()
        zb += [0] * (-len(zb) % 4)                     # launch_helpers.h zero_words
        self.zero_words = [zb[i] | zb[i + 1] << 8 | zb[i + 2] << 16 | zb[i + 3] << 24
                           for i in range(0, len(zb), 4)]
        self.group_len = (self.K if self.K > 0 else 1) if group_size == -1 else group_size
        self.bias = None if bias is None else bias.double().tolist()
        pats = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        self.decode = pats.view(x.dtype).double()

    def new_stage(self, cfg):
        slots = cfg.BK // 32
        return {"sw": [0] * ((cfg.BN // 16) * cfg.KB64 * 32 * 2),
                "sx": [0] * (cfg.BM * cfg.X_ROW // 2), "se": [0] * (cfg.E_BYTES // 4),
                "ss": [0.0] * (slots * cfg.BN), "sz": [0] * (slots * cfg.BN)}

    def load_stage(self, cfg, st, n0, m0, k0):
        t0, kb0 = n0 // 16, k0 // 64
        for tid in range((cfg.BN // 16) * cfg.KB64 * 16):          # W_CHUNKS
            tl, jj, c = tid // (16 * cfg.KB64), (tid // 16) % cfg.KB64, tid % 16
            t, kb = t0 + tl, kb0 + jj
            ok = t < self.T16 and kb < self.K64
            dst = ((tl * cfg.KB64 + jj) * 256 + c * 16) // 4
            src = (t * self.K64 + kb) * 64 + 4 * c
            st["sw"][dst:dst + 4] = self.codes[src:src + 4] if ok else [0] * 4
        for idx in range(cfg.BM * cfg.X_CH):
            r, c = idx // cfg.X_CH, idx % cfg.X_CH
            m, k = m0 + r, k0 + 8 * c
            ok = m < self.M and k < self.K
            dst = (r * cfg.X_ROW + swizzle(cfg.X_CH, r, c) * 16) // 2
            st["sx"][dst:dst + 8] = self.x[m * self.K + k:][:8] if ok else [0] * 8
        self.load_meta(cfg, st["se"], n0, k0)
        for e in range((cfg.BK // 32) * cfg.BN):
            slot, row = e // cfg.BN, e % cfg.BN
            n = n0 + row
            grp = min((k0 + 32 * slot) // self.group_len, self.G - 1)
            ok = n < self.N
            idx = n * self.G + grp
            st["ss"][e] = self.scales[idx] if ok else 0.0
            st["sz"][e] = self.zero_words[idx >> 2] if ok else 0

    def a_fragment(self, cfg, st, cw, wn0, n0, i, slot, grp, kstep, s):
        """The four A registers of every lane for 16-row tile i, k32 step s: [32, 4, 2]
        16-bit patterns (dequant2 of int4_dequant.h, then the tail mask)."""
        bits, magic = MAGIC[self.dtype]
        lane = torch.arange(32)
        g, tig, h, r = lane >> 2, lane & 3, torch.arange(2), torch.arange(4)
        row = wn0 + 16 * i + g[:, None] + 8 * h[None, :]             # [32, 2]
        n = n0 + row
        byte = ((n & 3) * (self.G & 3) + grp) & 3
        z = (st["sz"][slot * cfg.BN + row] >> (8 * byte)) & 0xFF
        scale2 = st["ss"][slot * cfg.BN + row].to(self.dtype)          # Traits::pair
        zero2 = (magic + z.double()).to(self.dtype)
        q = (cw[:, s, None] >> (4 * r)) & 0x000F000F                   # [32, 4]
        halves = torch.stack((q & 0xFFFF, q >> 16), dim=2) | bits      # and_or(.., MAGIC)
        halves = halves.to(torch.int16).view(self.dtype)
        a = (halves - zero2[:, r & 1, None]) * scale2[:, r & 1, None]  # __hsub2, __hmul2
        a = a.view(torch.int16).long()
        if kstep + 32 > self.K:                                        # tail
            chunk = kstep // 4 + tig[:, None] + 4 * (r[None, :] >> 1)
            a[chunk >= self.K // 4] = 0
        return a

    def compute_stage(self, cfg, st, acc, n0, k0):
        for warp in range(cfg.THREADS // 32):
            wn0 = (warp % cfg.WARPS_N) * cfg.WN
            wm0 = (warp // cfg.WARPS_N) * cfg.WM
            for jj in range(cfg.KB64):
                e, cw = [], []
                for i in range(cfg.NT):
                    slot_w = (wn0 // 16 + i) * cfg.KB64 + jj
                    e.append(st["se"][slot_w * 32:][:32])
                    cw.append(st["sw"][2 * slot_w * 32:][:64].reshape(32, 2))
                for s in range(2):
                    kstep = k0 + 64 * jj + 32 * s
                    if kstep >= self.K:
                        continue
                    slot = 2 * jj + s
                    grp = min(kstep // self.group_len, self.G - 1)
                    a = [self.a_fragment(cfg, st, cw[i], wn0, n0, i, slot, grp, kstep, s)
                         for i in range(cfg.NT)]
                    b = self.x_fragments(cfg, st["sx"], wm0, jj, s)
                    for i in range(cfg.NT):
                        for j in range(cfg.MT):
                            self.mma_sp(acc[warp, i, j], a[i], b[j], e[i], s)


def _int4_problem(n, k, gs, dtype, seed):
    packed, meta = random_weight(n, k, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    groups = 1 if gs == -1 else k // gs
    scales = torch.rand(n, groups, generator=g) * 0.1 + 0.001
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=g)
    return packed, meta, scales, zeros


def _kernel_weight(packed, meta, scales, zeros, gs, dtype):
    """The kernel's W: (q - zero) * scale with the scale cast to x.dtype and the product
    rounded once to x.dtype (exact in float32 before the cast)."""
    w = reference.dequantize_sparse24_int4(packed, meta, scales.to(dtype).float(), zeros, gs)
    return w.to(dtype).double()


INT4_EMU_CASES = [
    # (cfg, M, N, K, group_size, num_sms, split-K expected)
    pytest.param(SMALL, 1, 40, 64, 32, 132, False, id="small-M1-K64-g32"),
    pytest.param(SMALL, 3, 70, 200, -1, 1, False, id="small-M3-K200-tail"),
    pytest.param(SMALL, 16, 17, 96, 32, 1, False, id="small-M16-K96-g32"),
    pytest.param(SMALL, 5, 20, 768, 128, 132, True, id="small-M5-K768-g128-splitK"),
    pytest.param(LARGE, 17, 20, 136, -1, 1, False, id="large-M17-K136-tail"),
    pytest.param(LARGE, 130, 24, 128, 64, 1, False, id="large-M130-K128-g64"),
    pytest.param(LARGE, 20, 9, 512, 32, 132, True, id="large-M20-K512-g32-splitK"),
]


@pytest.mark.parametrize("dtype", list(MAGIC), ids=str)
@pytest.mark.parametrize("cfg,m,n,k,gs,num_sms,want_split", INT4_EMU_CASES)
def test_int4_kernel_emulation_matches_dense(cfg, m, n, k, gs, num_sms, want_split, dtype):
    assert (cfg is SMALL) == (m <= 16), "the launcher picks SmallM exactly for M <= 16"
    packed, meta, scales, zeros = _int4_problem(n, k, gs, dtype, seed=m + n + k)
    codes_tc, meta_tc = L.repack(packed, meta)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    out, splits = Int4Emu(x, codes_tc, meta_tc, scales, zeros, gs, bias).run(cfg, num_sms)
    assert (splits > 1) == want_split, f"make_plan gave {splits} splits"
    exact = torch.nn.functional.linear(
        x.double(), _kernel_weight(packed, meta, scales, zeros, gs, dtype), bias.double())
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


def test_int4_kernel_emulation_tail_with_an_inf_scale():
    """Row 0 has scale inf, zero point 0 and every code >= 1, so its weights are all +inf
    and with x > 0 its outputs are +inf. The last k32 step of K = 200 crosses K; without
    the kernel's tail mask its padded codes (0) would give (0 - 0) * inf = NaN there."""
    n, k, dtype = 20, 200, torch.float16
    packed, meta, scales, zeros = _int4_problem(n, k, -1, dtype, seed=5)
    packed[0] |= 0x11
    scales[0], zeros[0] = float("inf"), 0
    x = torch.rand(2, k, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5
    codes_tc, meta_tc = L.repack(packed, meta)
    out, _ = Int4Emu(x, codes_tc, meta_tc, scales, zeros, -1, None).run(SMALL, 1)
    assert torch.isposinf(out[:, 0]).all()
    exact = x.double() @ _kernel_weight(packed, meta, scales, zeros, -1, dtype)[1:].T
    torch.testing.assert_close(out[:, 1:], exact, rtol=1e-12, atol=1e-12)
