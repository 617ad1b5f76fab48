"""The Triton weight-only kernels (kernels/weight_only.py) against the reference.

Where Triton runs: on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when torch sees no GPU), on CUDA tensors otherwise; DEVICE is
whichever this machine has, so every test here runs on either. The interpreter
computes tl.dot on bfloat16 wrongly (upstream bug), so on CPU bfloat16 activations
are upcast by the test (the values stay bfloat16 values) and the kernel's refusal
of bfloat16 CPU inputs is checked; the `cuda`-marked tests run bfloat16 for real.

Tolerance (tests/_helpers.py linear_tolerance, FlashAttention's rule): twice the
error PyTorch's own F.linear makes in the same dtype against float64 on the same
effective weight, plus one ulp of the largest output.
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import pyfast
from pyfast import reference
from _helpers import (assert_near_exact, dequant_int4, dtype_id, rotated_product, run_forced,
                      strided, transposed)

from pyfast.kernels import weight_only as wo
from pyfast.kernels._common import int4_minus_zero, int8_to_float, nibbles_minus_zero

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "") == "1" else "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
MS = (0, 1, 3, 17)      # 1, 3: the split-K (workspace) path; 17: the fused-epilogue path
NS = (7, 33, 130)
# (K, group_size): K suited to each group; 130 = per channel with a K tail in the last tile
KG = ((64, 32), (256, 32), (128, 64), (256, 128), (130, -1), (64, -1))


def _int8_inputs(m, n, k, dtype, bias, device=DEVICE, scale_dtype=torch.float32):
    x = torch.randn(m, k).to(dtype).to(device)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8).to(device)
    s = (torch.rand(n) * 0.02 + 1e-3).to(scale_dtype).to(device)
    b = torch.randn(n).to(dtype).to(device) if bias else None
    return x, w, s, b


def _int8_weight64(w, s):
    return w.double() * s.double()[:, None]


def _check_int8(out, x, w, s, b):
    assert_near_exact(out, reference.int8_weight_mm(x, w, s, b), x, _int8_weight64(w, s), b,
                      "int8_weight_mm")


def _int4_inputs(m, n, k, gs, symmetric, dtype, bias, device=DEVICE):
    x = torch.randn(m, k).to(dtype).to(device)
    w = torch.randn(n, k) + (0.0 if symmetric else 0.7)  # asymmetric: zero points != 8
    packed, scales, zeros = (t.to(device) for t in reference.pack_int4(w, gs, symmetric))
    b = torch.randn(n).to(dtype).to(device) if bias else None
    return x, packed, scales, zeros, b


def _check_int4(out, x, packed, scales, zeros, gs, b):
    assert_near_exact(out, reference.int4_mm(x, packed, scales, zeros, gs, b), x,
                      dequant_int4(packed, scales, zeros, gs), b, "int4_mm")


# --- int8 weights --------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", NS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_int8_weight_mm(m, n, dtype, bias):
    x, w, s, b = _int8_inputs(m, n, 192, dtype, bias)   # K = 192: a K tail for BLOCK_K = 128
    _check_int8(wo.int8_weight_mm(x, w, s, b), x, w, s, b)


def test_int8_weight_mm_any_float_scale_and_bias_dtype():
    x, w, s, _ = _int8_inputs(5, 33, 64, torch.float16, False, scale_dtype=torch.bfloat16)
    b = torch.randn(33, dtype=torch.float32, device=DEVICE)
    _check_int8(wo.int8_weight_mm(x, w, s, b), x, w, s, b)


def test_int8_weight_mm_k0_gives_bias():
    x, w, s, b = _int8_inputs(3, 7, 0, torch.float32, True)
    assert torch.equal(wo.int8_weight_mm(x, w, s, b), b.expand(3, 7))


# --- int4 weights ----------------------------------------------------------------------------

INT4_CASES = [pytest.param(m, k, gs, dtype, n, sym, bias,
                           id=f"M{m}-K{k}-g{gs}-{dtype_id(dtype)}-N{n}-{'sym' if sym else 'asym'}"
                              f"-{'bias' if bias else 'nobias'}")
              for m, (k, gs), dtype, sym, n, bias in rotated_product(MS, KG, DTYPES, (True, False),
                                                             rotate=(NS, (True, False, False)))]


@pytest.mark.parametrize("m,k,gs,dtype,n,symmetric,bias", INT4_CASES)
def test_int4_mm(m, k, gs, dtype, n, symmetric, bias):
    x, packed, scales, zeros, b = _int4_inputs(m, n, k, gs, symmetric, dtype, bias)
    _check_int4(wo.int4_mm(x, packed, scales, zeros, gs, b), x, packed, scales, zeros, gs, b)


def test_int4_mm_nan_scale_reaches_its_column_only():
    x, packed, scales, zeros, _ = _int4_inputs(3, 7, 128, 32, False, torch.float32, False)
    scales[2, 1] = float("nan")
    out = wo.int4_mm(x, packed, scales, zeros, 32, None)
    assert out[:, 2].isnan().all()
    assert not out[:, [0, 1, 3, 4, 5, 6]].isnan().any()


# --- strides, split-K, determinism -------------------------------------------------------------

@pytest.mark.parametrize("layout", [strided, transposed], ids=["sliced", "transposed"])
@pytest.mark.parametrize("m", [3, 17], ids=lambda m: f"M{m}")
def test_noncontiguous_inputs(m, layout):
    x, w, s, b = _int8_inputs(m, 33, 128, torch.float16, True)
    out = wo.int8_weight_mm(layout(x), layout(w), s, b)
    assert torch.equal(out, wo.int8_weight_mm(x, w, s, b))
    x, packed, scales, zeros, b = _int4_inputs(m, 33, 128, 32, False, torch.float16, True)
    out = wo.int4_mm(layout(x), layout(packed), layout(scales), layout(zeros), 32, b)
    assert torch.equal(out, wo.int4_mm(x, packed, scales, zeros, 32, b))


def _cfg(block_m, block_n, block_k, split_k):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}


# SPLIT_K 1 at small M (fused epilogue, no workspace), 3 (uneven ranges), 8 with
# more splits than K blocks (empty ranges write zeros), and split-K at M > 16.
SPLITS = [pytest.param(3, _cfg(16, 32, 32, 1), id="M3-split1"),
          pytest.param(3, _cfg(16, 64, 32, 3), id="M3-split3"),
          pytest.param(1, _cfg(16, 32, 32, 8), id="M1-split8-empty-ranges"),
          pytest.param(17, _cfg(16, 128, 32, 4), id="M17-split4")]


@pytest.mark.parametrize("m,config", SPLITS)
def test_int8_weight_mm_split_k(m, config):
    x, w, s, b = _int8_inputs(m, 33, 192, torch.float16, True)
    _check_int8(wo.int8_weight_mm(x, w, s, b, config=config), x, w, s, b)


@pytest.mark.parametrize("k,gs", [(256, 32), (256, 128), (128, 64), (130, -1)],
                         ids=["g32", "g128", "g64-4-blocks", "per-channel"])
@pytest.mark.parametrize("m,config", SPLITS)
def test_int4_mm_split_k(m, config, k, gs):
    """Splits that start inside a group (the scale loaded one block ahead follows the
    group counter), and, for K = 128, splits with no K block at all."""
    x, packed, scales, zeros, b = _int4_inputs(m, 33, k, gs, False, torch.float32, True)
    _check_int4(wo.int4_mm(x, packed, scales, zeros, gs, b, config=config), x, packed, scales, zeros, gs, b)


def test_int4_mm_block_k_as_large_as_the_group():
    x, packed, scales, zeros, b = _int4_inputs(3, 33, 256, 128, True, torch.float16, False)
    out = wo.int4_mm(x, packed, scales, zeros, 128, b, config=_cfg(16, 64, 128, 2))
    _check_int4(out, x, packed, scales, zeros, 128, b)


def test_int4_mm_rejects_a_k_tile_across_groups():
    x, packed, scales, zeros, _ = _int4_inputs(3, 7, 128, 32, True, torch.float16, False)
    with pytest.raises(ValueError, match="BLOCK_K = 64 must divide group_size 32"):
        wo.int4_mm(x, packed, scales, zeros, 32, None, config=_cfg(16, 32, 64, 1))


@pytest.mark.parametrize("config,match", [
    (_cfg(16, 32, 16, 1), "BLOCK_K = 16 must be at least 32 for int4_mm"),
    (_cfg(16, 24, 32, 1), "BLOCK_N = 24 must be a power of two")])
def test_int4_mm_rejects_bad_tiles(config, match):
    x, packed, scales, zeros, _ = _int4_inputs(3, 7, 128, 32, True, torch.float16, False)
    with pytest.raises(ValueError, match=match):
        wo.int4_mm(x, packed, scales, zeros, 32, None, config=config)


def test_split_k_is_deterministic():
    x, w, s, b = _int8_inputs(2, 130, 256, torch.float32, True)
    config = _cfg(16, 64, 32, 8)
    first = wo.int8_weight_mm(x, w, s, b, config=config)
    assert all(torch.equal(first, wo.int8_weight_mm(x, w, s, b, config=config)) for _ in range(3))


# --- through the dispatcher --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forced_through_torch_ops(dtype):
    x, w, s, b = _int8_inputs(3, 33, 128, dtype, True)
    out = run_forced("int8_weight_mm", "triton", x, w, s, b)
    assert torch.equal(out, wo.int8_weight_mm(x, w, s, b))
    x, packed, scales, zeros, b = _int4_inputs(17, 33, 128, 64, False, dtype, True)
    with pyfast.use_backend(int4_mm="triton"):
        out = torch.ops.pyfast.int4_mm(x, packed, scales, zeros, 64, b)
    assert torch.equal(out, wo.int4_mm(x, packed, scales, zeros, 64, b))
    _check_int4(out, x, packed, scales, zeros, 64, b)


def test_bfloat16_on_cpu_is_refused_and_upcast_instead():
    # Refused on CPU tensors (the interpreter), whatever this machine has.
    x, w, s, b = _int8_inputs(3, 33, 128, torch.bfloat16, True, device="cpu")
    assert "bfloat16" in wo.supports_int8_weight_mm(x, w, s, b)
    with pytest.raises(pyfast.BackendUnavailableError, match="interpreter"):
        with pyfast.use_backend(int8_weight_mm="triton"):  # (run_forced would upcast)
            torch.ops.pyfast.int8_weight_mm(x, w, s, b)
    xi, packed, scales, zeros, bi = _int4_inputs(3, 33, 128, 32, False, torch.bfloat16, True, device="cpu")
    assert "bfloat16" in wo.supports_int4_mm(xi, packed, scales, zeros, 32, bi)
    # The harness's way on DEVICE: the same bfloat16 values as float32, cast back at the end.
    x, w, s, b = (t.to(DEVICE) for t in (x, w, s, b))
    _check_int8(wo.int8_weight_mm(x.float(), w, s, b.float()).bfloat16(), x, w, s, b)
    xi, packed, scales, zeros, bi = (t.to(DEVICE) for t in (xi, packed, scales, zeros, bi))
    out = wo.int4_mm(xi.float(), packed, scales, zeros, 32, bi.float()).bfloat16()
    _check_int4(out, xi, packed, scales, zeros, 32, bi)


# --- on a GPU: bfloat16, the autotuned paths, layer-like shapes -----------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 128, 300], ids=lambda m: f"M{m}")
def test_cuda_int8_weight_mm(m, dtype):
    x, w, s, b = _int8_inputs(m, 1000, 1024, dtype, True, device="cuda")
    _check_int8(wo.int8_weight_mm(x, w, s, b), x, w, s, b)


@pytest.mark.cuda
@pytest.mark.parametrize("gs", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 256], ids=lambda m: f"M{m}")
def test_cuda_int4_mm(m, dtype, gs):
    x, packed, scales, zeros, b = _int4_inputs(m, 1030, 1024, gs, False, dtype, True, device="cuda")
    _check_int4(wo.int4_mm(x, packed, scales, zeros, gs, b), x, packed, scales, zeros, gs, b)


@pytest.mark.cuda
@pytest.mark.parametrize("m,config", SPLITS)
def test_cuda_bfloat16_split_k(m, config):
    x, packed, scales, zeros, b = _int4_inputs(m, 33, 256, 32, True, torch.bfloat16, True, device="cuda")
    _check_int4(wo.int4_mm(x, packed, scales, zeros, 32, b, config=config), x, packed, scales, zeros, 32, b)
    x, w, s, b = _int8_inputs(m, 33, 192, torch.bfloat16, True, device="cuda")
    _check_int8(wo.int8_weight_mm(x, w, s, b, config=config), x, w, s, b)


# --- the nibble dequantization (kernels/_common.py) -----------------------------------------
#
# The int4 kernels' tests above cannot check it for bfloat16 on CPU (the interpreter's
# bfloat16 tl.dot is wrong), so it is checked alone here, without a dot, for every
# byte, both nibbles, every zero point and every activation dtype. On a GPU,
# int4_minus_zero runs its inline PTX (float16 / bfloat16), so the second test below is
# the GPU check of that PTX; on CPU it runs the plain Triton arithmetic, and
# tests/test_triton_inline_ptx.py checks the PTX text instruction by instruction.

@triton.jit
def _nibbles_kernel(p_ptr, z_ptr, out_ptr, SHIFT: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    # p uint8 [R, C], z uint8 [C], out [R, C] of the dtype under test; all contiguous.
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    p = tl.load(p_ptr + r * C + c).to(tl.uint16)
    z = tl.load(z_ptr + c).to(tl.int32)
    tl.store(out_ptr + r * C + c, nibbles_minus_zero(p, SHIFT, z, out_ptr.dtype.element_ty))


@triton.jit
def _int4_pairs_kernel(p_ptr, z_ptr, low_ptr, high_ptr, R: tl.constexpr, C: tl.constexpr):
    # p uint8 [R, C], z uint8 [C], low / high [R, C] of the dtype under test; contiguous.
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    p = tl.load(p_ptr + r * C + c)
    z = tl.load(z_ptr + c).to(tl.int32)
    low, high = int4_minus_zero(p, z, low_ptr.dtype.element_ty)
    tl.store(low_ptr + r * C + c, low)
    tl.store(high_ptr + r * C + c, high)


def _every_byte_and_zero():
    byte = torch.arange(256, dtype=torch.int32)[:, None]          # every byte ...
    zero = torch.arange(16, dtype=torch.int32)                    # ... against every zero point
    p = byte.expand(256, 16).to(torch.uint8).contiguous().to(DEVICE)
    return byte, zero, p, zero.to(torch.uint8).to(DEVICE)


@pytest.mark.parametrize("shift", [0, 4], ids=["low", "high"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nibbles_minus_zero_is_exact(dtype, shift):
    """On a GPU for bfloat16 too. The interpreter converts int32 to bfloat16 wrongly and
    subtracts bfloat16 wrongly (128 - 128 gives 64 in Triton 3.7), so on CPU the
    bfloat16 bit trick is checked by the test after next, in torch."""
    byte, zero, p, z = _every_byte_and_zero()
    out = torch.empty(256, 16, dtype=dtype, device=DEVICE)
    _nibbles_kernel[(1,)](p, z, out, SHIFT=shift, R=256, C=16)
    expected = ((byte >> shift) & 0xF) - zero[None, :]             # integers in [-15, 15]
    assert torch.equal(out.cpu().double(), expected.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int4_minus_zero_is_exact(dtype):
    """Both nibbles of every byte against every zero point; on a GPU through the inline
    PTX (4 bytes per instance, so the 16 zero points per row also check which element
    of a pack meets which zero)."""
    byte, zero, p, z = _every_byte_and_zero()
    low = torch.empty(256, 16, dtype=dtype, device=DEVICE)
    high = torch.empty_like(low)
    _int4_pairs_kernel[(1,)](p, z, low, high, R=256, C=16)
    assert torch.equal(low.cpu().double(), ((byte & 0xF) - zero[None, :]).double())
    assert torch.equal(high.cpu().double(), ((byte >> 4) - zero[None, :]).double())


@triton.jit
def _int8_kernel(w_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
    # w int8 [R, C], out [R, C] of the dtype under test; contiguous.
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(out_ptr + offs, int8_to_float(tl.load(w_ptr + offs), out_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int8_to_float_is_exact(dtype):
    """Every int8 value in each of the 16 columns (so in every element slot of a pack of
    4); on a GPU for float16 through int8_to_float's inline PTX, the check of that PTX."""
    values = torch.arange(-128, 128, dtype=torch.int8)
    w = torch.stack([values.roll(c) for c in range(16)], dim=1).contiguous()   # [256, 16]
    out = torch.empty(256, 16, dtype=dtype, device=DEVICE)
    _int8_kernel[(1,)](w.to(DEVICE), out, R=256, C=16)
    assert torch.equal(out.cpu().double(), w.double())


@pytest.mark.parametrize("dtype,magic", [(torch.float16, 0x6400), (torch.bfloat16, 0x4300)],
                         ids=["float16", "bfloat16"])
def test_nibble_bit_trick_is_exact_in_16_bit_floats(dtype, magic):
    """The identity nibbles_minus_zero relies on, in torch arithmetic: the bits
    magic | q are the float magic_value + q, and subtracting magic_value + zero in the
    same 16-bit dtype gives q - zero exactly, for every q and zero in 0..15."""
    q = torch.arange(16, dtype=torch.int16)
    base = torch.tensor([magic], dtype=torch.int16).view(dtype).item()   # 1024.0 / 128.0
    as_float = (q | magic).view(dtype)
    assert torch.equal(as_float.double(), base + q.double())
    zero = torch.arange(16)
    diff = as_float[:, None] - (zero + int(base)).to(dtype)[None, :]
    assert diff.dtype == dtype
    assert torch.equal(diff.double(), (q[:, None] - zero[None, :]).double())
