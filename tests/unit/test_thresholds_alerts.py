"""Smoothing, calibrated and adaptive thresholds, and the alert lifecycle with hysteresis."""

from __future__ import annotations

import numpy as np

from pipeline.alerts import alert_id, update_alerts
from pipeline.bundle import ThresholdParams
from pipeline.grid import GridConfig
from pipeline.settings import ThresholdSettings
from pipeline.state import FleetState
from pipeline.thresholds import calibrate, smooth_series, update_thresholds

FEATS = ("x", "y")


def params(**kw: float) -> ThresholdParams:
    s = ThresholdSettings(smoothing_alpha=1.0, adapt_alpha=0.0, open_after=2, close_after=3, close_ratio=0.5,
                          update_every=100, top_features=2)
    p = ThresholdParams.from_settings(s, threshold=1.0, normal_mean=0.2, normal_std=0.05)
    return ThresholdParams(**{**p.__dict__, **kw})


def run(scores: list[float], p: ThresholdParams, errors: np.ndarray | None = None):  # type: ignore[no-untyped-def]
    state = FleetState(GridConfig(1000, 0, 1, 1, 1, 2), (4, 4), 2)
    rows = state.rows(np.array(["a"], object))
    events, thresholds = [], []
    for i, s in enumerate(scores):
        e = np.array([[s, 0.1]]) if errors is None else errors[i:i + 1]
        sm, thr = update_thresholds(state, rows, np.array([s]), p)
        thresholds.append(float(thr[0]))
        events += update_alerts(state, rows, np.array(["a"], object), np.array([100 + i]), sm, thr, e, p, FEATS,
                                1000, "v1")
    return events, thresholds, state


def test_smoothing_keeps_level_over_unscored_steps() -> None:
    out = smooth_series(np.array([np.nan, 1.0, 3.0, np.nan, 3.0]), 0.5)
    np.testing.assert_allclose(out, [np.nan, 1.0, 2.0, 2.0, 2.5])


def test_calibration_is_quantile_times_margin() -> None:
    s = np.arange(1, 1001, dtype=float)
    p = calibrate(s, ThresholdSettings(quantile=0.99, margin=1.5))
    assert abs(p.threshold - np.quantile(s, 0.99) * 1.5) < 1e-9
    assert abs(p.normal_mean - 500.5) < 1e-9


def test_alert_opens_after_consecutive_steps_starts_at_the_first_and_closes_with_hysteresis() -> None:
    scores = [0.1, 0.1, 2.0, 2.0, 2.0, 0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.1]
    events, _, _ = run(scores, params())
    assert [e.state for e in events] == ["open", "close"]
    opened, closed = events
    assert opened.start_ms == 102_000  # the first step above, not the step where it opened
    assert opened.step_ms == 103_000
    # 0.8 is below the threshold but above close_ratio × threshold: still open (no flapping)
    assert closed.step_ms == 110_000 and closed.end_ms == 108_000
    assert opened.alert_id == closed.alert_id == alert_id("a", 102, "v1")


def test_one_step_excursion_does_not_open_an_alert() -> None:
    events, _, _ = run([0.1, 5.0, 0.1, 5.0, 0.1], params())
    assert events == []


def test_updates_when_the_peak_grows_and_top_features_name_the_cause() -> None:
    scores = [2.0, 2.0, 3.0, 10.0, 10.0]
    errors = np.array([[0.1, s] for s in scores])  # feature y carries the error
    events, _, _ = run(scores, params(), errors)
    assert [e.state for e in events] == ["open", "update", "update"]
    assert events[-1].peak_score == 10.0
    assert events[-1].top_features[0][0] == "y" and events[-1].top_features[0][1] > 0.9


def test_online_adaptation_raises_a_noisy_assets_threshold_but_never_below_calibrated() -> None:
    p = params(adapt_alpha=0.05, adapt_z=3.0, open_after=1000)
    rng = np.random.default_rng(0)
    _, thr_noisy, _ = run(list(0.5 + 0.3 * np.abs(rng.normal(size=400))), p)
    _, thr_quiet, _ = run([0.01] * 400, p)
    assert thr_noisy[-1] > 1.1  # learned its own, higher level (steps above it are not learned from)
    assert min(thr_quiet) == 1.0  # the calibrated floor holds


def test_adaptation_pauses_during_an_alert() -> None:
    p = params(adapt_alpha=0.2, adapt_z=3.0)
    _, thr, state = run([0.2] * 50 + [3.0] * 100, p)
    assert thr[-1] == thr[51]  # a long fault is not learned as normal
