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
from trainers.gate import (ALERT_SLACK, GateError, GateFigures, compare, decide, incompatibility,
                           unconditional)
from trainers.train import Exclusions, TrainError, read_label_ranges

HOLDOUT_START = 1_700_100_000_000


def figures(error: float, alerts: float, steps: int = 1000, version: str = "v") -> GateFigures:
    return GateFigures(version, steps, error, alerts, alerts=0)


# ---------------------------------------------------------------- decisions


@pytest.mark.parametrize("champion, challenger, publish, why", [
    (figures(1.0, 0.010), figures(0.8, 0.005), True, "not worse"),                 # better
    (figures(1.0, 0.010), figures(1.0, 0.010), True, "not worse"),                 # equal
    (figures(1.0, 0.010), figures(1.049, 0.0105), True, "not worse"),              # worse within the margin
    (figures(1.0, 0.010), figures(1.06, 0.010), False, "forecast error 1.06 above the limit 1.05"),
    (figures(1.0, 0.010), figures(0.9, 0.0117), False, "alert fraction 0.0117 above the limit 0.0115"),
    (figures(1.0, 0.0), figures(1.0, ALERT_SLACK / 2), True, "not worse"),         # a quiet champion: slack
    (figures(1.0, 0.0), figures(1.0, 2 * ALERT_SLACK), False, "alert fraction"),
    (figures(1.0, 0.0), figures(math.nan, 0.0), False, "forecast error nan"),      # no feature moved
    (figures(1.0, 0.0), figures(0.5, 0.0, steps=0), False, "no held-out step"),
])
def test_decisions(champion: GateFigures, challenger: GateFigures, publish: bool, why: str) -> None:
    d = decide(champion, challenger, margin=0.05)
    assert d.publish is publish
    assert why in d.reason
    recorded = json.loads(json.dumps(d.to_dict(), allow_nan=False))  # goes into the bundle's JSON manifest
    assert recorded["decision"] == ("publish" if publish else "refuse")
    assert recorded["champion"]["forecast_error"] == champion.forecast_error
    assert recorded["margin"] == 0.05


def test_both_figures_worse_are_both_named() -> None:
    d = decide(figures(1.0, 0.01), figures(2.0, 0.5), margin=0.05)
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
    champion, challenger = compare(tiny_bundle, variant(tiny_bundle, "same"), holdout_batches(), grid)
    # Every step after the first warm-up window is scored: 2 assets × (300 - 8).
    assert champion.steps == challenger.steps == 2 * (300 - tiny_bundle.warmup_steps)
    assert challenger.forecast_error == champion.forecast_error
    assert challenger.alert_fraction == champion.alert_fraction
    assert set(champion.feature_error) == set(FEATURES)
    assert decide(champion, challenger, 0.05).publish


def test_forecast_error_does_not_depend_on_the_model_s_own_error_units(tiny_bundle: ModelBundle) -> None:
    """A model reporting its errors in units 10× larger has the same raw errors: the same figure."""
    rescaled = variant(tiny_bundle, "rescaled", error_scale=tiny_bundle.error_scale * 10)
    champion, challenger = compare(tiny_bundle, rescaled, holdout_batches(), tiny_settings().grid)
    assert challenger.forecast_error == pytest.approx(champion.forecast_error, rel=1e-9)


def test_a_model_predicting_no_change_scores_about_one(tiny_bundle: ModelBundle) -> None:
    persistence = with_head(tiny_bundle, "persistence", kernel=0.0, bias=0.0)
    _, figures_ = compare(tiny_bundle, persistence, holdout_batches(), tiny_settings().grid)
    assert figures_.forecast_error == pytest.approx(1.0, abs=0.05)


def test_a_worse_forecaster_is_refused(tiny_bundle: ModelBundle) -> None:
    drifting = with_head(tiny_bundle, "drifting", kernel=0.0, bias=0.5)  # always predicts half a std of change
    champion, challenger = compare(tiny_bundle, drifting, holdout_batches(), tiny_settings().grid)
    assert challenger.forecast_error > 2 * champion.forecast_error
    d = decide(champion, challenger, 0.05)
    assert not d.publish and "forecast error" in d.reason


def test_a_model_alerting_on_normal_data_is_refused(tiny_bundle: ModelBundle) -> None:
    own = tiny_bundle.asset_levels
    jumpy = variant(tiny_bundle, "jumpy", forecast_level=tiny_bundle.forecast_level * 0.05,
                    novelty_level=tiny_bundle.novelty_level * 0.05,
                    asset_levels=AssetLevels(own.names, own.forecast * 0.05, own.novelty * 0.05))
    champion, challenger = compare(tiny_bundle, jumpy, holdout_batches(), tiny_settings().grid)
    assert challenger.forecast_error == pytest.approx(champion.forecast_error, rel=1e-9)
    assert challenger.alert_fraction > champion.alert_fraction + 10 * ALERT_SLACK
    assert challenger.alerts >= 1
    d = decide(champion, challenger, 0.05)
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
