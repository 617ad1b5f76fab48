"""Shared test set-up.

Tests that need a GPU carry the `cuda` marker and are skipped (with the reason)
where torch sees no CUDA device; nothing else is ever skipped.
"""
import os
import warnings

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


def pytest_runtest_logreport(report):
    """With PYFAST_TEST_LOG=FILE, one line per finished test (outcome, phase, seconds,
    node id; the last lines of a failure's report below it), written as it ends: a run
    cut off by a time limit (scripts/gpu_check.sh on a lent GPU) still says what passed
    and what failed. Under pytest-xdist only the controller writes."""
    path = os.environ.get("PYFAST_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or report.outcome != "passed":
        with open(path, "a") as f:
            f.write(f"{report.outcome}\t{report.when}\t{report.duration:.2f}\t{report.nodeid}\n")
            if report.outcome == "failed":
                f.writelines(f"   | {line}\n" for line in str(report.longrepr).splitlines()[-12:])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the C++ CPU kernels: each instruction-set path and thread count in turn ---------

CPU_ISAS = ("avx512", "avx2", "scalar")


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Force one ISA level of the C++ CPU kernels (torch.ops.pyfast_C.set_cpu_isa) and
    yield the level that really runs: set_cpu_isa clamps to what the CPU has, so on a
    CPU without AVX-512 'avx512' runs the avx2 kernels. Recorded in the report as the
    property isa_active; the previous level is restored after."""
    import pyfast._C  # noqa: F401  (registers torch.ops.pyfast_C)
    ops = torch.ops.pyfast_C
    previous = ops.set_cpu_isa(request.param)
    active = ops.cpu_isa()
    request.node.user_properties.append(("isa_active", active))
    try:
        yield active
    finally:
        ops.set_cpu_isa(previous)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    """torch.set_num_threads(1 or 2) for the test, restored after."""
    from _helpers import torch_threads   # here: conftest is also copied alone (test_triton_configs)
    with torch_threads(request.param) as n:
        yield n


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (pytestmark = pytest.mark.usefixtures(
    "one_thread")): accuracy thresholds measured so (digits), and on a shared 2-core
    machine two OpenMP threads competing with other processes run many times slower."""
    from _helpers import torch_threads
    with torch_threads(1):
        yield


@pytest.fixture
def quiet_prune():
    """Silence pyfast.prune's "left these layers" warning (a model's output layer is
    always reported as kept) in modules that test other things."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pyfast.prune left these layers")
        yield
