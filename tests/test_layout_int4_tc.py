"""The int4 tensor-core layout (pyfast/layouts/int4_tc.py), on CPU.

1. repack / unrepack: exact round trip on odd shapes, zero padding, the documented bit
   position of single nibbles, argument errors.
2. An emulation of csrc/cuda/int4_mm.cu, lane by lane: it uses the kernel's index
   formulas (copies into shared memory, the A swizzle, ldmatrix addresses, the scale
   table, the nibble extraction and magic-number dequantization, split-K) and feeds the
   registers to an mma.m16n8k16 built from the PTX ISA fragment tables (PTX ISA 8.x,
   9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type", and
   9.7.14.5.15 "ldmatrix"), which are written here independently of the kernel. If the
   repack, the kernel's indexing or this reading of the PTX tables disagree, the emulated
   product differs from the matmul with the dequantized weight.
Keep the emulation in step with int4_mm.cu: each helper names the kernel code it mirrors.
"""
from __future__ import annotations

import pytest
import torch

from pyfast import reference
from pyfast.layouts import int4_tc

LANE = torch.arange(32)
GID, TIG = LANE // 4, LANE % 4      # PTX groupID, threadID_in_group
THREADS, WARPS, STAGE_STEPS_PER_WARP = 128, 4, 4
MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


def _codes(n, k, gen):
    return torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)


# --- 1. repack / unrepack ------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 2), (5, 34), (64, 16), (70, 100), (130, 256), (3, 1030)])
def test_round_trip_and_zero_padding(n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    packed = reference.pack_nibbles(_codes(n, k, gen))
    w_tc = int4_tc.repack(packed)
    assert w_tc.dtype == torch.int32 and w_tc.is_contiguous()
    assert tuple(w_tc.shape) == int4_tc.repacked_shape(n, k)
    assert tuple(w_tc.shape) == (-(-n // 64), -(-k // 16), 32, 4)
    assert torch.equal(int4_tc.unrepack(w_tc, n, k), packed)
    # every padding nibble is 0: with all real codes 15, exactly N*K nibbles are nonzero
    full = int4_tc.repack(torch.full((n, k // 2), 0xFF, dtype=torch.uint8))
    words = full.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words[..., None] >> (4 * torch.arange(8))) & 0xF
    assert int((nibbles == 15).sum()) == n * k and int((nibbles == 0).sum()) == nibbles.numel() - n * k


@pytest.mark.parametrize("n,k", [(70, 100), (64, 32)])
def test_single_nibble_lands_where_the_spec_says(n, k):
    # the docstring: q[n, k] is in w_tc[nt, kt, 4 g + t, j] at bit 4 i + 16 e with
    # n = 64 nt + 8 (2 j + i // 2) + g,  k = 16 kt + 8 (i % 2) + 2 t + e
    for nn, kk in [(0, 0), (n - 1, k - 1), (37 % n, 19 % k), (9 % n, 10 % k)]:
        q = torch.zeros(n, k, dtype=torch.uint8)
        q[nn, kk] = 11
        w = int4_tc.repack(reference.pack_nibbles(q)).to(torch.int64) & 0xFFFFFFFF
        nt, r = divmod(nn, 64)
        s, g = divmod(r, 8)
        j, i1 = divmod(s, 2)
        kt, r = divmod(kk, 16)
        i0, r = divmod(r, 8)
        t, e = divmod(r, 2)
        want = torch.zeros_like(w)
        want[nt, kt, 4 * g + t, j] = 11 << (4 * (2 * i1 + i0) + 16 * e)
        assert torch.equal(w, want), (nn, kk)


def test_repack_runs_on_shapes_only():
    # the fake of repack_int4_tc runs repack on fake tensors: no data-dependent control flow
    w_tc = int4_tc.repack(torch.empty(70, 50, dtype=torch.uint8, device="meta"))
    assert (w_tc.device.type, w_tc.dtype, tuple(w_tc.shape)) == ("meta", torch.int32, (2, 7, 32, 4))
    assert tuple(int4_tc.unrepack(w_tc, 70, 100).shape) == (70, 50)


def test_repack_is_exact_on_every_byte_value():
    packed = torch.arange(256, dtype=torch.uint8).reshape(2, 128)   # N = 2, K = 256
    assert torch.equal(int4_tc.unrepack(int4_tc.repack(packed), 2, 256), packed)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="packed has dtype torch.int8"):
        int4_tc.repack(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed must be 2-D"):
        int4_tc.repack(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed must be a torch.Tensor"):
        int4_tc.repack([[1, 2]])
    w_tc = int4_tc.repack(torch.zeros(70, 50, dtype=torch.uint8))
    int4_tc.check_repacked(w_tc, 70, 100)
    with pytest.raises(TypeError, match="w_tc has dtype torch.uint8"):
        int4_tc.check_repacked(torch.zeros(70, 50, dtype=torch.uint8), 70, 100)
    with pytest.raises(ValueError, match=r"w_tc has shape \(2, 7, 32, 4\); for N = 130"):
        int4_tc.check_repacked(w_tc, 130, 100)
    with pytest.raises(ValueError, match=r"my_w has shape .* it must be \(2, 8, 32, 4\)"):
        int4_tc.check_repacked(w_tc, 70, 128, name="my_w")
    with pytest.raises(TypeError, match="w_tc must be a torch.Tensor"):
        int4_tc.check_repacked(None, 70, 100)
    with pytest.raises(ValueError, match="K = 99 must be even"):
        int4_tc.check_repacked(w_tc, 70, 99)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        int4_tc.repacked_shape(-1, 4)


# --- 2. lane-by-lane emulation of int4_mm.cu ------------------------------------------------

def ptx_mma_m16n8k16(a_regs, b_regs, c):
    """mma.m16n8k16.row.col.f32, built from the PTX ISA fragment tables only.
    a_regs [32, 4, 2], b_regs [32, 2, 2] (register r holds elements 2r (low), 2r+1 (high)),
    c [32, 4]; values as float64. Returns d [32, 4] = A @ B + C in float64."""
    A = torch.full((16, 16), float("nan"), dtype=torch.float64)
    B = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for i in range(8):   # a_i: row g (+8 for i in 2,3,6,7), col 2t + (i & 1) (+8 for i >= 4)
        row = GID + 8 * ((i // 2) % 2)
        col = 2 * TIG + (i & 1) + 8 * (i >= 4)
        A[row, col] = a_regs[:, i // 2, i % 2]
    for i in range(4):   # b_i: row 2t + (i & 1) (+8 for i >= 2), col g
        B[2 * TIG + (i & 1) + 8 * (i >= 2), GID] = b_regs[:, i // 2, i % 2]
    assert not A.isnan().any() and not B.isnan().any(), "fragments must cover the tiles"
    D = A @ B
    d = torch.empty(32, 4, dtype=torch.float64)
    for i in range(4):   # c_i: row g (+8 for i >= 2), col 2t + (i & 1)
        d[:, i] = D[GID + 8 * (i >= 2), 2 * TIG + (i & 1)]
    return d + c


def ldmatrix_x4(sa, addr):
    """ldmatrix.m8n8.x4.b16: lanes 8q..8q+7 give the row addresses (element offsets into
    sa) of matrix q; lane T receives, in register q, row T // 4, elements 2 (T % 4) and
    2 (T % 4) + 1 of matrix q. Returns [32, 4, 2]."""
    regs = torch.empty(32, 4, 2, dtype=sa.dtype)
    for q in range(4):
        base = addr[8 * q + LANE // 4] + 2 * (LANE % 4)
        regs[:, q, 0], regs[:, q, 1] = sa[base], sa[base + 1]
    return regs


def config_for(m):
    """int4_mm.cu dispatch_m: (MT, WN)."""
    return (1, 1) if m <= 16 else (2, 2) if m <= 32 else (4, 4)


def plan(m, n, k, mt, wn, sms=132):
    """int4_mm.cu launch(): grid and split-K plan. Returns (m_blocks, n_tiles, splits,
    steps_per_split)."""
    wk = WARPS // wn
    stage_steps = STAGE_STEPS_PER_WARP * wk
    nt_total, kt_total = -(-n // 64), -(-k // 16)
    m_blocks, n_tiles = -(-m // (16 * mt)), -(-nt_total // wn)
    stages = -(-kt_total // stage_steps)
    splits = -(-(2 * sms) // (m_blocks * n_tiles))
    splits = min(splits, max(1, stages // 2), max(1, k // (8 * m)))
    splits = max(1, min(splits, 65535))
    per = -(-stages // splits)
    return m_blocks, n_tiles, -(-stages // per), per * stage_steps


def dequant_pair(word, i, z2, s2, dtype):
    """The kernel's lop3 + __hsub2 + __hmul2 on nibble pair i of 32-bit words [32]:
    (word >> 4i) & 0x000F000F | MAGIC read as two dtype values, minus (MAGIC + zero),
    times the scale, each op rounded to dtype. Returns [32, 2] (low, high)."""
    magic = MAGIC[dtype][0]
    q = ((word >> (4 * i)) & 0x000F000F) | (magic | (magic << 16))
    halves = torch.stack((q & 0xFFFF, q >> 16), dim=1).to(torch.int16)  # bit patterns
    v = halves.view(dtype)                                   # 1024 + q / 128 + q exactly
    return (v - z2[:, None]) * s2[:, None]                   # torch rounds each op to dtype


def emulate_int4_mm_tc(x, w_tc, scales, zeros, group_size, bias, n, sms=132):
    """int4_mm.cu for x [M, K] float16/bfloat16, as a float64 [M, N] before the final cast
    (the kernel's float32 sums are exact for the integer-valued data used below)."""
    dtype = x.dtype
    m, k = x.shape
    mt_n, wn_n = config_for(m)
    wk_n = WARPS // wn_n
    stage_steps = STAGE_STEPS_PER_WARP * wk_n
    stage_k, rows, cols = 16 * stage_steps, 16 * mt_n, 64 * wn_n
    slots = stage_k // 32
    nt_total, kt_total = w_tc.shape[0], w_tc.shape[1]
    G = 1 if group_size == -1 else k // group_size
    group_len = k if group_size == -1 else group_size
    x_cols = -(-k // 8) * 8
    xp = torch.zeros(m, x_cols, dtype=dtype)
    xp[:, :k] = x                                            # the launcher's padded copy
    zflat = zeros.reshape(-1).to(torch.int64)
    zflat = torch.cat((zflat, zflat.new_zeros(-len(zflat) % 4)))
    zero_words = zflat[0::4] | zflat[1::4] << 8 | zflat[2::4] << 16 | zflat[3::4] << 24
    words_all = w_tc.to(torch.int64) & 0xFFFFFFFF            # [NT, KT, 32, 4]
    m_blocks, n_tiles, splits, steps_per_split = plan(m, n, k, mt_n, wn_n, sms)
    out = torch.zeros(m, n, dtype=torch.float64)
    for bx in range(m_blocks):
        m0 = bx * rows
        for by in range(n_tiles):
            tile0 = by * wn_n
            for bz in range(splits):
                step_begin = bz * steps_per_split
                step_end = min(kt_total, step_begin + steps_per_split)
                n_stages = -(-(step_end - step_begin) // stage_steps)
                acc = {w: torch.zeros(mt_n, 8, 32, 4, dtype=torch.float64) for w in range(WARPS)}
                for st in range(n_stages):
                    base_step = step_begin + st * stage_steps
                    # load_stage, A: chunk c of row `row` at chunk slot ch ^ (row & 7)
                    sa = torch.zeros(rows * stage_k, dtype=dtype)
                    for c in range(rows * stage_k // 8):
                        row, ch = divmod(c, stage_k // 8)
                        mm, kk = m0 + row, base_step * 16 + ch * 8
                        if mm < m and kk < x_cols:
                            dst = row * stage_k + (ch ^ (row & 7)) * 8
                            sa[dst:dst + 8] = xp[mm, kk:kk + 8]
                    # load_stage + convert: scale table conv[slot][cw][cg][cs]
                    conv_s = torch.zeros(slots * cols, dtype=dtype)
                    conv_z = torch.zeros(slots * cols, dtype=dtype)
                    for e in range(slots * cols):
                        slot, col = divmod(e, cols)
                        nn = tile0 * 64 + col
                        grp = min((base_step * 16 + slot * 32) // group_len, G - 1)
                        s_raw, z_word = 0.0, 0
                        idx = nn * G + grp
                        if nn < n:
                            s_raw, z_word = float(scales.reshape(-1)[idx]), int(zero_words[idx >> 2])
                        z = (z_word >> (8 * (idx & 3))) & 0xFF
                        cw, cs, cg = col // 64, (col % 64) // 8, col % 8
                        pos = slot * cols + cw * 64 + cg * 8 + cs
                        conv_s[pos] = torch.tensor(s_raw).to(dtype)
                        conv_z[pos] = torch.tensor(MAGIC[dtype][1] + z).to(dtype)
                    # compute_stage, per warp
                    for warp in range(WARPS):
                        wn, wk = warp % wn_n, warp // wn_n
                        nt = tile0 + wn
                        if nt >= nt_total:
                            continue
                        for kt in range(STAGE_STEPS_PER_WARP):
                            sis = wk * STAGE_STEPS_PER_WARP + kt
                            if base_step + sis >= step_end:
                                break
                            tab = (sis // 2) * cols + wn * 64 + GID[:, None] * 8 + torch.arange(8)
                            s2, z2 = conv_s[tab], conv_z[tab]         # [32 lanes, 8 subtiles]
                            words = words_all[nt, base_step + sis]   # this lane's 16 bytes
                            for mt in range(mt_n):
                                row = 16 * mt + (LANE & 15)
                                ch = 2 * sis + (LANE >> 4)
                                a = ldmatrix_x4(sa, row * stage_k + (ch ^ (row & 7)) * 8)
                                for j in range(4):
                                    for h in range(2):
                                        s = 2 * j + h
                                        b = torch.stack([dequant_pair(words[:, j], 2 * h + r,
                                                                      z2[:, s], s2[:, s], dtype)
                                                         for r in range(2)], dim=1)
                                        acc[warp][mt, s] = ptx_mma_m16n8k16(
                                            a.double(), b.double(), acc[warp][mt, s])
                # WK reduction (wk = 0 warp adds wk = 1.. in order), epilogue indices
                for warp in range(wn_n):
                    total = sum(acc[w2 * wn_n + warp] for w2 in range(wk_n))
                    nt = tile0 + warp
                    for mt in range(mt_n):
                        for s in range(8):
                            for r in range(4):
                                mm = m0 + 16 * mt + GID + 8 * (r >> 1)
                                nn = nt * 64 + 8 * s + 2 * TIG + (r & 1)
                                ok = (mm < m) & (nn < n)
                                out[mm[ok], nn[ok]] += total[mt, s][ok, r]   # ws or out
    if bias is not None:
        out += bias.double()
    return out


def oracle(x, packed, scales, zeros, group_size, bias):
    """x @ W^T + bias in float64, W = x.dtype(q - z) * x.dtype(scale) rounded to x.dtype:
    what the kernel multiplies by (pyfast.reference.int4_mm before its float32 rounding)."""
    w = reference.dequantize_int4(packed, scales.to(x.dtype).float(), zeros, group_size)
    out = x.double() @ w.to(x.dtype).double().T
    return out if bias is None else out + bias.double()


CASES = [  # (M, N, K, group_size, sms): every (MT, WN) configuration, split-K and K tails
    (1, 70, 96, 32, 132),      # MT=1: one column tile + a partial one, 6 of 16 steps
    (3, 64, 1024, 128, 4),     # MT=1, split-K into 2 (a GPU of 4 SMs), full stages
    (17, 130, 160, 32, 132),   # MT=2 WN=2: rows of a second m16 tile, K tail in a stage
    (40, 100, 50, -1, 132),    # MT=4 WN=4: K % 16 != 0 and K % 8 != 0, per channel
    (5, 8, 2048, 64, 132),     # MT=1, 4 splits; N = 8, less than one tile
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k,gs,sms", CASES, ids=lambda v: str(v))
def test_emulated_kernel_equals_the_matmul(m, n, k, gs, sms, dtype):
    gen = torch.Generator().manual_seed(m + n + k)
    G = 1 if gs == -1 else k // gs
    packed = reference.pack_nibbles(_codes(n, k, gen))
    zeros = torch.randint(0, 16, (n, G), generator=gen, dtype=torch.uint8)
    # integer activations and power-of-two scales: every product and sum is exact in
    # float32 and float64, so the emulation must equal the oracle bit for bit
    x = torch.randint(-3, 4, (m, k), generator=gen).to(dtype)
    scales = 2.0 ** torch.randint(-4, 3, (n, G), generator=gen).float()
    bias = torch.randint(-8, 9, (n,), generator=gen).float()
    w_tc = int4_tc.repack(packed)
    got = emulate_int4_mm_tc(x, w_tc, scales, zeros, gs, bias, n, sms=sms)
    assert torch.equal(got, oracle(x, packed, scales, zeros, gs, bias))


def test_emulated_kernel_random_values_and_rounded_scales():
    # non-exact data: scales rounded to bfloat16 and products rounded, as in the kernel
    gen = torch.Generator().manual_seed(7)
    m, n, k, gs = 2, 66, 128, 64
    packed = reference.pack_nibbles(_codes(n, k, gen))
    scales = torch.rand(n, k // gs, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (n, k // gs), generator=gen, dtype=torch.uint8)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    got = emulate_int4_mm_tc(x, int4_tc.repack(packed), scales, zeros, gs, None, n)
    want = oracle(x, packed, scales, zeros, gs, None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plan_splits_k_to_fill_the_gpu():
    # M = 1 on 4096 x 4096 (132 SMs): 64 column tiles x 4 splits = 256 CTAs
    assert plan(1, 4096, 4096, 1, 1) == (1, 64, 4, 64)
    # M = 128: 2 m-blocks x 16 tiles, reduction traffic caps splits at K / (8 M) = 4
    assert plan(128, 4096, 4096, 4, 4) == (2, 16, 4, 64)
    # every split holds >= 1 step and the splits cover all of K
    for args in [(1, 11008, 4096, 1, 1), (16, 4096, 11008, 1, 1), (64, 100, 50, 4, 4)]:
        m_blocks, n_tiles, splits, per = plan(*args)
        kt = -(-args[2] // 16)
        assert (splits - 1) * per < kt <= splits * per


@pytest.mark.parametrize("mt,wn", [(1, 1), (2, 2), (4, 4)])
def test_a_tile_swizzle_is_bank_conflict_free(mt, wn):
    # each 8-lane phase of ldmatrix reads 8 rows of 16 bytes: they must fall in 8
    # different 16-byte bank groups (byte address / 16 mod 8), as the swizzle intends
    stage_k = 16 * STAGE_STEPS_PER_WARP * (WARPS // wn)
    for sis in range(stage_k // 16):
        for m_t in range(mt):
            row = 16 * m_t + (LANE & 15)
            ch = 2 * sis + (LANE >> 4)
            byte = 2 * (row * stage_k + (ch ^ (row & 7)) * 8)
            for q in range(4):
                assert len(set((byte[8 * q:8 * q + 8] // 16 % 8).tolist())) == 8
