"""int4_mm_ksplit's C++ CPU kernel (csrc/cpu/weight_only.cpp, int4_run) against the
reference: the int4 weight cut into C chunks along K (pyfast/layouts/int4_ksplit.py),
each chunk run by the int4_mm kernels and the chunks' float32 sums added in order.

Each ISA path forced in turn and 1 and 2 threads, every x dtype, symmetric and asymmetric
weights, M = 0, 1, 3, 17 (small-M kernels) and 64 (dequantized panels), N not a multiple
of any tile, and chunkings that stress each path: per channel with 96 columns per chunk
(a K tail inside the 128-column block of every chunk), groups of 32 and 64 with
3 and 4 chunks, and two chunks of 6144 columns (the most whose x slices fit in L1, what
"auto" makes of K = 12288) for the M = 1 int8-slice kernel and the bfloat16 kernel.
PYFAST_NO_INT8_SLICES and PYFAST_NO_BF16DOT send the M = 1 / bfloat16 calls to the
float32 kernels instead.

Tolerance: tests/test_cpu_weight_only.py's (twice PyTorch's own F.linear error in x's
dtype on the dequantized float64 weight, plus one ulp of the largest output); a chunked
sum is another order of the same float32 sums, so it is held to the same bound, against
the reference, or against the float64 product for the long chunks (see there).
"""
import itertools
import re

import pytest
import torch

import pyfast
from pyfast import reference
from pyfast.layouts import int4_ksplit
from _helpers import assert_within, dequant_int4, dtype_id, linear_tolerance

pyfast._ext.load()
OPS = torch.ops.pyfast_C

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MS = (0, 1, 3, 17, 64)
NS = (1, 7, 33)
# (K, group_size, chunks)
KGC = ((288, -1, 3), (192, 32, 3), (512, 64, 4), (768, 128, 2))


def _tolerance(x, w64, bias, dtype):
    more = torch.randn(16, x.shape[1]).to(x.dtype)
    return linear_tolerance(torch.cat([x, more]), w64, bias, dtype)


def _case(n, k, group_size, symmetric, gen=None):
    w = torch.randn(n, k, generator=gen) + (0.0 if symmetric else 0.7)
    packed, scales, zeros = reference.pack_int4(w, group_size, symmetric)
    return packed, scales, zeros


@pytest.mark.parametrize("symmetric", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int4_mm_ksplit(isa, threads, dtype, symmetric):
    for i, (m, n, (k, gs, c)) in enumerate(itertools.product(MS, NS, KGC)):
        packed, scales, zeros = _case(n, k, gs, symmetric)
        w_ks = int4_ksplit.repack(packed, c)
        x = torch.randn(m, k).to(dtype)
        if i % 2:
            x = torch.randn(k, 2 * m).to(dtype).t()[::2]    # strides (1, 2m): not contiguous
        b = torch.randn(n).to(dtype) if i % 3 else None
        out = OPS.int4_mm_ksplit(x, w_ks, scales, zeros, gs, b)
        tol = _tolerance(x, dequant_int4(packed, scales, zeros, gs), b, dtype)
        assert_within(out, reference.int4_mm(x, packed, scales, zeros, gs, b), tol,
                      f"{isa} M={m} N={n} K={k} group={gs} chunks={c}")


@pytest.mark.parametrize("path", ("default", "PYFAST_NO_INT8_SLICES", "PYFAST_NO_BF16DOT"))
@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_int4_mm_ksplit_long_chunks(isa, threads, group_size, path, monkeypatch):
    """Two chunks of 6144 columns at M = 1 and 4, float32 and bfloat16 x, zero points
    0..15 (skewed rows), N = 13 (not a multiple of the kernels' row groups)."""
    if path != "default":
        monkeypatch.setenv(path, "1")
    gen = torch.Generator().manual_seed(3)
    k, n = 12288, 13
    assert int4_ksplit.chunks_for(k, group_size) == 2
    w = torch.randn(n, k, generator=gen) + torch.linspace(-3.0, 3.0, n)[:, None]
    packed, scales, zeros = reference.pack_int4(w, group_size, False)
    assert zeros.min() < 4 and zeros.max() > 12
    w_ks = int4_ksplit.repack(packed, 2)
    w64 = dequant_int4(packed, scales, zeros, group_size)
    for m, dtype in itertools.product((1, 4), (torch.float32, torch.bfloat16)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype)
        out = OPS.int4_mm_ksplit(x, w_ks, scales, zeros, group_size, b)
        # against the float64 product: at K = 12288 with rows offset by up to 3, the
        # float32 reference's own error is as large as the tolerance (the kernels' is
        # about a tenth of it), so kernel - reference can exceed a bound both meet
        exact = x.double() @ w64.T + b.double()
        assert_within(out.double(), exact, _tolerance(x, w64, b, dtype),
                      f"{isa} {path} M={m} {dtype}")


def test_one_chunk_is_int4_mm_bit_for_bit(isa):
    """C = 1 runs exactly int4_mm's kernels on the same bytes: the same bits out."""
    packed, scales, zeros = _case(9, 256, 64, False)
    for m in (1, 3, 40):
        x = torch.randn(m, 256)
        b = torch.randn(9)
        assert torch.equal(OPS.int4_mm_ksplit(x, packed[None], scales, zeros, 64, b),
                           OPS.int4_mm(x, packed, scales, zeros, 64, b))


def test_chunks_join_in_order():
    """The output is chunk 0's float32 sums plus chunk 1's, in that order: with x zero
    outside chunk 1 the result is chunk 1's own int4_mm (no bias) bit for bit."""
    packed, scales, zeros = _case(7, 512, 128, True)
    x = torch.zeros(1, 512)
    x[:, 256:] = torch.randn(1, 256)
    out = OPS.int4_mm_ksplit(x, int4_ksplit.repack(packed, 2), scales, zeros, 128, None)
    part = OPS.int4_mm(x[:, 256:].contiguous(), packed[:, 128:].contiguous(),
                       scales[:, 2:].contiguous(), zeros[:, 2:].contiguous(), 128, None)
    assert torch.equal(out, part)


def test_empty_sums_give_the_bias():
    b = torch.randn(5)
    w_ks = torch.zeros(2, 5, 0, dtype=torch.uint8)
    out = OPS.int4_mm_ksplit(torch.randn(3, 0), w_ks, torch.ones(5, 0), torch.zeros(5, 0,
                             dtype=torch.uint8), 32, b)
    assert torch.equal(out, b.expand(3, 5))
    assert OPS.int4_mm_ksplit(torch.randn(0, 64), torch.zeros(2, 5, 16, dtype=torch.uint8),
                              torch.ones(5, 2), torch.zeros(5, 2, dtype=torch.uint8), 32,
                              None).shape == (0, 5)


@pytest.mark.parametrize("w_ks,group_size,message", [
    (torch.zeros(5, 32, dtype=torch.uint8), 32, "w_ks must be 3-D"),
    (torch.zeros(3, 5, 16, dtype=torch.uint8), 32, "accepted: [C, N, K / (2 C)]"),
    (torch.zeros(4, 5, 8, dtype=torch.uint8), -1, "not a multiple of 32"),
    (torch.zeros(2, 5, 16, dtype=torch.uint8), 64, "not a multiple of 32 and of group_size 64"),
    (torch.zeros(2, 5, 16, dtype=torch.int8), 32, "w_ks"),
])
def test_kernel_refuses_bad_weights(w_ks, group_size, message):
    """The kernel's own checks (the op checks first; these guard direct pyfast_C calls)."""
    with pytest.raises(RuntimeError, match=re.escape(message)):
        g = 1 if group_size == -1 else 64 // group_size
        OPS.int4_mm_ksplit(torch.randn(3, 64), w_ks, torch.ones(5, g),
                           torch.zeros(5, g, dtype=torch.uint8), group_size, None)
