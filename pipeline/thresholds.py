"""Learned thresholds: three score terms, each calibrated on held-out normal data, combined
into one alert score and adapted online per asset.

The terms, per feature f of a step:

* **forecast** — EWMA of the squared next-step error ``e_f²`` of the LSTM (fast,
  ``smoothing_alpha``): spikes, noise bursts, abrupt breaks in the dynamics.
* **novelty** — EWMA of the squared cross-sectional residual ``r_f²`` (how far feature f
  is from what the other features say it should be; slow, ``novelty_alpha``): drifts,
  level shifts and broken correlations that a next-step forecaster adapts to. Each ``r_f²``
  is capped at ``(novelty_cap × level_f)²``, so a long fault does not fill the slow EWMA
  with evidence that keeps the alert open long after the fault ends. Calibration does not
  cap: normal values come nowhere near the cap.
* **flatline** — how long the raw value has not changed, against the longest unchanged
  run seen in training: stuck sensors. A feature that held a value three steps in a row on
  more than ``flat_repeat_share`` of its training steps (quantised, discrete, idle) is never
  judged stuck: its limit is out of reach (``fit.never_stuck``).

Each feature's term is divided by its own calibrated level (a high quantile of that term
on held-out normal data, Bonferroni-adjusted for the number of features, times a
margin): a feature the others explain well gets a tight level, a wandering one a loose
level. Levels are calibrated per asset where an asset's history allows it (a fleet mixes
quiet and noisy machines), else for the whole fleet. The slow novelty term has a margin of
its own, to widen where a history is short: a slow EWMA makes few independent excursions
in it, and operation drifts to states it did not show. The combined score — the largest
of all — is in units of "calibrated level" and alerts above ``threshold`` (1). The
features of the dominating term explain the alert.

**Online adaptation** (in the spirit of telemanom's nonparametric dynamic threshold):
each asset tracks the mean and variance of its own combined score while it is normal,
and its threshold is ``max(calibrated, mean + z·sd)`` — a noisier asset earns a higher
threshold, a quiet one never drops below the calibrated level. Adaptation pauses while
the asset is above its threshold or alerting, so a fault is not learned as normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.bundle import ModelBundle, ThresholdParams
from pipeline.rowwise import repeated, row_fmax, row_max, take_rows
from pipeline.state import PRIOR_LEVEL, FleetState


def ewma(prev: np.ndarray, x: np.ndarray, alpha: float) -> np.ndarray:
    """One EWMA step; a NaN level starts at x, a NaN x keeps the level."""
    out = np.where(np.isnan(prev), x, alpha * x + (1 - alpha) * prev)
    return np.where(np.isnan(x), prev, out)




def ewma_series(x: np.ndarray, alpha: float, start: float = np.nan) -> np.ndarray:
    """EWMA along axis 0 of one asset's series (n,) or (n, F), from level ``start``."""
    out = np.empty_like(x, dtype=np.float64)
    level = np.full(x.shape[1:], start)
    for i in range(len(x)):
        level = ewma(level, x[i], alpha)
        out[i] = level
    return out


def flat_runs(values: np.ndarray) -> np.ndarray:
    """For one asset's raw series (n, F): steps each value has stayed exactly unchanged."""
    runs = np.zeros(values.shape, np.int64)
    for i in range(1, len(values)):
        runs[i] = np.where(values[i] == values[i - 1], runs[i - 1] + 1, 0)
    return runs


def _ratios(ewma_sq: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Per-feature term in units of its level (NaN where not yet scored)."""
    return np.sqrt(np.maximum(ewma_sq, 0.0)) / level


def _term(ratios: np.ndarray) -> np.ndarray:
    peak = row_fmax(ratios)  # NaN only where every feature is NaN
    return np.where(np.isfinite(peak), peak, np.nan)


@dataclass(frozen=True)
class TermLevels:
    """Per-feature calibrated levels of the three terms (from the bundle): one row for all
    steps (F,), or one row per step (k, F) where assets have levels of their own."""

    forecast: np.ndarray  # (F,) or (k, F)
    novelty: np.ndarray   # (F,) or (k, F)
    flat: np.ndarray      # (F,) or (k, F) steps a value may stay unchanged

    @classmethod
    def for_assets(cls, bundle: ModelBundle, assets: np.ndarray) -> TermLevels:
        """One row per step: each asset's own levels where the bundle has them, else the fleet's."""
        fc, nv = bundle.asset_levels.rows_for(assets, bundle.forecast_level, bundle.novelty_level)
        return cls(fc, nv, bundle.flat_limit)

    def take(self, idx: np.ndarray) -> TermLevels:
        """The rows of the steps ``idx`` (levels shared by all steps are returned as they are)."""
        if self.forecast.ndim == 1:
            return self
        return TermLevels(self.forecast[idx], self.novelty[idx], self.flat)


@dataclass
class CombinedScore:
    score: np.ndarray          # (k,) the largest term, in units of calibrated threshold
    contributions: np.ndarray  # (k, F) per-feature weights of the dominating term
    forecast: np.ndarray       # (k,) each term, for plots and diagnostics
    novelty: np.ndarray
    flat: np.ndarray


def combine(forecast_ewma: np.ndarray, novelty_ewma: np.ndarray, flat_run: np.ndarray,
            levels: TermLevels) -> CombinedScore:
    """The alert score and its explanation from the per-feature term states (k, F)."""
    fc = _ratios(forecast_ewma, levels.forecast)
    nv = _ratios(novelty_ewma, levels.novelty)
    t_fc, t_nv = _term(fc), _term(nv)
    flat = levels.flat if levels.flat.ndim == 2 else repeated(levels.flat, len(flat_run))
    flat_ratio = flat_run / flat
    t_fl = row_max(flat_ratio)
    # The terms are finite or NaN (see _term): a NaN term never dominates.
    terms = np.empty((len(t_fl), 3))  # (filled column by column: np.stack costs more than a small poll's terms)
    terms[:, 0] = np.where(np.isnan(t_fc), -1.0, t_fc)
    terms[:, 1] = np.where(np.isnan(t_nv), -1.0, t_nv)
    terms[:, 2] = t_fl
    which = terms.argmax(axis=-1)
    score = row_max(terms)
    score = np.where(np.isnan(t_fc) & np.isnan(t_nv), np.nan, score)
    model_terms = np.where((which == 0)[:, None], fc, nv)
    if not np.isfinite(model_terms).all():  # (np.nan_to_num costs a small poll more than the check)
        np.nan_to_num(model_terms, copy=False)
    contrib = np.where((which == 2)[:, None], flat_ratio, model_terms)
    return CombinedScore(score, contrib, t_fc, t_nv, t_fl)


def feature_quantile(quantile: float, n_features: int) -> float:
    """The per-feature quantile ``1 - (1 - q) / F``: the largest of the F terms then
    exceeds its level about as rarely as quantile q says."""
    return 1.0 - (1.0 - quantile) / n_features


def level_from_quantile(per_feature_quantile: np.ndarray, margin: float) -> np.ndarray:
    """A term's calibrated level: its per-feature quantile on normal data, times the margin."""
    return np.maximum(per_feature_quantile * margin, 1e-6)


def excursion_factor(steps: int, alpha: float, per_feature_quantile: float) -> float:
    """How far a term's empirical quantile is stretched when its calibration steps hold too few
    independent excursions to reach it.

    An EWMA of weight ``alpha`` forgets in about ``(2 - alpha) / alpha`` steps, so ``steps``
    hold ``n = steps · alpha / (2 - alpha)`` independent values, whose largest sits near the
    ``1 - 1 / (n + 1)`` quantile: a higher quantile is then read off the sample's maximum, an
    underestimate. With a light (Gaussian-like) tail, quantiles grow like ``sqrt(log(1 / (1 - p)))``,
    so the level is stretched by ``sqrt(log(1 / (1 - q)) / log(n + 1))`` when ``n + 1 < 1 / (1 - q)``,
    and not at all when the sample reaches the quantile.
    """
    n = max(steps, 1) * alpha / (2.0 - alpha)
    need = -np.log1p(-per_feature_quantile)
    have = np.log1p(n)
    return float(np.sqrt(need / have)) if have < need else 1.0


def calibrate_levels(ewma_sq: np.ndarray, quantile: float, margin: float) -> np.ndarray:
    """Per-feature level of one term from normal steps (k, F), all in memory (the streaming
    fit computes the same quantile piece by piece)."""
    v = np.sqrt(np.maximum(ewma_sq, 0.0))
    ok = np.isfinite(v).all(axis=1)
    if ok.sum() < 10:
        raise ValueError(f"need at least 10 scored held-out steps to calibrate a threshold, got {int(ok.sum())}")
    return level_from_quantile(np.quantile(v[ok], feature_quantile(quantile, v.shape[1]), axis=0), margin)


def restart_terms(state: FleetState, rows: np.ndarray) -> None:
    """Start these assets' score terms afresh (after a data gap): the smoothed error terms at
    their normal level, no flat run. The online threshold statistics, which describe the asset
    over a long time, are kept."""
    v = state.vectors
    v["forecast_ewma"][rows] = PRIOR_LEVEL
    v["novelty_ewma"][rows] = PRIOR_LEVEL
    v["prev_value"][rows] = np.nan
    v["flat_run"][rows] = 0


def update_thresholds(state: FleetState, rows: np.ndarray, values: np.ndarray, errors: np.ndarray,
                      novelty: np.ndarray, levels: TermLevels, p: ThresholdParams
                      ) -> tuple[CombinedScore, np.ndarray]:
    """Advance one step for each of ``rows`` (distinct assets).

    ``errors`` are normalised forecast errors (NaN while warming up), ``novelty`` the
    normalised cross-sectional residuals, ``values`` the raw grid values. Returns the
    combined score and the threshold in force for each row.
    """
    v, cols = state.vectors, state.cols
    v["forecast_ewma"][rows] = fc = ewma(take_rows(v["forecast_ewma"], rows), errors**2, p.smoothing_alpha)
    capped = np.minimum(novelty**2, (p.novelty_cap * levels.novelty) ** 2)  # NaN stays NaN
    v["novelty_ewma"][rows] = nv = ewma(take_rows(v["novelty_ewma"], rows), capped, p.novelty_alpha)
    same = values == take_rows(v["prev_value"], rows)
    v["flat_run"][rows] = runs = np.where(same, take_rows(v["flat_run"], rows) + 1, 0)
    v["prev_value"][rows] = values
    combined = combine(fc, nv, runs, levels)

    score = combined.score
    valid = np.isfinite(score)
    mean = cols["adapt_mean"][rows]
    var = cols["adapt_var"][rows]
    fresh = np.isnan(var)
    mean = np.where(fresh, p.normal_mean, mean)
    var = np.where(fresh, p.normal_std**2, var)
    threshold = np.maximum(p.threshold, mean + p.adapt_z * np.sqrt(var))

    learn = valid & (score < threshold) & ~cols["alert_open"][rows] & (p.adapt_alpha > 0)
    delta = np.where(valid, score - mean, 0.0)
    cols["adapt_mean"][rows] = np.where(learn, mean + p.adapt_alpha * delta, mean)
    cols["adapt_var"][rows] = np.where(learn, (1 - p.adapt_alpha) * (var + p.adapt_alpha * delta**2), var)
    return combined, threshold
