"""Every CUDA source in csrc/cuda compiles with nvcc for sm_80 and sm_90 (no GPU needed).

CI machines have the CUDA toolkit but no GPU and a CPU torch, so the CUDA kernels
are never built into pyfast._C there; this test compiles each torch-free .cu file
on its own (one nvcc call per file and arch, a few seconds), fails with nvcc's
stderr on any error or warning, checks in the generated PTX and in the SASS
(cuobjdump) that the kernel uses the instructions it is written to use
(EXPECTED_PTX, EXPECTED_SASS: tensor-core mma, cp.async, ldmatrix), and that
ptxas reports no register spills. The torch-facing launchers (*_launch.cpp) are
syntax-checked with the C++ compiler against torch's headers and the CUDA
headers. Skipped only where nvcc (or the C++ compiler) is not found.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
LAUNCHERS = sorted(CUDA_DIR.glob("*_launch.cpp"))
ARCHS = ("80", "90")
# What torch's BuildExtension adds to every nvcc call (torch.utils.cpp_extension.
# COMMON_NVCC_FLAGS), so the kernels compile here as they do in the real build.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]

# PTX each kernel must contain, with the reason. A new .cu file needs an entry here.
EXPECTED_PTX = {
    "sparse24_mm.cu": {
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32":
            "float16 2:4 sparse tensor-core mma, float32 accumulate",
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32":
            "bfloat16 2:4 sparse tensor-core mma",
        "cp.async.cg.shared.global": "16-byte async pipeline (K % 16 == 0)",
        "cp.async.ca.shared.global": "4-byte async copies (K % 16 != 0)",
        "cp.async.wait_group": "pipeline stage wait",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16": "A (kept values) and B (x) fragments",
    },
    "sparse24_int4_mm.cu": {
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32":
            "float16 2:4 sparse tensor-core mma on the dequantized kept values",
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32":
            "bfloat16 2:4 sparse tensor-core mma",
        "cp.async.cg.shared.global": "16-byte async copies of codes, metadata and x",
        "cp.async.ca.shared.global": "4-byte async scale / zero-word copies",
        "cp.async.wait_group": "pipeline stage wait",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16": "B fragments (x) from the swizzled tile",
        "lop3.b32": "nibble mask | magic exponent in one instruction (int4 -> f16/bf16)",
        "ld.shared.v2.u32": "one 8-byte load of a lane's fragment-ordered codes per k64 block",
    },
    "int4_mm.cu": {
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32": "float16 tensor-core mma, f32 accumulate",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32": "bfloat16 tensor-core mma",
        "cp.async.cg.shared.global": "16-byte async weight/activation copies (4-stage pipeline)",
        "cp.async.ca.shared.global": "4-byte async scale / zero-point copies",
        "cp.async.wait_group": "pipeline stage hand-off",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16": "A fragments from the swizzled activation tile",
        "lop3.b32": "nibble mask | magic exponent in one instruction (int4 -> f16/bf16)",
        "atom.global.add.f32": "split-K float32 reduction into the workspace",
    },
    "int8_mm.cu": {
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32": "int8 tensor-core MMA, int32 accumulate",
        "cp.async.cg.shared.global": "multi-stage async global->shared pipeline (zero-fill tails)",
        "cp.async.wait_group": "pipeline stage wait",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16": "fragment loads from swizzled shared memory",
        "cvt.rn.f32.s32": "int32 -> float32 round-to-nearest-even, as torch",
        "mul.rn.f32": "unfused scale multiplies (__fmul_rn): the bit-exact epilogue",
        "add.rn.f32": "unfused bias add (__fadd_rn)",
        "cvt.rn.bf16.f32": "one round-to-nearest-even cast to bfloat16",
    },
    "quantize_per_token.cu": {
        "shfl.sync.bfly.b32": "warp abs-max reduction with __shfl_xor_sync",
        "div.rn.f32": "IEEE true division x / scale (__fdiv_rn), as the reference",
        "cvt.rni.s32.f32": "round half to even (__float2int_rn), as torch.round",
        "ld.global.nc.v4.u32": "16-byte vectorised loads of aligned rows",
    },
}


# SASS opcodes each kernel must contain after ptxas, with the reason.
EXPECTED_SASS: dict[str, dict[str, str]] = {
    "sparse24_mm.cu": {"HMMA.SP.16832.F32": "mma.sp on the sparse tensor cores (f16)",
                       "HMMA.SP.16832.F32.BF16": "the same in bfloat16", "LDGSTS": "cp.async",
                       "LDSM.16.M88.4": "ldmatrix x4", "DEPBAR": "cp.async group waits"},
    "sparse24_int4_mm.cu": {"HMMA.SP.16832.F32": "mma.sp on the sparse tensor cores (f16)",
                            "HMMA.SP.16832.F32.BF16": "the same in bfloat16",
                            "LDGSTS": "cp.async", "LDSM.16.M88.4": "ldmatrix x4",
                            "LOP3.LUT": "in-register int4 unpack", "DEPBAR": "cp.async waits"},
    "int4_mm.cu": {"HMMA.16816.F32": "mma.sync m16n8k16 on the tensor cores (f16)",
                   "HMMA.16816.F32.BF16": "the same in bfloat16", "LDGSTS": "cp.async",
                   "LDSM.16.M88.4": "ldmatrix x4", "LOP3.LUT": "in-register int4 unpack"},
    "int8_mm.cu": {"IMMA.16832.S8.S8": "mma.sync m16n8k32 s8 on the integer tensor cores",
                   "LDSM.16.M88.4": "ldmatrix x4", "LDGSTS": "cp.async global->shared",
                   "DEPBAR": "cp.async group waits"},
    "quantize_per_token.cu": {"SHFL.BFLY": "the warp reduction stays in registers"},
}


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, /usr/local/cuda or PATH, else None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


NVCC = find_nvcc()


def find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or the copy Triton ships (triton is a test
    dependency; some CUDA toolkit installs leave cuobjdump out)."""
    if NVCC is not None and (Path(NVCC).parent / "cuobjdump").is_file():
        return str(Path(NVCC).parent / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as tn
    except ImportError:
        return None
    bundled = Path(tn.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


CUOBJDUMP = find_cuobjdump()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(source: Path, arch: str, tmp_path: Path):
    # -c: full device + host compilation; --keep leaves the PTX next to the object.
    cmd = [NVCC, "-c", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-Werror", "all-warnings",
           *TORCH_NVCC_FLAGS, "-DPYFAST_WITH_CUDA", "-Xptxas", "-v",
           "--keep", "--keep-dir", str(tmp_path), "-I", str(CUDA_DIR),
           "-o", str(tmp_path / (source.stem + ".o")), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"nvcc failed ({proc.returncode}) for {source.name} sm_{arch}:\n"
                                  f"{' '.join(cmd)}\n{proc.stderr}")

    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
    assert spills and max(spills) == 0, f"register spills (or no ptxas report):\n{proc.stderr}"

    assert source.name in EXPECTED_PTX, (
        f"add the PTX instructions {source.name} is meant to use to EXPECTED_PTX")
    ptx = (tmp_path / (source.stem + ".ptx")).read_text()
    assert f".target sm_{arch}" in ptx
    missing = {ins: why for ins, why in EXPECTED_PTX[source.name].items() if ins not in ptx}
    assert not missing, f"{source.name} sm_{arch}: PTX lacks {missing}"

    # SASS: what ptxas made of it (e.g. that mma.sync became IMMA/HMMA tensor-core ops).
    if CUOBJDUMP is None:
        pytest.skip("no cuobjdump (CUDA toolkit bin/, PATH, or the one Triton ships) "
                    "to disassemble the SASS; the PTX checks above passed")
    sass = subprocess.run([CUOBJDUMP, "-sass", str(tmp_path / (source.stem + ".o"))],
                          capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    missing = {op: why for op, why in EXPECTED_SASS.get(source.name, {}).items()
               if not re.search(rf"\b{re.escape(op)}", sass.stdout)}
    assert not missing, f"{source.name} sm_{arch}: SASS lacks {missing}"


def find_cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


CXX = find_cxx()


@needs_nvcc
@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ / c++ / $CXX) on PATH")
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=[p.name for p in LAUNCHERS])
def test_launcher_syntax(launcher: Path):
    """The torch-facing launcher parses and type-checks against torch's and CUDA's headers
    (-fsyntax-only: a CPU torch cannot link it, but every call into the kernels' C
    launchers and into ATen/c10 is checked). C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU
    wheel ships c10/cuda headers without the generated cuda_cmake_macros.h."""
    cuda_include = Path(NVCC).parent.parent / "include"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *includes,
           f"-I{cuda_include}", f"-I{CUDA_DIR}", f"-I{CUDA_DIR.parent}",
           "-DPYFAST_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", str(launcher)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{launcher.name}:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
