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
int8_mm_vnni, as StaticInt8Linear runs on an AVX-512 CPU; the VNNI rows are CPU only
unless named in --ops), on
CUDA also int4_mm_tc, sparse24_mm_tc and sparse24_int4_mm_tc (the tensor-core layouts the
CUDA C++ kernels read; CPU only with --ops), and the baselines F.linear fp32 and bf16 (CPU) / fp16 (GPU)
and torch._int_mm. Every row's output is checked once (bench/cases.py); timing is in
bench/timing.py. Prints a table and writes bench/results/<device>_<date>.json.
Exit status 1 if any row is MISMATCH or ERROR.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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
    p.add_argument("--reps", type=int, default=None,
                   help="at most this many timed repetitions per row (default 100; --quick 10)")
    p.add_argument("--min-reps", type=int, default=3, help="at least this many (default 3)")
    p.add_argument("--max-seconds-per-cell", type=float, default=None,
                   help="time each row for about this long (default 1.0; --quick 0.05); "
                        "the rows of a cell are timed interleaved, one repetition each per round")
    p.add_argument("--rotate-mib", type=float, default=None,
                   help="MiB of weights to rotate through at small M (default: 256, or 8x the "
                        "last-level cache if larger; --quick 1; 0: no rotation)")
    p.add_argument("--rotate-max-m", type=int, default=16,
                   help="rotate weight copies for M <= this (default 16)")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="memory bandwidth of the device in GB/s, to print %% of peak "
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
                   help="directory for the JSON result (default bench/results)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
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
    args.m = args.m or list(S.QUICK_MS if quick else S.LLM_MS)
    args.shapes = args.shapes or list(S.QUICK_SHAPES if quick else S.LLM_SHAPES)
    args.ops = args.ops or [o for o in C.ALL_OPS
                            if o not in (C.CPU_LAYOUT_OPS if args.device == "cuda"
                                         else C.CUDA_LAYOUT_OPS)]
    args.act_dtype = args.act_dtype or ("float16" if args.device == "cuda" else "float32")
    args.reps = args.reps or (10 if quick else 100)
    if args.max_seconds_per_cell is None:
        args.max_seconds_per_cell = 0.05 if quick else 1.0
    if args.rotate_mib is None and quick:
        args.rotate_mib = 1.0
    return args


def _names(allowed):
    def parse(text: str) -> List[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: accepted names: {', '.join(allowed)}")
        return names
    return parse


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
            row["check"], row["max_rel_err"] = case.check(t.first_output)
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


def sweep(args: argparse.Namespace, emit) -> tuple:
    """All rows and skipped cells; emit(line) prints as the sweep goes."""
    device, act = args.device, DTYPES[args.act_dtype]
    half = torch.float16 if device == "cuda" else torch.bfloat16
    budget = T.Budget(min_reps=args.min_reps, max_reps=args.reps,
                      max_seconds=args.max_seconds_per_cell,
                      warmup_seconds=0.01 if args.quick else 0.1, cuda_graphs=args.cuda_graphs)
    target = T.rotation_target_bytes(device, args.rotate_mib)
    rotating = target > 0 and any(m <= args.rotate_max_m for m in args.m)
    # Room for copies: a quarter of free host memory (half of free GPU memory), per format.
    cap = int(T.free_memory_bytes(device) * (0.5 if device == "cuda" else 0.25)) // 6
    copies_for = (lambda b: T.copies_for(b, target, cap)) if rotating else (lambda b: 1)
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    for k, n in args.shapes:
        layer = C.make_layer(k, n, device, act, half, copies_for, args.torch_hugepages)
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
            measured = measure_cell([c for c, _ in todo], cell, budget, args.peak_gbs)
            for (case, is_baseline), row in zip(todo, measured):
                if is_baseline and row["check"] == "ERROR":   # torch's own shape limits
                    skipped.append({"op": case.op, "backend": case.backend, "M": m, "K": k,
                                    "N": n, "reason": f"{case.note}: {row['note']}"})
                    continue
                cell_rows.append(row)
            add_speedups(cell_rows)
            for row in cell_rows:
                emit(format_row(row, bool(args.peak_gbs)))
            rows += cell_rows
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped, {"target_bytes": target if rotating else 0,
                           "max_m": args.rotate_max_m, "used": rotating}


def result_path(out_dir: Path, device: str, quick: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device
    now = _dt.datetime.now()
    stem = f"{slug}_{now:%Y-%m-%d}" + ("_quick" if quick else "")
    path = out_dir / f"{stem}.json"
    if path.exists():
        path = out_dir / f"{stem}_{now:%H%M%S}.json"
    i = 2
    while path.exists():
        path = out_dir / f"{stem}_{now:%H%M%S}_{i}.json"
        i += 1
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
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
    bandwidth = {"gbs": args.peak_gbs, "source": "--peak-gbs" if args.peak_gbs else None}
    if args.peak_gbs is None and args.device == "cpu":
        mib = 64 if args.quick else 512
        pages = measure_bandwidth_gbs(mib=mib)
        huge = measure_bandwidth_gbs(mib=mib, hugepages=True) if memory.status() is None else None
        args.peak_gbs = max(pages, huge or 0.0)
        bandwidth = {"gbs": args.peak_gbs, "gbs_4k_pages": pages, "gbs_huge_pages": huge,
                     "source": f"measured: median torch.sum over {mib} MiB float32, "
                               f"{torch.get_num_threads()} threads, at the start of this run, "
                               "the larger of PyTorch's pages and huge pages (pyfast/memory.py)"}
        print(f"memory bandwidth (read, measured now): {args.peak_gbs:.1f} GB/s (PyTorch's "
              f"pages {pages:.1f}, huge pages {'n/a' if huge is None else f'{huge:.1f}'})")
    print(header(half_name, bool(args.peak_gbs)), flush=True)
    rows, skipped, rotation = sweep(args, lambda line: print(line, flush=True))
    if skipped:
        print("\nnot timed:")
        for s in {(s["op"], s["backend"], s["reason"]): s for s in skipped}.values():
            print(f"  {s['op']} / {s['backend']}: {s['reason']}")
    elapsed = time.perf_counter() - started
    failed = [r for r in rows if r["check"] in FAILED]
    result = {
        "machine": machine,
        "command": " ".join(["python -m bench.run", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "half_dtype": half_name,
        "float32_matmul_precision": args.float32_matmul_precision,
        "rotation": rotation,
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
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "load_average_before": load_before,      # 1/5/15-min; > 0 = other work on the machine
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = result_path(args.out, args.device, args.quick)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; {len(failed)} failed checks; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
