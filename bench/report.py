"""`python -m bench.report FILE.json`: a result file as a Markdown table for the README.

    python -m bench.report bench/results/amd-epyc-..._2026-11-23.json --shape 4096x11008

The README's performance numbers are pasted from this output, so each one can be
traced to a committed result file. One row per op and backend of one layer shape,
one column per M: the median time and the speedups over F.linear in fp32 and in
bf16 (CPU) / fp16 (GPU), measured in the same run. `*` marks the default backend.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional


def _label(r: dict) -> str:
    if r["op"] == "torch._int_mm":   # two baselines differ only by the weight's layout
        return "torch (b [K,N] view of w)" if "view" in (r.get("note") or "") else "torch (b [K,N] contiguous)"
    return r["backend"] + (" *" if r.get("default") else "")


def table(result: dict, k: int, n: int) -> List[str]:
    """One row per (op, backend, dtype), one column per M: 'median ms (speedup)'.

    Speedups are over F.linear in fp32 (xF32) and in bf16 on CPU / fp16 on GPU
    (xHalf), both measured on the same shape in the same run.
    """
    rows = [r for r in result["rows"] if r["K"] == k and r["N"] == n and r["median_ms"]]
    ms_list = sorted({r["M"] for r in rows})
    half = "fp16" if result.get("machine", {}).get("gpu_name") else "bf16"
    cells: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["op"], _label(r), r["dtype"]), {})[r["M"]] = r
    lines = ["| op | backend | dtype | " + " | ".join(f"M={m}: ms (x fp32, x {half})" for m in ms_list) + " |",
             "|---|---|---|" + "---:|" * len(ms_list)]
    order = {"F.linear": 0, "torch._int_mm": 1}
    for (op, label, dtype), by_m in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0])):
        vals = []
        for m in ms_list:
            r = by_m.get(m)
            if r is None:
                vals.append("-")
            elif op == "quantize_per_token":   # not a matmul: a speedup over F.linear means nothing
                vals.append(f"{r['median_ms']:.3g}")
            else:
                vals.append(f"{r['median_ms']:.3g} ({_x(r['speedup_vs_f32_linear'])}, "
                            f"{_x(r['speedup_vs_half_linear'])})")
        lines.append(f"| {op} | {label} | {dtype} | " + " | ".join(vals) + " |")
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
