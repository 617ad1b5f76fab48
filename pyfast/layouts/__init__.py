"""Kernel-specific weight layouts, each produced once at layer creation by a repack op.

The canonical packed formats (pyfast/formats.py) are what every backend accepts and
what pyfast.save writes. A kernel that needs another order (tensor-core fragment
order for int4, sparse-tensor-core metadata order for 2:4) gets it from a module
here: `repack` / `unrepack` are pure torch, run on any device, are exact inverses,
and are the reference of the repack ops in pyfast.ops.
"""
