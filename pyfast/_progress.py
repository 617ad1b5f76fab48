"""One progress bar for every pyfast workflow (calibration, training loops, demo).

A thin wrapper over tqdm so that all bars look the same, go to stderr, and can be
switched off with `progress=False` or the environment variable PYFAST_PROGRESS=0
(CI logs, tests).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from tqdm.auto import tqdm


def enabled(progress: Optional[bool] = None) -> bool:
    if progress is not None:
        return bool(progress)
    return os.environ.get("PYFAST_PROGRESS", "1") != "0"


def bar(iterable: Iterable = None, *, desc: str, total: Optional[int] = None,
        progress: Optional[bool] = None, leave: bool = False):
    """tqdm over `iterable`, or a disabled one (same interface) when progress is off."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled(progress), leave=leave,
                dynamic_ncols=True, mininterval=0.2)
