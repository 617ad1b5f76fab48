"""2:4 masks: which weights magnitude pruning keeps, and whether a mask is 2:4."""
from __future__ import annotations

import torch

from . import _checks as chk


def magnitude_24_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool mask [N, K] keeping the 2 largest |w| of every group of 4 along K.

    Ties go to the lower index (a stable descending sort), so the mask is the same on
    every device and run: a group of four equal |w| keeps positions 0 and 1.
    """
    chk.tensor("w", w, dim=2)
    chk.multiple_of_4("w.shape[1] (K)", w.shape[1])
    n, k = w.shape
    g = w.detach().abs().float().reshape(n, k // 4, 4)
    idx = g.argsort(dim=2, descending=True, stable=True)[:, :, :2]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(n, k)


def is_24(mask_or_weight: torch.Tensor) -> bool:
    """True if every group of 4 along the last dim has at most 2 nonzeros."""
    t = mask_or_weight
    if t.dim() != 2 or t.shape[1] % 4:
        return False
    return not bool(((t != 0).reshape(t.shape[0], -1, 4).sum(dim=2) > 2).any())
