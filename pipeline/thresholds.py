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
* **agreement** — per feature, ``sqrt(forecast ratio × novelty ratio)``: both views of one
  sensor (its own dynamics, and what the other sensors say it should be) moderately off at
  once. A fault that lifts both to 0.7 of their levels stays below either alone; together
  they are stronger evidence than either term near its level, whose normal excursions are
  mostly unrelated. Its level is one number per asset (both ratios are already in units of
  their own levels, so no feature needs its own), calibrated on held-out steps like the
  forecast term, and each term alone then needs ``alone_factor`` times its level to dominate
  the score.
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
in it, and operation drifts to states it did not show. A feature whose residual wanders
slowly (a temperature over a few minutes of history) holds few independent values, so its
spread there says little about where it goes next: its novelty level is widened by the
Student-t quantile for that many values over the normal one (:func:`scale_uncertainty_factor`);
a fast one's is not. The combined score — the largest of all — is in units of "calibrated
level" and alerts above ``threshold`` (1). The features of the dominating term explain the alert.

**Online adaptation** (in the spirit of telemanom's nonparametric dynamic threshold):
each asset tracks the mean and variance of its own combined score while it is normal,
and its threshold is ``max(calibrated, mean + z·sd)`` — a noisier asset earns a higher
threshold, a quiet one never drops below the calibrated level. Adaptation pauses while
the asset is above its threshold or alerting, so a fault is not learned as normal.
With ``adapt_clip_sd`` k, each step's deviation is clipped at k adapted standard deviations
before it updates the mean and variance (Huber's robust EWMA, as in Gelper, Fried and Croux,
*Robust forecasting with exponential and Holt-Winters smoothing*, 2010): a fault that outlasts
its alert (the score dips below the closing level, then stays just under the threshold) inflates
the variance several times more slowly, instead of lifting the threshold over its own reopening
within tens of steps.
"""

from __future__ import annotations

import math
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


def term_ratios(ewma_sq: np.ndarray, level: np.ndarray) -> np.ndarray:
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
    agree: np.ndarray | None = None  # (1,) or (k, 1) level of the agreement term (None: no such term, as bundles before it)
    alone: float = 1.0          # with an agreement term: each model term alone is judged against this × its level

    @classmethod
    def for_assets(cls, bundle: ModelBundle, assets: np.ndarray) -> TermLevels:
        """One row per step: each asset's own levels where the bundle has them, else the fleet's."""
        fc, nv = bundle.asset_levels.rows_for(assets, bundle.forecast_level, bundle.novelty_level)
        if bundle.agree_level is None:
            return cls(fc, nv, bundle.flat_limit)
        return cls(fc, nv, bundle.flat_limit, bundle.asset_levels.agree_rows(assets, bundle.agree_level),
                   bundle.thresholds.alone_factor)

    def without(self, unread: np.ndarray) -> TermLevels:
        """These levels with the model terms of the ``unread`` cells (k, F) out of reach (infinite):
        a feature that never moved in training is no evidence (:func:`pipeline.bundle.scale_from`)."""
        fc = np.where(unread, np.inf, self.forecast)
        nv = np.where(unread, np.inf, self.novelty)
        return TermLevels(fc, nv, self.flat, self.agree, self.alone)

    def take(self, idx: np.ndarray) -> TermLevels:
        """The rows of the steps ``idx`` (levels shared by all steps are returned as they are)."""
        agree = self.agree if self.agree is None or self.agree.ndim == 1 else self.agree[idx]
        if self.forecast.ndim == 1:
            return TermLevels(self.forecast, self.novelty, self.flat, agree, self.alone)
        return TermLevels(self.forecast[idx], self.novelty[idx], self.flat, agree, self.alone)


@dataclass
class CombinedScore:
    score: np.ndarray          # (k,) the largest term, in units of calibrated threshold
    contributions: np.ndarray  # (k, F) per-feature weights of the dominating term
    forecast: np.ndarray       # (k,) each term, for plots and diagnostics
    novelty: np.ndarray
    flat: np.ndarray
    agree: np.ndarray | None = None  # (k,) the agreement term, where the bundle has one


def combine(forecast_ewma: np.ndarray, novelty_ewma: np.ndarray, flat_run: np.ndarray,
            levels: TermLevels) -> CombinedScore:
    """The alert score and its explanation from the per-feature term states (k, F)."""
    fc = term_ratios(forecast_ewma, levels.forecast)
    nv = term_ratios(novelty_ewma, levels.novelty)
    t_fc, t_nv = _term(fc), _term(nv)
    flat = levels.flat if levels.flat.ndim == 2 else repeated(levels.flat, len(flat_run))
    flat_ratio = flat_run / flat
    t_fl = row_max(flat_ratio)
    ag = t_ag = None
    if levels.agree is not None:
        ag = np.sqrt(fc * nv) / levels.agree
        t_ag = _term(ag)
    # The terms are finite or NaN (see _term): a NaN term never dominates.
    n_terms = 3 if ag is None else 4
    terms = np.empty((len(t_fl), n_terms))  # (filled column by column: np.stack costs more than a small poll's terms)
    terms[:, 0] = np.where(np.isnan(t_fc), -1.0, t_fc / levels.alone)
    terms[:, 1] = np.where(np.isnan(t_nv), -1.0, t_nv / levels.alone)
    terms[:, 2] = t_fl
    if t_ag is not None:
        terms[:, 3] = np.where(np.isnan(t_ag), -1.0, t_ag)
    which = terms.argmax(axis=-1)
    score = row_max(terms)
    score = np.where(np.isnan(t_fc) & np.isnan(t_nv), np.nan, score)
    model_terms = np.where((which == 0)[:, None], fc, nv)
    if ag is not None:
        model_terms = np.where((which == 3)[:, None], ag, model_terms)
    if not np.isfinite(model_terms).all():  # (np.nan_to_num costs a small poll more than the check)
        np.nan_to_num(model_terms, copy=False)
    contrib = np.where((which == 2)[:, None], flat_ratio, model_terms)
    return CombinedScore(score, contrib, t_fc, t_nv, t_fl, t_ag)


def feature_quantile(quantile: float, n_features: int) -> float:
    """The per-feature quantile ``1 - (1 - q) / F``: the largest of the F terms then
    exceeds its level about as rarely as quantile q says."""
    return 1.0 - (1.0 - quantile) / n_features


def level_from_quantile(per_feature_quantile: np.ndarray, margin: float | np.ndarray) -> np.ndarray:
    """A term's calibrated level: its per-feature quantile on normal data, times the margin
    (one for all features, or one each)."""
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


BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)  # consecutive steps averaged to count independent values
MIN_BATCHES = 10     # a batch size is judged only from at least this many complete batches
BATCH_WINDOW = 5.0   # ... and trusted once it spans this many steps per independent value


class BatchMeans:
    """Spread of a residual's single steps and of the means of consecutive batches of its steps,
    each about its asset's own mean, per feature, met piece by piece (each asset's steps in
    order, possibly split over several pieces): how long the residual remembers, so how many
    independent values a history holds. A residual that wanders slowly keeps its batch means as
    spread as its steps; white noise shrinks their variance by the batch size. Batches are counted
    from each asset's first step, so any split of the history gives the same figures. Holds four
    (assets × features) arrays per batch size: about 280 bytes an asset and feature while a fit calibrates."""

    def __init__(self, n_assets: int, n_features: int, sizes: tuple[int, ...] = BATCH_SIZES) -> None:
        shape, per_size = (n_assets, n_features), (len(sizes), n_assets, n_features)
        self.sizes = sizes
        self.step_sq, self.step_sum, self.steps = np.zeros(n_features), np.zeros(shape), np.zeros(shape)
        self.batch_sq = np.zeros((len(sizes), n_features))
        self.batch_sum, self.batches = np.zeros(per_size), np.zeros(per_size)
        self._sum, self._count = np.zeros(per_size), np.zeros(per_size)  # the batch each asset has not finished
        self._batch = np.full((len(sizes), n_assets), -1, np.int64)

    def add(self, asset: np.ndarray, position: np.ndarray, x: np.ndarray) -> None:
        """Steps (n,) of assets, each asset's steps adjacent and in order, at ``position`` in its history."""
        if not len(x):
            return
        ok = np.isfinite(x)
        z, valid = np.where(ok, x, 0.0), ok.astype(np.float64)
        new_asset = asset[1:] != asset[:-1]
        first = np.flatnonzero(np.r_[True, new_asset])
        self.step_sq += (z * z).sum(axis=0)
        np.add.at(self.step_sum, asset[first], np.add.reduceat(z, first))
        np.add.at(self.steps, asset[first], np.add.reduceat(valid, first))
        for i, b in enumerate(self.sizes):
            batch = position // b
            starts = np.flatnonzero(np.r_[True, new_asset | (batch[1:] != batch[:-1])])
            ends = np.r_[starts[1:], len(x)] - 1
            sums, counts = np.add.reduceat(z, starts), np.add.reduceat(valid, starts)
            a, k = asset[starts], batch[starts]
            carried = self._batch[i, a] == k  # the first batch of an asset continues its unfinished one
            sums[carried] += self._sum[i, a[carried]]
            counts[carried] += self._count[i, a[carried]]
            done = position[ends] % b == b - 1
            open_ = ~done  # only an asset's last batch in a piece can be unfinished
            self._batch[i, a[done]] = -1
            self._batch[i, a[open_]] = k[open_]
            self._sum[i, a[open_]], self._count[i, a[open_]] = sums[open_], counts[open_]
            has = counts[done] > 0
            mean = np.divide(sums[done], counts[done], out=np.zeros_like(sums[done]), where=has)
            self.batch_sq[i] += (mean * mean).sum(axis=0)
            np.add.at(self.batch_sum[i], a[done], mean)
            np.add.at(self.batches[i], a[done], has.astype(np.float64))

    def integrated_time(self) -> np.ndarray:
        """Per feature, steps per independent value: ``b × var(batch means) / var(steps)`` for the
        smallest batch size b that spans ``BATCH_WINDOW`` times its own estimate; where none
        does, the largest size with ``MIN_BATCHES`` batches gives a lower bound. At least 1."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(self.steps > 0, self.step_sum / np.maximum(self.steps, 1), 0.0)
            step = (self.step_sq - (self.steps * mu * mu).sum(axis=0)) / self.steps.sum(axis=0)
            spread = self.batch_sq - (2 * mu * self.batch_sum - self.batches * mu * mu).sum(axis=1)
            count = self.batches.sum(axis=1)
            tau = np.array(self.sizes, np.float64)[:, None] * (spread / count) / step
        usable = (count >= MIN_BATCHES) & np.isfinite(tau)
        trusted = usable & (np.array(self.sizes)[:, None] >= BATCH_WINDOW * tau)
        out = np.ones(len(step))
        for f in range(len(step)):
            pick = np.flatnonzero(trusted[:, f])
            pick = pick[:1] if len(pick) else np.flatnonzero(usable[:, f])[-1:]
            if len(pick):
                out[f] = max(float(tau[pick[0], f]), 1.0)
        return out


def scale_uncertainty_factor(independent: np.ndarray, per_feature_quantile: float) -> np.ndarray:
    """How far a level is stretched because the scale it is read against was itself estimated
    from few independent values: the Student-t quantile with ``independent - 1`` degrees of
    freedom over the normal one. A slow feature (a temperature that wanders over hours) holds
    a handful of independent values in a short history, and where it goes next is far less
    certain than its spread there says; a fast one holds hundreds, and the factor is 1."""
    # scipy.stats' t.ppf and norm.ppf are these two functions (the same values): scipy.special imports in
    # 0.1 s where scipy.stats takes 0.6–0.75 s, part of a detector's start-up (pipeline.cold_start.LevelStretch).
    from scipy.special import ndtri, stdtrit

    df = np.maximum(np.asarray(independent, np.float64) - 1.0, 1.0)
    return np.maximum(stdtrit(df, per_feature_quantile) / ndtri(per_feature_quantile), 1.0)


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


def huber_variance_factor(k: float) -> float:
    """E[min(Z², k²)] for a standard normal Z: clipped squared deviations divided by it estimate
    the variance without bias on Gaussian scores."""
    tail = math.erfc(k / math.sqrt(2))  # P(|Z| > k)
    return math.erf(k / math.sqrt(2)) - k * math.sqrt(2 / math.pi) * math.exp(-k * k / 2) + k * k * tail


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
    var_factor = 1.0
    if p.adapt_clip_sd > 0:
        bound = p.adapt_clip_sd * np.sqrt(var)
        delta = np.clip(delta, -bound, bound)
        var_factor = huber_variance_factor(p.adapt_clip_sd)
    cols["adapt_mean"][rows] = np.where(learn, mean + p.adapt_alpha * delta, mean)
    cols["adapt_var"][rows] = np.where(learn, (1 - p.adapt_alpha) * (var + p.adapt_alpha * delta**2 / var_factor), var)
    return combined, threshold
