"""``plantwatch evaluate``: replay labelled recordings through the detection engine and score it.

No Kafka: each file goes through the same engine as the live detector, and the same
metric code scores the LSTM and the baselines (flag everything, PCA T², T²+Q, and T² and
T²+Q at the LSTM's false alarm rate). Results go to the terminal and, with ``--out``, to JSON.
Unless ``grid.period_s`` is set (``--set``, config file or environment), the grid period is
the data's own spacing (median of the positive time differences).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cli.arg_types import positive_int
from cli.tables_args import add_time_unit_argument, features_for, with_features
from pipeline.settings import Settings, to_dict

TABLE_SUFFIXES = {".csv", ".parquet", ".pq"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+",
                   help="directories (searched recursively for .csv/.parquet), files or glob patterns of labelled "
                        "recordings; each file is one asset named by its path relative to --root")
    p.add_argument("--root", default=None,
                   help="directory asset names are relative to (default: the common directory of the inputs)")
    p.add_argument("--time-col", default="ts",
                   help="timestamp column: epoch numbers (see --time-unit) or dates (default: ts); "
                   "@row for files without one: one row a second (label rows with file,start_row,end_row)")
    add_time_unit_argument(p)
    p.add_argument("--sep", default=None, help="CSV separator (default: sniffed, ',' or ';')")
    p.add_argument("--features", default=None,
                   help="comma-separated feature columns, or 'all' for every numeric column but time, label, "
                        "changepoint and --ignore-cols (default: model.features from the settings)")
    p.add_argument("--ignore-cols", default="", help="comma-separated columns that are never features (with --features all)")
    p.add_argument("--label-col", default="anomaly", help="0/1 anomaly label column (default: anomaly)")
    p.add_argument("--changepoint-col", default="changepoint",
                   help="0/1 changepoint column; NAB scores are reported when the files have it (default: changepoint)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labelled ranges used instead of --label-col: a CSV/Parquet/JSON table with a file (or "
                        "asset) column = asset name and start,end (epoch numbers or dates, read as the first input's "
                        "--time-col is) or "
                        "start_row,end_row (0-based row indices), both ends inclusive; or Numenta's windows JSON ({file: [[start, "
                        "end], …]}); a file without a range is all normal")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--train-rows", type=int, default=400,
                       help="each file's first N rows are its training data, one model per file (default: 400)")
    train.add_argument("--train-file", default=None,
                       help="fit one model (and each baseline) on this file of normal readings and score every input "
                            "row; every row is then a test row")
    train.add_argument("--train-dir", default=None, metavar="DIR",
                       help="each input file has its own training file of the same relative name (or, failing "
                            "that, the same file name) under DIR: one model per file, every input row a test row")
    p.add_argument("--fleet", action="store_true",
                   help="one model fitted on the union of every file's first --train-rows rows, each file its own "
                        "asset with its own scaling (sets model.per_asset_scaling=true)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated model seeds; the LSTM is fitted once per seed and mean/std reported "
                        "(default: model.seed)")
    p.add_argument("--nab-window-s", type=float, default=None,
                   help="NAB scoring window (seconds) centred on each changepoint (default: 30 grid periods, "
                        "SKAB's 30 s at its 1 s)")
    p.add_argument("--chunk-rows", type=positive_int, default=256,
                   help="rows fed to the engine per call, like a poll (default: 256)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the full results (per file, pooled, per seed) as JSON")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write one PNG per file: standardised features, forecast error, alert score, threshold, alerts, labels")
    p.add_argument("--per-file", action="store_true", help="also print one line per file")


# --------------------------------------------------------------------------- inputs


def natural_key(name: str) -> list[Any]:
    """valve1/2.csv sorts before valve1/10.csv."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _input_root(spec: str) -> Path:
    """The directory an input names: itself, a file's parent, or a glob's fixed leading part."""
    p = Path(spec)
    if p.is_dir():
        return p
    parts = p.parts
    first_glob = next((i for i, q in enumerate(parts) if _GLOB_CHARS.search(q)), None)
    if first_glob is None:
        return p.parent
    return Path(*parts[:first_glob]) if first_glob else Path(".")


def discover(specs: Sequence[str], root: str | None = None) -> tuple[Path, list[Path]]:
    """Table files named by directories, files or globs, and the root their asset names are relative to."""
    found: set[Path] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found |= {q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TABLE_SUFFIXES}
        elif p.is_file():
            found.add(p)
        else:
            found |= {Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file()}
    if not found:
        from cli.main import UsageError

        raise UsageError(f"no CSV/Parquet files match {list(specs)}")
    # absolute, not resolved: a symlinked data directory keeps its own names
    base = Path(os.path.abspath(root)) if root else Path(os.path.commonpath([os.path.abspath(_input_root(s)) for s in specs]))
    paths = sorted((Path(os.path.abspath(q)) for q in found), key=lambda q: natural_key(q.as_posix()))
    return base, paths


@dataclass(frozen=True)
class LoadOptions:
    time_col: str
    sep: str | None
    label_col: str
    changepoint_col: str
    train_rows: int     # 0 when a separate training file is used
    time_unit: str = "auto"


def read_label_ranges(path: str, time_unit: str = "auto", date_format: str | None = None) -> dict[str, list[Any]]:
    """``{asset name: [LabelRange, …]}`` from any label file :mod:`pipeline.labels` reads, its times read
    as the data's are (:func:`data_time_reading`)."""
    from cli.main import UsageError
    from pipeline.labels import LabelError, ranges_by_name
    from pipeline.labels import read_label_ranges as read_ranges

    try:
        return ranges_by_name(read_ranges(path, time_unit, date_format))
    except LabelError as exc:
        raise UsageError(str(exc)) from None


def training_file_for(path: Path, root: Path, train_dir: Path) -> Path:
    """The training file of a test file: same relative path under ``train_dir``, else the one file of the same name."""
    from cli.main import UsageError

    same = train_dir / path.relative_to(root)
    if same.is_file():
        return same
    found = [q for q in train_dir.rglob(path.name) if q.is_file()]
    if len(found) == 1:
        return found[0]
    why = "several files" if found else "no file"
    raise UsageError(f"--train-dir {train_dir}: {why} named {path.name} to train {path.relative_to(root)} on")


def load_files(paths: Sequence[Path], root: Path, features: Sequence[str], opts: LoadOptions,
               ranges: dict[str, list[Any]] | None = None,
               train_dir: Path | None = None) -> tuple[list[Any], list[str]]:
    """Labelled files ready for evaluation, and the names of files skipped for lack of labels."""
    from pipeline.evaluation import asset_name, frame_timestamps, labelled_file, numeric_columns, series_from_frame
    from pipeline.labels import row_labels
    from pipeline.tables import read_table

    files, skipped = [], []
    for path in paths:
        name = asset_name(path, root)
        frame = read_table(path, sep=opts.sep)
        series = series_from_frame(frame, name, features, opts.time_col, opts.time_unit)
        if ranges is not None:
            labels = row_labels(frame_timestamps(frame, opts.time_col, opts.time_unit), ranges.get(name, []))
            if ranges.get(name) and not labels.any():
                from pipeline.logs import get_logger

                get_logger("plantwatch.evaluate").warning(
                    "no row falls in this file's labelled ranges: its anomalies are not counted (check the time "
                    "column's unit: --time-unit)", file=name, ranges=len(ranges[name]))
        elif opts.label_col in frame.columns:
            labels = numeric_columns(frame, [opts.label_col], name)[:, 0]
        else:
            skipped.append(name)
            continue
        cps = (numeric_columns(frame, [opts.changepoint_col], name)[:, 0] if opts.changepoint_col in frame.columns
               else None)
        train = None
        if train_dir is not None:
            tpath = training_file_for(path, root, train_dir)
            train = series_from_frame(read_table(tpath, sep=opts.sep), f"{name} (train)", features, opts.time_col,
                                      opts.time_unit)
        files.append(labelled_file(series, labels, cps, opts.train_rows, train))
    if ranges is not None:
        unknown = sorted(set(ranges) - {f.name for f in files})
        if unknown:
            from cli.main import UsageError

            raise UsageError(f"label ranges name files that are not inputs: {unknown[:5]}")
    return files, skipped


def resolve_features(args: argparse.Namespace, first: Path, settings: Settings) -> tuple[str, ...]:
    """--features, with 'all' read off the first file exactly as the other table commands do."""
    from pipeline.tables import read_table

    frame = read_table(first, sep=args.sep)
    ns = argparse.Namespace(features=args.features, time_col=args.time_col, asset_col=None,
                            label_col=args.label_col, ignore_cols=f"{args.ignore_cols},{args.changepoint_col}")
    return features_for(ns, frame, settings)


def data_time_reading(first: Path, args: argparse.Namespace) -> Any:
    """How the first input file's time column is read (its unit, its date format): the labels are read
    alike, so that a label file of a few ambiguous dates ("05/03/2020") follows its data."""
    from pipeline.tables import TimeReading, read_table, time_reading_of

    frame = read_table(first, sep=args.sep)
    if args.time_col not in frame:
        return TimeReading(args.time_unit)  # loading the files names the missing column
    return time_reading_of(frame[args.time_col], args.time_unit)


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.evaluation import EvaluationError, Plan, evaluate, plan_settings, series_from_frame
    from pipeline.fit import FitError
    from pipeline.logs import get_logger
    from pipeline.tables import TableError, read_table

    log = get_logger("plantwatch.evaluate")
    if args.fleet and (args.train_file or args.train_dir):
        raise UsageError("--fleet fits on the files' own first rows; it cannot be combined with --train-file/--train-dir")
    root, paths = discover(args.inputs, args.root)
    train_path = Path(os.path.abspath(args.train_file)) if args.train_file else None
    train_dir = Path(os.path.abspath(args.train_dir)) if args.train_dir else None
    if train_dir is not None and not train_dir.is_dir():
        raise UsageError(f"--train-dir {args.train_dir} is not a directory")
    paths = [p for p in paths if p != train_path and (train_dir is None or train_dir not in p.parents)]
    if not paths:
        raise UsageError("no input files left to score besides the training data")
    try:
        features = resolve_features(args, paths[0], settings)
        settings = with_features(settings, features)
        opts = LoadOptions(args.time_col, args.sep, args.label_col, args.changepoint_col,
                           0 if train_path or train_dir else args.train_rows, args.time_unit)
        ranges = read_label_ranges(args.labels, *data_time_reading(paths[0], args)[:2]) if args.labels else None
        files, skipped = load_files(paths, root, features, opts, ranges, train_dir)
        for name in skipped:
            log.warning("skipped: no label column", file=name, label_col=args.label_col)
        if not files:
            raise UsageError(f"no input file has labels: give --label-col (now {args.label_col!r}) or --labels")
        train = (series_from_frame(read_table(train_path, sep=args.sep), train_path.name, features, args.time_col,
                                   args.time_unit) if train_path else None)
        for s in [*(f.series for f in files), *(f.train for f in files if f.train is not None), *([train] if train else [])]:
            for note in s.notes:
                log.warning("timestamps", file=s.name, note=note)
        if not period_is_set(args):
            settings = with_data_period(settings, [f.series for f in files], log)
        plan: Plan = "train_file" if train_path else "paired" if train_dir else "fleet" if args.fleet else "per_file"
        settings = plan_settings(settings, plan)
        seeds = parse_seeds(args.seeds, settings.model.seed)
        result = evaluate(files, settings, plan, seeds=seeds, train=train, chunk_rows=args.chunk_rows,
                          nab_window_s=args.nab_window_s, progress=lambda p: log.info("fitted", **p))
    except (TableError, EvaluationError, FitError) as exc:
        raise UsageError(str(exc)) from None
    for name, r in result.report["runs"][0]["lstm"]["files"].items():
        if r["scored_share"] < 0.9:
            log.warning("few of the file's rows were scored: a step needs every feature (a sensor that stops "
                        "reporting stops its asset), so its figures say little", file=name,
                        scored_share=round(r["scored_share"], 3))
    report = {**result.report, "inputs": {"root": str(root), "skipped": skipped}, "settings": to_dict(settings)}
    print(format_report(report, per_file=args.per_file))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(json_safe(report), indent=1))
    if args.plots:
        write_plots(Path(args.plots), files, result, features)
    return 0


def period_is_set(args: argparse.Namespace) -> bool:
    """Whether the user chose grid.period_s: by --set, in the --config file or in the environment."""
    import tomllib

    from pipeline.settings import ENV_PREFIX, parse_assignments

    if "grid.period_s" in parse_assignments(list(getattr(args, "assignments", None) or [])):
        return True
    if f"{ENV_PREFIX}GRID__PERIOD_S" in os.environ:
        return True
    config = getattr(args, "config", None)
    if config:
        try:
            with open(config, "rb") as fh:
                return "period_s" in (tomllib.load(fh).get("grid") or {})
        except (OSError, tomllib.TOMLDecodeError):
            return False  # the settings loader has already reported a bad file
    return False


def with_data_period(settings: Settings, series: Sequence[Any], log: Any) -> Settings:
    """Settings whose grid period is the data's median spacing (logged when it changes)."""
    import dataclasses

    from pipeline.evaluation import data_period_s

    period = data_period_s(series)
    if period is None or period == settings.grid.period_s:
        return settings
    log.info("grid period taken from the data's spacing; set grid.period_s to choose another",
             period_s=period, default_s=settings.grid.period_s)
    return dataclasses.replace(settings, grid=dataclasses.replace(settings.grid, period_s=period))


def parse_seeds(text: str | None, default: int) -> list[int]:
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        from cli.main import UsageError

        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    return seeds or [default]


def json_safe(obj: Any) -> Any:
    """Non-finite floats become null so the file is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- terminal


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:6.2f}"


def _num(x: float | None, fmt: str = "5.3f") -> str:
    return "-" if x is None else format(x, fmt)


def _row(label: str, pooled: dict[str, Any]) -> str:
    w, t, ev = pooled["point"]["whole"], pooled["point"]["test"], pooled["event"]["whole"]
    nab = (pooled.get("nab") or {}).get("skab") or {}
    numenta = (pooled.get("nab_numenta") or {}).get("alert_starts") or {}
    cov = pooled.get("coverage") or {}
    return (f"{label:<16} {_num(w.get('f1'))} {_pct(w.get('far'))} {_pct(w.get('mar'))} | {_num(t.get('f1'))} "
            f"{_pct(t.get('far'))} {_pct(t.get('mar'))} | {_num(ev.get('precision'))} {_num(ev.get('recall'))} "
            f"{_num(ev.get('f1'))} | {_num(nab.get('standard'), '6.2f')} {_num(nab.get('low_fp'), '6.2f')} "
            f"{_num(nab.get('low_fn'), '6.2f')} | {_num(numenta.get('standard'), '7.2f')} | "
            f"{_pct(cov.get('max_normal_share'))} | {_num((pooled.get('delay') or {}).get('mean_s'), '6.1f')}")


def format_report(report: dict[str, Any], per_file: bool = False) -> str:
    """Pooled metrics per detector (LSTM as the mean over seeds, with its standard deviation)."""
    head = (f"{'detector':<16} {'F1':>5} {'FAR%':>6} {'MAR%':>6} | {'F1':>5} {'FAR%':>6} {'MAR%':>6} | "
            f"{'evP':>5} {'evR':>5} {'evF1':>5} | {'NAB':>6} {'lowFP':>6} {'lowFN':>6} | {'Numenta':>7} | "
            f"{'maxN%':>6} | {'delay':>6}")
    proto = report["protocol"]
    lines = [f"plan={proto['plan']} files={len(proto['files'])} seeds={proto['seeds']}  "
             "columns: whole file | test rows | events (whole) | NAB, SKAB's convention | Numenta's NAB "
             "(alert starts) | largest share of a file's normal rows under alert | mean delay s", head]
    mean, std = report["summary"]["mean"], report["summary"]["std"]
    n = len(proto["seeds"])
    lines.append(_row("lstm" if n == 1 else f"lstm (mean of {n})", mean["lstm"]))
    if n > 1:
        lines.append(_row("lstm (std)", std["lstm"]))
    for name, res in report["baselines"].items():
        lines.append(_row(name, res["pooled"]))
    for base in ("t2", "t2_q"):
        if f"{base}_equal_far" in mean:
            lines.append(_row(f"{base} @ lstm FAR", mean[f"{base}_equal_far"]))
    for name, res in report["baselines"].items():
        for file, why in (res.get("not_fitted") or {}).items():
            lines.append(f"note: {name} not fitted on {file}: {why}")
    if per_file:
        lines += ["", f"{'file':<24} {'rows':>6} {'lstm F1':>7} {'FAR%':>6} {'MAR%':>6} {'found':>5} "
                      f"{'longest%':>8} {'t2_q F1':>7} {'t2_q N%':>7}"]
        first, t2q = report["runs"][0]["lstm"]["files"], report["baselines"]["t2_q"]["files"]
        for name, r in first.items():
            w, ev, cov = r["point"]["whole"], r["event"]["whole"], r["coverage"]
            t = t2q[name]["point"]["whole"]
            # A file without anomalies (or without normal rows) has no F1 and MAR (or FAR): "-", not 0.
            anomalous, normal = w["tp"] + w["fn"] > 0, w["fp"] + w["tn"] > 0
            lines.append(f"{name:<24} {r['rows']:>6} {_num(w['f1'] if anomalous else None, '7.3f')} "
                         f"{_pct(w['far'] if normal else None):>6} {_pct(w['mar'] if anomalous else None):>6} "
                         f"{ev['tp']:>2}/{ev['tp'] + ev['fn']:<2} {_pct(cov['longest_share']):>8} "
                         f"{_num(t['f1'] if anomalous else None, '7.3f')} "
                         f"{_pct(t2q[name]['coverage']['normal_share'] if normal else None):>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, files: Sequence[Any], result: Any, features: Sequence[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        name = re.sub(r"[^\w.-]+", "__", f.name)
        plot_file(out_dir / f"{name}.png", f, features, result.first_run.traces[f.name])


def plot_file(path: Path, f: Any, features: Sequence[str], trace: Any) -> None:
    """Standardised features over forecast error, alert score and threshold; labels red, alerts orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from pipeline.quality_metrics import ranges_from_labels

    ts = f.series.ts_ms
    t = ts.astype("datetime64[ms]")
    base = f.series.values[: f.train_rows] if f.train_rows else f.series.values
    sd = np.nanstd(base, axis=0)
    z = (f.series.values - np.nanmean(base, axis=0)) / np.where(sd > 0, sd, 1.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(13, 6.5), height_ratios=[1.3, 1])
    for j, feat in enumerate(features):
        ax1.plot(t, np.clip(z[:, j], -12, 12), lw=0.6, label=feat)
    ax1.set_ylabel("standardised (clipped ±12)")
    ax1.legend(loc="upper left", fontsize=7, ncol=4, framealpha=0.7)
    for ax in (ax1, ax2):
        for s, e in ranges_from_labels(f.labels):
            ax.axvspan(t[s], t[e - 1], color="tab:red", alpha=0.12, lw=0)
        for s, e in trace.spans:
            ax.axvspan(np.datetime64(int(s), "ms"), np.datetime64(int(min(e, ts[-1])), "ms"),
                       ymin=0.0, ymax=0.06, color="tab:orange", alpha=0.9, lw=0)
        if f.train_rows:
            ax.axvline(t[f.train_rows], color="k", ls=":", lw=0.8)
    st = trace.step_ms.astype("datetime64[ms]")
    ax2.plot(st, trace.forecast_error, lw=0.5, color="0.6", label="forecast error")
    ax2.plot(st, trace.alert_score, lw=1.0, color="tab:blue", label="alert score")
    ax2.plot(st, trace.threshold, lw=1.0, ls="--", color="tab:red", label="threshold")
    ax2.set_yscale("log")
    ax2.set_ylabel("score")
    handles = ax2.get_legend_handles_labels()[0] + [Patch(color="tab:red", alpha=0.25, label="labelled anomaly"),
                                                   Patch(color="tab:orange", label="alert")]
    ax2.legend(handles=handles, loc="upper left", fontsize=7, ncol=5, framealpha=0.7)
    ax1.set_title(f"{f.name}  (dotted line: end of training rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
