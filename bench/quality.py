"""Detection quality of the default configuration on every dataset of the development corpus.

``make bench-quality`` (``python -m bench.quality``) runs the product's **default** settings
(no per-dataset file; only the features and the grid period, the data's own median spacing,
come from the data) beside the harness's PCA T² and T²+Q:

* **SKAB** (34 labelled recordings of a water pump test rig, ~1 Hz), both protocols of
  ``bench/skab.py``: *leaderboard* (one model per recording, fitted on its first 400 rows,
  whole-file metrics) and *fleet* (one model on the union of those rows).
* **SMD** (8 server machines, one row per minute, 38 metrics): one model per machine fitted
  on its train split, scoring its test split; point-wise F1 without point adjustment and
  event F1, beside T²+Q cut at the LSTM's false alarm rate; the share of an alert's named
  top features among the metrics labelled for the anomaly it overlaps.
* **New assets**: a model fitted on one SKAB recording's normal rows receives the normal
  rows of 20 other recordings under names it never saw; alerts raised there are false.
* **SMD univariate** (``--datasets smd_univariate --out bench/out/univariate.json``, not in
  the default run: 7 minutes a seed): each machine's most often labelled metric that varies
  in training, alone, labelled where an anomaly segment names it, fitted on its train split:
  one sensor and its own history, the shape of a machine temperature.
* **SMD short history** (``--datasets smd_short --out bench/out/short.json``, not in the
  default run: 1 minute a seed): each machine fitted on only the first ``SHORT_HISTORY_ROWS``
  rows of its train split, scoring its test split: a short, wide history (38 metrics) far
  from the data it judges, where levels learned in fitting are least likely to hold.

Data is read in place from ``../shared/data`` (or ``PLANTWATCH_DATA_DIR``). Writes
``bench/quality.json`` (headline keys, per-file figures, fit times, wall time) and prints a
Markdown table. FAR and MAR are in percent, F1 and shares are fractions; the headline
figures are means over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SKAB_GROUPS = ("valve1", "valve2", "other")
SKAB_FEATURES = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
                 "Voltage", "Volume Flow RateRMS")
SKAB_TRAIN_ROWS = 400
SMD_FEATURES = tuple(f"m{k:02d}" for k in range(38))
NEW_ASSETS = 20
QUICK_SMD = ("machine-1-6", "machine-2-1")


def data_dir() -> Path:
    return Path(os.environ.get("PLANTWATCH_DATA_DIR") or REPO.parent / "shared" / "data")


OVERRIDES: dict[str, str] = {}  # --set: an experiment, recorded in the output; the headline uses none


def default_settings(features: Sequence[str], series: Sequence[Any]) -> Any:
    """The product's defaults with the data's features and the data's own grid period."""
    from pipeline.evaluation import data_period_s
    from pipeline.settings import load_settings

    s = load_settings(env={}, overrides={"model.features": ",".join(features), "log.level": "warning", **OVERRIDES})
    period = data_period_s(series)
    if period is None:
        raise SystemExit("cannot tell the data's grid period")
    return dataclasses.replace(s, grid=dataclasses.replace(s.grid, period_s=period))


def paired_settings(features: Sequence[str], files: Sequence[Any]) -> Any:
    """The defaults for files each paired with its own training series (the grid period from both)."""
    return default_settings(features, [f.series for f in files] + [f.train for f in files])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(tag: str) -> Any:
    return lambda p: _log(f"  {tag} seed={p['seed']} fitted {p['files'][0]}{'…' if len(p['files']) > 1 else ''} "
                          f"in {p['duration_s']} s (epochs {p['epochs']}, best {p['best_epoch']})")


# --------------------------------------------------------------------------- loading


def load_skab(root: Path, quick: bool) -> list[Any]:
    from cli.evaluate_cmd import LoadOptions, discover, load_files

    groups = ("valve1",) if quick else SKAB_GROUPS
    _, paths = discover([str(root / g) for g in groups], str(root))
    opts = LoadOptions(time_col="datetime", sep=";", label_col="anomaly", changepoint_col="changepoint",
                       train_rows=SKAB_TRAIN_ROWS)
    files, skipped = load_files(paths, root, SKAB_FEATURES, opts)
    if skipped:
        raise SystemExit(f"unlabelled SKAB files: {skipped}")
    return files


def load_smd(root: Path, machines: Sequence[str] | None) -> list[Any]:
    from cli.evaluate_cmd import LoadOptions, load_files

    test = root / "test"
    paths = sorted(p for p in test.glob("*.parquet") if machines is None or p.stem in machines)
    opts = LoadOptions(time_col="ts", sep=None, label_col="label", changepoint_col="changepoint", train_rows=0)
    files, skipped = load_files(paths, test, SMD_FEATURES, opts, None, root / "train")
    if skipped or not files:
        raise SystemExit(f"SMD test files without labels or missing: {skipped or str(test)}")
    return files


# --------------------------------------------------------------------------- summaries


def _fit_times(report: dict[str, Any]) -> dict[str, list[float]]:
    """Per file (or per fleet fit), the fit's duration in seconds for each seed."""
    out: dict[str, list[float]] = {}
    for run in report["runs"]:
        for fit in run["fits"]:
            key = fit["files"][0] if len(fit["files"]) == 1 else f"fleet of {len(fit['files'])}"
            out.setdefault(key, []).append(fit["duration_s"])
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _point(pooled: dict[str, Any], basis: str = "whole") -> dict[str, float]:
    w = pooled["point"][basis]
    return {"f1": w["f1"], "far": 100 * w["far"], "mar": 100 * w["mar"], "event_f1": pooled["event"][basis]["f1"]}


def _normal_shares(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per file: the LSTM's share of normal rows under alert (mean over seeds) and T²+Q's."""
    t2q = report["baselines"]["t2_q"]["files"]
    out = {}
    for name in t2q:
        lstm = _mean([r["lstm"]["files"][name]["coverage"]["normal_share"] for r in report["runs"]])
        out[name] = {"lstm": lstm or 0.0, "t2_q": t2q[name]["coverage"]["normal_share"],
                     "lstm_longest_share": _mean([r["lstm"]["files"][name]["coverage"]["longest_share"]
                                                  for r in report["runs"]]) or 0.0}
    return out


def protocol_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Mean over seeds of the LSTM's pooled figures, the baselines, and T²/T²+Q at the LSTM's FAR."""
    runs = report["runs"]
    per_seed = {str(r["seed"]): _point(r["lstm"]["pooled"]) for r in runs}
    mean = {k: _mean([s[k] for s in per_seed.values()]) for k in ("f1", "far", "mar", "event_f1")}
    numenta = [((r["lstm"]["pooled"].get("nab_numenta") or {}).get("alert_starts") or {}).get("standard") for r in runs]
    eq = {b: {k: _mean([_point(r[f"{b}_equal_far"]["pooled"])[k] for r in runs]) for k in ("f1", "far", "mar", "event_f1")}
          for b in ("t2", "t2_q")}
    return {
        **mean, "per_seed": per_seed, "nab_numenta_standard": _mean(numenta),
        "baselines": {k: _point(v["pooled"]) for k, v in report["baselines"].items() if k != "flag_all"},
        "equal_far": eq,
        "normal_share": _normal_shares(report),
        "fit_s": _fit_times(report),
        "duration_s": report["duration_s"],
    }


def top_feature_hit_rate(files: Sequence[Any], traces: dict[str, Any], interpretation: dict[str, Any]) -> dict[str, Any]:
    """Share of an alert's named features among the metrics labelled for the anomaly segment it overlaps.

    Per labelled segment overlapped by an alert (its first such alert), with k the number of
    features the alert names (at most the number labelled), hits among its first k over k;
    averaged over those segments (InterFusion's HitRate with the alert's own ranking).
    """
    rates: list[float] = []
    segments = 0
    for f in files:
        machine = Path(f.name).stem
        trace = traces[f.name]
        ts = f.series.ts_ms
        for seg in interpretation.get(machine, []):
            segments += 1
            start_ms = int(ts[seg["start_row"]])
            end_ms = int(ts[min(seg["end_row_exclusive"], len(ts)) - 1])
            hit = next((s for s, e in trace.spans if s <= end_ms and e > start_ms), None)
            if hit is None:
                continue
            named = trace.top_features.get(int(hit), ())
            k = min(len(named), len(seg["metrics"]))
            if k:
                rates.append(len(set(named[:k]) & set(seg["metrics"])) / k)
    return {"hit_rate": _mean(rates), "segments": segments, "segments_with_alert": len(rates)}


# --------------------------------------------------------------------------- datasets


def run_skab(root: Path, seeds: list[int], quick: bool) -> dict[str, Any]:
    from pipeline.evaluation import evaluate, plan_settings

    files = load_skab(root, quick)
    base = default_settings(SKAB_FEATURES, [f.series for f in files])
    out: dict[str, Any] = {"files": len(files), "grid_period_s": base.grid.period_s}
    for name, plan in (("leaderboard", "per_file"), ("fleet", "fleet")):
        _log(f"SKAB {name}: {len(files)} files, seeds {seeds}")
        settings = plan_settings(base, plan)  # type: ignore[arg-type]
        report = evaluate(files, settings, plan, seeds=seeds, progress=_progress(f"skab {name}")).report  # type: ignore[arg-type]
        out[name] = protocol_summary(report)
    return out


def run_smd(root: Path, seeds: list[int], machines: Sequence[str] | None) -> dict[str, Any]:
    from pipeline.evaluation import evaluate

    files = load_smd(root, machines)
    settings = paired_settings(SMD_FEATURES, files)
    _log(f"SMD: {len(files)} machines, seeds {seeds}, grid period {settings.grid.period_s} s")
    result = evaluate(files, settings, "paired", seeds=seeds, progress=_progress("smd"))
    summary = protocol_summary(result.report)
    interpretation = json.loads((root / "interpretation.json").read_text())["machines"]
    summary["top_features_seed0"] = top_feature_hit_rate(files, result.first_run.traces, interpretation)
    summary["machines"] = [Path(f.name).stem for f in files]
    return {**summary, "grid_period_s": settings.grid.period_s}


UNIVARIATE_FEATURE = "value"


def univariate_files(files: Sequence[Any], interpretation: dict[str, Any]) -> list[Any]:
    """Each SMD file reduced to its most often labelled metric that varies over its training
    split (ties: the lower column), labelled only where a segment names that metric."""
    from collections import Counter

    from pipeline.evaluation import LabelledFile, Series

    out = []
    for f in files:
        assert f.train is not None  # load_smd pairs every test file with its train split
        machine = Path(f.name).stem
        segments = interpretation[machine]
        counts = Counter(m for seg in segments for m in seg["metrics"])
        varying = [m for m in sorted(counts, key=lambda m: (-counts[m], m))
                   if np.nanstd(f.train.values[:, SMD_FEATURES.index(m)]) > 0]
        if not varying:
            continue
        metric = varying[0]
        k = SMD_FEATURES.index(metric)
        labels = np.zeros(len(f.series), np.int8)
        for seg in segments:
            if metric in seg["metrics"]:
                labels[seg["start_row"]:seg["end_row_exclusive"]] = 1
        name = f"{machine}:{metric}"
        out.append(LabelledFile(Series(name, f.series.ts_ms, f.series.values[:, [k]]), labels, None, 0,
                                Series(f"{name}:train", f.train.ts_ms, f.train.values[:, [k]])))
    return out


def run_smd_univariate(root: Path, seeds: list[int], machines: Sequence[str] | None) -> dict[str, Any]:
    from pipeline.evaluation import evaluate

    interpretation = json.loads((root / "interpretation.json").read_text())["machines"]
    files = univariate_files(load_smd(root, machines), interpretation)
    settings = paired_settings((UNIVARIATE_FEATURE,), files)
    _log(f"SMD univariate: {', '.join(f.name for f in files)}, seeds {seeds}")
    result = evaluate(files, settings, "paired", seeds=seeds, progress=_progress("smd univariate"))
    return {**protocol_summary(result.report), "series": [f.name for f in files],
            "labelled_rows": {f.name: int(f.labels.sum()) for f in files}}


SHORT_HISTORY_ROWS = 500


def run_smd_short(root: Path, seeds: list[int], machines: Sequence[str] | None) -> dict[str, Any]:
    from pipeline.evaluation import evaluate

    files = []
    for f in load_smd(root, machines):
        assert f.train is not None  # load_smd pairs every test file with its train split
        files.append(dataclasses.replace(f, train=f.train.head(SHORT_HISTORY_ROWS)))
    settings = paired_settings(SMD_FEATURES, files)
    _log(f"SMD short history: {len(files)} machines fitted on {SHORT_HISTORY_ROWS} rows each, seeds {seeds}")
    result = evaluate(files, settings, "paired", seeds=seeds, progress=_progress("smd short"))
    return {**protocol_summary(result.report), "history_rows": SHORT_HISTORY_ROWS}


# SKAB's labels start with the logged intervention, and the rig can move a few seconds before it
# (other/6: its vibration at -12 sd three rows before the label). The last ONSET_STEPS rows before a
# labelled anomaly are its onset, not normal rows: an alert opening there is counted apart.
ONSET_STEPS = 10


def run_new_assets(root: Path, seed: int) -> dict[str, Any]:
    """A model fitted on one recording's normal rows, fed 20 other recordings' normal rows as unseen assets.

    The rows before each recording's first labelled anomaly are replayed; an alert opening in
    the last :data:`ONSET_STEPS` of them is an onset alert, any other a false alert."""
    from pipeline.evaluation import Series, concat_batches, plan_settings, replay, series_batch
    from pipeline.fit import fit_bundle

    files = load_skab(root, quick=False)
    fitted, others = files[0], files[1:NEW_ASSETS + 1]
    settings = plan_settings(default_settings(SKAB_FEATURES, [f.series for f in files]), "per_file", seed)
    history = fitted.series.head(fitted.train_rows)
    bundle, _ = fit_bundle(concat_batches([series_batch(history, settings.model.features)]), settings)
    newcomers, onset_ms = [], {}
    for f in others:
        first_label = int(np.argmax(f.labels)) if f.labels.any() else len(f.labels)
        normal = f.series.head(first_label)
        newcomers.append(Series(f"new/{f.name}", normal.ts_ms, normal.values))
        onset_ms[f"new/{f.name}"] = (int(normal.ts_ms[max(first_label - ONSET_STEPS, 0)]) if f.labels.any()
                                     else None)
    traces = replay(bundle, settings.grid, newcomers)
    false_alerts, onset = {}, {}
    for s in newcomers:
        starts = [start for start, _ in traces[s.name].spans]
        cut = onset_ms[s.name]
        false_alerts[s.name] = sum(1 for t in starts if cut is None or t < cut)
        at = [int((s.ts_ms[-1] - t) // bundle.period_ms) for t in starts if cut is not None and t >= cut]
        if at:
            onset[s.name] = at  # steps before the last normal row
    live = sum(len(traces[s.name].step_ms) - traces[s.name].learning_steps for s in newcomers)
    return {"fitted_on": fitted.name, "assets": len(newcomers), "rows": [len(s) for s in newcomers],
            "whole_recordings": new_asset_detection(bundle, settings, others),
            "cold_start_steps": settings.threshold.cold_start_steps, "steps_after_cold_start": live,
            "false_alerts": sum(false_alerts.values()), "assets_alerted": sum(1 for v in false_alerts.values() if v),
            "per_asset": false_alerts, "seed": seed,
            "onset_alerts": sum(len(v) for v in onset.values()),
            "baselines_on_own_cold_start_rows": baseline_new_asset_alerts(
                newcomers, settings.threshold.cold_start_steps,
                {k: None if v is None else ONSET_STEPS for k, v in onset_ms.items()}),
            f"opened_in_last_{ONSET_STEPS}_steps_before_a_labelled_anomaly": onset}


def baseline_new_asset_alerts(newcomers: Sequence[Any], cold_rows: int, onset_rows: dict[str, int | None]
                              ) -> dict[str, Any]:
    """Alerts T² and T²+Q raise on the same normal rows, each fitted on the asset's own first
    ``cold_rows`` rows (a head start over the cold start: the asset's own correlations): the alerts
    a classical detector would raise on these rows, counted as runs after those rows; runs opening
    in an asset's last ``onset_rows`` rows (its labelled anomaly's onset) are counted apart."""
    from pipeline.evaluation import baseline_detectors, filled_gaps

    out: dict[str, Any] = {}
    for name in ("t2", "t2_q"):
        per: dict[str, int] = {}
        at_onset = 0
        for s in newcomers:
            x = filled_gaps(s.values)
            if len(x) <= cold_rows:
                continue
            p = baseline_detectors()[name]().fit(x[:cold_rows]).predict(x)[cold_rows:].astype(bool)
            opens = np.flatnonzero(p & ~np.concatenate(([False], p[:-1])))
            onset = len(p) - (onset_rows.get(s.name) or 0)
            per[s.name] = int((opens < onset).sum())
            at_onset += int((opens >= onset).sum())
        out[name] = {"false_alerts": sum(per.values()), "assets_alerted": sum(1 for v in per.values() if v),
                     "per_asset": {k: v for k, v in per.items() if v}, "onset_alerts": at_onset}
    return out


def new_asset_detection(bundle: Any, settings: Any, files: Sequence[Any]) -> dict[str, Any]:
    """The other side of quiet new assets: the same recordings replayed whole, faults included, as
    unseen assets; row and event metrics over the rows after each asset's cold start."""
    from pipeline.evaluation import Series, replay, rows_in_alerts
    from pipeline.quality_metrics import pooled_event_metrics, pooled_point_metrics

    labelled = [f for f in files if f.labels.any()]
    traces = replay(bundle, settings.grid, [Series(f"new/{f.name}", f.series.ts_ms, f.series.values) for f in labelled])
    pairs = []
    for f in labelled:
        tr = traces[f"new/{f.name}"]
        predicted = rows_in_alerts(f.series.ts_ms, tr.spans, bundle.period_ms)
        judged = f.series.ts_ms >= tr.step_ms[min(tr.learning_steps, len(tr.step_ms) - 1)]  # after the cold start
        pairs.append((f.labels[judged].astype(np.int8), predicted[judged]))
    point, event = pooled_point_metrics(pairs), pooled_event_metrics(pairs)
    return {"recordings": len(labelled), "f1": point.f1, "far": 100 * point.far, "mar": 100 * point.mar,
            "event_f1": event.f1, "events_found": event.tp, "events": event.tp + event.fn}


# --------------------------------------------------------------------------- report


def headline(out: dict[str, Any]) -> dict[str, Any]:
    skab, smd = out.get("skab") or {}, out.get("smd") or {}
    lead, fleet = skab.get("leaderboard") or {}, skab.get("fleet") or {}
    excess = []
    for proto in (lead, fleet, smd):
        for name, sh in (proto.get("normal_share") or {}).items():
            excess.append(sh["lstm"] - max(0.25, sh["t2_q"]))
    eq = (smd.get("equal_far") or {}).get("t2_q") or {}
    return {
        "skab.f1": lead.get("f1"), "skab.far": lead.get("far"), "skab.mar": lead.get("mar"),
        "skab.fleet_f1": fleet.get("f1"),
        "smd.f1": smd.get("f1"), "smd.event_f1": smd.get("event_f1"),
        "smd.t2q_f1_equal_far": eq.get("f1"), "smd.t2q_event_f1_equal_far": eq.get("event_f1"),
        "smd.top_feature_hit_rate": (smd.get("top_features_seed0") or {}).get("hit_rate"),
        "normal_share_excess": max(excess) if excess else None,
        "new_assets_false_alerts": (out.get("new_assets") or {}).get("false_alerts"),
        "new_assets_onset_alerts": (out.get("new_assets") or {}).get("onset_alerts"),
        "new_assets_t2q_false_alerts": (((out.get("new_assets") or {}).get("baselines_on_own_cold_start_rows") or {})
                                        .get("t2_q") or {}).get("false_alerts"),
        "new_assets_whole_f1": ((out.get("new_assets") or {}).get("whole_recordings") or {}).get("f1"),
    }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(out: dict[str, Any]) -> str:
    rows = ["| dataset | detector | F1 | FAR % | MAR % | event F1 | max normal share under alert |",
            "|---|---|---|---|---|---|---|"]

    def add(ds: str, proto: dict[str, Any]) -> None:
        shares = proto.get("normal_share") or {}
        rows.append(f"| {ds} | LSTM (defaults, mean of {len(proto['per_seed'])}) | {_f(proto['f1'])} | "
                    f"{_f(proto['far'], '.2f')} | {_f(proto['mar'], '.2f')} | {_f(proto['event_f1'])} | "
                    f"{_f(max((s['lstm'] for s in shares.values()), default=None), '.2f')} |")
        for b, label in (("t2", "T²"), ("t2_q", "T²+Q")):
            m = proto["baselines"][b]
            top = max((s["t2_q"] for s in shares.values()), default=None) if b == "t2_q" else None
            rows.append(f"| {ds} | {label} | {_f(m['f1'])} | {_f(m['far'], '.2f')} | {_f(m['mar'], '.2f')} | "
                        f"{_f(m['event_f1'])} | {_f(top, '.2f')} |")
            e = proto["equal_far"][b]
            rows.append(f"| {ds} | {label} at the LSTM's FAR | {_f(e['f1'])} | {_f(e['far'], '.2f')} | "
                        f"{_f(e['mar'], '.2f')} | {_f(e['event_f1'])} | |")

    skab = out.get("skab") or {}
    for name in ("leaderboard", "fleet"):
        if name in skab:
            add(f"SKAB {name}", skab[name])
    if "smd" in out:
        add("SMD (test split)", out["smd"])
    if "smd_univariate" in out:
        add("SMD univariate", out["smd_univariate"])
    if "smd_short" in out:
        add(f"SMD, {out['smd_short']['history_rows']} training rows", out["smd_short"])
    lines = ["\n".join(rows), "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_f(v, '.4g') if isinstance(v, float) else v} |" for k, v in out["headline"].items()]
    lines.append(f"\nwall time {out['wall_time_s']:.0f} s; seeds {out['seeds']}{' (quick)' if out['quick'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cli.evaluate_cmd import json_safe

    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (default: 0,1,2)")
    p.add_argument("--quick", action="store_true",
                   help=f"one seed, SKAB valve1/ only and SMD {', '.join(QUICK_SMD)}: a quick look, not the headline")
    p.add_argument("--datasets", default="skab,smd,new_assets",
                   help="which parts to run (default: skab,smd,new_assets; also smd_univariate, smd_short)")
    p.add_argument("--out", default=str(REPO / "bench" / "quality.json"), help="result file (default: bench/quality.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an experiment: change a setting from its default (recorded as 'overrides' in the output)")
    args = p.parse_args(argv)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--set takes KEY=VALUE, got {item!r}")
        OVERRIDES[key.strip()] = value.strip()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--seeds must be comma-separated integers")
    if args.quick:
        seeds = seeds[:1]
    wanted = {d.strip() for d in args.datasets.split(",") if d.strip()}
    unknown = wanted - {"skab", "smd", "new_assets", "smd_univariate", "smd_short"}
    if unknown or not seeds:
        p.error(f"unknown datasets {sorted(unknown)}" if unknown else "no seeds")
    root = data_dir()
    for sub, parts in (("skab", {"skab", "new_assets"}), ("smd", {"smd", "smd_univariate", "smd_short"})):
        if wanted & parts and not (root / sub).is_dir():
            p.error(f"{root / sub} not found (set PLANTWATCH_DATA_DIR)")
    t0 = time.monotonic()
    out: dict[str, Any] = {"seeds": seeds, "quick": args.quick, "data": str(root), "overrides": dict(OVERRIDES)}
    if "skab" in wanted:
        out["skab"] = run_skab(root / "skab", seeds, args.quick)
    machines = QUICK_SMD if args.quick else None
    if "smd" in wanted:
        out["smd"] = run_smd(root / "smd", seeds, machines)
    if "smd_univariate" in wanted:
        out["smd_univariate"] = run_smd_univariate(root / "smd", seeds, machines)
    if "smd_short" in wanted:
        out["smd_short"] = run_smd_short(root / "smd", seeds, machines)
    if "new_assets" in wanted:
        _log("new assets: one fitted recording, 20 unseen")
        out["new_assets"] = run_new_assets(root / "skab", seeds[0])
    out["wall_time_s"] = time.monotonic() - t0
    out["headline"] = headline(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(json_safe(out), indent=1))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
