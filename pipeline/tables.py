"""Tables of readings (CSV/Parquet frames, archives) as the long-format batches the grid takes.

A wide table has one row per (asset, time) and one column per feature. Empty cells are
missing readings, not zeros: they simply contribute no value to their grid step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.readings import DecodedBatch

# Parquet metadata of an archive file: the id of the readings topic its offsets belong to (written
# by the archiver, read by the archive scan's dedupe).
ARCHIVE_TOPIC_ID_KEY = b"plantwatch.topic_id"


class TableError(ValueError):
    """A table lacks a required column or holds unusable timestamps."""


def timestamps_ms(column: pd.Series) -> np.ndarray:
    """Epoch milliseconds from an integer (ms), datetime or ISO-string column; naive means UTC."""
    if pd.api.types.is_integer_dtype(column) or pd.api.types.is_float_dtype(column):
        if column.isna().any():
            raise TableError("timestamp column has empty cells")
        return column.to_numpy(np.int64)
    try:
        ts = pd.to_datetime(column, utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        raise TableError(f"unparsable timestamps: {exc}") from None
    if ts.isna().any():
        raise TableError("timestamp column has empty cells")
    return (ts.astype("datetime64[ms, UTC]").astype("int64")).to_numpy(np.int64)


def frame_to_batch(frame: pd.DataFrame, features: Sequence[str], *, ts_col: str, asset_col: str | None = None,
                   default_asset: str = "asset") -> DecodedBatch:
    """Long-format readings (one row per non-empty cell) from a wide frame."""
    missing = [c for c in [ts_col, *features] if c not in frame.columns]
    if asset_col is not None and asset_col not in frame.columns:
        missing.append(asset_col)
    if missing:
        raise TableError(f"missing columns {missing}; the table has {list(frame.columns)}")
    n = len(frame)
    ts = timestamps_ms(frame[ts_col])
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
    if p.suffix.lower() in {".parquet", ".pq"}:
        return pd.read_parquet(p)
    if sep is None:
        with open(p, encoding="utf-8") as fh:
            head = fh.readline()
        sep = ";" if head.count(";") > head.count(",") else ","
    return pd.read_csv(p, sep=sep)
