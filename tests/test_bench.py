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

    # max_seconds 0: the warm-up is call(0) alone, and min_reps calls are spread over the rounds
    budget = timing.Budget(min_reps=5, max_reps=10, max_seconds=0.0, warmup_seconds=0.0)
    out = timing.measure_interleaved([row("a"), row("b", fail_at=3), row("c")], "cpu", budget)
    assert [t.first_output for t in (out[0], out[2])] == ["a", "c"]
    assert isinstance(out[1], RuntimeError) and "copy 3" in str(out[1])
    assert timing.ROUNDS == 5 and out[0].reps == out[2].reps == 5    # one timed call per burst
    assert log[:3] == [("a", 0), ("b", 0), ("c", 0)]                   # warm-ups, in row order
    # rounds start at row r % 3: a b c / b c a / c a [b fails] / a c / c a
    assert [name for name, _ in log[3:]] == list("abcbcacaacca")
    assert [i for name, i in log if name == "a"] == list(range(6))      # a's own copy counter

    budget = timing.Budget(min_reps=3, max_reps=100, max_seconds=1.0)
    assert timing._bursts(1e-3, budget) == [20] * 5    # capped by max_reps
    assert timing._bursts(0.5, budget) == [1] * 5      # a slow row: one call per burst
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
    assert out[0].mode == "per call" and out[0].reps == 3


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


# --- the bug-hunt fixes (/tmp/hunt_bench/findings.md): each test fails without its fix ---

TINY = ["--device", "cpu", "--shapes", "128x16", "--m", "1", "--max-seconds-per-cell", "0.01",
        "--reps", "3", "--peak-gbs", "10", "--rotate-mib", "0.05"]


def _run(tmp_path, *extra, capsys=None):
    """bench.run on a tiny cell; (status, the result file's dict, what it printed)."""
    status = bench_run.main([*TINY, "--out", str(tmp_path), *extra])
    printed = capsys.readouterr() if capsys is not None else None
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    text = files[0].read_text()
    return status, json.loads(text, parse_constant=_strict), printed


def _strict(name):
    raise ValueError(f"{name} is not JSON")


def _register(monkeypatch, op, family, fn):
    """Put fn in op's dispatch table as `family` on CPU (and make that family available)."""
    table = dict(dispatch.kernels(op))
    table[family] = dispatch.Backend(family, op, fn, ("cpu",))
    monkeypatch.setitem(dispatch._REGISTRY.kernels, op, table)
    monkeypatch.setitem(dispatch._REGISTRY.availability, family, lambda device: None)


def _row(op="int8_mm", backend="cpp", M=1, K=256, N=64, check="ok", ms=0.5, **kw):
    r = {"op": op, "backend": backend, "default": backend == "cpp", "M": M, "K": K, "N": N,
         "dtype": "f32", "median_ms": ms, "speedup_vs_f32_linear": 1.5,
         "speedup_vs_half_linear": 1.2, "check": check, "note": ""}
    r.update(kw)
    return r


def _result(rows, **kw):
    return {"machine": {"gpu_name": None}, "half_dtype": "bf16", "rows": rows, **kw}


def test_a_baseline_torch_cannot_build_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    """#1: int4pack needs N % 16 == 0; on 128x24 it is skipped with torch's reason."""
    status, result, printed = _run(tmp_path, "--shapes", "128x24", "--ops", "int8_mm",
                                   capsys=capsys)
    assert status == 0
    why = [s["reason"] for s in result["skipped"] if s["backend"] == "int4pack"]
    assert why and "dividable by 16" in why[0] and "N=24" in why[0], result["skipped"]
    assert "int4pack" in printed.out
    ops = {r["op"] for r in result["rows"]}
    assert {"quantize_dynamic", "torch._weight_int8pack_mm", "int8_mm"} <= ops
    assert "torch._weight_int4pack_mm_for_cpu" not in ops


def test_a_crash_late_in_the_sweep_keeps_the_rows_measured_before(tmp_path, monkeypatch, capsys):
    """#1: the rows of the shapes done before a crash are written, marked incomplete."""
    from bench import cases
    make_layer = cases.make_layer

    def second_shape_fails(k, n, *a, **kw):
        if n == 32:
            raise RuntimeError("out of memory (simulated)")
        return make_layer(k, n, *a, **kw)
    monkeypatch.setattr(cases, "make_layer", second_shape_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        bench_run.main([*TINY, "--shapes", "128x16,128x32", "--ops", "int8_mm",
                        "--no-torch-cpu-baselines", "--out", str(tmp_path)])
    assert "marked incomplete" in capsys.readouterr().err
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["incomplete"] == "RuntimeError: out of memory (simulated)"
    assert result["rows"] and {(r["K"], r["N"]) for r in result["rows"]} == {(128, 16)}


def test_report_and_plot_do_not_show_failed_rows_as_numbers(tmp_path, capsys):
    """#2: a MISMATCH or ERROR row shows its status, not a time; the plot leaves it out."""
    result = _result([_row(backend="torch", op="F.linear"), _row(),
                      _row(M=16), _row(op="int4_mm", check="MISMATCH", ms=0.0234),
                      _row(op="int4_mm", M=16, check="ERROR", ms=None)])
    md = bench_report.table(result, 256, 64)
    line = next(l for l in md if l.startswith("| int4_mm"))
    assert "0.0234" not in line and "MISMATCH" in line and "ERROR" in line, line
    assert any("2 of these cells failed their check" in l for l in md), md
    assert not any(name.startswith("int4_mm") for name in bench_plot.series(result, 256, 64))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert bench_report.main([str(path), "--shape", "256x64"]) == 1        # says so in its status
    capsys.readouterr()
    result["rows"] = result["rows"][:3]
    path.write_text(json.dumps(result))
    assert bench_report.main([str(path), "--shape", "256x64"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--shape", "4096x4096"], "--shape 4096x4096: not in r.json; it has 256x64, 512x128"),
    (["--shape", "4096"], "'4096' is not KxN"),
    (["--shape", "abc"], "'abc' is not KxN"),
    (["--shape", "4x4x1"], "'4x4x1' is not KxN"),
    ([], "holds several shapes and not 4096x4096: give --shape, one of 256x64, 512x128"),
])
@pytest.mark.parametrize("tool", [bench_report, bench_plot])
def test_report_and_plot_name_the_shapes_a_file_holds(tmp_path, capsys, tool, argv, message):
    """#3: a shape the file lacks, or a malformed one, is an argparse error that says what
    the file holds, not an empty table or a traceback."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result([_row(), _row(K=512, N=128)])))
    with pytest.raises(SystemExit) as exc:
        tool.main([str(path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_report_defaults_to_the_only_shape_and_rejects_files_without_rows(tmp_path, capsys):
    """#3: a --quick file (one shape, not 4096x4096) needs no --shape; a file without rows
    is an error that says so."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result([_row(backend="torch", op="F.linear"), _row()])))
    assert bench_report.main([str(path)]) == 0
    assert "| int8_mm | cpp * | f32 | 0.5 (1.50x, 1.20x) |" in capsys.readouterr().out
    for content, message in (("{}", "no 'rows' list"), ('{"rows": []}', "has no rows"),
                             ("[1,", "not a JSON file")):
        path.write_text(content)
        with pytest.raises(SystemExit):
            bench_report.main([str(path)])
        assert message in capsys.readouterr().err


def test_out_is_checked_before_any_timing(tmp_path, capsys):
    """#4: --out naming a file, or a name that looks like one, fails at once."""
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    for out, message in ((existing, "is a file"), (tmp_path / "new.json", "looks like a file name")):
        with pytest.raises(SystemExit):
            bench_run.parse_args(["--device", "cpu", "--out", str(out)])
        assert f"--out {out}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "new.json").exists()
    made = tmp_path / "a" / "b"
    assert bench_run.parse_args(["--device", "cpu", "--out", str(made)]).out == made
    assert made.is_dir()


def test_report_labels_the_half_column_from_the_files_half_dtype():
    """#5: a CPU run (half_dtype bf16) on a machine with a GPU is labelled bf16."""
    result = _result([_row()], machine={"gpu_name": "NVIDIA H100 80GB HBM3"})
    assert "x bf16)" in bench_report.table(result, 256, 64)[0]
    result["half_dtype"] = "f16"
    assert "x fp16)" in bench_report.table(result, 256, 64)[0]
    del result["half_dtype"]                       # files older than half_dtype: the GPU says
    assert "x fp16)" in bench_report.table(result, 256, 64)[0]


def test_an_output_of_another_dtype_or_shape_is_a_mismatch(tmp_path, monkeypatch):
    """#6: the check compares dtype and shape, not only values (which broadcast)."""
    from bench import cases

    ref = torch.randn(1, 8)
    assert cases.compare_to(ref, torch.float32)(ref.clone()) == ("ok", 0.0)
    status, err, note = cases.compare_to(ref, torch.float32)(ref[0].clone())
    assert status == "MISMATCH" and err is None and note == "output is f32[8], the reference's f32[1, 8]"
    status, _, note = cases.compare_to(ref, torch.float32)(ref.to(torch.bfloat16))
    assert status == "MISMATCH" and "bf16[1, 8]" in note
    q, s = torch.zeros(1, 8, dtype=torch.int8), torch.ones(1)
    assert cases.compare_quantized((q, s))((q, s))[0] == "ok"
    assert cases.compare_quantized((q, s))((q, s.double()))[0] == "MISMATCH"
    assert cases.compare_quantized((q, s))((q.int(), s))[0] == "MISMATCH"

    def f32_out(x, w_int8, w_scale, bias=None):            # ignores x's dtype
        return x.float() @ w_int8.float().T * w_scale

    _register(monkeypatch, "int8_weight_mm", "cpp", f32_out)
    status, result, _ = _run(tmp_path, "--ops", "int8_weight_mm", "--act-dtype", "bfloat16",
                             "--no-torch-cpu-baselines")
    row = next(r for r in result["rows"] if r["backend"] == "cpp")
    assert status == 1 and row["check"] == "MISMATCH", row
    assert "output is f32[1, 16], the reference's bf16[1, 16]" in row["note"]


def test_reps_is_an_upper_bound_and_min_reps_a_lower_one():
    """#7: the timed calls of a row add up to exactly max_reps when there is time, and
    never less than min_reps; --reps, --min-reps must be >= 1 and min <= max."""
    import contextlib

    from bench import timing

    out = timing.measure_interleaved([timing.Row(lambda i: i, contextlib.nullcontext)], "cpu",
                                     timing.Budget(min_reps=1, max_reps=3, max_seconds=1.0))
    assert out[0].reps == 3
    for max_reps in (1, 3, 7, 10, 101):
        budget = timing.Budget(min_reps=1, max_reps=max_reps, max_seconds=1.0)
        assert sum(timing._bursts(1e-6, budget)) == max_reps
    slow = 10.0                                # seconds per call: one call per round...
    assert timing._bursts(slow, timing.Budget(min_reps=3, max_reps=50)) == [1] * 5
    assert timing._bursts(slow, timing.Budget(min_reps=3, max_reps=4)) == [1, 1, 1, 1, 0]
    assert sum(timing._bursts(slow, timing.Budget(min_reps=12, max_reps=50))) == 12  # ...or more


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps '0': expected an integer >= 1"),
    (["--reps", "-3"], "--reps '-3': expected an integer >= 1"),
    (["--min-reps", "0"], "--min-reps '0': expected an integer >= 1"),
    (["--reps", "10", "--min-reps", "50"], "--min-reps 50 is more than --reps 10"),
    (["--quick", "--min-reps", "20"], "--min-reps 20 is more than --reps 10"),
    (["--shapes", "0x8"], "'0x8' is not KxN with K, N >= 1"),
    (["--shapes", "128x0"], "'128x0' is not KxN with K, N >= 1"),
    (["--threads", "0"], "--threads '0': expected an integer >= 1"),
    (["--threads", "-1"], "--threads '-1': expected an integer >= 1"),
    (["--peak-gbs", "0"], "--peak-gbs '0': expected a finite number > 0"),
    (["--peak-gbs", "-5"], "--peak-gbs '-5': expected a finite number > 0"),
    (["--peak-gbs", "nan"], "--peak-gbs 'nan': expected a finite number > 0"),
    (["--max-seconds-per-cell", "-1"], "--max-seconds-per-cell '-1': expected a finite number >= 0"),
    (["--rotate-mib", "-3"], "--rotate-mib '-3': expected a finite number >= 0"),
    (["--rotate-max-m", "-1"], "--rotate-max-m '-1': expected an integer >= 0"),
    (["--m", "1.5"], "--m '1.5': expected positive integers"),
    (["--m", "1,abc"], "--m '1,abc': expected positive integers"),
])
def test_nonsense_arguments_are_argparse_errors(tmp_path, capsys, argv, message):
    """#7, #12: each names the option, the value and what is accepted."""
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_started_is_the_start_and_the_measured_bandwidth_is_not_an_argument(tmp_path, monkeypatch):
    """#8: `started` is taken before the sweep; a measured bandwidth goes to
    bandwidth.gbs (and the rows' %BW), while args.peak_gbs keeps what the user gave."""
    import datetime
    import time as _time

    sweep, begun = bench_run.sweep, []

    def slow_sweep(*a, **kw):
        begun.append(datetime.datetime.now())
        _time.sleep(1.05)
        return sweep(*a, **kw)
    monkeypatch.setattr(bench_run, "sweep", slow_sweep)
    monkeypatch.setattr(bench_run, "measure_bandwidth_gbs", lambda **kw: 12.5)
    argv = [a for a in TINY if a not in ("--peak-gbs", "10")]
    bench_run.main([*argv, "--ops", "int8_mm", "--no-torch-cpu-baselines", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert datetime.datetime.fromisoformat(result["started"]) <= begun[0]
    assert begun[0] < datetime.datetime.fromisoformat(result["finished"])
    assert result["args"]["peak_gbs"] is None and result["bandwidth"]["gbs"] == 12.5
    row = next(r for r in result["rows"] if r["op"] == "int8_mm")
    assert row["pct_peak_bw"] == pytest.approx(100 * row["gbs"] / 12.5)


def test_rotation_is_not_capped_at_256_copies_and_shortfalls_are_recorded(tmp_path, monkeypatch,
                                                                          capsys):
    """#9: small layers get the copies their target needs (beyond 256); each row records
    the bytes it rotated through, and rows below the target are listed and warned about."""
    from bench import timing

    assert timing.copies_for(1000, 1_000_000, 10**9) == 1000
    assert timing.copies_for(1000, 1_000_000, 50_000) == 50              # the memory cap
    monkeypatch.setattr(timing, "MAX_COPIES", 4)
    status, result, printed = _run(tmp_path, "--ops", "int8_mm", "--no-torch-cpu-baselines",
                                   capsys=capsys)
    assert status == 0
    row = next(r for r in result["rows"] if r["op"] == "int8_mm" and r["backend"] == "cpp")
    assert row["rotated_copies"] == 4 and row["rotation_bytes"] == 4 * (128 * 16 + 4 * 16)
    short = result["rotation"]["short_of_target"]
    assert {(s["op"], s["backend"]) for s in short} >= {("int8_mm", "cpp"), ("F.linear", "torch")}
    assert "WARNING:" in printed.out and "rotated through less than 90% of the 0.05 MiB" in printed.out


def test_the_memory_cap_for_copies_counts_the_formats_in_use(tmp_path, monkeypatch):
    """#10: all the rotation copies together stay within a quarter of free host memory:
    the cap is shared by the formats the rows read (not a fixed 6 of 12)."""
    from bench import cases, timing

    free, layers = 4 << 20, []
    make_layer = cases.make_layer

    def keep(*a, **kw):
        layers.append(make_layer(*a, **kw))
        return layers[-1]
    monkeypatch.setattr(timing, "free_memory_bytes", lambda device: free)
    monkeypatch.setattr(cases, "make_layer", keep)
    for i, ops in enumerate(("int8_mm", ",".join(cases.ALL_OPS))):
        layers.clear()
        _run(tmp_path / str(i), "--ops", ops, "--rotate-mib", "64")
        extra = sum(cases._size(c) for name in layers[0].copies()
                    for c in getattr(layers[0], name)[1:])
        assert 0 < extra <= free // 4, (ops, extra)


def test_op_formats_name_the_format_each_op_reads():
    """The formats bench.run rotates and sizes its memory cap by (cases.OP_FORMATS) are
    the ones the rows read (cases._pyfast_call)."""
    from bench import cases

    assert set(cases.OP_FORMATS) == set(cases.ALL_OPS)
    layer = cases.make_layer(128, 8, "cpu", torch.float32, torch.bfloat16, lambda b: 1)
    cell = cases.Cell(1, layer, "cpu", torch.float32, torch.bfloat16, rotate=True)
    for op in cases.ALL_OPS:
        fmt = cases._pyfast_call(op, cell)[1]
        assert cases.OP_FORMATS[op] == ((fmt,) if fmt else ()), op


def test_a_cell_where_every_row_fails_reports_each_error():
    """#11: no ZeroDivisionError when no row survives its warm-up."""
    import contextlib

    from bench import timing

    def fail(i):
        raise RuntimeError("out of memory")
    out = timing.measure_interleaved([timing.Row(fail, contextlib.nullcontext)] * 2, "cpu",
                                     timing.Budget())
    assert [str(e) for e in out] == ["out of memory"] * 2


def test_repeated_names_are_timed_once(tmp_path):
    """#13: --ops, --m and --shapes keep each value once, in order."""
    args = bench_run.parse_args(["--device", "cpu", "--out", str(tmp_path), "--ops",
                                 "int8_mm,int4_mm,int8_mm", "--m", "16,1,16",
                                 "--shapes", "256x64,128x8,256x64"])
    assert (args.ops, args.m, args.shapes) == (["int8_mm", "int4_mm"], [16, 1],
                                               [(256, 64), (128, 8)])


def test_a_nan_output_is_written_as_null(tmp_path, monkeypatch):
    """#14: the result file is strict JSON (NaN -> null), and bench.report reads it."""
    def nan_out(x, w_int8, w_scale, bias=None):
        return torch.full((x.shape[0], w_int8.shape[0]), float("nan"), dtype=x.dtype)

    _register(monkeypatch, "int8_weight_mm", "cpp", nan_out)
    status, result, _ = _run(tmp_path, "--ops", "int8_weight_mm", "--no-torch-cpu-baselines")
    row = next(r for r in result["rows"] if r["backend"] == "cpp")     # _run parses strictly
    assert status == 1 and row["check"] == "MISMATCH" and row["max_rel_err"] is None
    assert any("MISMATCH" in line for line in bench_report.table(result, 128, 16))


def test_a_run_that_can_time_no_pyfast_row_fails(tmp_path, monkeypatch, capsys):
    """#15: --backends naming no family with a kernel here is refused before timing; a
    run where every cell skipped every pyfast row exits 1."""
    with pytest.raises(SystemExit):
        bench_run.main([*TINY, "--out", str(tmp_path), "--backends", "cuda", "--ops", "int4_mm"])
    err = capsys.readouterr().err
    assert "no pyfast row can be timed here" in err
    assert "int4_mm / cuda: no cuda kernel for int4_mm on cpu" in err
    monkeypatch.setattr(bench_run.C, "pyfast_cases",
                        lambda op, cell, requested: ([], [("cpp", "cannot take these inputs")]))
    status, result, printed = _run(tmp_path, "--ops", "int8_mm", "--no-torch-cpu-baselines",
                                   capsys=capsys)
    assert status == 1 and "no pyfast row was timed" in printed.err
    assert "int8_mm / cpp: cannot take these inputs" in printed.out


def test_report_can_leave_out_the_reference_rows_as_the_readme_does(tmp_path, capsys):
    """#17: --no-reference; the README's CPU tables are this output, unedited."""
    result = _result([_row(), _row(backend="reference", note="the oracle")])
    assert len(bench_report.table(result, 256, 64)) == 4
    assert len(bench_report.table(result, 256, 64, reference=False)) == 3
    readme = (ROOT / "README.md").read_text()
    for name in ("amd-epyc_2026-11-24_160336.json", "amd-epyc_2026-11-24_161103_bf16.json"):
        assert bench_report.main([str(ROOT / "bench" / "results" / name), "--no-reference"]) == 0
        table = capsys.readouterr().out
        assert table in readme, name


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    """#17: a clear message and exit 1, not a ModuleNotFoundError traceback."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_result([_row()])))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench_plot.main([str(path), "--out", str(tmp_path / "p.png")]) == 1
    assert "bench.plot needs matplotlib" in capsys.readouterr().err
