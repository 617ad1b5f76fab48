"""The main demo: every pyfast compression workflow on real data, side by side.

    python -m pyfast                     # built-in defaults (about a minute on 2 cores)
    python -m pyfast --only "int4 RTN g32;2:4 + fine-tune" --out /tmp/demo

On scikit-learn's bundled digits (8x8 images, no download) it trains a small CNN
teacher, applies each recipe of pyfast/demo_recipes.py to a copy, saves each
result with pyfast.save, reloads it into a skeleton built on the meta device
(checking the outputs are identical), and prints a table of test accuracy,
parameters, nonzero weights, file size and CPU latency, plus a PNG plot of
accuracy against file size. Latencies are medians of rounds that run every model
back to back on the same batch, so the ratios come from the same moments of a
noisy machine.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from typing import Dict

import torch
from torch import nn

import pyfast
from pyfast import demo_recipes
from pyfast.demo_mlp import count, median_ms
from pyfast.digits import DigitsCNN, accuracy, load_digits, train


def _params(model: nn.Module):
    """(weights+biases the layers stand for, of which nonzero), from pyfast.summary."""
    rows = pyfast.summary(model, print_table=False)
    total = sum(r.params for r in rows)
    return total, round(sum(r.params * (1.0 - r.sparsity) for r in rows))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _reload_matches(name: str, model: nn.Module, path: str, width: int, x: torch.Tensor) -> bool:
    with torch.device("meta"):
        skeleton = DigitsCNN(width=width)
    loaded = pyfast.load(skeleton, path).eval()
    with torch.inference_mode():
        return torch.equal(loaded(x), model(x))


def _plot(rows, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pyfast[demo]'): no plot"
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):   # numbered points + legend: many points coincide
        ax.scatter(r["kib"], 100 * r["acc"], s=40, color=colors[i % 20],
                   marker="osD^v<>"[i % 7], label=f"{i}: {r['name']}")
        ax.annotate(str(i), (r["kib"], 100 * r["acc"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, pyfast.save, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits CNN: accuracy vs size of each compressed model")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


EPILOG = """other commands:
  python -m pyfast mlp [--dim D --blocks B --tokens T --rounds R]
                        kernel-latency demo on a transformer-style MLP (mlp --help)
  python -m pyfast backends
                        print which backend runs each op on this machine

recipes (--only, separated by ';'):
""" + "\n".join(f"  {name}" for name in demo_recipes.RECIPES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyfast", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=count("--epochs", 0), default=12,
                   help="teacher training epochs (default 12)")
    p.add_argument("--finetune-epochs", type=count("--finetune-epochs", 0), default=3,
                   help="fine-tuning epochs after pruning, low-rank and QAT (default 3)")
    p.add_argument("--student-epochs", type=count("--student-epochs", 0), default=12,
                   help="half-width student training epochs (default 12)")
    p.add_argument("--only", default="", help="recipe names separated by ';' (default: all; "
                                              "the names are listed below)")
    p.add_argument("--out", default="demo-output", help="folder for the saved models and the plot")
    p.add_argument("--rounds", type=count("--rounds"), default=20,
                   help="latency rounds (median; default 20)")
    p.add_argument("--batch", type=count("--batch"), default=64,
                   help="latency batch size (default 64; at most the test set's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(";") if n.strip()] or list(demo_recipes.RECIPES)
    unknown = [n for n in names if n not in demo_recipes.RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; accepted: {list(demo_recipes.RECIPES)}")
    settings = demo_recipes.Settings(args.finetune_epochs, args.student_epochs, seed=args.seed,
                                     progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    data = load_digits(seed=args.seed)
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images of 8x8; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(args.seed)
    teacher = train(DigitsCNN(width=32), data, epochs=args.epochs, seed=args.seed,
                    progress=settings.progress, desc="teacher")
    models: Dict[str, nn.Module] = {"fp32 teacher": teacher}
    for name in names:
        print(f"-> {name}", flush=True)
        models[name] = demo_recipes.run(name, teacher, data, settings)

    x_lat = data.x_test[:args.batch]          # the test set may hold fewer than --batch
    batch = len(x_lat)
    if batch < args.batch:
        print(f"--batch {args.batch}: the test set has {batch} images; timing batches of {batch}")
    ms = median_ms(models, x_lat, args.rounds)
    rows = []
    for name, model in models.items():
        path = os.path.join(args.out, f"{_slug(name)}.safetensors")
        size = pyfast.save(model, path)
        width = 16 if "half-width" in name else 32
        total, nonzero = _params(model)
        rows.append(dict(name=name, acc=accuracy(model, data.x_test, data.y_test), params=total,
                         nonzero=nonzero, kib=size / 1024, ms=ms[name],
                         reload=_reload_matches(name, model, path, width, data.x_test)))
    base = rows[0]
    print(f"\n{'model':<28}{'test acc':>9}{'params':>9}{'nonzero':>9}{'file KiB':>10}"
          f"{'smaller':>9}{'ms/batch':>10}{'vs fp32':>9}  reload")
    for r in rows:
        print(f"{r['name']:<28}{100 * r['acc']:>8.2f}%{r['params']:>9,}{r['nonzero']:>9,}"
              f"{r['kib']:>10.1f}{base['kib'] / r['kib']:>8.2f}x{r['ms']:>10.2f}"
              f"{base['ms'] / r['ms']:>8.2f}x  {'ok' if r['reload'] else 'MISMATCH'}")
    print(f"\nbatch of {batch} images for latency (median of {args.rounds} rounds); "
          "params = weights and biases of the linear and conv layers; file = pyfast.save; "
          "reload = pyfast.load into a meta skeleton gives identical outputs.")
    print(_plot(rows, os.path.join(args.out, "accuracy_vs_size.png")))
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["reload"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
