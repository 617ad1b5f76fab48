"""`python -m bench.report FILE.json`: a result file as a Markdown table for the README.

    python -m bench.report bench/results/amd-epyc-..._2026-11-23.json --shape 4096x11008

The README's performance numbers are pasted from this output, so each one can be
traced to a committed result file. Rows: every op and backend of one layer shape
at every M, with the median time and the speedups over F.linear measured in the
same run (xF32: fp32; xHalf: bf16 on CPU, fp16 on GPU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional


def table(result: dict, k: int, n: int) -> List[str]:
    rows = [r for r in result["rows"] if r["K"] == k and r["N"] == n and r["median_ms"]]
    half = "fp16" if result.get("machine", {}).get("gpu_name") else "bf16"
    lines = [f"| op | backend | M | dtype | median ms | GB/s | x fp32 F.linear | x {half} F.linear |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["M"], r["op"] != "F.linear", r["op"], r["backend"])):
        backend = r["backend"] + (" (default)" if r.get("default") else "")
        lines.append(f"| {r['op']} | {backend} | {r['M']} | {r['dtype']} | {r['median_ms']:.3f} | "
                     f"{r['gbs']:.1f} | {_x(r['speedup_vs_f32_linear'])} | "
                     f"{_x(r['speedup_vs_half_linear'])} |")
    return lines


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--shape", default="4096x4096", help="layer as KxN")
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    result = json.loads(args.file.read_text())
    print("\n".join(table(result, k, n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
