"""The digits task used by the demo and the workflow tests: data, a small CNN, training.

scikit-learn ships the UCI handwritten digits (1797 images of 8x8 pixels, 10
classes) inside its package, so nothing is downloaded. `load_digits` returns a
fixed, stratified train/test split as float tensors in [0, 1], shaped
[N, 1, 8, 8] for the CNN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn

from . import _progress

Tensor = torch.Tensor


@dataclass(frozen=True)
class Digits:
    x_train: Tensor   # float32 [N_train, 1, 8, 8], pixel / 16
    y_train: Tensor   # int64 [N_train], 0..9
    x_test: Tensor
    y_test: Tensor

    def batches(self, batch_size: int = 64, *, seed: int = 0,
                train: bool = True) -> Iterator[Tuple[Tensor, Tensor]]:
        """One epoch of (x, y) mini-batches, shuffled by `seed` (train) or in order (test)."""
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        order = (torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
                 if train else torch.arange(len(x)))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """The digits data set, split per class so both halves keep the class balance."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as exc:  # pragma: no cover - the test and demo extras install it
        raise ImportError("the digits data comes with scikit-learn: pip install scikit-learn "
                          "(or pip install 'pyfast[demo]')") from exc
    raw = sk_load()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return Digits(x[tr], y[tr], x[te], y[te])


class DigitsCNN(nn.Sequential):
    """conv-bn-relu x2, max-pool, flatten, fc-relu, fc. `width` scales every layer.

    With width 32: 1 -> 32 -> 64 channels at 8x8, pooled to 4x4, then
    1024 -> 128 -> 10 (about 150k parameters, 0.6 MiB in fp32).
    """

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"width must be a positive int, got {width!r}")
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 16, 4 * width), nn.ReLU(),
            nn.Linear(4 * width, classes),
        )


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of correct top-1 predictions, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train(model: nn.Module, data: Digits, *, epochs: int = 10, lr: float = 3e-3,
          batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0,
          extra_loss: Optional[Callable[[nn.Module], Tensor]] = None,
          after_step: Optional[Callable[[nn.Module], None]] = None,
          progress: Optional[bool] = None, desc: str = "train") -> nn.Module:
    """Adam + cross-entropy on the training split; returns the model (in eval mode).

    extra_loss(model) is added to each batch's loss (e.g. an L1 or slimming
    penalty); after_step(model) runs after each optimizer step.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                           weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = _progress.bar(range(epochs), desc=desc, progress=progress)
    for epoch in bar:
        total = 0.0
        for xb, yb in data.batches(batch_size, seed=seed + epoch):
            loss = loss_fn(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            total += float(loss.detach()) * len(xb)
        sched.step()
        bar.set_postfix(loss=f"{total / len(data.x_train):.3f}")
    return model.eval()
