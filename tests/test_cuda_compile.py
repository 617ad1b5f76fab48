"""Every CUDA source in csrc/cuda compiles with nvcc for sm_80 and sm_90 (no GPU needed).

CI machines have the CUDA toolkit but no GPU and a CPU torch, so the CUDA kernels
are never built into pyfast._C there; this test compiles each torch-free .cu file
on its own (one nvcc call per file and arch, about 1.5 s), fails with nvcc's
stderr on any error or warning, and checks in the generated PTX that the kernel
uses the instructions it is written to use (EXPECTED_PTX), and that ptxas
reports no register spills. Skipped only where no nvcc is found.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# What torch's BuildExtension adds to every nvcc call (torch.utils.cpp_extension.
# COMMON_NVCC_FLAGS), so the kernels compile here as they do in the real build.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]

# PTX each kernel must contain, with the reason. A new .cu file needs an entry here.
EXPECTED_PTX = {
    "quantize_per_token.cu": {
        "shfl.sync.bfly.b32": "warp abs-max reduction with __shfl_xor_sync",
        "div.rn.f32": "IEEE true division x / scale (__fdiv_rn), as the reference",
        "cvt.rni.s32.f32": "round half to even (__float2int_rn), as torch.round",
        "ld.global.nc.v4.u32": "16-byte vectorised loads of aligned rows",
    },
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
