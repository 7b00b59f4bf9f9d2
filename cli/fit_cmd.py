"""``plantwatch fit``: train a model bundle from a table of normal readings.

Unless ``grid.period_s`` is set (``--set``, config file or environment), the grid period is
the data's own spacing: the median spacing of each asset's readings (:mod:`pipeline.spacing`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cli.evaluate_cmd import period_is_set
from cli.tables_args import add_table_arguments, default_asset, features_for, load_table, time_reading, with_features
from pipeline.settings import Settings
from pipeline.spacing import PeriodChoice, choose_period, median_period_s, spacing_hint, stamps_by_asset, with_period


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_table_arguments(p)
    p.add_argument("--out", required=True, help="directory (or pyarrow filesystem URI) to write the bundle to")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.bundle import save_bundle
    from pipeline.fit import FitError, fit_bundle
    from pipeline.logs import get_logger
    from pipeline.tables import TableError, frame_to_batch

    log = get_logger("plantwatch.fit")
    check_out(args.out)  # before a fit that may take long, not after it
    frame = load_table(args)
    settings = with_features(settings, features_for(args, frame, settings))
    reading = time_reading(args, frame)  # on every row: the labelled ones may be what tells day from month
    if args.label_col:
        if args.label_col not in frame.columns:
            raise UsageError(f"no label column {args.label_col!r}")
        frame = frame[frame[args.label_col] != 1]
    try:
        batch = frame_to_batch(frame, settings.model.features, ts_col=args.time_col, asset_col=args.asset_col,
                               default_asset=default_asset(args), time_unit=reading.unit,
                               date_format=reading.date_format)
    except TableError as exc:
        raise UsageError(str(exc)) from None
    data_s = median_period_s(stamps_by_asset(batch.asset, batch.ts_ms))
    choice = choose_period(settings.grid.period_s, data_s, explicit=period_is_set(args))
    settings = with_period(settings, choice.period_s)
    log_period(log, choice)
    try:
        bundle, report = fit_bundle(batch, settings, progress=lambda p: log.info("epoch", **p),
                                    metadata={"source": str(args.data), "grid_period": choice.to_dict()})
    except FitError as exc:
        hint = spacing_hint(choice.period_s, data_s)
        raise UsageError(f"{exc}; {hint}" if hint else str(exc)) from None
    from trainers.report import report_files, warn_features

    warn_features(log, bundle)
    save_bundle(bundle, args.out, extra=report_files(bundle))  # loss curves beside the bundle
    log.info("bundle written", path=args.out, version=bundle.version, epochs=report.epochs,
             threshold=round(bundle.thresholds.threshold, 4))
    print(json.dumps({"version": bundle.version, "path": args.out, "epochs": report.epochs,
                      "validation_error": bundle.metadata["validation_error"],
                      "threshold": bundle.thresholds.threshold,
                      "period_s": bundle.period_ms / 1000, "period_from": choice.source}))
    return 0



def check_out(out: str) -> None:
    """A local ``--out`` must be a directory, or creatable as one (an object store URI is tried at
    the write)."""
    from cli.main import UsageError

    if "://" in out:
        return
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def log_period(log: Any, choice: PeriodChoice) -> None:
    """Which grid period the fit uses and why; a warning when it does not fit the data's spacing."""
    log.info("grid period", period_s=choice.period_s, source=choice.source, data_period_s=choice.data_period_s,
             reason=choice.reason)
    if choice.warning:
        log.warning(choice.warning)
