"""The detection engine: decoded readings in, scored steps and alert events out.

This is the one code path shared by the Kafka detector, ``plantwatch replay`` and
``plantwatch evaluate``: grid → carried-state LSTM scoring → smoothing and thresholds →
alert lifecycle. It does no I/O; the caller supplies readings, their source positions and
the wall clock. A step that follows a data gap (``GridSteps.gap_start``) restarts the asset's
score terms and closes its open alert with reason ``data_gap`` (see :mod:`pipeline.alerts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.alerts import AlertEvent, close_long_alerts, update_alerts
from pipeline.bundle import ModelBundle
from pipeline.cold_start import (ColdPlan, LevelStretch, after_swap, learn_levels, rebaseline, row_scaling,
                                 step_scaling, with_own_levels, with_own_scaling)
from pipeline.grid import NO_GAP, GridConfig, GridCounters, GridResult, GridSteps
from pipeline.model import StepFunction
from pipeline.readings import DecodedBatch
from pipeline.scoring import predicted_change, rank_within_asset, scale_values, score_steps, segment_bounds
from pipeline.settings import GridSettings
from pipeline.state import PRIOR_LEVEL, FleetState
from pipeline.thresholds import TermLevels, restart_terms, update_thresholds


@dataclass
class EngineOutput:
    asset: np.ndarray       # object (n,): one row per closed grid step
    step: np.ndarray        # int64 (n,)
    values: np.ndarray      # float64 (n, F) grid values
    forecast_error: np.ndarray  # float64 (n,) RMS of the normalised forecast errors, NaN while warming up
    alert_score: np.ndarray     # float64 (n,) the alert score (largest term, 1 = calibrated threshold)
    threshold: np.ndarray       # float64 (n,) the asset's threshold in force (>= 1)
    errors: np.ndarray      # float64 (n, F) normalised per-feature forecast errors
    terms: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))  # (n, 3) forecast, novelty, flatline
    learning: np.ndarray = field(default_factory=lambda: np.empty(0, bool))  # (n,) cold start: cannot alert yet
    events: list[AlertEvent] = field(default_factory=list)
    late_records: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    future_records: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    counters: GridCounters = field(default_factory=GridCounters)

    def __len__(self) -> int:
        return len(self.step)


@dataclass
class WarmStart:
    """A new model's LSTM state for every asset, computed from a copy of the remembered steps
    (off the main thread): at the swap, an asset whose ring only grew since the copy continues
    from it over the new steps, so the pause does not grow with the fleet."""

    version: str
    rows: np.ndarray        # int64 (R,)
    names: list[str | None]
    epoch: np.ndarray       # int64 (R,) FleetState.epoch at the copy
    seen: np.ndarray        # int64 (R,) steps the state was warmed over (the ring's count at the copy)
    since: np.ndarray       # int64 (R,) since_reset at the copy
    states: list[np.ndarray]
    last_pred: np.ndarray   # float32 (R, F)


@dataclass
class RingCopy:
    """What a warm start needs from the fleet state, copied on the main thread between polls."""

    rows: np.ndarray
    names: list[str | None]
    epoch: np.ndarray
    since: np.ndarray
    values: np.ndarray  # (R, H, F) remembered steps, oldest first, left-aligned
    mask: np.ndarray    # (R, H)
    own_mean: np.ndarray   # (R, F) learned scaling of cold-started assets (NaN: the bundle's)
    own_scale: np.ndarray  # (R, F)


class SwapError(ValueError):
    """A new model cannot take over this engine's state (different features or grid period)."""


class DetectionEngine:
    """Per-asset state plus one model; process a batch, get scores and alert events."""

    def __init__(self, bundle: ModelBundle, grid: GridSettings, model: StepFunction | None = None) -> None:
        self.bundle = bundle
        self.grid_cfg = GridConfig(bundle.period_ms, grid.lateness_ms, grid.max_future_ms,
                                   grid.carry_forward_steps, grid.gap_reset_steps, bundle.n_features)
        self.state = FleetState(self.grid_cfg, bundle.units, bundle.n_features, history=bundle.warmup_steps)
        self.model = model or StepFunction(bundle.n_features, bundle.units, bundle.weights)
        if model is None:
            self.model.warm_up()
        self.stretch = LevelStretch.of(bundle)

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def process(self, batch: DecodedBatch, record_pos: np.ndarray | None = None,
                now_ms: int | np.ndarray | None = None) -> EngineOutput:
        """Place a decoded batch on the grid and score every step it closes.

        ``record_pos`` gives each input record's source position (e.g. its Kafka offset),
        indexed by ``record_index``; by default the record index itself is the position.
        ``now_ms`` bounds how far ahead a reading may be stamped: one time for all, or one per
        input record (indexed like ``record_pos``); None accepts any.
        """
        value_pos = batch.record_index if record_pos is None else record_pos[batch.record_index]
        value_now = now_ms[batch.record_index] if isinstance(now_ms, np.ndarray) else now_ms
        result = self.state.grid.ingest(batch.asset, batch.ts_ms, batch.feature, batch.value,
                                        batch.record_index, value_pos, value_now)
        return self._score(result)

    def swap(self, bundle: ModelBundle, model: StepFunction) -> int:
        """Serve a new model from the next step on; returns the number of assets re-warmed.

        ``model`` must already hold ``bundle``'s weights (loaded and warmed beside the old one).
        Each asset's LSTM state is rebuilt by running the new model over the asset's remembered
        recent steps, so its first scores are not from a cold state; the score terms restart
        at their normal level and the online threshold re-seeds from the new calibration.
        """
        self.check_swap(bundle, model)
        rows = np.array(sorted(self.state.index.values()), dtype=np.int64)
        self._install(bundle, model)
        return self.rewarm(rows)

    def ring_copy(self) -> RingCopy:
        """Copy every asset's remembered steps (main thread, between polls) for :func:`warm_start`."""
        state = self.state
        rows = np.array(sorted(state.index.values()), dtype=np.int64)
        values, mask = state.recent_batch(rows)
        return RingCopy(rows, [state.names[r] for r in rows.tolist()], state.epoch[rows].copy(),
                        state.cols["since_reset"][rows].copy(), values, mask,
                        state.vectors["own_mean"][rows].copy(), state.vectors["own_scale"][rows].copy())

    def swap_warm(self, bundle: ModelBundle, model: StepFunction, warm: WarmStart) -> int:
        """:meth:`swap` with the re-warm done beforehand (:func:`warm_start`): an asset whose
        ring only grew since the copy (same asset, no reset, fewer new steps than the ring
        holds) continues from the warm state over its new steps; any other is re-warmed here
        from its ring. Returns the assets warmed."""
        self.check_swap(bundle, model)
        state = self.state
        now = np.array(sorted(state.index.values()), dtype=np.int64)
        pos = {r: i for i, r in enumerate(warm.rows.tolist())}
        cont, src, fresh = [], [], []
        since_now = state.cols["since_reset"]
        for r in now.tolist():
            i = pos.get(r)
            if (i is not None and warm.names[i] == state.names[r] and warm.epoch[i] == state.epoch[r]
                    and 0 <= since_now[r] - warm.since[i] < state.history):
                cont.append(r)
                src.append(i)
            else:
                fresh.append(r)
        cont_a, src_a = np.array(cont, np.int64), np.array(src, np.int64)
        new_steps = since_now[cont_a] - warm.since[src_a]
        self._install(bundle, model)
        if len(cont_a):
            for a, w in zip(state.lstm, warm.states):
                a[cont_a] = w[src_a]
            state.last_pred[cont_a] = warm.last_pred[src_a]
            seen = warm.seen[src_a] + new_steps
            state.cols["has_pred"][cont_a] = seen > 0
            state.cols["since_reset"][cont_a] = seen
            more = new_steps > 0
            if more.any():
                self._continue(cont_a[more], new_steps[more])
            self._reseed(cont_a)
        warmed = int((warm.seen[src_a] + new_steps > 0).sum()) if len(cont_a) else 0
        return warmed + (self.rewarm(np.array(fresh, np.int64)) if fresh else 0)

    def _continue(self, rows: np.ndarray, n_new: np.ndarray) -> None:
        """Advance these assets' (new-model) state over their last ``n_new`` remembered steps."""
        state, bundle = self.state, self.bundle
        h = state.history
        width = int(n_new.max())
        head = state.cols["recent_head"][rows]
        offsets = np.arange(width)
        slots = (head[:, None] - n_new[:, None] + offsets[None, :]) % h
        mask = offsets[None, :] < n_new[:, None]
        values = state.recent_values[rows[:, None], slots]
        names = np.array([state.names[r] for r in rows.tolist()], dtype=object)
        x = _scaled_ring(values, *row_scaling(state, bundle, rows, names))
        y, top, final = self.model(x, mask, [a[rows] for a in state.lstm])
        y = predicted_change(bundle, names, y, top)
        last = n_new - 1
        for a, fin in zip(state.lstm, final):
            a[rows] = fin
        idx = np.arange(len(rows))
        state.last_pred[rows] = x[idx, last] + y[idx, last]

    def check_swap(self, bundle: ModelBundle, model: StepFunction) -> None:
        """Raise :class:`SwapError` if ``model`` cannot take over this engine's state."""
        old = self.bundle
        if bundle.features != old.features or bundle.period_ms != old.period_ms:
            raise SwapError(f"model {bundle.version} has features {list(bundle.features)} and period "
                            f"{bundle.period_ms} ms; serving {list(old.features)} at {old.period_ms} ms")
        if bundle.units != tuple(model.units):
            raise SwapError(f"model {bundle.version} has layers {bundle.units}, the prepared network {model.units}")

    def _install(self, bundle: ModelBundle, model: StepFunction) -> None:
        """Old LSTM state means nothing to new weights: every asset restarts (warm where it can)."""
        state = self.state
        state.units = tuple(bundle.units)
        state.lstm = [np.zeros((len(state.last_pred), u), np.float32) for u in bundle.units for _ in range(2)]
        self.bundle, self.model, self.stretch = bundle, model, LevelStretch.of(bundle)
        after_swap(state, bundle)

    def adopt(self, rows: np.ndarray) -> int:
        """Assets restored from snapshots taken under another model: the transition a swap makes
        (:func:`~pipeline.cold_start.after_swap`, then :meth:`rewarm`), for these assets only, as if
        the swap had happened where their snapshots were taken. Returns the assets warmed."""
        after_swap(self.state, self.bundle, rows)
        return self.rewarm(rows)

    def _reseed(self, rows: np.ndarray) -> None:
        """Score terms restart at their normal level and the online threshold re-seeds."""
        state = self.state
        state.vectors["forecast_ewma"][rows] = PRIOR_LEVEL
        state.vectors["novelty_ewma"][rows] = PRIOR_LEVEL
        state.cols["adapt_mean"][rows] = np.nan
        state.cols["adapt_var"][rows] = np.nan

    def rewarm(self, rows: np.ndarray) -> int:
        """Rebuild these assets' LSTM state with the serving model from their remembered recent
        steps (after a swap, or a snapshot taken under another model); the score terms restart at
        their normal level and the online threshold re-seeds. Returns the assets warmed."""
        state, bundle, model = self.state, self.bundle, self.model
        state.reset_model_state(rows)
        warm = rows[state.cols["recent_n"][rows] > 0]
        if len(warm):
            values, mask = state.recent_batch(warm)
            names = np.array([state.names[r] for r in warm], dtype=object)
            x = _scaled_ring(values, *row_scaling(state, bundle, warm, names))
            y, top, final = model(x, mask, model.zero_states(len(warm)))
            y = predicted_change(bundle, names, y, top)
            last = mask.sum(axis=1) - 1
            for a, fin in zip(state.lstm, final):
                a[warm] = fin
            state.last_pred[warm] = x[np.arange(len(warm)), last] + y[np.arange(len(warm)), last]
            state.cols["has_pred"][warm] = True
            state.cols["since_reset"][warm] = last + 1
        self._reseed(rows)
        return len(warm)

    def flush(self) -> EngineOutput:
        """Close and score every open step (end of a replay)."""
        return self._score(self.state.grid.flush())

    def _score(self, result: GridResult) -> EngineOutput:
        steps: GridSteps = result.steps
        b, state = self.bundle, self.state
        n = len(steps)
        rows = state.rows(steps.asset)
        starts = segment_bounds(rows, np.zeros(n, bool))
        scaling = step_scaling(state, b, rows, steps.asset, steps.values, starts)
        scored = score_steps(state, self.model, b, steps, rows, (scaling.mean, scaling.scale))
        alert_score, threshold = np.full(n, np.nan), np.full(n, np.nan)
        terms = np.full((n, 3), np.nan)
        learning = np.zeros(n, bool)
        cold = bool((scaling.index >= 0).any())
        plan = ColdPlan.of(b)
        rebase_steps = int(np.ceil(b.thresholds.rebaseline_after_s * 1000 / b.period_ms))
        rebased = np.zeros(n, bool)  # steps after their asset re-baselined in this poll
        events: list[AlertEvent] = []
        rank = rank_within_asset(rows, starts)
        levels = TermLevels.for_assets(b, steps.asset)
        unread = scored.unread
        # Steps of one asset are sequential (EWMA, hysteresis); different assets are vectorised.
        for r in range(int(rank.max()) + 1 if n else 0):
            sel = np.flatnonzero(rank == r)
            rows = scored.rows[sel]
            gap_start = steps.gap_start[sel]
            gapped = gap_start != NO_GAP
            if gapped.any():  # nothing is known across a data gap: score terms and alerts restart
                restart_terms(state, rows[gapped])
            if cold:  # the score terms start afresh under a newly learned scaling
                restart_terms(state, rows[scaling.index[sel] == plan.scaling])
            step_levels = with_own_levels(levels.take(sel), state, rows) if cold else levels.take(sel)
            combined, threshold[sel] = update_thresholds(
                state, rows, steps.values[sel], scored.errors[sel], scored.novelty[sel],
                step_levels if unread is None else step_levels.without(unread[sel]), b.thresholds)
            alert_score[sel] = score = combined.score
            if cold:
                learning[sel] = learn_levels(state, rows, scaling.index[sel], step_levels, b.thresholds, plan,
                                             self.stretch)
                learning[sel] |= rebased[sel]
                score = np.where(learning[sel], np.nan, score)
            terms[sel, 0], terms[sel, 1], terms[sel, 2] = combined.forecast, combined.novelty, combined.flat
            events += update_alerts(state, rows, steps.asset[sel], steps.step[sel], score,
                                    threshold[sel], combined.contributions, b.thresholds, b.features,
                                    b.period_ms, b.version, gap_start)
            if rebase_steps:
                closed_events, closed = close_long_alerts(
                    state, rows, steps.asset[sel], steps.step[sel], alert_score[sel], threshold[sel], rebase_steps,
                    b.thresholds, b.features, b.period_ms, b.version)
                if len(closed):
                    events += closed_events
                    rebaseline(state, closed)
                    later = np.isin(scored.rows, closed) & (rank > r)
                    rebased |= later
                    scaling.index[later] = -1  # their place in the new cold start is not known until it starts
                    cold = True
        if rebased.any():  # steps after a re-baselining in this poll start the asset's new cold start
            self._learn_from(steps, scored.rows, np.flatnonzero(rebased), plan)
        return EngineOutput(steps.asset, steps.step, steps.values, scored.score, alert_score, threshold,
                            scored.errors, terms, learning, events, result.late_records, result.future_records,
                            result.counters)

    def _learn_from(self, steps: GridSteps, rows: np.ndarray, idx: np.ndarray, plan: ColdPlan) -> None:
        """The steps ``idx`` came after their asset re-baselined within this poll, so they were scored
        under the old scaling: their readings still count towards the new scaling, and score terms
        that cross into the level part start afresh."""
        sub = rows[idx]
        step_scaling(self.state, self.bundle, sub, steps.asset[idx], steps.values[idx],
                     segment_bounds(steps.asset[idx], np.zeros(len(idx), bool)))
        crossed = np.unique(sub[self.state.cols["cold_steps"][sub] >= plan.scaling])
        restart_terms(self.state, crossed)


def _scaled_ring(values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Remembered steps (R, H, F) in model units, with one scaling row per asset (R, F)."""
    return scale_values(values, mean[:, None, :], scale[:, None, :])


def warm_start(bundle: ModelBundle, model: StepFunction, ring: RingCopy) -> WarmStart:
    """The new model run over each asset's copied ring from a zero state (the same computation
    as :meth:`DetectionEngine.rewarm`), on any thread: it touches only the copy."""
    n = ring.mask.sum(axis=1).astype(np.int64)
    states = model.zero_states(len(ring.rows))
    last_pred = np.zeros((len(ring.rows), bundle.n_features), np.float32)
    warm = np.flatnonzero(n > 0)
    if len(warm):
        names = np.array([ring.names[i] for i in warm.tolist()], dtype=object)
        x = _scaled_ring(ring.values[warm], *with_own_scaling(bundle, names, ring.own_mean[warm], ring.own_scale[warm]))
        y, top, final = model(x, ring.mask[warm], model.zero_states(len(warm)))
        y = predicted_change(bundle, names, y, top)
        last = n[warm] - 1
        for a, fin in zip(states, final):
            a[warm] = fin
        idx = np.arange(len(warm))
        last_pred[warm] = x[idx, last] + y[idx, last]
    return WarmStart(bundle.version, ring.rows, ring.names, ring.epoch, n, ring.since, states, last_pred)
