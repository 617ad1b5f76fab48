"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without a GPU,
and the PTX uses the tensor-core instruction it is meant to (mma.sync on sm_80,
wgmma on sm_90): a kernel that silently fell back to scalar FMA fails here.

The compile runs in a fresh interpreter without TRITON_INTERPRET (the test
session sets it when there is no GPU, and interpreted kernels cannot be
compiled); the child prints one JSON line per (kernel, arch).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyfast.backends.triton import KERNELS

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted({mod for mod, _ in KERNELS.values()})
ARCHS = (80, 90)

CHILD = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
mod = importlib.import_module("pyfast.kernels." + sys.argv[1])
for spec in mod.PTX_SPECS:
    for arch in (80, 90):
        # "attrs": the alignment hints the JIT adds for aligned, contiguous tensors;
        # without them loads stay scalar and the vectorised code path is never compiled.
        src = triton.compiler.ASTSource(fn=spec["kernel"], signature=spec["signature"],
                                        constexprs=spec.get("constexprs", {}),
                                        attrs=spec.get("attrs"))
        options = {k: v for k, v in spec.items() if k in ("num_warps", "num_stages")}
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
            error = None
        except Exception as exc:  # reported, and the test fails on it
            ptx, error = "", f"{type(exc).__name__}: {exc}"
        expect = spec["expect"].get(arch)
        counts = {"ld.global.b8": ptx.count("ld.global.b8"),
                  "cvt int->16-bit float": len(re.findall(r"cvt\.rn\.b?f16\.[su](?:8|16|32)\b", ptx)),
                  "shr.u16": ptx.count("shr.u16"),
                  # _common.int4_minus_zero's PTX: its nibble mask, once per lop3
                  "int4 inline PTX": ptx.count("0x000F000F"),
                  # _common.int8_to_float's PTX: its float16 1024.0 exponent bytes, once per prmt
                  "int8 inline PTX": ptx.count("0x64646464")}
        print(json.dumps({"name": spec["name"], "arch": arch, "expect": expect, "error": error,
                          "limits": spec.get("limits", {}), "minimums": spec.get("minimums", {}),
                          "counts": counts,
                          "found": None if expect is None else (expect in ptx),
                          "fma_only": "fma.rn" in ptx and "mma" not in ptx}))
"""


@pytest.fixture(scope="module")
def compiled():
    results = {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for mod in MODULES:
        proc = subprocess.run([sys.executable, "-c", CHILD, mod], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"compiling pyfast.kernels.{mod} failed:\n{proc.stderr[-3000:]}"
        results[mod] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return results


@pytest.mark.parametrize("module", MODULES)
def test_kernels_lower_to_tensor_core_instructions(compiled, module):
    rows = compiled[module]
    assert {r["arch"] for r in rows} == set(ARCHS), f"{module} has no PTX_SPECS for both archs"
    for r in rows:
        where = f"{module}.{r['name']} sm_{r['arch']}"
        assert r["error"] is None, f"{where} did not compile: {r['error']}"
        if r["expect"] is not None:
            assert r["found"], f"{where}: PTX lacks {r['expect']!r}" + (
                " (only scalar fma: the dot fell back off the tensor cores)" if r["fma_only"] else "")
        for what, most in r["limits"].items():
            assert r["counts"][what] <= most, (
                f"{where}: {r['counts'][what]} PTX instructions of kind {what!r}, at most {most} "
                "expected (see the spec's limits)")
        for what, least in r["minimums"].items():
            assert r["counts"][what] >= least, (
                f"{where}: {r['counts'][what]} PTX instructions of kind {what!r}, at least {least} "
                "expected (see the spec's minimums)")


def test_limits_are_checked(compiled):
    """The int4 kernels and the float16 int8 weight-only kernels carry instruction
    limits, and the counter finds the instructions it counts: every limited kind occurs
    in some kernel on some arch, and those kernels all embed their inline PTX."""
    rows = [r for mod in ("weight_only", "sparse24_int4") for r in compiled[mod]]
    limited = [r for r in rows if "int4" in r["name"] or r["name"].startswith("int8_weight_mm_fp16")]
    assert len(limited) >= 6 and all(r["limits"] and r["minimums"] for r in limited)
    for what in ("ld.global.b8", "cvt int->16-bit float", "shr.u16", "int4 inline PTX",
                 "int8 inline PTX"):
        assert any(r["counts"][what] > 0 for r in rows), f"no kernel has any {what!r}: is the pattern right?"
