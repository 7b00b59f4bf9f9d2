"""The alert lifecycle: open, update, close, with hysteresis and deterministic ids.

An alert opens after ``open_after`` consecutive alert_score scores above the threshold and
starts at the first of them; it closes after ``close_after`` consecutive scores below
``close_ratio × threshold`` (hysteresis, so an alert hovering at the threshold does not
flap). While open it emits an update every ``update_every`` steps or when its peak grows
by a fifth. Its id is a hash of (asset, start step, model version): replaying the same
readings with the same model after a crash re-emits the same ids, so consumers of the
alert topic can de-duplicate.

Every close event names its ``reason``:

* ``recovered``: the hysteresis close above; ``end_ms`` is the start of the first of the
  ``close_after`` steps below the closing level.
* ``data_gap``: the asset's readings stopped for longer than ``grid.gap_reset_steps`` and its
  state was reset (:mod:`pipeline.grid`). Nothing is known across the gap, so the alert closes
  when the asset's first step after it is scored (``step_ms``), and ``end_ms`` is where the gap
  began: the end of the last step the asset had readings for. The lifecycle then starts
  afresh, so an abnormality that persists opens a new alert (new start, new id). A *hole*
  (a feature silent for longer than ``grid.carry_forward_steps``, or the asset silent for up
  to ``gap_reset_steps``) also restarts the model state but leaves an open alert open.

A model swap does not close alerts: an open alert keeps the version it opened under (and so
its id) until it closes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.bundle import ThresholdParams
from pipeline.grid import NO_GAP
from pipeline.state import FleetState

AlertState = Literal["open", "update", "close"]
CloseReason = Literal["recovered", "data_gap", "rebaselined"]
PEAK_GROWTH_FOR_UPDATE = 1.2


def alert_id(asset: str, start_step: int, model_version: str) -> str:
    return hashlib.sha256(f"{asset}\x1f{start_step}\x1f{model_version}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class AlertEvent:
    alert_id: str
    asset: str
    state: AlertState
    start_ms: int              # event time of the first abnormal step
    end_ms: int | None         # event time the asset was back to normal (close only)
    step_ms: int               # event time of the step that caused this event
    score: float               # alert score at that step (1 = the calibrated threshold)
    peak_score: float
    threshold: float
    top_features: tuple[tuple[str, float], ...]  # (feature, share of the alert's squared error)
    model_version: str
    reason: CloseReason | None = None  # why the alert closed (close only)

    def to_dict(self) -> dict[str, Any]:
        """The published form (field order as declared); built directly, as ``asdict`` deep-copies."""
        return {"alert_id": self.alert_id, "asset": self.asset, "state": self.state, "start_ms": self.start_ms,
                "end_ms": self.end_ms, "step_ms": self.step_ms, "score": self.score, "peak_score": self.peak_score,
                "threshold": self.threshold,
                "top_features": [{"feature": f, "contribution": round(c, 4)} for f, c in self.top_features],
                "model_version": self.model_version, "reason": self.reason}


def _top(contrib: np.ndarray, features: tuple[str, ...], k: int) -> tuple[tuple[str, float], ...]:
    total = float(contrib.sum())
    if total <= 0 or not np.isfinite(total):
        return ()
    order = np.argsort(-contrib, kind="stable")[:k]
    return tuple((features[i], float(contrib[i] / total)) for i in order if contrib[i] > 0)  # a 0 explains nothing


def restart_lifecycle(state: FleetState, rows: np.ndarray) -> None:
    """Forget these assets' alert and run state: no alert open, no run above or below counted."""
    cols = state.cols
    for name in ("above", "below", "run_start", "alert_start", "alert_last_event", "alert_steps"):
        cols[name][rows] = 0
    for name in ("alert_peak", "alert_peak_sent"):
        cols[name][rows] = np.nan
    cols["alert_open"][rows] = False
    state.alert_contrib[rows] = 0.0
    for r in np.atleast_1d(rows).tolist():
        state.alert_version.pop(r, None)


def update_alerts(state: FleetState, rows: np.ndarray, assets: np.ndarray, steps: np.ndarray,
                  alert_score: np.ndarray, threshold: np.ndarray, contrib: np.ndarray, p: ThresholdParams,
                  features: tuple[str, ...], period_ms: int, model_version: str,
                  gap_start: np.ndarray | None = None) -> list[AlertEvent]:
    """Advance the lifecycle of one step for each of ``rows`` (distinct assets).

    ``alert_score`` is the alert score, ``contrib`` (k, F) each feature's non-negative weight in it.
    ``gap_start`` (the grid's, :data:`pipeline.grid.NO_GAP` where none) marks steps that follow
    a data gap: an open alert closes with reason ``data_gap`` before the step counts, and the
    step starts a fresh lifecycle.
    """
    cols = state.cols
    events: list[AlertEvent] = []
    if gap_start is not None:
        events += _close_at_gaps(state, rows, assets, steps, alert_score, threshold, gap_start, p, features, period_ms,
                                 model_version)
    valid = np.isfinite(alert_score)
    above = valid & (alert_score > threshold)
    below = valid & (alert_score < p.close_ratio * threshold)

    count = np.where(above, cols["above"][rows] + 1, 0)
    cols["above"][rows] = count
    cols["run_start"][rows] = np.where(above & (count == 1), steps, cols["run_start"][rows])

    is_open = cols["alert_open"][rows]
    sq = np.where(valid[:, None], contrib, 0.0)
    state.alert_contrib[rows[is_open & above]] += sq[is_open & above]
    cols["below"][rows] = np.where(is_open & below, cols["below"][rows] + 1, 0)
    cols["alert_peak"][rows] = np.where(is_open & valid, np.fmax(cols["alert_peak"][rows], alert_score),
                                        cols["alert_peak"][rows])
    cols["alert_steps"][rows] += is_open

    opening = ~is_open & (count >= p.open_after)
    closing = is_open & (cols["below"][rows] >= p.close_after)
    since_event = steps - cols["alert_last_event"][rows]
    grown = cols["alert_peak"][rows] > PEAK_GROWTH_FOR_UPDATE * cols["alert_peak_sent"][rows]
    updating = is_open & ~closing & ((since_event >= p.update_every) | grown)

    for i in np.flatnonzero(opening | closing | updating):
        r = rows[i]
        if opening[i]:
            state.alert_version[r] = model_version
            cols["alert_open"][r] = True
            cols["alert_start"][r] = cols["run_start"][r]
            cols["alert_peak"][r] = alert_score[i]
            cols["alert_steps"][r] = count[i]
            cols["below"][r] = 0
            state.alert_contrib[r] = sq[i]
            kind: AlertState = "open"
        else:
            kind = "close" if closing[i] else "update"
        start = int(cols["alert_start"][r])
        version = state.alert_version.get(r, model_version)  # an alert keeps the version it opened under
        end_step = int(steps[i]) - p.close_after + 1 if kind == "close" else None
        events.append(AlertEvent(
            alert_id=alert_id(str(assets[i]), start, version), asset=str(assets[i]), state=kind,
            start_ms=start * period_ms, end_ms=None if end_step is None else end_step * period_ms,
            step_ms=int(steps[i]) * period_ms, score=float(alert_score[i]), peak_score=float(cols["alert_peak"][r]),
            threshold=float(threshold[i]), top_features=_top(state.alert_contrib[r], features, p.top_features),
            model_version=version, reason="recovered" if kind == "close" else None,
        ))
        cols["alert_last_event"][r] = steps[i]
        cols["alert_peak_sent"][r] = cols["alert_peak"][r]
        if kind == "close":
            restart_lifecycle(state, np.array([r]))
    return events


def _close_event(state: FleetState, r: int, asset: str, step: int, end_step: int, score: float, threshold: float,
                 reason: str, p: ThresholdParams, features: tuple[str, ...], period_ms: int,
                 model_version: str) -> AlertEvent:
    """The close event of the alert open on row ``r``, ending at ``end_step``, seen at ``step``."""
    cols = state.cols
    start = int(cols["alert_start"][r])
    version = state.alert_version.get(r, model_version)
    return AlertEvent(
        alert_id=alert_id(asset, start, version), asset=asset, state="close", start_ms=start * period_ms,
        end_ms=end_step * period_ms, step_ms=step * period_ms, score=score, peak_score=float(cols["alert_peak"][r]),
        threshold=threshold, top_features=_top(state.alert_contrib[r], features, p.top_features),
        model_version=version, reason=reason)


def _close_at_gaps(state: FleetState, rows: np.ndarray, assets: np.ndarray, steps: np.ndarray, alert_score: np.ndarray,
                   threshold: np.ndarray, gap_start: np.ndarray, p: ThresholdParams, features: tuple[str, ...],
                   period_ms: int, model_version: str) -> list[AlertEvent]:
    """Close the open alerts of assets whose step follows a data gap; restart their lifecycle."""
    gapped = np.flatnonzero(gap_start != NO_GAP)
    if not len(gapped):
        return []
    cols = state.cols
    events = []
    for i in gapped[cols["alert_open"][rows[gapped]]]:
        # The alert ends where the gap began; one that opened on carried-forward values after the
        # last readings (a gap closed over several polls) still spans at least its first step.
        r = rows[i]
        end = max(int(gap_start[i]), int(cols["alert_start"][r]) + 1)
        events.append(_close_event(state, r, str(assets[i]), int(steps[i]), end, float(alert_score[i]),
                                   float(threshold[i]), "data_gap", p, features, period_ms, model_version))
    restart_lifecycle(state, rows[gapped])
    return events


def close_long_alerts(state: FleetState, rows: np.ndarray, assets: np.ndarray, steps: np.ndarray,
                      alert_score: np.ndarray, threshold: np.ndarray, after_steps: int, p: ThresholdParams,
                      features: tuple[str, ...], period_ms: int, model_version: str) -> tuple[list[AlertEvent], np.ndarray]:
    """Close, with reason ``rebaselined``, the alerts of ``rows`` (distinct assets) open for at least
    ``after_steps`` steps, ending at this step; returns the events and the rows closed."""
    cols = state.cols
    long = np.flatnonzero(cols["alert_open"][rows] & (cols["alert_steps"][rows] >= after_steps))
    events = []
    for i in long.tolist():
        events.append(_close_event(state, rows[i], str(assets[i]), int(steps[i]), int(steps[i]), float(alert_score[i]),
                                   float(threshold[i]), "rebaselined", p, features, period_ms, model_version))
    closed = rows[long]
    restart_lifecycle(state, closed)
    return events, closed
