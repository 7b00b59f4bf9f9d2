"""``plantwatch replay``: score a table of readings offline and print the alert events."""

from __future__ import annotations

import argparse
import json
import sys

from cli.arg_types import positive_int
from cli.tables_args import add_table_arguments, default_asset, load_table, time_reading
from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_table_arguments(p, fitting=False)  # the model says which columns it reads
    p.add_argument("--model", required=True, help="bundle directory (or pyarrow filesystem URI)")
    p.add_argument("--chunk-rows", type=positive_int, default=5000, help="rows fed to the engine per call, like a poll")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.bundle import BundleError, load_bundle
    from pipeline.engine import DetectionEngine
    from pipeline.tables import TableError, frame_to_batch

    try:
        bundle = load_bundle(args.model)
    except BundleError as exc:
        raise UsageError(str(exc)) from None
    frame = load_table(args)
    missing = [c for c in (args.time_col, *bundle.features, *([args.asset_col] if args.asset_col else []))
               if c not in frame.columns]
    if missing:  # said before the chunks: a file of no rows has none to say it
        raise UsageError(f"missing columns {missing}; the table has {list(frame.columns)}")
    reading = time_reading(args, frame)  # one unit and one date format for every chunk
    engine = DetectionEngine(bundle, settings.grid)
    scored = alerts = 0
    for start in range(0, len(frame), args.chunk_rows):
        chunk = frame.iloc[start:start + args.chunk_rows]
        try:
            batch = frame_to_batch(chunk, bundle.features, ts_col=args.time_col, asset_col=args.asset_col,
                                   default_asset=default_asset(args), time_unit=reading.unit,
                                   date_format=reading.date_format)
        except TableError as exc:
            raise UsageError(str(exc)) from None
        for out in (engine.process(batch),):
            scored += len(out)
            alerts += _print(out.events)
    out = engine.flush()
    scored += len(out)
    alerts += _print(out.events)
    print(f"replay: rows={len(frame)} steps={scored} alert_events={alerts} model={bundle.version}", file=sys.stderr)
    return 0


def _print(events: list) -> int:  # type: ignore[type-arg]
    for e in events:
        print(json.dumps(e.to_dict()))
    return len(events)
