"""``plantwatch fit``: train a model bundle from a table of normal readings."""

from __future__ import annotations

import argparse
import json

from cli.tables_args import add_table_arguments, default_asset, features_for, load_table, with_features
from pipeline.settings import Settings


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
    frame = load_table(args)
    settings = with_features(settings, features_for(args, frame, settings))
    if args.label_col:
        if args.label_col not in frame.columns:
            raise UsageError(f"no label column {args.label_col!r}")
        frame = frame[frame[args.label_col] != 1]
    try:
        batch = frame_to_batch(frame, settings.model.features, ts_col=args.time_col, asset_col=args.asset_col,
                               default_asset=default_asset(args))
        bundle, report = fit_bundle(batch, settings, metadata={"source": str(args.data)},
                                    progress=lambda p: log.info("epoch", **p))
    except (TableError, FitError) as exc:
        raise UsageError(str(exc)) from None
    from trainers.report import report_files

    save_bundle(bundle, args.out, extra=report_files(bundle))  # loss curves beside the bundle
    log.info("bundle written", path=args.out, version=bundle.version, epochs=report.epochs,
             threshold=round(bundle.thresholds.threshold, 4))
    print(json.dumps({"version": bundle.version, "path": args.out, "epochs": report.epochs,
                      "validation_error": bundle.metadata["validation_error"],
                      "threshold": bundle.thresholds.threshold}))
    return 0
