"""The CUDA int8 tensor-core GEMM (csrc/cuda/int8_mm.cu) against the reference, bit for bit.

The kernel is exact by construction: int8 products summed in int32 on the tensor
cores (mma.m16n8k32 .s8), then the reference's float32 epilogue in the same
order with no FMA, then one round-to-nearest-even cast. So every comparison is
exact: float32 outputs bit-identical, fp16/bf16 outputs equal to the reference's
float32 result rounded once (NaN compared as NaN, -0.0 distinct from +0.0).

Two parts:
  * CPU (always runs): an emulation of one CTA tile as the kernel computes it:
    the cp.async loader's XOR-swizzled shared-memory layout, the ldmatrix.x4
    lane addresses, ldmatrix's and mma.m16n8k32's fragment layouts as the PTX ISA
    documents them, and the epilogue's (row, col) of each accumulator. It checks
    that the kernel's index formulas reconstruct A @ B.T and that its ldmatrix
    phases are free of shared-memory bank conflicts.
  * CUDA (the `cuda` marker; skipped without a GPU): torch.ops.pyfast_C.int8_mm
    and torch.ops.pyfast.int8_mm with the cuda backend forced, on odd shapes,
    every output and bias dtype, extremes, strided/unaligned inputs (the byte-load
    path), shapes that take the split-K path, K = 0, M = 0, and the error messages.
"""
from __future__ import annotations

import pytest
import torch

import pyfast
from pyfast import dispatch, ops, reference
from _helpers import FLOAT_DTYPES, assert_bits_equal, dtype_id

# --- CPU: emulation of the kernel's lanes ----------------------------------------------
# (BM, BN, WARPS_M, WARPS_N) of the three configurations in int8_mm.cu.
CONFIGS = {"small": (32, 64, 1, 4), "medium": (64, 128, 2, 2), "large": (128, 128, 2, 4)}
BK = 64


def swizzle(row: int, chunk: int) -> int:
    """int8_mm.cu swizzle(): byte offset of 16-byte chunk `chunk` of tile row `row`."""
    return row * BK + ((chunk ^ ((row >> 1) & 3)) << 4)


def store_tile(tile: torch.Tensor, threads: int) -> bytearray:
    """The loader: thread tid copies chunk ids tid + i * threads (row id // 4, chunk id % 4)."""
    rows = tile.shape[0]
    smem = bytearray(rows * BK)
    written = set()
    for i in range(rows * 4 // threads):
        for tid in range(threads):
            cid = tid + i * threads
            row, chunk = cid // 4, cid % 4
            off = swizzle(row, chunk)
            assert off not in written, "two chunks stored at one address"
            written.add(off)
            smem[off:off + 16] = tile[row, 16 * chunk:16 * chunk + 16].to(torch.uint8).tolist()
    assert len(written) == rows * 4
    return smem


def ldmatrix_x4(smem: bytearray, addrs):
    """PTX ISA "ldmatrix" .m8n8.x4 .b16: lanes 8j..8j+7 give the row addresses of matrix j;
    lane l gets in register j the 4 bytes at row l // 4, bytes 4 (l % 4)..+3 of matrix j."""
    for j in range(4):  # one phase per matrix: its 8 rows must hit 8 distinct bank groups
        slots = {(addrs[8 * j + r] % 128) // 16 for r in range(8)}
        assert len(slots) == 8, f"bank conflict in ldmatrix phase {j}: {addrs[8 * j:8 * j + 8]}"
    return [[bytes(smem[addrs[8 * j + l // 4] + 4 * (l % 4):][:4]) for j in range(4)]
            for l in range(32)]


def s8(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def mma_m16n8k32(acc, a_regs, b_regs) -> None:
    """PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8): rebuild A [16, 32] and B [32, 8]
    from the lanes' registers, add A @ B into the lanes' accumulators."""
    A = torch.full((16, 32), 999, dtype=torch.int64)
    B = torch.full((32, 8), 999, dtype=torch.int64)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(16):
            row = g if (i < 4 or 8 <= i < 12) else g + 8
            col = 4 * t + (i & 3) + (16 if i >= 8 else 0)
            A[row, col] = s8(a_regs[lane][i // 4][i % 4])
        for i in range(8):
            B[4 * t + (i & 3) + (16 if i >= 4 else 0), g] = s8(b_regs[lane][i // 4][i % 4])
    assert not bool((A == 999).any() or (B == 999).any()), "a fragment element is never loaded"
    D = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            acc[lane][i] += int(D[g + 8 * (i // 2), 2 * t + (i & 1)])


def emulate_cta(a: torch.Tensor, b: torch.Tensor, config: str) -> torch.Tensor:
    """One stage (k = 64) of one CTA tile, following int8_mm_kernel's index formulas."""
    BM, BN, WARPS_M, WARPS_N = CONFIGS[config]
    threads = 32 * WARPS_M * WARPS_N
    WM, WN = BM // WARPS_M, BN // WARPS_N
    smem_a, smem_b = store_tile(a, threads), store_tile(b, threads)
    out = torch.full((BM, BN), -(2**40), dtype=torch.int64)
    for warp in range(WARPS_M * WARPS_N):
        warp_m, warp_n = warp // WARPS_N, warp % WARPS_N
        acc = [[[[0] * 4 for _ in range(32)] for _ in range(WN // 8)] for _ in range(WM // 16)]
        for ks in range(BK // 32):
            af = [ldmatrix_x4(smem_a, [swizzle(warp_m * WM + i * 16 + l % 16, 2 * ks + l // 16)
                                       for l in range(32)]) for i in range(WM // 16)]
            bf = []
            for j in range(WN // 16):
                r = ldmatrix_x4(smem_b, [swizzle(warp_n * WN + j * 16 + (l // 16) * 8 + l % 8,
                                                 2 * ks + (l // 8) % 2) for l in range(32)])
                bf.append([[r[l][0], r[l][1]] for l in range(32)])
                bf.append([[r[l][2], r[l][3]] for l in range(32)])
            for i in range(WM // 16):
                for j in range(WN // 8):
                    mma_m16n8k32(acc[i][j], af[i], bf[j])
        for i in range(WM // 16):
            for j in range(WN // 8):
                for lane in range(32):
                    g, t = lane >> 2, lane % 4
                    for h in range(2):
                        m = warp_m * WM + i * 16 + g + 8 * h
                        n = warp_n * WN + j * 8 + 2 * t
                        out[m, n] = acc[i][j][lane][2 * h]
                        out[m, n + 1] = acc[i][j][lane][2 * h + 1]
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
def test_emulated_cta_tile_is_a_times_b_t(config):
    BM, BN, _, _ = CONFIGS[config]
    a = torch.randint(-128, 128, (BM, BK), dtype=torch.int8)
    b = torch.randint(-128, 128, (BN, BK), dtype=torch.int8)
    a[0], b[0] = -128, -128                       # extremes, and 0xff / 0x80 bytes
    b[1] = 127
    expected = a.long() @ b.long().T
    assert torch.equal(emulate_cta(a, b, config), expected)


def test_swizzle_is_a_permutation_of_chunks_within_each_row():
    for row in range(128):
        offs = sorted(swizzle(row, c) for c in range(4))
        assert offs == [row * BK + 16 * c for c in range(4)]


# --- CUDA --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_op():
    """torch.ops.pyfast_C.int8_mm, failing (not skipping) if the build has no CUDA kernel."""
    import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyfast_C::int8_mm", "CUDA"), (
        "pyfast._C has no CUDA kernel for pyfast_C::int8_mm; rebuild with a CUDA torch and nvcc")
    return torch.ops.pyfast_C.int8_mm


def mm_inputs(m, k, n, bias_dtype=torch.float32, with_bias=True, device="cuda"):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    a_scale = torch.rand(m, device=device) * 0.05 + 1e-3
    b_scale = torch.rand(n, device=device) * 0.02 + 1e-4
    bias = (torch.randn(n, device=device) * 10).to(bias_dtype) if with_bias else None
    return a, b, a_scale, b_scale, bias


def ref_of(a, b, a_scale, b_scale, bias, out_dtype):
    cpu = lambda t: t.cpu().contiguous()
    return reference.int8_mm(cpu(a), cpu(b), cpu(a_scale), cpu(b_scale),
                             None if bias is None else cpu(bias), out_dtype)


def check(op, a, b, a_scale, b_scale, bias, out_dtypes=FLOAT_DTYPES):
    for out_dtype in out_dtypes:
        out = op(a, b, a_scale, b_scale, bias, out_dtype)
        assert out.device == a.device and out.is_contiguous()
        assert_bits_equal(out, ref_of(a, b, a_scale, b_scale, bias, out_dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("n", (1, 7, 4096))
@pytest.mark.parametrize("k", (1, 15, 16, 48, 4095, 4096))
@pytest.mark.parametrize("m", (1, 3, 17, 64, 130, 1024))
def test_shapes(cuda_op, m, k, n):
    a, b, a_scale, b_scale, bias = mm_inputs(m, k, n)
    check(cuda_op, a, b, a_scale, b_scale, bias)
    check(cuda_op, a, b, a_scale, b_scale, None)


@pytest.mark.cuda
@pytest.mark.parametrize("m, k, n", [(1, 8192, 256), (5, 4096, 257), (33, 4096, 512),
                                     (64, 131071, 96), (200, 4096, 256), (129, 1000, 130)])
def test_split_k_shapes(cuda_op, m, k, n):
    # Few output tiles for the SMs and long K: these take the split-K path (int32
    # partial sums in a workspace, then the epilogue kernel); it must not change a bit.
    a, b, a_scale, b_scale, bias = mm_inputs(m, k, n)
    check(cuda_op, a, b, a_scale, b_scale, bias)
    check(cuda_op, a, b, a_scale, b_scale, None)


@pytest.mark.cuda
@pytest.mark.parametrize("bias_dtype", FLOAT_DTYPES + (torch.float64,), ids=dtype_id)
@pytest.mark.parametrize("m, k, n", [(17, 100, 130), (130, 4096, 257)])
def test_bias_dtypes(cuda_op, m, k, n, bias_dtype):
    check(cuda_op, *mm_inputs(m, k, n, bias_dtype=bias_dtype))


@pytest.mark.cuda
def test_extremes(cuda_op):
    # The largest K, every product (-128) * (-128): acc = 2147467264, one int32 step
    # from overflow; and (-128) * 127 on another row.
    k = ops.MAX_INT8_K
    a = torch.full((2, k), -128, dtype=torch.int8, device="cuda")
    b = torch.full((3, k), -128, dtype=torch.int8, device="cuda")
    b[1] = 127
    ones = torch.ones(3, device="cuda")
    check(cuda_op, a, b, torch.ones(2, device="cuda"), ones, None)
    # Only -128 and 127, on a large-M tile shape.
    _, _, a_scale, b_scale, bias = mm_inputs(130, 4096, 4096)
    a, b = (torch.where(torch.rand(*s, device="cuda") < 0.5, -128, 127).to(torch.int8)
            for s in ((130, 4096), (4096, 4096)))
    check(cuda_op, a, b, a_scale, b_scale, bias)


@pytest.mark.cuda
def test_special_values(cuda_op):
    a, b, a_scale, b_scale, bias = mm_inputs(5, 64, 33)
    a[0] = 0
    a_scale[0] = -1.0                  # acc 0 times a negative scale: -0.0 (no bias: stays -0.0)
    a_scale[1] = float("nan")          # a NaN row
    a_scale[2] = 1e-36                 # with b_scale 1e-8: subnormal results (no flush to zero)
    b_scale[3] = 1e-8
    bias[3] = 0.0
    a_scale[3] = 3e38                  # overflow to inf in float32, and in the fp16/bf16 cast
    bias[4] = float("inf")
    check(cuda_op, a, b, a_scale, b_scale, bias)
    check(cuda_op, a, b, a_scale, b_scale, None)


@pytest.mark.cuda
def test_k_zero_gives_bias_or_zeros(cuda_op):
    a, b, a_scale, b_scale, bias = mm_inputs(3, 0, 7)
    check(cuda_op, a, b, a_scale, b_scale, bias)
    check(cuda_op, a, b, a_scale, b_scale, None)
    out = cuda_op(a, b, a_scale, b_scale, None, torch.float32)
    assert torch.equal(out.cpu(), torch.zeros(3, 7))


@pytest.mark.cuda
@pytest.mark.parametrize("m, n", [(0, 7), (3, 0), (0, 0)])
def test_empty(cuda_op, m, n):
    a, b, a_scale, b_scale, bias = mm_inputs(m, 64, n)
    for out_dtype in FLOAT_DTYPES:
        out = cuda_op(a, b, a_scale, b_scale, bias, out_dtype)
        assert out.shape == (m, n) and out.dtype == out_dtype and out.device == a.device


@pytest.mark.cuda
def test_unaligned_and_strided(cuda_op):
    # K = 100 throughout; only how a and b sit in memory changes. Every case but the
    # first two and the last takes the byte-load path (base or row stride not 16-aligned).
    m, k, n = 130, 100, 257
    a, b, a_scale, b_scale, bias = mm_inputs(m, k, n)
    rand = lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, device="cuda")
    wide_a, wide_b = rand(2 * m, 2 * k + 3), rand(2 * n, 2 * k + 3)
    cases = {
        "contiguous (K % 16 != 0, row stride 100)": (a, b),
        "row stride 128 != K (16-aligned: cp.async path)": (rand(m, 128)[:, :k],
                                                            rand(n, 128)[:, :k]),
        "offset 1 (unaligned base)": (wide_a[:m, 1:k + 1], wide_b[:n, 3:k + 3]),
        "row stride 203": (wide_a[:m, :k], wide_b[:n, :k]),
        "every other row": (wide_a[::2, :k], wide_b[::2, :k]),
        "stride 2 along K (copied)": (wide_a[:m, :2 * k:2], wide_b[:n, 1:2 * k + 1:2]),
        "column-major (copied)": (a.T.contiguous().T, b.T.contiguous().T),
        "expanded rows, stride 0 (copied)": (a[:1].expand(m, k), b[:1].expand(n, k)),
    }
    for name, (x, w) in cases.items():
        assert x.shape == (m, k) and w.shape == (n, k), name
        try:
            check(cuda_op, x, w, a_scale, b_scale, bias)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e
    # Strided scale vectors and bias are made contiguous by the launcher.
    check(cuda_op, a, b, torch.rand(2 * m, device="cuda")[::2], b_scale,
          torch.randn(3 * n, device="cuda")[::3])


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
def test_through_dispatch(cuda_op, out_dtype):
    a, b, a_scale, b_scale, bias = mm_inputs(17, 100, 130)
    args = (a, b, a_scale, b_scale, bias, out_dtype)
    ref = ref_of(*args)
    with pyfast.use_backend(int8_mm="cuda"):
        assert dispatch.choose("int8_mm", "cuda", args).family == "cuda"
        assert_bits_equal(torch.ops.pyfast.int8_mm(*args), ref)
    with dispatch.use_backend("cuda"):
        assert dispatch.choose("int8_mm", "cuda", args).family == "cuda"
        assert_bits_equal(torch.ops.pyfast.int8_mm(*args), ref)


@pytest.mark.cuda
def test_error_messages(cuda_op):
    a, b, a_scale, b_scale, bias = mm_inputs(3, 16, 5)
    bad = {
        r"a has dtype Int; accepted: Char": (a.int(), b, a_scale, b_scale, bias, torch.float32),
        r"b is on cpu but a is on cuda": (a, b.cpu(), a_scale, b_scale, bias, torch.float32),
        r"a_scale is on cpu but a is on cuda": (a, b, a_scale.cpu(), b_scale, bias,
                                                torch.float32),
        r"b must be 2-D, got 1-D": (a, b[0], a_scale, b_scale, bias, torch.float32),
        r"b\.size\(1\) is 15 .*a\.size\(1\) = K = 16": (a, b[:, :15], a_scale, b_scale, bias,
                                                         torch.float32),
        r"a_scale has dtype Half; accepted: Float": (a, b, a_scale.half(), b_scale, bias,
                                                     torch.float32),
        r"b_scale\.size\(0\) is 4 .*b\.size\(0\) = N = 5": (a, b, a_scale, b_scale[:4], bias,
                                                            torch.float32),
        r"bias has dtype Int; accepted: a floating dtype or None": (
            a, b, a_scale, b_scale, bias.int(), torch.float32),
        r"bias\.size\(0\) is 4": (a, b, a_scale, b_scale, bias[:4], torch.float32),
        r"out_dtype is Int; accepted: Float, Half, BFloat16": (a, b, a_scale, b_scale, bias,
                                                               torch.int32),
    }
    for pattern, args in bad.items():
        with pytest.raises(RuntimeError, match=pattern):
            cuda_op(*args)
    k = ops.MAX_INT8_K + 1
    with pytest.raises(RuntimeError, match=r"K is 131072; int8_mm accepts K <= 131071"):
        cuda_op(torch.zeros(1, k, dtype=torch.int8, device="cuda"),
                torch.zeros(1, k, dtype=torch.int8, device="cuda"), a_scale[:1], b_scale[:1],
                None, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k, n", [(1, 15, 7), (17, 4096, 4096), (130, 1000, 257)])
def test_w8a8_mm(cuda_op, m, k, n, dtype):
    """The w8a8_mm op with the cuda backend forced (quantize_per_token.cu, then
    int8_mm.cu) against its definition, bit for bit."""
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    x[0, 0] = float("nan") if m > 1 else x[0, 0]
    _, w, _, w_scale, bias = mm_inputs(1, k, n)   # b [N, K], b_scale [N], bias [N]
    with pyfast.use_backend(w8a8_mm="cuda"):
        out = ops.w8a8_mm(x, w, w_scale, bias.to(dtype))
    want = reference.w8a8_mm(x.cpu(), w.cpu(), w_scale.cpu(), bias.to(dtype).cpu())
    assert out.dtype == dtype
    assert_bits_equal(out, want)
