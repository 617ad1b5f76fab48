"""The pyfast ops: one schema each, one fake (for torch.compile), one dispatcher.

Every op is registered in the torch.library namespace `pyfast`, so a model that
calls `torch.ops.pyfast.<op>` traces under torch.compile as one opaque node. Its
CPU and CUDA implementations are the same small function: check the inputs
(pyfast/_checks.py), pick a backend with the rule in pyfast/dispatch.py, call it.
The typed wrappers at the bottom are the Python API (`pyfast.ops.int8_mm(...)`).
Layouts of every packed tensor: pyfast/formats.py.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _checks as chk
from . import dispatch, reference
from .layouts import int4_ksplit, int4_tc, int8_vnni, sparse24_int4_tc, sparse24_tc

Tensor = torch.Tensor
# 128 * 128 * K must stay below 2**31 for the int32 accumulator (csrc/cpu/int8_mm.cpp too).
MAX_INT8_K = 2**31 // 128**2 - 1

SCHEMAS: Dict[str, str] = {
    # x [M, K] float -> (x_int8 [M, K] int8, scale [M] float32)
    "quantize_per_token": "quantize_per_token(Tensor x) -> (Tensor, Tensor)",
    # x [M, K] float, scale float32 [1] (calibrated) -> (x_int8 [M, K], scale [M] float32)
    "quantize_static": "quantize_static(Tensor x, Tensor scale) -> (Tensor, Tensor)",
    # a [M, K] int8, b [N, K] int8, a_scale [M], b_scale [N], bias [N] -> [M, N] out_dtype
    "int8_mm": "int8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, "
               "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
    # W8A8 in one op: quantize_per_token(x), then int8_mm with out_dtype x.dtype.
    # x [M, K] float, w_int8 [N, K], w_scale [N], bias [N] -> [M, N] x.dtype
    "w8a8_mm": "w8a8_mm(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias=None) -> Tensor",
    # x [M, K] float, w_int8 [N, K], w_scale [N], bias [N] -> [M, N] x.dtype
    "int8_weight_mm": "int8_weight_mm(Tensor x, Tensor w_int8, Tensor w_scale, "
                      "Tensor? bias=None) -> Tensor",
    # w [N, K] float -> (packed uint8 [N, K/2], scales float32 [N, G], zeros uint8 [N, G])
    "pack_int4": "pack_int4(Tensor w, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)",
    # x [M, K] float, packed/scales/zeros as above -> [M, N] x.dtype
    "int4_mm": "int4_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, "
               "int group_size, Tensor? bias=None) -> Tensor",
    # w [N, K] float, bits 1|2 -> (packed uint8 [N, K*bits/8], scales f32 [N, G],
    #                              zeros uint8 [N, G] (bits 2) or [N, 0] (bits 1))
    "pack_lowbit": "pack_lowbit(Tensor w, int bits, int group_size) -> (Tensor, Tensor, Tensor)",
    # x [M, K] float, packed/scales/zeros as above -> [M, N] x.dtype
    "lowbit_mm": "lowbit_mm(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int bits, "
                 "int group_size, Tensor? bias=None) -> Tensor",
    # w [N, K] float, 2:4 along K -> (values [N, K/2] w.dtype, meta uint8 [N, K/4])
    "sparse24_compress": "sparse24_compress(Tensor w) -> (Tensor, Tensor)",
    # x [M, K] float, values [N, K/2], meta uint8 [N, K/4] -> [M, N] x.dtype
    "sparse24_mm": "sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor",
    # 2:4 + int4 (formats.py): w [N, K] float, already 2:4 along K -> (packed uint8 [N, K/4],
    # meta uint8 [N, K/8], scales float32 [N, G], zeros uint8 [N, G])
    "pack_sparse24_int4": "pack_sparse24_int4(Tensor w, int group_size, bool symmetric) "
                          "-> (Tensor, Tensor, Tensor, Tensor)",
    # x [M, K] float, packed/meta/scales/zeros as above -> [M, N] x.dtype
    "sparse24_int4_mm": "sparse24_int4_mm(Tensor x, Tensor packed, Tensor meta, Tensor scales, "
                        "Tensor zeros, int group_size, Tensor? bias=None) -> Tensor",
    # Tensor-core layouts (pyfast/layouts), made once at layer creation for the CUDA kernels:
    # packed uint8 [N, K/2] -> w_tc in int4 fragment order (pyfast/layouts/int4_tc.py)
    "repack_int4_tc": "repack_int4_tc(Tensor packed) -> Tensor",
    # int4_mm on a repacked weight: N = scales.shape[0], K = x.shape[1] -> [M, N] x.dtype
    "int4_mm_tc": "int4_mm_tc(Tensor x, Tensor w_tc, Tensor scales, Tensor zeros, "
                  "int group_size, Tensor? bias=None) -> Tensor",
    # meta uint8 [N, K/4] -> meta_tc in sparse-tensor-core order (pyfast/layouts/sparse24_tc.py)
    "repack_sparse24_tc": "repack_sparse24_tc(Tensor meta) -> Tensor",
    # sparse24_mm with repacked metadata: values [N, K/2] as before -> [M, N] x.dtype
    "sparse24_mm_tc": "sparse24_mm_tc(Tensor x, Tensor values, Tensor meta_tc, "
                      "Tensor? bias=None) -> Tensor",
    # 2:4 + int4 packed uint8 [N, K/4], meta uint8 [N, K/8] -> (codes_tc int32
    # [ceil(N/16), ceil(K/64), 32, 2], meta_tc int32 [ceil(N/16), ceil(K/64), 32])
    # in sparse-tensor-core order (pyfast/layouts/sparse24_int4_tc.py)
    "repack_sparse24_int4_tc": "repack_sparse24_int4_tc(Tensor packed, Tensor meta) "
                               "-> (Tensor, Tensor)",
    # sparse24_int4_mm on a repacked weight: N = scales.shape[0], K = x.shape[1] -> [M, N]
    "sparse24_int4_mm_tc": "sparse24_int4_mm_tc(Tensor x, Tensor codes_tc, Tensor meta_tc, "
                           "Tensor scales, Tensor zeros, int group_size, Tensor? bias=None) "
                           "-> Tensor",
    # CPU K-split layout (pyfast/layouts/int4_ksplit.py), made once at layer creation:
    # packed uint8 [N, K/2] -> w_ks uint8 [C, N, K/(2C)], chunk c the columns of chunk c
    "repack_int4_ksplit": "repack_int4_ksplit(Tensor packed, int chunks, int group_size) -> Tensor",
    # int4_mm on a K-split weight: scales/zeros [N, G] canonical -> [M, N] x.dtype
    "int4_mm_ksplit": "int4_mm_ksplit(Tensor x, Tensor w_ks, Tensor scales, Tensor zeros, "
                      "int group_size, Tensor? bias=None) -> Tensor",
    # CPU VNNI layout (pyfast/layouts/int8_vnni.py), made once at layer creation:
    # w_int8 [N, K] -> w_vnni int8 [ceil(N/48), ceil(K/4), 48, 4]
    "repack_int8_vnni": "repack_int8_vnni(Tensor w_int8) -> Tensor",
    # w8a8_mm on a repacked weight: N = w_scale.shape[0], K = x.shape[1] -> [M, N] x.dtype
    "w8a8_mm_vnni": "w8a8_mm_vnni(Tensor x, Tensor w_vnni, Tensor w_scale, "
                    "Tensor? bias=None) -> Tensor",
    # int8_mm on a repacked weight (static int8: quantize_static, then this):
    # a [M, K] int8, a_scale [M], N = w_scale.shape[0] -> [M, N] out_dtype
    "int8_mm_vnni": "int8_mm_vnni(Tensor a, Tensor w_vnni, Tensor a_scale, Tensor w_scale, "
                    "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
}


# --- checks: shapes, dtypes, devices; return the output shapes/dtypes ----------

def _check_quantize_per_token(x):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)


def _check_quantize_static(x, scale):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.scale_vector("scale", scale, 1, "one calibrated scale for the whole tensor")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale has dtype {scale.dtype}; accepted: float32")
    chk.same_device(x=x, scale=scale)


def _check_int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    chk.tensor("a", a, dtypes=(torch.int8,), dim=2)
    chk.tensor("b", b, dtypes=(torch.int8,), dim=2)
    chk.size("b", b, 1, a.shape[1], "b is [N, K] and must share K with a [M, K]")
    if a.shape[1] > MAX_INT8_K:
        raise ValueError(f"a has K = {a.shape[1]}; int8_mm accepts K <= {MAX_INT8_K}, "
                         "so that no int32 sum of int8 products can overflow")
    chk.scale_vector("a_scale", a_scale, a.shape[0], "one scale per row M of a")
    chk.scale_vector("b_scale", b_scale, b.shape[0], "one scale per row N of b")
    chk.bias(bias, b.shape[0])
    chk.out_dtype(out_dtype)
    chk.same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)


def _check_int8_weight_mm(x, w_int8, w_scale, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.tensor("w_int8", w_int8, dtypes=(torch.int8,), dim=2)
    chk.size("w_int8", w_int8, 1, x.shape[1], "w_int8 is [N, K] and must share K with x [M, K]")
    chk.scale_vector("w_scale", w_scale, w_int8.shape[0], "one scale per output row N")
    chk.bias(bias, w_int8.shape[0])
    chk.same_device(x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)


def _check_w8a8_mm(x, w_int8, w_scale, bias=None):
    _check_int8_weight_mm(x, w_int8, w_scale, bias)
    if x.shape[1] > MAX_INT8_K:
        raise ValueError(f"x has K = {x.shape[1]}; w8a8_mm accepts K <= {MAX_INT8_K}, "
                         "so that no int32 sum of int8 products can overflow")


def _check_pack_int4(w, group_size, symmetric):
    chk.tensor("w", w, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.group_size(group_size, w.shape[1], k_name="w.shape[1] (K)")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")


def _check_group_params(scales, zeros, n, k, group_size, groups):
    """scales float [N, G] and zeros uint8 [N, G] of int4_mm and sparse24_int4_mm."""
    chk.tensor("scales", scales, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.tensor("zeros", zeros, dtypes=(torch.uint8,), dim=2)
    if scales.shape == (n, groups) and zeros.shape == (n, groups):   # every call: one test
        return
    for name, t in (("scales", scales), ("zeros", zeros)):
        chk.size(name, t, 0, n, "one row per output row N of packed")
        chk.size(name, t, 1, groups, "K / group_size = {} / {} groups", k, group_size)


def _check_int4_mm(x, packed, scales, zeros, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.tensor("packed", packed, dtypes=(torch.uint8,), dim=2)
    k = x.shape[1]
    gs = chk.group_size(group_size, k, k_name="x.shape[1] (K)")
    n, groups = packed.shape[0], k // gs
    chk.size("packed", packed, 1, k // 2, "packed is [N, K/2]: two int4 values per byte")
    _check_group_params(scales, zeros, n, k, group_size, groups)
    chk.bias(bias, n)
    chk.same_device(x=x, packed=packed, scales=scales, zeros=zeros, bias=bias)


def _check_pack_lowbit(w, bits, group_size):
    chk.tensor("w", w, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.lowbit_bits(bits)
    chk.group_size(group_size, w.shape[1], k_name="w.shape[1] (K)", bits=bits)


def _check_lowbit_mm(x, packed, scales, zeros, bits, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.lowbit_bits(bits)
    chk.tensor("packed", packed, dtypes=(torch.uint8,), dim=2)
    k = x.shape[1]
    gs = chk.group_size(group_size, k, k_name="x.shape[1] (K)", bits=bits)
    n, groups = packed.shape[0], k // gs
    chk.size("packed", packed, 1, k * bits // 8,
             "packed is [N, K*{}/8]: {} {}-bit values per byte", bits, 8 // bits, bits)
    chk.tensor("scales", scales, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.tensor("zeros", zeros, dtypes=(torch.uint8,), dim=2)
    for name, t in (("scales", scales), ("zeros", zeros)):
        chk.size(name, t, 0, n, "one row per output row N of packed")
    chk.size("scales", scales, 1, groups, "K / group_size = {} / {} groups", k, group_size)
    if bits == 1:
        chk.size("zeros", zeros, 1, 0, "binary weights have no zero point: zeros is [N, 0]")
    else:
        chk.size("zeros", zeros, 1, groups, "K / group_size = {} / {} groups", k, group_size)
    chk.bias(bias, n)
    chk.same_device(x=x, packed=packed, scales=scales, zeros=zeros, bias=bias)


def _check_sparse24_compress(w):
    chk.tensor("w", w, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.multiple_of_4("w.shape[1] (K)", w.shape[1])


def _check_sparse24_values(w):
    """Data check (not possible at trace time): every group of 4 keeps <= 2."""
    bad = reference.sparse24_violations(w)
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        vals = w[row, 4 * group:4 * group + 4].tolist()
        raise ValueError(
            f"w is not 2:4 sparse: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) "
            f"has {sum(v != 0 for v in vals)} nonzeros {vals}; each group of 4 along K may keep "
            "at most 2 (prune it first: pyfast.sparsify, or pyfast.prune.n_m then prune.finish)"
        )


def _check_sparse24_x_values(x, values):
    """x [M, K] and the kept values [N, K/2] of sparse24_mm and sparse24_mm_tc."""
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.multiple_of_4("x.shape[1] (K)", x.shape[1])
    chk.tensor("values", values, dtypes=chk.FLOAT_DTYPES, dim=2)
    if values.dtype != x.dtype:
        raise TypeError(
            f"values has dtype {values.dtype} but x has {x.dtype}; they must match "
            "(convert the layer with .to(dtype))"
        )
    chk.size("values", values, 1, x.shape[1] // 2, "values is [N, K/2]: 2 kept of every 4")


def _check_sparse24_mm(x, values, meta, bias=None):
    _check_sparse24_x_values(x, values)
    chk.tensor("meta", meta, dtypes=(torch.uint8,), dim=2)
    chk.size("meta", meta, 0, values.shape[0], "one row per output row N of values")
    chk.size("meta", meta, 1, x.shape[1] // 4, "meta is [N, K/4]: one byte per group of 4")
    chk.bias(bias, values.shape[0])
    chk.same_device(x=x, values=values, meta=meta, bias=bias)


def _sparse24_int4_group(group_size, k, k_name):
    """The group length of a 2:4 + int4 weight with K = k dense columns."""
    gs = chk.group_size(group_size, k, k_name=k_name)
    if k % 8:
        raise ValueError(f"{k_name} = {k} must be a multiple of 8: 2:4 + int4 stores the "
                         "indices of two groups of 4 per byte")
    return gs


def _check_pack_sparse24_int4(w, group_size, symmetric):
    chk.tensor("w", w, dtypes=chk.FLOAT_DTYPES, dim=2)
    _sparse24_int4_group(group_size, w.shape[1], "w.shape[1] (K)")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")


def _check_pack_sparse24_int4_values(w, group_size, symmetric):
    _check_sparse24_values(w)


def _check_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    k = x.shape[1]
    gs = _sparse24_int4_group(group_size, k, "x.shape[1] (K)")
    chk.tensor("packed", packed, dtypes=(torch.uint8,), dim=2)
    n, groups = packed.shape[0], k // gs
    chk.size("packed", packed, 1, k // 4, "packed is [N, K/4]: the K/2 kept int4 codes, "
             "two per byte")
    chk.tensor("meta", meta, dtypes=(torch.uint8,), dim=2)
    chk.size("meta", meta, 0, n, "one row per output row N of packed")
    chk.size("meta", meta, 1, k // 8, "meta is [N, K/8]: the indices of two groups of 4 "
             "per byte")
    _check_group_params(scales, zeros, n, k, group_size, groups)
    chk.bias(bias, n)
    chk.same_device(x=x, packed=packed, meta=meta, scales=scales, zeros=zeros, bias=bias)


def _check_repack_int4_tc(packed):
    chk.tensor("packed", packed, dtypes=(torch.uint8,), dim=2)


def _check_tc_group_params(scales, zeros, k, gs, group_size) -> int:
    """scales float [N, G] and zeros uint8 [N, G] of int4_mm_tc and sparse24_int4_mm_tc,
    whose repacked weight has no N of its own: N = scales.shape[0] (returned)."""
    chk.tensor("scales", scales, dtypes=chk.FLOAT_DTYPES, dim=2)
    chk.tensor("zeros", zeros, dtypes=(torch.uint8,), dim=2)
    n = scales.shape[0]
    chk.size("zeros", zeros, 0, n, "one row per output row N (scales.shape[0])")
    for name, t in (("scales", scales), ("zeros", zeros)):
        chk.size(name, t, 1, k // gs, "K / group_size = {} / {} groups", k, group_size)
    return n


def _check_int4_mm_tc(x, w_tc, scales, zeros, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    k = x.shape[1]
    gs = chk.group_size(group_size, k, k_name="x.shape[1] (K)")
    n = _check_tc_group_params(scales, zeros, k, gs, group_size)
    int4_tc.check_repacked(w_tc, n, k, "w_tc")
    chk.bias(bias, n)
    chk.same_device(x=x, w_tc=w_tc, scales=scales, zeros=zeros, bias=bias)


def _check_repack_int4_ksplit(packed, chunks, group_size):
    chk.tensor("packed", packed, dtypes=(torch.uint8,), dim=2)
    k = 2 * packed.shape[1]
    chk.group_size(group_size, k, k_name="2 * packed.shape[1] (K)")
    int4_ksplit.check_chunks(k, chunks, group_size)


def _check_int4_mm_ksplit(x, w_ks, scales, zeros, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    k = x.shape[1]
    gs = chk.group_size(group_size, k, k_name="x.shape[1] (K)")
    n = _check_tc_group_params(scales, zeros, k, gs, group_size)
    int4_ksplit.check_repacked(w_ks, n, k, group_size, "w_ks")
    chk.bias(bias, n)
    chk.same_device(x=x, w_ks=w_ks, scales=scales, zeros=zeros, bias=bias)


def _check_repack_sparse24_tc(meta):
    chk.tensor("meta", meta, dtypes=(torch.uint8,), dim=2)


def _check_sparse24_mm_tc(x, values, meta_tc, bias=None):
    _check_sparse24_x_values(x, values)
    sparse24_tc.check_repacked(meta_tc, values.shape[0], x.shape[1], "meta_tc")
    chk.bias(bias, values.shape[0])
    chk.same_device(x=x, values=values, meta_tc=meta_tc, bias=bias)


def _check_repack_sparse24_int4_tc(packed, meta):
    n, k = sparse24_int4_tc.check_canonical(packed, meta)
    chk.same_device(packed=packed, meta=meta)
    return n, k


def _check_repack_sparse24_int4_tc_values(packed, meta):
    sparse24_int4_tc.check_meta_values(meta)


def _check_sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, group_size, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    k = x.shape[1]
    gs = _sparse24_int4_group(group_size, k, "x.shape[1] (K)")
    n = _check_tc_group_params(scales, zeros, k, gs, group_size)
    sparse24_int4_tc.check_repacked(codes_tc, meta_tc, n, k)
    chk.bias(bias, n)
    chk.same_device(x=x, codes_tc=codes_tc, meta_tc=meta_tc, scales=scales, zeros=zeros,
                    bias=bias)


def _check_repack_int8_vnni(w_int8):
    chk.tensor("w_int8", w_int8, dtypes=(torch.int8,), dim=2, layout="[N, K]")


def _check_vnni_weight(op, x_name, k, w_vnni, w_scale, bias):
    """w_vnni / w_scale / bias of w8a8_mm_vnni and int8_mm_vnni (N from w_scale)."""
    chk.tensor("w_scale", w_scale, dtypes=chk.FLOAT_DTYPES, dim=1)  # [N]: N comes from it
    n = w_scale.shape[0]
    int8_vnni.check_repacked(w_vnni, n, k, "w_vnni")
    if k > MAX_INT8_K:
        raise ValueError(f"{x_name} has K = {k}; {op} accepts K <= {MAX_INT8_K}, "
                         "so that no int32 sum of int8 products can overflow")
    chk.bias(bias, n)


def _check_w8a8_mm_vnni(x, w_vnni, w_scale, bias=None):
    chk.tensor("x", x, dtypes=chk.FLOAT_DTYPES, dim=2)
    _check_vnni_weight("w8a8_mm_vnni", "x", x.shape[1], w_vnni, w_scale, bias)
    chk.same_device(x=x, w_vnni=w_vnni, w_scale=w_scale, bias=bias)


def _check_int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias=None, out_dtype=None):
    chk.tensor("a", a, dtypes=(torch.int8,), dim=2)
    _check_vnni_weight("int8_mm_vnni", "a", a.shape[1], w_vnni, w_scale, bias)
    chk.scale_vector("a_scale", a_scale, a.shape[0], "one scale per row M of a")
    chk.out_dtype(out_dtype)
    chk.same_device(a=a, w_vnni=w_vnni, a_scale=a_scale, w_scale=w_scale, bias=bias)


CHECKS: Dict[str, Callable] = {
    "quantize_per_token": _check_quantize_per_token,
    "quantize_static": _check_quantize_static,
    "int8_mm": _check_int8_mm,
    "w8a8_mm": _check_w8a8_mm,
    "int8_weight_mm": _check_int8_weight_mm,
    "pack_int4": _check_pack_int4,
    "int4_mm": _check_int4_mm,
    "pack_lowbit": _check_pack_lowbit,
    "lowbit_mm": _check_lowbit_mm,
    "sparse24_compress": _check_sparse24_compress,
    "sparse24_mm": _check_sparse24_mm,
    "pack_sparse24_int4": _check_pack_sparse24_int4,
    "sparse24_int4_mm": _check_sparse24_int4_mm,
    "repack_int4_tc": _check_repack_int4_tc,
    "int4_mm_tc": _check_int4_mm_tc,
    "repack_int4_ksplit": _check_repack_int4_ksplit,
    "int4_mm_ksplit": _check_int4_mm_ksplit,
    "repack_sparse24_tc": _check_repack_sparse24_tc,
    "sparse24_mm_tc": _check_sparse24_mm_tc,
    "repack_sparse24_int4_tc": _check_repack_sparse24_int4_tc,
    "sparse24_int4_mm_tc": _check_sparse24_int4_mm_tc,
    "repack_int8_vnni": _check_repack_int8_vnni,
    "w8a8_mm_vnni": _check_w8a8_mm_vnni,
    "int8_mm_vnni": _check_int8_mm_vnni,
}
VALUE_CHECKS: Dict[str, Callable] = {"sparse24_compress": _check_sparse24_values,
                                     "pack_sparse24_int4": _check_pack_sparse24_int4_values,
                                     "repack_sparse24_tc": sparse24_tc.check_meta_values,
                                     "repack_sparse24_int4_tc":
                                         _check_repack_sparse24_int4_tc_values}


# --- fakes: output metadata only, for torch.compile ---------------------------

def _fake_quantize_per_token(x):
    _check_quantize_per_token(x)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32))


def _fake_quantize_static(x, scale):
    _check_quantize_static(x, scale)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32))


def _fake_int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    _check_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=chk.out_dtype(out_dtype))


def _fake_w8a8_mm(x, w_int8, w_scale, bias=None):
    _check_w8a8_mm(x, w_int8, w_scale, bias)
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _fake_int8_weight_mm(x, w_int8, w_scale, bias=None):
    _check_int8_weight_mm(x, w_int8, w_scale, bias)
    return x.new_empty((x.shape[0], w_int8.shape[0]))


def _fake_pack_int4(w, group_size, symmetric):
    _check_pack_int4(w, group_size, symmetric)
    n, k = w.shape
    groups = 1 if group_size == -1 else k // group_size
    return (w.new_empty((n, k // 2), dtype=torch.uint8),
            w.new_empty((n, groups), dtype=torch.float32),
            w.new_empty((n, groups), dtype=torch.uint8))


def _fake_int4_mm(x, packed, scales, zeros, group_size, bias=None):
    _check_int4_mm(x, packed, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], packed.shape[0]))


def _fake_pack_lowbit(w, bits, group_size):
    _check_pack_lowbit(w, bits, group_size)
    n, k = w.shape
    groups = 1 if group_size == -1 else k // group_size
    return (w.new_empty((n, k * bits // 8), dtype=torch.uint8),
            w.new_empty((n, groups), dtype=torch.float32),
            w.new_empty((n, groups if bits == 2 else 0), dtype=torch.uint8))


def _fake_lowbit_mm(x, packed, scales, zeros, bits, group_size, bias=None):
    _check_lowbit_mm(x, packed, scales, zeros, bits, group_size, bias)
    return x.new_empty((x.shape[0], packed.shape[0]))


def _fake_sparse24_compress(w):
    _check_sparse24_compress(w)
    n, k = w.shape
    return w.new_empty((n, k // 2)), w.new_empty((n, k // 4), dtype=torch.uint8)


def _fake_sparse24_mm(x, values, meta, bias=None):
    _check_sparse24_mm(x, values, meta, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


def _fake_pack_sparse24_int4(w, group_size, symmetric):
    _check_pack_sparse24_int4(w, group_size, symmetric)
    n, k = w.shape
    groups = 1 if group_size == -1 else k // group_size
    return (w.new_empty((n, k // 4), dtype=torch.uint8),
            w.new_empty((n, k // 8), dtype=torch.uint8),
            w.new_empty((n, groups), dtype=torch.float32),
            w.new_empty((n, groups), dtype=torch.uint8))


def _fake_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None):
    _check_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], packed.shape[0]))


def _fake_repack_int4_tc(packed):
    _check_repack_int4_tc(packed)
    shape = int4_tc.repacked_shape(packed.shape[0], 2 * packed.shape[1])
    return packed.new_empty(shape, dtype=torch.int32)


def _fake_int4_mm_tc(x, w_tc, scales, zeros, group_size, bias=None):
    _check_int4_mm_tc(x, w_tc, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], scales.shape[0]))


def _fake_repack_int4_ksplit(packed, chunks, group_size):
    _check_repack_int4_ksplit(packed, chunks, group_size)
    n, half = packed.shape
    return packed.new_empty((chunks, n, half // chunks))


def _fake_int4_mm_ksplit(x, w_ks, scales, zeros, group_size, bias=None):
    _check_int4_mm_ksplit(x, w_ks, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], scales.shape[0]))


def _fake_repack_sparse24_tc(meta):
    _check_repack_sparse24_tc(meta)
    shape = sparse24_tc.repacked_shape(meta.shape[0], 4 * meta.shape[1])
    return meta.new_empty(shape, dtype=torch.int32)


def _fake_sparse24_mm_tc(x, values, meta_tc, bias=None):
    _check_sparse24_mm_tc(x, values, meta_tc, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


def _fake_repack_sparse24_int4_tc(packed, meta):
    n, k = _check_repack_sparse24_int4_tc(packed, meta)
    return (packed.new_empty(sparse24_int4_tc.repacked_shape(n, k), dtype=torch.int32),
            meta.new_empty(sparse24_tc.repacked_shape(n, k), dtype=torch.int32))


def _fake_sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, group_size, bias=None):
    _check_sparse24_int4_mm_tc(x, codes_tc, meta_tc, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], scales.shape[0]))


def _fake_repack_int8_vnni(w_int8):
    _check_repack_int8_vnni(w_int8)
    return w_int8.new_empty(int8_vnni.repacked_shape(*w_int8.shape))


def _fake_w8a8_mm_vnni(x, w_vnni, w_scale, bias=None):
    _check_w8a8_mm_vnni(x, w_vnni, w_scale, bias)
    return x.new_empty((x.shape[0], w_scale.shape[0]))


def _fake_int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias=None, out_dtype=None):
    _check_int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], w_scale.shape[0]), dtype=chk.out_dtype(out_dtype))


FAKES: Dict[str, Callable] = {
    "quantize_per_token": _fake_quantize_per_token,
    "quantize_static": _fake_quantize_static,
    "int8_mm": _fake_int8_mm,
    "w8a8_mm": _fake_w8a8_mm,
    "int8_weight_mm": _fake_int8_weight_mm,
    "pack_int4": _fake_pack_int4,
    "int4_mm": _fake_int4_mm,
    "pack_lowbit": _fake_pack_lowbit,
    "lowbit_mm": _fake_lowbit_mm,
    "sparse24_compress": _fake_sparse24_compress,
    "sparse24_mm": _fake_sparse24_mm,
    "pack_sparse24_int4": _fake_pack_sparse24_int4,
    "sparse24_int4_mm": _fake_sparse24_int4_mm,
    "repack_int4_tc": _fake_repack_int4_tc,
    "int4_mm_tc": _fake_int4_mm_tc,
    "repack_int4_ksplit": _fake_repack_int4_ksplit,
    "int4_mm_ksplit": _fake_int4_mm_ksplit,
    "repack_sparse24_tc": _fake_repack_sparse24_tc,
    "sparse24_mm_tc": _fake_sparse24_mm_tc,
    "repack_sparse24_int4_tc": _fake_repack_sparse24_int4_tc,
    "sparse24_int4_mm_tc": _fake_sparse24_int4_mm_tc,
    "repack_int8_vnni": _fake_repack_int8_vnni,
    "w8a8_mm_vnni": _fake_w8a8_mm_vnni,
    "int8_mm_vnni": _fake_int8_mm_vnni,
}


# --- registration ----------------------------------------------------------------

def _reference_int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    return reference.int8_mm(a, b, a_scale, b_scale, bias, chk.out_dtype(out_dtype))


def _reference_int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias=None, out_dtype=None):
    return reference.int8_mm_vnni(a, w_vnni, a_scale, w_scale, bias, chk.out_dtype(out_dtype))


REFERENCE: Dict[str, Callable] = {
    "quantize_per_token": reference.quantize_per_token,
    "quantize_static": reference.quantize_static,
    "int8_mm": _reference_int8_mm,
    "w8a8_mm": reference.w8a8_mm,
    "int8_weight_mm": reference.int8_weight_mm,
    "pack_int4": reference.pack_int4,
    "int4_mm": reference.int4_mm,
    "pack_lowbit": reference.pack_lowbit,
    "lowbit_mm": reference.lowbit_mm,
    "sparse24_compress": reference.sparse24_compress,
    "sparse24_mm": reference.sparse24_mm,
    "pack_sparse24_int4": reference.pack_sparse24_int4,
    "sparse24_int4_mm": reference.sparse24_int4_mm,
    "repack_int4_tc": reference.repack_int4_tc,
    "int4_mm_tc": reference.int4_mm_tc,
    "repack_int4_ksplit": reference.repack_int4_ksplit,
    "int4_mm_ksplit": reference.int4_mm_ksplit,
    "repack_sparse24_tc": reference.repack_sparse24_tc,
    "sparse24_mm_tc": reference.sparse24_mm_tc,
    "repack_sparse24_int4_tc": reference.repack_sparse24_int4_tc,
    "sparse24_int4_mm_tc": reference.sparse24_int4_mm_tc,
    "repack_int8_vnni": reference.repack_int8_vnni,
    "w8a8_mm_vnni": reference.w8a8_mm_vnni,
    "int8_mm_vnni": _reference_int8_mm_vnni,
}


def _make_dispatcher(op: str) -> Callable:
    check, value_check = CHECKS[op], VALUE_CHECKS.get(op)
    # The dispatcher drops trailing arguments equal to their schema default; they are
    # filled back from the check's defaults (the schema's) so every backend gets the
    # full argument list. A tuple slice, not inspect.Signature.bind: this runs on every
    # call, and bind cost about a third of a small call's Python overhead.
    params = tuple(inspect.signature(check).parameters.values())
    defaults = tuple(p.default for p in params)
    required = sum(p.default is inspect.Parameter.empty for p in params)

    def run(*args):
        if len(args) < len(params):
            if len(args) < required:
                raise TypeError(f"pyfast.{op} takes at least {required} arguments, "
                                f"got {len(args)}")
            args = args + defaults[len(args):]
        check(*args)
        if value_check is not None:
            value_check(*args)
        backend = dispatch.choose(op, dispatch.device_type_of(args), args)
        return backend.fn(*args)

    run.__name__ = f"dispatch_{op}"
    return run


_LIB = torch.library.Library("pyfast", "DEF")
for _op, _schema in SCHEMAS.items():
    _LIB.define(_schema)
    torch.library.register_fake(f"pyfast::{_op}", FAKES[_op], lib=_LIB)
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_op, _make_dispatcher(_op), _key)
    dispatch.register(dispatch.Backend(
        "reference", _op, REFERENCE[_op], ("cpu", "cuda"), source="pyfast/reference.py"))


# --- typed Python API ---------------------------------------------------------------
#
# The matmuls and quantize_per_token (_call) run on every forward of a layer. Their op
# checks its own inputs (the dispatcher above, and the fake under torch.compile), so the
# wrapper checks only the Python scalars first (group_size, bits, out_dtype): the schema
# would convert some silently (group_size=True or a 0-d tensor to an int). A full check
# here too cost a second pass over every argument on every call (about 3.5 us at
# int4_mm); it runs only when the call fails, because the schema refuses a wrong Python
# type (a NumPy x) with a RuntimeError before any check runs: the check, on the arguments
# as the caller gave them, then raises the TypeError / ValueError that names the argument
# in its place; if it finds nothing wrong, the op's own error is raised. The pack and
# repack ops, run once per layer, check everything first (_call_checked): the schema
# would turn symmetric=None into False.

_OVERLOADS = {op: getattr(torch.ops.pyfast, op).default for op in SCHEMAS}


def _call(op: str, *args):
    try:
        return _OVERLOADS[op](*args)
    except (RuntimeError, TypeError, ValueError):
        error = _check_error(op, args)
        if error is None:
            raise
    raise error


def _call_checked(op: str, *args):
    CHECKS[op](*args)
    return _OVERLOADS[op](*args)


def _check_error(op: str, args: tuple) -> Optional[Exception]:
    try:
        CHECKS[op](*args)
    except (TypeError, ValueError) as exc:
        return exc
    return None

def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 per row: x [M, K] -> (int8 [M, K], float32 scale [M])."""
    return _call("quantize_per_token", x)


def quantize_static(x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric int8 with one calibrated scale: x [M, K] -> (int8 [M, K], float32 [M]).

    The [M] scales are `scale` repeated (NaN for a row holding a NaN), ready for int8_mm.
    scale must be positive and finite; this wrapper checks it (one host sync; not on
    meta tensors or while torch.compile traces), the op
    itself does not, so a layer checks its scale once when it is made."""
    _check_quantize_static(x, scale)
    check_static_scale("scale", scale)
    return torch.ops.pyfast.quantize_static(x, scale)


def check_static_scale(name: str, scale: Tensor) -> None:
    # Not on meta tensors (no value) nor while torch.compile traces (reading the value on
    # the host would be a data-dependent guard): a layer checks its scale when it is made
    # or loaded, so compiled layers are covered.
    if scale.device.type == "meta" or torch.compiler.is_compiling():
        return
    value = float(scale.detach().reshape(-1)[0])
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite float32, got {value} "
                         "(calibrate on data that is not all zero, NaN or infinite)")


def int8_mm(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor,
            bias: Optional[Tensor] = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """W8A8: (a [M,K] int8 @ b [N,K].T int8, int32 acc) * a_scale[:,None] * b_scale + bias."""
    chk.out_dtype(out_dtype)
    return _call("int8_mm", a, b, a_scale, b_scale, bias, out_dtype)


def w8a8_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor,
            bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 in one op: x [M,K] float quantized per token, then int8_mm against
    w_int8 [N,K] with w_scale [N] and bias [N]; out [M,N] in x.dtype. The same result
    as quantize_per_token followed by int8_mm (the reference is that composition);
    the CPU kernel quantizes x and runs the int8 GEMM in one call."""
    return _call("w8a8_mm", x, w_int8, w_scale, bias)


def int8_weight_mm(x: Tensor, w_int8: Tensor, w_scale: Tensor,
                   bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only int8: x [M,K] @ (w_int8 [N,K] * w_scale[:,None]).T + bias, in x.dtype."""
    return _call("int8_weight_mm", x, w_int8, w_scale, bias)


def pack_int4(w: Tensor, group_size: int = 128, symmetric: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Group-wise int4: w [N,K] -> (packed uint8 [N,K/2], scales f32 [N,G], zeros u8 [N,G])."""
    return _call_checked("pack_int4", w, group_size, symmetric)


def int4_mm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor,
            group_size: int = 128, bias: Optional[Tensor] = None) -> Tensor:
    """W4A16: x [M,K] @ dequant(packed, scales, zeros).T + bias, in x.dtype."""
    chk.int_arg("group_size", group_size)
    return _call("int4_mm", x, packed, scales, zeros, group_size, bias)


def pack_lowbit(w: Tensor, bits: int = 2, group_size: int = 128) -> Tuple[Tensor, Tensor, Tensor]:
    """int2 (bits 2, asymmetric) or binary (bits 1, XNOR-Net) group-wise:
    w [N,K] -> (packed u8 [N,K*bits/8], scales f32 [N,G], zeros u8 [N,G] or [N,0] for bits 1)."""
    return _call_checked("pack_lowbit", w, bits, group_size)


def lowbit_mm(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bits: int = 2,
              group_size: int = 128, bias: Optional[Tensor] = None) -> Tensor:
    """W2A16 / W1A16: x [M,K] @ dequant(packed, scales, zeros).T + bias, in x.dtype."""
    chk.lowbit_bits(bits)
    chk.int_arg("group_size", group_size)
    return _call("lowbit_mm", x, packed, scales, zeros, bits, group_size, bias)


def sparse24_compress(w: Tensor) -> Tuple[Tensor, Tensor]:
    """2:4 along K: w [N,K] -> (values [N,K/2], meta uint8 [N,K/4]); error if not 2:4."""
    return _call_checked("sparse24_compress", w)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x [M,K] @ W.T + bias with W the dense 2:4 matrix stored as (values, meta)."""
    return _call("sparse24_mm", x, values, meta, bias)


def pack_sparse24_int4(w: Tensor, group_size: int = 128,
                       symmetric: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """2:4 + int4: w [N,K], already 2:4 along K (else ValueError naming the first bad
    group) -> (packed u8 [N,K/4], meta u8 [N,K/8], scales f32 [N,G], zeros u8 [N,G])."""
    return _call_checked("pack_sparse24_int4", w, group_size, symmetric)


def sparse24_int4_mm(x: Tensor, packed: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor,
                     group_size: int = 128, bias: Optional[Tensor] = None) -> Tensor:
    """x [M,K] @ W.T + bias, W the dense 2:4 matrix whose kept values are int4 codes
    (pack_sparse24_int4); in x.dtype."""
    chk.int_arg("group_size", group_size)
    return _call("sparse24_int4_mm", x, packed, meta, scales, zeros, group_size, bias)


def repack_int4_tc(packed: Tensor) -> Tensor:
    """int4 packed uint8 [N, K/2] -> the same weight in the CUDA kernel's tensor-core
    fragment order (pyfast/layouts/int4_tc.py), for int4_mm_tc. Run once per layer."""
    return _call_checked("repack_int4_tc", packed)


def int4_mm_tc(x: Tensor, w_tc: Tensor, scales: Tensor, zeros: Tensor,
               group_size: int = 128, bias: Optional[Tensor] = None) -> Tensor:
    """int4_mm with the weight from repack_int4_tc; same result as int4_mm."""
    chk.int_arg("group_size", group_size)
    return _call("int4_mm_tc", x, w_tc, scales, zeros, group_size, bias)


def repack_int4_ksplit(packed: Tensor, chunks: int, group_size: int = 128) -> Tensor:
    """int4 packed uint8 [N, K/2] -> w_ks uint8 [chunks, N, K/(2 chunks)], the K-split
    layout of the C++ CPU kernel (pyfast/layouts/int4_ksplit.py; int4_ksplit.chunks_for
    gives the count "auto" uses), for int4_mm_ksplit. Exact; run once per layer."""
    chk.int_arg("group_size", group_size)
    return _call_checked("repack_int4_ksplit", packed, chunks, group_size)


def int4_mm_ksplit(x: Tensor, w_ks: Tensor, scales: Tensor, zeros: Tensor,
                   group_size: int = 128, bias: Optional[Tensor] = None) -> Tensor:
    """int4_mm with the weight from repack_int4_ksplit (scales and zeros canonical); same
    result as int4_mm up to float32 summation order (each chunk's sum, then the chunks
    added in order)."""
    chk.int_arg("group_size", group_size)
    return _call("int4_mm_ksplit", x, w_ks, scales, zeros, group_size, bias)


def repack_sparse24_tc(meta: Tensor) -> Tensor:
    """2:4 meta uint8 [N, K/4] -> the sparse-tensor-core metadata order of the CUDA
    kernel (pyfast/layouts/sparse24_tc.py), for sparse24_mm_tc. Run once per layer."""
    return _call_checked("repack_sparse24_tc", meta)


def sparse24_mm_tc(x: Tensor, values: Tensor, meta_tc: Tensor,
                   bias: Optional[Tensor] = None) -> Tensor:
    """sparse24_mm with the metadata from repack_sparse24_tc; same result as sparse24_mm."""
    return _call("sparse24_mm_tc", x, values, meta_tc, bias)


def repack_sparse24_int4_tc(packed: Tensor, meta: Tensor) -> Tuple[Tensor, Tensor]:
    """2:4 + int4 (packed uint8 [N, K/4], meta uint8 [N, K/8]) -> (codes_tc int32
    [ceil(N/16), ceil(K/64), 32, 2], meta_tc int32 [ceil(N/16), ceil(K/64), 32]), the
    sparse-tensor-core order of the CUDA kernel (pyfast/layouts/sparse24_int4_tc.py), for
    sparse24_int4_mm_tc. Exact; ValueError naming the first group whose meta nibble is not
    an ordered index pair. Run once per layer."""
    return _call_checked("repack_sparse24_int4_tc", packed, meta)


def sparse24_int4_mm_tc(x: Tensor, codes_tc: Tensor, meta_tc: Tensor, scales: Tensor,
                        zeros: Tensor, group_size: int = 128,
                        bias: Optional[Tensor] = None) -> Tensor:
    """sparse24_int4_mm with the weight from repack_sparse24_int4_tc (N = scales.shape[0]);
    same result as sparse24_int4_mm."""
    chk.int_arg("group_size", group_size)
    return _call("sparse24_int4_mm_tc", x, codes_tc, meta_tc, scales, zeros,
                                                group_size, bias)


def repack_int8_vnni(w_int8: Tensor) -> Tensor:
    """int8 weight [N, K] -> the VNNI panel order of the CPU kernel (pyfast/layouts/
    int8_vnni.py), for w8a8_mm_vnni. Exact; run once per layer."""
    return _call_checked("repack_int8_vnni", w_int8)


def w8a8_mm_vnni(x: Tensor, w_vnni: Tensor, w_scale: Tensor,
                 bias: Optional[Tensor] = None) -> Tensor:
    """w8a8_mm with the weight from repack_int8_vnni; the same result as w8a8_mm."""
    return _call("w8a8_mm_vnni", x, w_vnni, w_scale, bias)


def int8_mm_vnni(a: Tensor, w_vnni: Tensor, a_scale: Tensor, w_scale: Tensor,
                 bias: Optional[Tensor] = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """int8_mm with the weight from repack_int8_vnni (N = w_scale.shape[0]); the same
    result as int8_mm on the [N, K] weight. For activations quantized beforehand, as
    static int8 does (quantize_static, then this)."""
    chk.out_dtype(out_dtype)
    return _call("int8_mm_vnni", a, w_vnni, a_scale, w_scale, bias, out_dtype)


from . import _autograd  # noqa: E402  (needs the ops defined above)

_autograd.register()
