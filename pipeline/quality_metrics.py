"""Evaluation metrics that compare alerts with labels, as the SKAB benchmark scores them.

Three families, each matching a published convention so numbers are comparable with
the SKAB leaderboard and with telemanom / Orion:

* point-wise (outlier detection): row confusion counts pooled over files, F1, FAR, MAR;
* event-level: labelled ranges detected by any overlapping predicted range, with the
  detection delay of every found range;
* NAB (changepoint detection): Numenta's scoring as implemented by SKAB's ``tsad`` code,
  and Numenta's own scorer (:func:`numenta_nab_scores`), which differs from it.

Plus alert coverage: the share of normal rows under alert and the longest alert.

All functions are pure and work on numpy arrays of 0/1 flags (or index ranges).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Range = tuple[int, int]
EventInput = ArrayLike | Sequence[Range]
WindowPosition = Literal["center", "left", "right"]


def _safe_ratio(numerator: float, denominator: float) -> float:
    """Ratio that is 0.0 when the denominator is 0, so empty cases never raise."""
    return float(numerator) / float(denominator) if denominator else 0.0


def _flags(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    """1-D boolean view of a 0/1 array; anything other than 0/1 is a caller error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr == 1


def _paired_flags(labels: ArrayLike, predicted: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    true = _flags(labels, "labels")
    pred = _flags(predicted, "predicted")
    if true.shape != pred.shape:
        raise ValueError(f"labels and predicted differ in length: {true.size} != {pred.size}")
    return true, pred


# --------------------------------------------------------------------------- point-wise


@dataclass(frozen=True)
class PointMetrics:
    """Row-level confusion counts and the rates derived from them.

    ``far`` (false alarm rate, FP/(FP+TN)) and ``mar`` (missed alarm rate, FN/(FN+TP))
    are fractions in [0, 1]; SKAB reports them in percent, so multiply by 100 to compare.
    Every ratio whose denominator is zero is 0.0 (e.g. precision with no predicted row).
    """

    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    far: float
    mar: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, tn: int) -> PointMetrics:
        """Derive the rates; F1 = TP / (TP + (FP + FN) / 2) as in SKAB's ``chp_score``."""
        return cls(
            tp=tp,
            fp=fp,
            fn=fn,
            tn=tn,
            precision=_safe_ratio(tp, tp + fp),
            recall=_safe_ratio(tp, tp + fn),
            f1=_safe_ratio(tp, tp + (fp + fn) / 2),
            far=_safe_ratio(fp, fp + tn),
            mar=_safe_ratio(fn, fn + tp),
        )


def _point_counts(labels: ArrayLike, predicted: ArrayLike) -> tuple[int, int, int, int]:
    true, pred = _paired_flags(labels, predicted)
    tp = int(np.count_nonzero(true & pred))
    fp = int(np.count_nonzero(~true & pred))
    fn = int(np.count_nonzero(true & ~pred))
    tn = int(true.size - tp - fp - fn)
    return tp, fp, fn, tn


def point_metrics(labels: ArrayLike, predicted: ArrayLike) -> PointMetrics:
    """Point-wise metrics of one series, without point adjustment."""
    return PointMetrics.from_counts(*_point_counts(labels, predicted))


def pooled_point_metrics(pairs: Sequence[tuple[ArrayLike, ArrayLike]]) -> PointMetrics:
    """Point-wise metrics over several files as if their rows were concatenated.

    Summing per-file counts is exactly concatenation and avoids copying the rows.
    """
    totals = np.zeros(4, dtype=np.int64)
    for labels, predicted in pairs:
        totals += np.asarray(_point_counts(labels, predicted), dtype=np.int64)
    tp, fp, fn, tn = (int(v) for v in totals)
    return PointMetrics.from_counts(tp, fp, fn, tn)


# --------------------------------------------------------------------------- event-level


def ranges_from_labels(labels: ArrayLike) -> list[Range]:
    """Maximal runs of 1 as ``(start, end)`` index ranges, ``end`` exclusive."""
    flags = _flags(labels, "labels").astype(np.int8)
    edges = np.diff(np.concatenate(([0], flags, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _as_ranges(values: EventInput, name: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sorted starts and ends from 0/1 flags (1-D) or a list of ``(start, end)`` pairs (2-D)."""
    arr = np.asarray(values)
    if arr.ndim == 1:
        pairs = np.asarray(ranges_from_labels(arr), dtype=np.int64).reshape(-1, 2)
    elif arr.ndim == 2 and arr.shape[1] == 2:
        pairs = arr.astype(np.int64)
    else:
        raise ValueError(f"{name} must be 0/1 flags or (start, end) ranges, got shape {arr.shape}")
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    starts, ends = pairs[:, 0], pairs[:, 1]
    if np.any(ends <= starts):
        raise ValueError(f"{name} has an empty or reversed range (end is exclusive)")
    if np.any(starts[1:] < ends[:-1]):
        raise ValueError(f"{name} has overlapping ranges")
    return starts, ends


def _overlap_bounds(
    starts: NDArray[np.int64], ends: NDArray[np.int64], other_starts: NDArray[np.int64], other_ends: NDArray[np.int64]
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """For each range, the slice ``[first, stop)`` of sorted disjoint ``other`` ranges it overlaps."""
    first = np.searchsorted(other_ends, starts, side="right")
    stop = np.searchsorted(other_starts, ends, side="left")
    return first, stop


@dataclass(frozen=True)
class EventMetrics:
    """Event-level counts (telemanom / Orion overlap convention) and detection delays.

    ``delays`` holds, for every detected labelled range in order, the steps from its start
    to the first predicted step inside it (0 when the prediction began at or before it).
    Ratios with a zero denominator are 0.0.
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    delays: tuple[int, ...]

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, delays: tuple[int, ...]) -> EventMetrics:
        precision = _safe_ratio(tp, tp + fp)
        recall = _safe_ratio(tp, tp + fn)
        return cls(
            tp=tp,
            fp=fp,
            fn=fn,
            precision=precision,
            recall=recall,
            f1=_safe_ratio(2 * precision * recall, precision + recall),
            delays=delays,
        )


def blanket_runs(labels: ArrayLike, predicted: ArrayLike, share: float = 0.5) -> list[Range]:
    """Predicted runs that cover more than ``share`` of the file's normal rows.

    Such an alert says "something is wrong with this whole recording": it overlaps every
    labelled range by construction, so counting it as finding them would reward an alert
    that never ends. A file without normal rows has none.
    """
    true, pred = _paired_flags(labels, predicted)
    normal = int(np.count_nonzero(~true))
    if normal == 0:
        return []
    normal_before = np.concatenate(([0], np.cumsum(~true)))
    return [(s, e) for s, e in ranges_from_labels(pred.astype(np.int8))
            if normal_before[e] - normal_before[s] > share * normal]


def _event_counts(labels: EventInput, predicted: EventInput,
                  blanket_share: float | None = None) -> tuple[int, int, int, tuple[int, ...]]:
    blanket: list[Range] = []
    if blanket_share is not None and np.asarray(labels).ndim == 1 and np.asarray(predicted).ndim == 1:
        blanket = blanket_runs(labels, predicted, blanket_share)
        if blanket:
            kept = np.asarray(predicted).astype(np.int8).copy()
            for s, e in blanket:
                kept[s:e] = 0
            predicted = kept
    label_starts, label_ends = _as_ranges(labels, "labels")
    pred_starts, pred_ends = _as_ranges(predicted, "predicted")
    first, stop = _overlap_bounds(label_starts, label_ends, pred_starts, pred_ends)
    detected = first < stop
    first_step = np.maximum(pred_starts[first[detected]], label_starts[detected])
    delays = tuple(int(d) for d in first_step - label_starts[detected])
    p_first, p_stop = _overlap_bounds(pred_starts, pred_ends, label_starts, label_ends)
    tp = int(np.count_nonzero(detected))
    fp = int(np.count_nonzero(p_first >= p_stop)) + len(blanket)
    return tp, fp, int(label_starts.size - tp), delays


def event_metrics(labels: EventInput, predicted: EventInput, *, blanket_share: float | None = None) -> EventMetrics:
    """Event-level metrics of one series; inputs are 0/1 flags or ``(start, end)`` ranges.

    A labelled range is a TP if any predicted range overlaps it, else a FN; a predicted
    range overlapping no labelled range is a FP. With ``blanket_share`` (0/1 flags only),
    a predicted run covering more than that share of the normal rows finds nothing and
    is one FP (see :func:`blanket_runs`).
    """
    return EventMetrics.from_counts(*_event_counts(labels, predicted, blanket_share))


def pooled_event_metrics(pairs: Sequence[tuple[EventInput, EventInput]], *,
                         blanket_share: float | None = None) -> EventMetrics:
    """Event-level metrics over several files.

    Counts are summed per file rather than over concatenated rows, so that a run ending
    one file and a run starting the next are never merged into one event.
    """
    tp = fp = fn = 0
    delays: list[int] = []
    for labels, predicted in pairs:
        tp_, fp_, fn_, delays_ = _event_counts(labels, predicted, blanket_share)
        tp, fp, fn = tp + tp_, fp + fp_, fn + fn_
        delays.extend(delays_)
    return EventMetrics.from_counts(tp, fp, fn, tuple(delays))


def changepoints_from_alerts(predicted: ArrayLike, *, include_run_ends: bool = False) -> NDArray[np.int8]:
    """Changepoint flags of an alert series: 1 at the first step of every predicted run.

    ``include_run_ends=True`` also flags the first step after each run, which is what
    SKAB's notebooks do (``abs(prediction.diff())`` with the first row kept); use it only
    to reproduce their published NAB numbers.
    """
    flags = _flags(predicted, "predicted").astype(np.int8)
    edges = np.diff(flags, prepend=np.int8(0))
    marks = edges == 1
    if include_run_ends:
        marks |= edges == -1
    return marks.astype(np.int8)


# --------------------------------------------------------------------------- NAB
#
# Reproduces SKAB's NAB scoring: repository waico/SKAB, file core/metrics.py
# (``chp_score(..., metric="nab")`` -> ``single_detecting_boundaries``,
# ``extract_cp_confusion_matrix``, ``my_scale``, ``single_evaluate_nab``; the module is
# part of the ``tsad`` package). The leaderboard notebooks (notebooks/t2_SKAB.ipynb,
# notebooks/t2_with_q_SKAB.ipynb) call it with window_width="30S" and
# anomaly_window_destination="center"; those are the defaults here. Conventions kept:
#   * one scoring window per true changepoint, of a fixed width, or, without a width,
#     ``portion * (t_last - t_first) / (n_changepoints + 1)``;
#   * overlapping windows: the later window starts where the earlier one ends
#     ("cut right window"); window bounds are inclusive;
#   * only the first predicted changepoint in a window is scored, later ones in the same
#     window are ignored; every prediction outside all windows is a FP (A_fp each), every
#     window without a prediction is a FN (A_fn);
#   * the first detection scores SKAB's "improved" scaled tanh evaluated on a 1000-point
#     grid across the window: A_tp at the window's left edge, falling to A_fp at its right
#     edge (not Numenta's original sigmoid);
#   * raw scores, null scores (n_windows * A_fn) and perfect scores (n_windows * A_tp) are
#     summed over files, then 100 * (S - null) / (perfect - null). SKAB rounds this to two
#     decimals for display; the value here is unrounded.
# The older evaluating.py in the same repository (right-side windows of width
# (t_last - t_first) / n_changepoints and a logistic scale) is superseded and not used.


@dataclass(frozen=True)
class NabProfile:
    """Weights of one NAB application profile."""

    a_tp: float
    a_fp: float
    a_fn: float


NAB_PROFILES: Mapping[str, NabProfile] = {
    "standard": NabProfile(a_tp=1.0, a_fp=-0.11, a_fn=-1.0),
    "low_fp": NabProfile(a_tp=1.0, a_fp=-0.22, a_fn=-1.0),
    "low_fn": NabProfile(a_tp=1.0, a_fp=-0.11, a_fn=-2.0),
}

_NAB_GRID = 1000
# Unit curve of SKAB's scaled tanh: 1 at the window's left edge, 0 at its right edge.
_NAB_UNIT_CURVE = (1.0 - np.tanh(np.linspace(-np.pi / 2, np.pi / 2, _NAB_GRID)) / np.tanh(np.pi / 2)) / 2


@dataclass(frozen=True)
class _NabTally:
    """Profile-independent outcome of one file: FP/FN counts and unit scores of the TPs."""

    n_windows: int
    n_fp: int
    n_fn: int
    tp_unit_scores: NDArray[np.float64]

    def raw(self, profile: NabProfile) -> float:
        tp = float(np.sum(profile.a_fp + (profile.a_tp - profile.a_fp) * self.tp_unit_scores))
        return tp + profile.a_fp * self.n_fp + profile.a_fn * self.n_fn


def _relative_times(timestamps: ArrayLike | None, n: int, window: float | None) -> tuple[NDArray[np.float64], float | None]:
    """Times relative to the first row, and the window in the same unit.

    datetime64 timestamps become integer nanoseconds (exact in float64 after taking the
    offset) and the window, given in seconds, is converted to match.
    """
    if timestamps is None:
        return np.arange(n, dtype=np.float64), window
    ts = np.asarray(timestamps)
    if ts.shape != (n,):
        raise ValueError(f"timestamps must have shape ({n},), got {ts.shape}")
    if np.issubdtype(ts.dtype, np.datetime64):
        offsets = (ts - ts[0]).astype("timedelta64[ns]").astype(np.int64).astype(np.float64)
        return offsets, None if window is None else window * 1e9
    values = ts.astype(np.float64)
    return values - values[0], window


def _check_sorted(times: NDArray[np.float64]) -> None:
    if np.any(np.diff(times) < 0):
        raise ValueError("timestamps must be non-decreasing")


def _nab_windows(
    cp_times: NDArray[np.float64], width: float, position: WindowPosition
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    offsets = {"center": (-width / 2, width / 2), "left": (-width, 0.0), "right": (0.0, width)}[position]
    starts, ends = cp_times + offsets[0], cp_times + offsets[1]
    starts[1:] = np.where(ends[:-1] >= starts[1:], ends[:-1], starts[1:])
    return starts, ends


def _nab_tally(
    true_cp: ArrayLike,
    predicted_cp: ArrayLike,
    timestamps: ArrayLike | None,
    window: float | None,
    portion: float,
    position: WindowPosition,
) -> _NabTally:
    true, pred = _paired_flags(true_cp, predicted_cp)
    if true.size == 0:
        return _NabTally(0, 0, 0, np.empty(0))
    times, width = _relative_times(timestamps, true.size, window)
    _check_sorted(times)
    cp_times = times[true]
    pred_times = np.sort(times[pred])
    if cp_times.size == 0:
        return _NabTally(0, int(pred_times.size), 0, np.empty(0))
    if width is None:
        width = (times[-1] - times[0]) / (cp_times.size + 1) * portion
    if width <= 0:
        raise ValueError("NAB scoring window must have a positive width")
    starts, ends = _nab_windows(cp_times, width, position)
    first = np.searchsorted(pred_times, starts, side="left")
    padded = np.append(pred_times, np.inf)
    hit = padded[first] <= ends
    ratios = (padded[first[hit]] - starts[hit]) / (ends[hit] - starts[hit])
    events = np.minimum((ratios * _NAB_GRID).astype(np.int64), _NAB_GRID - 1)
    owner = np.searchsorted(starts, pred_times, side="right") - 1
    covered = (owner >= 0) & (pred_times <= ends[np.maximum(owner, 0)])
    return _NabTally(
        n_windows=int(cp_times.size),
        n_fp=int(np.count_nonzero(~covered)),
        n_fn=int(np.count_nonzero(~hit)),
        tp_unit_scores=_NAB_UNIT_CURVE[events],
    )


def nab_scores(
    files: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    timestamps: Sequence[ArrayLike] | None = None,
    window: float | None = 30.0,
    portion: float = 0.1,
    position: WindowPosition = "center",
    profiles: Mapping[str, NabProfile] = NAB_PROFILES,
) -> dict[str, float]:
    """NAB scores (0 = null detector, 100 = perfect) of changepoint predictions over files.

    ``files`` holds one ``(true changepoint flags, predicted changepoint flags)`` pair per
    file; see :func:`changepoints_from_alerts` to turn alerts into predicted changepoints.
    ``timestamps`` optionally gives each file's row times (datetime64, or numbers); without
    them a row's index is its time. ``window`` is the scoring window width in seconds for
    datetime64 timestamps and in timestamp units (steps) otherwise -- SKAB is 1 Hz, so the
    default 30 matches its leaderboard's "30S"; ``None`` uses ``portion`` as SKAB does.
    ``position`` places the window around each changepoint ("left" and "right" are SKAB's
    "lefter" and "righter"). Raises ValueError when no file has a true changepoint, since
    the null and perfect detectors then coincide.
    """
    if timestamps is not None and len(timestamps) != len(files):
        raise ValueError("timestamps must hold one array per file")
    tallies = [
        _nab_tally(true_cp, pred_cp, None if timestamps is None else timestamps[i], window, portion, position)
        for i, (true_cp, pred_cp) in enumerate(files)
    ]
    n_windows = sum(t.n_windows for t in tallies)
    if n_windows == 0:
        raise ValueError("NAB is undefined without any true changepoint")
    scores: dict[str, float] = {}
    for name, profile in profiles.items():
        raw = math.fsum(t.raw(profile) for t in tallies)
        null, perfect = n_windows * profile.a_fn, n_windows * profile.a_tp
        scores[name] = 100.0 * (raw - null) / (perfect - null)
    return scores


# --------------------------------------------------------------------------- Numenta's NAB
#
# Numenta's scorer, repository numenta/NAB, nab/sweeper.py (``Sweeper.calcSweepScore``,
# ``calcScoreByThreshold``, ``scaledSigmoid``) as used by NAB v1.1, and the normalisation
# of nab/runner.py. It differs from SKAB's variant above:
#   * windows are the labelled ranges themselves (NAB's windows JSON), row indices inclusive;
#   * scaledSigmoid(x) = 2 / (1 + exp(5 x)) - 1, and -1 for x >= 3;
#   * a detection at row i inside a window [left, right] of width w = right - left + 1 is at
#     relative position -(right - i + 1) / w and scores A_TP * scaledSigmoid(pos) / scaledSigmoid(-1),
#     so a detection at the window's first row scores exactly A_TP; only the best (first)
#     detection of a window counts; a window without one scores -A_FN;
#   * a detection outside every window scores A_FP * scaledSigmoid(|i - prev_right| / (prev_w - 1))
#     relative to the closest preceding window (so FPs just after a window cost little), and
#     -A_FP when no window precedes it (or that window is one row wide, where NAB divides by 0);
#   * rows of the probationary period, the first min(floor(0.15 n), 750) rows, are not scored,
#     and a window entirely inside it does not count;
#   * raw, null (every window missed: -A_FN each) and perfect (every window detected at its
#     first row: A_TP each) scores are summed over files; score = 100 (S - null) / (perfect - null).
# Every flagged row is a detection, as NAB thresholds per-row anomaly scores.

NUMENTA_PROFILES: Mapping[str, NabProfile] = {
    "standard": NabProfile(a_tp=1.0, a_fp=0.11, a_fn=1.0),
    "reward_low_fp_rate": NabProfile(a_tp=1.0, a_fp=0.22, a_fn=1.0),
    "reward_low_fn_rate": NabProfile(a_tp=1.0, a_fp=0.11, a_fn=2.0),
}
NUMENTA_PROBATION = 0.15


def _scaled_sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(np.minimum(5.0 * x, 700.0))) - 1.0)


@dataclass(frozen=True)
class _NumentaTally:
    n_windows: int
    tp_unit: NDArray[np.float64]    # scaledSigmoid / maxTP of each detected window's best detection
    n_missed: int
    fp_unit: NDArray[np.float64]    # scaledSigmoid (negative) of each detection outside the windows

    def raw(self, p: NabProfile) -> float:
        return float(p.a_tp * self.tp_unit.sum() + p.a_fp * self.fp_unit.sum() - p.a_fn * self.n_missed)


def numenta_probation_rows(n: int, share: float = NUMENTA_PROBATION) -> int:
    return int(min(math.floor(share * n), share * 5000))


def _numenta_tally(windows: Sequence[Range], detections: ArrayLike, probation: float) -> _NumentaTally:
    det = _flags(detections, "detections")
    n = det.size
    skip = numenta_probation_rows(n, probation)
    wins = sorted((int(s), int(e)) for s, e in windows if int(e) >= skip and int(s) < n)
    wins = [(s, min(e, n - 1)) for s, e in wins]
    if any(e < s for s, e in wins) or any(b[0] <= a[1] for a, b in zip(wins, wins[1:])):
        raise ValueError("NAB windows must be non-empty, disjoint (start, end) row ranges, end inclusive")
    max_tp = 2.0 / (1.0 + math.exp(-5.0)) - 1.0
    rows = np.flatnonzero(det)
    rows = rows[rows >= skip]
    lefts = np.array([s for s, _ in wins], np.int64)
    rights = np.array([e for _, e in wins], np.int64)
    owner = np.searchsorted(lefts, rows, side="right") - 1
    inside = (owner >= 0) & (rows <= rights[np.maximum(owner, 0)] if len(wins) else np.zeros(rows.size, bool))
    tp_unit, missed = [], 0
    for k, (s, e) in enumerate(wins):
        hits = rows[inside & (owner == k)]
        if hits.size:
            width = e - s + 1
            tp_unit.append(float(_scaled_sigmoid(np.array([-(e - hits[0] + 1) / width]))[0]) / max_tp)
        else:
            missed += 1
    out_rows, prev = rows[~inside], owner[~inside]
    fp_unit = np.full(out_rows.size, -1.0)
    has_prev = prev >= 0
    if has_prev.any():
        prev_right, prev_width = rights[prev[has_prev]], rights[prev[has_prev]] - lefts[prev[has_prev]] + 1
        pos = np.where(prev_width > 1, np.abs(out_rows[has_prev] - prev_right) / np.maximum(prev_width - 1, 1), 3.0)
        fp_unit[has_prev] = _scaled_sigmoid(pos.astype(np.float64))
    return _NumentaTally(len(wins), np.asarray(tp_unit, np.float64), missed, fp_unit)


def numenta_nab_scores(files: Sequence[tuple[Sequence[Range], ArrayLike]], *, probation: float = NUMENTA_PROBATION,
                       profiles: Mapping[str, NabProfile] = NUMENTA_PROFILES) -> dict[str, float] | None:
    """Numenta's NAB score (0 = no detection at all, 100 = every window at its first row) over files.

    ``files`` holds one ``(windows, detection flags)`` pair per file; windows are
    ``(first row, last row)`` pairs, both inclusive. ``None`` when no window is scored.
    """
    tallies = [_numenta_tally(w, d, probation) for w, d in files]
    n_windows = sum(t.n_windows for t in tallies)
    if n_windows == 0:
        return None
    out: dict[str, float] = {}
    for name, p in profiles.items():
        raw = math.fsum(t.raw(p) for t in tallies)
        null, perfect = -n_windows * p.a_fn, n_windows * p.a_tp
        out[name] = 100.0 * (raw - null) / (perfect - null)
    out["windows"] = float(n_windows)
    return out


# --------------------------------------------------------------------------- alert coverage


@dataclass(frozen=True)
class Coverage:
    """How much of a recording a detector keeps under alert.

    ``normal_share`` is the share of normal rows under alert (a file's FAR, named for
    what it says about alerts that do not end); the longest alert in rows, in seconds
    (first to last row) and as a share of the file's rows.
    """

    normal_share: float
    longest_rows: int
    longest_s: float
    longest_share: float
    alerts: int


def alert_coverage(labels: ArrayLike, predicted: ArrayLike, ts_ms: ArrayLike) -> Coverage:
    true, pred = _paired_flags(labels, predicted)
    ts = np.asarray(ts_ms, np.int64)
    runs = ranges_from_labels(pred.astype(np.int8))
    longest = max(runs, key=lambda r: r[1] - r[0], default=(0, 0))
    rows = longest[1] - longest[0]
    return Coverage(
        normal_share=_safe_ratio(np.count_nonzero(pred & ~true), np.count_nonzero(~true)),
        longest_rows=rows,
        longest_s=float(ts[longest[1] - 1] - ts[longest[0]]) / 1000 if rows else 0.0,
        longest_share=_safe_ratio(rows, true.size),
        alerts=len(runs),
    )


def runs_as_spans(predicted: ArrayLike, ts_ms: ArrayLike) -> list[tuple[int, int]]:
    """``(first row ms, last row ms)`` of each predicted run, both inclusive."""
    ts = np.asarray(ts_ms, np.int64)
    return [(int(ts[s]), int(ts[e - 1])) for s, e in ranges_from_labels(_flags(predicted, "predicted").astype(np.int8))]
