"""A feature that never moved in training is not read: whatever it does later neither changes the
other features' scores nor opens an alert (on SMD such metrics moved through normal test days)."""

from __future__ import annotations

import numpy as np

from pipeline.bundle import UNREAD_SCALE, Scaler, scale_from, unread_mask
from pipeline.engine import DetectionEngine
from pipeline.evaluation import Series, replay
from pipeline.fit import FewValues, fit_bundle
from pipeline.tables import frame_to_batch

from .conftest import FEATURES, sine_frame, tiny_settings

SETTINGS = tiny_settings(**{"model.per_asset_heads": "false"})


def test_a_flat_feature_standardises_to_about_zero_and_a_moving_one_to_its_spread() -> None:
    mean, sd = np.array([100.0, 0.0, 5.0]), np.array([0.0, 0.0, 2.0])
    scale = scale_from(mean, sd)
    assert scale[0] == UNREAD_SCALE * 100.0 and scale[1] == UNREAD_SCALE and scale[2] == 2.0
    moved = (np.array([1e6, -1e6, 9.0]) - mean) / scale
    assert np.all(np.abs(moved[:2]) < 1e-5) and moved[2] == 2.0
    with np.errstate(over="raise"):  # a flat feature at an absurd level still gets a finite scale
        huge = scale_from(np.array([1e300]), np.array([0.0]))
        assert np.isfinite(huge).all() and unread_mask(np.array([1e300]), huge).all()


def test_the_unread_features_are_named_for_the_fleet_and_for_each_asset_that_held_them_still() -> None:
    fleet = scale_from(np.array([1.0, 0.0, 3.0]), np.array([0.5, 0.0, 1.0]))
    own = np.stack([scale_from(np.array([1.0, 0.0, 3.0]), np.array([0.0, 0.0, 1.0])),
                    scale_from(np.array([1.0, 0.0, 3.0]), np.array([0.5, 0.0, 1.0]))])
    scaler = Scaler(np.zeros(3), fleet, ("p1", "p2"), np.zeros((2, 3)), own)
    assert scaler.unread(FEATURES) == {"fleet": ["b"], "p1": ["a"]}
    assert Scaler(np.zeros(3), np.ones(3)).unread(FEATURES) == {}


def _series(values_c: np.ndarray, start_ms: int) -> Series:
    frame = sine_frame(len(values_c), seed=1, start_ms=start_ms)
    frame["c"] = values_c
    return Series("p1", frame["ts"].to_numpy(np.int64), frame[list(FEATURES)].to_numpy(float))


def test_a_feature_constant_in_training_moves_later_without_changing_any_score() -> None:
    history = sine_frame(600)
    history["c"] = 100.0  # a channel that never moved while the model learned
    bundle, _ = fit_bundle(frame_to_batch(history, FEATURES, ts_col="ts", asset_col="asset"), SETTINGS)
    start = int(history["ts"].max()) + 1000
    n = 400
    still = _series(np.full(n, 100.0), start)
    jumps = _series(100.0 + 50.0 * (np.arange(n) // 40 % 2), start)  # steps of 50 every 40 s
    quiet = replay(bundle, SETTINGS.grid, [still], as_asset="p1")["p1"]
    moving = replay(bundle, SETTINGS.grid, [jumps], as_asset="p1")["p1"]
    scored = np.isfinite(quiet.alert_score)
    assert scored.sum() > n // 2
    assert np.array_equal(scored, np.isfinite(moving.alert_score))
    np.testing.assert_allclose(moving.alert_score[scored], quiet.alert_score[scored], rtol=1e-5, atol=1e-6)
    assert moving.spans == quiet.spans
    assert bundle.metadata["unread_features"] == {"fleet": ["c"]}
    assert bundle.metadata["two_valued_features"] == []

    # Its own forecast and novelty terms count nothing, for a known asset and for one in its cold start.
    for asset in ("p1", "unseen"):
        frame = sine_frame(800, seed=2, start_ms=start)
        frame["asset"] = asset
        frame["c"] = 100.0 + 50.0 * (np.arange(800) // 40 % 2)
        out = DetectionEngine(bundle, SETTINGS.grid).process(frame_to_batch(frame, FEATURES, ts_col="ts",
                                                                            asset_col="asset"))
        read = np.isfinite(out.errors[:, 0])
        assert read.sum() > 300
        assert np.all(out.errors[read, 2] == 0.0)
        assert np.nanmax(out.terms[:, :2]) < 10  # its level, calibrated on zeros, is not the yardstick
        assert all(f != "c" for e in out.events for f, _ in e.top_features)


def test_distinct_values_are_counted_up_to_three_over_pieces() -> None:
    few = FewValues(3)
    few.add(np.array([[0.0, 1.0, 5.0], [1.0, 1.0, np.nan]]))
    few.add(np.array([[0.0, 1.0, 6.0], [1.0, 2.0, 7.0], [0.0, 3.0, 5.0]]))
    assert few.count().tolist() == [2, 3, 3]


def test_a_two_valued_feature_is_pointed_out_as_a_flag() -> None:
    history = sine_frame(600)
    history["c"] = (np.arange(600) // 50 % 7 == 0).astype(float)  # a command: on for 50 steps now and then
    bundle, _ = fit_bundle(frame_to_batch(history, FEATURES, ts_col="ts", asset_col="asset"), SETTINGS)
    assert bundle.metadata["two_valued_features"] == ["c"]
    assert bundle.metadata["unread_features"] == {}
