"""Baseline detectors and the distribution functions behind their control limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.baselines import (
    PCAT2,
    FlagEverything,
    chi2_quantile,
    f_quantile,
    normal_quantile,
    skab_spe_limit,
    spe_limit,
    t2_limit,
)

# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize(
    ("value", "expected", "tolerance"),
    [
        # published table values
        (lambda: f_quantile(0.99, 3, 100), 3.984, 1e-3),
        (lambda: f_quantile(0.95, 1, 10), 4.9646, 1e-4),
        (lambda: f_quantile(0.95, 2, 20), 3.4928, 1e-4),
        (lambda: chi2_quantile(0.99, 2), 9.2103, 1e-4),
        (lambda: chi2_quantile(0.99, 10), 23.2093, 1e-4),
        (lambda: chi2_quantile(0.999, 1), 10.8276, 1e-4),
        (lambda: normal_quantile(0.99), 2.3263, 1e-4),
        (lambda: normal_quantile(0.975), 1.95996, 1e-5),
        (lambda: normal_quantile(0.5), 0.0, 1e-12),
    ],
)
def test_quantiles_match_tables(value: object, expected: float, tolerance: float) -> None:
    assert value() == pytest.approx(expected, abs=tolerance)  # type: ignore[operator]


def test_quantile_identities() -> None:
    # chi2 with 2 df is exponential with mean 2: x = -2 ln(1 - p)
    assert chi2_quantile(0.99, 2) == pytest.approx(-2 * math.log(0.01), rel=1e-12)
    # chi2(1) is a squared standard normal; F(1, d) tends to chi2(1) as d grows
    assert chi2_quantile(0.95, 1) == pytest.approx(normal_quantile(0.975) ** 2, rel=1e-10)
    assert f_quantile(0.95, 1, 1e7) == pytest.approx(chi2_quantile(0.95, 1), rel=1e-5)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_quantiles_reject_invalid_probability(p: float) -> None:
    with pytest.raises(ValueError):
        normal_quantile(p)
    with pytest.raises(ValueError):
        chi2_quantile(p, 3)
    with pytest.raises(ValueError):
        f_quantile(p, 3, 10)


# --------------------------------------------------------------------------- control limits


def test_t2_limit_tends_to_chi2_for_many_training_rows() -> None:
    # m (n-1)(n+1) / (n (n-m)) F(m, n-m) -> chi2(m) as n grows; chi2(0.99; 3) = 11.3449
    assert t2_limit(3, 1_000_000, 0.99) == pytest.approx(11.3449, abs=1e-3)
    # few rows widen the limit: factor 3*399*401/(400*397) = 3.0225 times F(0.99; 3, 397) > F(0.99; 3, inf)
    assert t2_limit(3, 400, 0.99) > t2_limit(3, 1_000_000, 0.99)
    with pytest.raises(ValueError):
        t2_limit(5, 5, 0.99)


def test_spe_limit_covers_the_residual_distribution() -> None:
    rng = np.random.default_rng(7)
    # equal residual eigenvalues 0.5 x 4: Q = 0.5 chi2(4), exact 0.99 quantile 0.5 * 13.2767 = 6.638
    assert spe_limit([0.5] * 4, 0.99) == pytest.approx(6.638, rel=0.01)
    # very uneven eigenvalues (10 and 1000 x 0.1): theta1 = 110, theta2 = 110, theta3 = 1001,
    # h0 = 1 - 2*110*1001 / (3*110^2) = -5.07 -> Pearson's approximation.
    # Q = 10 chi2(1) + 0.1 chi2(1000): the limit is exceeded ~1% of the time (Box's: ~3%)
    limit = spe_limit([10.0] + [0.1] * 1000, 0.99)
    q = 10 * rng.chisquare(1, 200_000) + 0.1 * rng.chisquare(1000, 200_000)
    assert 0.008 < np.mean(q > limit) < 0.012


def test_skab_spe_limit_closed_form() -> None:
    # SKAB's thetas are s, s^2, s^3 -> h0 = 1/3 and Q = s (1 + z sqrt(2)/3 - 2/9)^3;
    # z(0.999) = 3.0902 -> (1 + 1.45677 - 0.22222)^3 = 2.23455^3 = 11.1577
    assert skab_spe_limit(2.0, 0.999) == pytest.approx(2.0 * 11.1577, rel=1e-4)


# --------------------------------------------------------------------------- detectors

LOADINGS = np.array([[1.0, 0.9, 0.8, 0.0, 0.0, 0.1], [0.0, 0.1, 0.2, 1.0, 0.9, 0.8]])
OFFSET = np.array([10.0, 5.0, 0.0, -3.0, 1.0, 2.0])


def _normal_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Six correlated sensors driven by two latent factors plus small independent noise."""
    return 2.0 * rng.normal(size=(n, 2)) @ LOADINGS + 0.3 * rng.normal(size=(n, 6)) + OFFSET


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return _normal_rows(rng, 3000), _normal_rows(rng, 20_000)


def test_t2_false_alarm_rate_on_fresh_normal_data(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    detector = PCAT2(variance=0.85, confidence=0.99).fit(train)
    assert detector.n_components_ == 2
    assert 0.006 < detector.predict(fresh).mean() < 0.015


def test_t2_flags_a_shift_along_the_correlation_structure(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = rows
    test = _normal_rows(np.random.default_rng(1), 300)
    test[100:200] += 15.0 * LOADINGS[0]
    predicted = PCAT2().fit(train).predict(test)
    assert predicted.dtype == np.int8
    assert predicted[100:200].mean() > 0.95
    assert predicted[:100].sum() + predicted[200:].sum() <= 10


def test_q_flags_a_broken_correlation_that_t2_misses(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    test = _normal_rows(np.random.default_rng(2), 300)
    test[100:200, 0] += 3.0  # one sensor leaves its correlated partners
    t2_only = PCAT2().fit(train)
    with_q = PCAT2(use_q=True).fit(train)
    assert t2_only.predict(test)[100:200].mean() < 0.2
    assert with_q.predict(test)[100:200].mean() > 0.95
    # each statistic alarms ~1% on normal rows, so the union stays near 2%
    assert 0.012 < with_q.predict(fresh).mean() < 0.03


def test_empirical_limits_match_the_training_quantile(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    detector = PCAT2(limits="empirical", confidence=0.99).fit(train)
    # 1% of 3000 training rows lie above the 0.99 quantile of their own T² (linear interpolation)
    assert detector.predict(train).sum() == 30
    assert 0.006 < detector.predict(fresh).mean() < 0.015


def test_score_is_the_ratio_to_the_limit(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    detector = PCAT2(use_q=True).fit(train)
    t2, q = detector.statistics(fresh[:50])
    np.testing.assert_allclose(detector.score(fresh[:50]), np.maximum(t2 / detector.t2_limit_, q / detector.q_limit_))
    np.testing.assert_array_equal(detector.predict(fresh[:50]), detector.score(fresh[:50]) > 1.0)


def test_full_variance_is_mahalanobis_distance(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    detector = PCAT2(variance=1.0).fit(train)
    assert detector.n_components_ == 6
    z_train = (train - train.mean(axis=0)) / train.std(axis=0)
    z = (fresh[:20] - train.mean(axis=0)) / train.std(axis=0)
    inverse = np.linalg.inv(np.cov(z_train, rowvar=False))
    expected = np.einsum("ij,jk,ik->i", z, inverse, z)
    np.testing.assert_allclose(detector.statistics(fresh[:20])[0], expected, rtol=1e-8)


def test_median_window_suppresses_single_row_spikes(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = rows
    test = _normal_rows(np.random.default_rng(3), 40)
    test[20] += 15.0 * LOADINGS[0]
    assert PCAT2().fit(train).predict(test)[20] == 1
    smoothed = PCAT2(median_window=5).fit(train)
    assert smoothed.predict(test)[18:23].sum() == 0
    assert np.all(smoothed.score(test)[:4] == 0.0)  # no full window yet


def test_limit_factor_scales_the_limits(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = rows
    plain, doubled = PCAT2(use_q=True).fit(train), PCAT2(use_q=True, limit_factor=2.0).fit(train)
    assert doubled.t2_limit_ == pytest.approx(2 * plain.t2_limit_)
    assert doubled.q_limit_ == pytest.approx(2 * plain.q_limit_)


def test_constant_training_columns_are_ignored(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, fresh = rows
    with_constant = np.column_stack([train, np.full(len(train), 7.0)])
    detector = PCAT2().fit(with_constant)
    np.testing.assert_array_equal(detector.columns_, np.arange(6))
    reference = PCAT2().fit(train)
    fresh_with_constant = np.column_stack([fresh[:100], np.full(100, 7.0)])
    np.testing.assert_allclose(detector.score(fresh_with_constant), reference.score(fresh[:100]))


def test_q_is_not_used_without_a_residual_subspace(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = rows
    detector = PCAT2(variance=1.0, use_q=True).fit(train)
    assert not detector.q_used_
    assert detector.q_limit_ == math.inf


def test_skab_q_limit_mode_sums_the_residual_variance(rows: tuple[np.ndarray, np.ndarray]) -> None:
    train, _ = rows
    detector = PCAT2(use_q=True, q_limit="skab").fit(train)
    z = (train - train.mean(axis=0)) / train.std(axis=0)
    # two components kept: residual variance = total (6 standardised columns) minus the two
    # largest eigenvalues; here np.linalg.eig happens to return them first
    eigenvalues = np.linalg.eig(np.cov(z, rowvar=False))[0].real
    assert np.all(eigenvalues[:2] > eigenvalues[2:].max())
    residual = float(eigenvalues[2:].sum())
    assert detector.q_limit_ == pytest.approx(skab_spe_limit(residual, 0.99))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variance": 0.0},
        {"variance": 1.5},
        {"confidence": 1.0},
        {"median_window": 0},
        {"limit_factor": 0.0},
        {"limits": "median"},
        {"q_limit": "box"},
    ],
)
def test_pcat2_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PCAT2(**kwargs)  # type: ignore[arg-type]


def test_all_constant_training_data_gives_a_detector_that_never_alarms() -> None:
    # a telemetry channel constant over its training file used to raise "every training column is constant"
    x_test = np.vstack([np.ones((20, 3)), np.full((5, 3), 7.0)])
    for detector in (PCAT2(), PCAT2(variance=0.85, use_q=True, median_window=5, q_limit="skab")):
        detector.fit(np.ones((50, 3)))
        np.testing.assert_array_equal(detector.predict(x_test), np.zeros(25, dtype=np.int8))
        np.testing.assert_array_equal(detector.score(x_test), np.zeros(25))


def test_one_varying_column_among_constant_ones_is_modelled() -> None:
    rng = np.random.default_rng(3)
    train = np.column_stack([np.ones(300), rng.normal(size=300), np.full(300, 2.0)])
    test = train[:40].copy()
    test[30:, 1] = 25.0
    pred = PCAT2(variance=1.0, confidence=0.999).fit(train).predict(test)
    assert pred[30:].all() and pred[:30].sum() <= 1


def test_flag_everything() -> None:
    x = np.zeros((7, 3))
    detector = FlagEverything().fit(x[:2])
    np.testing.assert_array_equal(detector.predict(x), np.ones(7, dtype=np.int8))
    assert detector.predict(x).dtype == np.int8
    np.testing.assert_array_equal(detector.score(x), np.ones(7))
    with pytest.raises(ValueError):
        detector.predict(np.zeros(7))
