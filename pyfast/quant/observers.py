"""Range observers for calibrated (static) int8 activations.

An observer watches the values a layer receives over a few calibration batches and
then gives ONE symmetric int8 scale for them: a float32 tensor [1] equal to
threshold / 127, threshold > 0, the `scale` argument of the quantize_static op
(pyfast/formats.py, "int8 static activations": values beyond 127 * scale clip).
The observers differ only in how they choose the clipping threshold:

    "minmax"          max |x| over every batch: nothing clips, outliers stretch the step
    "moving_average"  exponential moving average of each batch's max |x| (momentum)
    "percentile"      the given percentile of |x| (default 99.99): rare outliers clip
    "mse"             the threshold that minimises the expected quantization MSE of the
                      observed |x| distribution (histogram search in the spirit of
                      TensorRT's calibration, Migacz 2017, "8-bit Inference with TensorRT",
                      with MSE in place of KL divergence; cf. Banner et al. 2019, "ACIQ")

Only finite values are observed: NaN and +-inf are counted (`nonfinite`) and left
out of the range, so one bad value cannot make the scale NaN or infinite. Exact zeros
(ReLU outputs, padding) are counted apart: they quantize without error. Observers are
plain objects (not nn.Modules), so they never enter a model's state_dict.
"""
from __future__ import annotations

import abc
import math
from typing import Dict, Optional, Type, Union

import torch

Tensor = torch.Tensor
QMAX = 127.0


class Observer(abc.ABC):
    """Base: `observe(x)` per batch, then `scale()` -> float32 tensor [1]."""

    name = ""

    def __init__(self) -> None:
        self.batches = 0        # observe() calls
        self.count = 0          # finite values seen
        self.zeros = 0          # of which exactly zero
        self.nonfinite = 0      # NaN / inf values left out

    def observe(self, x: Tensor) -> None:
        """Record one batch of values (any shape, any float dtype; gradients ignored)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x has dtype {x.dtype}; accepted: a floating-point tensor")
        a = x.detach().float().abs().flatten()
        finite = torch.isfinite(a)
        n_finite = int(finite.sum())
        self.batches += 1
        self.nonfinite += a.numel() - n_finite
        if n_finite < a.numel():
            a = a[finite]
        nonzero = a[a > 0]
        self.count += n_finite
        self.zeros += n_finite - nonzero.numel()
        if n_finite:
            self._update(nonzero, float(a.max()))

    @abc.abstractmethod
    def _update(self, nonzero: Tensor, amax: float) -> None:
        """nonzero: the batch's finite nonzero |x| (1-D float32); amax: their max (or 0)."""

    def threshold(self) -> float:
        """The clipping threshold, > 0 and finite (ValueError otherwise)."""
        if self.batches == 0:
            raise ValueError(f"{type(self).__name__} has observed no data: calibrate first "
                             "(run pyfast.quant.calibrate(model, batches) or call observe(x))")
        if self.count == self.zeros:
            what = ("no values (empty batches)" if self.count == 0 and self.nonfinite == 0 else
                    f"only NaN/inf values ({self.nonfinite})" if self.count == 0 else
                    f"only zeros ({self.zeros} zeros, {self.nonfinite} NaN/inf)")
            raise ValueError(f"{type(self).__name__} observed {what} over {self.batches} "
                             "batch(es): no positive range, so no int8 scale can be chosen; "
                             "calibrate on representative data")
        t = self._threshold()
        if not (t > 0 and math.isfinite(t)):  # pragma: no cover - guarded by the checks above
            raise ValueError(f"{type(self).__name__} computed threshold {t}; expected a "
                             "positive finite number")
        return t

    @abc.abstractmethod
    def _threshold(self) -> float:
        """The observer's rule; called only once data with a positive range was seen."""

    def scale(self) -> Tensor:
        """threshold / 127 as float32 [1] (the quantize_static scale)."""
        t = self.threshold()
        s = torch.tensor([t / QMAX], dtype=torch.float32)
        if not (float(s) > 0 and math.isfinite(float(s))):
            raise ValueError(f"{type(self).__name__}: threshold {t} gives scale {float(s)} in "
                             "float32; the observed range is outside what float32 can scale")
        return s

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batches={self.batches}, values={self.count}, "
                f"zeros={self.zeros}, nonfinite={self.nonfinite})")


class MinMaxObserver(Observer):
    """threshold = running max |x| over all batches (no clipping)."""

    name = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self.amax = 0.0

    def _update(self, nonzero: Tensor, amax: float) -> None:
        self.amax = max(self.amax, amax)

    def _threshold(self) -> float:
        return self.amax


class MovingAverageObserver(Observer):
    """threshold = EMA of the per-batch max |x|: ema <- (1 - momentum) * ema + momentum * max
    (the first batch initialises it), as torch.ao's MovingAverageMinMaxObserver."""

    name = "moving_average"

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.ema: Optional[float] = None

    def _update(self, nonzero: Tensor, amax: float) -> None:
        if self.ema is None:
            self.ema = amax
        else:
            self.ema = (1.0 - self.momentum) * self.ema + self.momentum * amax

    def _threshold(self) -> float:
        return float(self.ema or 0.0)


class HistogramObserver(Observer):
    """Keeps a histogram of the nonzero |x| with `bins` equal bins on [0, top].

    Memory is bounded (bins float64 counts, independent of the data size). `top` starts
    at the first batch's max and doubles whenever a batch exceeds it; each doubling
    merges adjacent pairs of bins, which is exact (no value changes bin), so the
    resolution is top / bins with top < 2 * max |x|. The histogram stays on the CPU
    whatever the device of the observed data (each batch is counted on its own device).
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 64 or bins % 2:
            raise ValueError(f"bins must be an even int >= 64, got {bins!r}")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.top = 0.0
        self.amax = 0.0

    def _update(self, nonzero: Tensor, amax: float) -> None:
        if nonzero.numel() == 0:
            return
        self.amax = max(self.amax, amax)
        if self.top == 0.0:
            self.top = amax
        while amax > self.top:
            self.hist = self.hist.reshape(-1, 2).sum(dim=1)
            self.hist = torch.cat([self.hist, torch.zeros_like(self.hist)])
            self.top *= 2.0
        idx = (nonzero.double() * (self.bins / self.top)).long().clamp_(max=self.bins - 1)
        # counted where the data are (e.g. CUDA), added to the histogram where it is (CPU)
        self.hist += torch.bincount(idx, minlength=self.bins).to(self.hist)

    def edges(self) -> Tensor:
        """float64 [bins + 1] bin edges on [0, top]."""
        return torch.linspace(0.0, self.top, self.bins + 1, dtype=torch.float64)


class PercentileObserver(HistogramObserver):
    """threshold = the `percentile` of |x| over all observed values (zeros included),
    read from the histogram with linear interpolation inside the bin (error below one
    bin width, top / bins). Zeros form a point mass at 0; if the percentile falls among
    them, the threshold is the top of the first nonempty bin (a scale cannot be 0).
    Memory: the histogram (bins counts), not the values."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _threshold(self) -> float:
        target = self.percentile / 100.0 * self.count - self.zeros
        if target <= 0:   # the percentile falls in the zeros; a zero scale is not allowed,
            first = int((self.hist > 0).nonzero()[0])   # so: the first nonempty bin's top
            return min((first + 1) * self.top / self.bins, self.amax)
        cdf = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item())
        i = min(i, self.bins - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - before) / max(float(self.hist[i]), 1e-300)
        width = self.top / self.bins
        t = (i + min(max(frac, 0.0), 1.0)) * width
        return min(t, self.amax) if t > 0 else min(width, self.amax)


class MSEObserver(HistogramObserver):
    """threshold = argmin over candidate thresholds t of the expected squared error of
    symmetric int8 quantization with step s = t / 127 of the histogrammed |x|, each bin's
    values taken as uniform on the bin [a, b] (width w = b - a):

        bins below t:  count * (F(b) - F(a)) / w     (rounding to the grid 0, s, 2s, ...)
        bins above t:  count * ((center - t)^2 + w^2 / 12)           (clipping to t)

    with F(x) = integral from 0 to x of (u - s * round(u / s))^2 du = n s^3 / 12 + r^3 / 3
    (x = n s + r, n = round(x / s)). That is s^2 / 12 for a bin spanning whole steps, but
    x^2 for values below s / 2, which round to 0: a bulk of small values next to a few
    outliers costs little at a coarse step, so the outliers are not clipped for its sake
    (a flat s^2 / 12 per value overestimated that cost many times over).
    Exact zeros add no error. Candidates are the upper edges of bins 1..bins (from
    top / bins to top), all evaluated at once: O(bins^2) work once at scale() time.
    """

    name = "mse"

    def _threshold(self) -> float:
        edges = self.edges()
        width = self.top / self.bins
        lo, hi = edges[None, :-1], edges[None, 1:]                   # [1, B]
        cand = edges[1:, None]                                       # [C, 1]
        step = cand / QMAX

        def rounding_integral(x: Tensor) -> Tensor:                  # F(x) above, [C, B]
            n = torch.round(x / step)
            r = x - n * step
            return n * step ** 3 / 12 + r ** 3 / 3

        rounding = (rounding_integral(hi) - rounding_integral(lo)) / width
        clipping = ((lo + hi) / 2 - cand) ** 2 + width ** 2 / 12
        err = torch.where(hi > cand, clipping, rounding)             # bins wholly above t clip
        mse = (err * self.hist[None, :]).sum(dim=1)
        best = int(torch.argmin(mse))
        return min(float(cand[best]), self.amax)


OBSERVERS: Dict[str, Type[Observer]] = {
    c.name: c for c in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver)}


def make_observer(observer: Union[str, Type[Observer]] = "minmax", **kwargs) -> Observer:
    """A fresh observer from its name ("minmax", "moving_average", "percentile", "mse")
    or an Observer subclass; kwargs go to its constructor (momentum=, percentile=, bins=)."""
    if isinstance(observer, type) and issubclass(observer, Observer):
        cls = observer
    elif isinstance(observer, str) and observer in OBSERVERS:
        cls = OBSERVERS[observer]
    else:
        raise ValueError(f"observer {observer!r} is not supported; accepted: "
                         f"{', '.join(OBSERVERS)} (or an Observer subclass)")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"observer {cls.name or cls.__name__!r} does not take arguments "
                        f"{sorted(kwargs)}: {exc}") from exc


__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver",
           "MSEObserver", "HistogramObserver", "OBSERVERS", "make_observer"]
