"""NaN and inf in x reach the output of the CPU 2:4 kernels as they do in the reference.

The reference (pyfast/reference.py) multiplies x by the dense weight, pruned positions
included: an inf at a column that weight row n pruned gives 0 * inf = NaN in out[:, n],
and at a kept column of nonzero weight +-inf. The 2:4 tiles multiply only the kept
columns, so csrc/cpu/sparse24.cpp and sparse24_int4.cpp send x with a NaN or inf to their
dense-panel path (csrc/cpu/finite.h). Each case is built so that its reference output
holds NaN and, for an inf, inf (tests/_helpers.py weight_pruning_col), at every M regime
of the two rules, every ISA level, and with the bfloat16-dot and int8-slice paths
switched off in turn. Without the routing every case here fails.
"""
import pytest
import torch

import pyfast
import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
from pyfast import reference

from _helpers import (FLOAT_DTYPES, assert_same_nonfinite, dtype_id, weight_pruning_col,
                      x_with_nonfinite)

OPS = torch.ops.pyfast_C
N, K = 37, 256          # K a multiple of 64: the bfloat16-dot tiles may run
# 1: GEMV tiles (int4: the slice kernel's M; bf16 tiles), 3: row tiles, 17 / 40: the
# transposed-x and bf16-pair kernels of sparse24_mm, the int4 tiles / bf16-dot tiles
M_VALUES = [1, 3, 17, 40]
SWITCHES = [None, "PYFAST_NO_BF16DOT", "PYFAST_NO_INT8_SLICES"]


def cases(op, dtype, gen):
    """(args after x, reference function, label) of each weight the op is tested on."""
    w = weight_pruning_col(N, K, dtype if op == "sparse24_mm" else torch.float32, gen)
    if op == "sparse24_mm":
        values, meta = pyfast.ops.sparse24_compress(w)
        yield (values, meta, torch.randn(N, generator=gen)), reference.sparse24_mm, "bias"
        return
    for group_size in (64, -1):
        args = pyfast.ops.pack_sparse24_int4(w, group_size, True)
        yield (*args, group_size, None), reference.sparse24_int4_mm, f"g={group_size}"


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s or "default")
@pytest.mark.parametrize("kind", ["inf", "nan"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["sparse24_mm", "sparse24_int4_mm"])
def test_nonfinite_x_reaches_output(op, isa, dtype, kind, switch, monkeypatch):
    if switch is not None:
        monkeypatch.setenv(switch, "1")
    gen = torch.Generator().manual_seed(11)
    for args, ref, what in cases(op, dtype, gen):
        for m in M_VALUES:
            x = x_with_nonfinite(m, K, kind, dtype, gen)
            assert_same_nonfinite(getattr(OPS, op)(x, *args), ref(x, *args), kind,
                                  f"{op} {isa} {switch} M={m} {what} {dtype} {kind}")


def test_noncontiguous_x(isa):
    """The check reads a contiguous copy: a column-major x with an inf still reaches the
    output as in the reference."""
    gen = torch.Generator().manual_seed(13)
    values, meta = pyfast.ops.sparse24_compress(weight_pruning_col(N, K, torch.float32, gen))
    x = x_with_nonfinite(3, K, "inf", torch.float32, gen).T.contiguous().T
    assert not x.is_contiguous()
    assert_same_nonfinite(OPS.sparse24_mm(x, values, meta, None),
                          reference.sparse24_mm(x, values, meta, None), "inf",
                          f"{isa} column-major")
