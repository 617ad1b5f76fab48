"""`python -m bench.plot FILE.json [--shape KxN] [--out docs/NAME.png]`: speedup over fp32
F.linear for every row of one layer shape, one line per op/backend, M on the x axis.

Made from a committed result file only (the README's plot is this command's output).
Rows that failed their check against the reference are left out (the command says how
many, and exits 1). Needs matplotlib (pip install matplotlib, or the `bench` extra).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .report import _label, checked, choose_shape, load, parser

NO_MATPLOTLIB = ("bench.plot needs matplotlib, which is not installed here: "
                 "pip install matplotlib (or pip install '.[bench]')")


def series(result: dict, k: int, n: int) -> dict:
    """{"op [backend] dtype": [(M, speedup over fp32 F.linear), ...] sorted by M};
    reference rows are left out (they are the oracle, not a fast path), and so are rows
    that failed their check (not a verified number)."""
    rows = [r for r in result["rows"] if r["K"] == k and r["N"] == n and r["median_ms"]
            and r["op"] != "quantize_per_token" and r.get("speedup_vs_f32_linear")
            and r["backend"] != "reference"       # the oracle, not a fast path
            and checked(r)]
    out: dict = {}
    for r in rows:
        out.setdefault(f"{r['op']} [{_label(r)}] {r['dtype']}", []).append(
            (r["M"], r["speedup_vs_f32_linear"]))
    return {name: sorted(pts) for name, pts in out.items()}


def plot(result: dict, k: int, n: int, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, pts in sorted(series(result, k, n).items()):
        pyfast_row = not name.startswith(("F.linear", "torch", "quantize_dynamic",
                                          "torchao"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if pyfast_row else "--", linewidth=2 if pyfast_row else 1,
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("M (tokens per call)")
    ax.set_ylabel("speedup over fp32 F.linear (same run)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = parser("python -m bench.plot", __doc__)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default docs/<file stem>_<shape>.png)")
    args = p.parse_args(argv)
    result = load(p, args.file)
    k, n = choose_shape(p, result, args.shape, args.file)
    if not series(result, k, n):
        p.error(f"{args.file.name}: no row of {k}x{n} to plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return 1
    out = args.out or Path("docs") / f"{args.file.stem}_{k}x{n}.png"
    machine = result.get("machine", {})
    title = (f"{machine.get('device_name', '?')}, {machine.get('torch_threads', '?')} threads, "
             f"K={k} N={n} ({args.file.name})")
    plot(result, k, n, out, title)
    print(f"wrote {out}")
    failed = [r for r in result["rows"] if (r["K"], r["N"]) == (k, n) and not checked(r)]
    if failed:
        print(f"left out {len(failed)} rows that failed their check against the reference "
              f"({', '.join(sorted({r['check'] for r in failed}))})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
