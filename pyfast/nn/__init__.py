"""pyfast layers: compressed drop-in replacements for nn.Linear (and nn.Conv2d).

Every layer holds only packed tensors (buffers), calls only torch.ops.pyfast.*,
and implements the save/load protocol of pyfast/io.py: `pyfast_config()` gives a
JSON-able dict and `cls.from_config(config, device)` rebuilds the layer with
empty buffers of the right shapes and dtypes.
"""
from .linear import (Int4Linear, Int8Linear, Int8WeightOnlyLinear, Sparse24Linear,
                     _CompressedLinear)
from .lowbit import LowBitLinear
from .static import StaticInt8Linear
from .sparse_int4 import Sparse24Int4Linear
from .conv import QuantConv2d


def compressed_layer_types() -> tuple:
    """Every pyfast layer class (each subclass of the shared base), for summary and io."""
    out, todo = [], [_CompressedLinear]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if not sub.__name__.startswith("_"):
                out.append(sub)
    return tuple(out)


__all__ = ["Int8Linear", "Int8WeightOnlyLinear", "Int4Linear", "Sparse24Linear", "LowBitLinear",
           "StaticInt8Linear", "Sparse24Int4Linear", "QuantConv2d",
           "compressed_layer_types"]
