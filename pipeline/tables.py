"""Tables of readings (CSV/Parquet frames, archives) as the long-format batches the grid takes.

A wide table has one row per (asset, time) and one column per feature. Empty cells are
missing readings, not zeros: they simply contribute no value to their grid step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from pipeline.readings import DecodedBatch

# Parquet metadata of an archive file: the id of the readings topic its offsets belong to (written
# by the archiver, read by the archive scan's dedupe).
ARCHIVE_TOPIC_ID_KEY = b"plantwatch.topic_id"


class TableError(ValueError):
    """A table lacks a required column or holds unusable timestamps."""


# Epoch numbers are read by their magnitude: at or above each bound, that unit. Below 1e9 the
# numbers stay milliseconds (a row counter, or a time before 1970-01-12).
_EPOCH_UNITS = ((1e17, "ns"), (1e14, "us"), (1e11, "ms"), (1e9, "s"))
_MS_PER_UNIT = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
TIME_UNITS = ("auto", *_MS_PER_UNIT)
# A column named for its unit (``ts_ms``, ``time_s``) is read in that unit, whatever its magnitude.
_NAMED_UNIT = re.compile(r"(?:^|[_.\- ])(?P<unit>s|sec|secs|seconds|ms|millis|us|micros|ns|nanos)$", re.IGNORECASE)
_UNIT_NAMES = {"sec": "s", "secs": "s", "seconds": "s", "millis": "ms", "micros": "us", "nanos": "ns"}


def timestamps_ms(column: pd.Series, unit: str = "auto", date_format: str | None = None) -> np.ndarray:
    """Epoch milliseconds from a numeric column (see :func:`parse_timestamps` for its unit) or a
    datetime or date-string column; naive means UTC."""
    return parse_timestamps(column, unit, date_format)[0]


def parse_timestamps(column: pd.Series, unit: str = "auto",
                     date_format: str | None = None) -> tuple[np.ndarray, str | None]:
    """:func:`timestamps_ms` and, when the reading was a guess worth telling, how it was read.

    Numbers: in ``unit`` (s, ms, us, ns); with "auto", in the unit the column's name ends with
    (``ts_ms``, ``time_s``), else by magnitude: from 1e9 to 1e11 epoch seconds (as milliseconds
    they would all fall in January 1970), then milliseconds, microseconds, nanoseconds; below 1e9
    milliseconds. Strings are ISO-8601 if they all are; otherwise one format is inferred for the
    whole column, month first and day first ("03/04/2020"), and the reading whose times go back
    least often, then jump least, is kept (a tie is said to be ambiguous). ``date_format`` (from
    :func:`time_reading_of`): the strings are read in it when they all fit it, so the chunks of one
    file, and labels beside their data, are read alike."""
    if unit not in TIME_UNITS:
        raise TableError(f"time unit {unit!r}: one of {', '.join(TIME_UNITS)}")
    if _numeric(column):
        if column.isna().any():
            raise TableError("timestamp column has empty cells")
        raw = column.to_numpy(np.float64 if pd.api.types.is_float_dtype(column) else np.int64)
        unit, note = _numeric_unit(column, raw, unit)
        ms_per_unit = _MS_PER_UNIT[unit]
        if ms_per_unit == 1.0:
            return raw.astype(np.int64), note
        if ms_per_unit > 1:
            return np.round(raw * ms_per_unit).astype(np.int64), note
        return raw.astype(np.int64) // int(round(1 / ms_per_unit)), note
    ts, how, _ = _datetimes(column, date_format)
    if ts.isna().any():
        raise TableError("timestamp column has empty cells")
    return (ts.astype("datetime64[ms, UTC]").astype("int64")).to_numpy(np.int64), how


class TimeReading(NamedTuple):
    """How a time column is read (:func:`time_reading_of`)."""

    unit: str = "auto"              # numbers: s, ms, us or ns ("auto" for dates)
    date_format: str | None = None  # date strings: the one format they are read in (None for numbers)
    note: str | None = None         # how it was guessed, when that is worth telling


def time_reading_of(column: pd.Series, unit: str = "auto") -> TimeReading:
    """How :func:`parse_timestamps` reads the whole column. Decided once on a whole file, then passed
    to the reading of each of its chunks (a chunk within one day cannot tell day from month) and of
    its labels (a few dates rarely can)."""
    if unit not in TIME_UNITS:
        raise TableError(f"time unit {unit!r}: one of {', '.join(TIME_UNITS)}")
    if column.isna().any() or pd.api.types.is_datetime64_any_dtype(column):
        return TimeReading(unit)
    if _numeric(column):
        read_unit, note = _numeric_unit(column, column.to_numpy(np.float64), unit)
        return TimeReading(read_unit, None, note)
    try:
        _, how, fmt = _datetimes(column)
    except TableError:
        return TimeReading(unit)  # unparsable: reading it says so
    return TimeReading(unit, fmt, how)


def _numeric_unit(column: pd.Series, raw: np.ndarray, unit: str) -> tuple[str, str | None]:
    """The unit numbers are read in, and a note when it was guessed from their magnitude."""
    if unit != "auto":
        return unit, None
    unit, guessed = _unit_of(column, raw)
    if guessed and unit != "ms":
        return unit, (f"numeric timestamps read as epoch {_UNIT_WORDS[unit]} by their magnitude (--time-unit to "
                      "say otherwise)")
    return unit, None


def _numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _unit_of(column: pd.Series, raw: np.ndarray) -> tuple[str, bool]:
    """The unit the column's name ends with, else by magnitude (True: guessed)."""
    named = _NAMED_UNIT.search(str(column.name or ""))
    if named:
        return _UNIT_NAMES.get(named["unit"].lower(), named["unit"].lower()), False
    size = float(np.median(np.abs(raw))) if len(raw) else 0.0
    return next((u for bound, u in _EPOCH_UNITS if size >= bound), "ms"), True


def _datetimes(column: pd.Series, date_format: str | None = None) -> tuple[pd.Series, str | None, str | None]:
    """The times, how they were read when that was a guess, and the format read (None: datetimes)."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return pd.to_datetime(column, utc=True), None, None
    for fmt in (date_format, "ISO8601"):
        if fmt is not None:
            try:
                return pd.to_datetime(column, utc=True, format=fmt), None, fmt
            except (ValueError, TypeError):
                pass
    readings = []
    first = str(column.dropna().iloc[0]) if column.notna().any() else ""
    for dayfirst in (False, True):
        fmt = guess_datetime_format(first, dayfirst=dayfirst)
        if fmt is None:
            continue
        try:
            ts = pd.to_datetime(column, utc=True, format=fmt)  # one format for the whole column
        except (ValueError, TypeError):
            continue
        d = np.diff(ts.to_numpy("datetime64[ms]").astype(np.int64)) if len(ts) > 1 else np.zeros(1, np.int64)
        readings.append(((int(np.count_nonzero(d < 0)), int(d.max(initial=0))), dayfirst, ts, fmt))
    if len(readings) == 2 and readings[0][2].equals(readings[1][2]):
        return readings[0][2], None, readings[0][3]  # no value where the order matters
    if len(readings) == 2 and readings[0][0] == readings[1][0]:
        return (readings[0][2], "dates ambiguous (day and month both read them in time order): read month first",
                readings[0][3])
    if readings:
        _, dayfirst, ts, fmt = min(readings, key=lambda r: r[0])
        order = "day" if dayfirst else "month"
        why = "the other order reads them out of time order or with larger jumps" if len(readings) == 2 \
            else "the other order does not read them all"
        return ts, f"dates read {order} first ({why})", fmt
    try:
        return (pd.to_datetime(column, utc=True, format="mixed"), "timestamps of mixed formats, each read alone",
                "mixed")
    except (ValueError, TypeError) as exc:
        raise TableError(f"unparsable timestamps: {exc}") from None


def frame_to_batch(frame: pd.DataFrame, features: Sequence[str], *, ts_col: str, asset_col: str | None = None,
                   default_asset: str = "asset", time_unit: str = "auto",
                   date_format: str | None = None) -> DecodedBatch:
    """Long-format readings (one row per non-empty cell) from a wide frame (times read in ``time_unit``
    and ``date_format``, see :func:`parse_timestamps`)."""
    missing = [c for c in [ts_col, *features] if c not in frame.columns]
    if asset_col is not None and asset_col not in frame.columns:
        missing.append(asset_col)
    if missing:
        raise TableError(f"missing columns {missing}; the table has {list(frame.columns)}")
    n = len(frame)
    ts = timestamps_ms(frame[ts_col], time_unit, date_format)
    assets = (frame[asset_col].astype(str).to_numpy(object) if asset_col is not None
              else np.full(n, default_asset, dtype=object))
    values = frame[list(features)].to_numpy(np.float64)
    present = np.isfinite(values)
    rec, feat = np.nonzero(present)
    return DecodedBatch(record_index=rec.astype(np.int64), asset=assets[rec], ts_ms=ts[rec],
                        feature=feat.astype(np.int32), value=values[rec, feat], rejects=[], n_records=n)


def read_table(path: str | Path, *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV (separator sniffed unless given) or Parquet file."""
    p = Path(path)
    if not p.exists():
        raise TableError(f"file not found: {p}")
    if p.is_dir():
        raise TableError(f"{p} is a directory, not a CSV or Parquet file")
    try:
        if p.suffix.lower() in {".parquet", ".pq"}:
            return pd.read_parquet(p)
        if sep is None:
            with open(p, encoding="utf-8") as fh:
                head = fh.readline()
            sep = ";" if head.count(";") > head.count(",") else ","
        return pd.read_csv(p, sep=sep)
    except pd.errors.EmptyDataError:
        raise TableError(f"{p} is empty") from None
    except UnicodeDecodeError as exc:
        raise TableError(f"{p} is not UTF-8 text: {exc}") from None
    except OSError as exc:  # no permission, an I/O error
        raise TableError(f"cannot read {p}: {exc.strerror or exc}") from None
    except (ValueError, pd.errors.ParserError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TableError(f"{p} is not a readable {'Parquet' if p.suffix.lower() in {'.parquet', '.pq'} else 'CSV'} "
                         f"file: {exc}") from None
