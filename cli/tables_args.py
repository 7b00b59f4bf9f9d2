"""Command-line options shared by the commands that read CSV/Parquet tables of readings."""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd

from cli.arg_types import positive_int
from pipeline.settings import Settings
from pipeline.tables import TIME_UNITS, TableError, TimeReading, read_table, time_reading_of


def add_time_unit_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-unit", default="auto", choices=TIME_UNITS,
                   help="unit of numeric timestamps (default: auto, the unit the column's name ends with, "
                        "e.g. ts_ms, else by magnitude: from 1e9 seconds, from 1e11 ms, then us, ns)")


def add_table_arguments(p: argparse.ArgumentParser, *, fitting: bool = True) -> None:
    """The table options; ``fitting``: also those that choose what is fitted (features, labels)."""
    p.add_argument("data", help="CSV or Parquet file of readings (one row per asset and time)")
    p.add_argument("--time-col", default="ts",
                   help="timestamp column: epoch numbers (see --time-unit) or dates (default: ts)")
    add_time_unit_argument(p)
    p.add_argument("--asset-col", default=None, help="asset id column (default: the whole file is one asset)")
    p.add_argument("--asset", default=None, help="asset id when there is no asset column (default: the file name)")
    p.add_argument("--sep", default=None, help="CSV separator (default: sniffed, ',' or ';')")
    if fitting:
        p.add_argument("--features", default=None,
                       help="comma-separated feature columns, or 'all' for every numeric column but time/asset/label "
                            "(default: model.features from the settings)")
        p.add_argument("--label-col", default=None, help="0/1 label column: rows labelled 1 are left out of fitting")
        p.add_argument("--ignore-cols", default="",
                       help="comma-separated columns that are never features (with --features all)")
    p.add_argument("--rows", type=positive_int, default=None, help="use only the first N rows")


def load_table(args: argparse.Namespace) -> pd.DataFrame:
    try:
        frame = read_table(args.data, sep=args.sep)
    except TableError as exc:
        from cli.main import UsageError

        raise UsageError(str(exc)) from None
    return frame.iloc[: args.rows] if args.rows else frame


def time_reading(args: argparse.Namespace, frame: pd.DataFrame) -> TimeReading:
    """How the table's time column is read, decided once on the whole table (a chunk of it, or its
    rows after a filter, may not tell day from month); a guess is logged."""
    if args.time_col not in frame.columns:
        return TimeReading(args.time_unit)  # the reader names the missing column
    reading = time_reading_of(frame[args.time_col], args.time_unit)
    if reading.note:
        from pipeline.logs import get_logger

        get_logger("plantwatch.cli").warning("timestamps", column=args.time_col, note=reading.note)
    return reading


def features_for(args: argparse.Namespace, frame: pd.DataFrame, settings: Settings) -> tuple[str, ...]:
    if args.features is None:
        return settings.model.features
    if args.features == "all":
        skip = {args.time_col, args.asset_col, args.label_col, *args.ignore_cols.split(",")}
        candidates = [c for c in frame.columns if c not in skip]
        text = [c for c in candidates if not pd.api.types.is_numeric_dtype(frame[c])]
        if text:  # a column with one stray word (or decimal commas) is text: say so rather than drop it unseen
            from pipeline.logs import get_logger

            get_logger("plantwatch.cli").warning(
                "columns that are not all numbers are not features (--ignore-cols to silence; a feature "
                "named with --features must hold numbers only)", columns=text)
        return tuple(c for c in candidates if c not in text)
    return tuple(f.strip() for f in args.features.split(",") if f.strip())


def with_features(settings: Settings, features: tuple[str, ...]) -> Settings:
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, features=features))


def default_asset(args: argparse.Namespace) -> str:
    from pathlib import Path

    return args.asset or Path(args.data).stem
