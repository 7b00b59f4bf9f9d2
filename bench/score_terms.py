"""Which way of combining the per-feature score terms separates SKAB's faults best, before any
threshold logic: fits each SKAB recording on its first 400 rows (the leaderboard protocol,
default settings), replays it, records every step's per-feature forecast and novelty ratios
(each term over its calibrated level) and the flatline ratio, and prints, for each candidate
statistic, the pooled point-wise F1 where a single cut of it gives a FAR near 8, 11 and 13.5 %
(no online adaptation, no hysteresis: how well the statistic ranks rows, not an alerting result).

    python -m bench.score_terms [--seed 0]

The recording wraps ``pipeline.thresholds.combine`` while the evaluation replays a file; the
fit and the engine are the product's. About 2-3 minutes on 2 cores. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

Statistic = Callable[[dict[str, np.ndarray]], np.ndarray]


def record(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per SKAB file: row labels, and per row (NaN where a row has no scored step) the terms."""
    import pipeline.evaluation as evaluation
    import pipeline.thresholds as thresholds
    from bench import quality

    current: dict[str, Any] = {"file": None}
    steps: dict[str, list[tuple[np.ndarray, ...]]] = {}
    combine, replay = thresholds.combine, evaluation.replay

    def recording_combine(fc_ewma: np.ndarray, nv_ewma: np.ndarray, runs: np.ndarray, levels: Any) -> Any:
        out = combine(fc_ewma, nv_ewma, runs, levels)
        if current["file"] is not None:
            steps[current["file"]].append((thresholds.term_ratios(fc_ewma, levels.forecast),
                                           thresholds.term_ratios(nv_ewma, levels.novelty), out.flat, out.score))
        return out

    def recording_replay(bundle: Any, grid: Any, files: Any, *args: Any, **kwargs: Any) -> Any:
        (current["file"],) = [f.name for f in files]  # one file a fit in this protocol
        steps[current["file"]] = []
        try:
            return replay(bundle, grid, files, *args, **kwargs)
        finally:
            current["file"] = None

    thresholds.combine, evaluation.replay = recording_combine, recording_replay
    try:
        files = quality.load_skab(quality.data_dir() / "skab", False)
        settings = evaluation.plan_settings(
            quality.default_settings(quality.SKAB_FEATURES, [f.series for f in files]), "per_file")
        run = evaluation.run_lstm(files, settings, "per_file", seed=seed)
    finally:
        thresholds.combine, evaluation.replay = combine, replay
    period = int(settings.grid.period_ms)
    out = {}
    for f in files:
        trace = run.traces[f.name]
        fc, nv, flat, score = (np.concatenate(parts) for parts in zip(*steps[f.name]))
        row_step = f.series.ts_ms // period
        at = np.clip(np.searchsorted(trace.step_ms // period, row_step), 0, len(trace.step_ms) - 1)
        has = trace.step_ms[at] // period == row_step
        rows = {k: np.where(has[:, None] if v.ndim == 2 else has, v[at], np.nan)
                for k, v in (("fc", fc), ("nv", nv), ("flat", flat), ("score", score))}
        # The fit's held-out steps: the last validation_fraction of the training rows.
        held = np.zeros(len(row_step), bool)
        held[int(quality.SKAB_TRAIN_ROWS * (1 - settings.model.validation_fraction)):quality.SKAB_TRAIN_ROWS] = True
        out[f.name] = {"labels": f.labels.astype(bool), "held": held & has, **rows}
    return out


def _max(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x).any(axis=1), np.nanmax(np.where(np.isfinite(x), x, -np.inf), axis=1), np.nan)


def _agreement(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.sqrt(d["fc"] * d["nv"])


def _held_level(x: np.ndarray, held: np.ndarray) -> np.ndarray:
    """A level read off the held-out rows: their largest value times the default margin, 1.25."""
    return np.nanmax(x[held], axis=0) * 1.25


CANDIDATES: dict[str, Statistic] = {
    "alert score as served": lambda d: d["score"],
    "largest of forecast, novelty, flatline (the release before)":
        lambda d: np.fmax(np.fmax(_max(d["fc"]), _max(d["nv"])), d["flat"]),
    "forecast term": lambda d: _max(d["fc"]),
    "novelty term": lambda d: _max(d["nv"]),
    "agreement: largest sqrt(forecast x novelty) of a feature": lambda d: _max(_agreement(d)),
    "agreement over a level per feature from the held-out rows":
        lambda d: _max(_agreement(d) / _held_level(_agreement(d), d["held"])),
    "agreement over one level per file from the held-out rows":
        lambda d: _max(_agreement(d)) / _held_level(_max(_agreement(d)), d["held"]),
    "largest (forecast + novelty) / 2 of a feature": lambda d: _max((d["fc"] + d["nv"]) / 2),
    "RMS of the novelty ratios over features": lambda d: np.sqrt(np.nanmean(d["nv"] ** 2, axis=1)),
    "RMS of all forecast and novelty ratios":
        lambda d: np.sqrt(np.nanmean(np.concatenate([d["fc"], d["nv"]], axis=1) ** 2, axis=1)),
}


def f1_at_far(data: dict[str, dict[str, np.ndarray]], stat: Statistic, fars: tuple[float, ...]) -> dict[str, Any]:
    """Pooled point-wise F1 of one global cut of ``stat``, at the cuts whose FAR is nearest each target."""
    labels = np.concatenate([d["labels"] for d in data.values()])
    values = np.nan_to_num(np.concatenate([stat(d) for d in data.values()]), nan=-np.inf)
    rows = []
    for cut in np.quantile(values[np.isfinite(values)], np.linspace(0.5, 0.999, 500)):
        flagged = values > cut
        tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
        fn, tn = int((~flagged & labels).sum()), int((~flagged & ~labels).sum())
        rows.append((2 * tp / (2 * tp + fp + fn), 100 * fp / (fp + tn)))
    table = np.array(rows)
    out = {}
    for far in fars:
        i = int(np.argmin(abs(table[:, 1] - far)))
        out[f"far_{far:g}"] = {"far": round(float(table[i, 1]), 2), "f1": round(float(table[i, 0]), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = record(args.seed)
    print(json.dumps({name: f1_at_far(data, stat, (8, 11, 13.5)) for name, stat in CANDIDATES.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
