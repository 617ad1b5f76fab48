"""pyfast.quant observers: each threshold against an independent computation on a
known tensor, the histogram's bounded memory, and every error."""
import pytest
import torch

from pyfast.quant import (MinMaxObserver, MovingAverageObserver, MSEObserver, Observer,
                          PercentileObserver, make_observer)
from pyfast.quant.observers import OBSERVERS


def _batches():
    """Three batches whose range grows (so the histogram has to double its top), with a
    NaN and an inf that every observer must leave out."""
    g = torch.Generator().manual_seed(1)
    b1 = torch.randn(4000, generator=g) * 0.5
    b2 = torch.randn(8, 500, generator=g) * 3.0
    b3 = torch.randn(3000, generator=g)
    b3[7], b3[11] = float("nan"), float("inf")
    return [b1, b2, b3]


def _finite_abs(batches):
    a = torch.cat([b.flatten() for b in batches]).abs()
    return a[torch.isfinite(a)]


def _check_scale(obs, threshold):
    s = obs.scale()
    assert s.dtype == torch.float32 and s.shape == (1,)
    assert float(s) == pytest.approx(threshold / 127, rel=1e-6)


def test_minmax_is_the_max_of_finite_abs():
    obs = make_observer("minmax")
    for b in _batches():
        obs.observe(b)
    expected = float(_finite_abs(_batches()).max())
    assert obs.threshold() == expected
    _check_scale(obs, expected)
    assert obs.nonfinite == 2 and obs.batches == 3


def test_moving_average_matches_hand_ema():
    obs = make_observer("moving_average", momentum=0.25)
    ema = None
    for b in _batches():
        obs.observe(b)
        a = b.abs()
        m = float(a[torch.isfinite(a)].max())
        ema = m if ema is None else 0.75 * ema + 0.25 * m
    assert obs.threshold() == pytest.approx(ema, rel=1e-12)
    _check_scale(obs, ema)


@pytest.mark.parametrize("p", [50.0, 99.0, 99.99, 100.0])
def test_percentile_matches_torch_quantile_within_one_bin(p):
    obs = PercentileObserver(percentile=p, bins=1024)
    for b in _batches():
        obs.observe(b)
    a = _finite_abs(_batches())
    # the histogram knows each value to within one bin: the threshold lies between the
    # two order statistics around the percentile, widened by one bin width
    lo = float(torch.quantile(a.double(), p / 100, interpolation="lower"))
    hi = float(torch.quantile(a.double(), p / 100, interpolation="higher"))
    width = obs.top / obs.bins
    assert obs.top < 2 * float(a.max())               # doubled only as far as needed
    assert lo - width <= obs.threshold() <= hi + width
    assert obs.hist.numel() == 1024                     # bounded memory: bins, not values


def test_percentile_counts_zeros_as_mass_at_zero():
    x = torch.cat([torch.zeros(3000), torch.rand(1000) + 1.0])   # 75% zeros, rest in [1, 2)
    obs = PercentileObserver(percentile=90.0)
    obs.observe(x)
    expected = float(torch.quantile(x, 0.9))          # the 60% point of the nonzero part
    assert abs(obs.threshold() - expected) <= obs.top / obs.bins
    low = PercentileObserver(percentile=50.0)          # falls among the zeros: no zero scale
    low.observe(x)
    assert 0 < low.threshold() <= 1.0 + low.top / low.bins + 1e-6


def test_histogram_after_doublings_equals_one_histogram_of_all_data():
    obs = MSEObserver(bins=256)
    batches = _batches()
    for b in batches:
        obs.observe(b)
    a = _finite_abs(batches)
    ref = torch.histc(a[a > 0].double(), bins=256, min=0.0, max=obs.top)
    assert float(obs.hist.sum()) == float((a > 0).sum())
    assert float((obs.hist - ref).abs().sum()) <= 4     # float rounding at bin edges only


def _actual_mse(x, t):
    s = torch.tensor(t / 127, dtype=torch.float32)
    q = torch.clamp(torch.round(x / s), -127, 127)
    return float(((x - q * s) ** 2).mean())


@pytest.mark.parametrize("case", ["laplace", "gaussian+outliers"])
def test_mse_threshold_is_the_brute_force_optimum_and_clips_the_tail(case):
    g = torch.Generator().manual_seed(3)
    if case == "laplace":   # ACIQ (Banner et al. 2019): 8-bit optimum ~ 9.9 b, max ~ 11.5 b
        u = torch.rand(100_000, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        x = torch.randn(100_000, generator=g)
        x[:3] = torch.tensor([60.0, -55.0, 50.0])
    obs = MSEObserver()
    obs.observe(x[:50_000])
    obs.observe(x[50_000:])
    top = float(x.abs().max())
    grid = torch.linspace(0.2, top, 3000).tolist()
    best = min(_actual_mse(x, t) for t in grid)
    t = obs.threshold()
    assert t < 0.85 * top                               # the tail is clipped
    assert _actual_mse(x, t) <= 1.01 * best
    assert _actual_mse(x, t) < 0.8 * _actual_mse(x, top)    # better than min-max


def test_mse_keeps_the_full_range_of_uniform_data():
    x = torch.rand(50_000) * 2 - 1                      # no outliers: clipping only hurts
    obs = make_observer("mse")
    obs.observe(x)
    assert obs.threshold() >= 0.97 * float(x.abs().max())


def _mse_case(case, g):
    n = 60_000
    if case == "gaussian":
        return torch.randn(n, generator=g)
    if case == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if case == "student-t":                  # 3 degrees of freedom: heavy tails
        z = torch.randn(4, n, generator=g)
        return z[0] / (z[1:] ** 2).mean(0).sqrt()
    if case == "relu":
        return torch.relu(torch.randn(n, generator=g))
    x = torch.randn(n, generator=g) * (0.01 if case == "small-bulk+outliers" else 0.001)
    few = n // 200 if case == "small-bulk+outliers" else n // 2000
    x[:few] = torch.randn(few, generator=g) * (10.0 if case == "small-bulk+outliers" else 5.0)
    return x


@pytest.mark.parametrize("case", ["gaussian", "laplace", "student-t", "relu",
                                  "small-bulk+outliers", "mostly-tiny"])
def test_mse_threshold_is_near_the_optimum_and_never_worse_than_minmax(case):
    """The chosen threshold's real quantization MSE against a brute-force search. With a
    bulk of values far below one step and a few large outliers, values below half a step
    round to 0 with error x^2, far below step^2 / 12: clipping the outliers to refine the
    step is then a loss (a flat step^2 / 12 per value made the observer pick thresholds
    3x and 100x worse than the optimum, and worse than min-max)."""
    x = _mse_case(case, torch.Generator().manual_seed(5))
    obs = MSEObserver()
    obs.observe(x)
    top = float(x.abs().max())
    grid = torch.linspace(top / 1500, top, 1500).tolist()
    best = min(_actual_mse(x, t) for t in grid)
    got = _actual_mse(x, obs.threshold())
    assert got <= 1.03 * best, (got, best)
    assert got <= 1.01 * _actual_mse(x, top), (got, _actual_mse(x, top))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_histogram_stays_a_float64_cpu_tensor(dtype):
    """The batch is counted where it is and added to the float64 CPU histogram."""
    x = (torch.arange(-300, 301) / 100).to(dtype)
    obs = MSEObserver(bins=64)
    obs.observe(x)
    assert obs.hist.dtype == torch.float64 and obs.hist.device.type == "cpu"
    assert float(obs.hist.sum()) == 600                   # the one exact zero is counted apart


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_histogram_observers_take_cuda_batches(name):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    cpu, gpu = make_observer(name), make_observer(name)
    for b in (x[:5000], x[5000:] * 3):
        cpu.observe(b)
        gpu.observe(b.cuda())
    assert gpu.hist.device.type == "cpu" and torch.equal(gpu.hist, cpu.hist)
    assert gpu.threshold() == cpu.threshold()


def test_custom_observer_class_is_accepted():
    class Fixed(Observer):
        def _update(self, nonzero, amax):
            pass

        def _threshold(self):
            return 2.54

    obs = make_observer(Fixed)
    obs.observe(torch.ones(3))
    assert float(obs.scale()) == pytest.approx(0.02)


# --- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_scale_before_data_says_calibrate_first(name):
    with pytest.raises(ValueError, match="has observed no data: calibrate first"):
        make_observer(name).scale()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_zero_or_nan_only_data_is_refused(name):
    obs = make_observer(name)
    obs.observe(torch.zeros(10))
    obs.observe(torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"observed only zeros \(11 zeros, 1 NaN/inf\)"):
        obs.scale()
    nan = make_observer(name)
    nan.observe(torch.full((4,), float("nan")))
    with pytest.raises(ValueError, match=r"observed only NaN/inf values \(4\) over 1 batch"):
        nan.scale()
    empty = make_observer(name)
    empty.observe(torch.zeros(0, 8))
    with pytest.raises(ValueError, match=r"observed no values \(empty batches\) over 1 batch"):
        empty.scale()


def test_range_too_small_for_a_float32_scale():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([1e-44]))                  # subnormal: / 127 underflows to 0
    with pytest.raises(ValueError, match="outside what float32 can scale"):
        obs.scale()


def test_bad_names_arguments_and_inputs():
    with pytest.raises(ValueError, match="observer 'max' is not supported; accepted: minmax, "
                                         "moving_average, percentile, mse"):
        make_observer("max")
    with pytest.raises(ValueError, match=r"momentum must be a number in \(0, 1\], got 0"):
        MovingAverageObserver(momentum=0)
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\], got 101"):
        PercentileObserver(percentile=101)
    with pytest.raises(ValueError, match="bins must be an even int >= 64, got 10"):
        MSEObserver(bins=10)
    with pytest.raises(TypeError, match=r"observer 'minmax' does not take arguments \['momentum'\]"):
        make_observer("minmax", momentum=0.1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        MinMaxObserver().observe([1.0])
    with pytest.raises(TypeError, match="x has dtype torch.int32; accepted: a floating-point"):
        MinMaxObserver().observe(torch.ones(3, dtype=torch.int32))


def test_observer_base_is_abstract():
    from pyfast.quant.observers import Observer
    with pytest.raises(TypeError, match="abstract"):
        Observer()
