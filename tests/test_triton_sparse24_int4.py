"""The Triton 2:4 + int4 matmul (kernels/sparse24_int4.py) against the reference.

Where Triton runs: on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when torch sees no GPU), on CUDA tensors otherwise; DEVICE is
whichever this machine has. The interpreter computes tl.dot on bfloat16 wrongly
(upstream bug): on CPU, bfloat16 activations are upcast by the test and the kernel's
refusal of bfloat16 CPU inputs is checked; the `cuda`-marked tests run bfloat16 for real.

Oracle: pyfast.reference.sparse24_int4_mm. Tolerance: tests/_helpers.linear_tolerance
(twice PyTorch's own F.linear error in the same dtype, on the same effective weight,
plus one ulp of the largest output), the weight decoded the long way in float64
(_helpers.dequant_sparse24_int4), so a misread code, index or group cannot hide.
"""
import os

import pytest
import torch

import pyfast
from pyfast import ops, reference
from pyfast.kernels import sparse24_int4 as s24i4
from _helpers import (assert_near_exact, assert_same_nonfinite, assert_within,
                      dequant_sparse24_int4, dtype_id,
                      linear_tolerance, random_24, rotated_product, run_forced, strided,
                      transposed, weight_pruning_col, x_with_nonfinite)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "") == "1" else "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
MS = (0, 1, 3, 17)      # 1, 3: the split-K (workspace) path; 17: the fused epilogue
NS = (7, 33, 130)
# (K, group_size): 136 = per channel with a K tail in the last BLOCK_K = 32 tile
KG = ((64, 32), (256, 32), (128, 64), (256, 128), (136, -1), (64, -1))


def _inputs(m, n, k, gs, symmetric, dtype, bias, device=DEVICE, seed=0):
    """A 2:4 weight (groups with 0, 1 and 2 nonzeros), packed; x, bias on `device`."""
    gen = torch.Generator().manual_seed(seed + 1000 * m + 10 * k + n)
    w = random_24(n, k, gen=gen)
    if not symmetric:   # shift the kept values so that zero points differ from 8
        w = torch.where(w != 0, w + 0.7, w)
    packed, meta, scales, zeros = ops.pack_sparse24_int4(w, gs, symmetric)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(packed), to(meta), to(scales), to(zeros), to(b)


def _check(out, x, packed, meta, scales, zeros, gs, b, what=""):
    w64 = dequant_sparse24_int4(packed.cpu(), meta.cpu(), scales.cpu(), zeros.cpu(), gs)
    expected = reference.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b)
    assert_near_exact(out, expected, x, w64, b, f"sparse24_int4_mm {what}")


CASES = [pytest.param(m, k, gs, dtype, n, sym, bias,
                      id=f"M{m}-K{k}-g{gs}-{dtype_id(dtype)}-N{n}-{'sym' if sym else 'asym'}"
                         f"-{'bias' if bias else 'nobias'}")
         for m, (k, gs), dtype, sym, n, bias in rotated_product(MS, KG, DTYPES, (True, False),
                                                        rotate=(NS, (True, False, False)))]


@pytest.mark.parametrize("m,k,gs,dtype,n,symmetric,bias", CASES)
def test_matches_reference(m, k, gs, dtype, n, symmetric, bias):
    args = _inputs(m, n, k, gs, symmetric, dtype, bias)
    x, packed, meta, scales, zeros, b = args
    _check(s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b), *args[:5], gs, b)


def test_pruned_positions_contribute_nothing():
    # Every row keeps the same two positions of each group (a random pair per group), and
    # x is huge exactly at the pruned columns: any nonzero weight there (e.g. a pruned
    # slot dequantized as (0 - zero) * scale) would swamp the output.
    gen = torch.Generator().manual_seed(5)
    n, k = 33, 128
    keep = torch.rand(k // 4, 4, generator=gen).argsort(dim=1) < 2          # [K/4, 4]
    w = (torch.randn(n, k, generator=gen) + 0.7) * keep.reshape(1, k)
    packed, meta, scales, zeros = (t.to(DEVICE) for t in ops.pack_sparse24_int4(w, 32, False))
    x = torch.randn(3, k, generator=gen)
    x[:, ~keep.reshape(k)] = 1e30
    x = x.to(DEVICE)
    _check(s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, None),
           x, packed, meta, scales, zeros, 32, None)
    assert s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, None).abs().max() < 1e4


def test_nan_scale_reaches_its_column_only():
    x, packed, meta, scales, zeros, _ = _inputs(3, 7, 128, 32, False, torch.float32, False)
    scales[2, 1] = float("nan")
    out = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, None)
    assert out[:, 2].isnan().all()
    assert not out[:, [0, 1, 3, 4, 5, 6]].isnan().any()


def test_any_float_scale_and_bias_dtype():
    x, packed, meta, scales, zeros, _ = _inputs(5, 33, 64, 32, False, torch.float16, False)
    scales = scales.to(torch.bfloat16)
    b = torch.randn(33, dtype=torch.float32, device=DEVICE)
    _check(s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, b),
           x, packed, meta, scales, zeros, 32, b)


# --- strides, split-K, determinism -------------------------------------------------------------

@pytest.mark.parametrize("layout", [strided, transposed], ids=["sliced", "transposed"])
@pytest.mark.parametrize("m", [3, 17], ids=lambda m: f"M{m}")
def test_noncontiguous_inputs(m, layout):
    x, packed, meta, scales, zeros, b = _inputs(m, 33, 128, 32, False, torch.float16, True)
    out = s24i4.sparse24_int4_mm(layout(x), layout(packed), layout(meta), layout(scales),
                                 layout(zeros), 32, b)
    assert torch.equal(out, s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, b))


def _cfg(block_m, block_n, block_k, split_k):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}


# SPLIT_K 1 at small M (fused epilogue), 3 (uneven ranges), 8 with more splits than K
# blocks (empty ranges write zeros), split-K at M > 16, and the smallest tile, BLOCK_K = 16
# (two meta bytes).
SPLITS = [pytest.param(3, _cfg(16, 32, 32, 1), id="M3-split1"),
          pytest.param(3, _cfg(16, 64, 32, 3), id="M3-split3"),
          pytest.param(1, _cfg(16, 32, 32, 8), id="M1-split8-empty-ranges"),
          pytest.param(17, _cfg(16, 128, 32, 4), id="M17-split4"),
          pytest.param(5, _cfg(16, 32, 16, 2), id="M5-blockk16")]


@pytest.mark.parametrize("k,gs", [(256, 32), (256, 128), (136, -1)], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("m,config", SPLITS)
def test_split_k_and_tiles(m, config, k, gs):
    args = _inputs(m, 33, k, gs, False, torch.float32, True)
    x, packed, meta, scales, zeros, b = args
    out = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b, config=config)
    _check(out, *args[:5], gs, b, str(config))



# BLOCK_K >= 64 (16 groups and more per K tile) takes the kernel's four-dot path, one
# dot per position in the groups (_common.sparse24_dots); BLOCK_K = 16 and 32 build the
# dense tile. The interpreter's own config has BLOCK_K = 32, so these name the tiles.
FOUR_DOTS = [pytest.param(3, _cfg(16, 32, 64, 1), id="M3-bk64-split1"),
             pytest.param(1, _cfg(16, 64, 128, 8), id="M1-bk128-split8-empty-ranges"),
             pytest.param(17, _cfg(32, 64, 64, 3), id="M17-bk64-split3"),
             pytest.param(20, _cfg(32, 32, 128, 1), id="M20-bk128")]


FOUR_DOT_SHAPES = [pytest.param(m, config, k, gs, id=f"{cid}-{kid}")
                   for m, config, cid in ((p.values[0], p.values[1], p.id) for p in FOUR_DOTS)
                   for k, gs, kid in ((256, 128, "g128"), (512, 64, "g64"), (136, -1, "per-channel-tail"))
                   if gs == -1 or gs % config["BLOCK_K"] == 0]   # a K tile lies in one group


@pytest.mark.parametrize("m,config,k,gs", FOUR_DOT_SHAPES)
def test_four_dot_tiles(m, config, k, gs):
    for symmetric in (True, False):
        args = _inputs(m, 33, k, gs, symmetric, torch.float32, True)
        x, packed, meta, scales, zeros, b = args
        out = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b, config=config)
        _check(out, *args[:5], gs, b, f"{config} symmetric={symmetric}")


VALID_NIBBLES = (0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110)   # idx0 | idx1 << 2, idx0 < idx1


@pytest.mark.parametrize("block_k", [32, 64, 128], ids=lambda b: f"bk{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_every_index_pair_at_every_group(dtype, block_k):
    """Each row holds every valid 2:4 nibble, in a different order per row, so each nibble
    meets each group, both halves of a meta byte and each position of the four dots;
    codes, zero points and scales random (group 128, so every BLOCK_K fits a group)."""
    n, k, gs = 18, 4 * 96, 128
    gen = torch.Generator().manual_seed(8)
    nib = torch.tensor(VALID_NIBBLES, dtype=torch.uint8)
    nibbles = torch.stack([nib[torch.randperm(6, generator=gen)].repeat(k // 24)
                           for _ in range(n)])                                  # [N, K/4]
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)                           # [N, K/8]
    packed = torch.randint(0, 256, (n, k // 4), dtype=torch.uint8, generator=gen)
    zeros = torch.randint(0, 16, (n, k // gs), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // gs, generator=gen) + 0.1
    x = torch.randn(3, k, generator=gen).to(dtype)
    assert {int(v) for v in (meta & 15).unique()} == set(VALID_NIBBLES)
    assert {int(v) for v in (meta >> 4).unique()} == set(VALID_NIBBLES)
    x, packed, meta, scales, zeros = (t.to(DEVICE) for t in (x, packed, meta, scales, zeros))
    out = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, None,
                                 config=_cfg(16, 32, block_k, 1))
    _check(out, x, packed, meta, scales, zeros, gs, None, f"every index pair, BLOCK_K {block_k}")

def test_split_k_is_deterministic():
    x, packed, meta, scales, zeros, b = _inputs(2, 130, 256, 64, False, torch.float32, True)
    config = _cfg(16, 64, 32, 8)
    first = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 64, b, config=config)
    assert all(torch.equal(first, s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 64, b,
                                                         config=config)) for _ in range(3))


@pytest.mark.parametrize("block_k,match", [(64, "BLOCK_K = 64 must divide group_size 32"),
                                            (8, "BLOCK_K = 8 must be at least 16")])
def test_bad_config_is_refused(block_k, match):
    x, packed, meta, scales, zeros, _ = _inputs(3, 7, 128, 32, True, torch.float16, False)
    with pytest.raises(ValueError, match=match):
        s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, None,
                               config=_cfg(16, 32, block_k, 1))


# --- through the dispatcher --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forced_through_torch_ops(dtype):
    args = _inputs(17, 33, 128, 64, False, dtype, True)
    x, packed, meta, scales, zeros, b = args
    out = run_forced("sparse24_int4_mm", "triton", x, packed, meta, scales, zeros, 64, b)
    assert torch.equal(out, s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, 64, b))
    _check(out, *args[:5], 64, b)


def test_layer_runs_on_triton():
    """Sparse24Int4Linear (which calls only the op) on the Triton backend."""
    from pyfast.nn import Sparse24Int4Linear
    lin = torch.nn.Linear(128, 33)
    layer = Sparse24Int4Linear.from_linear(lin, prune=True, group_size=32).to(DEVICE)
    x = torch.randn(5, 128, device=DEVICE)
    with pyfast.use_backend(sparse24_int4_mm="triton"):
        out = layer(x)
    w = layer.dequantized_weight().double()
    assert_within(out, torch.nn.functional.linear(x.double(), w, layer.bias.double()).float(),
                  linear_tolerance(x, w, layer.bias, torch.float32), "layer")


def test_bfloat16_on_cpu_is_refused_and_upcast_instead():
    args = _inputs(3, 33, 128, 32, False, torch.bfloat16, True, device="cpu")
    x, packed, meta, scales, zeros, b = args
    assert "bfloat16" in s24i4.supports_sparse24_int4_mm(x, packed, meta, scales, zeros, 32, b)
    with pytest.raises(pyfast.BackendUnavailableError, match="interpreter"):
        with pyfast.use_backend(sparse24_int4_mm="triton"):   # (run_forced would upcast)
            torch.ops.pyfast.sparse24_int4_mm(x, packed, meta, scales, zeros, 32, b)
    # The harness's way on DEVICE: the same bfloat16 values as float32, cast back at the end.
    x, packed, meta, scales, zeros, b = (t.to(DEVICE) for t in args)
    out = s24i4.sparse24_int4_mm(x.float(), packed, meta, scales, zeros, 32, b.float()).bfloat16()
    _check(out, x, packed, meta, scales, zeros, 32, b)


@pytest.mark.parametrize("block_k", [None, 64], ids=["autotuned", "four-dots"])
@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_x_reaches_output(kind, dtype, block_k):
    """An inf / NaN in x at a column some weight rows pruned: NaN in those rows' outputs,
    as the reference's dense product gives (0 * inf); the kernel expands the kept codes
    with zeros at the pruned positions before tl.dot (a dense tile, or the four dots'
    selects), so it multiplies them. M = 1 and 3 take the split-K path, 17 the fused
    epilogue."""
    gen = torch.Generator().manual_seed(22)
    gs = 32 if block_k is None else 64
    config = None if block_k is None else _cfg(16, 32, block_k, 2)
    w = weight_pruning_col(33, 128, torch.float32, gen)
    args = [t.to(DEVICE) for t in ops.pack_sparse24_int4(w, gs, True)]
    for m in (1, 3, 17):
        x = x_with_nonfinite(m, 128, kind, dtype, gen).to(DEVICE)
        out = s24i4.sparse24_int4_mm(x, *args, gs, None, config=config)
        want = reference.sparse24_int4_mm(x, *args, gs, None)
        assert_same_nonfinite(out.cpu(), want.cpu(), kind, f"{DEVICE} M={m} {dtype} {kind}")


# --- on a GPU: bfloat16, the autotuned paths, layer-like shapes -----------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("gs", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 256], ids=lambda m: f"M{m}")
def test_cuda_sparse24_int4_mm(m, dtype, gs):
    args = _inputs(m, 1030, 1024, gs, False, dtype, True, device="cuda")
    x, packed, meta, scales, zeros, b = args
    _check(s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b), *args[:5], gs, b)


@pytest.mark.cuda
@pytest.mark.parametrize("m,config,gs", [pytest.param(*p.values, 32, id=p.id) for p in SPLITS]
                         + [pytest.param(*p.values, 128, id=p.id) for p in FOUR_DOTS])
def test_cuda_bfloat16_split_k(m, config, gs):
    """Every named tile in bfloat16: SPLITS (dense tiles, group 32), FOUR_DOTS (group 128)."""
    args = _inputs(m, 33, 256, gs, True, torch.bfloat16, True, device="cuda")
    x, packed, meta, scales, zeros, b = args
    out = s24i4.sparse24_int4_mm(x, packed, meta, scales, zeros, gs, b, config=config)
    _check(out, *args[:5], gs, b, str(config))
