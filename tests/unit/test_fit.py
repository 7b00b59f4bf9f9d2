"""Fitting from a stream of batches: one pass over the source, bounded pieces afterwards,
the same bundle as fitting the concatenation, and calibration equal to the in-memory way."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from pipeline import fit, thresholds
from pipeline.bundle import AssetHeads, ModelBundle
from pipeline.fit import (
    FitError,
    FitReport,
    Moments,
    UpperQuantile,
    fit_bundle,
    fit_stream,
    flat_runs_from,
    holdout_start,
    ridge_from_gram,
    spill_history,
)
from pipeline.grid import FleetGrid, GridConfig, GridSteps
from pipeline.model import StepFunction
from pipeline.readings import DecodedBatch
from pipeline.scoring import novelty_design, score_steps
from pipeline.state import PRIOR_LEVEL, FleetState
from pipeline.tables import frame_to_batch
from pipeline.thresholds import (
    TermLevels,
    calibrate_levels,
    combine,
    ewma_series,
    excursion_factor,
    feature_quantile,
    flat_runs,
)

from .conftest import FEATURES, sine_frame, tiny_settings

START_MS = 1_700_000_000_000
SETTINGS = tiny_settings()


def _frame() -> pd.DataFrame:
    """Two assets of unequal length: p1 600 steps, p2 only its last 500; "c" is read in whole
    units, so it repeats near its peaks (flat runs to calibrate)."""
    frame = sine_frame(600, assets=("p1", "p2"))
    frame["c"] = frame["c"].round()
    late_start = (frame["asset"] == "p2") & (frame["ts"] < START_MS + 100 * 1000)
    return frame[~late_start].reset_index(drop=True)


def _batch(frame: pd.DataFrame) -> DecodedBatch:
    return frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset")


def _thirds(frame: pd.DataFrame) -> list[DecodedBatch]:
    """Three consecutive time slices; every slice holds both assets, interleaved."""
    edges = [0, len(frame) // 3, 2 * len(frame) // 3, len(frame)]
    return [_batch(frame.iloc[a:b]) for a, b in zip(edges, edges[1:])]


@pytest.fixture(scope="module")
def whole() -> tuple[ModelBundle, FitReport]:
    return fit_bundle(_batch(_frame()), SETTINGS, metadata={"source": "unit"})


@pytest.fixture(scope="module")
def streamed() -> tuple[ModelBundle, FitReport, int]:
    """The same history as three batches, read and scored in small pieces (many scoring calls
    of two assets with unequal lengths, many flushes), so every carry is exercised."""
    calls = 0

    def open_batches() -> Iterator[DecodedBatch]:
        nonlocal calls
        calls += 1
        return iter(_thirds(_frame()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit, "READ_STEPS", 37)
        mp.setattr(fit, "SCORE_CHUNK", 50)
        mp.setattr(fit, "SCORE_ROWS", 100)
        mp.setattr(fit, "SPILL_BUFFER_BYTES", 1000)
        bundle, report = fit_stream(open_batches, SETTINGS)
    return bundle, report, calls


def test_a_stream_of_three_batches_fits_the_same_bundle_as_their_concatenation(whole, streamed) -> None:  # type: ignore[no-untyped-def]
    (b1, r1), (b2, r2, calls) = whole, streamed
    assert calls == 1  # one pass over the source
    expected_shapes = [(3, 32), (8, 32), (32,), (8, 16), (4, 16), (16,), (4, 3), (3,)]
    assert [w.shape for w in b1.weights] == [w.shape for w in b2.weights] == expected_shapes
    counted = ("rows", "assets", "train_steps", "holdout_steps", "runs")
    assert [getattr(r1, k) for k in counted] == [getattr(r2, k) for k in counted] == [1100, 2, 880, 220, 26]
    assert r1.train_loss == r2.train_loss  # training reads the same runs in the same order
    np.testing.assert_allclose(r1.val_loss, r2.val_loss, rtol=1e-4)
    assert r1.best_epoch == r2.best_epoch
    for a, b in zip(b1.weights, b2.weights):
        np.testing.assert_array_equal(a, b)
    assert b1.scaler.asset_names == b2.scaler.asset_names == ("p1", "p2")
    np.testing.assert_allclose(b1.scaler.asset_mean, b2.scaler.asset_mean, rtol=1e-12)
    np.testing.assert_allclose(b1.scaler.asset_scale, b2.scaler.asset_scale, rtol=1e-12)
    np.testing.assert_allclose(b1.novelty_coef, b2.novelty_coef, rtol=1e-9, atol=1e-12)
    # Scoring in 50-step chunks differs from one call by float32 rounding only.
    for name in ("error_scale", "novelty_scale", "forecast_level", "novelty_level", "flat_limit"):
        np.testing.assert_allclose(getattr(b1, name), getattr(b2, name), rtol=1e-4, err_msg=name)
    assert b1.thresholds.normal_mean == pytest.approx(b2.thresholds.normal_mean, rel=1e-4)
    assert b1.thresholds.normal_std == pytest.approx(b2.thresholds.normal_std, rel=1e-3)


def _in_memory_steps(batch: DecodedBatch) -> dict[str, GridSteps]:
    grid = FleetGrid(GridConfig.from_settings(SETTINGS.grid, len(FEATURES)))
    res = grid.ingest(batch.asset, batch.ts_ms, batch.feature, batch.value, batch.record_index,
                      batch.record_index, now_ms=None)
    steps = GridSteps.concat([res.steps, grid.flush().steps], len(FEATURES))
    return {a: steps.take(np.flatnonzero(steps.asset == a)) for a in ("p1", "p2")}


def test_the_bundle_equals_an_in_memory_fit_with_the_same_weights(whole) -> None:  # type: ignore[no-untyped-def]
    """Scaling, novelty map, error scale and every calibrated level, recomputed from the whole
    history in memory with the thresholds module's own functions."""
    bundle, report = whole
    per_asset = _in_memory_steps(_batch(_frame()))
    assert {a: len(s) for a, s in per_asset.items()} == {"p1": 600, "p2": 500}
    cuts = {"p1": 480, "p2": 400}
    assert (report.train_steps, report.holdout_steps) == (880, 220)
    train = {a: s.values[:cuts[a]] for a, s in per_asset.items()}
    np.testing.assert_allclose(bundle.scaler.asset_mean, [train[a].mean(axis=0) for a in ("p1", "p2")], rtol=1e-12)
    np.testing.assert_allclose(bundle.scaler.asset_scale, [train[a].std(axis=0) for a in ("p1", "p2")], rtol=1e-10)
    everything = np.concatenate(list(train.values()))
    np.testing.assert_allclose(bundle.scaler.mean, everything.mean(axis=0), rtol=1e-12)

    scaled = np.concatenate([bundle.scaler.transform(np.full(len(v), a, object), v) for a, v in train.items()])
    design = novelty_design(scaled)
    gram, n = design.T @ design, len(scaled)
    # The map's inputs are held to the range each feature spanned in training (all assets), widened.
    low, high = scaled.min(axis=0), scaled.max(axis=0)
    margin = fit.NOVELTY_RANGE_MARGIN * (high - low)
    np.testing.assert_allclose(bundle.novelty_range, [low - margin, high + margin], rtol=1e-6, atol=1e-6)

    def ridge(g: np.ndarray, rows: int) -> np.ndarray:
        coef = np.zeros((2 * len(FEATURES), len(FEATURES)))
        for j in range(len(FEATURES)):
            others = [i for i in range(2 * len(FEATURES)) if i % len(FEATURES) != j]
            coef[others, j] = np.linalg.solve(g[np.ix_(others, others)] + 0.01 * rows * np.eye(len(others)), g[others, j])
        return coef

    coef = ridge(gram, n)
    np.testing.assert_allclose(bundle.novelty_coef, coef, rtol=1e-9, atol=1e-12)
    resid = scaled - design @ coef
    np.testing.assert_allclose(bundle.novelty_scale, np.sqrt(np.mean(resid**2, axis=0)), rtol=1e-6)
    # Training steps' novelty for calibration: each from the map fitted without its block (5 per asset).
    block = np.concatenate([np.arange(cuts[a]) * fit.NOVELTY_FOLDS // cuts[a] for a in train])
    fold_coef = [ridge(gram - design[block == k].T @ design[block == k], n - int((block == k).sum()))
                 for k in range(fit.NOVELTY_FOLDS)]
    oof = np.empty_like(scaled)
    for k in range(fit.NOVELTY_FOLDS):
        oof[block == k] = (scaled[block == k] - design[block == k] @ fold_coef[k]) / bundle.novelty_scale
    first = np.cumsum([0] + [cuts[a] for a in train])

    t = SETTINGS.threshold
    state = FleetState(GridConfig.from_settings(SETTINGS.grid, len(FEATURES)), bundle.units, len(FEATURES))
    model = StepFunction(len(FEATURES), bundle.units, bundle.weights)
    fc, nv, runs, held, residuals = [], [], [], [], []
    for i, (a, steps) in enumerate(per_asset.items()):
        out = score_steps(state, model, bundle, steps)
        novelty = out.novelty.copy()
        novelty[:cuts[a]] = oof[first[i]:first[i + 1]]
        residuals.append(novelty)
        fc.append(ewma_series(out.errors**2, t.smoothing_alpha, PRIOR_LEVEL))
        nv.append(ewma_series(novelty**2, t.novelty_alpha, PRIOR_LEVEL))
        runs.append(flat_runs(steps.values))
        held.append(np.arange(len(steps)) >= cuts[a])
    fc_all, nv_all, runs_all, held_all = map(np.concatenate, (fc, nv, runs, held))
    # Levels stretched for the few independent excursions of each term's calibration steps.
    q = feature_quantile(t.quantile, len(FEATURES))

    def fc_margin(steps: int) -> float:
        return t.margin * excursion_factor(steps, t.smoothing_alpha, q)

    # ... and the novelty level for the few independent values a slow residual holds: steps per
    # independent value from the residuals' batch means (thresholds.BatchMeans), pooled over assets.
    # Each asset's steps and batch means are taken about its own mean.
    mu = [np.nanmean(r, axis=0) for r in residuals]
    step_sq = np.nanmean(np.concatenate([r - m for r, m in zip(residuals, mu)]) ** 2, axis=0)
    per_size = {}
    for b in thresholds.BATCH_SIZES:
        means = np.concatenate([np.nanmean(r[:len(r) // b * b].reshape(-1, b, len(FEATURES)), axis=1) - m
                                for r, m in zip(residuals, mu)])
        if len(means) >= thresholds.MIN_BATCHES:
            per_size[b] = b * np.mean(means**2, axis=0) / step_sq
    tau = np.maximum([next((est[j] for b, est in per_size.items() if b >= thresholds.BATCH_WINDOW * est[j]),
                           list(per_size.values())[-1][j]) for j in range(len(FEATURES))], 1.0)
    assert np.all(tau >= 1.0) and tau.max() < 100

    def nv_margin(steps: int) -> np.ndarray:
        return (t.novelty_margin * excursion_factor(steps, t.novelty_alpha, q)
                * thresholds.scale_uncertainty_factor(steps / tau, q))

    np.testing.assert_allclose(bundle.forecast_level, calibrate_levels(fc_all[held_all], t.quantile, fc_margin(220)),
                               rtol=1e-5)  # float32 LSTM: two assets per call there, one here
    np.testing.assert_allclose(bundle.novelty_level, calibrate_levels(nv_all, t.quantile, nv_margin(1100)),
                               rtol=1e-7)
    # A feature held three steps in a row on more than flat_repeat_share of training steps ("c", read
    # in whole units) is never judged stuck; the others may repeat twice their longest training run.
    train_runs = runs_all[~held_all]
    repeats = (train_runs > 1).mean(axis=0) > t.flat_repeat_share
    assert repeats.tolist() == [False, False, True]
    longest = np.where(repeats, fit.NEVER_STUCK_RUN, train_runs.max(axis=0))
    np.testing.assert_array_equal(bundle.flat_limit, np.maximum(t.flat_factor * longest, 10))
    # Every asset here has enough held-out steps for levels of its own, from its own steps only.
    own = bundle.asset_levels
    assert set(own.names) == set(per_asset)
    for i, a in enumerate(per_asset):
        k = own.names.index(a)
        n_held = int(held[i].sum())
        np.testing.assert_allclose(own.forecast[k], calibrate_levels(fc[i][held[i]], t.quantile, fc_margin(n_held)),
                                   rtol=1e-5)
        np.testing.assert_allclose(own.novelty[k], calibrate_levels(nv[i], t.quantile, nv_margin(len(nv[i]))),
                                   rtol=1e-7)
    assert not np.allclose(own.forecast[0], own.forecast[1])
    asset_of = np.concatenate([np.full(len(s), a, dtype=object) for a, s in per_asset.items()])
    score = combine(fc_all[held_all], nv_all[held_all], runs_all[held_all],
                    TermLevels.for_assets(bundle, asset_of[held_all])).score
    assert bundle.thresholds.normal_mean == pytest.approx(np.mean(score), rel=1e-5)
    assert bundle.thresholds.normal_std == pytest.approx(np.std(score), rel=1e-5)


def test_the_error_scale_is_the_rms_of_the_best_epochs_errors(whole) -> None:  # type: ignore[no-untyped-def]
    bundle, report = whole
    per_asset = _in_memory_steps(_batch(_frame()))
    state = FleetState(GridConfig.from_settings(SETTINGS.grid, len(FEATURES)), bundle.units, len(FEATURES))
    model = StepFunction(len(FEATURES), bundle.units, bundle.weights)
    errors = np.concatenate([score_steps(state, model, bundle, s).errors for s in per_asset.values()])
    scored = errors[np.isfinite(errors).all(axis=1)]
    assert len(scored) == 1100 - 2 * SETTINGS.model.timesteps  # warm-up after each asset's first step
    np.testing.assert_allclose(np.sqrt(np.mean(scored**2, axis=0)), 1.0, rtol=1e-5)
    # Early stopping judged the network's own output layer, before the per-asset ones were fitted.
    assert bundle.heads.names == ("p1", "p2")
    shared = dataclasses.replace(bundle, heads=AssetHeads())
    state = FleetState(GridConfig.from_settings(SETTINGS.grid, len(FEATURES)), bundle.units, len(FEATURES))
    errors = np.concatenate([score_steps(state, model, shared, s).errors for s in per_asset.values()])
    held = np.concatenate([errors[480:600], errors[600 + 400:]])
    held = held[np.isfinite(held).all(axis=1)] * bundle.error_scale
    assert bundle.metadata["validation_error"] == pytest.approx(np.mean(held**2), abs=1e-6)


def test_metadata_records_data_range_rows_epochs_and_losses(whole) -> None:  # type: ignore[no-untyped-def]
    bundle, report = whole
    frame = _frame()
    m = bundle.metadata
    assert (m["data_start_ms"], m["data_end_ms"]) == (START_MS, START_MS + 599_000)
    assert m["rows"] == report.rows == len(frame) == 1100
    assert (m["assets"], m["grid_steps"], m["train_steps"], m["holdout_steps"]) == (2, 1100, 880, 220)
    assert 1 <= m["best_epoch"] <= m["epochs"] == report.epochs == len(m["train_loss"]) == len(m["val_loss"])
    assert m["train_loss"] == [round(v, 6) for v in report.train_loss]
    assert m["validation_error"] == round(report.val_loss[report.best_epoch - 1], 6)
    assert m["source"] == "unit" and m["late_readings"] == 0


def test_the_hold_out_is_the_time_ordered_tail_of_each_asset(tmp_path: Path) -> None:
    frame = _frame()
    history, source = spill_history(lambda: iter(_thirds(frame)), SETTINGS, str(tmp_path))
    assert history.names == ["p1", "p2"] and history.counts.tolist() == [600, 500]
    assert source.rows == 1100 and (source.start_ms, source.end_ms) == (START_MS, START_MS + 599_000)
    cut = holdout_start(history.counts, SETTINGS.model.validation_fraction)
    assert cut.tolist() == [480, 400]
    expected = _in_memory_steps(_batch(frame))
    for i, name in enumerate(history.names):
        rec = history.read(i, 0, int(history.counts[i]))
        np.testing.assert_array_equal(rec["step"], expected[name].step)  # every step, in time order
        np.testing.assert_array_equal(rec["values"], expected[name].values)
        assert rec["reset"].tolist() == [True] + [False] * (len(rec) - 1)
        assert rec["step"][cut[i]:].min() > rec["step"][:cut[i]].max()
        assert rec["step"][-1] == (START_MS + 599_000) // 1000


def test_holdout_start_rounds_each_assets_share() -> None:
    assert holdout_start(np.array([10, 1, 7, 0]), 0.2).tolist() == [8, 1, 6, 0]


@pytest.mark.parametrize(("stamps_s", "message"), [
    (np.arange(20), "only 20 grid steps"),
    (np.arange(40) * 40, "no stretch of 9 consecutive"),  # every gap resets the asset
])
def test_a_history_too_short_is_refused_and_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  stamps_s: np.ndarray, message: str) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    frame = pd.DataFrame({"asset": "p1", "ts": START_MS + stamps_s * 1000, "a": np.sin(stamps_s), "b": 1.0,
                          "c": np.cos(stamps_s)})
    with pytest.raises(FitError, match=message):
        fit_bundle(_batch(frame), SETTINGS)
    assert os.listdir(tmp_path) == []


def test_scoring_blocks_bound_the_padded_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit, "SCORE_CHUNK", 50)
    monkeypatch.setattr(fit, "SCORE_ROWS", 100)
    counts = np.array([3, 3, 3, 400, 20, 20, 20, 20, 20, 7])
    blocks = [b.tolist() for b in fit.scoring_blocks(counts)]
    assert blocks == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]  # lanes × widest chunk (<= 50) <= 100


def test_an_empty_source_is_refused() -> None:
    with pytest.raises(FitError, match="only 0 grid steps"):
        fit_stream(lambda: iter([]), SETTINGS)


# ---------------------------------------------------------------- streamed statistics


def _split(data: Any, cuts: list[int]) -> list[Any]:
    edges = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(edges, edges[1:])]


values_2d = st.integers(1, 60).flatmap(lambda n: st.lists(
    st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, 1e6]), min_size=3, max_size=3), min_size=n, max_size=n))


@hyp_settings(max_examples=60, deadline=None)
@given(values_2d, st.lists(st.integers(0, 60), max_size=4))
def test_flat_runs_continue_across_pieces(rows: list[list[float]], cuts: list[int]) -> None:
    values = np.array(rows)
    prev, run, out = np.full(3, np.nan), np.zeros(3, np.int64), []
    for piece in _split(values, cuts):
        runs = flat_runs_from(piece, prev, run)
        prev, run = piece[-1], runs[-1]
        out.append(runs)
    np.testing.assert_array_equal(np.concatenate(out), flat_runs(values))


@hyp_settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.lists(st.integers(0, 400), max_size=5), st.integers(0, 2**32 - 1))
def test_moments_and_upper_quantiles_from_pieces_equal_numpys(n: int, cuts: list[int], seed: int) -> None:
    values = np.random.default_rng(seed).lognormal(size=(n, 3)) + 100.0
    moments, top = Moments((3,)), UpperQuantile(n, 0.9985, 3)
    for piece in _split(values, cuts):
        moments.add(piece)
        top.add(piece)
    np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.std, values.std(axis=0), rtol=1e-8)
    np.testing.assert_allclose(top.value(), np.quantile(values, 0.9985, axis=0), rtol=1e-13)
    assert len(top.top) <= max(2, int(np.ceil(n * 0.0015)) + 1)  # only the tail is held


def test_an_upper_quantile_refuses_a_short_count() -> None:
    top = UpperQuantile(5, 0.5, 1)
    top.add(np.ones((4, 1)))
    with pytest.raises(FitError, match="expected 5"):
        top.value()


def test_the_ridge_residual_rms_from_the_gram_matrix_equals_the_direct_one() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4))
    x[:, 2] = 0.7 * x[:, 0] - 0.2 * x[:, 1] ** 2 + 0.01 * rng.normal(size=500)  # nearly explained
    design = novelty_design(x)
    coef, rms = ridge_from_gram(design.T @ design, len(x))
    assert np.all(coef[[2, 6], 2] == 0)  # a feature never explains itself
    np.testing.assert_allclose(rms, np.sqrt(np.mean((x - design @ coef) ** 2, axis=0)), rtol=1e-7)
    assert rms[2] < 0.05 < 0.9 < rms[3]  # explained by the others, and pure noise


def test_each_assets_own_output_layer_fits_its_training_steps_better_than_the_shared_one(whole) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = whole
    per_asset = _in_memory_steps(_batch(_frame()))
    cuts = {"p1": 480, "p2": 400}
    model = StepFunction(len(FEATURES), bundle.units, bundle.weights)

    def training_mse(b: ModelBundle) -> dict[str, float]:
        state = FleetState(GridConfig.from_settings(SETTINGS.grid, len(FEATURES)), b.units, len(FEATURES))
        return {a: float(np.nanmean((score_steps(state, model, b, s).errors[:cuts[a]] * b.error_scale) ** 2))
                for a, s in per_asset.items()}

    own, shared = training_mse(bundle), training_mse(dataclasses.replace(bundle, heads=AssetHeads()))
    assert all(own[a] < shared[a] for a in per_asset), (own, shared)


def test_a_history_of_one_asset_keeps_the_networks_own_output_layer() -> None:
    """With one asset the network's output layer was fitted on it alone: no layer of its own."""
    assert SETTINGS.model.per_asset_heads
    frame = _frame()
    bundle, _ = fit_bundle(_batch(frame[frame["asset"] == "p1"]), SETTINGS)
    assert bundle.heads.names == ()
