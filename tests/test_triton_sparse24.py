"""The Triton 2:4 sparse matmul (kernels/sparse24.py) against the reference.

Without a GPU it runs in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1). The interpreter computes tl.dot on bfloat16 inputs wrongly
(an upstream bug), so bfloat16 is checked here on inputs upcast to float32 (exact
for bfloat16 values) and for real on a GPU by the `cuda` tests. The oracle is
pyfast.reference.sparse24_mm; the tolerance is twice PyTorch's own F.linear error
in the same dtype (tests/_helpers.linear_tolerance).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyfast
from pyfast import ops, reference
from pyfast.kernels import sparse24

from _helpers import (assert_near_exact, assert_same_nonfinite, decompress24, dtype_id,
                      random_24, weight_pruning_col, x_with_nonfinite)

ROOT = Path(__file__).resolve().parents[1]
# Where the unmarked tests run: CPU tensors in the interpreter, CUDA tensors on a GPU
# machine (Triton launches nothing on CPU tensors there).
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "") == "1" else "cuda"
INTERPRETED_DTYPES = (torch.float16, torch.float32)


def make_case(m, k, n, dtype, bias, device=DEVICE, x_layout="contiguous"):
    """(x, values, meta, bias, w64): a 2:4 weight with groups of 0, 1 and 2 nonzeros."""
    gen = torch.Generator().manual_seed(1000 * m + 10 * k + n)
    w = random_24(n, k, dtype=dtype, gen=gen)
    values, meta = ops.sparse24_compress(w)
    if x_layout == "transposed":          # x.stride() == (1, M)
        x = torch.randn(k, m, generator=gen).to(dtype).t()
    elif x_layout == "strided":           # every other column of a wider matrix
        x = torch.randn(m, 2 * k, generator=gen).to(dtype)[:, ::2]
    else:
        x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(values), to(meta), to(b), w.double().to(device)


def check(out, x, values, meta, bias, w64, dtype, what):
    assert_near_exact(out, reference.sparse24_mm(x, values, meta, bias), x, w64, bias, what)


# --- direct calls, every size class ------------------------------------------------

@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", (7, 33, 130))
@pytest.mark.parametrize("k", (4, 36, 100, 256))
@pytest.mark.parametrize("m", (0, 1, 3, 17))
def test_matches_reference(m, k, n, dtype):
    bias = (m + k + n) % 2 == 0      # half the cases with bias, spread over the sizes
    x, values, meta, b, w64 = make_case(m, k, n, dtype, bias)
    out = sparse24.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, f"M={m} K={k} N={n} bias={bias}")


# The 6 bytes (idx0 | idx1 << 2, idx0 < idx1) that formats.py allows; the kernel picks a
# value for position p from the byte itself (position 0 only from v0, 3 only from v1).
VALID_META = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
def test_every_index_pair_at_every_group(dtype):
    """Each row holds every valid meta byte, in a different order per row, so each byte
    meets each group (and each position of the K tile's quarters)."""
    n, k = 18, 4 * 48
    gen = torch.Generator().manual_seed(7)
    codes = torch.tensor(VALID_META, dtype=torch.uint8)
    meta = torch.stack([codes[torch.randperm(6, generator=gen)].repeat(k // 24)
                        for _ in range(n)])
    values = torch.randn(n, k // 2, generator=gen).to(dtype)
    x = torch.randn(3, k, generator=gen).to(dtype)
    w64 = reference.sparse24_decompress(values, meta).double()
    assert {int(b) for b in meta.unique()} == set(VALID_META)
    x, values, meta, w64 = (t.to(DEVICE) for t in (x, values, meta, w64))
    out = sparse24.sparse24_mm(x, values, meta, None)
    check(out, x, values, meta, None, w64, dtype, "every index pair")


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_bias_and_no_bias(dtype, bias):
    x, values, meta, b, w64 = make_case(5, 68, 40, dtype, bias)
    out = sparse24.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, f"bias={bias}")


@pytest.mark.parametrize("x_layout", ("transposed", "strided"))
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
def test_non_contiguous_x(dtype, x_layout):
    x, values, meta, b, w64 = make_case(17, 100, 33, dtype, True, x_layout=x_layout)
    assert not x.is_contiguous()
    out = sparse24.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, x_layout)


def test_every_group_pattern_is_decoded():
    """Each of the 6 placements of 2 nonzeros, the 4 of 1, and an empty group, in
    one row each; x is the identity so the output is the dense weight itself."""
    patterns = [[i, j] for i in range(4) for j in range(i + 1, 4)] + [[i] for i in range(4)] + [[]]
    k = 4 * len(patterns)
    w = torch.zeros(len(patterns), k)
    for row, keep in enumerate(patterns):
        for g in range(len(patterns)):             # every group of the row, shifted pattern
            for pos in patterns[(row + g) % len(patterns)]:
                w[row, 4 * g + pos] = 1.0 + row + 0.25 * pos + 0.01 * g
    values, meta = ops.sparse24_compress(w)
    out = sparse24.sparse24_mm(torch.eye(k, device=DEVICE), values.to(DEVICE), meta.to(DEVICE), None)
    torch.testing.assert_close(out.cpu(), w.t(), rtol=0, atol=0)
    assert torch.equal(decompress24(values, meta), w)


def _cfg(block_m, block_n, block_k, split_k):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": 4, "num_stages": 1}


# Fixed configs: split-K (workspace + reduction, also at M > SMALL_M), more splits than
# K blocks (empty ranges), and one split (the fused epilogue).
SPLITS = [pytest.param(3, _cfg(16, 32, 64, 1), id="M3-split1"),
          pytest.param(3, _cfg(16, 64, 64, 3), id="M3-split3"),
          pytest.param(1, _cfg(16, 32, 64, 8), id="M1-split8-empty-ranges"),
          pytest.param(17, _cfg(16, 128, 64, 4), id="M17-split4")]


@pytest.mark.parametrize("k", (100, 256))
@pytest.mark.parametrize("m,config", SPLITS)
def test_split_k_and_tiles(m, config, k):
    x, values, meta, b, w64 = make_case(m, k, 33, torch.float32, True)
    out = sparse24.sparse24_mm(x, values, meta, b, config=config)
    check(out, x, values, meta, b, w64, torch.float32, str(config))


def test_split_k_is_deterministic():
    x, values, meta, b, _ = make_case(2, 256, 130, torch.float32, True)
    config = _cfg(16, 64, 64, 8)
    first = sparse24.sparse24_mm(x, values, meta, b, config=config)
    assert all(torch.equal(first, sparse24.sparse24_mm(x, values, meta, b, config=config))
               for _ in range(3))


@pytest.mark.parametrize("config,match", [
    (_cfg(16, 32, 24, 1), "BLOCK_K = 24 must be a power of two"),
    (_cfg(16, 32, 32, 1), "BLOCK_K = 32 must be at least 64"),
    (_cfg(16, 32, 64, 9), "SPLIT_K = 9 must be in 1..8"),
    (_cfg(16, 48, 64, 1), "BLOCK_N = 48 must be a power of two"),
    ({"BLOCK_M": 16}, "must give")])
def test_bad_config_is_refused(config, match):
    x, values, meta, b, _ = make_case(3, 64, 7, torch.float16, False)
    with pytest.raises(ValueError, match=match):
        sparse24.sparse24_mm(x, values, meta, b, config=config)


def test_bfloat16_weights_upcast():
    """bfloat16 values, checked through float32 (exact for bf16), since the
    interpreter's bf16 tl.dot is wrong; the real bf16 path is test_cuda_*."""
    x, values, meta, b, w64 = make_case(3, 100, 33, torch.bfloat16, True)
    out = sparse24.sparse24_mm(x.float(), values.float(), meta, b.float()).to(torch.bfloat16)
    check(out, x, values, meta, b, w64, torch.bfloat16, "bf16 via float32")


@pytest.mark.skipif(DEVICE != "cpu", reason="Triton runs CPU tensors only in the interpreter")
def test_bfloat16_on_cpu_is_refused():
    """Forced onto the interpreter, bfloat16 gave garbage (1e10 where the reference gives
    about 1); like the other Triton ops, the backend now says it cannot take it."""
    x, values, meta, b, _ = make_case(3, 100, 33, torch.bfloat16, True, device="cpu")
    assert "bfloat16" in sparse24.supports_sparse24_mm(x, values, meta, b)
    assert sparse24.supports_sparse24_mm(x.half(), values.half(), meta, b.half()) is None
    with pytest.raises(pyfast.BackendUnavailableError, match="interpreter"):
        with pyfast.use_backend(sparse24_mm="triton"):
            torch.ops.pyfast.sparse24_mm(x, values, meta, b)


def test_float32_is_not_tf32():
    """input_precision='ieee': float32 stays float32-accurate (TF32 keeps 10 bits)."""
    x, values, meta, b, w64 = make_case(17, 256, 33, torch.float32, False)
    out = sparse24.sparse24_mm(x, values, meta, b)
    exact = torch.nn.functional.linear(x.double(), w64)
    assert (out.double() - exact).abs().max().item() < 1e-4


def _nonfinite(kind, dtype, device):
    """An inf / NaN in x at a column some weight rows pruned: NaN in those rows' outputs,
    as the reference's dense product gives (0 * inf); the kernel expands the 2:4 tile to
    dense with zeros before tl.dot, so it multiplies the pruned positions too."""
    gen = torch.Generator().manual_seed(21)
    values, meta = ops.sparse24_compress(weight_pruning_col(33, 128, dtype, gen))
    for m in (1, 3, 17):
        x = x_with_nonfinite(m, 128, kind, dtype, gen)
        values_d, meta_d, x_d = values.to(device), meta.to(device), x.to(device)
        out = sparse24.sparse24_mm(x_d, values_d, meta_d, None)
        want = reference.sparse24_mm(x_d, values_d, meta_d, None)
        assert_same_nonfinite(out.cpu(), want.cpu(), kind, f"{device} M={m} {dtype} {kind}")


@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
def test_nonfinite_x_reaches_output(kind, dtype):
    _nonfinite(kind, dtype, DEVICE)


# --- through the dispatcher -----------------------------------------------------------

@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m,k,n,bias", [(0, 36, 7, True), (1, 4, 33, False), (3, 100, 130, True),
                                        (17, 256, 33, False)])
def test_forced_backend(m, k, n, bias, dtype):
    x, values, meta, b, w64 = make_case(m, k, n, dtype, bias)
    with pyfast.use_backend(sparse24_mm="triton"):
        out = torch.ops.pyfast.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, f"forced triton M={m} K={k} N={n}")


# --- ahead-of-time compile with the JIT's alignment hints ----------------------------

COMPILE_WITH_ATTRS = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from pyfast.kernels.sparse24 import PTX_SPECS
for spec in PTX_SPECS:
    for arch in (80, 90):
        src = triton.compiler.ASTSource(fn=spec["kernel"], signature=spec["signature"],
                                        constexprs=spec["constexprs"], attrs=spec["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = k.asm["ptx"]
        print(json.dumps({"name": spec["name"], "arch": arch, "found": spec["expect"][arch] in ptx,
                          "vector_copies": ptx.count("cp.async.cg.shared.global")}))
"""


def test_compiles_with_alignment_hints():
    """The PTX specs compiled as the JIT compiles a launch on aligned contiguous
    tensors (16-divisible pointers and strides, unit strides constant). That path
    runs sm_90's dot-operand hoisting, which aborted the process ("Illegal shared
    layout") on an earlier tl.join expansion; it runs in a child for that reason.
    The 16-byte cp.async copies show the values and x loads are vectorized."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_WITH_ATTRS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * len(sparse24.PTX_SPECS)
    for r in rows:
        assert r["found"], f"{r['name']} sm_{r['arch']}: no tensor-core instruction"
        assert r["vector_copies"] > 0, f"{r['name']} sm_{r['arch']}: loads not vectorized"


# --- on a GPU: the real compile, bfloat16 included ---------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("m", (1, 3, 16, 17, 100, 257))
def test_cuda_matches_reference(m, dtype):
    x, values, meta, b, w64 = make_case(m, 1000, 130, dtype, m % 2 == 1, device="cuda")
    out = sparse24.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, f"cuda M={m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
def test_cuda_forced_backend_non_contiguous(dtype):
    x, values, meta, b, w64 = make_case(33, 256, 300, dtype, True, device="cuda", x_layout="transposed")
    with pyfast.use_backend(sparse24_mm="triton"):
        out = torch.ops.pyfast.sparse24_mm(x, values, meta, b)
    check(out, x, values, meta, b, w64, dtype, "cuda transposed x")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=dtype_id)
def test_cuda_nonfinite_x_reaches_output(kind, dtype):
    _nonfinite(kind, dtype, "cuda")
