"""Evaluation on labelled recordings: the LSTM engine and the baselines, scored by the same code.

Every detector turns a file into one 0/1 prediction per row and is scored by
:mod:`pipeline.quality_metrics`, so the comparison is fair by construction:

* The LSTM is replayed through :class:`~pipeline.engine.DetectionEngine`, the code path of
  the live detector. A row is predicted anomalous when its grid step lies inside an alert,
  from the alert's ``start_ms`` up to (not including) its ``end_ms``, or to the end of the
  file when the alert never closed.
* The baselines (flag everything, PCA T² and T²+Q in SKAB's leaderboard configurations)
  are fitted on the same training rows and score the same rows.

Training data comes from one of four plans: each file's first N rows (one model per
file, SKAB's leaderboard protocol); the union of every file's first N rows (one *fleet*
model, each file its own asset with its own scaling); a separate file of normal data
(one model for every file); or each file's own training file (``paired``: one model per
file, as SMD and telemetry benchmarks ship a train and a test file per series).

Metrics are reported on two bases: the whole file (training rows included, as SKAB's
notebooks score) and the test rows only. Point-wise counts are pooled over files without
point adjustment; event-level counts are summed per file; NAB follows SKAB's ``tsad``
convention (30 s centred windows, and a predicted changepoint at both edges of every
alert run, as SKAB's notebooks derive them), reported beside the stricter variant that
only counts run starts, and Numenta's own scorer (``nab_numenta``) on the labelled ranges.
An alert covering more than half of a file's normal rows finds no event (it is one false
positive); per file, the share of normal rows under alert and the longest alert are
reported. Rates are fractions in [0, 1]. No I/O happens here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.alerts import AlertEvent
from pipeline.baselines import PCAT2, Detector, FlagEverything
from pipeline.bundle import ModelBundle
from pipeline.quality_metrics import (
    alert_coverage,
    changepoints_from_alerts,
    event_metrics,
    nab_scores,
    numenta_nab_scores,
    point_metrics,
    pooled_event_metrics,
    pooled_point_metrics,
    ranges_from_labels,
    runs_as_spans,
)
from pipeline.readings import DecodedBatch
from pipeline.settings import GridSettings, Settings
from pipeline.spacing import median_period_s
from pipeline.tables import frame_to_batch, parse_timestamps

Plan = Literal["per_file", "fleet", "train_file", "paired"]
Progress = Callable[[dict[str, Any]], None]

NAB_WINDOW_S = 30.0  # SKAB's NAB window: 30 s at its one row a second
NAB_WINDOW_PERIODS = 30


def nab_window_for(chosen: float | None, period_s: float) -> float:
    """The NAB window: the one chosen, else 30 grid periods (SKAB's 30 s at 1 s; a window
    of 30 s around a changepoint in data at one row in 5 minutes would hold that row alone)."""
    return chosen if chosen is not None else NAB_WINDOW_PERIODS * period_s
BLANKET_SHARE = 0.5  # an alert over more than this share of a file's normal rows finds no event
_TS = "\x00ts"  # timestamp column name that cannot clash with a feature


class EvaluationError(ValueError):
    """Labelled data that cannot be evaluated (no test rows, unsorted times, …)."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Series:
    """Readings of one asset as arrays: row times (ms, non-decreasing) and feature values."""

    name: str
    ts_ms: np.ndarray     # int64 (n,)
    values: np.ndarray    # float64 (n, F), NaN = missing reading
    notes: tuple[str, ...] = ()  # what was repaired on reading (timestamps out of order, …)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def head(self, rows: int) -> Series:
        return Series(self.name, self.ts_ms[:rows], self.values[:rows])


@dataclass(frozen=True)
class LabelledFile:
    """One labelled recording; its first ``train_rows`` rows are its training data (0: none)."""

    series: Series
    labels: np.ndarray                 # int8 (n,)
    changepoints: np.ndarray | None    # int8 (n,) when the data marks changepoints
    train_rows: int
    train: Series | None = None        # the file's own training series (paired plan)

    @property
    def name(self) -> str:
        return self.series.name

    @property
    def test(self) -> np.ndarray:
        mask = np.ones(len(self.series), bool)
        mask[: self.train_rows] = False
        return mask


def asset_name(path: PurePath, root: PurePath) -> str:
    """Asset id of a file: its POSIX path relative to the input root (``valve1/0.csv``)."""
    return path.relative_to(root).as_posix()


def median_spacing_ms(ts_ms: np.ndarray) -> float | None:
    """Median of the positive differences between consecutive stamps (None with fewer than two distinct)."""
    d = np.diff(np.asarray(ts_ms, np.int64))
    d = d[d > 0]
    return float(np.median(d)) if d.size else None


def data_period_s(series: Sequence[Series]) -> float | None:
    """The data's own grid period: the median positive spacing of every series' stamps, in seconds
    (:func:`pipeline.spacing.median_period_s`, as ``fit`` and ``train`` read it)."""
    return median_period_s(s.ts_ms for s in series)


def in_row_order(ts_ms: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Stamps that never go back, keeping the rows' order, and what was done.

    A stamp earlier than its predecessor (an hour repeated at a clock change, a logger
    restarted with an old clock) shifts it and every later stamp forward, to one median
    spacing after the predecessor: rows stay in recorded order and spacing is kept, as a
    local-time recording re-stamped in UTC would be. Repeated stamps are kept: readings of
    one grid step are averaged by the grid.
    """
    ts = np.asarray(ts_ms, np.int64)
    d = np.diff(ts)
    notes: list[str] = []
    back = np.flatnonzero(d < 0)
    if back.size:
        step = int(round(median_spacing_ms(ts) or 1))
        shift = np.zeros(ts.size, np.int64)
        shift[back + 1] = -d[back] + step
        ts = ts + np.cumsum(shift)
        notes.append(f"timestamps go back {back.size} time(s) (first at row {int(back[0]) + 1}, by up to "
                     f"{-int(d[back].min()) / 1000:g} s, e.g. an hour repeated at a clock change): the later rows "
                     "are shifted forward to keep the recorded order")
    repeated = int(np.count_nonzero(d == 0))
    if repeated:
        notes.append(f"{repeated} row(s) repeat the previous row's timestamp: readings of one grid step are averaged")
    return ts, notes


# ``--time-col @row``: a file without a time column (telemetry exported as arrays) is read one row a
# second from this instant (2020-01-01T00:00:00Z), so labels and spans are row numbers in effect.
ROW_CLOCK, ROW_CLOCK_START_MS = "@row", 1_577_836_800_000


def frame_timestamps(frame: pd.DataFrame, ts_col: str, time_unit: str = "auto") -> np.ndarray:
    """The rows' epoch milliseconds: the time column's, or one second a row for :data:`ROW_CLOCK`."""
    return _frame_timestamps(frame, ts_col, time_unit)[0]


def _frame_timestamps(frame: pd.DataFrame, ts_col: str, time_unit: str) -> tuple[np.ndarray, str | None]:
    if ts_col == ROW_CLOCK:
        return ROW_CLOCK_START_MS + 1000 * np.arange(len(frame), dtype=np.int64), None
    return parse_timestamps(frame[ts_col], time_unit)


def series_from_frame(frame: pd.DataFrame, name: str, features: Sequence[str], ts_col: str,
                      time_unit: str = "auto") -> Series:
    """Arrays of a wide frame in recorded row order; stamps out of order are repaired with a note."""
    missing = [c for c in [*([] if ts_col == ROW_CLOCK else [ts_col]), *features] if c not in frame.columns]
    if missing:
        hint = f" (a file without a time column: --time-col {ROW_CLOCK})" if ts_col in missing else ""
        raise EvaluationError(f"{name}: missing columns {missing}{hint}")
    stamps, how = _frame_timestamps(frame, ts_col, time_unit)
    ts, notes = in_row_order(stamps)
    return Series(name, ts, numeric_columns(frame, list(features), name), tuple([how] if how else []) + tuple(notes))


def numeric_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> np.ndarray:
    """The columns as float64 (empty cells NaN); a cell that is not a number is an
    :class:`EvaluationError` naming the file, the column, the row and the cell."""
    try:
        return frame[list(columns)].to_numpy(np.float64)
    except (ValueError, TypeError):
        pass
    for c in columns:
        parsed = pd.to_numeric(frame[c], errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy() & frame[c].notna().to_numpy())
        if len(bad):
            cell = frame[c].iloc[bad[0]]
            raise EvaluationError(f"{name}: column {c!r}, row {bad[0]}: {str(cell)[:40]!r} is not a number "
                                  f"({len(bad)} such cell(s); decimal commas or words must be converted first)")
    return frame[list(columns)].apply(pd.to_numeric).to_numpy(np.float64)


def labels_from_ranges(ts_ms: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """0/1 row labels from ``(start_ms, end_ms)`` ranges, both ends inclusive (stamps in any order)."""
    ts = np.asarray(ts_ms, np.int64)
    flags = np.zeros(ts.size, bool)
    for start, end in ranges:
        flags |= (ts >= start) & (ts <= end)
    return flags.astype(np.int8)


def labelled_file(series: Series, labels: np.ndarray, changepoints: np.ndarray | None,
                  train_rows: int, train: Series | None = None) -> LabelledFile:
    """Check lengths and the split, then bundle a file for evaluation."""
    n = len(series)
    for what, arr in (("labels", labels), ("changepoints", changepoints)):
        if arr is not None and len(arr) != n:
            raise EvaluationError(f"{series.name}: {what} have {len(arr)} rows, readings {n}")
    if not 0 <= train_rows < n:
        raise EvaluationError(f"{series.name}: {n} rows leave no test rows after {train_rows} training rows "
                              "(lower --train-rows or give training files)")
    if train is not None and train_rows:
        raise EvaluationError(f"{series.name}: a file with its own training file has no training rows")
    cp = None if changepoints is None else _flags01(changepoints, f"{series.name}: changepoints")
    return LabelledFile(series, _flags01(labels, f"{series.name}: labels"), cp, train_rows, train)


def _flags01(values: np.ndarray, what: str = "labels") -> np.ndarray:
    arr = np.nan_to_num(np.asarray(values, np.float64), nan=0.0)
    ok = np.isin(arr, (0.0, 1.0))
    if not ok.all():
        raise EvaluationError(f"{what} must be 0 or 1 (row {int(np.argmin(ok))} holds {arr[~ok][0]:g})")
    return arr.astype(np.int8)


def _cover(n: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Flags of the union of index ranges ``[start, stop)`` (vectorised through a difference array)."""
    diff = np.zeros(n + 1, np.int64)
    np.add.at(diff, np.clip(starts, 0, n), 1)
    np.add.at(diff, np.clip(stops, 0, n), -1)
    return (np.cumsum(diff[:n]) > 0).astype(np.int8)


# --------------------------------------------------------------------------- alerts → rows


def alert_spans(events: Sequence[AlertEvent], asset: str) -> list[tuple[int, float]]:
    """``(start_ms, end_ms)`` of each alert of one asset, end exclusive; never closed → ``inf``."""
    spans: dict[str, tuple[int, float]] = {}
    for e in events:
        if e.asset != asset:
            continue
        if e.state == "open":
            spans[e.alert_id] = (e.start_ms, math.inf)
        elif e.state == "close" and e.end_ms is not None:
            spans[e.alert_id] = (e.start_ms, float(e.end_ms))
    return sorted(spans.values())


def alert_top_features(events: Sequence[AlertEvent], asset: str) -> dict[int, tuple[str, ...]]:
    """Per alert start (ms) of one asset, the features its latest event names, most contributing first."""
    out: dict[int, tuple[str, ...]] = {}
    for e in events:
        if e.asset == asset:
            out[e.start_ms] = tuple(f for f, _ in e.top_features)
    return out


def scored_share(f: LabelledFile, trace: EngineTrace, period_ms: int) -> float:
    """Share of the file's test rows whose grid step the engine scored (a finite alert score): the
    rest cannot alert, so a low share makes its metrics say little."""
    test = f.series.ts_ms[f.train_rows:]
    if len(test) == 0:
        return 1.0
    scored = trace.step_ms[np.isfinite(trace.alert_score)] // period_ms
    return float(np.isin(test // period_ms, scored).mean())


def rows_in_alerts(ts_ms: np.ndarray, spans: Sequence[tuple[int, float]], period_ms: int) -> np.ndarray:
    """1 for each row whose grid step starts inside an alert span."""
    step_ms = ts_ms - ts_ms % period_ms
    starts = np.searchsorted(step_ms, [s for s, _ in spans], side="left")
    stops = np.searchsorted(step_ms, [e for _, e in spans], side="left")
    return _cover(len(ts_ms), starts, stops)


# --------------------------------------------------------------------------- engine replay


@dataclass
class EngineTrace:
    """What the engine produced for one asset: per-step series and its alert spans."""

    step_ms: np.ndarray
    forecast_error: np.ndarray
    alert_score: np.ndarray
    threshold: np.ndarray
    spans: list[tuple[int, float]]
    top_features: dict[int, tuple[str, ...]] = field(default_factory=dict)  # alert start_ms -> named features
    rebaselined: list[int] = field(default_factory=list)  # end_ms of the alerts closed by re-baselining
    learning_steps: int = 0  # steps scored in a cold start (not able to alert)


def series_batch(series: Series, features: Sequence[str]) -> DecodedBatch:
    """The long-format batch the engine and the fit take, through the same table decoder as replay."""
    frame = pd.DataFrame(series.values, columns=list(features))
    frame[_TS] = series.ts_ms
    return frame_to_batch(frame, features, ts_col=_TS, default_asset=series.name, time_unit="ms")


def concat_batches(batches: Sequence[DecodedBatch]) -> DecodedBatch:
    """One batch of several assets' histories (record indices renumbered)."""
    offsets = np.cumsum([0] + [b.n_records for b in batches[:-1]])
    return DecodedBatch(
        record_index=np.concatenate([b.record_index + o for b, o in zip(batches, offsets)]),
        asset=np.concatenate([b.asset for b in batches]),
        ts_ms=np.concatenate([b.ts_ms for b in batches]),
        feature=np.concatenate([b.feature for b in batches]),
        value=np.concatenate([b.value for b in batches]),
        rejects=[], n_records=int(sum(b.n_records for b in batches)),
    )


REPLAY_CHUNK_ROWS = 256  # rows per engine call, as a live detector's polls are


def replay(bundle: ModelBundle, grid: GridSettings, files: Sequence[Series], chunk_rows: int = REPLAY_CHUNK_ROWS,
           as_asset: str | None = None) -> dict[str, EngineTrace]:
    """Feed each file through one engine in poll-sized chunks, flush, and split the output by asset.

    Chunks are small, as a live detector's polls are: a re-baselining takes effect from the
    next poll (steps after it in the same poll are scored under the old scaling, and cannot alert).
    ``as_asset``: every file is a recording of this asset (the one the model was fitted on, so no
    cold start), each replayed in an engine of its own (sharing one network)."""
    from pipeline.engine import DetectionEngine

    if as_asset is None:
        return _replay_in(DetectionEngine(bundle, grid), files, chunk_rows)
    first = DetectionEngine(bundle, grid)
    traces: dict[str, EngineTrace] = {}
    for i, s in enumerate(files):
        engine = first if i == 0 else DetectionEngine(bundle, grid, first.model)
        trace = _replay_in(engine, [Series(as_asset, s.ts_ms, s.values)], chunk_rows)
        traces[s.name] = trace[as_asset]
    return traces


def _replay_in(engine: Any, files: Sequence[Series], chunk_rows: int) -> dict[str, EngineTrace]:
    from pipeline.engine import EngineOutput

    bundle = engine.bundle
    outputs: list[EngineOutput] = []
    for s in files:
        for a in range(0, len(s), chunk_rows):
            part = Series(s.name, s.ts_ms[a:a + chunk_rows], s.values[a:a + chunk_rows])
            outputs.append(engine.process(series_batch(part, bundle.features)))
    outputs.append(engine.flush())
    asset = np.concatenate([o.asset for o in outputs])
    step = np.concatenate([o.step for o in outputs])
    cols = {k: np.concatenate([getattr(o, k) for o in outputs]) for k in ("forecast_error", "alert_score", "threshold")}
    learning = np.concatenate([o.learning for o in outputs])
    events = [e for o in outputs for e in o.events]
    traces = {}
    for s in files:
        sel = np.flatnonzero(asset == s.name)
        traces[s.name] = EngineTrace(step[sel] * bundle.period_ms, cols["forecast_error"][sel], cols["alert_score"][sel],
                                     cols["threshold"][sel], alert_spans(events, s.name),
                                     alert_top_features(events, s.name),
                                     [int(e.end_ms or 0) for e in events
                                      if e.asset == s.name and e.state == "close" and e.reason == "rebaselined"],
                                     int(learning[sel].sum()))
    return traces


# --------------------------------------------------------------------------- scoring


def _dict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    if "delays" in d:
        d["delays"] = list(d["delays"])
    return d


def _event_details(labels: np.ndarray, predicted: np.ndarray, ts_ms: np.ndarray) -> list[dict[str, Any]]:
    """Every labelled range, whether an alert overlapped it, and the delay to its first predicted row."""
    out = []
    for s, e in ranges_from_labels(labels):
        hit = np.flatnonzero(predicted[s:e])
        first = s + int(hit[0]) if hit.size else None
        out.append({"start_ms": int(ts_ms[s]), "end_ms": int(ts_ms[e - 1]), "rows": e - s,
                    "detected": first is not None, "delay_rows": None if first is None else first - s,
                    "delay_s": None if first is None else (int(ts_ms[first]) - int(ts_ms[s])) / 1000})
    return out


def _nab_numenta(files: Sequence[LabelledFile], predicted: Sequence[np.ndarray]) -> dict[str, Any] | None:
    """Numenta's NAB on the labelled ranges: every alert start a detection, and every alerted row one."""
    windows = [[(s, e - 1) for s, e in ranges_from_labels(f.labels)] for f in files]
    starts = [changepoints_from_alerts(p) for p in predicted]
    by_starts = numenta_nab_scores(list(zip(windows, starts)))
    if by_starts is None:
        return None
    return {"alert_starts": by_starts, "alerted_rows": numenta_nab_scores(list(zip(windows, predicted)))}


def _nab(files: Sequence[LabelledFile], predicted: Sequence[np.ndarray], window_s: float) -> dict[str, Any] | None:
    """NAB scores under SKAB's convention and under the run-starts-only variant."""
    pairs = [(f, p) for f, p in zip(files, predicted) if f.changepoints is not None]
    if not pairs or not any(f.changepoints.any() for f, _ in pairs):  # type: ignore[union-attr]
        return None
    stamps = [f.series.ts_ms.astype("datetime64[ms]") for f, _ in pairs]
    out: dict[str, Any] = {}
    for key, ends in (("skab", True), ("run_starts_only", False)):
        cps = [(f.changepoints, changepoints_from_alerts(p, include_run_ends=ends)) for f, p in pairs]
        out[key] = nab_scores(cps, timestamps=stamps, window=window_s)  # type: ignore[arg-type]
    return out


def _delay_summary(details: Sequence[dict[str, Any]]) -> dict[str, Any]:
    delays = np.array([d["delay_s"] for d in details if d["detected"]], np.float64)
    found = int(delays.size)
    return {"events": len(details), "found": found,
            "mean_s": float(delays.mean()) if found else None,
            "median_s": float(np.median(delays)) if found else None,
            "max_s": float(delays.max()) if found else None}


def score_predictions(files: Sequence[LabelledFile], predicted: Mapping[str, np.ndarray],
                      nab_window_s: float = NAB_WINDOW_S) -> dict[str, Any]:
    """Per-file and pooled metrics of one detector's 0/1 row predictions."""
    preds = [np.asarray(predicted[f.name], np.int8) for f in files]
    per_file: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    for f, p in zip(files, preds):
        t = f.test
        ev = _event_details(f.labels, p, f.series.ts_ms)
        details += [{"file": f.name, **d} for d in ev]
        cov = alert_coverage(f.labels, p, f.series.ts_ms)
        per_file[f.name] = {
            "rows": len(p), "test_rows": int(t.sum()), "predicted_rows": int(p.sum()),
            "point": {"whole": _dict(point_metrics(f.labels, p)), "test": _dict(point_metrics(f.labels[t], p[t]))},
            "event": {"whole": _dict(event_metrics(f.labels, p, blanket_share=BLANKET_SHARE)),
                      "test": _dict(event_metrics(f.labels[t], p[t], blanket_share=BLANKET_SHARE))},
            "coverage": _dict(cov),
            "events": ev,
            "alerts": [list(span) for span in runs_as_spans(p, f.series.ts_ms)],
        }
    covs = [r["coverage"] for r in per_file.values()]
    pooled = {
        "point": {"whole": _dict(pooled_point_metrics([(f.labels, p) for f, p in zip(files, preds)])),
                  "test": _dict(pooled_point_metrics([(f.labels[f.test], p[f.test]) for f, p in zip(files, preds)]))},
        "event": {"whole": _dict(pooled_event_metrics([(f.labels, p) for f, p in zip(files, preds)],
                                                      blanket_share=BLANKET_SHARE)),
                  "test": _dict(pooled_event_metrics([(f.labels[f.test], p[f.test]) for f, p in zip(files, preds)],
                                                     blanket_share=BLANKET_SHARE))},
        "coverage": {"max_normal_share": max(c["normal_share"] for c in covs),
                     "max_longest_share": max(c["longest_share"] for c in covs),
                     "files_over_quarter": sum(c["normal_share"] > 0.25 for c in covs)},
        "delay": _delay_summary(details),
        "nab": _nab(files, preds, nab_window_s),
        "nab_numenta": _nab_numenta(files, preds),
    }
    return {"pooled": pooled, "files": per_file}


def equal_far_predictions(files: Sequence[LabelledFile], scores: Mapping[str, np.ndarray],
                          target_far: float) -> tuple[float, dict[str, np.ndarray]]:
    """One cut-off on a detector's score for all files whose pooled whole-file FAR is as close to
    ``target_far`` as possible without exceeding it; returns the cut-off and the predictions.

    It reads the labels, so it is a diagnostic for comparing detectors at the same false
    alarm rate, not a way to set a threshold.
    """
    normal = np.concatenate([scores[f.name][f.labels == 0] for f in files])
    ranked = np.sort(normal)[::-1]
    allowed = int(math.floor(target_far * len(ranked) + 1e-9))
    cut = float(ranked[allowed]) if allowed < len(ranked) else -math.inf
    return cut, {f.name: (scores[f.name] > cut).astype(np.int8) for f in files}


# --------------------------------------------------------------------------- plans and runs


def training_groups(files: Sequence[LabelledFile], plan: Plan,
                    train: Series | None = None) -> list[tuple[list[Series], list[LabelledFile]]]:
    """Which training series fit which model and which files that model scores."""
    if plan == "train_file":
        if train is None:
            raise EvaluationError("the train_file plan needs a training series")
        return [([train], list(files))]
    if plan == "paired":
        unpaired = [f.name for f in files if f.train is None]
        if unpaired:
            raise EvaluationError(f"no training file for {unpaired[:3]}")
        return [([f.train], [f]) for f in files]  # type: ignore[list-item]
    untrained = [f.name for f in files if f.train_rows == 0]
    if untrained:
        raise EvaluationError(f"no training rows in {untrained[:3]}: give training rows or a training file")
    if plan == "fleet":
        return [([f.series.head(f.train_rows) for f in files], list(files))]
    return [([f.series.head(f.train_rows)], [f]) for f in files]


EQUAL_FAR_BASELINES = ("t2", "t2_q")


def baseline_detectors() -> dict[str, Callable[[], Detector]]:
    """SKAB's leaderboard configurations (see :class:`pipeline.baselines.PCAT2`)."""
    return {
        "flag_all": FlagEverything,
        "t2": lambda: PCAT2(variance=1.0, confidence=0.999, limit_factor=2.0, median_window=5),
        "t2_q": lambda: PCAT2(variance=0.85, confidence=0.999, use_q=True, median_window=5, q_limit="skab"),
    }


def filled_gaps(values: np.ndarray) -> np.ndarray:
    """Missing cells carry the previous (else the next) reading of their column: PCA needs full rows."""
    return pd.DataFrame(values).ffill().bfill().to_numpy(np.float64)


def _training_values(f: LabelledFile) -> np.ndarray:
    return f.train.values if f.train is not None else f.series.values[: f.train_rows]


def baseline_scores(files: Sequence[LabelledFile], plan: Plan, train: Series | None,
                    name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """Scores and predictions of one baseline, fitted per file on its training rows (or training file),
    and why it could not be fitted on some files (it then scores 0 and predicts nothing there)."""
    make = baseline_detectors()[name]
    shared = make().fit(filled_gaps(train.values)) if plan == "train_file" and train is not None else None
    scores, preds, failed = {}, {}, {}
    for f in files:
        x = filled_gaps(f.series.values)
        try:
            det = shared if shared is not None else make().fit(filled_gaps(_training_values(f)))
        except ValueError as exc:  # e.g. fewer training rows than components
            failed[f.name] = str(exc)
            scores[f.name], preds[f.name] = np.zeros(len(x)), np.zeros(len(x), np.int8)
            continue
        scores[f.name], preds[f.name] = det.score(x), det.predict(x)
    return scores, preds, failed


def plan_settings(settings: Settings, plan: Plan, seed: int | None = None) -> Settings:
    """The settings a plan fits with: its seed, and per-asset scaling for a fleet."""
    model = settings.model if seed is None else dataclasses.replace(settings.model, seed=seed)
    if plan == "fleet":
        model = dataclasses.replace(model, per_asset_scaling=True)
    return dataclasses.replace(settings, model=model)


def _fit_summary(bundle: ModelBundle, files: Sequence[LabelledFile]) -> dict[str, Any]:
    m = bundle.metadata
    return {"files": [f.name for f in files], "epochs": m.get("epochs"), "best_epoch": m.get("best_epoch"),
            "validation_error": m.get("validation_error"), "thresholds": dataclasses.asdict(bundle.thresholds),
            "duration_s": m.get("duration_s"), "unread_features": m.get("unread_features", {}),
            "two_valued_features": m.get("two_valued_features", [])}


@dataclass
class LstmRun:
    """One seed of the LSTM: predictions and traces per file, and what each fit reported."""

    seed: int
    predicted: dict[str, np.ndarray]
    traces: dict[str, EngineTrace]
    fits: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0


def run_lstm(files: Sequence[LabelledFile], settings: Settings, plan: Plan, *, train: Series | None = None,
             seed: int | None = None, chunk_rows: int = REPLAY_CHUNK_ROWS, progress: Progress | None = None) -> LstmRun:
    """Fit per the plan (thresholds calibrated on the fit's held-out tail), replay, map alerts to rows."""
    from pipeline.fit import fit_bundle

    t0 = time.monotonic()
    s = plan_settings(settings, plan, seed)
    run = LstmRun(s.model.seed, {}, {})
    features = s.model.features
    for train_series, scored in training_groups(files, plan, train):
        batch = concat_batches([series_batch(t, features) for t in train_series])
        bundle, _ = fit_bundle(batch, s, metadata={"evaluation": plan})
        run.fits.append(_fit_summary(bundle, scored))
        # A training file and the files it is paired with are recordings of one asset.
        same_asset = train_series[0].name if plan in ("paired", "train_file") else None
        traces = replay(bundle, s.grid, [f.series for f in scored], chunk_rows, as_asset=same_asset)
        for f in scored:
            run.traces[f.name] = traces[f.name]
            run.predicted[f.name] = rows_in_alerts(f.series.ts_ms, traces[f.name].spans, bundle.period_ms)
        if progress is not None:
            progress({"seed": run.seed, **run.fits[-1]})
    run.duration_s = time.monotonic() - t0
    return run


def mean_std(trees: Sequence[Any]) -> tuple[Any, Any] | None:
    """Mean and sample standard deviation of every numeric leaf shared by equally shaped trees;
    a leaf that is None in some trees is averaged over the others, None in all stays None."""
    first = trees[0]
    if isinstance(first, dict):
        pairs = {k: mean_std([t[k] for t in trees]) for k in first if all(isinstance(t, dict) and k in t for t in trees)}
        kept = {k: v for k, v in pairs.items() if v is not None}
        return {k: v[0] for k, v in kept.items()}, {k: v[1] for k, v in kept.items()}
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in trees):
        arr = np.asarray(trees, np.float64)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    if all(t is None for t in trees):  # e.g. the mean delay when nothing was found: kept, as None
        return None, None
    numbers = [t for t in trees if t is not None]
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in numbers):
        return mean_std(numbers)  # defined in some seeds only (a delay when one seed found nothing)
    return None


@dataclass
class Evaluation:
    """The JSON-ready report, plus the first seed's LSTM run and every detector's predictions for plots."""

    report: dict[str, Any]
    first_run: LstmRun
    predicted: dict[str, dict[str, np.ndarray]]


def evaluate(files: Sequence[LabelledFile], settings: Settings, plan: Plan, *, seeds: Sequence[int] = (0,),
             train: Series | None = None, chunk_rows: int = REPLAY_CHUNK_ROWS, nab_window_s: float | None = None,
             progress: Progress | None = None) -> Evaluation:
    """LSTM (one run per seed) and baselines on the same files, split and metric code. ``nab_window_s``:
    None for :func:`nab_window_for` the settings' grid period."""
    if not files or not seeds:
        raise EvaluationError("no files or no seeds to evaluate")
    nab_window_s = nab_window_for(nab_window_s, settings.grid.period_s)
    t0 = time.monotonic()
    baselines: dict[str, Any] = {}
    predicted: dict[str, dict[str, np.ndarray]] = {}
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    for name in baseline_detectors():
        scores, preds, failed = baseline_scores(files, plan, train, name)
        baselines[name] = {**score_predictions(files, preds, nab_window_s), "not_fitted": failed}
        predicted[name] = preds
        all_scores[name] = scores

    runs, first = [], None
    for seed in seeds:
        run = run_lstm(files, settings, plan, train=train, seed=seed, chunk_rows=chunk_rows, progress=progress)
        first = run if first is None else first
        lstm = score_predictions(files, run.predicted, nab_window_s)
        for name, trace in run.traces.items():
            lstm["files"][name]["alert_spans"] = [
                [int(a), None if math.isinf(b) else int(b), list(trace.top_features.get(int(a), ()))] for a, b in trace.spans]
            lstm["files"][name]["rebaselined_at_ms"] = trace.rebaselined
        for f in files:  # rows the engine scored: a sensor gone silent stops its asset's steps, not its rows
            lstm["files"][f.name]["scored_share"] = scored_share(f, run.traces[f.name], settings.grid.period_ms)
        target = lstm["pooled"]["point"]["whole"]["far"]
        entry = {"seed": run.seed, "duration_s": run.duration_s, "fits": run.fits, "lstm": lstm}
        for base in EQUAL_FAR_BASELINES:
            cut, eq_preds = equal_far_predictions(files, all_scores[base], target)
            entry[f"{base}_equal_far"] = {"target_far": target, "cut": cut, **score_predictions(files, eq_preds, nab_window_s)}
        runs.append(entry)
    assert first is not None  # seeds is not empty
    predicted["lstm"] = first.predicted
    summary = mean_std([{"lstm": r["lstm"]["pooled"], "duration_s": r["duration_s"],
                         **{f"{b}_equal_far": r[f"{b}_equal_far"]["pooled"] for b in EQUAL_FAR_BASELINES}}
                        for r in runs])
    assert summary is not None
    report = {
        "protocol": {"plan": plan, "files": [f.name for f in files], "train_rows": [f.train_rows for f in files],
                     "train_file": None if train is None else train.name, "seeds": [r["seed"] for r in runs],
                     "train_files": {f.name: f.train.name for f in files if f.train is not None},
                     "grid_period_s": settings.grid.period_s},
        "notes": {s.name: list(s.notes) for s in [*(f.series for f in files), *(f.train for f in files if f.train),
                                                   *([train] if train else [])] if s.notes},
        "conventions": CONVENTIONS | {"nab_window_s": nab_window_s},
        "baselines": baselines,
        "runs": runs,
        "summary": {"mean": summary[0], "std": summary[1]},
        "duration_s": time.monotonic() - t0,
    }
    return Evaluation(report, first, predicted)


CONVENTIONS: dict[str, Any] = {
    "rates": "fractions in [0, 1]; F1 = TP / (TP + (FP + FN) / 2) point-wise, 2PR/(P+R) event-level",
    "point": "row counts pooled over files, no point adjustment",
    "bases": {"whole": "every row of the file, training rows included (as SKAB's notebooks score)",
              "test": "rows after each file's training rows"},
    "event": "telemanom/Orion overlap: a labelled range is found if any predicted row falls inside it; "
             "a predicted run overlapping no labelled range is a false positive; a predicted run covering more "
             "than half of a file's normal rows finds nothing and is one false positive; counts summed per file",
    "coverage": "per file: normal_share = share of normal rows under alert; longest alert in rows, seconds "
                "(first to last row) and share of the file's rows",
    "alerts": "per file, every predicted run as [first row ms, last row ms]; for the LSTM also alert_spans, the "
              "engine's alerts as [start_ms, end_ms, top features] with end null when the alert never closed, "
              "and rebaselined_at_ms, where an alert outlasted threshold.rebaseline_after_s: it ends there, and "
              "the asset learns its behaviour since (threshold.cold_start_steps) without alerting",
    "lstm_rows": "a row is predicted when its grid step lies in [alert start_ms, end_ms), to the end if never closed",
    "nab": {"skab": "SKAB tsad chp_score: 30 s windows centred on each changepoint, predicted changepoints at "
                    "the first row of every alert run and the first row after it (include_run_ends=True)",
            "run_starts_only": "same windows, a predicted changepoint only where an alert run starts"},
    "nab_numenta": "Numenta's scorer (nab/sweeper.py): windows are the labelled ranges, scaled sigmoid of the "
                   "window-relative position, only a window's first detection counts, each detection outside "
                   "the windows costs A_FP times the sigmoid of its distance past the preceding window, the first "
                   "15 % of rows (at most 750) are probationary, normalised with the null and perfect detectors; "
                   "alert_starts: each alert's first row is a detection; alerted_rows: every alerted row is one",
    "baselines": {"t2": "PCAT2(variance=1.0, confidence=0.999, limit_factor=2.0, median_window=5)",
                  "t2_q": "PCAT2(variance=0.85, confidence=0.999, use_q=True, median_window=5, q_limit='skab')",
                  "t2_equal_far": "T² score cut so its pooled whole-file FAR matches the LSTM's (label-aware "
                                  "diagnostic, not a deployable threshold)",
                  "t2_q_equal_far": "the same for the T²+Q score",
                  "not_fitted": "files a baseline could not be fitted on (it then predicts nothing there)"},
    "seeds": "summary.mean/std over seeds; std is the sample standard deviation (0 for one seed)",
}
