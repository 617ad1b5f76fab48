"""pyfast: compressed PyTorch inference (int8, int4, 2:4 sparse) on custom kernels.

    import pyfast
    pyfast.quantize(model, "int8")      # or "int8-weight", "int4"
    pyfast.sparsify(model, "2:4")       # values="int4": 2:4 + int4, ~3 bits per weight
    pyfast.swap(model)                   # layers compressed with torch's own tools
    print(pyfast.summary(model))
    print(pyfast.backends())             # what runs where, and why not
    pyfast.save(model, "m.safetensors"); pyfast.load(skeleton, "m.safetensors")

Workflows: pyfast.quant (calibrated static int8, QAT, GPTQ), pyfast.prune
(unstructured, N:M, structured, iterative, slimming), pyfast.distill,
pyfast.lowrank.
"""
from . import ops  # noqa: F401  (defines torch.ops.pyfast.*)
from . import backends as _backend_families  # noqa: F401  (registers kernels)
from ._report import BackendReport, BackendStatus, backends
from .api import quantize, repack, sparsify, swap
from .dispatch import BackendUnavailableError, use_backend
from .summary import summary
from .serialization import load, save
from . import nn  # noqa: F401
# the workflows that produce compressed models
from . import distill, lowrank, prune, quant  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["ops", "nn", "quantize", "sparsify", "repack", "swap", "summary", "backends", "save", "load",
           "use_backend", "quant", "prune", "distill", "lowrank", "BackendUnavailableError", "BackendReport", "BackendStatus"]
