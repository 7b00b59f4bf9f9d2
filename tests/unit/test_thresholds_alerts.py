"""Score terms, calibrated and adaptive thresholds, and the alert lifecycle with hysteresis."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import orjson
import pytest

from pipeline.alerts import alert_id, update_alerts
from pipeline.bundle import ThresholdParams
from pipeline.grid import NO_GAP, GridConfig
from pipeline.settings import ThresholdSettings
from pipeline.state import FleetState
from pipeline.thresholds import (TermLevels, calibrate_levels, combine, ewma_series, flat_runs, huber_variance_factor,
                                 update_thresholds)

FEATS = ("x", "y")
LEVELS = TermLevels(np.array([2.0, 2.0]), np.array([1.0, 4.0]), np.array([10.0, 10.0]))


def params(**kw: float) -> ThresholdParams:
    s = ThresholdSettings(smoothing_alpha=1.0, novelty_alpha=1.0, adapt_alpha=0.0, open_after=2, close_after=3,
                          close_ratio=0.5, update_every=100, top_features=2)
    p = ThresholdParams.from_settings(s, normal_mean=0.2, normal_std=0.05)
    return ThresholdParams(**{**p.__dict__, **kw})


def new_state() -> tuple[FleetState, np.ndarray]:
    state = FleetState(GridConfig(1000, 0, 1, 1, 1, 2), (4, 4), 2)
    return state, state.rows(np.array(["a"], object))


def lifecycle(scores: list[float], contrib: list[list[float]] | None = None, p: ThresholdParams | None = None,
              gaps: dict[int, int] | None = None, steps: list[int] | None = None):  # type: ignore[no-untyped-def]
    """Events of one asset; ``gaps`` maps a score's index to the first step of the data gap before it."""
    p = p or params()
    state, rows = new_state()
    events = []
    for i, s in enumerate(scores):
        c = np.array([contrib[i] if contrib else [1.0, 0.0]])
        step = steps[i] if steps else 100 + i
        events += update_alerts(state, rows, np.array(["a"], object), np.array([step]), np.array([s]),
                                np.array([1.0]), c, p, FEATS, 1000, "v1",
                                gap_start=np.array([(gaps or {}).get(i, NO_GAP)], np.int64))
    return events


def test_ewma_keeps_level_over_unscored_steps_and_flat_runs_count() -> None:
    out = ewma_series(np.array([np.nan, 1.0, 3.0, np.nan, 3.0]), 0.5)
    np.testing.assert_allclose(out, [np.nan, 1.0, 2.0, 2.0, 2.5])
    runs = flat_runs(np.array([[1.0, 5.0], [1.0, 6.0], [1.0, 6.0], [2.0, 6.0]]))
    assert runs.tolist() == [[0, 0], [1, 0], [2, 1], [0, 2]]


def test_levels_are_a_bonferroni_quantile_times_margin() -> None:
    rng = np.random.default_rng(0)
    sq = rng.chisquare(1, size=(20000, 4))
    levels = calibrate_levels(sq, quantile=0.99, margin=1.5)
    expected = np.quantile(np.sqrt(sq), 1 - 0.01 / 4, axis=0) * 1.5
    np.testing.assert_allclose(levels, expected)


def test_combined_score_is_the_largest_term_and_names_its_features() -> None:
    fc = np.array([[4.0, 1.0], [1.0, 1.0], [1.0, 1.0]])     # ratios: 1.0 on x
    nv = np.array([[0.25, 1.0], [0.25, 64.0], [0.0, 0.0]])  # ratios: 2.0 on y in the second row
    runs = np.array([[0, 0], [0, 0], [30, 0]])              # 3.0 × the flat limit on x in the third row
    c = combine(fc, nv, runs, LEVELS)
    np.testing.assert_allclose(c.score, [1.0, 2.0, 3.0])
    assert c.contributions[0].argmax() == 0 and c.contributions[1].argmax() == 1 and c.contributions[2].argmax() == 0


def _squares(fc_ratio: list[float], nv_ratio: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Term states (EWMAs of squares) that give these ratios to LEVELS' levels."""
    return (np.array([fc_ratio]) * LEVELS.forecast) ** 2, (np.array([nv_ratio]) * LEVELS.novelty) ** 2


def test_both_terms_moderately_high_on_one_feature_alert_together() -> None:
    """0.8 of each term's level on one feature: neither term alone, nor the two on different
    features, comes near an alert; together on one feature they open one, named after it."""
    import dataclasses

    ag = dataclasses.replace(LEVELS, agree=np.array([0.6]), alone=2.0)
    runs = np.zeros((1, 2))
    same = combine(*_squares([0.8, 0.1], [0.8, 0.1]), runs, ag)
    assert same.score[0] == pytest.approx(0.8 / 0.6) and same.contributions[0].argmax() == 0
    apart = combine(*_squares([0.8, 0.1], [0.1, 0.8]), runs, ag)
    assert apart.score[0] == pytest.approx(max(0.4, np.sqrt(0.08) / 0.6)) and apart.score[0] < 1
    alone = combine(*_squares([1.5, 0.1], [0.1, 0.1]), runs, ag)  # alone, a term needs twice its level
    assert alone.score[0] == pytest.approx(0.75)
    far = combine(*_squares([0.1, 2.5], [0.1, 0.1]), runs, ag)
    assert far.score[0] == pytest.approx(1.25) and far.contributions[0].argmax() == 1
    # A bundle without the agreement term (written before it) judges each term at its level.
    np.testing.assert_allclose(combine(*_squares([1.5, 0.1], [0.8, 0.8]), runs, LEVELS).score, [1.5])


def test_alert_opens_after_consecutive_steps_starts_at_the_first_and_closes_with_hysteresis() -> None:
    scores = [0.1, 0.1, 2.0, 2.0, 2.0, 0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.1]
    events = lifecycle(scores)
    assert [e.state for e in events] == ["open", "close"]
    opened, closed = events
    assert opened.start_ms == 102_000  # the first step above, not the step where it opened
    assert opened.step_ms == 103_000
    # 0.8 is below the threshold but above close_ratio × threshold: still open (no flapping)
    assert closed.step_ms == 110_000 and closed.end_ms == 108_000
    assert opened.alert_id == closed.alert_id == alert_id("a", 102, "v1")


def test_a_normal_close_is_recovered_and_every_event_serialises_its_reason() -> None:
    events = lifecycle([2.0, 2.0, 0.1, 0.1, 0.1])
    assert [(e.state, e.reason) for e in events] == [("open", None), ("close", "recovered")]
    assert [e.to_dict()["reason"] for e in events] == [None, "recovered"]


def test_the_published_form_has_every_field_in_order_and_encodes_as_json_does() -> None:
    events = lifecycle([2.0, 2.0, 3.5, 0.1, 0.1, 0.1])
    for e in events:
        d = e.to_dict()
        assert list(d) == [f.name for f in dataclasses.fields(e)]  # a new field is published too
        want = dataclasses.asdict(e)
        want["top_features"] = [{"feature": f, "contribution": round(c, 4)} for f, c in e.top_features]
        assert d == want
        assert orjson.loads(orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY)) == json.loads(json.dumps(d))


def test_a_data_gap_closes_the_open_alert_once_and_the_next_alert_is_a_new_one() -> None:
    # steps 100-104 above the threshold, readings stop after step 104, the asset is back at step 190
    steps = [100, 101, 102, 103, 104, 190, 191, 192, 193, 194, 195]
    scores = [2.0, 2.0, 2.0, 2.0, 2.0, 0.1, 2.0, 2.0, 2.0, 0.1, 0.1]
    events = lifecycle(scores, gaps={5: 105}, steps=steps)
    assert [(e.state, e.reason) for e in events] == [("open", None), ("close", "data_gap"), ("open", None)]
    opened, gap_close, reopened = events
    assert gap_close.alert_id == opened.alert_id == alert_id("a", 100, "v1")
    assert gap_close.end_ms == 105_000  # the end of the last step with readings
    assert gap_close.step_ms == 190_000  # closed when the asset's first step after the gap is seen
    assert gap_close.to_dict()["reason"] == "data_gap"
    assert reopened.start_ms == 191_000 and reopened.alert_id != opened.alert_id


def test_a_data_gap_restarts_the_counters_of_an_asset_without_an_open_alert() -> None:
    # one step above before the gap and one after are not two in a row
    assert lifecycle([0.1, 2.0, 2.0, 0.1], gaps={2: 102}, steps=[100, 101, 150, 151]) == []
    # after the gap the lifecycle runs as for a new asset: open after 2 steps above, recovered after 3 below
    events = lifecycle([2.0, 2.0, 0.1, 0.1, 2.0, 2.0, 0.1, 0.1, 0.1], gaps={4: 104}, steps=[100, 101, 102, 103,
                                                                                          200, 201, 202, 203, 204])
    assert [(e.state, e.reason, e.step_ms) for e in events] == [
        ("open", None, 101_000), ("close", "data_gap", 200_000), ("open", None, 201_000),
        ("close", "recovered", 204_000)]
    assert events[1].end_ms == 104_000 and events[3].end_ms == 202_000


def test_one_step_excursion_does_not_open_an_alert() -> None:
    assert lifecycle([0.1, 5.0, 0.1, 5.0, 0.1]) == []


def test_updates_when_the_peak_grows_and_top_features_name_the_cause() -> None:
    events = lifecycle([2.0, 2.0, 3.0, 10.0, 10.0], contrib=[[0.1, 1.0]] * 5)
    assert [e.state for e in events] == ["open", "update", "update"]
    assert events[-1].peak_score == 10.0
    assert events[-1].top_features[0][0] == "y" and events[-1].top_features[0][1] > 0.9


def _adapt(novelty_series: list[float], p: ThresholdParams) -> list[float]:
    state, rows = new_state()
    out = []
    for i, r in enumerate(novelty_series):
        _, thr = update_thresholds(state, rows, np.array([[float(i), float(-i)]]), np.array([[0.0, 0.0]]),
                                   np.array([[r, 0.0]]), LEVELS, p)
        out.append(float(thr[0]))
    return out


def test_online_adaptation_raises_a_noisy_assets_threshold_but_never_below_calibrated() -> None:
    p = params(adapt_alpha=0.05, adapt_z=3.0)
    rng = np.random.default_rng(0)
    noisy = _adapt(list(0.5 + 0.3 * np.abs(rng.normal(size=400))), p)  # novelty ratio = |r| / 1.0
    quiet = _adapt([0.01] * 400, p)
    assert noisy[-1] > 1.1  # learned its own, higher level (steps above it are not learned from)
    assert min(quiet) == 1.0  # the calibrated level holds


def test_adaptation_pauses_while_above_the_threshold() -> None:
    p = params(adapt_alpha=0.2, adapt_z=3.0)
    thr = _adapt([0.2] * 50 + [3.0] * 100, p)
    assert thr[-1] == thr[51]  # a long fault is not learned as normal


def test_a_clipped_adaptation_learns_a_plateau_under_the_threshold_slowly_and_a_noisy_asset_still() -> None:
    """A fault that outlasts its alert: the score sits just under the threshold after the alert
    closed. Unclipped, one plateau step inflates the variance by (0.7 / sd)² times the weight and
    the threshold passes the plateau in tens of steps; clipped at 3 sd it takes several times as long."""
    rng = np.random.default_rng(0)
    normal = list(0.2 + 0.05 * rng.normal(size=1000))  # params(): normal_mean 0.2, normal_std 0.05
    crossed = {}
    for k in (0.0, 3.0):
        thr = np.array(_adapt(normal + [0.9] * 1000, params(adapt_alpha=0.002, adapt_z=4.0, adapt_clip_sd=k)))
        assert thr[999] == 1.0
        crossed[k] = int(np.argmax(thr[1000:] > 1.0))
    assert 0 < crossed[0.0] < 60 and crossed[3.0] > 3 * crossed[0.0]
    noisy = _adapt(list(0.5 + 0.3 * np.abs(rng.normal(size=500))), params(adapt_alpha=0.002, adapt_z=4.0,
                                                                         adapt_clip_sd=3.0))
    assert noisy[-1] > 1.3  # a noisier asset still earns its own, higher threshold


def test_the_clipped_variance_is_unbiased_on_gaussian_deviations() -> None:
    z = np.random.default_rng(0).normal(size=2_000_000)
    for k in (1.0, 2.0, 3.0):
        assert np.mean(np.minimum(z * z, k * k)) == pytest.approx(huber_variance_factor(k), rel=3e-3)
    with pytest.raises(ValueError, match="adapt_clip_sd"):
        ThresholdSettings(adapt_clip_sd=0.5)


def _novelty_scores(p: ThresholdParams, residual: np.ndarray) -> np.ndarray:
    """The combined score of one asset whose only evidence is feature y's cross-sectional residual."""
    state, rows = new_state()
    out = []
    for r in residual:
        c, _ = update_thresholds(state, rows, np.full((1, 2), float(len(out))), np.zeros((1, 2)),
                                 np.array([[0.0, r]]), LEVELS, p)
        out.append(c.score[0])
    return np.array(out)


def test_a_capped_novelty_term_falls_back_soon_after_a_long_fault_ends() -> None:
    """y's level is 4: a 200-step residual of 40 (10× the level) then normal again."""
    residual = np.r_[np.zeros(20), np.full(200, 40.0), np.zeros(200)]
    slow = dict(novelty_alpha=0.05)
    capped = _novelty_scores(params(**slow, novelty_cap=3.0), residual)
    uncapped = _novelty_scores(params(**slow, novelty_cap=float("inf")), residual)
    assert capped[219] == pytest.approx(3.0, rel=1e-3) and uncapped[219] == pytest.approx(10.0, rel=1e-3)
    # Normal steps after the fault until the score is back under the alert level (1):
    back = lambda s: int(np.argmax(s[220:] < 1.0)) + 1  # noqa: E731
    assert back(capped) < 0.5 * back(uncapped)
    assert back(capped) == int(np.ceil(np.log(1 / 9) / np.log(0.95)))  # EWMA of r² decays from 3² to under 1
