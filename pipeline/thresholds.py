"""Learned thresholds: calibrated on held-out normal data, adapted online per asset.

* **Smoothing**: the step score is smoothed with an EWMA, so one noisy step does not
  alert while a sustained deviation does (telemanom smooths its errors the same way).
* **Calibration** (fit time): the threshold starts at a high quantile of the smoothed
  scores of held-out normal data, times a safety margin.
* **Online adaptation** (in the spirit of telemanom's nonparametric dynamic threshold):
  each asset tracks the mean and variance of its own smoothed score while it is normal,
  and its threshold is ``max(calibrated, mean + z·sd)`` — a noisier asset earns a higher
  threshold, and a quiet one never drops below the calibrated floor. Adaptation pauses
  while the asset is above its threshold or alerting, so a fault is not learned as normal.
"""

from __future__ import annotations

import numpy as np

from pipeline.bundle import ThresholdParams
from pipeline.settings import ThresholdSettings
from pipeline.state import FleetState


def smooth_series(scores: np.ndarray, alpha: float) -> np.ndarray:
    """EWMA of one asset's score series; NaN (unscored) steps keep the previous level."""
    out = np.empty(len(scores))
    level = np.nan
    for i, s in enumerate(scores):
        if not np.isnan(s):
            level = s if np.isnan(level) else alpha * s + (1 - alpha) * level
        out[i] = level
    return out


def calibrate(smoothed_normal: np.ndarray, settings: ThresholdSettings) -> ThresholdParams:
    """Threshold parameters from smoothed scores of held-out normal data."""
    s = smoothed_normal[np.isfinite(smoothed_normal)]
    if len(s) < 10:
        raise ValueError(f"need at least 10 scored held-out steps to calibrate a threshold, got {len(s)}")
    threshold = float(np.quantile(s, settings.quantile)) * settings.margin
    return ThresholdParams.from_settings(settings, threshold=threshold, normal_mean=float(np.mean(s)),
                                         normal_std=float(np.std(s)))


def update_thresholds(state: FleetState, rows: np.ndarray, score: np.ndarray,
                      p: ThresholdParams) -> tuple[np.ndarray, np.ndarray]:
    """Advance smoothing and adaptation for one step of each of ``rows`` (distinct assets).

    Returns the smoothed score and the threshold in force for each row.
    """
    cols = state.cols
    valid = ~np.isnan(score)
    prev = cols["smoothed"][rows]
    smoothed = np.where(np.isnan(prev), score, p.smoothing_alpha * score + (1 - p.smoothing_alpha) * prev)
    smoothed = np.where(valid, smoothed, prev)
    cols["smoothed"][rows] = smoothed

    mean = cols["adapt_mean"][rows]
    var = cols["adapt_var"][rows]
    fresh = np.isnan(var)
    mean = np.where(fresh, p.normal_mean, mean)
    var = np.where(fresh, p.normal_std**2, var)
    threshold = np.maximum(p.threshold, mean + p.adapt_z * np.sqrt(var))

    learn = valid & (smoothed < threshold) & ~cols["alert_open"][rows] & (p.adapt_alpha > 0)
    delta = smoothed - mean
    new_mean = mean + p.adapt_alpha * delta
    new_var = (1 - p.adapt_alpha) * (var + p.adapt_alpha * delta**2)
    cols["adapt_mean"][rows] = np.where(learn, new_mean, mean)
    cols["adapt_var"][rows] = np.where(learn, new_var, var)
    return smoothed, threshold
