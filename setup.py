"""Build of pyfast's compiled extension pyfast._C (metadata: pyproject.toml).

    pip install --no-build-isolation -e .     # or without -e; torch must already be installed

--no-build-isolation is required: the extension is compiled against the torch
that is installed (setup.py imports it), and an isolated build would download
another torch (a multi-GB CUDA wheel) instead.

What is built:
  - always the CPU kernels: csrc/*.cpp, csrc/cpu/*.cpp;
  - the CUDA kernels csrc/cuda/*.cu + csrc/cuda/*.cpp (launchers), with
    -DPYFAST_WITH_CUDA, only when torch is a CUDA build (torch.version.cuda is
    set) and a CUDA toolkit is found (torch.utils.cpp_extension.CUDA_HOME).
Environment switches:
  PYFAST_CUDA=auto|1|0    auto (default): CUDA when possible; 1: CUDA or a build
                          error saying why not; 0: CPU only.
  PYFAST_CUDA_ARCHS       TORCH_CUDA_ARCH_LIST of a CUDA build (default "8.0;9.0").
  MAX_JOBS                parallel compile jobs (default: the number of CPU cores).
One line on stderr says what is built and why (visible with `pip install -v`).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # torch is a build dependency that pip must not fetch itself
    raise SystemExit(
        f"pyfast: building the extension needs torch installed first ({exc}). Install torch, "
        "then `pip install --no-build-isolation .`") from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _sources(*patterns: str) -> list[str]:
    """Sorted source paths relative to ROOT (setuptools wants relative paths)."""
    found = []
    for pattern in patterns:
        found += glob.glob(pattern, root_dir=ROOT)
    return sorted(found)


def _cuda_decision() -> tuple[bool, str]:
    """(build the CUDA kernels?, why) from PYFAST_CUDA, torch and the toolkit."""
    mode = os.environ.get("PYFAST_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"pyfast: PYFAST_CUDA={mode!r}; accepted values: auto, 1, 0")
    if mode == "0":
        return False, "PYFAST_CUDA=0"
    if torch.version.cuda is None:
        why_not = (f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None); "
                   "install a CUDA build of torch to compile the CUDA kernels")
    elif cpp_extension.CUDA_HOME is None:
        why_not = (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no CUDA "
                   "toolkit was found; set CUDA_HOME or put nvcc on PATH")
    else:
        return True, (f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}, "
                      f"PYFAST_CUDA={mode}")
    if mode == "1":
        raise SystemExit(f"pyfast: PYFAST_CUDA=1 forces the CUDA build, which cannot happen: "
                         f"{why_not}. Use PYFAST_CUDA=auto or 0 for a CPU-only build.")
    return False, why_not


def _extension():
    with_cuda, why = _cuda_decision()
    # No -march=native: a wheel must run on other CPUs. -g0: no debug info (Python's own
    # CFLAGS add -g, which makes the .so 45x larger). -ffp-contract=off: no FMA
    # contraction, so int8_mm's float32 epilogue rounds after every operation exactly
    # like the torch reference. -fno-trapping-math: we never read FP exception flags, and
    # it lets GCC if-convert float compares so clamps vectorise (values unchanged).
    # -fopenmp: at::parallel_for is header-only on OpenMP builds of torch and runs
    # serially without it; the loader reuses the libgomp.so.1 torch already loaded. No -std: torch's BuildExtension adds the standard its
    # headers need (c++17 for older torch, c++20 for recent ones such as 2.13); csrc/ is C++17.
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    if not with_cuda:
        print(f"pyfast: building pyfast._C for CPU only ({why})", file=sys.stderr)
        return cpp_extension.CppExtension(
            "pyfast._C", sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"])

    archs = os.environ.get("PYFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).strip()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it builds nvcc's flags
    # The arch list contains ';', which does not survive the shell of a ninja rule in a
    # -D flag; registration.cpp gets it from this generated header instead.
    generated = os.path.join(ROOT, "build", "generated")
    os.makedirs(generated, exist_ok=True)
    header = f'#pragma once\n#define PYFAST_CUDA_ARCHS "{archs}"\n'
    path = os.path.join(generated, "pyfast_cuda_archs.h")
    if not os.path.exists(path) or open(path).read() != header:
        with open(path, "w") as f:
            f.write(header)
    print(f"pyfast: building pyfast._C for CPU+CUDA, archs {archs} ({why})", file=sys.stderr)
    sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    return cpp_extension.CUDAExtension(
        "pyfast._C", sources, include_dirs=[generated], extra_link_args=["-fopenmp"],
        extra_compile_args={"cxx": cxx_flags + ["-DPYFAST_WITH_CUDA"],
                            "nvcc": ["-O3", "-lineinfo", "-DPYFAST_WITH_CUDA"]})


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    # pyfast and its subpackages, plus the top-level kernels/ (Triton kernels)
    # installed as pyfast.kernels.
    packages=(find_packages(include=["pyfast", "pyfast.*"]) + ["pyfast.kernels"]
              + ["pyfast.kernels." + p for p in find_packages(where="kernels")]),
    package_dir={"pyfast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
