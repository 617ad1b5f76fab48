"""The layer shapes the benchmark sweeps: Llama-7B-class linears, as (K, N) = (in, out).

    4096 x 4096    attention projections q/k/v/o
    4096 x 11008   MLP gate/up projections
    11008 x 4096   MLP down projection
M is the number of tokens in the batch: 1 (decode, one sequence), 16 (batched
decode), 128 and 1024 (prefill). Weight-only kernels win at small M, where the
op streams the weight from memory; at large M the op is compute-bound.
"""
from __future__ import annotations

import argparse
from typing import List, Tuple

LLM_MS: Tuple[int, ...] = (1, 16, 128, 1024)
LLM_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096))

# --quick: one small layer, a decode M (exercises weight rotation) and an M > 16
# (torch._int_mm on CUDA rejects M <= 16). K is a multiple of 128 (int4 groups),
# of 4 (2:4 groups) and of 8 (_int_mm).
QUICK_MS: Tuple[int, ...] = (1, 32)
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((512, 256),)

INT4_GROUP_SIZE = 128


def parse_ms(text: str) -> List[int]:
    """'1,16,128' -> [1, 16, 128] (a repeated M is kept once, in its first place)."""
    try:
        ms = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        ms = []
    if not ms or any(m < 1 for m in ms):
        raise argparse.ArgumentTypeError(f"--m {text!r}: expected positive integers separated by commas, e.g. 1,16")
    return list(dict.fromkeys(ms))


def parse_shape(text: str, option: str = "") -> Tuple[int, int]:
    """'4096x11008' -> (4096, 11008) (K x N, both >= 1); the argparse type of one shape
    (argparse names the option; `option` prefixes the message where it does not)."""
    k, sep, n = text.strip().lower().partition("x")
    if not sep or not k.isdigit() or not n.isdigit() or int(k) < 1 or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{option + ': ' if option else ''}{text.strip()!r} is "
                                         "not KxN with K, N >= 1 (e.g. 4096x11008)")
    return int(k), int(n)


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)]  (K x N; a repeated shape is
    kept once). Shapes that some torch baseline cannot take (e.g. N not a multiple of 16
    for _weight_int4pack_mm_for_cpu) are accepted: that baseline is skipped, saying why."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, n = parse_shape(part, "--shapes")
        if k % INT4_GROUP_SIZE or n % 8:
            raise argparse.ArgumentTypeError(f"--shapes: {part!r}: K must be a multiple of {INT4_GROUP_SIZE} "
                             "(int4 groups) and N a multiple of 8")
        shapes.append((k, n))
    if not shapes:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: no shape given")
    return list(dict.fromkeys(shapes))
