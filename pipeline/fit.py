"""Fit a model bundle from normal history.

1. Every asset's history goes through the same event-time grid as the live stream.
2. The tail of each asset's grid (``validation_fraction``, in time order) is held out.
3. Scaling is learned on the training part, per asset when enabled (one network, many
   operating points).
4. Training runs are ``chunks_per_run × timesteps`` consecutive steps; S runs are trained
   side by side with their LSTM state carried from window to window (truncated BPTT), and
   reset between groups of runs, so the network learns under carried state.
5. Each epoch is validated by scoring the held-out tail through the production scoring
   path, state carried from the training part; the best epoch's weights are kept
   (early stopping).
6. The per-feature error scale and the threshold are calibrated from those held-out scores.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipeline.bundle import ModelBundle, Scaler, ThresholdParams
from pipeline.grid import FleetGrid, GridConfig, GridSteps
from pipeline.model import StepFunction, build_training_model, reset_training_state
from pipeline.readings import DecodedBatch
from pipeline.scoring import novelty_design, score_steps, segment_bounds
from pipeline.settings import Settings
from pipeline.state import PRIOR_LEVEL, FleetState
from pipeline.thresholds import TermLevels, calibrate_levels, combine, ewma_series, flat_runs

MIN_SCALE = 1e-6


class FitError(ValueError):
    """The history cannot produce a model (too short, all gaps, …)."""


@dataclass
class FitReport:
    rows: int
    assets: int
    train_steps: int
    holdout_steps: int
    runs: int
    epochs: int
    best_epoch: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    duration_s: float = 0.0


def grid_history(batch: DecodedBatch, settings: Settings) -> GridSteps:
    """Put a whole history on the grid (event time, no wall-clock cap) and close everything."""
    f = len(settings.model.features)
    grid = FleetGrid(GridConfig.from_settings(settings.grid, f))
    # One asset at a time keeps the grid's open-step bookkeeping small for long histories.
    res = grid.ingest(batch.asset, batch.ts_ms, batch.feature, batch.value, batch.record_index,
                      batch.record_index, now_ms=None)
    return GridSteps.concat([res.steps, grid.flush().steps], f)


def _split_holdout(steps: GridSteps, fraction: float) -> np.ndarray:
    """True for the time-ordered tail of each asset's steps."""
    hold = np.zeros(len(steps), bool)
    starts = segment_bounds(steps.asset, np.zeros(len(steps), bool))
    for a, b in zip(starts, np.append(starts[1:], len(steps))):
        cut = a + int(round((b - a) * (1 - fraction)))
        hold[cut:b] = True
    return hold


def robust_scale(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per column, with a floor so a flat feature cannot explode.

    A feature that never moved in training gets 0.1 % of its level as its scale (1 when
    its level is 0): any later movement is then large but finite.
    """
    mean, sd = values.mean(axis=0), values.std(axis=0)
    level = np.abs(mean)
    flat = sd <= 1e-9 * np.maximum(level, 1.0)
    scale = np.where(flat, np.where(level > 0, 1e-3 * level, 1.0), np.maximum(sd, MIN_SCALE))
    return mean, scale


def fit_scaler(steps: GridSteps, train: np.ndarray, per_asset: bool) -> Scaler:
    values = steps.values[train]
    mean, scale = robust_scale(values)
    if not per_asset:
        return Scaler(mean, scale)
    names = tuple(dict.fromkeys(steps.asset[train].tolist()))
    pairs = [robust_scale(values[steps.asset[train] == name]) for name in names]
    return Scaler(mean, scale, names, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def training_runs(scaled: np.ndarray, steps: GridSteps, train: np.ndarray, timesteps: int, chunks: int,
                  streams: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs and next-step change targets of shape (runs, chunks·T, F) from the training segments.

    Runs never cross a reset or an asset boundary. Few runs → overlapping starts.
    """
    idx = np.flatnonzero(train)
    starts = segment_bounds(steps.asset[idx], steps.reset[idx])
    segments = [idx[a:b] for a, b in zip(starts, np.append(starts[1:], len(idx)))]
    longest = max((len(s) for s in segments), default=0)
    chunks = min(chunks, (longest - 1) // timesteps)
    if chunks < 1:
        raise FitError(f"no stretch of {timesteps + 1} consecutive normal steps to train on (longest {longest})")
    length = chunks * timesteps
    usable = [s for s in segments if len(s) >= length + 1]
    stride = length
    if sum((len(s) - length - 1) // stride + 1 for s in usable) < 2 * streams:
        stride = max(1, timesteps // 4)
    picks = [s[o:o + length + 1] for s in usable for o in range(0, len(s) - length, stride)]
    runs = np.stack([scaled[p] for p in picks]).astype(np.float32)
    # Targets are the change to the next step; scoring adds it back to the current value.
    return runs[:, :-1], runs[:, 1:] - runs[:, :-1], chunks


def _version(weights: list[np.ndarray]) -> str:
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()[:8]
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest}"


def novelty_model(scaled: np.ndarray, ridge: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Each feature as a ridge regression on the others and their squares (pump curves are
    not linear); the rows of a feature's own terms are zero. Returns (2F, F) coefficients
    and the residual RMS per feature."""
    n, f = scaled.shape
    design = novelty_design(scaled)
    coef = np.zeros((2 * f, f))
    gram = design.T @ design
    for j in range(f):
        others = [i for i in range(2 * f) if i % f != j]
        a = gram[np.ix_(others, others)] + ridge * n * np.eye(len(others))
        coef[others, j] = np.linalg.solve(a, gram[others, j])
    resid = scaled - design @ coef
    return coef, np.maximum(np.sqrt(np.mean(resid**2, axis=0)), MIN_SCALE)


def _provisional(settings: Settings, period_ms: int, scaler: Scaler, weights: list[np.ndarray],
                 warmup: int) -> ModelBundle:
    """A bundle with unit scales, to read raw scaled errors off the production path."""
    f = len(settings.model.features)
    dummy = ThresholdParams.from_settings(settings.threshold, normal_mean=0.0, normal_std=1.0)
    one = np.ones(f)
    return ModelBundle("provisional", settings.model.features, period_ms, settings.model.timesteps,
                       settings.model.units, warmup, scaler, one, np.zeros((2 * f, f)), one, one, one, one, dummy, weights)


def scaled_errors(bundle: ModelBundle, model: StepFunction, settings: Settings, steps: GridSteps) -> np.ndarray:
    """Per-step, per-feature errors (in the bundle's error units) from the production scoring path."""
    model.model.set_weights(bundle.weights)
    cfg = GridConfig.from_settings(settings.grid, bundle.n_features)
    state = FleetState(cfg, bundle.units, bundle.n_features)
    return score_steps(state, model, bundle, steps).errors


def fit_bundle(batch: DecodedBatch, settings: Settings, *, metadata: dict[str, Any] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[ModelBundle, FitReport]:
    """Train, validate and calibrate a bundle from a long-format batch of normal history."""
    t0 = time.monotonic()
    m = settings.model
    f = len(m.features)
    steps = grid_history(batch, settings)
    if len(steps) < 4 * m.timesteps:
        raise FitError(f"only {len(steps)} grid steps of history; need at least {4 * m.timesteps}")
    hold = _split_holdout(steps, m.validation_fraction)
    train = ~hold
    scaler = fit_scaler(steps, train, m.per_asset_scaling)
    scaled = scaler.transform(steps.asset, steps.values)
    x, y, chunks = training_runs(scaled, steps, train, m.timesteps, m.chunks_per_run, m.streams)
    streams = min(m.streams, len(x))
    warmup = m.timesteps  # a cold state predicts poorly for about one training window
    period_ms = settings.grid.period_ms

    net = build_training_model(f, m.units, streams, m.timesteps, m.learning_rate, m.seed)
    rng = np.random.default_rng(m.seed)
    report = FitReport(rows=batch.n_records, assets=len(set(steps.asset.tolist())), train_steps=int(train.sum()),
                       holdout_steps=int(hold.sum()), runs=len(x), epochs=0, best_epoch=0)
    best_loss, best_weights, stale = np.inf, net.get_weights(), 0
    scorer = StepFunction(f, m.units, best_weights)
    scored_hold = hold.copy()
    for epoch in range(1, m.epochs + 1):
        loss = _train_epoch(net, x, y, streams, chunks, m.timesteps, rng)
        weights = net.get_weights()
        err = scaled_errors(_provisional(settings, period_ms, scaler, weights, warmup), scorer, settings, steps)
        scored_hold = hold & np.isfinite(err).all(axis=1)
        val = float(np.mean(err[scored_hold] ** 2)) if scored_hold.any() else loss
        report.train_loss.append(loss)
        report.val_loss.append(val)
        report.epochs = epoch
        if progress is not None:
            progress({"epoch": epoch, "loss": loss, "val_loss": val})
        if val < best_loss - 1e-6:
            best_loss, best_weights, stale, report.best_epoch = val, weights, 0, epoch
        else:
            stale += 1
            if stale >= m.patience:
                break

    err = scaled_errors(_provisional(settings, period_ms, scaler, best_weights, warmup), scorer, settings, steps)
    scored = np.isfinite(err).all(axis=1)
    error_scale = np.maximum(np.sqrt(np.mean(err[scored] ** 2, axis=0)), MIN_SCALE)
    novelty_coef, novelty_scale = novelty_model(scaled[train])
    novelty = (scaled - novelty_design(scaled) @ novelty_coef) / novelty_scale
    thresholds, levels = _calibrate(steps, err / error_scale, novelty, hold & scored, settings)
    report.duration_s = time.monotonic() - t0
    import keras
    import tensorflow as tf

    meta: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_start_ms": int(batch.ts_ms.min()) if len(batch) else None,
        "data_end_ms": int(batch.ts_ms.max()) if len(batch) else None,
        "rows": report.rows, "assets": report.assets, "train_steps": report.train_steps,
        "holdout_steps": report.holdout_steps, "runs": report.runs, "streams": streams, "chunks": chunks,
        "epochs": report.epochs, "best_epoch": report.best_epoch,
        "train_loss": [round(v, 6) for v in report.train_loss], "val_loss": [round(v, 6) for v in report.val_loss],
        "validation_error": round(best_loss, 6), "duration_s": round(report.duration_s, 2),
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
        **(metadata or {}),
    }
    bundle = ModelBundle(_version(best_weights), m.features, period_ms, m.timesteps, m.units, warmup, scaler,
                         error_scale, novelty_coef, novelty_scale, levels.flat, levels.forecast, levels.novelty,
                         thresholds, best_weights, meta)
    return bundle, report


def _calibrate(steps: GridSteps, errors: np.ndarray, novelty: np.ndarray, held_out: np.ndarray,
               settings: Settings) -> tuple[ThresholdParams, TermLevels]:
    """Thresholds of the score terms from held-out normal steps, the way the engine computes them."""
    t = settings.threshold
    spans = _asset_spans(steps)
    fc = np.concatenate([ewma_series(errors[a:b] ** 2, t.smoothing_alpha, PRIOR_LEVEL) for a, b in spans])
    nv = np.concatenate([ewma_series(novelty[a:b] ** 2, t.novelty_alpha, PRIOR_LEVEL) for a, b in spans])
    runs = np.concatenate([flat_runs(steps.values[a:b]) for a, b in spans])
    train_runs = runs[~held_out].max(axis=0) if (~held_out).any() else np.zeros(steps.values.shape[1])
    flat_limit = np.maximum(t.flat_factor * train_runs, max(t.flat_min_steps, settings.grid.carry_forward_steps + 2))
    # The LSTM can overfit its training steps, so its term is calibrated on held-out steps only;
    # the cross-sectional map has F-1 coefficients per feature, so its slow term is calibrated
    # on the whole history, which holds far more independent excursions of a slow EWMA.
    levels = TermLevels(calibrate_levels(fc[held_out], t.quantile, t.margin),
                        calibrate_levels(nv[np.isfinite(nv).all(axis=1)], t.quantile, t.margin),
                        flat_limit.astype(np.float64))
    combined = combine(fc[held_out], nv[held_out], runs[held_out], levels).score
    combined = combined[np.isfinite(combined)]
    p = ThresholdParams.from_settings(t, normal_mean=float(np.mean(combined)), normal_std=float(np.std(combined)))
    return p, levels


def concat_batches(batches: Iterable[DecodedBatch]) -> DecodedBatch:
    """One batch from many (record indices renumbered so they stay unique)."""
    parts = list(batches)
    offset, idx = 0, []
    for b in parts:
        idx.append(b.record_index + offset)
        offset += b.n_records
    cat = (lambda name, dt: np.concatenate([getattr(b, name) for b in parts]) if parts else np.empty(0, dt))
    return DecodedBatch(np.concatenate(idx) if parts else np.empty(0, np.int64), cat("asset", object),
                        cat("ts_ms", np.int64), cat("feature", np.int32), cat("value", np.float64),
                        [r for b in parts for r in b.rejects], offset)


def fit_stream(open_batches: Callable[[], Iterator[DecodedBatch]], settings: Settings, *,
               metadata: dict[str, Any] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[ModelBundle, FitReport]:
    """Fit from a source of batches (e.g. an archive scan) that can be opened more than once."""
    return fit_bundle(concat_batches(open_batches()), settings, metadata=metadata, progress=progress)


def _asset_spans(steps: GridSteps) -> list[tuple[int, int]]:
    starts = segment_bounds(steps.asset, np.zeros(len(steps), bool))
    return list(zip(starts.tolist(), np.append(starts[1:], len(steps)).tolist()))


def _train_epoch(net: Any, x: np.ndarray, y: np.ndarray, streams: int, chunks: int, timesteps: int,
                 rng: np.random.Generator) -> float:
    """One pass over shuffled groups of S runs, state carried across each run's chunks."""
    order = rng.permutation(len(x))
    n_groups = len(x) // streams
    losses = []
    for g in range(n_groups):
        group = order[g * streams:(g + 1) * streams]
        reset_training_state(net)
        for k in range(chunks):
            sl = slice(k * timesteps, (k + 1) * timesteps)
            losses.append(float(net.train_on_batch(x[group, sl], y[group, sl])))
    return float(np.mean(losses))
