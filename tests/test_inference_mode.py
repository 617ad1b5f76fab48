"""Every pyfast CPU layer runs under torch.inference_mode(), on 2 threads, at every M
regime, and gives exactly what it gives under torch.no_grad().

Why: the C++ kernels' dense-panel paths call ATen ops (at::empty, at::mm_out into a
slice of the output) inside at::parallel_for. With ATen's OpenMP backend the worker
threads start without the caller's thread-local state, so under inference_mode an
at::mm_out into the output (an inference tensor) raised "Inplace update to inference
tensor outside InferenceMode" on a worker (csrc/cpu/parallel.h). The shapes give the
panel paths several panels (K = 4096: 256 float32 / 512 bfloat16 weight rows per
panel; N = 1100), so both threads take one.
"""
import copy

import pytest
import torch

import pyfast

from _helpers import dtype_id, torch_threads

K, N = 4096, 1100
CASES = [  # (label, how to make the layer, the Ms: decode kernels, small-M tiles, panels)
    ("int8", lambda m: pyfast.quantize(m, "int8"), (1, 64)),
    ("int8-weight", lambda m: pyfast.quantize(m, "int8-weight"), (1, 64)),
    ("int4", lambda m: pyfast.quantize(m, "int4"), (1, 8, 64)),
    ("int2", lambda m: pyfast.quantize(m, "int2"), (1, 64)),
    ("2:4", lambda m: pyfast.sparsify(m), (1, 16, 64, 512)),
    ("2:4+int4", lambda m: pyfast.sparsify(m, values="int4"), (1, 8, 64)),
]


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("label,make,ms", CASES, ids=[c[0] for c in CASES])
def test_inference_mode_matches_no_grad(two_threads, label, make, ms, dtype):
    torch.manual_seed(0)
    model = make(torch.nn.Sequential(torch.nn.Linear(K, N)).to(dtype))
    assert type(model[0]).__module__.startswith("pyfast"), type(model[0])
    for m in ms:
        x = torch.randn(m, K).to(dtype)
        with torch.no_grad():
            want = model(x)
        with torch.inference_mode():
            out = model(x)
        assert out.is_inference()
        assert torch.equal(out, want), f"{label} M={m} {dtype}"


def test_inference_mode_model_copy(two_threads):
    """A model quantized inside inference_mode (its buffers inference tensors) runs there."""
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(K, N))
    with torch.inference_mode():
        model = pyfast.quantize(copy.deepcopy(base), "int4")
        out = model(torch.randn(64, K))
    assert out.shape == (64, N) and bool(out.isfinite().all())
