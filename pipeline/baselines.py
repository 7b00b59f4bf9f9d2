"""Classical detectors the LSTM is compared with, scored by the same metric code.

Every detector is fitted on training rows only and then scores all rows. ``score`` returns
a statistic where larger means more anomalous, so callers can sweep thresholds (e.g. to
compare detectors at an equal false alarm rate); ``predict`` applies the fitted limit.

The PCA-based Hotelling T² / SPE detector follows SKAB's baseline (repository waico/SKAB,
file core/t2.py, used by notebooks/t2_SKAB.ipynb and notebooks/t2_with_q_SKAB.ipynb).
The F, chi-square and normal quantiles of its control limits come from scipy.stats.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, Self

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray
from scipy import stats

# --------------------------------------------------------------------------- distributions


def _check_probability(p: float) -> None:
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")


def normal_quantile(p: float) -> float:
    """z such that P(N(0, 1) <= z) = p."""
    _check_probability(p)
    return float(stats.norm.ppf(p))


def chi2_quantile(p: float, df: float) -> float:
    """x such that P(chi2(df) <= x) = p."""
    _check_probability(p)
    return float(stats.chi2.ppf(p, df))


def f_quantile(p: float, dfn: float, dfd: float) -> float:
    """x such that P(F(dfn, dfd) <= x) = p."""
    _check_probability(p)
    return float(stats.f.ppf(p, dfn, dfd))


# --------------------------------------------------------------------------- control limits


def t2_limit(n_components: int, n_samples: int, confidence: float) -> float:
    """Upper control limit of T² for a new observation, as in SKAB's ``T2._t2_ucl``.

    UCL = m (n - 1) (n + 1) / (n (n - m)) * F(confidence; m, n - m). SKAB reads the F
    quantile off a grid on [0, 15]; the exact quantile is used here.
    """
    m, n = n_components, n_samples
    if n <= m:
        raise ValueError(f"T² limit needs more training rows ({n}) than components ({m})")
    return m * (n - 1) * (n + 1) / (n * (n - m)) * f_quantile(confidence, m, n - m)


def spe_limit(residual_eigenvalues: ArrayLike, confidence: float) -> float:
    """Upper control limit of the SPE / Q statistic (Jackson–Mudholkar).

    theta_i = sum of residual eigenvalues to the power i, h0 = 1 - 2 theta1 theta3 /
    (3 theta2²). SKAB's ``T2._q_ucl`` uses the same formula but computes theta_i as
    (sum of eigenvalues)^i, which collapses the residual to one chi-square term; the
    textbook thetas are used here (see :func:`skab_spe_limit` for SKAB's).

    When h0 <= 0 (one residual eigenvalue dominating many small ones) Jackson–Mudholkar
    breaks down: far too high, or undefined. Pearson's three-moment approximation
    (Q - theta1) / sqrt(2 theta2) ~ (chi2(h) - h) / sqrt(2 h), h = theta2³ / theta3², is
    used instead; it matches the skewness and keeps the tail close to nominal there,
    where Box's two-moment g chi2(h) alarms about twice as often as intended.
    """
    lam = np.asarray(residual_eigenvalues, dtype=np.float64)
    theta1, theta2, theta3 = (float(np.sum(lam**i)) for i in (1, 2, 3))
    if theta1 <= 0.0:
        raise ValueError("SPE limit needs a residual subspace with positive variance")
    h0 = 1.0 - 2.0 * theta1 * theta3 / (3.0 * theta2**2)
    if h0 <= 0.0:
        h = theta2**3 / theta3**2
        return theta1 + math.sqrt(theta2 / h) * (chi2_quantile(confidence, h) - h)
    z = normal_quantile(confidence)
    inner = z * math.sqrt(2.0 * theta2 * h0**2) / theta1 + 1.0 + theta2 * h0 * (h0 - 1.0) / theta1**2
    return theta1 * inner ** (1.0 / h0)


def skab_spe_limit(residual_variance: float, confidence: float) -> float:
    """SPE / Q limit exactly as SKAB's ``T2._q_ucl`` computes it, to reproduce its published numbers.

    SKAB sets theta_i = s^i with s the summed residual variance, so h0 = 1/3 and the
    Jackson–Mudholkar expression reduces to s (1 + z sqrt(2) / 3 - 2 / 9)^3.
    """
    if residual_variance <= 0.0:
        raise ValueError("SPE limit needs a residual subspace with positive variance")
    return residual_variance * (1.0 + normal_quantile(confidence) * math.sqrt(2.0) / 3.0 - 2.0 / 9.0) ** 3


# --------------------------------------------------------------------------- detectors


class Detector(Protocol):
    """What the evaluation harness needs from any detector."""

    def fit(self, x_train: ArrayLike) -> Self: ...

    def score(self, x: ArrayLike) -> NDArray[np.float64]: ...

    def predict(self, x: ArrayLike) -> NDArray[np.int8]: ...


def _matrix(x: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, features) array, got shape {arr.shape}")
    return arr


class FlagEverything:
    """Predicts every row anomalous: the recall-1 reference point of every metric."""

    def fit(self, x_train: ArrayLike) -> Self:
        _matrix(x_train)
        return self

    def score(self, x: ArrayLike) -> NDArray[np.float64]:
        return np.ones(_matrix(x).shape[0])

    def predict(self, x: ArrayLike) -> NDArray[np.int8]:
        return np.ones(_matrix(x).shape[0], dtype=np.int8)


def _rolling_median(values: NDArray[np.float64], window: int) -> NDArray[np.float64]:
    """Trailing median; the first ``window - 1`` rows have no full window and are NaN (pandas' rolling)."""
    if window == 1:
        return values
    out = np.full(values.shape, np.nan)
    if values.size >= window:
        out[window - 1 :] = np.median(sliding_window_view(values, window), axis=1)
    return out


class PCAT2:
    """Hotelling T² on principal components, optionally with the SPE / Q residual statistic.

    Fit: drop columns constant on the training rows (when all are, the detector never
    alarms: there is no variation to model), standardise with the training mean
    and (population) standard deviation, keep the fewest principal components whose
    explained variance ratio exceeds ``variance`` (scikit-learn's rule; ``variance=1.0``
    keeps every component, i.e. plain T²), and set limits at ``confidence`` either from
    theory (``limits="theoretical"``: F-based T² limit, Jackson–Mudholkar Q limit) or as
    empirical quantiles of the training statistics (``limits="empirical"``).

    ``median_window`` smooths each statistic with a trailing median before thresholding;
    rows without a full window never alarm. ``limit_factor`` multiplies both limits.
    ``score`` is the largest statistic-to-limit ratio, so ``predict`` is ``score > 1``.

    ``q_limit="skab"`` replaces the theoretical Q limit by SKAB's (see
    :func:`skab_spe_limit`), with the residual variance summed over the eigenvalues that
    ``np.linalg.eig`` returns after the first ``n_components`` -- in its unsorted order,
    as SKAB's code does. Only use it to reproduce SKAB's published T²+Q results.

    SKAB's leaderboard configurations are ``PCAT2(variance=1.0, confidence=0.999,
    limit_factor=2.0, median_window=5)`` for T² and ``PCAT2(variance=0.85,
    confidence=0.999, use_q=True, median_window=5, q_limit="skab")`` for T²+Q, each
    fitted on a file's first 400 rows.
    """

    def __init__(
        self,
        variance: float = 0.85,
        confidence: float = 0.99,
        use_q: bool = False,
        limits: Literal["theoretical", "empirical"] = "theoretical",
        median_window: int = 1,
        limit_factor: float = 1.0,
        q_limit: Literal["jackson_mudholkar", "skab"] = "jackson_mudholkar",
    ) -> None:
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {variance}")
        _check_probability(confidence)
        if median_window < 1:
            raise ValueError(f"median_window must be >= 1, got {median_window}")
        if limits not in ("theoretical", "empirical"):
            raise ValueError(f"unknown limits {limits!r}")
        if limit_factor <= 0.0:
            raise ValueError(f"limit_factor must be positive, got {limit_factor}")
        if q_limit not in ("jackson_mudholkar", "skab"):
            raise ValueError(f"unknown q_limit {q_limit!r}")
        self.variance = variance
        self.confidence = confidence
        self.use_q = use_q
        self.limits = limits
        self.median_window = median_window
        self.limit_factor = limit_factor
        self.q_limit = q_limit

    def fit(self, x_train: ArrayLike) -> Self:
        """Learn scaling, principal subspace and control limits from training rows only."""
        x = _matrix(x_train)
        sd = x.std(axis=0)
        self.columns_ = np.flatnonzero(sd > 0)
        if self.columns_.size == 0:  # nothing varies: no subspace to model, never alarm
            self.n_components_, self.q_used_ = 0, False
            self.t2_limit_ = self.q_limit_ = math.inf
            return self
        self.mean_ = x.mean(axis=0)[self.columns_]
        self.scale_ = sd[self.columns_]
        z = (x[:, self.columns_] - self.mean_) / self.scale_
        covariance = np.cov(z, rowvar=False, ddof=1).reshape(z.shape[1], z.shape[1])
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.clip(eigenvalues[order], 0.0, None)
        eigenvectors = eigenvectors[:, order]
        cumulative = np.cumsum(eigenvalues) / eigenvalues.sum()
        wanted = int(np.searchsorted(cumulative, self.variance, side="right")) + 1
        usable = int(np.count_nonzero(eigenvalues > eigenvalues[0] * 1e-10))
        k = min(wanted, usable)
        self.n_components_ = k
        self.components_ = eigenvectors[:, :k]
        self.eigenvalues_ = eigenvalues[:k]
        residual = eigenvalues[k:]
        self.q_used_ = self.use_q and bool(residual.sum() > 0)
        t2_train, q_train = self._raw_statistics(z)
        if self.limits == "theoretical":
            self.t2_limit_ = t2_limit(k, z.shape[0], self.confidence)
            self.q_limit_ = self._theoretical_q_limit(covariance, residual) if self.q_used_ else math.inf
        else:
            self.t2_limit_ = self._empirical_limit(t2_train)
            self.q_limit_ = self._empirical_limit(q_train) if self.q_used_ else math.inf
        self.t2_limit_ *= self.limit_factor
        self.q_limit_ *= self.limit_factor
        return self

    def _theoretical_q_limit(self, covariance: NDArray[np.float64], residual: NDArray[np.float64]) -> float:
        if self.q_limit == "skab":
            unsorted = np.linalg.eig(covariance)[0].real
            return skab_spe_limit(float(unsorted[self.n_components_ :].sum()), self.confidence)
        return spe_limit(residual, self.confidence)

    def _empirical_limit(self, statistic: NDArray[np.float64]) -> float:
        return float(np.nanquantile(_rolling_median(statistic, self.median_window), self.confidence))

    def _raw_statistics(self, z: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        scores = z @ self.components_
        t2 = np.sum(scores**2 / self.eigenvalues_, axis=1)
        q = np.sum((z - scores @ self.components_.T) ** 2, axis=1)
        return t2, q

    def statistics(self, x: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Smoothed T² and Q of every row (NaN where the median window is not yet full; 0 without a varying column)."""
        if self.n_components_ == 0:
            zeros = np.zeros(_matrix(x).shape[0])
            return zeros, zeros
        z = (_matrix(x)[:, self.columns_] - self.mean_) / self.scale_
        t2, q = self._raw_statistics(z)
        return _rolling_median(t2, self.median_window), _rolling_median(q, self.median_window)

    def score(self, x: ArrayLike) -> NDArray[np.float64]:
        """max(T² / T² limit, Q / Q limit) per row (Q only when used); rows without a full window score 0."""
        t2, q = self.statistics(x)
        ratio = t2 / self.t2_limit_
        if self.q_used_:
            ratio = np.fmax(ratio, q / self.q_limit_)
        return np.nan_to_num(ratio, nan=0.0)

    def predict(self, x: ArrayLike) -> NDArray[np.int8]:
        """1 where a statistic exceeds its limit."""
        return (self.score(x) > 1.0).astype(np.int8)
