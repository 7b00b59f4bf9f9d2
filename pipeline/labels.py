"""Labelled anomaly ranges, read from the formats labels are kept in, for evaluation and training.

One reader for ``plantwatch evaluate`` (which file rows are anomalous) and for training
(which archived readings to leave out), so both accept the same files:

* a table (CSV, Parquet, or a JSON list of records) with a name column (``file`` or
  ``asset``) and either times, ``start``/``end`` or ``start_ms``/``end_ms`` (epoch ms,
  datetimes or ISO-8601; both ends inclusive), or row indices, ``start_row``/``end_row``
  (0-based, both ends inclusive);
* Numenta's windows JSON (NAB's ``combined_windows.json``): an object mapping each data
  file's relative path to a list of ``[start, end]`` timestamp pairs, both ends inclusive.

Parsing works on bytes, so callers open local paths or object-store URIs themselves.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.tables import TableError, timestamps_ms

Unit = Literal["ms", "row"]
_NAME_COLS = ("file", "asset")
_TIME_COLS = (("start_ms", "end_ms"), ("start", "end"))
_ROW_COLS = ("start_row", "end_row")


class LabelError(ValueError):
    """A label file that cannot be read as ranges; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelRange:
    """One labelled range of one file or asset; ``start`` and ``end`` are both inclusive."""

    name: str
    start: int
    end: int
    unit: Unit  # "ms": epoch milliseconds; "row": 0-based row index of the named file


def parse_label_ranges(data: bytes, source: str, time_unit: str = "auto",
                       date_format: str | None = None) -> list[LabelRange]:
    """Ranges from the bytes of a label file; ``source`` (its path or URI) picks the format and names it in errors.
    Times are read as :func:`~pipeline.tables.parse_timestamps` reads them (``start_ms``/``end_ms`` in ms): pass
    the data's unit and date format (:func:`~pipeline.tables.time_reading_of`), as a few label dates rarely say
    whether the day or the month comes first."""
    lower = source.lower()
    try:
        if lower.endswith(".json"):
            obj = json.loads(data.decode("utf-8"))
            if isinstance(obj, dict):
                return _numenta_windows(obj, source, time_unit, date_format)
            frame = pd.DataFrame(obj)
        elif lower.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(io.BytesIO(data))
        else:
            text = data.decode("utf-8")
            head = text.split("\n", 1)[0]
            frame = pd.read_csv(io.StringIO(text), sep=";" if head.count(";") > head.count(",") else ",")
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise LabelError(f"labels {source}: not a readable label file: {exc}") from None
    return _table_ranges(frame, source, time_unit, date_format)


def _both_ends(starts: pd.Series, ends: pd.Series, time_unit: str,
               date_format: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends read as one column, interleaved (start, end, next start, …: in time order
    for ranges in order), so both are read alike: one date format, one unit."""
    both = pd.Series(np.column_stack([starts.to_numpy(object), ends.to_numpy(object)]).ravel())
    if pd.api.types.is_numeric_dtype(starts) and pd.api.types.is_numeric_dtype(ends):
        both = pd.to_numeric(both)
    ms = timestamps_ms(both, time_unit, date_format)
    return ms[0::2], ms[1::2]


def _table_ranges(frame: pd.DataFrame, source: str, time_unit: str, date_format: str | None) -> list[LabelRange]:
    name_col = next((c for c in _NAME_COLS if c in frame.columns), None)
    if name_col is None:
        raise LabelError(f"labels {source}: no column asset (or file); it has {list(frame.columns)}")
    names = frame[name_col].astype(str).tolist()
    cols = next((pair for pair in (*_TIME_COLS, _ROW_COLS) if set(pair) <= set(frame.columns)), None)
    if cols is None:
        raise LabelError(f"labels {source}: no column start_ms, end_ms (or start, end for times; start_row, end_row "
                         f"for row indices); it has {list(frame.columns)}")
    unit: Unit = "row" if cols == _ROW_COLS else "ms"
    try:
        if unit == "row":
            start, end = (pd.to_numeric(frame[c], errors="raise").to_numpy() for c in cols)
            if not (np.all(np.mod(start, 1) == 0) and np.all(np.mod(end, 1) == 0)) or np.any(start < 0):
                raise LabelError(f"labels {source}: start_row and end_row must be row indices (integers >= 0)")
        else:
            start, end = _both_ends(frame[cols[0]], frame[cols[1]], "ms" if cols == _TIME_COLS[0] else time_unit,
                                    date_format)
    except (TableError, ValueError, TypeError) as exc:
        if isinstance(exc, LabelError):
            raise
        raise LabelError(f"labels {source}: {exc}") from None
    return _checked(names, start, end, unit, source)


def _numenta_windows(obj: dict[str, Any], source: str, time_unit: str, date_format: str | None) -> list[LabelRange]:
    names, starts, ends = [], [], []
    for name, windows in obj.items():
        if not isinstance(windows, list) or not all(isinstance(w, (list, tuple)) and len(w) == 2 for w in windows):
            raise LabelError(f"labels {source}: {name!r} must map to a list of [start, end] pairs (Numenta's windows JSON)")
        for s, e in windows:
            names.append(str(name))
            starts.append(s)
            ends.append(e)
    if not names:
        return []
    try:
        start, end = _both_ends(pd.Series(starts), pd.Series(ends), time_unit, date_format)
    except TableError as exc:
        raise LabelError(f"labels {source}: {exc}") from None
    return _checked(names, start, end, "ms", source)


def _checked(names: Sequence[str], start: np.ndarray, end: np.ndarray, unit: Unit, source: str) -> list[LabelRange]:
    backwards = np.flatnonzero(np.asarray(end) < np.asarray(start))
    if len(backwards):
        raise LabelError(f"labels {source}: row {int(backwards[0])} ends before it starts")
    return [LabelRange(n, int(s), int(e), unit) for n, s, e in zip(names, start, end)]


def read_label_ranges(path: str, time_unit: str = "auto", date_format: str | None = None) -> list[LabelRange]:
    """Ranges from a local label file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise LabelError(f"cannot read the labels {path}: {exc.strerror or exc}") from None
    return parse_label_ranges(data, path, time_unit, date_format)


def ranges_by_name(ranges: Sequence[LabelRange]) -> dict[str, list[LabelRange]]:
    out: dict[str, list[LabelRange]] = {}
    for r in ranges:
        out.setdefault(r.name, []).append(r)
    return out


def row_labels(ts_ms: np.ndarray, ranges: Sequence[LabelRange]) -> np.ndarray:
    """0/1 flag per row: rows whose time (``ms`` ranges) or index (``row`` ranges) falls in a range.

    Times are compared row by row, so rows out of time order (a repeated hour) are labelled
    by their own stamp. A row range past the file's end is clipped.
    """
    n = len(ts_ms)
    flags = np.zeros(n, bool)
    for r in ranges:
        if r.unit == "row":
            flags[min(r.start, n): min(r.end + 1, n)] = True
        else:
            flags |= (ts_ms >= r.start) & (ts_ms <= r.end)
    return flags.astype(np.int8)
