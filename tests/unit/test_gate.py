"""The champion/challenger gate: decisions on figures, figures from the production path, and the
exclusion of abnormal periods from the data the trainer and the gate see."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bundle import AssetHeads, AssetLevels, ModelBundle
from pipeline.readings import DecodedBatch
from pipeline.tables import frame_to_batch
from tests.unit.conftest import FEATURES, sine_frame, tiny_settings
from trainers.gate import (ALERT_TOLERANCE, BLOCK_STEPS, Comparison, GateError, GateFigures, PairedBlocks,
                           blocks_from_steps, compare, decide, incompatibility, paired_test, unconditional)
from trainers.train import Exclusions, TrainError, read_label_ranges

HOLDOUT_START = 1_700_100_000_000


def figures(error: float, alerts: float, steps: int = 1000, version: str = "v") -> GateFigures:
    return GateFigures(version, steps, error, alerts, alerts=0)


# ---------------------------------------------------------------- the paired test on per-step figures


def held_out(n_assets: int = 4, steps: int = 3000, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A champion's per-step errors on a held-out day: heavy-tailed and autocorrelated (an
    AR(1) level times chi-square noise), the way forecast errors of neighbouring steps are."""
    rng = np.random.default_rng(seed)
    asset = np.repeat([f"p{i}" for i in range(n_assets)], steps).astype(object)
    step = np.tile(np.arange(1_000_000, 1_000_000 + steps), n_assets)
    level = np.empty(n_assets * steps)
    shocks = rng.normal(size=n_assets * steps)
    for i in range(n_assets):
        x = 0.0
        for t in range(steps):
            x = 0.98 * x + 0.2 * shocks[i * steps + t]
            level[i * steps + t] = x
    error = np.exp(level) * rng.chisquare(2, size=n_assets * steps) / 2
    return asset, step, error


def excursions(n: int, rate: float, length: int, seed: int) -> np.ndarray:
    """Steps above the threshold: runs of ``length`` steps starting at random, covering about ``rate``."""
    rng = np.random.default_rng(seed)
    above = np.zeros(n)
    for start in np.flatnonzero(rng.random(n) < rate / length):
        above[start:start + length] = 1.0
    return above


def pair(asset: np.ndarray, step: np.ndarray, champion: np.ndarray, challenger: np.ndarray,
         above_champion: np.ndarray | None = None, above_challenger: np.ndarray | None = None) -> PairedBlocks:
    a0 = np.zeros(len(step)) if above_champion is None else above_champion
    a1 = a0 if above_challenger is None else above_challenger
    return blocks_from_steps(asset, step, np.column_stack([champion, challenger]), np.column_stack([a0, a1]))


def test_an_equal_model_passes_and_a_worse_one_is_refused() -> None:
    asset, step, error = held_out()
    rng = np.random.default_rng(7)
    # Another retrain on the same data: the same predictions plus noise of its own.
    equal = error * rng.lognormal(0.0, 0.3, size=len(error)) / np.exp(0.3**2 / 2)
    t = paired_test(pair(asset, step, error, equal), margin=0.05)
    assert t.blocks == 4 * 47 and t.steps == 4 * 3000  # 3000 steps from 1,000,000 = 15,625 × 64: 47 blocks each
    assert t.error_change.low < 0 < t.error_change.high and not t.error_worse and not t.alert_worse
    # The same data through a model half as good again.
    worse = paired_test(pair(asset, step, error, 1.5 * equal), margin=0.05)
    assert worse.error_change.estimate == pytest.approx(0.5, abs=0.05)
    assert worse.error_change.low > 0.3 and worse.error_worse
    # Even a generous margin refuses it; one above the whole interval lets it through.
    assert paired_test(pair(asset, step, error, 1.5 * equal), margin=0.2).error_worse
    assert not paired_test(pair(asset, step, error, 1.5 * equal), margin=0.8).error_worse


def test_point_figures_that_differ_by_chance_do_not_refuse() -> None:
    """A challenger a few percent worse on this held-out day, but within what the day's own
    variability explains, passes, where comparing the two point figures refused it."""
    asset, step, error = held_out(n_assets=2, steps=1500, seed=3)
    rng = np.random.default_rng(11)
    noisy = error * rng.lognormal(0.0, 0.8, size=len(error)) / np.exp(0.8**2 / 2) * 1.08
    t = paired_test(pair(asset, step, error, noisy), margin=0.05)
    assert t.error_change.estimate > 0.05  # the old rule: refused
    assert t.error_change.low <= 0.05 and not t.error_worse


def test_a_challenger_alerting_more_is_refused_and_one_short_excursion_is_not() -> None:
    asset, step, error = held_out()
    n = len(step)
    quiet = excursions(n, 0.001, 20, seed=1)
    t = paired_test(pair(asset, step, error, error, quiet, excursions(n, 0.03, 20, seed=2)), margin=0.05)
    assert t.alert_change.low > t.alert_allowed and t.alert_worse and not t.error_worse
    assert t.alert_allowed == pytest.approx(0.05 * quiet.mean() + ALERT_TOLERANCE)
    # A champion that never alerted, a challenger with one 20-step excursion: within the tolerance.
    once = np.zeros(n)
    once[5000:5020] = 1.0
    t = paired_test(pair(asset, step, error, error, np.zeros(n), once), margin=0.05)
    assert t.alert_change.estimate == pytest.approx(20 / n) and not t.alert_worse


def test_the_test_is_deterministic_for_a_seed_and_blocks_keep_assets_apart() -> None:
    asset, step, error = held_out(n_assets=3, steps=700)
    noisy = error * np.random.default_rng(5).lognormal(0.0, 0.3, size=len(error))
    blocks = pair(asset, step, error, noisy)
    a, b = paired_test(blocks, margin=0.05, seed=3), paired_test(blocks, margin=0.05, seed=3)
    assert a == b
    assert paired_test(blocks, margin=0.05, seed=4).error_change.low != a.error_change.low
    assert a.error_change.estimate == pytest.approx(noisy.sum() / error.sum() - 1)
    # 700 steps from step 1,000,000 (= 15,625 × 64): 11 blocks per asset, none shared.
    assert len(blocks) == 3 * 11 and blocks.steps.sum() == 2100
    assert set(blocks.steps.tolist()) == {64.0, 700 - 10 * 64}


def test_large_held_out_sets_are_resampled_in_bounded_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainers import gate

    asset, step, error = held_out(n_assets=2, steps=2000)
    blocks = pair(asset, step, error, error * np.random.default_rng(5).lognormal(0.0, 0.3, size=len(error)))
    whole = paired_test(blocks, margin=0.05)
    monkeypatch.setattr(gate, "_CELLS", 100)  # a few resamples per round: the same draws, summed in pieces
    rounds = paired_test(blocks, margin=0.05)
    for name in ("error_change", "alert_change"):
        got, want = getattr(rounds, name), getattr(whole, name)
        assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-12, abs=1e-15)


def comparison(champion: GateFigures, challenger: GateFigures, blocks: PairedBlocks | None = None) -> Comparison:
    if blocks is None:
        asset, step, error = held_out(n_assets=2, steps=1000)
        blocks = pair(asset, step, error * champion.forecast_error, error * challenger.forecast_error)
    return Comparison(champion, challenger, blocks)


@pytest.mark.parametrize("champion, challenger, publish, why", [
    (figures(1.0, 0.0), figures(0.8, 0.0), True, "not worse"),                   # better
    (figures(1.0, 0.0), figures(1.0, 0.0), True, "not worse"),                   # equal
    (figures(1.0, 0.0), figures(1.5, 0.0), False, "forecast error +50.0%"),
    (figures(1.0, 0.0), figures(math.nan, 0.0), False, "forecast error undefined"),  # no feature moved
    (figures(1.0, 0.0), figures(0.5, 0.0, steps=0), False, "no held-out step"),
])
def test_decisions(champion: GateFigures, challenger: GateFigures, publish: bool, why: str) -> None:
    d = decide(comparison(champion, challenger), margin=0.05)
    assert d.publish is publish
    assert why in d.reason
    recorded = json.loads(json.dumps(d.to_dict(), allow_nan=False))  # goes into the bundle's JSON manifest
    assert recorded["decision"] == ("publish" if publish else "refuse")
    assert recorded["champion"]["forecast_error"] == champion.forecast_error
    assert recorded["margin"] == 0.05
    if math.isfinite(challenger.forecast_error) and challenger.steps:
        paired = recorded["paired"]
        assert paired["method"] == "block bootstrap" and paired["resamples"] == 1000
        assert paired["error_worse"] is (not publish)
        low, high = paired["error_change"]["low"], paired["error_change"]["high"]
        assert low <= paired["error_change"]["estimate"] <= high


def test_both_figures_worse_are_both_named() -> None:
    asset, step, error = held_out(n_assets=2, steps=1000)
    n = len(step)
    blocks = pair(asset, step, error, 2 * error, np.zeros(n), excursions(n, 0.2, 20, seed=4))
    d = decide(comparison(figures(1.0, 0.0), figures(2.0, 0.2), blocks), margin=0.05)
    assert not d.publish and "forecast error" in d.reason and "alert fraction" in d.reason


def test_a_first_model_is_published_without_figures() -> None:
    d = unconditional("first model: nothing published to compare with", 0.05)
    assert d.publish
    assert d.to_dict() == {"decision": "publish", "reason": "first model: nothing published to compare with",
                           "margin": 0.05, "champion": None, "challenger": None}


# ---------------------------------------------------------------- figures from the production path


def holdout_batches(n_steps: int = 300, parts: int = 3) -> list[DecodedBatch]:
    """Two assets' normal readings, cut into consecutive batches as a scan delivers them."""
    frame = sine_frame(n_steps, assets=("p1", "p2"), seed=5, start_ms=HOLDOUT_START)
    bounds = np.linspace(0, len(frame), parts + 1).astype(int)
    return [frame_to_batch(frame.iloc[a:b], FEATURES, ts_col="ts", asset_col="asset")
            for a, b in zip(bounds[:-1], bounds[1:])]


def variant(bundle: ModelBundle, version: str, **changes: object) -> ModelBundle:
    return dataclasses.replace(bundle, version=version, **changes)  # type: ignore[arg-type]


def with_head(bundle: ModelBundle, version: str, kernel: float, bias: float) -> ModelBundle:
    """The same network with its output layer replaced (kernel and bias filled with constants)
    and no per-asset output layers, so every asset uses it."""
    weights = [w.copy() for w in bundle.weights]
    weights[-2][:] = kernel
    weights[-1][:] = bias
    return variant(bundle, version, weights=weights, heads=AssetHeads())


def test_a_model_against_itself_is_equal_and_published(tiny_bundle: ModelBundle) -> None:
    grid = tiny_settings().grid
    c = compare(tiny_bundle, variant(tiny_bundle, "same"), holdout_batches(), grid)
    champion, challenger = c.champion, c.challenger
    # Every step after the first warm-up window is scored: 2 assets × (300 - 8).
    assert champion.steps == challenger.steps == 2 * (300 - tiny_bundle.warmup_steps) == int(c.blocks.steps.sum())
    assert challenger.forecast_error == champion.forecast_error
    assert challenger.alert_fraction == champion.alert_fraction
    assert set(champion.feature_error) == set(FEATURES)
    # The per-block sums hold the same figure as the totals: the mean over steps of the per-step error.
    np.testing.assert_allclose(c.blocks.error.sum(axis=0) / champion.steps, champion.forecast_error, rtol=1e-9)
    d = decide(c, 0.05)
    assert d.publish and d.paired is not None
    assert d.paired.error_change == type(d.paired.error_change)(0.0, 0.0, 0.0)


def test_batches_split_blocks_without_changing_them(tiny_bundle: ModelBundle) -> None:
    grid = tiny_settings().grid
    whole = compare(tiny_bundle, variant(tiny_bundle, "same"), holdout_batches(parts=1), grid)
    split = compare(tiny_bundle, variant(tiny_bundle, "same"), holdout_batches(parts=7), grid)
    np.testing.assert_array_equal(whole.blocks.steps, split.blocks.steps)
    # Only the naive scale moves: it skips the step pairs that straddle two batches.
    np.testing.assert_allclose(whole.blocks.error, split.blocks.error, rtol=5e-3)


def test_forecast_error_does_not_depend_on_the_model_s_own_error_units(tiny_bundle: ModelBundle) -> None:
    """A model reporting its errors in units 10× larger has the same raw errors: the same figure."""
    rescaled = variant(tiny_bundle, "rescaled", error_scale=tiny_bundle.error_scale * 10)
    c = compare(tiny_bundle, rescaled, holdout_batches(), tiny_settings().grid)
    assert c.challenger.forecast_error == pytest.approx(c.champion.forecast_error, rel=1e-9)


def test_a_model_predicting_no_change_scores_about_one(tiny_bundle: ModelBundle) -> None:
    persistence = with_head(tiny_bundle, "persistence", kernel=0.0, bias=0.0)
    c = compare(tiny_bundle, persistence, holdout_batches(), tiny_settings().grid)
    assert c.challenger.forecast_error == pytest.approx(1.0, abs=0.05)


def test_a_worse_forecaster_is_refused(tiny_bundle: ModelBundle) -> None:
    drifting = with_head(tiny_bundle, "drifting", kernel=0.0, bias=0.5)  # always predicts half a std of change
    c = compare(tiny_bundle, drifting, holdout_batches(), tiny_settings().grid)
    assert c.challenger.forecast_error > 2 * c.champion.forecast_error
    d = decide(c, 0.05)
    assert not d.publish and "forecast error" in d.reason
    assert d.paired is not None and d.paired.error_change.low > 1.0


def with_levels_scaled(bundle: ModelBundle, version: str, factor: float) -> ModelBundle:
    """The same network with its calibrated term levels (fleet and per asset) times ``factor``."""
    own = bundle.asset_levels
    return variant(bundle, version, forecast_level=bundle.forecast_level * factor,
                   novelty_level=bundle.novelty_level * factor,
                   asset_levels=AssetLevels(own.names, own.forecast * factor, own.novelty * factor))


def test_a_model_alerting_on_normal_data_is_refused(tiny_bundle: ModelBundle) -> None:
    jumpy = with_levels_scaled(tiny_bundle, "jumpy", 0.05)
    c = compare(tiny_bundle, jumpy, holdout_batches(), tiny_settings().grid)
    assert c.challenger.forecast_error == pytest.approx(c.champion.forecast_error, rel=1e-9)
    assert c.challenger.alert_fraction > c.champion.alert_fraction + 10 * ALERT_TOLERANCE
    assert c.challenger.alerts >= 1
    d = decide(c, 0.05)
    assert not d.publish and "alert fraction" in d.reason and "forecast error" not in d.reason


def test_models_of_other_features_cannot_be_compared(tiny_bundle: ModelBundle) -> None:
    other = variant(tiny_bundle, "other", features=("a", "b", "x"))
    assert incompatibility(tiny_bundle, other) == "features changed from ['a', 'b', 'c'] to ['a', 'b', 'x']"
    slower = variant(tiny_bundle, "slower", period_ms=2000)
    assert incompatibility(tiny_bundle, slower) == "grid period changed from 1000 ms to 2000 ms"
    with pytest.raises(GateError, match="features changed"):
        compare(tiny_bundle, other, [], tiny_settings().grid)


# ---------------------------------------------------------------- exclusions


def test_exclusion_ranges_merge_and_are_end_exclusive() -> None:
    ex = Exclusions([("p1", 100, 200), ("p1", 150, 300), ("p1", 400, 400), ("p2", 0, 10)])
    assert len(ex) == 2
    asset = np.array(["p1", "p1", "p1", "p1", "p1", "p2", "p2", "p3"], dtype=object)
    ts = np.array([99, 100, 299, 300, 400, 5, 10, 150], np.int64)
    assert ex.mask(asset, ts).tolist() == [False, True, True, False, False, True, False, False]


@settings(max_examples=80, deadline=None)
@given(ranges=st.lists(st.tuples(st.sampled_from(["p1", "p2"]), st.integers(0, 100), st.integers(0, 30)),
                       max_size=6),
       points=st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.integers(-5, 140)), max_size=40))
def test_exclusion_mask_matches_a_direct_check(ranges: list[tuple[str, int, int]],
                                               points: list[tuple[str, int]]) -> None:
    spans = [(a, s, s + length) for a, s, length in ranges]
    asset = np.array([p[0] for p in points], dtype=object)
    ts = np.array([p[1] for p in points], np.int64)
    expected = [any(a == ra and s <= t < e for ra, s, e in spans) for a, t in points]
    assert Exclusions(spans).mask(asset, ts).tolist() == expected


def test_excluded_readings_are_dropped_whole_and_counted() -> None:
    # Three readings of two features each: p1@0, p1@1000, p2@1000.
    batch = DecodedBatch(np.array([0, 0, 1, 1, 2, 2]), np.array(["p1", "p1", "p1", "p1", "p2", "p2"], dtype=object),
                         np.array([0, 0, 1000, 1000, 1000, 1000], np.int64), np.array([0, 1] * 3, np.int32),
                         np.arange(6, dtype=np.float64), [], 3)
    kept, dropped = Exclusions([("p1", 500, 2000)]).apply(batch)
    assert dropped == 1 and kept.n_records == 2
    assert kept.record_index.tolist() == [0, 0, 2, 2]
    assert kept.value.tolist() == [0.0, 1.0, 4.0, 5.0]
    same, none = Exclusions([("p9", 0, 5000)]).apply(batch)
    assert same is batch and none == 0


def test_labels_are_read_from_csv_and_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("asset,start_ms,end_ms,note\npump-1,2026-01-01T00:00:00Z,2026-01-01T00:10:00Z,seal\n"
                   "pump-2,2026-01-01T01:00:00Z,2026-01-01T01:00:30Z,\n")
    assert read_label_ranges(str(csv)) == [("pump-1", 1_767_225_600_000, 1_767_226_200_000),
                                           ("pump-2", 1_767_229_200_000, 1_767_229_230_000)]
    parquet = tmp_path / "labels.parquet"
    pd.DataFrame({"asset": ["a"], "start_ms": [1000], "end_ms": [5000]}).to_parquet(parquet)
    assert read_label_ranges(str(parquet)) == [("a", 1000, 5000)]


@pytest.mark.parametrize("content, problem", [
    ("asset,start\np,1\n", "no column start_ms, end_ms"),
    ("asset,start_ms,end_ms\np,5000,1000\n", "row 0 ends before it starts"),
    ("asset,start_ms,end_ms\np,soon,1000\n", "unparsable timestamps"),
])
def test_bad_labels_fail_the_run(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(TrainError, match=problem):
        read_label_ranges(str(path))
    with pytest.raises(TrainError, match="cannot read the labels"):
        read_label_ranges(str(tmp_path / "missing.csv"))


def test_a_model_whose_levels_its_scores_cannot_reach_is_refused(tiny_bundle: ModelBundle) -> None:
    """Levels a million times too high: it would never alert, so its alert fraction and forecast error
    cannot tell it from the serving model."""
    deaf = with_levels_scaled(tiny_bundle, "deaf", 1e6)
    c = compare(tiny_bundle, deaf, holdout_batches(), tiny_settings().grid)
    assert c.challenger.forecast_error == pytest.approx(c.champion.forecast_error, rel=1e-9)
    assert c.challenger.alert_fraction <= c.champion.alert_fraction
    d = decide(c, 0.05)
    assert not d.publish and "less sensitive" in d.reason
    assert c.champion.score_level > 0.05  # a fitted model reads its normal steps well within reach of its levels


def test_a_model_compared_with_itself_has_the_same_score_level(tiny_bundle: ModelBundle) -> None:
    c = compare(tiny_bundle, variant(tiny_bundle, "same"), holdout_batches(), tiny_settings().grid)
    assert c.challenger.score_level == c.champion.score_level and math.isfinite(c.champion.score_level)
