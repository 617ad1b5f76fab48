"""A pyfast model called from several Python threads at once (a server's request threads)
gives each thread exactly the outputs of serial calls: the C++ kernels keep no shared
mutable state between calls (their scratch is per call; their environment switches are
read once into function-local statics) and the dispatcher's forced backends are per
thread (pyfast/dispatch.py). Each M regime of the CPU rules runs, under inference_mode
(whose thread-local state the panel paths carry into their workers, csrc/cpu/parallel.h).
"""
import copy
import threading

import pytest
import torch

import pyfast

K, N = 1024, 1152
MAKERS = {
    "int8": lambda m: pyfast.quantize(m, "int8"),
    "int4": lambda m: pyfast.quantize(m, "int4"),
    "2:4": lambda m: pyfast.sparsify(m),
    "2:4+int4": lambda m: pyfast.sparsify(m, values="int4"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_threads_get_serial_outputs(name):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.GELU(), torch.nn.Linear(N, K))
    model = MAKERS[name](copy.deepcopy(base))
    xs = [torch.randn(m, K) for m in (1, 3, 17, 64, 600)]
    with torch.inference_mode():
        want = [model(x) for x in xs]
    errors = []

    def work(tid):
        try:
            with torch.inference_mode():
                for it in range(3):
                    for i, x in enumerate(xs):
                        if not torch.equal(model(x), want[i]):
                            errors.append(f"thread {tid} round {it} M={x.shape[0]}: differs")
        except Exception as e:  # recorded, and fails the test below
            errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
