"""Triton kernels of pyfast (installed as pyfast.kernels).

Each module is a backend of existing pyfast ops (registered in
pyfast/backends/triton.py, imported on first use). The contract of a module:

- one function per op it implements, named like the op, taking the op's
  arguments exactly as pyfast/ops.py SCHEMAS lists them (checked already), on
  CUDA tensors, or on CPU tensors under the Triton interpreter
  (TRITON_INTERPRET=1); it allocates and returns the outputs and handles M = 0;
- optionally `supports_<op>(*args) -> None | str`: why it cannot take the inputs;
- `PTX_SPECS`: the kernels with a signature and meta-parameters to compile ahead
  of time for sm_80 and sm_90 (tests/test_triton_ptx.py), and the tensor-core
  instruction each must emit.
Layouts: pyfast/formats.py.
"""
