"""Kernel-latency demo: compress a small transformer-style MLP and compare it with fp32.

    python -m pyfast mlp             # built-in defaults
    python -m pyfast mlp --dim 1024 --blocks 2 --tokens 128

Builds the model in code (seeded, no download), makes one copy per format
(W8A8 int8, int8 weight-only, int4 group 128, 2:4 sparse), prints pyfast.summary
for each, then a table of size, output error against fp32 and latency. Latencies
are medians of rounds that run every variant back to back, so the ratios come
from the same moments of a noisy machine; they are a demo, not a benchmark
(bench/ is the benchmark).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn

import pyfast


class Block(nn.Module):
    """Pre-norm MLP block of a transformer: x + W2 gelu(W1 norm(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build_model(dim: int, blocks: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(dim, 4 * dim) for _ in range(blocks)]).eval()


VARIANTS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "fp32": lambda m: m,
    "int8 W8A8": lambda m: pyfast.quantize(m, "int8"),
    "int8 weight-only": lambda m: pyfast.quantize(m, "int8-weight"),
    "int4 g128": lambda m: pyfast.quantize(m, "int4", group_size=128),
    "2:4 sparse": lambda m: pyfast.sparsify(m, "2:4"),
}


def count(option: str, minimum: int = 1):
    """argparse type: an integer >= minimum, else an error naming the option and value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: expected an integer >= {minimum}")
        return value
    return parse


def median_ms(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int) -> Dict[str, float]:
    """Median ms per call of each model on x over `rounds` (>= 1) rounds, after a warm-up."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1 timing round")
    times: Dict[str, List[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter_ns()
                m(x)
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyfast mlp", description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=count("--dim"), default=512,
                   help="model width (hidden = 4 x dim; default 512)")
    p.add_argument("--blocks", type=count("--blocks"), default=4, help="MLP blocks (default 4)")
    p.add_argument("--tokens", type=count("--tokens"), default=64,
                   help="rows of the input batch (M; default 64)")
    p.add_argument("--rounds", type=count("--rounds"), default=15,
                   help="timing rounds (median; default 15)")
    args = p.parse_args(argv)

    base = build_model(args.dim, args.blocks)
    x = torch.randn(args.tokens, args.dim)
    print(f"model: {args.blocks} MLP blocks, dim {args.dim}, hidden {4 * args.dim}; "
          f"input [{args.tokens}, {args.dim}] float32; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(pyfast.backends(), "\n")

    models = {name: make(copy.deepcopy(base)) for name, make in VARIANTS.items()}
    for name in ("int8 W8A8", "int4 g128", "2:4 sparse"):
        print(f"== {name}")
        pyfast.summary(models[name])
        print()

    with torch.inference_mode():
        ref = base(x)
    ms = median_ms(models, x, args.rounds)
    print(f"{'variant':<18}{'linear bytes':>14}{'smaller':>9}{'rel. error':>12}"
          f"{'latency ms':>12}{'vs fp32':>9}")
    for name, m in models.items():
        s = pyfast.summary(m, print_table=False)
        with torch.inference_mode():
            err = float((m(x) - ref).norm() / ref.norm())
        print(f"{name:<18}{s.total_after / 2**20:>12.2f}Mi{s.total_before / s.total_after:>8.2f}x"
              f"{err:>12.2e}{ms[name]:>12.2f}{ms['fp32'] / ms[name]:>8.2f}x")
    print("\nvs fp32 > 1 means faster. Backends used are the defaults above; "
          "`python -m bench.run` measures each op and backend on LLM shapes.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
