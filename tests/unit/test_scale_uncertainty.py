"""How many independent values a history holds, and how far a level widens when it holds few."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.thresholds import (BATCH_SIZES, BATCH_WINDOW, MIN_BATCHES, BatchMeans, feature_quantile,
                                 scale_uncertainty_factor)


def _direct_tau(histories: list[np.ndarray]) -> np.ndarray:
    """Steps per independent value by plain batch means of each history (its complete batches),
    steps and batch means taken about each history's own mean."""
    f = histories[0].shape[1]
    mu = [np.nanmean(h, axis=0) for h in histories]
    step = np.nanmean(np.concatenate([h - m for h, m in zip(histories, mu)]) ** 2, axis=0)
    tau = []
    for b in BATCH_SIZES:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a batch without a value has no mean
            means = [np.nanmean(h[: len(h) // b * b].reshape(-1, b, f), axis=1) - m
                     for h, m in zip(histories, mu) if len(h) >= b]
        m = np.concatenate(means) if means else np.empty((0, f))
        tau.append(b * np.nanmean(m**2, axis=0) / step if len(m) >= MIN_BATCHES else np.full(f, np.nan))
    out = np.ones(f)
    for j in range(f):
        col = [(b, t[j]) for b, t in zip(BATCH_SIZES, tau) if np.isfinite(t[j])]
        good = [t for b, t in col if b >= BATCH_WINDOW * t]
        if good or col:
            out[j] = max(good[0] if good else col[-1][1], 1.0)
    return out


def _ar1(rho: float, n: int, f: int, rng: np.random.Generator) -> np.ndarray:
    x = np.empty((n, f))
    x[0] = rng.normal(size=f) / np.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + rng.normal(size=f)
    return x


def _feed(histories: list[np.ndarray], piece: int) -> BatchMeans:
    """As the fit feeds it: rounds of each asset's next ``piece`` steps, all assets side by side."""
    acc = BatchMeans(len(histories), histories[0].shape[1])
    for lo in range(0, max(len(h) for h in histories), piece):
        parts = [(a, np.arange(lo, min(lo + piece, len(h)))) for a, h in enumerate(histories) if lo < len(h)]
        acc.add(np.concatenate([np.full(len(p), a) for a, p in parts]), np.concatenate([p for _, p in parts]),
                np.concatenate([histories[a][p] for a, p in parts]))
    return acc


@pytest.mark.parametrize("piece", [7, 50, 64, 1000])
def test_any_split_of_the_histories_gives_the_plain_batch_means(piece: int) -> None:
    rng = np.random.default_rng(1)
    a, b, c = _ar1(0.7, 600, 3, rng) + 5.0, _ar1(0.95, 410, 3, rng) - 2.0, rng.normal(size=(333, 3))
    a[[5, 40, 41]] = np.nan
    b[100, 1] = np.nan
    whole, split = _feed([a, b, c], 10_000), _feed([a, b, c], piece)
    np.testing.assert_allclose(split.batch_sq, whole.batch_sq, rtol=1e-12)
    np.testing.assert_allclose(split.batch_sum, whole.batch_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(split.batches, whole.batches)
    np.testing.assert_allclose(split.integrated_time(), _direct_tau([a, b, c]), rtol=1e-9)


def test_integrated_time_counts_steps_per_independent_value() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(20_000, 1)), _ar1(0.9, 20_000, 1, rng)], axis=1)
    tau = _feed([x], 1024).integrated_time()
    assert tau[0] == pytest.approx(1.0, abs=0.15)
    assert tau[1] == pytest.approx((1 + 0.9) / (1 - 0.9), rel=0.2)  # AR(1): (1 + rho) / (1 - rho)


def test_integrated_time_is_at_least_one_step_and_bounded_by_a_short_history() -> None:
    alternating = np.tile([1.0, -1.0], 200)[:, None]  # negatively correlated: more information, not less
    assert _feed([alternating], 64).integrated_time().tolist() == [1.0]
    walk = np.cumsum(np.random.default_rng(3).normal(size=(400, 1)), axis=0)  # never forgets
    tau = _feed([walk], 64).integrated_time()[0]
    assert 10 < tau <= 32 * 1.5  # 400 steps hold 12 batches of 32 at most: a lower bound, far above 1


def test_a_level_widens_only_where_few_independent_values_were_seen() -> None:
    q = feature_quantile(0.995, 8)
    wide = scale_uncertainty_factor(np.array([2.0, 5.0, 20.0, 400.0, 1e6]), q)
    assert np.all(np.diff(wide) < 0)  # fewer independent values, a wider level
    assert wide[0] > 10 and wide[1] > 2.5  # a handful: where the feature goes next is barely known
    assert wide[3] == pytest.approx(1.0, abs=0.02) and wide[4] == pytest.approx(1.0, abs=1e-4)
    assert scale_uncertainty_factor(np.array([0.3]), q)[0] == scale_uncertainty_factor(np.array([2.0]), q)[0]  # df >= 1
