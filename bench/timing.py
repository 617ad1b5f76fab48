"""How benchmark rows are timed: warm-up, an adaptive number of repetitions, median.

The rows of one cell (one M and layer shape) are timed interleaved (measure_interleaved):
in each of ROUNDS rounds every row runs one short burst of calls in turn, so a change in
the shared machine's speed during the cell (other tenants, memory bandwidth, clocks) hits
every row alike and the ratios between rows -- the numbers the README quotes -- stay
comparable. The result files up to amd-epyc_2026-11-24_052431_bf16.json timed each row's
repetitions all at once; in bench/results/amd-epyc_2026-11-24_032444_bf16.json, for one,
the w8a8_mm_vnni row at M = 1 on 4096x11008 read its weight at 139% of the bandwidth
measured at the start of that run, so the machine's speed had moved between rows.

CPU: each call timed with time.perf_counter_ns.
GPU: a pair of CUDA events around each call, no synchronization between calls
(so back-to-back kernels are measured on the device, and host overhead shows only
where it is longer than the kernel, as it would in an eager model), one
synchronize at the end before reading the events. With Budget.cuda_graphs (bench.run
--cuda-graphs) each row's burst is captured once into a CUDA graph and a pair of
events times each replay: the device time of the kernels without the host's dispatch
and launch cost, as in a model served with CUDA graphs. A row whose calls cannot be
captured is timed per call as above, and its Timing.mode says why. (The first H100
run, bench/results/nvidia-h100_2026-11-24_201651.json, timed per call: at small M
some rows measured the host there.)

Weight rotation: a call gets a copy index i and uses weight copy i % copies.
With enough copies that together they exceed the last-level cache, a weight is
evicted before it is used again, as in a model that runs many layers in turn;
otherwise a small-M (weight-streaming) GEMV is timed from cache and looks
faster than it can be in a model.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

MIB = 1 << 20


@dataclass
class Budget:
    """How long to spend on one row."""
    min_reps: int = 3           # timed repetitions at least, however slow the call
    max_reps: int = 100         # and at most (CUDA graphs: see _bursts)
    max_seconds: float = 1.0    # per row: timed repetitions stop after about this long
                                # (>= min_reps); a cell of R rows takes about R times this
    warmup_seconds: float = 0.1  # warm-up calls after the first, up to max_warmup calls
    max_warmup: int = 10
    cuda_graphs: bool = False   # GPU: time CUDA-graph replays of each burst (module doc)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    first_output: Any           # output of the first call, on copy 0: what the row checks
    mode: str = "per call"      # or "CUDA graph", or why a graph was not used


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_once(call: Callable[[int], Any], i: int, device: str):
    _sync(device)
    t0 = time.perf_counter_ns()
    out = call(i)
    _sync(device)
    return out, (time.perf_counter_ns() - t0) / 1e9


@dataclass
class Row:
    """One row of a cell for measure_interleaved: call(i) uses weight copy i % copies; `context()`
    is entered around each call but outside its timing (e.g. a forced backend)."""
    call: Callable[[int], Any]
    context: Callable[[], Any]
    copies: int = 1             # weight copies call(i) rotates through (a graph covers all)


def _warm(row: Row, device: str, budget: Budget):
    """(first output, estimated seconds per call, next copy index).

    1. call(0): its output is kept for the correctness check; it may include one-time
       costs (JIT compilation, allocator growth), so its time is not used.
    2. Unless that call alone took longer than max_seconds, one more call estimates
       the time per call, then more warm-up calls up to warmup_seconds."""
    with row.context():
        first, t_first = _timed_once(row.call, 0, device)
        i, estimate = 1, t_first
        if t_first < budget.max_seconds:
            _, estimate = _timed_once(row.call, i, device)
            i += 1
            extra = min(budget.max_warmup, int(budget.warmup_seconds / max(estimate, 1e-9)))
            for _ in range(extra):
                row.call(i)
                i += 1
    return first, estimate, i


ROUNDS = 5  # bursts per row in measure_interleaved


def _capture(row: Row, start: int, calls: int):
    """A CUDA graph of `calls` calls of row (copies start, start + 1, ...), after three
    calls on a side stream (PyTorch's recipe for capture: libraries such as cuBLAS set
    up per-stream state on first use, which must not happen inside a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with row.context(), torch.cuda.stream(side):
        for i in range(3):
            row.call(start + i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with row.context(), torch.cuda.graph(graph):
        for i in range(calls):
            row.call(start + i)
    return graph


def _bursts(estimate: float, budget: Budget) -> List[int]:
    """Timed calls in each of the ROUNDS bursts of a row: about max_seconds in all, and
    in all between min_reps and max_reps exactly (the first rounds take one call more
    where the total does not divide by ROUNDS; with fewer calls than ROUNDS the last
    rounds have none). With CUDA graphs each burst is one replay of max(bursts) calls,
    at least one per weight copy, so there the total can exceed max_reps."""
    per_round = math.ceil(budget.max_seconds / ROUNDS / max(estimate, 1e-9))
    total = max(1, budget.min_reps, min(budget.max_reps, ROUNDS * per_round))
    return [total // ROUNDS + (r < total % ROUNDS) for r in range(ROUNDS)]


def measure_interleaved(rows: List[Row], device: str, budget: Budget) -> List[Any]:
    """Time every row of a cell in ROUNDS rounds of one burst per row (module doc).

    Each row is warmed up by _warm (its first output kept for the check). A burst is
    _bursts()[round] consecutive timed calls of one row (about max_seconds / ROUNDS), after
    one untimed call when the burst has more than one: the first call after another
    row can pay for what that row left in the caches and the thread pool, which a model
    running one format layer after layer does not. The row order rotates by one each
    round. A row
    whose call raises gets that exception in its place in the result and is dropped
    from later rounds; the others get a Timing (median over all their bursts).
    """
    results: List[Any] = [None] * len(rows)
    state = {}
    for j, row in enumerate(rows):
        try:
            state[j] = _warm(row, device, budget)
        except (RuntimeError, ValueError, TypeError) as exc:
            results[j] = exc
    order = list(state)
    if not order:                       # every row raised in its warm-up: nothing to time
        return results
    burst = {j: _bursts(state[j][1], budget) for j in order}
    nxt = {j: state[j][2] for j in order}            # next weight copy index of each row
    times = {j: [] for j in order}
    events = {j: [] for j in order}   # GPU: (begin, end, calls), read after one synchronize
    graphs, modes = {}, {j: "per call" for j in order}
    if device == "cuda" and budget.cuda_graphs:
        for j in order:
            try:
                # Every copy in each replay: a graph of fewer calls than copies would
                # replay a subset small enough to stay partly in cache.
                burst[j] = [max(max(burst[j]), rows[j].copies)] * ROUNDS
                graphs[j] = _capture(rows[j], nxt[j], burst[j][0])
                modes[j] = "CUDA graph"
            except (RuntimeError, ValueError, TypeError) as exc:  # timed per call instead
                torch.cuda.synchronize()
                modes[j] = f"per call (CUDA graph capture failed: {str(exc).splitlines()[0][:160]})"
    _sync(device)
    for r in range(ROUNDS):
        for j in order[r % len(order):] + order[:r % len(order)]:
            if isinstance(results[j], Exception):
                continue
            call, calls = rows[j].call, burst[j][r]
            if calls == 0:
                continue
            if j in graphs:
                begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                begin.record()
                graphs[j].replay()
                end.record()
                events[j].append((begin, end, burst[j][r]))
                continue
            try:
                with rows[j].context():
                    if calls > 1:
                        call(nxt[j])
                        nxt[j] += 1
                    for _ in range(calls):
                        if device == "cuda":
                            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                            begin.record()
                            call(nxt[j])
                            end.record()
                            events[j].append((begin, end, 1))
                        else:
                            t0 = time.perf_counter_ns()
                            call(nxt[j])
                            times[j].append((time.perf_counter_ns() - t0) / 1e9)
                        nxt[j] += 1
            except (RuntimeError, ValueError, TypeError) as exc:  # reported, not timed
                results[j] = exc
    if device == "cuda":
        torch.cuda.synchronize()
        times = {j: [b.elapsed_time(e) / 1e3 / n for b, e, n in events[j]] for j in order}
    for j in (j for j in order if not isinstance(results[j], Exception)):
        reps = sum(n for _, _, n in events[j]) if j in graphs else len(times[j])
        results[j] = Timing(statistics.median(times[j]) * 1e3, min(times[j]) * 1e3,
                            reps, state[j][0], modes[j])
    return results


# --- how many weight copies to rotate through ----------------------------------------

def last_level_cache_bytes(device: str) -> Optional[int]:
    """L2 of the GPU, or the largest CPU cache in sysfs (L3 on most machines)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                           "L2_cache_size", 0)) or None
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        try:
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = size if best is None else max(best, size)
    return best


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30  # no /proc/meminfo (not Linux): assume 8 GiB


def rotation_target_bytes(device: str, requested_mib: Optional[float]) -> int:
    """Total weight bytes to cycle through: the request, else 256 MiB, raised to 8x the
    last-level cache where that is larger.

    Why 8x and not 2x: a cache that is not strictly LRU keeps part of a cyclic stream
    even when the stream is twice its size. In bench/results/amd-epyc_2026-11-23.json
    (64 MiB rotation, 2x the 32 MiB victim L3 of that Zen 4 machine),
    quantize_dynamic's M = 1 row on 4096x4096 read its weight at 57.8 GB/s, against
    30.8 GB/s of measured bandwidth and 37.4 GB/s for the fastest pyfast row on the
    same weight bytes: part of it came from L3, which no layer of a real model gets."""
    if requested_mib is not None:
        return int(requested_mib * MIB)
    llc = last_level_cache_bytes(device) or 0
    return max(256 * MIB, 8 * llc)


# Copies of one format at most: beyond this, making the copies (and the CPU baselines'
# per-copy objects, bench/cpu_baselines.py) costs more time than it is worth. It reaches
# the 256 MiB target for copies of 64 KiB or more; rows below their rotation target are
# reported by bench.run (rotation.short_of_target in the result file).
MAX_COPIES = 4096


def copies_for(one_copy_bytes: int, target_bytes: int, memory_cap_bytes: int,
               max_copies: int = MAX_COPIES) -> int:
    """Copies so that copies * one_copy_bytes >= target, within the memory cap."""
    if target_bytes <= 0 or one_copy_bytes <= 0:
        return 1
    wanted = math.ceil(target_bytes / one_copy_bytes)
    affordable = max(1, memory_cap_bytes // one_copy_bytes)
    return max(1, min(wanted, affordable, max_copies))
