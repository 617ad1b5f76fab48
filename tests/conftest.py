"""Shared test set-up.

Tests that need a GPU carry the `cuda` marker and are skipped (with the reason)
where torch sees no CUDA device; nothing else is ever skipped.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It
# is chosen when a kernel is decorated (@triton.jit), so it must be set before any
# pyfast.kernels module is imported; on a GPU machine the kernels compile for real.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Devices every op test runs on; the CUDA one is marked and skipped without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker); torch sees none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
