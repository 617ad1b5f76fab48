"""Every error the ops raise: type, and a message that names the argument, what it
got and what is accepted. Each case runs through the typed wrapper (pyfast.ops.*)
and through the raw op (torch.ops.pyfast.*), whose dispatcher runs the same checks.
"""
import re
from typing import Callable, NamedTuple, Optional

import pytest
import torch

import pyfast  # noqa: F401  (registers torch.ops.pyfast)
from pyfast import ops


def i8(*shape):
    return torch.zeros(shape, dtype=torch.int8)


def u8(*shape):
    return torch.zeros(shape, dtype=torch.uint8)


def f32(*shape):
    return torch.randn(shape)


class Case(NamedTuple):
    op: str
    args: Callable[[], tuple]
    exc: type
    message: str                          # literal text that must appear in the message
    raw_exc: Optional[type] = None        # when the raw op raises something else
    raw_message: Optional[str] = None


ACCEPT_FLOAT = "accepted: float32, float16, bfloat16"
INT4 = dict(packed=u8(5, 32), scales=f32(5, 2), zeros=u8(5, 2))
# lowbit_mm with x [3, 64], group_size 32: int2 (bits 2) and binary (bits 1, no zero points)
INT2 = dict(packed=u8(5, 16), scales=f32(5, 2), zeros=u8(5, 2))
BIN = dict(packed=u8(5, 8), scales=f32(5, 2), zeros=u8(5, 0))
# sparse24_int4_mm with x [3, 64], group_size 32: packed [5, 16], meta [5, 8]
S24I4 = dict(packed=u8(5, 16), meta=u8(5, 8), scales=f32(5, 2), zeros=u8(5, 2))


def _s24i4(**over):
    """sparse24_int4_mm's arguments after x, with some replaced."""
    return tuple({**S24I4, **over}.values())


def _int4_tc():
    """A valid repacked weight for N = 5, K = 64."""
    return ops.repack_int4_tc(u8(5, 32))


def _int4_ks(chunks=2, group_size=32):
    """A valid K-split weight for N = 5, K = 64 (2 chunks of 32 columns: group 32)."""
    return ops.repack_int4_ksplit(u8(5, 32), chunks, group_size)


def _meta_tc():
    """Valid repacked metadata for N = 5, K = 64."""
    return ops.repack_sparse24_tc(torch.full((5, 16), 0b0100, dtype=torch.uint8))


def _s24i4_tc():
    """A valid repacked 2:4 + int4 weight (codes_tc, meta_tc) for N = 5, K = 64."""
    return ops.repack_sparse24_int4_tc(u8(5, 16), torch.full((5, 8), 0x44, dtype=torch.uint8))


def _vnni():
    """A valid repacked weight for N = 5, K = 64."""
    return ops.repack_int8_vnni(i8(5, 64))


CASES = {
    # --- quantize_per_token
    "quantize-x-float64": Case("quantize_per_token", lambda: (f32(3, 8).double(),), TypeError,
                               f"x has dtype torch.float64; {ACCEPT_FLOAT}"),
    "quantize-x-int8": Case("quantize_per_token", lambda: (i8(3, 8),), TypeError,
                            f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "quantize-x-3d": Case("quantize_per_token", lambda: (f32(2, 3, 4),), ValueError,
                          "x must be 2-D, got a 3-D tensor of shape (2, 3, 4)"),
    "quantize-x-1d": Case("quantize_per_token", lambda: (f32(8),), ValueError,
                          "x must be 2-D, got a 1-D tensor of shape (8,)"),
    # --- quantize_static: x [3, 8], scale float32 [1]
    "static-x-int8": Case("quantize_static", lambda: (i8(3, 8), f32(1)), TypeError,
                          f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "static-scale-2": Case("quantize_static", lambda: (f32(3, 8), f32(2)), ValueError,
                           "scale has shape (2,): dimension 0 must be 1 "
                           "(one calibrated scale for the whole tensor)"),
    "static-scale-f16": Case("quantize_static", lambda: (f32(3, 8), f32(1).half()), TypeError,
                             "scale has dtype torch.float16; accepted: float32"),
    # --- int8_mm: a [3, 64], b [5, 64]
    "int8_mm-a-float": Case("int8_mm", lambda: (f32(3, 64), i8(5, 64), f32(3), f32(5)), TypeError,
                            "a has dtype torch.float32; accepted: int8"),
    "int8_mm-b-uint8": Case("int8_mm", lambda: (i8(3, 64), u8(5, 64), f32(3), f32(5)), TypeError,
                            "b has dtype torch.uint8; accepted: int8"),
    "int8_mm-a-1d": Case("int8_mm", lambda: (i8(64), i8(5, 64), f32(3), f32(5)), ValueError,
                         "a must be 2-D, got a 1-D tensor of shape (64,)"),
    "int8_mm-K-mismatch": Case("int8_mm", lambda: (i8(3, 64), i8(5, 32), f32(3), f32(5)), ValueError,
                               "b has shape (5, 32): dimension 1 must be 64 "
                               "(b is [N, K] and must share K with a [M, K])"),
    "int8_mm-K-overflow": Case("int8_mm", lambda: (i8(1, 2 ** 17), i8(1, 2 ** 17), f32(1), f32(1)),
                               ValueError, "a has K = 131072; int8_mm accepts K <= 131071, so that "
                               "no int32 sum of int8 products can overflow"),
    "int8_mm-a_scale-length": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(4), f32(5)),
                                   ValueError, "a_scale has shape (4,): dimension 0 must be 3 "
                                   "(one scale per row M of a)"),
    "int8_mm-b_scale-length": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(6)),
                                   ValueError, "b_scale has shape (6,): dimension 0 must be 5 "
                                   "(one scale per row N of b)"),
    "int8_mm-a_scale-2d": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3, 1), f32(5)),
                               ValueError, "a_scale must be 1-D, got a 2-D tensor of shape (3, 1)"),
    "int8_mm-b_scale-int": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), i8(5)),
                                TypeError, f"b_scale has dtype torch.int8; {ACCEPT_FLOAT}"),
    "int8_mm-bias-length": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5), f32(4)),
                                ValueError, "bias has shape (4,): dimension 0 must be 5 "
                                "(one entry per output feature N)"),
    "int8_mm-bias-int": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5),
                                                 torch.zeros(5, dtype=torch.int64)),
                             TypeError, f"bias has dtype torch.int64; {ACCEPT_FLOAT}"),
    "int8_mm-bias-2d": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5), f32(1, 5)),
                            ValueError, "bias must be 1-D, got a 2-D tensor of shape (1, 5)"),
    "int8_mm-out_dtype-int32": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5), None,
                                                        torch.int32), ValueError,
                                    f"out_dtype torch.int32 is not supported; {ACCEPT_FLOAT}"),
    "int8_mm-out_dtype-float64": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5),
                                                          None, torch.float64), ValueError,
                                      f"out_dtype torch.float64 is not supported; {ACCEPT_FLOAT}"),
    "int8_mm-out_dtype-str": Case("int8_mm", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5), None,
                                                      "float16"), TypeError,
                                  "out_dtype must be a torch.dtype, got 'float16'",
                                  RuntimeError, "for argument 'out_dtype' but instead found type 'str'"),
    # --- int8_weight_mm: x [3, 64], w_int8 [5, 64]
    "int8_weight_mm-x-int8": Case("int8_weight_mm", lambda: (i8(3, 64), i8(5, 64), f32(5)),
                                  TypeError, f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "int8_weight_mm-w-float": Case("int8_weight_mm", lambda: (f32(3, 64), f32(5, 64), f32(5)),
                                   TypeError, "w_int8 has dtype torch.float32; accepted: int8"),
    "int8_weight_mm-w-3d": Case("int8_weight_mm", lambda: (f32(3, 64), i8(1, 5, 64), f32(5)),
                                ValueError, "w_int8 must be 2-D, got a 3-D tensor of shape (1, 5, 64)"),
    "int8_weight_mm-K-mismatch": Case("int8_weight_mm", lambda: (f32(3, 64), i8(5, 63), f32(5)),
                                      ValueError, "w_int8 has shape (5, 63): dimension 1 must be 64 "
                                      "(w_int8 is [N, K] and must share K with x [M, K])"),
    "int8_weight_mm-scale-length": Case("int8_weight_mm", lambda: (f32(3, 64), i8(5, 64), f32(3)),
                                        ValueError, "w_scale has shape (3,): dimension 0 must be 5 "
                                        "(one scale per output row N)"),
    "int8_weight_mm-bias-length": Case("int8_weight_mm", lambda: (f32(3, 64), i8(5, 64), f32(5),
                                                                  f32(6)), ValueError,
                                       "bias has shape (6,): dimension 0 must be 5"),
    # --- w8a8_mm: x [3, 64], w_int8 [5, 64]
    "w8a8_mm-x-int8": Case("w8a8_mm", lambda: (i8(3, 64), i8(5, 64), f32(5)),
                           TypeError, f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "w8a8_mm-w-float": Case("w8a8_mm", lambda: (f32(3, 64), f32(5, 64), f32(5)),
                            TypeError, "w_int8 has dtype torch.float32; accepted: int8"),
    "w8a8_mm-K-mismatch": Case("w8a8_mm", lambda: (f32(3, 64), i8(5, 63), f32(5)),
                               ValueError, "w_int8 has shape (5, 63): dimension 1 must be 64 "
                               "(w_int8 is [N, K] and must share K with x [M, K])"),
    "w8a8_mm-scale-length": Case("w8a8_mm", lambda: (f32(3, 64), i8(5, 64), f32(3)),
                                 ValueError, "w_scale has shape (3,): dimension 0 must be 5 "
                                 "(one scale per output row N)"),
    "w8a8_mm-bias-length": Case("w8a8_mm", lambda: (f32(3, 64), i8(5, 64), f32(5), f32(6)),
                                ValueError, "bias has shape (6,): dimension 0 must be 5"),
    "w8a8_mm-K-too-large": Case("w8a8_mm", lambda: (f32(1, 131072), i8(1, 131072), f32(1)),
                                ValueError, "x has K = 131072; w8a8_mm accepts K <= 131071"),
    # --- pack_int4: w [4, 64]
    "pack_int4-w-int": Case("pack_int4", lambda: (i8(4, 64), 32, True), TypeError,
                            f"w has dtype torch.int8; {ACCEPT_FLOAT}"),
    "pack_int4-w-1d": Case("pack_int4", lambda: (f32(64), 32, True), ValueError,
                           "w must be 2-D, got a 1-D tensor of shape (64,)"),
    "pack_int4-group-48": Case("pack_int4", lambda: (f32(4, 96), 48, True), ValueError,
                               "group_size 48 is not supported; accepted: 32, 64, 128 or -1 (per channel)"),
    "pack_int4-group-0": Case("pack_int4", lambda: (f32(4, 64), 0, False), ValueError,
                              "group_size 0 is not supported; accepted: 32, 64, 128 or -1"),
    # the schema converts True to the int 1 before the dispatcher sees it
    "pack_int4-group-True": Case("pack_int4", lambda: (f32(4, 64), True, True), TypeError,
                                 "group_size must be an int, got True", ValueError,
                                 "group_size 1 is not supported; accepted: 32, 64, 128 or -1"),
    "pack_int4-group-float": Case("pack_int4", lambda: (f32(4, 64), 32.0, True), TypeError,
                                  "group_size must be an int, got 32.0", RuntimeError,
                                  "Expected a value of type 'int' for argument 'group_size'"),
    "pack_int4-K-not-multiple": Case("pack_int4", lambda: (f32(4, 96), 64, True), ValueError,
                                     "w.shape[1] (K) = 96 is not a multiple of group_size 64"),
    "pack_int4-K-odd": Case("pack_int4", lambda: (f32(4, 33), -1, True), ValueError,
                            "w.shape[1] (K) = 33 must be even to pack two int4 values per byte"),
    "pack_int4-symmetric-str": Case("pack_int4", lambda: (f32(4, 64), 32, "yes"), TypeError,
                                    "symmetric must be a bool, got 'yes'", RuntimeError,
                                    "Expected a value of type 'bool' for argument 'symmetric'"),
    # --- int4_mm: x [3, 64], group_size 32, packed [5, 32], scales/zeros [5, 2]
    "int4_mm-x-float64": Case("int4_mm", lambda: (f32(3, 64).double(), *INT4.values(), 32),
                              TypeError, f"x has dtype torch.float64; {ACCEPT_FLOAT}"),
    "int4_mm-packed-int8": Case("int4_mm", lambda: (f32(3, 64), i8(5, 32), INT4["scales"],
                                                    INT4["zeros"], 32), TypeError,
                                "packed has dtype torch.int8; accepted: uint8"),
    "int4_mm-packed-K": Case("int4_mm", lambda: (f32(3, 64), u8(5, 64), INT4["scales"],
                                                 INT4["zeros"], 32), ValueError,
                             "packed has shape (5, 64): dimension 1 must be 32 "
                             "(packed is [N, K/2]: two int4 values per byte)"),
    "int4_mm-scales-rows": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], f32(4, 2),
                                                    INT4["zeros"], 32), ValueError,
                                "scales has shape (4, 2): dimension 0 must be 5 "
                                "(one row per output row N of packed)"),
    "int4_mm-scales-groups": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], f32(5, 1),
                                                      INT4["zeros"], 32), ValueError,
                                  "scales has shape (5, 1): dimension 1 must be 2 "
                                  "(K / group_size = 64 / 32 groups)"),
    "int4_mm-scales-1d": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], f32(5),
                                                  INT4["zeros"], 32), ValueError,
                              "scales must be 2-D, got a 1-D tensor of shape (5,)"),
    "int4_mm-zeros-groups": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], INT4["scales"],
                                                     u8(5, 4), 32), ValueError,
                                 "zeros has shape (5, 4): dimension 1 must be 2 "
                                 "(K / group_size = 64 / 32 groups)"),
    "int4_mm-zeros-rows": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], INT4["scales"],
                                                   u8(6, 2), 32), ValueError,
                               "zeros has shape (6, 2): dimension 0 must be 5"),
    "int4_mm-zeros-float": Case("int4_mm", lambda: (f32(3, 64), INT4["packed"], INT4["scales"],
                                                    f32(5, 2), 32), TypeError,
                                "zeros has dtype torch.float32; accepted: uint8"),
    "int4_mm-group-48": Case("int4_mm", lambda: (f32(3, 64), *INT4.values(), 48), ValueError,
                             "group_size 48 is not supported; accepted: 32, 64, 128 or -1"),
    "int4_mm-group-True": Case("int4_mm", lambda: (f32(3, 64), *INT4.values(), True), TypeError,
                               "group_size must be an int, got True", ValueError,
                               "group_size 1 is not supported"),
    "int4_mm-K-not-multiple": Case("int4_mm", lambda: (f32(3, 96), u8(5, 48), f32(5, 1),
                                                       u8(5, 1), 64), ValueError,
                                   "x.shape[1] (K) = 96 is not a multiple of group_size 64"),
    "int4_mm-K-odd": Case("int4_mm", lambda: (f32(3, 33), u8(5, 16), f32(5, 1), u8(5, 1), -1),
                          ValueError, "x.shape[1] (K) = 33 must be even to pack two int4 values"),
    "int4_mm-bias-length": Case("int4_mm", lambda: (f32(3, 64), *INT4.values(), 32, f32(4)),
                                ValueError, "bias has shape (4,): dimension 0 must be 5"),
    # --- pack_lowbit: w [4, 64]
    "pack_lowbit-w-int": Case("pack_lowbit", lambda: (i8(4, 64), 2, 32), TypeError,
                              f"w has dtype torch.int8; {ACCEPT_FLOAT}"),
    "pack_lowbit-w-1d": Case("pack_lowbit", lambda: (f32(64), 2, 32), ValueError,
                             "w must be 2-D, got a 1-D tensor of shape (64,)"),
    "pack_lowbit-bits-3": Case("pack_lowbit", lambda: (f32(4, 64), 3, 32), ValueError,
                               "bits 3 is not supported; accepted: 1 (binary) or 2 (int2)"),
    "pack_lowbit-bits-4": Case("pack_lowbit", lambda: (f32(4, 64), 4, 32), ValueError,
                               "bits 4 is not supported; accepted: 1 (binary) or 2 (int2)"),
    "pack_lowbit-bits-float": Case("pack_lowbit", lambda: (f32(4, 64), 2.0, 32), TypeError,
                                   "bits must be an int, got 2.0", RuntimeError,
                                   "Expected a value of type 'int' for argument 'bits'"),
    "pack_lowbit-group-48": Case("pack_lowbit", lambda: (f32(4, 96), 1, 48), ValueError,
                                 "group_size 48 is not supported; accepted: 32, 64, 128 or -1"),
    "pack_lowbit-K-not-multiple": Case("pack_lowbit", lambda: (f32(4, 96), 2, 64), ValueError,
                                       "w.shape[1] (K) = 96 is not a multiple of group_size 64"),
    "pack_lowbit-K-30-int2": Case("pack_lowbit", lambda: (f32(4, 30), 2, -1), ValueError,
                                  "w.shape[1] (K) = 30 must be a multiple of 4 to pack four "
                                  "2-bit values per byte"),
    "pack_lowbit-K-36-binary": Case("pack_lowbit", lambda: (f32(4, 36), 1, -1), ValueError,
                                    "w.shape[1] (K) = 36 must be a multiple of 8 to pack eight "
                                    "1-bit values per byte"),
    "pack_lowbit-K-0": Case("pack_lowbit", lambda: (f32(4, 0), 2, -1), ValueError,
                            "w.shape[1] (K) = 0 must be positive for group_size -1"),
    # --- lowbit_mm: x [3, 64], group_size 32 (INT2 and BIN above)
    "lowbit_mm-x-float64": Case("lowbit_mm", lambda: (f32(3, 64).double(), *INT2.values(), 2, 32),
                                TypeError, f"x has dtype torch.float64; {ACCEPT_FLOAT}"),
    "lowbit_mm-bits-4": Case("lowbit_mm", lambda: (f32(3, 64), *INT4.values(), 4, 32), ValueError,
                             "bits 4 is not supported; accepted: 1 (binary) or 2 (int2)"),
    "lowbit_mm-packed-int8": Case("lowbit_mm", lambda: (f32(3, 64), i8(5, 16), INT2["scales"],
                                                        INT2["zeros"], 2, 32), TypeError,
                                  "packed has dtype torch.int8; accepted: uint8"),
    "lowbit_mm-packed-K-int2": Case("lowbit_mm", lambda: (f32(3, 64), u8(5, 32), INT2["scales"],
                                                          INT2["zeros"], 2, 32), ValueError,
                                    "packed has shape (5, 32): dimension 1 must be 16 "
                                    "(packed is [N, K*2/8]: 4 2-bit values per byte)"),
    "lowbit_mm-packed-K-binary": Case("lowbit_mm", lambda: (f32(3, 64), *INT2.values(), 1, 32),
                                      ValueError, "packed has shape (5, 16): dimension 1 must be 8 "
                                      "(packed is [N, K*1/8]: 8 1-bit values per byte)"),
    "lowbit_mm-scales-groups": Case("lowbit_mm", lambda: (f32(3, 64), BIN["packed"], f32(5, 1),
                                                          BIN["zeros"], 1, 32), ValueError,
                                    "scales has shape (5, 1): dimension 1 must be 2 "
                                    "(K / group_size = 64 / 32 groups)"),
    "lowbit_mm-scales-rows": Case("lowbit_mm", lambda: (f32(3, 64), INT2["packed"], f32(4, 2),
                                                        INT2["zeros"], 2, 32), ValueError,
                                  "scales has shape (4, 2): dimension 0 must be 5 "
                                  "(one row per output row N of packed)"),
    "lowbit_mm-zeros-binary": Case("lowbit_mm", lambda: (f32(3, 64), BIN["packed"], BIN["scales"],
                                                         u8(5, 2), 1, 32), ValueError,
                                   "zeros has shape (5, 2): dimension 1 must be 0 (binary weights "
                                   "have no zero point: zeros is [N, 0])"),
    "lowbit_mm-zeros-int2-empty": Case("lowbit_mm", lambda: (f32(3, 64), INT2["packed"],
                                                             INT2["scales"], u8(5, 0), 2, 32),
                                       ValueError, "zeros has shape (5, 0): dimension 1 must be 2 "
                                       "(K / group_size = 64 / 32 groups)"),
    "lowbit_mm-zeros-float": Case("lowbit_mm", lambda: (f32(3, 64), INT2["packed"], INT2["scales"],
                                                        f32(5, 2), 2, 32), TypeError,
                                  "zeros has dtype torch.float32; accepted: uint8"),
    "lowbit_mm-K-30": Case("lowbit_mm", lambda: (f32(3, 30), u8(5, 7), f32(5, 1), u8(5, 1), 2, -1),
                           ValueError, "x.shape[1] (K) = 30 must be a multiple of 4 to pack four "
                           "2-bit values per byte"),
    "lowbit_mm-group-64-K-96": Case("lowbit_mm", lambda: (f32(3, 96), u8(5, 12), f32(5, 1),
                                                          u8(5, 0), 1, 64), ValueError,
                                    "x.shape[1] (K) = 96 is not a multiple of group_size 64"),
    "lowbit_mm-bias-length": Case("lowbit_mm", lambda: (f32(3, 64), *BIN.values(), 1, 32, f32(4)),
                                  ValueError, "bias has shape (4,): dimension 0 must be 5"),
    # --- sparse24_compress
    "sparse24_compress-w-int": Case("sparse24_compress", lambda: (i8(4, 8),), TypeError,
                                    f"w has dtype torch.int8; {ACCEPT_FLOAT}"),
    "sparse24_compress-K-30": Case("sparse24_compress", lambda: (torch.zeros(4, 30),), ValueError,
                                   "w.shape[1] (K) = 30 is not a multiple of 4; "
                                   "2:4 sparsity groups K in fours"),
    # --- sparse24_mm: x [3, 64], values [5, 32], meta [5, 16]
    "sparse24_mm-K-30": Case("sparse24_mm", lambda: (f32(3, 30), f32(5, 15), u8(5, 7)), ValueError,
                             "x.shape[1] (K) = 30 is not a multiple of 4"),
    "sparse24_mm-x-int": Case("sparse24_mm", lambda: (i8(3, 64), f32(5, 32), u8(5, 16)), TypeError,
                              f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "sparse24_mm-values-dtype": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32).half(),
                                                             u8(5, 16)), TypeError,
                                     "values has dtype torch.float16 but x has torch.float32; "
                                     "they must match"),
    "sparse24_mm-values-K": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 64), u8(5, 16)),
                                 ValueError, "values has shape (5, 64): dimension 1 must be 32 "
                                 "(values is [N, K/2]: 2 kept of every 4)"),
    "sparse24_mm-meta-int8": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32), i8(5, 16)),
                                  TypeError, "meta has dtype torch.int8; accepted: uint8"),
    "sparse24_mm-meta-rows": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32), u8(4, 16)),
                                  ValueError, "meta has shape (4, 16): dimension 0 must be 5 "
                                  "(one row per output row N of values)"),
    "sparse24_mm-meta-groups": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32), u8(5, 32)),
                                    ValueError, "meta has shape (5, 32): dimension 1 must be 16 "
                                    "(meta is [N, K/4]: one byte per group of 4)"),
    "sparse24_mm-bias-length": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32), u8(5, 16),
                                                            f32(7)), ValueError,
                                    "bias has shape (7,): dimension 0 must be 5"),
    # --- pack_sparse24_int4: w [4, 64]
    "pack_s24i4-w-int": Case("pack_sparse24_int4", lambda: (i8(4, 64), 32, True), TypeError,
                             f"w has dtype torch.int8; {ACCEPT_FLOAT}"),
    "pack_s24i4-K-12": Case("pack_sparse24_int4", lambda: (f32(4, 12), -1, True), ValueError,
                            "w.shape[1] (K) = 12 must be a multiple of 8: 2:4 + int4 stores "
                            "the indices of two groups of 4 per byte"),
    "pack_s24i4-group-16": Case("pack_sparse24_int4", lambda: (f32(4, 64), 16, True),
                                ValueError, "group_size 16 is not supported; accepted: 32, "
                                "64, 128 or -1"),
    "pack_s24i4-K-not-multiple": Case("pack_sparse24_int4", lambda: (f32(4, 96), 64, True),
                                      ValueError, "w.shape[1] (K) = 96 is not a multiple of "
                                      "group_size 64"),
    "pack_s24i4-symmetric-str": Case("pack_sparse24_int4", lambda: (torch.zeros(4, 64), 32, "yes"),
                                     TypeError, "symmetric must be a bool, got 'yes'", RuntimeError,
                                     "Expected a value of type 'bool' for argument 'symmetric'"),
    "pack_s24i4-not-24": Case("pack_sparse24_int4", lambda: (torch.ones(4, 64), 32, True),
                              ValueError, "w is not 2:4 sparse: row 0, group 0 (columns 0..3) "
                              "has 4 nonzeros"),
    # --- sparse24_int4_mm: x [3, 64], group_size 32, packed [5, 16], meta [5, 8]
    "s24i4_mm-x-int": Case("sparse24_int4_mm", lambda: (i8(3, 64), *_s24i4(), 32), TypeError,
                           f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "s24i4_mm-K-36": Case("sparse24_int4_mm", lambda: (f32(3, 36), u8(5, 9), u8(5, 4),
                                                       f32(5, 1), u8(5, 1), -1), ValueError,
                          "x.shape[1] (K) = 36 must be a multiple of 8"),
    "s24i4_mm-packed-K": Case("sparse24_int4_mm",
                              lambda: (f32(3, 64), *_s24i4(packed=u8(5, 32)), 32), ValueError,
                              "packed has shape (5, 32): dimension 1 must be 16 (packed is "
                              "[N, K/4]: the K/2 kept int4 codes, two per byte)"),
    "s24i4_mm-packed-int8": Case("sparse24_int4_mm",
                                 lambda: (f32(3, 64), *_s24i4(packed=i8(5, 16)), 32),
                                 TypeError, "packed has dtype torch.int8; accepted: uint8"),
    "s24i4_mm-meta-K": Case("sparse24_int4_mm",
                            lambda: (f32(3, 64), *_s24i4(meta=u8(5, 16)), 32), ValueError,
                            "meta has shape (5, 16): dimension 1 must be 8 (meta is [N, K/8]: "
                            "the indices of two groups of 4 per byte)"),
    "s24i4_mm-meta-rows": Case("sparse24_int4_mm",
                               lambda: (f32(3, 64), *_s24i4(meta=u8(4, 8)), 32), ValueError,
                               "meta has shape (4, 8): dimension 0 must be 5 (one row per "
                               "output row N of packed)"),
    "s24i4_mm-meta-float": Case("sparse24_int4_mm",
                                lambda: (f32(3, 64), *_s24i4(meta=f32(5, 8)), 32), TypeError,
                                "meta has dtype torch.float32; accepted: uint8"),
    "s24i4_mm-scales-groups": Case("sparse24_int4_mm",
                                   lambda: (f32(3, 64), *_s24i4(scales=f32(5, 1)), 32),
                                   ValueError, "scales has shape (5, 1): dimension 1 must be 2 "
                                   "(K / group_size = 64 / 32 groups)"),
    "s24i4_mm-zeros-rows": Case("sparse24_int4_mm",
                                lambda: (f32(3, 64), *_s24i4(zeros=u8(6, 2)), 32), ValueError,
                                "zeros has shape (6, 2): dimension 0 must be 5"),
    "s24i4_mm-group-48": Case("sparse24_int4_mm", lambda: (f32(3, 64), *_s24i4(), 48),
                              ValueError, "group_size 48 is not supported"),
    "s24i4_mm-bias-length": Case("sparse24_int4_mm",
                                 lambda: (f32(3, 64), *_s24i4(), 32, f32(4)), ValueError,
                                 "bias has shape (4,): dimension 0 must be 5"),
    # --- tensor-core layouts: repack ops check the canonical input; the *_tc matmuls
    # check their canonical arguments as the plain ops do (the repacked tensor's own
    # checks: tests/test_layout_*_tc.py)
    "repack_int4_tc-int8": Case("repack_int4_tc", lambda: (i8(5, 32),), TypeError,
                                "packed has dtype torch.int8; accepted: uint8"),
    "repack_int4_tc-1d": Case("repack_int4_tc", lambda: (u8(32),), ValueError,
                              "packed must be 2-D"),
    "int4_mm_tc-x-int": Case("int4_mm_tc", lambda: (i8(3, 64), _int4_tc(), f32(5, 2), u8(5, 2),
                                                    32), TypeError,
                             f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "int4_mm_tc-zeros-rows": Case("int4_mm_tc", lambda: (f32(3, 64), _int4_tc(), f32(5, 2),
                                                         u8(4, 2), 32), ValueError,
                                  "zeros has shape (4, 2): dimension 0 must be 5"),
    "int4_mm_tc-group": Case("int4_mm_tc", lambda: (f32(3, 64), _int4_tc(), f32(5, 2), u8(5, 2),
                                                    48), ValueError,
                             "group_size 48 is not supported"),
    # --- K-split layout (pyfast/layouts/int4_ksplit.py): x [3, 64], N = 5, group 32
    "repack_int4_ksplit-int8": Case("repack_int4_ksplit", lambda: (i8(5, 32), 2, 32), TypeError,
                                    "packed has dtype torch.int8; accepted: uint8"),
    "repack_int4_ksplit-chunks-3": Case("repack_int4_ksplit", lambda: (u8(5, 32), 3, 32),
                                        ValueError, "chunks = 3 does not cut K = 64 into equal "
                                                    "chunks of whole groups of 32"),
    "repack_int4_ksplit-chunks-0": Case("repack_int4_ksplit", lambda: (u8(5, 32), 0, 32),
                                        ValueError, "chunks must be >= 1, got 0"),
    "repack_int4_ksplit-group-48": Case("repack_int4_ksplit", lambda: (u8(5, 32), 2, 48),
                                        ValueError, "group_size 48 is not supported"),
    "int4_mm_ksplit-x-int": Case("int4_mm_ksplit", lambda: (i8(3, 64), _int4_ks(), f32(5, 2),
                                                            u8(5, 2), 32), TypeError,
                                 f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "int4_mm_ksplit-canonical-w": Case("int4_mm_ksplit", lambda: (f32(3, 64), u8(5, 32),
                                                                  f32(5, 2), u8(5, 2), 32),
                                       ValueError, "w_ks has shape (5, 32); for N = 5, K = 64 "
                                                   "it must be [C, N, K / (2 C)]"),
    "int4_mm_ksplit-w-dtype": Case("int4_mm_ksplit", lambda: (f32(3, 64), i8(2, 5, 16),
                                                              f32(5, 2), u8(5, 2), 32),
                                   TypeError, "w_ks has dtype torch.int8; accepted: uint8"),
    "int4_mm_ksplit-chunks-vs-group": Case("int4_mm_ksplit",
                                           lambda: (f32(3, 64), _int4_ks(2, -1), f32(5, 1),
                                                    u8(5, 1), 64), ValueError,
                                           "chunks = 2 does not cut K = 64 into equal chunks "
                                           "of whole groups of 64"),
    "int4_mm_ksplit-zeros-rows": Case("int4_mm_ksplit", lambda: (f32(3, 64), _int4_ks(),
                                                                 f32(5, 2), u8(4, 2), 32),
                                      ValueError, "zeros has shape (4, 2): dimension 0 must be 5"),
    "int4_mm_ksplit-bias-length": Case("int4_mm_ksplit", lambda: (f32(3, 64), _int4_ks(),
                                                                  f32(5, 2), u8(5, 2), 32,
                                                                  f32(4)), ValueError,
                                       "bias has shape (4,): dimension 0 must be 5"),
    "repack_sparse24_tc-float": Case("repack_sparse24_tc", lambda: (f32(5, 16),), TypeError,
                                     "meta has dtype torch.float32; accepted: uint8"),
    "sparse24_mm_tc-values-dtype": Case("sparse24_mm_tc", lambda: (f32(3, 64), f32(5, 32).half(),
                                                                   _meta_tc()), TypeError,
                                        "values has dtype torch.float16 but x has torch.float32"),
    "sparse24_mm_tc-K-30": Case("sparse24_mm_tc", lambda: (f32(3, 30), f32(5, 15), _meta_tc()),
                                ValueError, "x.shape[1] (K) = 30 is not a multiple of 4"),
    "repack_s24i4_tc-packed-int8": Case("repack_sparse24_int4_tc", lambda: (i8(5, 16), u8(5, 8)),
                                        TypeError, "packed has dtype torch.int8; accepted: uint8"),
    "repack_s24i4_tc-K-12": Case("repack_sparse24_int4_tc", lambda: (u8(5, 3), u8(5, 1)),
                                 ValueError, "packed has shape (5, 3): dimension 1 (K/4) must be "
                                 "even, K = 12 must be a multiple of 8"),
    "repack_s24i4_tc-meta-K": Case("repack_sparse24_int4_tc", lambda: (u8(5, 16), u8(5, 16)),
                                   ValueError, "meta has shape (5, 16): dimension 1 must be 8 "
                                   "(meta is [N, K/8]: the indices of two groups of 4 per byte)"),
    "repack_s24i4_tc-meta-unordered": Case("repack_sparse24_int4_tc",
                                           lambda: (u8(5, 16), u8(5, 8)), ValueError,
                                           "unpack_nibbles(meta)[0, 0] = 0 is not a 2:4 index "
                                           "pair"),
    "s24i4_mm_tc-x-int": Case("sparse24_int4_mm_tc", lambda: (i8(3, 64), *_s24i4_tc(), f32(5, 2),
                                                              u8(5, 2), 32), TypeError,
                              f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "s24i4_mm_tc-K-36": Case("sparse24_int4_mm_tc", lambda: (f32(3, 36), *_s24i4_tc(), f32(5, 1),
                                                             u8(5, 1), -1), ValueError,
                             "x.shape[1] (K) = 36 must be a multiple of 8"),
    "s24i4_mm_tc-canonical-weight": Case("sparse24_int4_mm_tc",
                                         lambda: (f32(3, 64), *_s24i4()[:2], f32(5, 2), u8(5, 2),
                                                  32), TypeError,
                                         "codes_tc has dtype torch.uint8; accepted: int32 (the "
                                         "output of repack_sparse24_int4_tc"),
    "s24i4_mm_tc-meta_tc-K": Case("sparse24_int4_mm_tc",
                                  lambda: (f32(3, 64), _s24i4_tc()[0], _meta_tc()[:, :, :16],
                                           f32(5, 2), u8(5, 2), 32), ValueError,
                                  "meta_tc has shape (1, 1, 16); for N = 5, K = 64 it must be "
                                  "(1, 1, 32)"),
    "s24i4_mm_tc-zeros-rows": Case("sparse24_int4_mm_tc",
                                   lambda: (f32(3, 64), *_s24i4_tc(), f32(5, 2), u8(4, 2), 32),
                                   ValueError, "zeros has shape (4, 2): dimension 0 must be 5"),
    "s24i4_mm_tc-group": Case("sparse24_int4_mm_tc", lambda: (f32(3, 64), *_s24i4_tc(),
                                                              f32(5, 2), u8(5, 2), 48),
                              ValueError, "group_size 48 is not supported"),
    "repack_int8_vnni-float": Case("repack_int8_vnni", lambda: (f32(5, 64),), TypeError,
                                   "w_int8 has dtype torch.float32; accepted: int8"),
    "repack_int8_vnni-1d": Case("repack_int8_vnni", lambda: (i8(64),), ValueError,
                                "w_int8 must be 2-D [N, K], got a 1-D tensor"),
    "w8a8_mm_vnni-x-int": Case("w8a8_mm_vnni", lambda: (i8(3, 64), _vnni(), f32(5)), TypeError,
                               f"x has dtype torch.int8; {ACCEPT_FLOAT}"),
    "w8a8_mm_vnni-canonical-w": Case("w8a8_mm_vnni", lambda: (f32(3, 64), i8(5, 64), f32(5)),
                                     ValueError, "w_vnni has shape (5, 64); for N = 5, K = 64 it "
                                                 "must be (1, 16, 48, 4)"),
    "w8a8_mm_vnni-K-mismatch": Case("w8a8_mm_vnni", lambda: (f32(3, 68), _vnni(), f32(5)),
                                    ValueError, "for N = 5, K = 68 it must be (1, 17, 48, 4)"),
    "w8a8_mm_vnni-w-dtype": Case("w8a8_mm_vnni", lambda: (f32(3, 64), u8(1, 16, 48, 4), f32(5)),
                                 TypeError, "w_vnni has dtype torch.uint8; accepted: int8"),
    "w8a8_mm_vnni-scale-2d": Case("w8a8_mm_vnni", lambda: (f32(3, 64), _vnni(), f32(5, 1)),
                                  ValueError, "w_scale must be 1-D"),
    "w8a8_mm_vnni-bias-length": Case("w8a8_mm_vnni", lambda: (f32(3, 64), _vnni(), f32(5),
                                                              f32(6)), ValueError,
                                     "bias has shape (6,)"),
    "w8a8_mm_vnni-K-too-large": Case("w8a8_mm_vnni",
                                     lambda: (f32(1, 131072), ops.repack_int8_vnni(i8(1, 131072)),
                                              f32(1)), ValueError,
                                     "x has K = 131072; w8a8_mm_vnni accepts K <= 131071"),
    # --- int8_mm_vnni: a [3, 64] int8, w_vnni of N = 5, a_scale [3], w_scale [5]
    "int8_mm_vnni-a-float": Case("int8_mm_vnni", lambda: (f32(3, 64), _vnni(), f32(3), f32(5)),
                                 TypeError, "a has dtype torch.float32; accepted: int8"),
    "int8_mm_vnni-canonical-w": Case("int8_mm_vnni", lambda: (i8(3, 64), i8(5, 64), f32(3), f32(5)),
                                     ValueError, "w_vnni has shape (5, 64); for N = 5, K = 64 it "
                                                 "must be (1, 16, 48, 4)"),
    "int8_mm_vnni-a_scale-length": Case("int8_mm_vnni",
                                        lambda: (i8(3, 64), _vnni(), f32(4), f32(5)), ValueError,
                                        "a_scale has shape (4,): dimension 0 must be 3 "
                                        "(one scale per row M of a)"),
    "int8_mm_vnni-out_dtype": Case("int8_mm_vnni", lambda: (i8(3, 64), _vnni(), f32(3), f32(5),
                                                            None, torch.int32), ValueError,
                                   f"out_dtype torch.int32 is not supported; {ACCEPT_FLOAT}"),
    "int8_mm_vnni-K-too-large": Case("int8_mm_vnni",
                                     lambda: (i8(1, 131072), ops.repack_int8_vnni(i8(1, 131072)),
                                              f32(1), f32(1)), ValueError,
                                     "a has K = 131072; int8_mm_vnni accepts K <= 131071"),
    # --- arguments that are not tensors
    "quantize-x-list": Case("quantize_per_token", lambda: ([[1.0, 2.0]],), TypeError,
                            "x must be a torch.Tensor, got list", RuntimeError,
                            "Expected a value of type 'Tensor' for argument 'x'"),
    # torch passes None for a Tensor argument through as None: the dispatcher's check says so
    "int8_mm-b-None": Case("int8_mm", lambda: (i8(3, 64), None, f32(3), f32(5)), TypeError,
                           "b must be a torch.Tensor, got NoneType"),
    "int8_weight_mm-scale-float": Case("int8_weight_mm", lambda: (f32(3, 64), i8(5, 64), 0.5),
                                       TypeError, "w_scale must be a torch.Tensor, got float",
                                       RuntimeError, "for argument 'w_scale'"),
    "sparse24_mm-bias-int": Case("sparse24_mm", lambda: (f32(3, 64), f32(5, 32), u8(5, 16), 3),
                                 TypeError, "bias must be a torch.Tensor, got int", RuntimeError,
                                 "Expected a value of type 'Optional[Tensor]' for argument 'bias'"),
}


def _call_wrapper(case):
    getattr(ops, case.op)(*case.args())


def _call_raw(case):
    getattr(torch.ops.pyfast, case.op)(*case.args())


@pytest.mark.parametrize("name", list(CASES))
def test_wrapper_error(name):
    case = CASES[name]
    with pytest.raises(case.exc, match=re.escape(case.message)):
        _call_wrapper(case)


@pytest.mark.parametrize("name", list(CASES))
def test_raw_op_error(name):
    case = CASES[name]
    with pytest.raises(case.raw_exc or case.exc, match=re.escape(case.raw_message or case.message)):
        _call_raw(case)


def test_every_op_has_error_cases():
    assert {c.op for c in CASES.values()} == set(ops.SCHEMAS)


# --- what the schema would convert, and the wrappers' single check ---------------------------
#
# torch's schema turns some wrong Python values into valid ones (None or 1 into a bool, a
# 0-d tensor into an int). The wrappers refuse them by name: the pack ops check every
# argument first, the matmuls their Python scalars (pyfast/ops.py, "typed Python API").

W = torch.randn(5, 64)
PACKED = ops.pack_int4(W, 32, True)
CONVERTED = {
    "pack_int4-symmetric-None": (lambda: ops.pack_int4(W, 32, None), "symmetric must be a bool, got None"),
    "pack_int4-symmetric-1": (lambda: ops.pack_int4(W, 32, 1), "symmetric must be a bool, got 1"),
    "int4_mm-group-tensor": (lambda: ops.int4_mm(f32(3, 64), *PACKED, torch.tensor(32)),
                             "group_size must be an int, got tensor(32)"),
    "int4_mm_tc-group-float": (lambda: ops.int4_mm_tc(f32(3, 64), *PACKED, 32.0),
                               "group_size must be an int, got 32.0"),
    "int4_mm_ksplit-group-float": (lambda: ops.int4_mm_ksplit(f32(3, 64), _int4_ks(),
                                                              *PACKED[1:], 32.0),
                                   "group_size must be an int, got 32.0"),
    "repack_int4_ksplit-chunks-True": (lambda: ops.repack_int4_ksplit(PACKED[0], True, 32),
                                       "chunks must be an int, got bool True"),
    "lowbit_mm-bits-True": (lambda: ops.lowbit_mm(f32(3, 64), *INT2.values(), True, 32),
                            "bits must be an int, got True"),
    "int8_mm-out_dtype-int": (lambda: ops.int8_mm(i8(3, 64), i8(5, 64), f32(3), f32(5), None, 6),
                              "out_dtype must be a torch.dtype, got 6"),
}


@pytest.mark.parametrize("name", list(CONVERTED))
def test_wrapper_refuses_what_the_schema_converts(name):
    call, message = CONVERTED[name]
    with pytest.raises(TypeError, match=re.escape(message)):
        call()


def test_matmul_wrappers_leave_the_checks_to_the_op(monkeypatch):
    """A valid int4_mm call through the wrapper runs the op's check once (in the
    dispatcher), not the wrapper's too; an invalid one gets the wrapper's check, whose
    error names the argument as the caller passed it."""
    calls = []
    original = ops.CHECKS["int4_mm"]
    monkeypatch.setitem(ops.CHECKS, "int4_mm", lambda *a: calls.append(1) or original(*a))
    x = f32(3, 64)
    assert ops.int4_mm(x, *PACKED, 32).shape == (3, 5)
    assert calls == []
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        ops.int4_mm(x.numpy(), *PACKED, 32)
    assert calls == [1]


# --- 2:4 data check: names the first offending row and group ----------------------------------

def _not_24():
    w = torch.zeros(4, 16)
    w[0, 12:16] = torch.tensor([1.0, 2.0, 0.0, 0.0])        # row 0 group 3: 2 nonzeros, fine
    w[2, 4:8] = torch.tensor([1.0, 0.0, -2.0, 3.0])         # row 2 group 1: 3 nonzeros
    w[3, 0:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])          # row 3 group 0: 4 nonzeros
    return w


@pytest.mark.parametrize("path", ["wrapper", "raw"])
def test_sparse24_compress_names_first_bad_row_and_group(path):
    fn = ops.sparse24_compress if path == "wrapper" else torch.ops.pyfast.sparse24_compress
    with pytest.raises(ValueError, match=re.escape(
            "w is not 2:4 sparse: row 2, group 1 (columns 4..7) has 3 nonzeros [1.0, 0.0, -2.0, 3.0]; "
            "each group of 4 along K may keep at most 2")):
        fn(_not_24())
    # once row 2 is fixed, row 3 group 0 is the first offender
    w = _not_24()
    w[2, 7] = 0
    with pytest.raises(ValueError, match=re.escape("row 3, group 0 (columns 0..3) has 4 nonzeros")):
        fn(w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_sparse24_compress_counts_nan_as_nonzero(dtype):
    w = torch.zeros(2, 8, dtype=dtype)
    w[1, 4:8] = torch.tensor([float("nan"), 1.0, 0.0, 2.0], dtype=dtype)
    with pytest.raises(ValueError, match=r"row 1, group 1 \(columns 4\.\.7\) has 3 nonzeros"):
        ops.sparse24_compress(w)


# --- devices --------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("path", ["wrapper", "raw"])
def test_inputs_on_different_devices(path):
    mod = ops if path == "wrapper" else torch.ops.pyfast
    a = torch.zeros(3, 64, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match=re.escape(
            "b is on cpu but a is on cuda:0; all inputs must be on the same device")):
        mod.int8_mm(a, i8(5, 64), f32(3).cuda(), f32(5).cuda())
    x = torch.randn(3, 64, device="cuda")
    with pytest.raises(ValueError, match=re.escape("bias is on cpu but x is on cuda:0")):
        mod.int8_weight_mm(x, i8(5, 64).cuda(), f32(5).cuda(), f32(5))
    p, s, z = ops.pack_int4(torch.randn(5, 64), 32, True)
    with pytest.raises(ValueError, match=re.escape("packed is on cpu but x is on cuda:0")):
        mod.int4_mm(x, p, s.cuda(), z.cuda(), 32)
    p2, s2, z2 = ops.pack_lowbit(torch.randn(5, 64), 2, 32)
    with pytest.raises(ValueError, match=re.escape("scales is on cpu but x is on cuda:0")):
        mod.lowbit_mm(x, p2.cuda(), s2, z2.cuda(), 2, 32)
    v, m = ops.sparse24_compress(torch.zeros(5, 64))
    with pytest.raises(ValueError, match=re.escape("meta is on cpu but x is on cuda:0")):
        mod.sparse24_mm(x, v.cuda(), m)
