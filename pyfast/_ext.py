"""Loading the compiled extension pyfast._C, and saying why it did not load.

Importing pyfast never fails because of the extension: if pyfast._C is missing
or broken, `status()` keeps the reason, `pyfast.backends()` prints it, and only
a call that forces a compiled backend raises (with that reason).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

_LOADED: Optional[bool] = None
_REASON: str = ""
_BUILD_INFO: str = ""


def load() -> bool:
    """Import pyfast._C once (registers torch.ops.pyfast_C.*); True if it loaded."""
    global _LOADED, _REASON, _BUILD_INFO
    if _LOADED is not None:
        return _LOADED
    if os.environ.get("PYFAST_DISABLE_EXTENSION", "") == "1":
        _LOADED, _REASON = False, "disabled by PYFAST_DISABLE_EXTENSION=1"
        return False
    try:
        importlib.import_module("pyfast._C")
        _BUILD_INFO = str(torch.ops.pyfast_C.build_info())
    except ImportError as exc:  # not built, or built against another torch
        _LOADED = False
        _REASON = (f"extension pyfast._C not built or not loadable ({exc}); "
                   "build it with `pip install --no-build-isolation -e .`")
        return False
    _LOADED = True
    return True


def status() -> str:
    """'built: <build info>' or the reason it is not loaded."""
    if not load():
        return _REASON
    return (f"built: {_BUILD_INFO}; CPU kernels use {torch.ops.pyfast_C.cpu_isa()} "
            f"(CPU supports {torch.ops.pyfast_C.cpu_isa_detected()})")


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels use now ("avx512", "avx2", "scalar")."""
    return str(torch.ops.pyfast_C.cpu_isa()) if load() else "n/a (extension not loaded)"


def has_cuda() -> bool:
    return load() and "cuda" in _BUILD_INFO


def reason_cpp(device_type: str) -> Optional[str]:
    if not load():
        return _REASON
    return None if device_type == "cpu" else f"C++ CPU kernels do not run on {device_type}"


def reason_cuda(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"CUDA kernels do not run on {device_type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if not load():
        return _REASON
    if not has_cuda():
        return f"pyfast._C was built without CUDA ({_BUILD_INFO}); rebuild with a CUDA torch and nvcc"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (the kernels need sm_80+)"
    return None
