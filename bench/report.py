"""`python -m bench.report FILE.json`: a result file as a Markdown table for the README.

    python -m bench.report bench/results/amd-epyc-..._2026-11-23.json --shape 4096x11008
    python -m bench.report FILE.json --no-reference     # as the README's tables

The README's performance numbers are pasted from this output, so each one can be
traced to a committed result file. One row per op and backend of one layer shape,
one column per M: the median time and the speedups over F.linear in fp32 and in
the run's half dtype (bf16 on CPU / fp16 on GPU: the file's half_dtype), measured in
the same run. `*` marks the default backend. A row that failed its check against the
reference shows MISMATCH or ERROR instead of a time, a note under the table counts
them, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .shapes import parse_shape

HALF_LABEL = {"f16": "fp16", "bf16": "bf16"}
DEFAULT_SHAPE = (4096, 4096)


def _label(r: dict) -> str:
    if r["op"] == "torch._int_mm":   # two baselines differ only by the weight's layout
        return "torch (b [K,N] view of w)" if "view" in (r.get("note") or "") else "torch (b [K,N] contiguous)"
    return r["backend"] + (" *" if r.get("default") else "")


def checked(r: dict) -> bool:
    """The row's output matched the reference (files without a check field: every row did)."""
    return r.get("check", "ok") == "ok"


def half_label(result: dict) -> str:
    """fp16 or bf16: the run's half_dtype; files without it, from the machine's GPU."""
    return HALF_LABEL.get(result.get("half_dtype")) or (
        "fp16" if result.get("machine", {}).get("gpu_name") else "bf16")


def table(result: dict, k: int, n: int, reference: bool = True) -> List[str]:
    """One row per (op, backend, dtype), one column per M: 'median ms (speedup)'.

    Speedups are over F.linear in fp32 (xF32) and in the run's half dtype (xHalf), both
    measured on the same shape in the same run. A row that failed its check shows its
    status (MISMATCH, ERROR) and no number; a note under the table counts them.
    reference=False leaves out the reference backend's rows (the oracle, not a fast path).
    """
    rows = [r for r in result["rows"] if r["K"] == k and r["N"] == n
            and (r.get("median_ms") or not checked(r))
            and (reference or r["backend"] != "reference")]
    ms_list = sorted({r["M"] for r in rows})
    half = half_label(result)
    cells: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["op"], _label(r), r["dtype"]), {})[r["M"]] = r
    lines = ["| op | backend | dtype | " + " | ".join(f"M={m}: ms (x fp32, x {half})" for m in ms_list) + " |",
             "|---|---|---|" + "---:|" * len(ms_list)]
    order = {"F.linear": 0, "torch._int_mm": 1}
    failed = 0
    for (op, label, dtype), by_m in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0])):
        vals = []
        for m in ms_list:
            r = by_m.get(m)
            if r is None:
                vals.append("-")
            elif not checked(r):               # not a verified number: no number at all
                failed += 1
                vals.append(f"**{r['check']}**")
            elif op == "quantize_per_token":   # not a matmul: a speedup over F.linear means nothing
                vals.append(f"{r['median_ms']:.3g}")
            else:
                vals.append(f"{r['median_ms']:.3g} ({_x(r['speedup_vs_f32_linear'])}, "
                            f"{_x(r['speedup_vs_half_linear'])})")
        lines.append(f"| {op} | {label} | {dtype} | " + " | ".join(vals) + " |")
    if failed:
        lines += ["", f"{failed} of these cells failed their check against the reference "
                      "(MISMATCH: wrong output; ERROR: the call raised): no time is shown for them."]
    return lines


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def shapes_in(result: dict) -> List[Tuple[int, int]]:
    """The (K, N) layer shapes of the file's rows, in the order the run swept them."""
    return list(dict.fromkeys((r["K"], r["N"]) for r in result["rows"]))


def load(p: argparse.ArgumentParser, path: Path) -> dict:
    """The result file, or p.error saying what is wrong with it."""
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        p.error(f"{path}: cannot read it ({exc.strerror or exc})")
    except ValueError as exc:
        p.error(f"{path}: not a JSON file ({exc})")
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        p.error(f"{path}: not a bench.run result file (no 'rows' list)")
    if not result["rows"]:
        p.error(f"{path}: the file has no rows")
    return result


def choose_shape(p: argparse.ArgumentParser, result: dict, shape: Optional[Tuple[int, int]],
                 path: Path) -> Tuple[int, int]:
    """--shape if the file has it; without --shape, 4096x4096 if the file has it, else
    the file's only shape; else p.error naming the shapes the file holds."""
    shapes = shapes_in(result)
    held = ", ".join(f"{k}x{n}" for k, n in shapes)
    if shape is None:
        if DEFAULT_SHAPE in shapes or len(shapes) == 1:
            return DEFAULT_SHAPE if DEFAULT_SHAPE in shapes else shapes[0]
        p.error(f"{path.name} holds several shapes and not 4096x4096: give --shape, one of {held}")
    if shape not in shapes:
        p.error(f"--shape {shape[0]}x{shape[1]}: not in {path.name}; it has {held}")
    return shape


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--shape", type=parse_shape, default=None,
                   help="layer as KxN (default: 4096x4096 if the file has it, else the file's "
                        "only shape)")
    return p


def main(argv=None) -> int:
    p = parser("python -m bench.report", __doc__)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="leave out the reference backend's rows (the oracle, not a fast path), "
                        "as the README's tables do")
    args = p.parse_args(argv)
    result = load(p, args.file)
    k, n = choose_shape(p, result, args.shape, args.file)
    lines = table(result, k, n, reference=args.reference)
    if len(lines) == 2:
        p.error(f"{args.file.name}: no row of {k}x{n} to show")
    print("\n".join(lines))
    return 1 if any(not checked(r) for r in result["rows"] if (r["K"], r["N"]) == (k, n)
                    and (args.reference or r["backend"] != "reference")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
