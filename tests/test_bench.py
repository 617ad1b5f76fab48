"""The benchmark harness runs end to end (--quick, CPU) and checks what it times.

No assertion on speed: only that every op x usable backend and every torch baseline
has a row, every row's output matched the reference, and the numbers are positive.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # bench/ is a repo folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import plot as bench_plot  # noqa: E402
from bench import report as bench_report  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench.cases import CUDA_LAYOUT_OPS, E2E, PYFAST_OPS, STATIC_E2E, usable_families  # noqa: E402
from pyfast import dispatch  # noqa: E402


def _expected_backends(op):
    """What the harness must time on CPU: every family with a CPU kernel usable here that
    a plain call could pick (the Triton interpreter is timed only when asked for)."""
    table = dispatch.kernels(op)
    return {f for f, b in table.items()
            if "cpu" in b.devices and dispatch.unavailable_reason(f, "cpu") is None
            and f in dispatch.PRIORITY["cpu"]}


def test_quick_run_on_cpu_writes_checked_rows(tmp_path, capsys):
    status = bench_run.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    assert str(files[0]) in printed
    result = json.loads(files[0].read_text())
    rows = result["rows"]

    assert status == 0
    assert not {r["op"] for r in rows} & set(CUDA_LAYOUT_OPS)      # CUDA-only by default
    for op in (o for o in PYFAST_OPS if o not in CUDA_LAYOUT_OPS):
        timed = {r["backend"] for r in rows if r["op"] == op}
        assert timed == _expected_backends(op), (op, timed)
        assert set(usable_families(op, "cpu", None)[0]) == timed
        assert sum(r["default"] for r in rows if r["op"] == op) == len({r["M"] for r in rows}), op
    assert "reference" in {r["backend"] for r in rows if r["op"] == E2E}
    static = {r["backend"] for r in rows if r["op"] == STATIC_E2E}   # quantize_static + int8_mm_vnni
    assert "reference" in static and static == {"reference"} | _expected_backends("int8_mm_vnni")
    baselines = {(r["op"], r["dtype"], r["note"]) for r in rows if r["backend"] == "torch"}
    assert {("F.linear", "f32"), ("F.linear", "bf16")} <= {b[:2] for b in baselines}
    assert len({b for b in baselines if b[0] == "torch._int_mm"}) == 2   # view and contiguous

    cells = {(r["M"], r["K"], r["N"]) for r in rows}
    assert len(cells) == 2                                               # --quick: M 1 and 32
    for r in rows:
        assert r["check"] == "ok", r
        assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["reps"] >= 3, r
        assert r["timing_mode"] == "per call", r
        assert r["gbs"] > 0 and r["bytes"] > 0, r
        assert r["speedup_vs_f32_linear"] > 0 and r["speedup_vs_half_linear"] > 0, r
        if r["op"] != "quantize_per_token":
            assert r["tflops"] > 0 and r["flops"] == 2 * r["M"] * r["K"] * r["N"], r
    assert any(r["rotated_copies"] > 1 for r in rows if r["M"] == 1)    # M=1 rotates weights
    assert all(r["rotated_copies"] == 1 for r in rows if r["M"] == 32)
    assert result["rotation"]["used"] is True
    machine = result["machine"]
    assert machine["torch_version"] and machine["pyfast_version"] and machine["cpu_model"]
    assert "pyfast backends" in machine["backends"]
    assert result["args"]["quick"] is True

    # bench.report turns the file into the README's Markdown table, one line per row
    k, n = rows[0]["K"], rows[0]["N"]
    md = bench_report.table(result, k, n)
    series = {(r["op"], r["backend"], r["dtype"], r["note"]) for r in rows if (r["K"], r["N"]) == (k, n)}
    assert len(md) == 2 + len(series)                 # one line per op/backend, one column per M
    assert all(line.startswith("|") and line.endswith("|") for line in md)
    # bench.plot draws one line per op/backend/dtype: the same series as the table
    lines = bench_plot.series(result, k, n)
    assert "F.linear [torch] f32" in lines and all(s == 1.0 for _, s in lines["F.linear [torch] f32"])
    assert all(not name.startswith("_") for name in lines)     # matplotlib hides "_" labels


def test_a_wrong_kernel_is_reported_as_mismatch(tmp_path, monkeypatch):
    """A backend whose output is off gets MISMATCH and a non-zero exit status."""
    def wrong_int8_weight_mm(x, w_int8, w_scale, bias=None):
        return (x.float() @ w_int8.float().T * w_scale * 1.5).to(x.dtype)

    table = dict(dispatch.kernels("int8_weight_mm"))
    table["cpp"] = dispatch.Backend("cpp", "int8_weight_mm", wrong_int8_weight_mm, ("cpu",))
    monkeypatch.setitem(dispatch._REGISTRY.kernels, "int8_weight_mm", table)
    monkeypatch.setitem(dispatch._REGISTRY.availability, "cpp", lambda device: None)

    status = bench_run.main(["--quick", "--device", "cpu", "--ops", "int8_weight_mm",
                             "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    checks = {r["backend"]: r["check"] for r in rows if r["op"] == "int8_weight_mm"}
    assert checks == {"reference": "ok", "cpp": "MISMATCH"}
    assert status == 1


def test_tensor_core_layout_rows_run_when_named(tmp_path, capsys):
    """The *_tc ops (CUDA_LAYOUT_OPS) are benched by default only on CUDA (their kernels'
    home); named in --ops they run anywhere, on their repacked weights, and are checked."""
    status = bench_run.main(["--quick", "--device", "cpu", "--out", str(tmp_path),
                             "--ops", ",".join(CUDA_LAYOUT_OPS), "--m", "3"])
    capsys.readouterr()
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert status == 0
    for op in CUDA_LAYOUT_OPS:
        mine = [r for r in rows if r["op"] == op]
        assert {r["backend"] for r in mine} == {"reference"}, op
        assert all(r["check"] == "ok" and r["median_ms"] > 0 for r in mine), mine


def test_float32_tolerance_follows_the_matmul_precision():
    """--float32-matmul-precision medium lets float32 rows compute in bfloat16 inside, so
    their check uses bfloat16's tolerance; at highest, float32's."""
    import torch

    from bench import cases
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert cases.tolerance(torch.float32) == cases.TOL[torch.float32]
        torch.set_float32_matmul_precision("medium")
        assert cases.tolerance(torch.float32) == cases.TOL[torch.bfloat16]
        assert cases.tolerance(torch.float16) == cases.TOL[torch.float16]
    finally:
        torch.set_float32_matmul_precision(before)


def test_rows_of_a_cell_are_timed_in_interleaved_bursts():
    """measure_interleaved: ROUNDS rounds, one burst per row per round (an untimed first
    call, then the timed ones), row order rotating; a row that raises is reported in its
    place and dropped from later rounds; every row keeps its own copy counter."""
    import contextlib

    from bench import timing

    log = []

    def row(name, fail_at=None):
        def call(i):
            if i == fail_at:
                raise RuntimeError(f"{name} failed at copy {i}")
            log.append((name, i))
            return name
        return timing.Row(call, contextlib.nullcontext)

    # max_seconds 0: the warm-up is call(0) alone, and bursts have ceil(min_reps / ROUNDS) calls
    budget = timing.Budget(min_reps=3, max_reps=10, max_seconds=0.0, warmup_seconds=0.0)
    out = timing.measure_interleaved([row("a"), row("b", fail_at=3), row("c")], "cpu", budget)
    assert [t.first_output for t in (out[0], out[2])] == ["a", "c"]
    assert isinstance(out[1], RuntimeError) and "copy 3" in str(out[1])
    assert timing.ROUNDS == 5 and out[0].reps == out[2].reps == 5    # one timed call per burst
    assert log[:3] == [("a", 0), ("b", 0), ("c", 0)]                   # warm-ups, in row order
    # rounds start at row r % 3: a b c / b c a / c a [b fails] / a c / c a
    assert [name for name, _ in log[3:]] == list("abcbcacaacca")
    assert [i for name, i in log if name == "a"] == list(range(6))      # a's own copy counter

    budget = timing.Budget(min_reps=3, max_reps=100, max_seconds=1.0)
    assert timing._bursts(1e-3, budget) == 20          # capped by max_reps / ROUNDS
    assert timing._bursts(0.5, budget) == 1            # a slow row: one call per burst
    log.clear()
    out = timing.measure_interleaved([row("a")], "cpu",
                                     timing.Budget(min_reps=10, max_reps=10, max_seconds=0.0))
    assert out[0].reps == 10 and len(log) == 1 + 5 * (1 + 2)   # bursts: 1 untimed + 2 timed


def test_cuda_graphs_needs_a_gpu_device(capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--cuda-graphs", "--device", "cpu"])
    assert "--cuda-graphs times CUDA graphs: it needs --device cuda, not cpu" in capsys.readouterr().err


def test_cuda_graphs_budget_is_ignored_on_cpu():
    import contextlib

    from bench import timing

    budget = timing.Budget(min_reps=3, max_reps=10, max_seconds=0.0, warmup_seconds=0.0,
                           cuda_graphs=True)
    out = timing.measure_interleaved([timing.Row(lambda i: i, contextlib.nullcontext)], "cpu", budget)
    assert out[0].mode == "per call" and out[0].reps == 5


@pytest.mark.cuda
def test_cuda_graph_timing_and_its_fallback():
    """A capturable row is timed by graph replays (reps = calls in the replays, each
    replay at least one call per weight copy); a row
    that synchronizes (.item()) cannot be captured and is timed per call, saying why."""
    import contextlib

    from bench import timing

    x = torch.randn(256, 256, device="cuda")
    rows = [timing.Row(lambda i: x @ x, contextlib.nullcontext, copies=7),
            timing.Row(lambda i: (x @ x).sum().item(), contextlib.nullcontext)]
    budget = timing.Budget(min_reps=10, max_reps=20, max_seconds=0.05, cuda_graphs=True)
    graph, eager = timing.measure_interleaved(rows, "cuda", budget)
    assert graph.mode == "CUDA graph" and graph.median_ms > 0
    assert graph.reps >= timing.ROUNDS * 7           # each replay covers all 7 copies
    assert eager.mode.startswith("per call (CUDA graph capture failed: ") and eager.median_ms > 0
    torch.testing.assert_close(graph.first_output, x @ x)
