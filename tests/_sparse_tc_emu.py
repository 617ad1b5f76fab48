"""A lane-by-lane emulation of the 2:4 sparse-tensor-core kernels of csrc/cuda
(sparse24_mm.cu; tests/test_layout_sparse24_int4_tc.py extends it to sparse24_int4_mm.cu),
shared by their CPU tests: cp.async into the swizzled stage, ldmatrix.x4 as PTX ISA
9.7.14.5.15 defines it, the metadata word each lane reads, mma.sp m16n8k32 with the
sparsity selector as PTX ISA 9.7.14.6.1 / 9.7.14.6.2.2 define it, the split-K plan, the
epilogue and the ordered reduction. Every index formula is the kernels' (same names); a
change to one side must be mirrored in the other. Emulated sums are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MEANINGFUL = {0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110}  # PTX 9.7.14.6.1, ordered


@dataclass(frozen=True)
class Cfg:  # template Config<BN, BM, BK, WARPS_N, WARPS_M, STAGES, MIN_CTAS, TARGET_WAVES, MIN_KT>
    BN: int
    BM: int
    BK: int
    WARPS_N: int
    WARPS_M: int
    STAGES: int
    TARGET_WAVES: int
    MIN_KTILES_PER_SPLIT: int

    THREADS = property(lambda s: 32 * s.WARPS_N * s.WARPS_M)
    WN = property(lambda s: s.BN // s.WARPS_N)
    WM = property(lambda s: s.BM // s.WARPS_M)
    NT = property(lambda s: s.WN // 16)
    MT = property(lambda s: s.WM // 8)
    KB64 = property(lambda s: s.BK // 64)
    V_ROW = property(lambda s: s.BK)          # bytes
    X_ROW = property(lambda s: 2 * s.BK)
    V_CH = property(lambda s: s.V_ROW // 16)
    X_CH = property(lambda s: s.X_ROW // 16)
    E_BYTES = property(lambda s: (s.BN // 16) * s.KB64 * 32 * 4)
    OUT_LD = property(lambda s: s.BN + 8)


SMALL = Cfg(64, 16, 128, 4, 1, 4, 3, 2)   # using SmallM
LARGE = Cfg(128, 128, 64, 2, 4, 4, 1, 4)  # using LargeM


def swizzle(ch, r, c):
    return c ^ ((r >> 1) & 3) if ch == 4 else c ^ (r & 7)


def make_plan(cfg, M, N, K, num_sms):
    m_tiles, n_tiles = -(-M // cfg.BM), -(-N // cfg.BN)
    k_tiles = -(-K // cfg.BK)
    tiles = m_tiles * n_tiles
    target = cfg.TARGET_WAVES * (num_sms if num_sms > 0 else 1)
    splits = 1
    if tiles < target and k_tiles >= 2 * cfg.MIN_KTILES_PER_SPLIT:
        splits = min(-(-target // tiles), k_tiles // cfg.MIN_KTILES_PER_SPLIT, 32)
    kps = max(-(-k_tiles // splits), 1)
    splits = 1 if k_tiles == 0 else -(-k_tiles // kps)
    return m_tiles, n_tiles, k_tiles, kps, splits


# Index tables of the PTX fragment layouts (g = lane // 4, tig = lane % 4).
_lane = torch.arange(32)
HALF = torch.arange(2)
LDM_ROW_LANE = 8 * torch.arange(4)[None, :] + (_lane // 4)[:, None]      # [32, 4]
LDM_COL = 2 * (_lane % 4)                                                # [32]
_r, _ch = torch.arange(16)[:, None], torch.arange(8)[None, :]
# 9.7.14.6.2.2 metadata: thread 4g + 2 sel + ch // 4, row half r // 8 -> bits 16 * half,
# chunk ch % 4 -> 4 bits each.
SP_E_LANE = [4 * (_r % 8) + 2 * sel + _ch // 4 for sel in (0, 1)]        # [16, 8] each
SP_E_SHIFT = 16 * (_r // 8) + 4 * (_ch % 4)
# A register of thread (g, tig): reg = half + 2 * (chunk >= 4), chunk = tig + 4 * (reg // 2).
SP_A_LANE = (4 * (_r % 8) + _ch % 4).expand(16, 8)
SP_A_REG = (_r // 8 + 2 * (_ch // 4)).expand(16, 8)
# B register j of thread (g, tig): rows 8j + 2tig, +1 of column g.
_k, _col = torch.arange(32)[:, None], torch.arange(8)[None, :]
MMA_B_LANE = (4 * _col + (_k % 8) // 2).expand(32, 8)
MMA_B_REG = (_k // 8).expand(32, 8)
MMA_B_HALF = (_k % 2).expand(32, 8)
# accumulators: c_q at row g + 8 (q >> 1), column 2 tig + (q & 1).
_q = torch.arange(4)[None, :]
ACC_ROW = (_lane // 4)[:, None] + 8 * (_q >> 1)
ACC_COL = 2 * (_lane % 4)[:, None] + (_q & 1)


class Emu:
    """Global tensors as Python lists of 16-bit patterns / 32-bit words, as the kernel sees them."""

    def __init__(self, x, values, meta_tc, bias, aligned):
        self.M, self.K = x.shape
        self.N = values.shape[0]
        self.x = x.contiguous().view(torch.int16).flatten().tolist()
        self.vals = values.contiguous().view(torch.int16).flatten().tolist()
        self.meta = [w & 0xFFFFFFFF for w in meta_tc.flatten().tolist()]
        self.T16, self.K64 = meta_tc.shape[0], meta_tc.shape[1]
        self.bias = None if bias is None else bias.double().tolist()
        self.aligned = aligned
        pats = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        self.decode = pats.view(x.dtype).double()  # value of bit pattern p at p + 32768

    def f(self, bits):
        return self.decode[bits + 32768]

    def new_stage(self, cfg):
        """Empty shared-memory regions of one pipeline stage (16-bit / 32-bit lists)."""
        return {"sv": [0] * (cfg.BN * cfg.V_ROW // 2), "sx": [0] * (cfg.BM * cfg.X_ROW // 2),
                "se": [0] * (cfg.E_BYTES // 4)}

    def load_stage(self, cfg, st, n0, m0, k0):
        sv, sx, se = st["sv"], st["sx"], st["se"]
        M, N, K, half_k = self.M, self.N, self.K, self.K // 2
        if self.aligned:  # 16-byte chunks
            for idx in range(cfg.BN * cfg.V_CH):
                r, c = idx // cfg.V_CH, idx % cfg.V_CH
                n, k = n0 + r, k0 + 16 * c
                ok = n < N and k < K
                dst = (r * cfg.V_ROW + swizzle(cfg.V_CH, r, c) * 16) // 2
                sv[dst:dst + 8] = self.vals[n * half_k + k // 2:][:8] if ok else [0] * 8
            for idx in range(cfg.BM * cfg.X_CH):
                r, c = idx // cfg.X_CH, idx % cfg.X_CH
                m, k = m0 + r, k0 + 8 * c
                ok = m < M and k < K
                dst = (r * cfg.X_ROW + swizzle(cfg.X_CH, r, c) * 16) // 2
                sx[dst:dst + 8] = self.x[m * K + k:][:8] if ok else [0] * 8
        else:  # 4-byte elements
            v4, x4 = cfg.V_ROW // 4, cfg.X_ROW // 4
            for idx in range(cfg.BN * v4):
                r, e = idx // v4, idx % v4
                n, k, b = n0 + r, k0 + 4 * e, 4 * e
                ok = n < N and k < K
                dst = (r * cfg.V_ROW + swizzle(cfg.V_CH, r, b // 16) * 16 + b % 16) // 2
                sv[dst:dst + 2] = self.vals[n * half_k + k // 2:][:2] if ok else [0, 0]
            for idx in range(cfg.BM * x4):
                r, e = idx // x4, idx % x4
                m, k, b = m0 + r, k0 + 2 * e, 4 * e
                ok = m < M and k < K
                dst = (r * cfg.X_ROW + swizzle(cfg.X_CH, r, b // 16) * 16 + b % 16) // 2
                sx[dst:dst + 2] = self.x[m * K + k:][:2] if ok else [0, 0]
        self.load_meta(cfg, se, n0, k0)

    def load_meta(self, cfg, se, n0, k0):
        """Metadata chunks: 128 bytes per (16-row tile, 64-k block), clamped to the last."""
        for tid in range(cfg.E_BYTES // 16):
            tl, jj, w = tid // (8 * cfg.KB64), (tid // 8) % cfg.KB64, tid % 8
            t, kb = min(n0 // 16 + tl, self.T16 - 1), min(k0 // 64 + jj, self.K64 - 1)
            src = (t * self.K64 + kb) * 32 + 4 * w
            dst = (tl * cfg.KB64 + jj) * 32 + 4 * w
            se[dst:dst + 4] = self.meta[src:src + 4]

    @staticmethod
    def ldmatrix_x4(smem, lane_addr):
        """PTX ldmatrix .m8n8.x4.b16: lanes 8q..8q+7 address rows 0..7 of matrix q; lane l
        gets (row l // 4, elements 2 (l % 4), +1) of matrix q in register q.
        smem: int64 tensor of 16-bit patterns; lane_addr: int64 [32] half offsets.
        Returns [32 lanes, 4 registers, 2 halves] bit patterns."""
        row_addr = lane_addr[LDM_ROW_LANE]                 # [32, 4]: lane 8q + l // 4
        return smem[row_addr[:, :, None] + LDM_COL[:, None, None] + HALF[None, None, :]]

    def mma_sp(self, acc, a, b, e, sel):
        """PTX mma.sp::ordered_metadata m16n8k32 .f32: acc [32, 4] += A(16x32) B(32x8).
        a, b: [32, 4, 2] bit patterns, e: [32] metadata words, sel: sparsity selector."""
        word = e[SP_E_LANE[sel]]                           # [16 rows, 8 chunks]
        nib = (word >> SP_E_SHIFT) & 0xF
        assert all(int(v) in MEANINGFUL for v in nib.unique()), "invalid metadata nibble"
        kept = self.f(a[SP_A_LANE, SP_A_REG])              # [16, 8, 2] values of each chunk
        A = torch.zeros(16, 8, 4, dtype=torch.float64)
        A.scatter_(2, (nib & 3)[:, :, None], kept[:, :, :1])   # idx0 <- first kept value
        A.scatter_(2, (nib >> 2)[:, :, None], kept[:, :, 1:])  # idx1 <- second
        B = self.f(b[MMA_B_LANE, MMA_B_REG, MMA_B_HALF])   # [32 k, 8 cols]
        D = A.reshape(16, 32) @ B
        acc += D[ACC_ROW, ACC_COL]

    def run(self, cfg, num_sms):
        """The whole launch: grid (m_tiles, n_tiles, splits), then epilogue or reduction.
        Returns the float64 [M, N] output before the final rounding."""
        M, N = self.M, self.N
        m_tiles, n_tiles, k_tiles, kps, splits = make_plan(cfg, M, N, self.K, num_sms)
        out = [[None] * N for _ in range(M)]
        partial = [[[0.0] * N for _ in range(M)] for _ in range(splits)] if splits > 1 else None
        for bx in range(m_tiles):
            for by in range(n_tiles):
                for z in range(splits):
                    m0, n0 = bx * cfg.BM, by * cfg.BN
                    kt_begin = z * kps
                    n_kt = max(min(kt_begin + kps, k_tiles) - kt_begin, 0)
                    acc = {(warp, i, j): torch.zeros(32, 4, dtype=torch.float64)
                           for warp in range(cfg.THREADS // 32)
                           for i in range(cfg.NT) for j in range(cfg.MT)}
                    for kt in range(n_kt):
                        k0 = (kt_begin + kt) * cfg.BK
                        st = self.new_stage(cfg)
                        self.load_stage(cfg, st, n0, m0, k0)
                        self.compute_stage(cfg, {key: torch.tensor(v) for key, v in st.items()},
                                           acc, n0, k0)
                    acc_lists = {key: frag.tolist() for key, frag in acc.items()}
                    self.epilogue(cfg, acc_lists, m0, n0, out,
                                  None if partial is None else partial[z])
        if partial is not None:  # splitk_reduce_kernel: sum in split order, + bias
            for m in range(M):
                for n in range(N):
                    s = 0.0
                    for z in range(splits):
                        s += partial[z][m][n]
                    out[m][n] = s + (self.bias[n] if self.bias is not None else 0.0)
        return torch.tensor(out, dtype=torch.float64).reshape(M, N), splits

    def x_fragments(self, cfg, sx, wm0, jj, s):
        """load_x_fragments (csrc/cuda/sparse_mma.h): the B registers of the MT m-tiles."""
        b = []
        for j in range(cfg.MT):
            addr = []
            for lane in range(32):
                r = wm0 + 8 * j + (lane & 7)
                c = jj * 8 + s * 4 + (lane >> 3)
                addr.append((r * cfg.X_ROW + swizzle(cfg.X_CH, r, c) * 16) // 2)
            b.append(self.ldmatrix_x4(sx, torch.tensor(addr)))
        return b

    def compute_stage(self, cfg, st, acc, n0, k0):
        sv, sx, se = st["sv"], st["sx"], st["se"]
        for warp in range(cfg.THREADS // 32):
            warp_n, warp_m = warp % cfg.WARPS_N, warp // cfg.WARPS_N
            wn0, wm0 = warp_n * cfg.WN, warp_m * cfg.WM
            for jj in range(cfg.KB64):
                e = [se[((wn0 // 16 + i) * cfg.KB64 + jj) * 32:][:32] for i in range(cfg.NT)]
                for s in range(2):
                    a = []
                    for i in range(cfg.NT):
                        addr = []
                        for lane in range(32):
                            r = wn0 + 16 * i + (lane & 7) + ((lane >> 3) & 1) * 8
                            c = jj * 4 + s * 2 + (lane >> 4)
                            addr.append((r * cfg.V_ROW + swizzle(cfg.V_CH, r, c) * 16) // 2)
                        a.append(self.ldmatrix_x4(sv, torch.tensor(addr)))
                    b = self.x_fragments(cfg, sx, wm0, jj, s)
                    for i in range(cfg.NT):
                        for j in range(cfg.MT):
                            self.mma_sp(acc[warp, i, j], a[i], b[j], e[i], s)

    def epilogue(self, cfg, acc, m0, n0, out, partial):
        M, N = self.M, self.N
        if partial is not None:
            for (warp, i, j), frag in acc.items():
                wn0 = (warp % cfg.WARPS_N) * cfg.WN
                wm0 = (warp // cfg.WARPS_N) * cfg.WM
                for lane in range(32):
                    g, tig = lane >> 2, lane & 3
                    for q in range(4):
                        n = n0 + wn0 + 16 * i + g + 8 * (q >> 1)
                        m = m0 + wm0 + 8 * j + 2 * tig + (q & 1)
                        if n < N and m < M:
                            partial[m][n] = frag[lane][q]
            return
        s_out = [None] * (cfg.BM * cfg.OUT_LD)
        for (warp, i, j), frag in acc.items():
            wn0 = (warp % cfg.WARPS_N) * cfg.WN
            wm0 = (warp // cfg.WARPS_N) * cfg.WM
            for lane in range(32):
                g, tig = lane >> 2, lane & 3
                for q2 in range(2):
                    nl = wn0 + 16 * i + g + 8 * q2
                    n = n0 + nl
                    bv = self.bias[n] if self.bias is not None and n < N else 0.0
                    for q1 in range(2):
                        ml = wm0 + 8 * j + 2 * tig + q1
                        s_out[ml * cfg.OUT_LD + nl] = frag[lane][2 * q2 + q1] + bv
        chunks = cfg.BN // 8
        for idx in range(cfg.BM * chunks):
            r, c = idx // chunks, idx % chunks
            m, n = m0 + r, n0 + 8 * c
            if m >= M or n >= N:
                continue
            for e2 in range(8):  # the uint4 store and the scalar tail copy the same 8 values
                if n + e2 < N:
                    assert out[m][n + e2] is None, "output element written twice"
                    out[m][n + e2] = s_out[r * cfg.OUT_LD + 8 * c + e2]
