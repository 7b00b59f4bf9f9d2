"""Champion/challenger gate: publish a new model only if it is not worse than the one serving.

Both models score the same held-out data (the newest part of the training range, never
trained on, with the same abnormal periods excluded) through the production path, a
:class:`~pipeline.engine.DetectionEngine` each, starting cold. They are compared on steps
that both scored, with two figures where lower is better:

* **forecast error**: per feature, the mean squared next-step error in *raw units*,
  divided by the mean squared step-to-step change of that feature on the held-out data;
  then the mean over features. The errors a model reports are normalised by its own
  scaler and training error scale, so a model with larger training errors would look
  better in its own units; raw errors over a scale taken from the data itself mean the
  same thing for both models. The step-to-step change is the error of predicting "no
  change", so the figure reads as skill against that naive forecast (1 = no better), is
  unit-free (a feature in pascals does not outweigh one in amperes), and needs no fitted
  statistic of either model. Features that never moved on the held-out data say nothing
  about forecasting and are left out.
* **alert fraction**: the fraction of steps whose alert score is above the threshold in
  force. The held-out data is assumed normal, so a model that would alert more is worse.
  It counts steps, not opened alerts, so a model that alerts once and never closes is
  not mistaken for a quiet one.

The challenger passes if each figure is at most ``margin`` (a fraction) above the
champion's; the alert fraction also gets :data:`ALERT_SLACK` of absolute room, so a
champion that never alerted does not veto every challenger for a single short excursion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.bundle import ModelBundle
from pipeline.engine import DetectionEngine, EngineOutput
from pipeline.readings import DecodedBatch
from pipeline.settings import GridSettings

ALERT_SLACK = 0.001  # one step in a thousand above the threshold is noise, not a worse model


class GateError(ValueError):
    """The two models cannot be compared on the same grid."""


@dataclass(frozen=True)
class GateFigures:
    """How one model did on the held-out data (lower is better)."""

    version: str
    steps: int                      # held-out steps scored by both models
    forecast_error: float           # NaN when no step was scored or no feature moved
    alert_fraction: float           # NaN when no step was scored
    alerts: int                     # alerts the model opened
    feature_error: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "steps": self.steps, "forecast_error": _finite(self.forecast_error),
                "alert_fraction": _finite(self.alert_fraction), "alerts": self.alerts,
                "feature_error": self.feature_error}


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str
    margin: float
    champion: GateFigures | None = None
    challenger: GateFigures | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "publish" if self.publish else "refuse", "reason": self.reason, "margin": self.margin,
                "champion": self.champion.to_dict() if self.champion else None,
                "challenger": self.challenger.to_dict() if self.challenger else None}


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return round(x, 6) if math.isfinite(x) else None


def incompatibility(champion: ModelBundle, challenger: ModelBundle) -> str | None:
    """Why two models cannot score the same grid (a deliberate change of features or period), or None."""
    if champion.features != challenger.features:
        return f"features changed from {list(champion.features)} to {list(challenger.features)}"
    if champion.period_ms != challenger.period_ms:
        return f"grid period changed from {champion.period_ms} ms to {challenger.period_ms} ms"
    return None


class _Tally:
    """Running sums of one model's figures."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.sq_error = np.zeros(bundle.n_features)
        self.steps = 0
        self.above = 0
        self.alerts = 0

    def add(self, out: EngineOutput, both: np.ndarray) -> None:
        b = self.bundle
        _, scale = b.scaler.rows_for(out.asset[both])
        raw = out.errors[both] * b.error_scale * scale  # back from the model's units to the sensor's
        self.sq_error += np.sum(raw**2, axis=0)
        self.steps += int(both.sum())
        self.above += int(np.sum(out.smoothed[both] > out.threshold[both]))
        self.alerts += sum(e.state == "open" for e in out.events)

    def figures(self, naive: np.ndarray) -> GateFigures:
        moved = naive > 0
        mse = self.sq_error / self.steps if self.steps else np.full(len(naive), np.nan)
        ratio = np.where(moved, mse / np.where(moved, naive, 1.0), np.nan)
        error = float(np.mean(ratio[moved])) if moved.any() and self.steps else math.nan
        per_feature = {name: _finite(float(r)) for name, r in zip(self.bundle.features, ratio)}
        return GateFigures(self.bundle.version, self.steps, error,
                           self.above / self.steps if self.steps else math.nan, self.alerts, per_feature)


class _Changes:
    """Mean squared step-to-step change per feature: the fixed scale of the forecast error."""

    def __init__(self, n_features: int) -> None:
        self.total = np.zeros(n_features)
        self.count = np.zeros(n_features, np.int64)

    def add(self, out: EngineOutput) -> None:
        # Steps come grouped by asset; pairs across two outputs are skipped (one per asset and batch).
        pair = (out.asset[1:] == out.asset[:-1]) & (out.step[1:] == out.step[:-1] + 1)
        diff = out.values[1:][pair] - out.values[:-1][pair]
        ok = np.isfinite(diff)
        self.total += np.square(np.where(ok, diff, 0.0)).sum(axis=0)
        self.count += ok.sum(axis=0)

    def mean(self) -> np.ndarray:
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)


def compare(champion: ModelBundle, challenger: ModelBundle, batches: Iterable[DecodedBatch],
            grid: GridSettings) -> tuple[GateFigures, GateFigures]:
    """Score the held-out batches (in time order per asset) with both models and sum up.

    Memory is bounded by one batch: each is scored by both engines and reduced to sums.
    """
    reason = incompatibility(champion, challenger)
    if reason is not None:
        raise GateError(reason)
    engines = (DetectionEngine(champion, grid), DetectionEngine(challenger, grid))
    tallies = (_Tally(champion), _Tally(challenger))
    changes = _Changes(challenger.n_features)
    for batch in batches:
        _add([e.process(batch) for e in engines], tallies, changes)
    _add([e.flush() for e in engines], tallies, changes)
    naive = changes.mean()
    return tallies[0].figures(naive), tallies[1].figures(naive)


def _add(outs: list[EngineOutput], tallies: tuple[_Tally, _Tally], changes: _Changes) -> None:
    a, b = outs
    if len(a) != len(b) or not (np.array_equal(a.step, b.step) and np.array_equal(a.asset, b.asset)):
        raise GateError("the two models closed different grid steps on the same data")
    both = np.ones(len(a), bool)
    for out in outs:
        both &= np.isfinite(out.errors).all(axis=1) & np.isfinite(out.smoothed) & np.isfinite(out.threshold)
    for tally, out in zip(tallies, outs):
        tally.add(out, both)
    changes.add(a)


def decide(champion: GateFigures, challenger: GateFigures, margin: float) -> GateDecision:
    """Publish if neither figure of the challenger is worse than the champion's by more than ``margin``."""
    if challenger.steps == 0:
        return GateDecision(False, "no held-out step was scored by both models: nothing to compare on",
                            margin, champion, challenger)
    checks = [
        ("forecast error", challenger.forecast_error, champion.forecast_error,
         champion.forecast_error * (1 + margin)),
        ("alert fraction", challenger.alert_fraction, champion.alert_fraction,
         champion.alert_fraction * (1 + margin) + ALERT_SLACK),
    ]
    worse = [f"{name} {new:.4g} above the limit {limit:.4g} (champion {old:.4g})"
             for name, new, old, limit in checks if not new <= limit]  # NaN fails too
    if worse:
        return GateDecision(False, "worse than the serving model: " + "; ".join(worse), margin, champion, challenger)
    held = ", ".join(f"{name} {new:.4g} <= {limit:.4g}" for name, new, _, limit in checks)
    return GateDecision(True, f"not worse than the serving model: {held}", margin, champion, challenger)


def unconditional(reason: str, margin: float) -> GateDecision:
    """Publish without comparing (first model, no held-out period, a deliberate change of features)."""
    return GateDecision(True, reason, margin)
