"""Forcing backends (pyfast/dispatch.py use_backend, PYFAST_BACKEND) where the state is
not one thread's plain with-blocks: asyncio tasks, generators, torch.compile, and what
pyfast.backends() reports while a backend is forced."""
import asyncio

import pytest
import torch

import pyfast
from pyfast import dispatch
from test_ops import _spy_on

OP = "quantize_per_token"


def _chosen(op=OP):
    return dispatch.choose(op, "cpu", (torch.randn(2, 4),)).family


def test_asyncio_tasks_do_not_see_each_others_blocks():
    """Two tasks in one thread, each inside its own block across an await: the forcing
    was a per-thread list, so a task read the other's block (the top of the list) and
    left by popping the other's."""
    if dispatch.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    seen = {}

    async def main():
        b_entered, a_done = asyncio.Event(), asyncio.Event()

        async def a():
            with pyfast.use_backend(**{OP: "reference"}):
                await b_entered.wait()
                seen["a"] = _chosen()
            a_done.set()

        async def b():
            with pyfast.use_backend(**{OP: "cpp"}):
                b_entered.set()
                await a_done.wait()
                seen["b"] = _chosen()

        await asyncio.gather(a(), b())

    asyncio.run(main())
    assert seen == {"a": "reference", "b": "cpp"}


def test_a_generator_leaving_its_block_keeps_the_callers():
    def gen():
        with pyfast.use_backend(**{OP: "cuda"}):
            yield

    g = gen()
    next(g)                                   # the generator's block is entered
    with pyfast.use_backend(**{OP: "reference"}):
        g.close()                             # ... and left inside the caller's block
        assert _chosen() == "reference"
    assert _chosen() == pyfast.backends().default(OP, "cpu")


def test_one_object_entered_twice():
    force = pyfast.use_backend(**{OP: "reference"})
    with force:
        with force:
            assert _chosen() == "reference"
        assert _chosen() == "reference"
    assert _chosen() == pyfast.backends().default(OP, "cpu")


def test_one_object_in_two_tasks_at_once():
    """One use_backend object (e.g. a module-level constant) in force in two tasks whose
    blocks overlap: the object kept one list of entries for every context, so the first
    task to leave popped the other's entry (absent from its own context) and both kept
    the forcing after their blocks."""
    force = pyfast.use_backend(**{OP: "reference"})
    default = pyfast.backends().default(OP, "cpu")
    assert default != "reference"
    seen = {}

    async def main():
        a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def a():
            with force:
                a_in.set()
                await b_in.wait()
            seen["a after"] = _chosen()
            a_out.set()

        async def b():
            await a_in.wait()
            with force:
                b_in.set()
                await a_out.wait()
                seen["b inside"] = _chosen()
            seen["b after"] = _chosen()

        await asyncio.gather(a(), b())

    asyncio.run(main())
    assert seen == {"a after": default, "b inside": "reference", "b after": default}


def test_one_object_in_two_threads_at_once():
    """As above with threads: thread 1 leaves while thread 2 is inside."""
    import threading

    force = pyfast.use_backend(**{OP: "reference"})
    default = pyfast.backends().default(OP, "cpu")
    in1, in2, out1 = threading.Event(), threading.Event(), threading.Event()
    seen, errors = {}, []

    def run(name, body):
        try:
            body()
        except BaseException as exc:  # reported by the assertion below
            errors.append((name, exc))
            for event in (in1, in2, out1):
                event.set()  # do not leave the other thread waiting

    def one():
        with force:
            in1.set()
            assert in2.wait(30)
        seen["1 after"] = _chosen()
        out1.set()

    def two():
        assert in1.wait(30)
        with force:
            in2.set()
            assert out1.wait(30)
            seen["2 inside"] = _chosen()
        seen["2 after"] = _chosen()

    threads = [threading.Thread(target=run, args=(n, f)) for n, f in (("1", one), ("2", two))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {"1 after": default, "2 inside": "reference", "2 after": default}
    assert _chosen() == default


def test_exit_in_a_context_the_object_did_not_enter_is_an_error():
    """An exit with no entry of this object in this thread / task removes nothing else."""
    import contextvars
    import threading

    force, other = pyfast.use_backend(**{OP: "reference"}), pyfast.use_backend(**{OP: "cuda"})
    errors = []
    with force:
        def leave():
            try:
                with other:
                    force.__exit__(None, None, None)
            except RuntimeError as exc:
                errors.append(str(exc))
        # a fresh context: a thread may inherit its parent's (Python 3.14 free-threaded)
        thread = threading.Thread(target=contextvars.Context().run, args=(leave,))
        thread.start()
        thread.join(30)
        assert _chosen() == "reference"
    assert errors == ["use_backend.__exit__ without a matching __enter__ in this thread / "
                      "asyncio task"]


def _compiled_case():
    x = torch.randn(3, 64)
    w = torch.randint(-5, 5, (8, 64), dtype=torch.int8)
    s = torch.rand(8)

    def f(x):
        with pyfast.use_backend("reference"):
            return torch.ops.pyfast.w8a8_mm(x, w, s)
    return f, x


def test_use_backend_inside_a_compiled_function_is_not_dropped(monkeypatch):
    """Dynamo ran the block's entry and exit while tracing, so the compiled code ran the
    default kernel; now the block is a graph break and holds at run time."""
    calls = _spy_on(monkeypatch, "w8a8_mm", "reference")
    torch._dynamo.reset()
    f, x = _compiled_case()
    out = torch.compile(f)(x)
    assert calls == ["reference"]
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)


def test_use_backend_inside_a_fullgraph_compile_is_an_error():
    torch._dynamo.reset()
    f, x = _compiled_case()
    with pytest.raises(Exception, match="put the with block around the compiled call"):
        torch.compile(f, fullgraph=True)(x)


def test_the_report_follows_what_is_forced(monkeypatch):
    """backends() marked the priority order's first with * while a forced backend ran."""
    assert "forced now" not in str(pyfast.backends())
    with pyfast.use_backend(**{OP: "reference"}):
        report = pyfast.backends()
        assert report.default(OP, "cpu") == "reference" == _chosen()
        assert "forced now (the * follows it): use_backend {'quantize_per_token': " \
               "'reference'}" in str(report)
    monkeypatch.setenv("PYFAST_BACKEND", "reference")
    report = pyfast.backends()
    assert report.default(OP, "cpu") == "reference" == _chosen()
    assert "PYFAST_BACKEND='reference'" in str(report)
    # a global force skips ops without that family (as choose does)
    monkeypatch.setenv("PYFAST_BACKEND", "triton")
    assert "triton" not in dispatch.kernels("pack_int4")
    assert pyfast.backends().default("pack_int4", "cpu") == \
        dispatch.choose("pack_int4", "cpu", (torch.randn(4, 32), 32, True)).family


def test_env_var_takes_spaces_around_the_equals_sign(monkeypatch):
    monkeypatch.setenv("PYFAST_BACKEND", " int8_mm = reference , quantize_per_token= reference ")
    assert _chosen() == "reference"
    assert dispatch._forced_for("int8_mm") == ("reference", True)


# --- the report while a forced backend cannot run, and PYFAST_BACKEND edge values ---------

def _op_rows(text):
    """{op: {device: the families in its cell}} of the backends() table."""
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("op "))
    starts = [head.index(f" {d} ") + 1 for d in dispatch.PRIORITY] + [None]
    return {line.split()[0]: {d: line[a:b].split()
                              for d, a, b in zip(dispatch.PRIORITY, starts, starts[1:])}
            for line in lines if line.split(" ", 1)[0] in dispatch.ops()}


def _stars(cells):
    """{device: the families of its cell marked * or *!}"""
    return {d: [f for f in fams if "*" in f] for d, fams in cells.items()}


def test_a_forced_backend_that_cannot_run_is_marked_on_its_row():
    """The row showed no * at all (the forced family was not among the usable ones) while
    the header said 'the * follows it' and every call raised."""
    assert "*!" not in str(pyfast.backends())
    with pyfast.use_backend(**{OP: "cuda"}):        # its cuda kernel runs on cuda only
        with pytest.raises(pyfast.BackendUnavailableError, match="runs on cuda, not cpu"):
            _chosen()
        text = str(pyfast.backends())
    assert _stars(_op_rows(text)[OP])["cpu"] == ["cuda*!"], text
    assert "*! = forced but cannot run here; calls raise:" in text
    assert f"  cuda on cpu ({OP}): kernel runs on cuda only" in text


def test_every_row_marks_one_backend_per_device_under_a_global_force(monkeypatch):
    monkeypatch.setenv("PYFAST_BACKEND", "cuda")
    text = str(pyfast.backends())
    for op, cells in _op_rows(text).items():      # what a call takes: one per device
        assert all(len(marked) == 1 for marked in _stars(cells).values()), (op, text)
    assert _stars(_op_rows(text)["int8_mm"])["cpu"] == ["cuda*!"], text


@pytest.mark.parametrize("value", [" , ", ",", "  "])
def test_a_blank_env_value_is_not_shown_as_forcing(monkeypatch, value):
    monkeypatch.setenv("PYFAST_BACKEND", value)
    assert dispatch._parse_env(value) == {}
    assert "forced now" not in str(pyfast.backends())
    with pyfast.use_backend():                      # an empty block forces nothing either
        assert "forced now" not in str(pyfast.backends())


@pytest.mark.parametrize("value,first,second,what", [
    ("int8_mm=reference,int8_mm=cpp", "int8_mm=reference", "int8_mm=cpp", "op 'int8_mm'"),
    ("reference, int8_mm=cpp, cpp", "reference", "cpp", "every op"),
])
def test_env_var_giving_one_op_two_backends_raises(monkeypatch, value, first, second, what):
    """The last entry won silently."""
    monkeypatch.setenv("PYFAST_BACKEND", value)
    with pytest.raises(ValueError, match=rf"PYFAST_BACKEND gives {what} two backends: "
                                         rf"'{first}' and '{second}'; accepted: one backend"):
        _chosen()
    with pytest.raises(ValueError, match="two backends"):
        pyfast.backends()


def test_env_var_repeating_an_entry_is_accepted(monkeypatch):
    monkeypatch.setenv("PYFAST_BACKEND", "int8_mm=reference, int8_mm = reference,reference")
    assert dispatch._forced_for("int8_mm") == ("reference", True)
    assert _chosen() == "reference"


@pytest.mark.parametrize("args,match", [
    (("conv2d", "cpu"), r"op 'conv2d' is not in the report; accepted: int4_mm, "),
    ((OP, "mps"), r"device 'mps' is not in the report; accepted: cpu, cuda"),
])
def test_report_default_names_a_bad_argument(args, match):
    """A bare StopIteration came out."""
    with pytest.raises(ValueError, match="BackendReport.default: " + match):
        pyfast.backends().default(*args)
    with pytest.raises(TypeError, match="device must be a str, got int"):
        pyfast.backends().default(OP, 0)
