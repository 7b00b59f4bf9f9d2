"""Fit a model bundle from normal history, in memory bounded by chunk sizes and the model.

The source is read once: every asset's readings go through the same event-time grid as
the live stream, batch by batch, and the closed steps are spilled to a temporary
directory, one file per asset in step order (deleted at the end). Everything after that
reads those files in bounded pieces, so memory does not grow with the history:

1. The tail of each asset's steps (``validation_fraction``, in time order) is held out.
2. Scaling is learned on the training part, per asset when enabled (one network, many
   operating points), from moments merged piece by piece; the cross-sectional (novelty)
   map from a Gram matrix accumulated the same way.
3. Training runs are ``chunks_per_run × timesteps`` consecutive steps; S runs are trained
   side by side with their LSTM state carried from window to window (truncated BPTT), and
   reset between groups of runs, so the network learns under carried state. Runs are
   indexed up front; each group reads only its own runs from disk.
4. Each epoch scores the whole history through the production scoring path, chunk by
   chunk with every asset's state carried, and is judged on the held-out tail; the best
   epoch's weights are kept (early stopping). That pass also measures the error scale.
   Fine-tuning (``initial_weights``, e.g. the serving model's) starts from given weights
   and scores them first, as epoch 0: they are kept unless an epoch improves on them.
5. With the best weights, each asset with enough training steps gets its own output layer,
   fitted in closed form on the network's last LSTM outputs (one pass), and the error
   scale is measured again with those layers (another pass).
6. A last pass with the best weights calibrates the score terms as the engine computes
   them: forecast levels on held-out steps, novelty levels on all steps (exact upper
   quantiles, holding only the values above them), for the fleet and for each asset with
   enough held-out steps, each novelty level widened where its residual wanders so slowly
   that the history holds few independent values of it (batch means, piece by piece);
   flat-run limits from the training part; and the combined score's
   normal level from the held-out terms (spilled, then re-read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bundle import MIN_SCALE, AssetHeads, AssetLevels, ModelBundle, Scaler, ThresholdParams, scale_from
from pipeline.grid import FleetGrid, GridConfig, GridCounters, GridSteps
from pipeline.model import StepFunction, build_training_model, reset_training_state
from pipeline.readings import DecodedBatch
from pipeline.scoring import ScoredSteps, novelty_design, scaled_values, score_steps, segment_bounds
from pipeline.settings import Settings
from pipeline.state import PRIOR_LEVEL, FleetState
from pipeline.thresholds import (BatchMeans, TermLevels, combine, ewma, excursion_factor, feature_quantile,
                                 level_from_quantile, scale_uncertainty_factor)

NOVELTY_RIDGE = 0.01
NOVELTY_FOLDS = 5  # blocks of the cross-validation that calibrates the novelty term out of sample
# How far past each feature's training range, as a share of that range, the cross-sectional
# map's inputs still move: a plant that drifts a little past its history keeps its physics
# (the map's quadratic pump curves), a sensor far outside it no longer drags the others.
NOVELTY_RANGE_MARGIN = 0.5
SHORT_HISTORY_WINDOWS = True  # shorten the training window for a short history (history_timesteps)
EXCURSION_STRETCH = True  # stretch levels calibrated on too few independent excursions (thresholds.excursion_factor)
READ_STEPS = 65_536       # steps per read in the numpy-only passes
SCORE_CHUNK = 1_024       # steps per asset per scoring call
SCORE_ROWS = 131_072      # steps per scoring call (assets × chunk): bounds the LSTM's activations
SPILL_BUFFER_BYTES = 32 << 20
# The longest run of a feature never judged stuck (see never_stuck): far beyond any recording.
NEVER_STUCK_RUN = 10**15
ASSET_LEVEL_MIN_HELD = 50  # held-out steps an asset needs for levels of its own (fewer: the fleet's)
HEAD_MIN_PER_UNIT = 4      # training steps per head parameter an asset needs for an output layer of its own
# Assets a history needs for per-asset output layers: with one, the network's own layer was fitted
# on that asset alone (with early stopping on held-out steps), and a refit on the same steps only
# fits them closer (SKAB's per-recording fits lost F1 with it).
HEAD_MIN_ASSETS = 2

Progress = Callable[[dict[str, Any]], None]


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
    initial_val_loss: float | None = None  # fine-tuning: the starting weights' validation error (epoch 0)


# ---------------------------------------------------------------- the history on disk


class History:
    """Every asset's closed grid steps on disk, one file per asset, in step order.

    Values stay float64 as the grid made them, so scaling and flat runs (exact equality of
    raw values) match an in-memory fit. Reads are explicit (``np.fromfile``, not a memory
    map), so only the rows asked for occupy memory.
    """

    def __init__(self, root: str, n_features: int) -> None:
        self.root = Path(root)
        self.n_features = n_features
        self.dtype = np.dtype([("step", "<i8"), ("reset", "?"), ("values", "<f8", (n_features,))])
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._counts: list[int] = []
        self._pending: dict[int, list[bytes]] = {}
        self._pending_bytes = 0

    @property
    def counts(self) -> np.ndarray:
        """Steps per asset, in the order assets were first seen."""
        return np.array(self._counts, np.int64)

    def add(self, steps: GridSteps) -> None:
        """Append closed steps (grouped by asset, in step order within an asset)."""
        starts = segment_bounds(steps.asset, np.zeros(len(steps), bool))
        for a, b in zip(starts.tolist(), np.append(starts[1:], len(steps)).tolist()):
            name = str(steps.asset[a])
            i = self._index.get(name)
            if i is None:
                i = self._index[name] = len(self.names)
                self.names.append(name)
                self._counts.append(0)
            rec = np.empty(b - a, self.dtype)
            rec["step"], rec["reset"], rec["values"] = steps.step[a:b], steps.reset[a:b], steps.values[a:b]
            self._pending.setdefault(i, []).append(rec.tobytes())
            self._counts[i] += b - a
            self._pending_bytes += rec.nbytes
        if self._pending_bytes >= SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write buffered steps (appends are batched so many assets do not mean many tiny writes)."""
        for i, parts in self._pending.items():
            with open(self._path(i), "ab") as fh:
                fh.write(b"".join(parts))
        self._pending.clear()
        self._pending_bytes = 0

    def read(self, asset: int, start: int, stop: int) -> np.ndarray:
        """Steps ``[start, stop)`` of an asset as records (step, reset, values)."""
        return np.fromfile(self._path(asset), self.dtype, count=stop - start, offset=start * self.dtype.itemsize)

    def pieces(self, asset: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """The asset's steps ``[0, stop)`` in pieces of ``READ_STEPS``: (first step index, records)."""
        for a in range(0, stop, READ_STEPS):
            yield a, self.read(asset, a, min(a + READ_STEPS, stop))

    def _path(self, asset: int) -> Path:
        return self.root / f"{asset:08d}.steps"


@dataclass
class SourceSummary:
    """What the single pass over the source saw."""

    rows: int = 0                 # readings (records)
    start_ms: int | None = None   # event-time range of the values read
    end_ms: int | None = None
    grid: GridCounters = field(default_factory=GridCounters)

    def add(self, batch: DecodedBatch) -> None:
        self.rows += batch.n_records
        if len(batch):
            lo, hi = int(batch.ts_ms.min()), int(batch.ts_ms.max())
            self.start_ms = lo if self.start_ms is None else min(self.start_ms, lo)
            self.end_ms = hi if self.end_ms is None else max(self.end_ms, hi)


def spill_history(open_batches: Callable[[], Iterator[DecodedBatch]], settings: Settings,
                  root: str) -> tuple[History, SourceSummary]:
    """One pass over the source: every asset's history through the event-time grid (event
    time only, no wall-clock cap), batch by batch, closed steps to disk under ``root``."""
    f = len(settings.model.features)
    grid = FleetGrid(GridConfig.from_settings(settings.grid, f))
    history, summary = History(root, f), SourceSummary()
    for batch in open_batches():
        summary.add(batch)
        res = grid.ingest(batch.asset, batch.ts_ms, batch.feature, batch.value, batch.record_index,
                          batch.record_index, now_ms=None)
        summary.grid.add(res.counters)
        history.add(res.steps)
    res = grid.flush()
    summary.grid.add(res.counters)
    history.add(res.steps)
    history.flush()
    return history, summary


def holdout_start(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Index of each asset's first held-out step: its last ``fraction`` of steps, in time order."""
    return np.array([int(round(n * (1 - fraction))) for n in counts.tolist()], np.int64)


# ---------------------------------------------------------------- streamed statistics


class Moments:
    """Count, mean and summed squared deviations merged piece by piece (Chan et al.): the
    mean and population sd of everything, as np.mean / np.std give, without holding it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def add(self, values: np.ndarray) -> None:
        if len(values):
            mean = values.mean(axis=0)
            self._merge(len(values), mean, ((values - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> None:
        if other.n:
            self._merge(other.n, other.mean, other.m2)

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)


class UpperQuantile:
    """``np.quantile(values, q, axis=0)`` (linear) of ``n`` rows seen piece by piece.

    Only the rows at or above the quantile's lower rank can matter, so each column keeps
    its ``n - floor((n-1)·q)`` largest values: for the high quantiles of calibration that
    is a small fraction of the rows (1/1600 for q = 0.995 over 8 features).
    """

    def __init__(self, n: int, q: float, n_columns: int) -> None:
        pos = (n - 1) * q
        self.lo = math.floor(pos)
        self.gamma = pos - self.lo
        self.keep = n - self.lo
        self.n = n
        self.seen = 0
        self.top = np.empty((0, n_columns))

    def add(self, values: np.ndarray) -> None:
        self.seen += len(values)
        top = np.concatenate([self.top, values])
        if len(top) > self.keep:
            top = np.partition(top, len(top) - self.keep, axis=0)[len(top) - self.keep:]
        self.top = top

    def value(self) -> np.ndarray:
        if self.seen != self.n:
            raise FitError(f"expected {self.n} finite score terms, got {self.seen}")
        s = np.sort(self.top, axis=0)
        a, b = s[0], s[min(1, len(s) - 1)]
        diff = b - a  # interpolate the way numpy does, from the nearer end
        return np.where(self.gamma >= 0.5, b - diff * (1 - self.gamma), a + diff * self.gamma)


def flat_runs_from(values: np.ndarray, prev_value: np.ndarray, prev_run: np.ndarray) -> np.ndarray:
    """``thresholds.flat_runs`` of a piece (n, F), continuing the previous piece's last value and run."""
    n = len(values)
    before = np.vstack([prev_value[None, :], values[:-1]])
    idx = np.arange(n)[:, None]
    last_change = np.maximum.accumulate(np.where(before == values, -1, idx), axis=0)
    return np.where(last_change >= 0, idx - last_change, prev_run + 1 + idx)


def ridge_from_gram(gram: np.ndarray, n: int, ridge: float = NOVELTY_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Each feature as a ridge regression on the others and their squares (pump curves are
    not linear), from the Gram matrix of the design ``[x, x²]`` over ``n`` rows; the rows of a
    feature's own terms are zero. Returns (2F, F) coefficients and the residual RMS per
    feature, also from the Gram matrix: ``|D(e_j - c_j)|² = G_jj - 2 c_j·G_j + c_jᵀ G c_j``."""
    f = len(gram) // 2
    coef = np.zeros((2 * f, f))
    for j in range(f):
        others = [i for i in range(2 * f) if i % f != j]
        a = gram[np.ix_(others, others)] + ridge * n * np.eye(len(others))
        coef[others, j] = np.linalg.solve(a, gram[others, j])
    sq = np.diag(gram)[:f] - 2 * np.einsum("ij,ij->j", coef, gram[:, :f]) + np.einsum("ij,ik,kj->j", coef, gram, coef)
    return coef, np.maximum(np.sqrt(np.maximum(sq, 0.0) / n), MIN_SCALE)


# ---------------------------------------------------------------- the training part


@dataclass
class _TrainPart:
    scaler: Scaler
    flat_max: np.ndarray   # (F,) longest unchanged run of each raw value over training steps
    repeat_share: np.ndarray  # (F,) share of training steps whose raw value repeats the two steps before's
    segments: np.ndarray   # (k, 3) asset, first step, length of every reset-free training stretch
    novelty_range: np.ndarray  # (2, F) where the cross-sectional map's inputs are held: training range plus margin
    two_valued: np.ndarray  # (F,) bool: exactly two distinct values over the training steps (a flag?)


def _train_part(history: History, cut: np.ndarray, per_asset: bool) -> _TrainPart:
    """Scaling, flat runs and reset-free stretches of the training part, in one read of it."""
    f = history.n_features
    total = Moments((f,))
    flat_max = np.zeros(f, np.int64)
    repeats, steps = np.zeros(f, np.int64), np.zeros(f, np.int64)
    fitted: list[tuple[int, Moments]] = []
    segments, lows, highs = [], [], []
    distinct = FewValues(f)
    for a, stop in enumerate(cut.tolist()):
        if stop == 0:
            continue
        mom, prev, run = Moments((f,)), np.full(f, np.nan), np.zeros(f, np.int64)
        low, high = np.full(f, np.inf), np.full(f, -np.inf)
        resets = [np.zeros(1, np.int64)]
        for start, rec in history.pieces(a, stop):
            values = rec["values"]
            mom.add(values)
            distinct.add(values)
            low, high = np.fmin(low, np.fmin.reduce(values, axis=0)), np.fmax(high, np.fmax.reduce(values, axis=0))
            runs = flat_runs_from(values, prev, run)
            flat_max = np.maximum(flat_max, runs.max(axis=0))
            repeats += (runs > 1).sum(axis=0)  # (one reading missed and carried forward is a run of 1)
            steps += len(values)
            prev, run = values[-1], runs[-1]
            resets.append(start + np.flatnonzero(rec["reset"]))
        total.merge(mom)
        fitted.append((a, mom))
        lows.append(low)
        highs.append(high)
        bounds = np.unique(np.concatenate(resets))
        segments.append(np.column_stack([np.full(len(bounds), a), bounds, np.diff(np.append(bounds, stop))]))
    if not fitted:
        raise FitError("no asset has training steps before its held-out tail")
    scaler = Scaler(total.mean, scale_from(total.mean, total.std))
    if per_asset:
        scaler = Scaler(scaler.mean, scaler.scale, tuple(history.names[a] for a, _ in fitted),
                        np.stack([m.mean for _, m in fitted]),
                        np.stack([scale_from(m.mean, m.std) for _, m in fitted]))
    mean, scale = scaler.rows_for(np.array([history.names[a] for a, _ in fitted], dtype=object))
    low_s, high_s = (np.stack(lows) - mean) / scale, (np.stack(highs) - mean) / scale
    # A feature an asset never reported gives it ±inf or NaN there, which fmin/fmax pass over; one
    # that no asset reported is held at 0.
    novelty_range = np.stack([np.fmin.reduce(low_s, axis=0), np.fmax.reduce(high_s, axis=0)])
    novelty_range[:, ~np.isfinite(novelty_range).all(axis=0)] = 0.0
    width = novelty_range[1] - novelty_range[0]
    novelty_range += NOVELTY_RANGE_MARGIN * np.stack([-width, width])
    return _TrainPart(scaler, flat_max, repeats / np.maximum(steps, 1), np.concatenate(segments), novelty_range,
                      distinct.count() == 2)


class FewValues:
    """Each feature's distinct finite values, counted up to three, over pieces of steps: a feature
    with exactly two looks like a flag (a command, a mode), which the fit points out."""

    def __init__(self, n_features: int) -> None:
        self.seen: list[set[float]] = [set() for _ in range(n_features)]

    def add(self, values: np.ndarray) -> None:
        for j, seen in enumerate(self.seen):
            if len(seen) <= 2:
                column = values[:, j]
                seen.update(np.unique(column[np.isfinite(column)])[:3].tolist())

    def count(self) -> np.ndarray:
        """Distinct values per feature, 3 meaning three or more."""
        return np.array([min(len(s), 3) for s in self.seen])


def never_stuck(flat_max: np.ndarray, repeat_share: np.ndarray, max_share: float) -> np.ndarray:
    """The longest training run of each feature, or ``NEVER_STUCK_RUN`` where its raw value stayed
    the same three steps in a row on more than ``max_share`` of the training steps. A noisy analogue
    sensor never repeats a value exactly (but where one reading was missed and carried forward), so a
    long repeat means it is stuck; a quantised, discrete or idle signal repeats as a matter of course,
    and how long it does changes with the operating regime."""
    return np.where(repeat_share > max_share, NEVER_STUCK_RUN, flat_max)


@dataclass(frozen=True)
class NoveltyFolds:
    """Maps of the blocked cross-validation of the cross-sectional map: fold k's map is fitted
    on the training part without each asset's k-th contiguous block of training steps."""

    coefs: np.ndarray  # (K, 2F, F); a fold without training steps of its own keeps the full map

    @property
    def k(self) -> int:
        return len(self.coefs)

    def fold_of(self, offset: np.ndarray, cut: np.ndarray) -> np.ndarray:
        """The block of each training step (``offset`` < ``cut``, per step)."""
        return np.minimum(offset * self.k // np.maximum(cut, 1), self.k - 1)


def _novelty_map(history: History, cut: np.ndarray, mean: np.ndarray, scale: np.ndarray, folds: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, NoveltyFolds]:
    """The cross-sectional map fitted on the scaled training part, from its Gram matrix, and the
    maps of its blocked cross-validation (one Gram matrix per block, so one read of the history;
    one block: no cross-validation, every fold map is the full one)."""
    folds = folds or NOVELTY_FOLDS
    f = history.n_features
    grams, ns = np.zeros((folds, 2 * f, 2 * f)), np.zeros(folds, np.int64)
    for a, stop in enumerate(cut.tolist()):
        for start, rec in history.pieces(a, stop):
            design = novelty_design((rec["values"] - mean[a]) / scale[a])
            block = np.minimum((start + np.arange(len(design))) * folds // max(stop, 1), folds - 1)
            for k in np.unique(block).tolist():
                d = design[block == k]
                grams[k] += d.T @ d
                ns[k] += len(d)
    gram, n = grams.sum(axis=0), int(ns.sum())
    coef, rms = ridge_from_gram(gram, n)
    fold_coefs = np.stack([ridge_from_gram(gram - grams[k], n - int(ns[k]))[0] if ns[k] and n > ns[k] else coef
                           for k in range(folds)])
    return coef, rms, NoveltyFolds(fold_coefs)


def out_of_fold_novelty(bundle: ModelBundle, folds: NoveltyFolds, asset: np.ndarray, values: np.ndarray,
                        fold: np.ndarray) -> np.ndarray:
    """Cross-sectional residuals of training steps, each from the fold map that did not see it,
    in the units of the final map (its ``novelty_scale``)."""
    x = scaled_values(bundle, asset, values).astype(np.float64)
    design = novelty_design(x, bundle.novelty_range)
    pred = np.empty_like(x)
    for k in np.unique(fold).tolist():
        sel = fold == k
        pred[sel] = design[sel] @ folds.coefs[k]
    return (x - pred) / bundle.novelty_scale


def history_timesteps(configured: int, train_steps: np.ndarray) -> int:
    """The training window for this history: at most a twentieth of an asset's training steps
    (the median asset's), never fewer than 8 steps nor more than configured. A short history
    then still yields many distinct windows to learn from, and a short warm-up."""
    steps = train_steps[train_steps > 0]
    if not SHORT_HISTORY_WINDOWS or steps.size == 0:
        return configured
    return int(min(configured, max(8, int(np.median(steps)) // 20)))


def training_runs(segments: np.ndarray, timesteps: int, chunks: int, streams: int) -> tuple[np.ndarray, int]:
    """(asset, first step) of every run of ``chunks·T + 1`` steps (inputs and next-step
    targets), and the chunk count, from the reset-free training stretches.

    Runs never cross a reset or an asset boundary. Few runs → overlapping starts.
    """
    lengths = segments[:, 2]
    longest = int(lengths.max(initial=0))
    chunks = min(chunks, (longest - 1) // timesteps)
    if chunks < 1:
        raise FitError(f"no stretch of {timesteps + 1} consecutive normal steps to train on (longest {longest}): "
                       "if the readings are further apart than grid.period_s, set grid.period_s to their spacing "
                       "(gaps longer than grid.gap_reset_steps steps split the history); "
                       "or lower model.timesteps for a short history")
    length = chunks * timesteps
    usable = segments[lengths >= length + 1]
    stride = length
    if int(((usable[:, 2] - length - 1) // stride + 1).sum()) < 2 * streams:
        stride = max(1, timesteps // 4)
    runs = [np.column_stack([np.full(len(o), a), s + o])
            for a, s, n in usable.tolist() for o in [np.arange(0, n - length, stride)]]
    return np.concatenate(runs), chunks


def _read_runs(history: History, runs: np.ndarray, length: int, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scaled runs (k, length, F) as float32; only these steps are read."""
    out = np.empty((len(runs), length, history.n_features), np.float32)
    for i, (a, s) in enumerate(runs.tolist()):
        out[i] = (history.read(a, s, s + length)["values"] - mean[a]) / scale[a]
    return out


def _train_epoch(net: Any, history: History, runs: np.ndarray, scaling: tuple[np.ndarray, np.ndarray],
                 streams: int, chunks: int, timesteps: int, rng: np.random.Generator) -> float:
    """One pass over shuffled groups of S runs, state carried across each run's chunks."""
    order = rng.permutation(len(runs))
    losses = []
    for g in range(len(runs) // streams):
        block = _read_runs(history, runs[order[g * streams:(g + 1) * streams]], chunks * timesteps + 1, *scaling)
        # Targets are the change to the next step; scoring adds it back to the current value.
        x, y = block[:, :-1], block[:, 1:] - block[:, :-1]
        reset_training_state(net)
        for k in range(chunks):
            sl = slice(k * timesteps, (k + 1) * timesteps)
            losses.append(float(net.train_on_batch(x[:, sl], y[:, sl])))
    return float(np.mean(losses))


# ---------------------------------------------------------------- scoring the history


@dataclass
class _Round:
    """One scoring call: the next chunk of each asset still going, concatenated by asset."""

    lanes: np.ndarray    # (L,) asset of each lane
    sizes: np.ndarray    # (L,) steps of each lane
    lane: np.ndarray     # (n,) lane of each step
    t: np.ndarray        # (n,) position of each step in its lane
    offset: np.ndarray   # (n,) index of each step in its asset's history
    steps: GridSteps
    scored: ScoredSteps


def scoring_blocks(counts: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive assets scored side by side, as many as fit ``lanes × widest chunk <=
    SCORE_ROWS``: a call pads every lane to the widest, so that bounds its activations."""
    width = np.minimum(counts, SCORE_CHUNK).tolist()
    first, widest = 0, 0
    for i, w in enumerate(width):
        if i > first and (i - first + 1) * max(widest, w) > SCORE_ROWS:
            yield np.arange(first, i)
            first, widest = i, 0
        widest = max(widest, w)
    if width:
        yield np.arange(first, len(width))


def _score_rounds(history: History, bundle: ModelBundle, model: StepFunction, settings: Settings) -> Iterator[_Round]:
    """Every asset's whole history through the production scoring path, ``SCORE_CHUNK``
    steps of each asset of a block per call, each asset's state carried from call to call
    in a FleetState."""
    model.set_weights(bundle.weights)
    cfg = GridConfig.from_settings(settings.grid, history.n_features)
    counts = history.counts
    names = np.array(history.names, dtype=object)
    for block in scoring_blocks(counts):
        state = FleetState(cfg, bundle.units, bundle.n_features)
        for start in range(0, int(counts[block].max()), SCORE_CHUNK):
            lanes = block[counts[block] > start]
            recs = [history.read(a, start, min(start + SCORE_CHUNK, int(counts[a]))) for a in lanes.tolist()]
            sizes = np.array([len(r) for r in recs], np.int64)
            rec = np.concatenate(recs)
            lane = np.repeat(np.arange(len(lanes)), sizes)
            t = np.arange(len(rec)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            steps = GridSteps(names[lanes][lane], rec["step"], np.ascontiguousarray(rec["values"]), rec["reset"],
                              np.ones(len(rec), np.int32), np.zeros(len(rec), np.int64))
            yield _Round(lanes, sizes, lane, t, start + t, steps, score_steps(state, model, bundle, steps))


def _held(r: _Round, cut: np.ndarray) -> np.ndarray:
    return r.offset >= cut[r.lanes][r.lane]


@dataclass
class _Check:
    """One scoring pass with unit error scales."""

    held_mse: float | None   # mean squared error over scored held-out steps (None: none scored)
    sq_sum: np.ndarray       # (F,) summed squared errors over every scored step
    scored: int              # steps scored (past warm-up)

    @property
    def error_scale(self) -> np.ndarray:
        return np.maximum(np.sqrt(self.sq_sum / self.scored), MIN_SCALE)


def _check(history: History, cut: np.ndarray, bundle: ModelBundle, model: StepFunction, settings: Settings) -> _Check:
    held_sum, held_n = 0.0, 0
    sq_sum, scored_n = np.zeros(history.n_features), 0
    for r in _score_rounds(history, bundle, model, settings):
        err = r.scored.errors
        scored = np.isfinite(err).all(axis=1)
        held = err[scored & _held(r, cut)]
        held_sum += float((held**2).sum())
        held_n += held.size
        sq_sum += (err[scored] ** 2).sum(axis=0)
        scored_n += int(scored.sum())
    return _Check(held_sum / held_n if held_n else None, sq_sum, scored_n)


def _fit_heads(history: History, cut: np.ndarray, bundle: ModelBundle, model: StepFunction,
               settings: Settings) -> AssetHeads:
    """Each asset's own output layer: ridge regression of its next-step change on the shared
    network's last LSTM output, over its scored training steps (held-out steps stay unseen).
    Assets with fewer than ``HEAD_MIN_PER_UNIT × (units + 1)`` such steps keep the network's."""
    u, f = bundle.units[-1], history.n_features
    need = HEAD_MIN_PER_UNIT * (u + 1)
    gram: dict[int, np.ndarray] = {}
    cross: dict[int, np.ndarray] = {}
    count: dict[int, int] = {}
    last: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # each asset's last (top, scaled) of the previous call
    for r in _score_rounds(history, bundle, model, settings):
        scaled = bundle.scaler.transform(r.steps.asset, r.steps.values)
        top = r.scored.top.astype(np.float64)
        scored = np.isfinite(r.scored.errors).all(axis=1)
        ends = np.cumsum(r.sizes)
        for a, lo, hi in zip(r.lanes.tolist(), (ends - r.sizes).tolist(), ends.tolist()):
            if cut[a] < need:
                continue
            # Pairs (t, t+1), t+1 scored (so t's state is warm) and in the training part; the
            # first step of this call pairs with the asset's last step of the previous one.
            x_prev = np.vstack([last[a][0][None], top[lo:hi - 1]]) if a in last else top[lo:hi - 1]
            s_prev = np.vstack([last[a][1][None], scaled[lo:hi - 1]]) if a in last else scaled[lo:hi - 1]
            first = lo if a in last else lo + 1
            ok = scored[first:hi] & (r.offset[first:hi] < cut[a])
            last[a] = (top[hi - 1], scaled[hi - 1])
            if not ok.any():
                continue
            design = np.hstack([x_prev[ok], np.ones((int(ok.sum()), 1))])
            target = scaled[first:hi][ok] - s_prev[ok]
            gram[a] = gram.get(a, 0.0) + design.T @ design
            cross[a] = cross.get(a, 0.0) + design.T @ target
            count[a] = count.get(a, 0) + int(ok.sum())
    fitted = sorted(a for a, n in count.items() if n >= need)
    weights = [np.linalg.solve(gram[a] + settings.model.head_ridge * count[a] * np.eye(u + 1), cross[a])
               for a in fitted]
    return AssetHeads(tuple(history.names[a] for a in fitted),
                      np.array([w[:u] for w in weights]).reshape(-1, u, f),
                      np.array([w[u] for w in weights]).reshape(-1, f))


def _provisional(settings: Settings, scaler: Scaler, weights: list[np.ndarray], warmup: int) -> ModelBundle:
    """A bundle with unit scales, to read raw scaled errors off the production path."""
    f = len(settings.model.features)
    dummy = ThresholdParams.from_settings(settings.threshold, normal_mean=0.0, normal_std=1.0)
    one = np.ones(f)
    return ModelBundle("provisional", settings.model.features, settings.grid.period_ms, settings.model.timesteps,
                       settings.model.units, warmup, scaler, one, np.zeros((2 * f, f)), one, one, one, one, dummy,
                       weights)


# ---------------------------------------------------------------- calibration


def _ewma_rows(r: _Round, x: np.ndarray, level: np.ndarray, alpha: float) -> np.ndarray:
    """``thresholds.ewma`` along each asset's steps of this call, all assets at once,
    continuing (and updating) each asset's level in ``level`` (A, F)."""
    padded = np.full((len(r.lanes), int(r.sizes.max()), x.shape[1]), np.nan)
    padded[r.lane, r.t] = x
    lvl = level[r.lanes]
    for i in range(padded.shape[1]):  # padding is NaN, which keeps the level
        lvl = ewma(lvl, padded[:, i], alpha)
        padded[:, i] = lvl
    level[r.lanes] = lvl
    return padded[r.lane, r.t]


def _flat_rows(r: _Round, prev: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Flat runs of this call's raw values, continuing (and updating) each asset's run."""
    out = np.empty(r.steps.values.shape, np.int64)
    ends = np.cumsum(r.sizes)
    for a, lo, hi in zip(r.lanes.tolist(), (ends - r.sizes).tolist(), ends.tolist()):
        out[lo:hi] = flat_runs_from(r.steps.values[lo:hi], prev[a], run[a])
        prev[a], run[a] = r.steps.values[hi - 1], out[hi - 1]
    return out


def _calibrate(history: History, cut: np.ndarray, bundle: ModelBundle, model: StepFunction, settings: Settings,
               flat_max: np.ndarray, spool: Path, folds: NoveltyFolds | None = None
               ) -> tuple[ThresholdParams, TermLevels, AssetLevels, np.ndarray]:
    """Thresholds of the score terms, the way the engine computes them (per-asset EWMAs
    from the prior level, flat runs of raw values), without holding the history: the
    fleet's levels, and each asset's own where it has ``ASSET_LEVEL_MIN_HELD`` held-out steps.

    With ``folds``, the novelty term of each training step comes from the fold map that did
    not see it: with many features and a short history the map fits its own training steps
    far better than new data, and levels calibrated in sample sit below a normal recording's.
    Also returns each feature's novelty memory (steps per independent value), which a cold
    start uses to widen the levels it learns from its few steps."""
    t = settings.threshold
    f, counts = history.n_features, history.counts
    held_n = counts - cut
    n_held = int(held_n.sum())
    if n_held < 10:
        raise FitError(f"need at least 10 held-out steps to calibrate a threshold, got {n_held}")
    q = feature_quantile(t.quantile, f)
    fc_top, nv_top = UpperQuantile(n_held, q, f), UpperQuantile(int(counts.sum()), q, f)
    own = np.flatnonzero(held_n >= ASSET_LEVEL_MIN_HELD) if t.per_asset_levels else np.empty(0, np.int64)
    own_fc = {a: UpperQuantile(int(held_n[a]), q, f) for a in own.tolist()}
    own_nv = {a: UpperQuantile(int(counts[a]), q, f) for a in own.tolist()}
    n_assets = len(counts)
    fc_level, nv_level = np.full((n_assets, f), PRIOR_LEVEL), np.full((n_assets, f), PRIOR_LEVEL)
    prev, run = np.full((n_assets, f), np.nan), np.zeros((n_assets, f), np.int64)
    terms = np.dtype([("asset", "<i8"), ("fc", "<f8", (f,)), ("nv", "<f8", (f,)), ("runs", "<i8", (f,))])
    memory = BatchMeans(n_assets, f)  # of the novelty residuals: how many independent values a history holds
    with open(spool, "wb") as out:
        for r in _score_rounds(history, bundle, model, settings):
            held = _held(r, cut)
            novelty = r.scored.novelty
            if folds is not None and not held.all():
                novelty = novelty.copy()
                train = ~held
                steps_cut = cut[r.lanes][r.lane][train]
                novelty[train] = out_of_fold_novelty(bundle, folds, r.steps.asset[train], r.steps.values[train],
                                                     folds.fold_of(r.offset[train], steps_cut))
            memory.add(r.lanes[r.lane], r.offset, novelty)
            fc = _ewma_rows(r, r.scored.errors**2, fc_level, t.smoothing_alpha)
            nv = _ewma_rows(r, novelty**2, nv_level, t.novelty_alpha)
            runs = _flat_rows(r, prev, run)
            # The LSTM can overfit its training steps, so its term is calibrated on held-out
            # steps only; the cross-sectional map has F-1 coefficients per feature, so its slow
            # term is calibrated on the whole history, which holds far more independent
            # excursions of a slow EWMA.
            fc_v, nv_v = np.sqrt(np.maximum(fc, 0.0)), np.sqrt(np.maximum(nv, 0.0))
            fc_top.add(_finite_rows(fc_v[held]))
            nv_top.add(_finite_rows(nv_v))
            asset = r.lanes[r.lane]
            ends = np.cumsum(r.sizes)  # each lane's steps are contiguous
            for a, lo, hi in zip(r.lanes.tolist(), (ends - r.sizes).tolist(), ends.tolist()):
                if a in own_fc:
                    own_fc[a].add(_finite_rows(fc_v[lo:hi][held[lo:hi]]))
                    own_nv[a].add(_finite_rows(nv_v[lo:hi]))
            rec = np.empty(int(held.sum()), terms)
            rec["asset"], rec["fc"], rec["nv"], rec["runs"] = asset[held], fc[held], nv[held], runs[held]
            out.write(rec.tobytes())
    flat_limit = np.maximum(t.flat_factor * flat_max, max(t.flat_min_steps, settings.grid.carry_forward_steps + 2))
    # Each term's level is stretched where its calibration steps hold too few independent
    # excursions to reach the quantile (a short history, a slow EWMA): see excursion_factor.
    def fc_margin(steps: int) -> float:
        return t.margin * (excursion_factor(steps, t.smoothing_alpha, q) if EXCURSION_STRETCH else 1.0)

    def nv_margin(steps: int) -> float:
        return t.novelty_margin * (excursion_factor(steps, t.novelty_alpha, q) if EXCURSION_STRETCH else 1.0)

    # A slow feature's residual holds few independent values in a short history: its scale is
    # uncertain, and the novelty level widens with it (see scale_uncertainty_factor). One call
    # for the fleet and every asset with levels of its own (scipy's quantile costs ~90 µs a call).
    tau = memory.integrated_time()
    own_list = own.tolist()
    widen = scale_uncertainty_factor(np.concatenate([[counts.sum()], counts[own]])[:, None] / tau, q)
    levels = TermLevels(level_from_quantile(fc_top.value(), fc_margin(n_held)),
                        level_from_quantile(nv_top.value(), nv_margin(int(counts.sum())) * widen[0]),
                        flat_limit.astype(np.float64))
    mine = AssetLevels(tuple(history.names[a] for a in own_list),
                       np.array([level_from_quantile(own_fc[a].value(), fc_margin(int(held_n[a])))
                                 for a in own_list]).reshape(-1, f),
                       np.array([level_from_quantile(own_nv[a].value(), nv_margin(int(counts[a])) * widen[i + 1])
                                 for i, a in enumerate(own_list)]).reshape(-1, f))
    # Each asset's rows of levels (its own or the fleet's), to score the held-out steps as the engine will.
    fc_rows, nv_rows = mine.rows_for(np.array(history.names, dtype=object), levels.forecast, levels.novelty)

    def held_terms() -> Iterator[tuple[np.ndarray, TermLevels]]:
        for a in range(0, n_held, READ_STEPS):
            rec = np.fromfile(spool, terms, count=min(READ_STEPS, n_held - a), offset=a * terms.itemsize)
            yield rec, TermLevels(fc_rows[rec["asset"]], nv_rows[rec["asset"]], levels.flat)

    # The agreement term's level, the fleet's and each asset's with levels of its own: read like the
    # forecast term's on held-out steps (the LSTM's errors on its own training steps are too small),
    # from each step's largest feature.
    agree_top = UpperQuantile(n_held, t.quantile, 1)
    own_ag = {a: UpperQuantile(int(held_n[a]), t.quantile, 1) for a in own_list}
    for rec, at in held_terms():
        unit = dataclasses.replace(at, agree=np.ones(1))  # the agreement term in units of a level of 1
        g = combine(rec["fc"], rec["nv"], rec["runs"], unit).agree[:, None]
        agree_top.add(g)
        if own_ag:
            order = np.argsort(rec["asset"], kind="stable")
            present, first = np.unique(rec["asset"][order], return_index=True)
            for a, part in zip(present.tolist(), np.split(g[order], first[1:])):
                if a in own_ag:
                    own_ag[a].add(part)

    def agree_level(top: UpperQuantile, steps: int) -> float:
        stretch = t.margin * excursion_factor(steps, t.smoothing_alpha, t.quantile)
        return float(level_from_quantile(top.value(), stretch)[0])

    try:  # held-out steps are scored, so each has the term (else the bundle has no agreement term)
        agree = np.array([agree_level(agree_top, n_held)])
        mine = dataclasses.replace(mine, agree=np.array([agree_level(own_ag[a], int(held_n[a])) for a in own_list]))
        levels = dataclasses.replace(levels, agree=agree, alone=t.alone_factor)
        agree_rows = mine.agree_rows(np.array(history.names, dtype=object), float(agree[0]))
    except FitError:
        agree_rows = None
    normal = Moments(())
    for rec, at in held_terms():
        if agree_rows is not None:
            at = dataclasses.replace(at, agree=agree_rows[rec["asset"]], alone=levels.alone)
        score = combine(rec["fc"], rec["nv"], rec["runs"], at).score
        normal.add(score[np.isfinite(score)])
    p = ThresholdParams.from_settings(t, normal_mean=float(normal.mean), normal_std=float(normal.std))
    return p, levels, mine, tau


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x).all(axis=1)]


# ---------------------------------------------------------------- fitting


def _version(weights: list[np.ndarray]) -> str:
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()[:8]
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{digest}"


def fit_stream(open_batches: Callable[[], Iterator[DecodedBatch]], settings: Settings, *,
               metadata: dict[str, Any] | None = None, progress: Progress | None = None,
               initial_weights: list[np.ndarray] | None = None) -> tuple[ModelBundle, FitReport]:
    """Fit from a source of batches (e.g. an archive scan), opened once.

    The grid steps are spilled to a temporary directory (``tempfile``'s, e.g. ``TMPDIR``;
    about ``9 + 8·F`` bytes per step) and removed afterwards; peak memory depends on the
    batch and chunk sizes and the model, not on the length of the history.

    ``initial_weights`` (the network's, in bundle order) starts training from them instead of
    the seeded initialisation; they must fit the configured features and layers.
    The same source, settings and starting point give the same weights, bit for bit
    (the initialisation and the order of training runs are seeded by ``model.seed``).
    """
    workdir = tempfile.mkdtemp(prefix="plantwatch-fit-")
    try:
        return _fit(open_batches, settings, Path(workdir), metadata, progress, initial_weights)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fit_bundle(batch: DecodedBatch, settings: Settings, *, metadata: dict[str, Any] | None = None,
               progress: Progress | None = None, initial_weights: list[np.ndarray] | None = None
               ) -> tuple[ModelBundle, FitReport]:
    """Train, validate and calibrate a bundle from a long-format batch of normal history."""
    return fit_stream(lambda: iter([batch]), settings, metadata=metadata, progress=progress,
                      initial_weights=initial_weights)


def _absent_features_hint(open_batches: Callable[[], Iterator[DecodedBatch]], features: Sequence[str]) -> str:
    """For the error of a history without steps: the features with no value at all in it (a step
    needs every feature, so one empty column leaves none), if that is why."""
    seen = np.zeros(len(features), bool)
    for batch in open_batches():
        seen[np.unique(batch.feature[np.isfinite(batch.value)])] = True
    absent = [f for f, s in zip(features, seen) if not s]
    return f" (no value at all of {absent}: leave them out of model.features)" if absent else ""


def _fit(open_batches: Callable[[], Iterator[DecodedBatch]], settings: Settings, workdir: Path,
         metadata: dict[str, Any] | None, progress: Progress | None,
         initial_weights: list[np.ndarray] | None = None) -> tuple[ModelBundle, FitReport]:
    t0 = time.monotonic()
    m = settings.model
    f = len(m.features)
    steps_dir = workdir / "steps"
    steps_dir.mkdir()
    history, source = spill_history(open_batches, settings, str(steps_dir))
    counts = history.counts
    total = int(counts.sum())
    if total < 4 * m.timesteps:
        raise FitError(f"only {total} grid steps of history; need at least {4 * m.timesteps}"
                       + _absent_features_hint(open_batches, m.features))
    cut = holdout_start(counts, m.validation_fraction)
    timesteps = history_timesteps(m.timesteps, cut)
    if timesteps != m.timesteps:
        settings = dataclasses.replace(settings, model=dataclasses.replace(m, timesteps=timesteps))
        m = settings.model
    part = _train_part(history, cut, m.per_asset_scaling)
    mean, scale = part.scaler.rows_for(np.array(history.names, dtype=object))
    runs, chunks = training_runs(part.segments, m.timesteps, m.chunks_per_run, m.streams)
    streams = min(m.streams, len(runs))
    warmup = m.timesteps  # a cold state predicts poorly for about one training window

    net = build_training_model(f, m.units, streams, m.timesteps, m.learning_rate, m.seed)
    if initial_weights is not None:
        shapes = [tuple(w.shape) for w in net.get_weights()]
        if [tuple(np.shape(w)) for w in initial_weights] != shapes:
            raise FitError(f"initial weights do not fit {f} features and layers {m.units}: "
                           f"{[tuple(np.shape(w)) for w in initial_weights]} != {shapes}")
        net.set_weights([np.asarray(w, np.float32) for w in initial_weights])
    rng = np.random.default_rng(m.seed)
    report = FitReport(rows=source.rows, assets=len(counts), train_steps=int(cut.sum()),
                       holdout_steps=total - int(cut.sum()), runs=len(runs), epochs=0, best_epoch=0)
    best_loss, best_weights, best_check, stale = np.inf, net.get_weights(), None, 0
    scorer = StepFunction(f, m.units, best_weights)
    if initial_weights is not None:  # epoch 0: the starting point is a candidate like any epoch
        check = _check(history, cut, _provisional(settings, part.scaler, best_weights, warmup), scorer, settings)
        report.initial_val_loss = check.held_mse
        if check.held_mse is not None:
            best_loss, best_check = check.held_mse, check
        if progress is not None:
            progress({"epoch": 0, "val_loss": check.held_mse})
    for epoch in range(1, m.epochs + 1):
        loss = _train_epoch(net, history, runs, (mean, scale), streams, chunks, m.timesteps, rng)
        weights = net.get_weights()
        check = _check(history, cut, _provisional(settings, part.scaler, weights, warmup), scorer, settings)
        val = check.held_mse if check.held_mse is not None else loss
        report.train_loss.append(loss)
        report.val_loss.append(val)
        report.epochs = epoch
        if progress is not None:
            progress({"epoch": epoch, "loss": loss, "val_loss": val})
        if val < best_loss - 1e-6:
            best_loss, best_weights, best_check, stale, report.best_epoch = val, weights, check, 0, epoch
        else:
            stale += 1
            if stale >= m.patience:
                break
    if best_check is None:  # no epoch gave a finite error: keep the initial weights
        best_check = _check(history, cut, _provisional(settings, part.scaler, best_weights, warmup), scorer, settings)
    if best_check.scored == 0:
        raise FitError(f"no step lies {warmup} steps past a reset: nothing could be scored")

    novelty_coef, novelty_scale, novelty_folds = _novelty_map(history, cut, mean, scale)
    provisional = _provisional(settings, part.scaler, best_weights, warmup)
    error_scale = best_check.error_scale
    heads = AssetHeads()
    if m.per_asset_heads and len(history.names) >= HEAD_MIN_ASSETS:
        heads = _fit_heads(history, cut, provisional, scorer, settings)
        if heads.names:  # errors are measured with the heads the engine will use
            error_scale = _check(history, cut, dataclasses.replace(provisional, heads=heads), scorer,
                                 settings).error_scale
    calibration = dataclasses.replace(provisional, error_scale=error_scale, novelty_coef=novelty_coef,
                                      novelty_scale=novelty_scale, heads=heads, novelty_range=part.novelty_range)
    flat_max = never_stuck(part.flat_max, part.repeat_share, settings.threshold.flat_repeat_share)
    thresholds, levels, asset_levels, memory = _calibrate(history, cut, calibration, scorer, settings, flat_max,
                                                          workdir / "held-terms", novelty_folds)
    report.duration_s = time.monotonic() - t0
    meta = {**_metadata(report, source, total, streams, chunks, best_loss, metadata),
            "unread_features": part.scaler.unread(m.features),
            "two_valued_features": [name for name, two in zip(m.features, part.two_valued) if two]}
    bundle = ModelBundle(_version(best_weights), m.features, settings.grid.period_ms, m.timesteps, m.units, warmup,
                         part.scaler, error_scale, novelty_coef, novelty_scale, levels.flat,
                         levels.forecast, levels.novelty, thresholds, best_weights, meta, asset_levels, heads,
                         part.novelty_range, memory, None if levels.agree is None else float(levels.agree[0]))
    return bundle, report


def _metadata(report: FitReport, source: SourceSummary, steps: int, streams: int, chunks: int, best_loss: float,
              extra: dict[str, Any] | None) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_start_ms": source.start_ms, "data_end_ms": source.end_ms,
        "rows": report.rows, "assets": report.assets, "grid_steps": steps,
        "late_readings": source.grid.late, "gap_resets": source.grid.gap_resets,
        "train_steps": report.train_steps, "holdout_steps": report.holdout_steps, "runs": report.runs,
        "streams": streams, "chunks": chunks, "epochs": report.epochs, "best_epoch": report.best_epoch,
        "train_loss": [round(v, 6) for v in report.train_loss], "val_loss": [round(v, 6) for v in report.val_loss],
        "validation_error": round(best_loss, 6), "duration_s": round(report.duration_s, 2),
        **({"initial_val_loss": round(report.initial_val_loss, 6)} if report.initial_val_loss is not None else {}),
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
        **(extra or {}),
    }
