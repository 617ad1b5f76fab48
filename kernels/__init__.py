"""Triton kernels of pyfast (installed as pyfast.kernels)."""
