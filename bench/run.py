"""`python -m bench.run`: microbenchmarks of every pyfast op on every usable backend,
side by side with torch's own GEMMs, on LLM layer shapes.

    python -m bench.run                         full sweep on cuda if available, else cpu
    python -m bench.run --quick                 one small shape, few reps (smoke test)
    python -m bench.run --m 1,16 --shapes 4096x11008 --ops int4_mm,int8_weight_mm
    python -m bench.run --device cpu --threads 2 --backends reference,cpp

Rows: int8_mm (on pre-quantized inputs: the GEMM alone), int8_mm_vnni (the same on the
VNNI layout), w8a8_mm (W8A8 in one op on the canonical int8 weight), w8a8_mm_vnni (the
same on the VNNI layout, as Int8Linear runs it on an AVX-512 CPU), int8_weight_mm,
int4_mm (group 128, symmetric), sparse24_mm, sparse24_int4_mm (the same 2:4 weight with int4
kept values, group 128 symmetric), quantize_per_token, w8a8_e2e
(quantize_per_token then int8_mm, two op calls), w8a8_static_e2e (quantize_static then
int8_mm_vnni, as StaticInt8Linear runs on an AVX-512 CPU), int4_mm_ksplit (int4_mm's weight
in the K chunks Int4Linear's layout "auto" gives it on an AVX-512 CPU: 2 at K = 11008, one
at K = 4096; the VNNI and K-split rows are CPU only unless named in --ops), on
CUDA also int4_mm_tc, sparse24_mm_tc and sparse24_int4_mm_tc (the tensor-core layouts the
CUDA C++ kernels read; CPU only with --ops), and the baselines F.linear fp32 and bf16 (CPU) / fp16 (GPU)
and torch._int_mm. Every row's output is checked once (bench/cases.py); timing is in
bench/timing.py. Prints a table and writes bench/results/<device>_<date>.json
(a run that crashes writes the rows measured so far, marked "incomplete", then raises).
Exit status 1 if any row is MISMATCH or ERROR, or if no pyfast row was timed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import pyfast
from pyfast import _ext, memory

from . import cases as C
from . import shapes as S
from . import timing as T
from .cpu_baselines import cpu_baseline_cases, measure_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAILED = ("MISMATCH", "ERROR")
# A row whose weight copies add up to less than this fraction of the rotation target is
# reported (rotation.short_of_target): the memory cap or timing.MAX_COPIES held it back.
# (Not 1.0: the CPU baselines' copies are counted to the pyfast format they are built
# from, e.g. int4pack's to int4's, and their own bytes differ by a few percent.)
SHORT_OF_TARGET = 0.9


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if torch sees a GPU, else cpu")
    p.add_argument("--m", type=S.parse_ms, default=None,
                   help="tokens per batch, e.g. 1,16 (default 1,16,128,1024)")
    p.add_argument("--shapes", type=S.parse_shapes, default=None,
                   help="layers as KxN, e.g. 4096x4096,4096x11008 (default: the Llama-7B linears)")
    p.add_argument("--ops", type=_names(C.ALL_OPS), default=None,
                   help=f"subset of {','.join(C.ALL_OPS)} (default all)")
    p.add_argument("--backends", type=_names(pyfast.dispatch.FAMILIES), default=None,
                   help="pyfast backend families to time (default: every one usable here); "
                        "the torch baselines always run")
    p.add_argument("--act-dtype", choices=tuple(DTYPES), default=None,
                   help="activations of the pyfast ops: default float32 on CPU, float16 on GPU")
    p.add_argument("--reps", type=_number(int, "--reps", 1), default=None,
                   help="at most this many timed repetitions per row, exactly this many where "
                        "--max-seconds-per-cell allows (default 100; --quick 10; with "
                        "--cuda-graphs each replay covers every weight copy, which can be more)")
    p.add_argument("--min-reps", type=_number(int, "--min-reps", 1), default=3,
                   help="at least this many, however slow the row (default 3; at most --reps)")
    p.add_argument("--max-seconds-per-cell", type=_number(float, "--max-seconds-per-cell", 0),
                   default=None,
                   help="seconds of timed repetitions per ROW, despite the name (default 1.0; "
                        "--quick 0.05; 0: --min-reps only): the rows of a cell are timed "
                        "interleaved, one burst each per round, so a cell of R rows takes "
                        "about R times this")
    p.add_argument("--rotate-mib", type=_number(float, "--rotate-mib", 0), default=None,
                   help="MiB of weights to rotate through at small M (default: 256, or 8x the "
                        "last-level cache if larger; --quick 1; 0: no rotation)")
    p.add_argument("--rotate-max-m", type=_number(int, "--rotate-max-m", 0), default=16,
                   help="rotate weight copies for M <= this (default 16; 0: no rotation)")
    p.add_argument("--peak-gbs", type=_number(float, "--peak-gbs", 0, strict=True), default=None,
                   help="memory bandwidth of the device in GB/s (> 0), to print %% of peak "
                        "(CPU default: measured at the start of the run)")
    p.add_argument("--no-torch-cpu-baselines", dest="torch_cpu_baselines", action="store_false",
                   help="skip quantize_dynamic, _weight_int8pack_mm, _weight_int4pack_mm_for_cpu "
                        "and torchao rows on CPU")
    p.add_argument("--torch-hugepages", action="store_true",
                   help="place the torch baselines' weights (F.linear, torch._int_mm, "
                        "_weight_int8pack_mm) on transparent huge pages as pyfast places its "
                        "layers' buffers (pyfast/memory.py); default: as PyTorch allocates them")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: shape {S.QUICK_SHAPES[0][0]}x{S.QUICK_SHAPES[0][1]}, "
                        f"M {','.join(map(str, S.QUICK_MS))}, few reps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="directory for the JSON result, made if missing (default bench/results)")
    p.add_argument("--threads", type=_number(int, "--threads", 1), default=None,
                   help="torch.set_num_threads(N), N >= 1")
    p.add_argument("--float32-matmul-precision", choices=("highest", "high", "medium"),
                   default="highest",
                   help="torch.set_float32_matmul_precision for the run (default highest); "
                        "medium lets float32 rows compute in bfloat16 inside (PyTorch's "
                        "F.linear and pyfast's int4_mm), checked to bfloat16's tolerance")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: time CUDA-graph replays of each row's calls (device time, no "
                        "host dispatch or launch cost); rows that cannot be captured are "
                        "timed per call and their timing_mode says why (bench/timing.py)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    if args.cuda_graphs and args.device != "cuda":
        p.error(f"--cuda-graphs times CUDA graphs: it needs --device cuda, not {args.device}")
    quick = args.quick
    if args.m is None:
        args.m = list(S.QUICK_MS if quick else S.LLM_MS)
    if args.shapes is None:
        args.shapes = list(S.QUICK_SHAPES if quick else S.LLM_SHAPES)
    if args.ops is None:
        args.ops = [o for o in C.ALL_OPS
                    if o not in (C.CPU_LAYOUT_OPS if args.device == "cuda" else C.CUDA_LAYOUT_OPS)]
    if args.act_dtype is None:
        args.act_dtype = "float16" if args.device == "cuda" else "float32"
    if args.reps is None:
        args.reps = 10 if quick else 100
    if args.min_reps > args.reps:
        p.error(f"--min-reps {args.min_reps} is more than --reps {args.reps} (default 100, "
                "10 with --quick): --min-reps must be at most --reps")
    if args.max_seconds_per_cell is None:
        args.max_seconds_per_cell = 0.05 if quick else 1.0
    if args.rotate_mib is None and quick:
        args.rotate_mib = 1.0
    untimeable = _untimeable(args.ops, args.device, args.backends)
    if len(untimeable) == len(args.ops):
        p.error("no pyfast row can be timed here:\n  " + "\n  ".join(
            f"{op} / {family}: {why}" for op, reasons in untimeable.items()
            for family, why in reasons))
    _check_out(p, args.out)
    return args


def _number(kind, option: str, minimum: float, strict: bool = False):
    """argparse type: a `kind` (int or float) >= minimum (> minimum with strict)."""
    accepted = f"{'an integer' if kind is int else 'a finite number'} " + \
        f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value)
                or value < minimum or (strict and value == minimum)):
            raise argparse.ArgumentTypeError(f"{option} {text!r}: expected {accepted}")
        return value
    return parse


def _names(allowed):
    """argparse type: names from `allowed`, comma-separated (a repeated name counts once)."""
    def parse(text: str) -> List[str]:
        names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: accepted names: {', '.join(allowed)}")
        return names
    return parse


def _untimeable(ops: List[str], device: str, backends: Optional[List[str]]
                ) -> Dict[str, List[tuple]]:
    """{op: [(family, why not)]} for each op of which no backend family can run here (no
    row would be timed; cells can still skip families the shape does not suit)."""
    out = {}
    for op in ops:
        found = [C.usable_families(o, device, backends) for o in C.forced_ops(op)]
        if not any(usable for usable, _ in found):
            out[op] = [s for _, skipped in found for s in skipped] or [("-", "no backend family")]
    return out


def _check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """--out must be a directory, or a path where one can be made (made now, before any
    timing, so that a bad --out does not throw away a sweep)."""
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: is a file; --out takes the directory the result file goes in")
    if not out.exists() and out.suffix == ".json":
        p.error(f"--out {out}: looks like a file name; --out takes the directory the result "
                "file goes in (its name is <device>_<date>.json)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {out}: cannot make this directory ({exc.strerror or exc})")
    if not os.access(out, os.W_OK | os.X_OK):
        p.error(f"--out {out}: the directory is not writable")


# --- the machine ----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def _git(*cmd: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: str) -> Dict[str, Any]:
    gpu = torch.cuda.is_available()
    return {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if gpu else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None,
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "pyfast_version": pyfast.__version__,
        "pyfast_extension": _ext.status(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "backends": str(pyfast.backends()),
    }


# --- the table ---------------------------------------------------------------------------

COLUMNS = [("op", 33, "<"), ("backend", 15, "<"), ("M", 5, ">"), ("K", 6, ">"), ("N", 6, ">"),
           ("dtype", 14, "<"), ("ms", 10, ">"), ("TFLOP/s", 8, ">"), ("GB/s", 8, ">"),
           ("xF32", 7, ">"), ("xHALF", 7, ">"), ("rot", 4, ">"), ("check", 9, "<"),
           ("note", 0, "<")]


def header(half: str, peak: bool) -> str:
    cols = [(n.replace("HALF", half.upper()), w, a) for n, w, a in COLUMNS]
    if peak:
        cols.insert(9, ("%BW", 5, ">"))
    return " ".join(f"{n:{a}{w}}" for n, w, a in cols).rstrip()


def _fmt(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_row(r: Dict[str, Any], peak: bool) -> str:
    backend = r["backend"] + ("*" if r.get("default") else "")
    values = [r["op"], backend, r["M"], r["K"], r["N"], r["dtype"],
              _fmt(r["median_ms"], 4 if (r["median_ms"] or 0) < 10 else 2),
              _fmt(r["tflops"], 3), _fmt(r["gbs"], 1),
              _fmt(r["speedup_vs_f32_linear"], 2), _fmt(r["speedup_vs_half_linear"], 2),
              r["rotated_copies"], r["check"], r["note"]]
    cols = list(COLUMNS)
    if peak:
        cols.insert(9, ("%BW", 5, ">"))
        values.insert(9, _fmt(r.get("pct_peak_bw"), 0))
    return " ".join(f"{str(v):{a}{w}}" for v, (_, w, a) in zip(values, cols)).rstrip()


# --- the sweep ---------------------------------------------------------------------------

def _row(case: C.Case, cell: C.Cell) -> Dict[str, Any]:
    m, k, n = cell.m, cell.layer.k, cell.layer.n
    return {"op": case.op, "backend": case.backend, "default": case.default,
            "device": cell.device, "M": m, "K": k, "N": n, "dtype": case.dtype,
            "median_ms": None, "min_ms": None, "reps": 0, "rotated_copies": case.copies,
            "flops": case.flops, "bytes": case.bytes, "tflops": None, "gbs": None,
            "rotation_bytes": (case.copies * case.weight_bytes) if case.weight_bytes else None,
            "speedup_vs_f32_linear": None, "speedup_vs_half_linear": None,
            "check": "ERROR", "max_rel_err": None, "note": case.note}


def measure_cell(cases: List[C.Case], cell: C.Cell, budget: T.Budget,
                 peak_gbs: Optional[float]) -> List[Dict[str, Any]]:
    """Time the rows of one cell interleaved (bench/timing.py) and check each first
    output; a row whose call raises is an ERROR row with the exception in its note."""
    timed = T.measure_interleaved(
        [T.Row(case.call, lambda case=case: pyfast.use_backend(**case.force), case.copies)
         for case in cases],
        cell.device, budget)
    rows = []
    for case, t in zip(cases, timed):
        row = _row(case, cell)
        rows.append(row)
        try:
            if isinstance(t, Exception):
                raise t
            status = case.check(t.first_output)
            row["check"], row["max_rel_err"] = status[0], status[1]
            if len(status) > 2:                   # the check says why (e.g. wrong dtype)
                row["note"] = "; ".join(filter(None, (row["note"], status[2])))
        except (RuntimeError, ValueError, TypeError) as exc:
            row["check"] = "ERROR"
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        sec = t.median_ms / 1e3
        row.update(median_ms=t.median_ms, min_ms=t.min_ms, reps=t.reps, timing_mode=t.mode,
                   gbs=case.bytes / sec / 1e9,
                   tflops=None if case.flops is None else case.flops / sec / 1e12)
        if peak_gbs:
            row["pct_peak_bw"] = 100 * row["gbs"] / peak_gbs
    return rows


def add_speedups(cell_rows: List[Dict[str, Any]]) -> None:
    """speedup = time of F.linear (fp32, and bf16/fp16) on this cell / time of the row."""
    base = {("f32" if r["dtype"] == "f32" else "half"): r["median_ms"] for r in cell_rows
            if r["op"] == "F.linear" and r["median_ms"] is not None}
    for r in cell_rows:
        if r["median_ms"] is None:
            continue
        if "f32" in base:
            r["speedup_vs_f32_linear"] = base["f32"] / r["median_ms"]
        if "half" in base:
            r["speedup_vs_half_linear"] = base["half"] / r["median_ms"]


def sweep(args: argparse.Namespace, emit, peak_gbs: Optional[float] = None,
          out: Optional[Dict[str, Any]] = None) -> tuple:
    """(rows, skipped, rotation); emit(line) prints as the sweep goes. `out`, if given, is
    filled as the sweep goes ({"rows": [...], "skipped": [...], "rotation": {...}}), so a
    caller still has what was measured when a later cell raises. peak_gbs: the bandwidth
    for the rows' pct_peak_bw (default --peak-gbs)."""
    out = {"rows": [], "skipped": [], "rotation": {}} if out is None else out
    rows, skipped, rotation = out["rows"], out["skipped"], out["rotation"]
    peak_gbs = args.peak_gbs if peak_gbs is None else peak_gbs
    device, act = args.device, DTYPES[args.act_dtype]
    half = torch.float16 if device == "cuda" else torch.bfloat16
    budget = T.Budget(min_reps=args.min_reps, max_reps=args.reps,
                      max_seconds=args.max_seconds_per_cell,
                      warmup_seconds=0.01 if args.quick else 0.1, cuda_graphs=args.cuda_graphs)
    target = T.rotation_target_bytes(device, args.rotate_mib)
    rotating = target > 0 and any(m <= args.rotate_max_m for m in args.m)
    cpu_baselines = args.torch_cpu_baselines and device == "cpu"
    formats = C.formats_used(args.ops, cpu_baselines)
    cap = copies_cap_bytes(device, formats, cpu_baselines)
    copies_for = ((lambda b: T.copies_for(b, target, cap, T.MAX_COPIES)) if rotating
                  else (lambda b: 1))
    rotation.update({"target_bytes": target if rotating else 0, "max_m": args.rotate_max_m,
                     "used": rotating, "formats": list(formats), "max_copies": T.MAX_COPIES,
                     "memory_cap_bytes_per_format": cap if rotating else None,
                     "short_of_target": []})
    short = rotation["short_of_target"]
    for k, n in args.shapes:
        layer = C.make_layer(k, n, device, act, half, copies_for, args.torch_hugepages,
                             rotate_formats=formats)
        for m in args.m:
            cell = C.Cell(m, layer, device, act, half, rotate=m <= args.rotate_max_m)
            todo = [(c, True) for c in C.baseline_cases(cell)]
            if args.torch_cpu_baselines:
                cpu_cases, cpu_skipped = cpu_baseline_cases(cell)
                todo += [(c, True) for c in cpu_cases]
                skipped += [{"op": "baseline", "backend": f, "M": m, "K": k, "N": n, "reason": why}
                            for f, why in cpu_skipped]
            for op in args.ops:
                op_cases, op_skipped = C.pyfast_cases(op, cell, args.backends)
                todo += [(c, False) for c in op_cases]
                skipped += [{"op": op, "backend": f, "M": m, "K": k, "N": n, "reason": why}
                            for f, why in op_skipped]
            cell_rows = []
            measured = measure_cell([c for c, _ in todo], cell, budget, peak_gbs)
            for (case, is_baseline), row in zip(todo, measured):
                if is_baseline and row["check"] == "ERROR":   # torch's own shape limits
                    skipped.append({"op": case.op, "backend": case.backend, "M": m, "K": k,
                                    "N": n, "reason": f"{case.note}: {row['note']}"})
                    continue
                cell_rows.append(row)
            add_speedups(cell_rows)
            for row in cell_rows:
                emit(format_row(row, bool(peak_gbs)))
                if (cell.rotate and rotating and row["rotation_bytes"]
                        and row["rotation_bytes"] < SHORT_OF_TARGET * target):
                    short.append({key: row[key] for key in ("op", "backend", "dtype", "note", "M",
                                                            "K", "N", "rotated_copies",
                                                            "rotation_bytes")})
            rows += cell_rows
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped, rotation


def copies_cap_bytes(device: str, formats, cpu_baselines: bool) -> int:
    """Bytes of rotation copies allowed per format: a quarter of free host memory (half of
    free GPU memory), shared by the formats the rows read and, on CPU, the baselines' own
    per-copy objects (quantize_dynamic, int4pack, torchao's two: cpu_baselines.py)."""
    share = len(formats) + (4 if cpu_baselines else 0)
    return int(T.free_memory_bytes(device) * (0.5 if device == "cuda" else 0.25)) // max(1, share)


def result_path(out_dir: Path, device: str, quick: bool,
                now: Optional[_dt.datetime] = None) -> Path:
    """out_dir/<device>_<date>[_quick].json, with _HHMMSS (of `now`: the run's start) and
    then _2, _3, ... where that file exists."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device
    now = now or _dt.datetime.now()
    stem = f"{slug}_{now:%Y-%m-%d}" + ("_quick" if quick else "")
    path = out_dir / f"{stem}.json"
    if path.exists():
        path = out_dir / f"{stem}_{now:%H%M%S}.json"
    i = 2
    while path.exists():
        path = out_dir / f"{stem}_{now:%H%M%S}_{i}.json"
        i += 1
    return path


def _finite(v):
    """v with every NaN or infinite float replaced by None (JSON null): strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_result(result: Dict[str, Any], out_dir: Path, device: str, quick: bool,
                 started: _dt.datetime) -> Path:
    """The result as strict JSON (NaN -> null), the rows and skipped lists last."""
    last = ("rows", "skipped")
    ordered = {**{k: v for k, v in result.items() if k not in last},
               **{k: result[k] for k in last}}
    path = result_path(out_dir, device, quick, started)
    path.write_text(json.dumps(_finite(ordered), indent=1, allow_nan=False) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    started_at = _dt.datetime.now()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    started, load_before = time.perf_counter(), os.getloadavg()
    machine = machine_info(args.device)
    half_name = "f16" if args.device == "cuda" else "bf16"
    print(f"pyfast {pyfast.__version__} bench on {args.device}: {machine['device_name']} "
          f"(torch {torch.__version__}, {machine['torch_threads']} threads); "
          f"activations {args.act_dtype}; float32 matmul precision "
          f"{args.float32_matmul_precision}")
    print(machine["backends"])
    if args.device == "cpu" and load_before[0] > 0.5:
        print(f"WARNING: load average {load_before[0]:.1f} before the run: other processes are "
              "using the CPU and CPU timings will be noisy")
    print("* = what a plain call runs here; xF32/x" + half_name.upper() + " = speedup vs "
          "F.linear in that dtype, same shape, this run; rot = weight copies rotated\n")
    # The bandwidth the rows' %BW is of: --peak-gbs, else measured now (CPU). The user's
    # --peak-gbs stays in result["args"]; what was used is result["bandwidth"]["gbs"].
    peak_gbs = args.peak_gbs
    bandwidth = {"gbs": args.peak_gbs, "source": "--peak-gbs" if args.peak_gbs else None}
    if args.peak_gbs is None and args.device == "cpu":
        mib = 64 if args.quick else 512
        pages = measure_bandwidth_gbs(mib=mib)
        huge = measure_bandwidth_gbs(mib=mib, hugepages=True) if memory.status() is None else None
        peak_gbs = max(pages, huge or 0.0)
        bandwidth = {"gbs": peak_gbs, "gbs_4k_pages": pages, "gbs_huge_pages": huge,
                     "source": f"measured: median torch.sum over {mib} MiB float32, "
                               f"{torch.get_num_threads()} threads, at the start of this run, "
                               "the larger of PyTorch's pages and huge pages (pyfast/memory.py)"}
        print(f"memory bandwidth (read, measured now): {peak_gbs:.1f} GB/s (PyTorch's "
              f"pages {pages:.1f}, huge pages {'n/a' if huge is None else f'{huge:.1f}'})")
    print(header(half_name, bool(peak_gbs)), flush=True)
    result = {
        "machine": machine,
        "command": " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "half_dtype": half_name,
        "float32_matmul_precision": args.float32_matmul_precision,
        "rotation": {},
        "bandwidth": bandwidth,
        "memory": {"pyfast_weights": memory.describe(),
                   "torch_weights": ("placed as pyfast's (--torch-hugepages)"
                                     if args.torch_hugepages else
                                     "as PyTorch allocates them (THP_MEM_ALLOC_ENABLE="
                                     f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')})")},
        "timing": ("median over CUDA-graph replays of each row's burst, per call (rows' "
                   "timing_mode: the exceptions)" if args.cuda_graphs else
                   "median of per-call CUDA event times (no sync between calls)"
                   if args.device == "cuda" else "median of per-call time.perf_counter_ns")
                  + "; the rows of a cell interleaved, one repetition each per round",
        "started": started_at.isoformat(timespec="seconds"),
        "load_average_before": load_before,      # 1/5/15-min; > 0 = other work on the machine
        "rows": [],
        "skipped": [],
    }

    def finish(**extra) -> Path:
        result.update(finished=_dt.datetime.now().isoformat(timespec="seconds"),
                      elapsed_s=round(time.perf_counter() - started, 1),
                      load_average_after=os.getloadavg(), **extra)
        return write_result(result, args.out, args.device, args.quick, started_at)

    try:
        rows, skipped, _ = sweep(args, lambda line: print(line, flush=True), peak_gbs, result)
    except (Exception, KeyboardInterrupt) as exc:   # keep what was measured, then re-raise
        if result["rows"]:
            path = finish(incomplete=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                          if str(exc) else type(exc).__name__)
            print(f"\nthe run stopped ({type(exc).__name__}); the {len(result['rows'])} rows "
                  f"measured before it are in {path} (marked incomplete)", file=sys.stderr)
        raise
    if skipped:
        print("\nnot timed:")
        for s in {(s["op"], s["backend"], s["reason"]): s for s in skipped}.values():
            print(f"  {s['op']} / {s['backend']}: {s['reason']}")
    short = {(s["op"], s["backend"], s["dtype"], s["note"], s["K"], s["N"]): s
             for s in result["rotation"]["short_of_target"]}       # one line per row, any M
    if short:
        target = result["rotation"]["target_bytes"] / T.MIB
        print(f"\nWARNING: {len(short)} rows rotated through less than "
              f"{100 * SHORT_OF_TARGET:.0f}% of the {target:.3g} MiB target (the memory cap or "
              f"the {T.MAX_COPIES}-copy limit; the rows' rotation_bytes), so part of their "
              "weight may come from cache:")
        for s in short.values():
            print(f"  {s['op']} / {s['backend']} {s['dtype']} {s['K']}x{s['N']}: "
                  f"{s['rotated_copies']} copies, {s['rotation_bytes'] / T.MIB:.1f} MiB")
    failed = [r for r in rows if r["check"] in FAILED]
    path = finish()
    print(f"\n{len(rows)} rows in {result['elapsed_s']:.0f} s; {len(failed)} failed checks; "
          f"wrote {path}")
    if not any(r["op"] in C.ALL_OPS for r in rows):
        print("no pyfast row was timed (see 'not timed' above): exit status 1", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
