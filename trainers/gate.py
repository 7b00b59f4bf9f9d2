"""Champion/challenger gate: refuse a new model only when it is measurably worse than the one serving.

Both models score the same held-out data (the newest part of the training range, never
trained on, with the same abnormal periods excluded) through the production path, a
:class:`~pipeline.engine.DetectionEngine` each, starting cold. They are compared on the
steps that both scored, step by step, with two figures where lower is better:

* **forecast error**: per step, each feature's squared next-step error in *raw units*
  divided by that feature's mean squared step-to-step change on the held-out data, then the
  mean over features. The errors a model reports are normalised by its own scaler and
  training error scale, so a model with larger training errors would look better in its
  own units; raw errors over a scale taken from the data itself mean the same thing for
  both models. The step-to-step change is the error of predicting "no change", so the mean
  over steps reads as skill against that naive forecast (1 = no better), is unit-free (a
  feature in pascals does not outweigh one in amperes), and needs no fitted statistic of
  either model. Features that never moved on the held-out data are left out.
* **alert fraction**: the fraction of steps whose alert score is above the threshold in
  force. The held-out data is assumed normal, so a model that would alert more is worse.
  It counts steps, not opened alerts, so a model that alerts once and never closes is
  not mistaken for a quiet one.

The rule is a paired test over those steps, not a comparison of two point figures. Two
retrains on the same data differ by more than a few percent on one held-out day, and
neighbouring steps are far from independent (an excursion lasts many steps), so a point
comparison refuses ordinary retrains by chance. Instead:

1. The scored steps are cut into blocks of :data:`BLOCK_STEPS` contiguous grid steps of
   one asset; each block keeps both models' summed per-step error and steps above threshold.
2. The blocks are resampled with replacement :data:`RESAMPLES` times (a block bootstrap,
   seeded, so the same data gives the same decision). Each resample gives the **relative
   error change** ``(Σ challenger error − Σ champion error) / Σ champion error`` and the
   **alert fraction change** ``(Σ challenger above − Σ champion above) / Σ steps``; the
   percentiles give their :data:`CONFIDENCE` (95 %) intervals. Resampling whole blocks
   keeps the dependence between neighbouring steps inside each resample, and both models
   are always resampled together (the same steps), so what they share cancels.
3. The challenger is **refused** only when an interval lies entirely above its allowance:

   * the interval's lower bound of the relative error change is above ``margin``
     (``trainer.gate_margin``: worse by more than that fraction, with 97.5 % one-sided
     confidence), or
   * the lower bound of the alert fraction change is above
     ``margin × champion's alert fraction + alert_tolerance`` (``trainer.gate_alert_tolerance``:
     absolute room, so a champion that never alerted does not veto a challenger for one
     short excursion).

   Anything else publishes: an equal model (its interval straddles 0), a better one, and
   one whose difference the held-out data cannot tell apart from chance. A figure that
   cannot be computed (no step scored by both, no feature moved) refuses.

4. A bound, not a test: each model's **score level**, the mean over the same steps of its alert
   score over its threshold. Both models' levels are calibrated on normal data the same way, so
   both read their normal steps at a similar fraction of the threshold; a challenger whose
   fraction is more than :data:`SENSITIVITY_FACTOR` times below the champion's has levels its
   scores cannot reach (a model that would never alert, which the alert fraction rewards) and is
   refused.

Memory is bounded by one batch plus one row per block (``F`` floats per model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.bundle import ModelBundle
from pipeline.engine import DetectionEngine, EngineOutput
from pipeline.readings import DecodedBatch
from pipeline.settings import GridSettings

BLOCK_STEPS = 64          # contiguous steps of one asset resampled together
RESAMPLES = 1000          # bootstrap resamples
CONFIDENCE = 0.95         # two-sided level of the intervals; refusal looks at the lower bound only
SEED = 0                  # the same held-out data always gives the same decision
ALERT_TOLERANCE = 0.002   # default absolute room on the alert fraction (trainer.gate_alert_tolerance)
SENSITIVITY_FACTOR = 10.0  # a challenger's score level this many times below the champion's is refused
_CELLS = 1 << 21          # resample weights built per call (resamples × blocks): bounds memory
_KEY_SPAN = 1 << 40       # block key = asset code × span + block number


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
    score_level: float = math.nan   # mean alert score over its threshold (higher: more sensitive); NaN: unknown

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "steps": self.steps, "forecast_error": _finite(self.forecast_error),
                "alert_fraction": _finite(self.alert_fraction), "alerts": self.alerts,
                "feature_error": self.feature_error, "score_level": _finite(self.score_level)}


@dataclass(frozen=True)
class PairedBlocks:
    """Per-block sums of both models over the same steps (index 0 champion, 1 challenger)."""

    steps: np.ndarray   # (B,) steps in each block
    error: np.ndarray   # (B, 2) summed per-step forecast error
    above: np.ndarray   # (B, 2) steps above the threshold
    block_steps: int = BLOCK_STEPS

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {"estimate": _finite(self.estimate), "low": _finite(self.low), "high": _finite(self.high)}


@dataclass(frozen=True)
class PairedTest:
    """The block bootstrap's intervals and the allowances they were held against."""

    blocks: int
    steps: int
    error_change: Interval   # (challenger − champion) / champion, of the mean per-step forecast error
    alert_change: Interval   # challenger − champion, of the alert fraction (absolute)
    error_allowed: float     # refused when error_change.low is above this (the margin)
    alert_allowed: float     # refused when alert_change.low is above this
    block_steps: int = BLOCK_STEPS
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = SEED

    @property
    def error_worse(self) -> bool:
        return not self.error_change.low <= self.error_allowed  # NaN refuses

    @property
    def alert_worse(self) -> bool:
        return not self.alert_change.low <= self.alert_allowed

    def to_dict(self) -> dict[str, Any]:
        return {"method": "block bootstrap", "blocks": self.blocks, "steps": self.steps,
                "block_steps": self.block_steps, "resamples": self.resamples, "confidence": self.confidence,
                "seed": self.seed, "error_change": self.error_change.to_dict(),
                "alert_change": self.alert_change.to_dict(), "error_allowed": _finite(self.error_allowed),
                "alert_allowed": _finite(self.alert_allowed),
                "error_worse": self.error_worse, "alert_worse": self.alert_worse}


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` measured: each model's figures and the paired per-block sums."""

    champion: GateFigures
    challenger: GateFigures
    blocks: PairedBlocks


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str
    margin: float
    champion: GateFigures | None = None
    challenger: GateFigures | None = None
    paired: PairedTest | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"decision": "publish" if self.publish else "refuse", "reason": self.reason, "margin": self.margin,
               "champion": self.champion.to_dict() if self.champion else None,
               "challenger": self.challenger.to_dict() if self.challenger else None}
        if self.paired is not None:
            out["paired"] = self.paired.to_dict()
        return out


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return round(float(x), 6) if math.isfinite(x) else None


def incompatibility(champion: ModelBundle, challenger: ModelBundle) -> str | None:
    """Why two models cannot score the same grid (a deliberate change of features or period), or None."""
    if champion.features != challenger.features:
        return f"features changed from {list(champion.features)} to {list(challenger.features)}"
    if champion.period_ms != challenger.period_ms:
        return f"grid period changed from {champion.period_ms} ms to {challenger.period_ms} ms"
    return None


# ---------------------------------------------------------------- the paired test (pure)


def _group_sums(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys (sorted) and the sums of ``values`` rows sharing each."""
    if not len(keys):
        return keys, values[:0]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return sorted_keys[starts], np.add.reduceat(values[order], starts, axis=0)


def block_keys(asset_code: np.ndarray, step: np.ndarray, block_steps: int = BLOCK_STEPS) -> np.ndarray:
    """One key per (asset, block of ``block_steps`` grid steps): steps of different assets never share a block."""
    return asset_code.astype(np.int64) * _KEY_SPAN + np.floor_divide(step.astype(np.int64), block_steps)


def blocks_from_steps(asset: np.ndarray, step: np.ndarray, error: np.ndarray, above: np.ndarray,
                      block_steps: int = BLOCK_STEPS) -> PairedBlocks:
    """Per-block sums from per-step figures: ``error`` and ``above`` are (n, 2), champion then challenger."""
    codes, _ = pd.factorize(np.asarray(asset))
    keys = block_keys(codes, np.asarray(step), block_steps)
    values = np.column_stack([np.ones(len(keys)), np.asarray(error, float), np.asarray(above, float)])
    _, sums = _group_sums(keys, values)
    return PairedBlocks(sums[:, 0], sums[:, 1:3], sums[:, 3:5], block_steps)


def paired_test(blocks: PairedBlocks, *, margin: float, alert_tolerance: float = ALERT_TOLERANCE,
                resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> PairedTest:
    """Block-bootstrap intervals of the relative forecast error change and the alert fraction change.

    Vectorised: each round draws the blocks of many resamples at once, turns them into
    per-resample counts (``bincount``) and sums with one matrix product.
    """
    n_blocks, block_steps = len(blocks), blocks.block_steps
    n = blocks.steps.astype(float)
    x = np.column_stack([blocks.error[:, 0], blocks.error[:, 1] - blocks.error[:, 0],
                         blocks.above[:, 1] - blocks.above[:, 0], n]) if n_blocks else np.zeros((0, 4))
    total = x.sum(axis=0)
    champion_alerts = float(blocks.above[:, 0].sum() / total[3]) if total[3] > 0 else math.nan
    error_allowed = float(margin)
    alert_allowed = float(margin * champion_alerts + alert_tolerance) if math.isfinite(champion_alerts) \
        else float(alert_tolerance)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = (float(total[1] / total[0]) if total[0] > 0 else math.nan,
                    float(total[2] / total[3]) if total[3] > 0 else math.nan)
    if n_blocks == 0:
        nan = Interval(math.nan, math.nan, math.nan)
        return PairedTest(0, 0, nan, nan, error_allowed, alert_allowed, block_steps, resamples, confidence, seed)
    rng = np.random.default_rng(seed)
    per_round = max(1, _CELLS // n_blocks)
    stats = []
    for first in range(0, resamples, per_round):
        k = min(per_round, resamples - first)
        drawn = rng.integers(0, n_blocks, size=(k, n_blocks)) + (np.arange(k) * n_blocks)[:, None]
        weights = np.bincount(drawn.ravel(), minlength=k * n_blocks).reshape(k, n_blocks).astype(float)
        s = weights @ x
        with np.errstate(divide="ignore", invalid="ignore"):
            stats.append(np.column_stack([np.where(s[:, 0] > 0, s[:, 1] / s[:, 0], np.nan), s[:, 2] / s[:, 3]]))
    drawn_stats = np.concatenate(stats)
    tail = (1 - confidence) / 2
    if np.isnan(drawn_stats).any():
        low = high = np.full(2, np.nan)
    else:
        low, high = np.quantile(drawn_stats, [tail, 1 - tail], axis=0)
    return PairedTest(n_blocks, int(total[3]), Interval(estimate[0], float(low[0]), float(high[0])),
                      Interval(estimate[1], float(low[1]), float(high[1])), error_allowed, alert_allowed,
                      block_steps, resamples, confidence, seed)


# ---------------------------------------------------------------- measuring both models


class _Blocks:
    """Per-block sums of both models' squared raw errors (per feature) and steps above threshold."""

    def __init__(self, n_features: int, block_steps: int) -> None:
        self.n_features = n_features
        self.block_steps = block_steps
        self.codes: dict[str, int] = {}
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, asset: np.ndarray, step: np.ndarray, sq: tuple[np.ndarray, np.ndarray],
            above: tuple[np.ndarray, np.ndarray]) -> None:
        if not len(step):
            return
        local, names = pd.factorize(asset)
        code = np.array([self.codes.setdefault(str(a), len(self.codes)) for a in names], np.int64)[local]
        values = np.column_stack([np.ones(len(step)), sq[0], sq[1], above[0], above[1]])
        self.parts.append(_group_sums(block_keys(code, step, self.block_steps), values))

    def blocks(self, naive: np.ndarray) -> tuple[PairedBlocks, np.ndarray]:
        """Per-block sums of the per-step forecast error, and the total squared error per model and feature."""
        f = self.n_features
        if self.parts:
            _, sums = _group_sums(np.concatenate([k for k, _ in self.parts]),
                                  np.concatenate([v for _, v in self.parts]))
        else:
            sums = np.zeros((0, 1 + 2 * f + 2))
        sq = sums[:, 1:1 + 2 * f].reshape(-1, 2, f)
        moved = naive > 0
        if moved.any():
            error = (sq[:, :, moved] / naive[moved]).mean(axis=2)
        else:
            error = np.full((len(sums), 2), np.nan)
        return PairedBlocks(sums[:, 0], error, sums[:, -2:], self.block_steps), sq.sum(axis=0)


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
            grid: GridSettings, block_steps: int = BLOCK_STEPS) -> Comparison:
    """Score the held-out batches (in time order per asset) with both models; sum up per block."""
    reason = incompatibility(champion, challenger)
    if reason is not None:
        raise GateError(reason)
    bundles = (champion, challenger)
    engines = (DetectionEngine(champion, grid), DetectionEngine(challenger, grid))
    acc = _Blocks(challenger.n_features, block_steps)
    changes = _Changes(challenger.n_features)
    alerts, levels = [0, 0], [0.0, 0.0]
    for batch in batches:
        _add(bundles, [e.process(batch) for e in engines], acc, changes, alerts, levels)
    _add(bundles, [e.flush() for e in engines], acc, changes, alerts, levels)
    naive = changes.mean()
    blocks, sq = acc.blocks(naive)
    steps = int(blocks.steps.sum())
    figures = tuple(_figures(b, steps, sq[m], float(blocks.above[:, m].sum()), alerts[m], naive, levels[m])
                    for m, b in enumerate(bundles))
    return Comparison(figures[0], figures[1], blocks)


def _add(bundles: tuple[ModelBundle, ModelBundle], outs: list[EngineOutput], acc: _Blocks, changes: _Changes,
         alerts: list[int], levels: list[float]) -> None:
    a, b = outs
    if len(a) != len(b) or not (np.array_equal(a.step, b.step) and np.array_equal(a.asset, b.asset)):
        raise GateError("the two models closed different grid steps on the same data")
    both = np.ones(len(a), bool)
    for out in outs:
        both &= np.isfinite(out.errors).all(axis=1) & np.isfinite(out.alert_score) & np.isfinite(out.threshold)
    sq, above = [], []
    for m, (bundle, out) in enumerate(zip(bundles, outs)):
        _, scale = bundle.scaler.rows_for(out.asset[both])
        raw = out.errors[both] * bundle.error_scale * scale  # back from the model's units to the sensor's
        sq.append(raw**2)
        above.append((out.alert_score[both] > out.threshold[both]).astype(float))
        alerts[m] += sum(e.state == "open" for e in out.events)
        levels[m] += float(np.sum(out.alert_score[both] / out.threshold[both]))
    acc.add(a.asset[both], a.step[both], (sq[0], sq[1]), (above[0], above[1]))
    changes.add(a)


def _figures(bundle: ModelBundle, steps: int, sq: np.ndarray, above: float, alerts: int,
             naive: np.ndarray, level: float) -> GateFigures:
    moved = naive > 0
    mse = sq / steps if steps else np.full(len(naive), np.nan)
    ratio = np.where(moved, mse / np.where(moved, naive, 1.0), np.nan)
    error = float(np.mean(ratio[moved])) if moved.any() and steps else math.nan
    per_feature = {name: _finite(float(r)) for name, r in zip(bundle.features, ratio)}
    return GateFigures(bundle.version, steps, error, above / steps if steps else math.nan, alerts, per_feature,
                       level / steps if steps else math.nan)


# ---------------------------------------------------------------- the decision


def decide(comparison: Comparison, margin: float, alert_tolerance: float = ALERT_TOLERANCE, *,
           resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> GateDecision:
    """Refuse only when the paired test shows the challenger worse beyond its allowance (see the module docstring)."""
    champion, challenger = comparison.champion, comparison.challenger
    if challenger.steps == 0:
        return GateDecision(False, "no held-out step was scored by both models: nothing to compare on",
                            margin, champion, challenger)
    if not (math.isfinite(champion.forecast_error) and math.isfinite(challenger.forecast_error)):
        return GateDecision(False, f"forecast error undefined (champion {champion.forecast_error:.4g}, "
                                   f"challenger {challenger.forecast_error:.4g}): no feature moved on the held-out "
                                   f"data", margin, champion, challenger)
    test = paired_test(comparison.blocks, margin=margin, alert_tolerance=alert_tolerance, resamples=resamples,
                       confidence=confidence, seed=seed)
    level = f"{confidence:.0%}"
    err, alert = test.error_change, test.alert_change
    error_text = (f"forecast error {_pct(err.estimate)} [{_pct(err.low)}, {_pct(err.high)}] "
                  f"(champion {champion.forecast_error:.4g}, challenger {challenger.forecast_error:.4g})")
    alert_text = (f"alert fraction {_abs(alert.estimate)} [{_abs(alert.low)}, {_abs(alert.high)}] "
                  f"(champion {champion.alert_fraction:.4g}, challenger {challenger.alert_fraction:.4g})")
    worse = []
    if test.error_worse:
        worse.append(f"{error_text}: lower bound above the margin {_pct(test.error_allowed)}")
    if test.alert_worse:
        worse.append(f"{alert_text}: lower bound above the allowed {_abs(test.alert_allowed)}")
    if challenger.score_level < champion.score_level / SENSITIVITY_FACTOR:  # (NaN: not measured, no bound)
        worse.append(f"score level {challenger.score_level:.3g} of its threshold against the serving model's "
                     f"{champion.score_level:.3g}: more than {SENSITIVITY_FACTOR:g}× less sensitive, levels its "
                     f"scores cannot reach")
    if worse:
        return GateDecision(False, f"worse than the serving model ({level} intervals over {test.blocks} blocks): "
                                   + "; ".join(worse), margin, champion, challenger, test)
    return GateDecision(True, f"not worse than the serving model ({level} intervals over {test.blocks} blocks): "
                              f"{error_text}, lower bound within {_pct(test.error_allowed)}; {alert_text}, "
                              f"lower bound within {_abs(test.alert_allowed)}",
                        margin, champion, challenger, test)


def _pct(x: float) -> str:
    return f"{x:+.1%}" if math.isfinite(x) else "nan"


def _abs(x: float) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else "nan"


def unconditional(reason: str, margin: float) -> GateDecision:
    """Publish without comparing (first model, no held-out period, a deliberate change of features)."""
    return GateDecision(True, reason, margin)
