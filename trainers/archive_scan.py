"""Reading the Parquet archive for training, as a stream of bounded :class:`DecodedBatch` es.

The archive (written by the archiver) is hive-partitioned by the UTC date of ``ts_ms``::

    <root>/date=YYYY-MM-DD/part-*.parquet

in long format, one row per (reading, feature) exactly as the decoder produced it:
``asset`` string, ``ts_ms`` int64, ``feature`` string, ``value`` float64, ``partition`` int32,
``offset`` int64 (the Kafka position of the source record), ``leader_epoch`` int32 (optional: the
record's partition leader epoch). Archives written by others
can be read too: ``columns_map`` renames the logical columns (``{"asset": "device_id",
"ts_ms": "event_time"}``; ``ts_ms`` may be integer milliseconds or an Arrow timestamp), and a
file without a ``feature`` column is read as *wide*, one column per feature. A root without
``date=`` directories is scanned whole.

Memory is bounded by ``batch_rows`` (times Parquet's read-ahead of a couple of batches and
one row group), never by the archive: only the date directories overlapping
``[start_ms, end_ms)`` are listed, row groups outside the time range are skipped from their
statistics, and the time and asset filters run inside the Parquet reader.

Order: dates ascending, files by path within a date, rows in file order. Each batch's
``record_index`` numbers readings across the whole scan (consecutive rows with the same
partition, offset and leader epoch, or else the same asset and time, are one reading), so batches can be
concatenated.

Deduplication: an archiver that crashes after writing a file but before committing its
Kafka offsets writes the same readings again in a later file. When ``partition`` and
``offset`` exist, a row is dropped if its offset lies within the offset range that an
earlier file of the same date directory covered for that Kafka partition. That is exact
because a file holds every archived reading of its offset range for that date (the archiver
writes everything it consumed, split by date), and it costs a few ranges per file, not a
set of keys. Duplicates inside one file (which the archiver does not produce: a partition's
offsets that go back start another file) are kept.
Without those columns nothing is deduplicated. Offsets are compared only between files of the
same topic: the archiver stamps each file with the readings topic's id (Parquet metadata
``plantwatch.topic_id``), and a topic deleted and created again (or a broker started afresh
on memory storage) numbers its records from 0 again under a new id, so its readings are new,
not duplicates. Files without the stamp (written before it, or from a broker that does not
report topic ids) count as one topic. Within a topic, ranges are kept per leader epoch: a log
truncated under its id (an unclean leader election) writes new records at offsets it had used, in a
later epoch, and those are kept. Rows without an epoch (files written before the column, clients
that give none: -1) match every epoch.

Confinement: on a local disk, a data file whose path leads out of the archive root through a
symbolic link is refused (:class:`ArchiveError`), not read.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.readings import DecodedBatch
from pipeline.tables import ARCHIVE_TOPIC_ID_KEY

LOGICAL_COLUMNS = ("asset", "ts_ms", "feature", "value", "partition", "offset", "leader_epoch", "date")
_FORMAT = ds.ParquetFileFormat()
_READ_AHEAD = 2  # batches decoded ahead of the consumer: part of the memory bound


class ArchiveError(ValueError):
    """The archive is missing, or a file lacks a required column or has an unusable type."""


@dataclass
class ScanStats:
    """What a scan read and dropped (pass one in to watch a scan as it goes)."""

    files: int = 0
    rows_read: int = 0        # rows inside the time range and asset filter
    rows: int = 0             # values emitted
    records: int = 0          # readings emitted
    duplicates: int = 0       # rows already read from an earlier file
    invalid: int = 0          # rows (wide: whole rows) with no usable value or asset
    unknown_features: dict[str, int] = field(default_factory=dict)  # rows skipped, by feature name


def scan_archive(uri: str, features: Sequence[str], *, start_ms: int, end_ms: int,
                 assets: Iterable[str] | None = None, columns_map: Mapping[str, str] | None = None,
                 batch_rows: int = 262144, stats: ScanStats | None = None) -> Iterator[DecodedBatch]:
    """Readings with ``start_ms <= ts_ms < end_ms`` (of ``assets`` only, if given), at most
    ``batch_rows`` values per batch; ``feature`` indexes into ``features``."""
    if end_ms < start_ms:
        raise ArchiveError(f"end_ms {end_ms} is before start_ms {start_ms}")
    if batch_rows < 1:
        raise ArchiveError("batch_rows must be >= 1")
    scan = _Scan(features, _columns(columns_map), None if assets is None else list(assets), start_ms, end_ms,
                 batch_rows, ScanStats() if stats is None else stats)
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ArchiveError(f"no archive at {uri}")
    for files in _file_groups(fs, root, scan.cols["date"], start_ms, end_ms):
        seen = _Coverage()
        for path in files:
            yield from scan.file(fs, path, seen)


def _columns(columns_map: Mapping[str, str] | None) -> dict[str, str]:
    cols = {name: name for name in LOGICAL_COLUMNS}
    for logical, physical in (columns_map or {}).items():
        if logical not in cols:
            raise ArchiveError(f"columns_map: unknown column {logical!r}; "
                               f"expected some of {', '.join(LOGICAL_COLUMNS)}")
        cols[logical] = physical
    return cols


# ---------------------------------------------------------------- files


def _utc_date(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def _file_groups(fs: pafs.FileSystem, root: str, key: str, start_ms: int, end_ms: int) -> list[list[str]]:
    """Data files per selected date directory (one group for an archive without them)."""
    if end_ms == start_ms:
        return []
    days: dict[date, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and name.startswith(f"{key}="):
            try:
                days[date.fromisoformat(name[len(key) + 1:])] = info.path
            except ValueError:
                continue
    if not days:
        return [_data_files(fs, root, root)]
    first, last = _utc_date(start_ms), _utc_date(end_ms - 1)
    return [_data_files(fs, root, path) for day, path in sorted(days.items()) if first <= day <= last]


def _data_files(fs: pafs.FileSystem, root: str, base: str) -> list[str]:
    """Files under ``base``, skipping hidden, ``_``-prefixed and temporary ones (writes in progress);
    a file leading out of ``root`` is refused."""
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        parts = info.path[len(base):].strip("/").split("/")
        if info.type == pafs.FileType.File and not info.path.endswith(".tmp") \
                and not any(p.startswith((".", "_")) for p in parts):
            try:
                out.append(storage.confined(fs, root, info.path))
            except storage.PathEscapeError as exc:
                raise ArchiveError(f"refused: {exc}") from None
    return sorted(out)


# ---------------------------------------------------------------- dedupe


def _named_errors(path: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches; a read that fails (a damaged page) raises :class:`ArchiveError` naming the file, so
    the operator knows which of thousands to look at."""
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArchiveError(f"{path}: reading it failed: {exc}") from None
        yield rb


def topic_id_of(schema: pa.Schema) -> str:
    """The topic id a file was stamped with, or "" if none."""
    return (schema.metadata or {}).get(ARCHIVE_TOPIC_ID_KEY, b"").decode("utf-8", "replace")


class _Coverage:
    """Merged offset ranges, per topic id, Kafka partition and leader epoch, of the files already read in
    one date directory. Epoch -1 (a file written before epochs were archived, or a client that gave
    none) is any epoch: such ranges cover every epoch's rows at those offsets, and such rows are covered
    by any epoch's ranges."""

    def __init__(self) -> None:
        self.ranges: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def contains(self, topic: str, partition: np.ndarray, epoch: np.ndarray, offset: np.ndarray) -> np.ndarray:
        inside = np.zeros(len(offset), bool)
        epochs: dict[int, list[int]] = {}  # partition → the epochs it has ranges of, in this topic
        for t, p, e in self.ranges:
            if t == topic:
                epochs.setdefault(p, []).append(e)
        if not epochs:
            return inside
        for (p, e), sel in _groups(partition, epoch):
            for covered in epochs.get(p, ()):
                if e < 0 or covered in (e, -1):
                    inside[sel] |= _within(*self.ranges[topic, p, covered], offset[sel])
        return inside

    def add(self, topic: str, spans: Mapping[tuple[int, int], tuple[int, int]]) -> None:
        for (p, e), span in spans.items():
            lo, hi = self.ranges.get((topic, p, e), (np.empty(0, np.int64), np.empty(0, np.int64)))
            merged: list[list[int]] = []
            for a, b in sorted([*zip(lo.tolist(), hi.tolist()), span]):
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            arr = np.array(merged, np.int64)
            self.ranges[topic, p, e] = (arr[:, 0], arr[:, 1])


def _within(lo: np.ndarray, hi: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Which offsets ``o`` lie in one of the sorted, disjoint ranges ``[lo, hi]``."""
    i = np.searchsorted(hi, o)  # the first range ending at or after o
    hit = i < len(hi)
    hit[hit] = lo[i[hit]] <= o[hit]
    return hit


def _groups(partition: np.ndarray, epoch: np.ndarray) -> list[tuple[tuple[int, int], np.ndarray]]:
    """The rows of each distinct (partition, leader epoch), found with one sort."""
    if not len(partition):
        return []
    key = partition * 2**32 + (epoch + 1)  # partitions and epochs below 2**31, epochs from -1 (_Scan._epochs)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    starts = np.flatnonzero(np.append(True, ordered[1:] != ordered[:-1]))
    ends = np.append(starts[1:], len(order))
    return [((int(k) >> 32, (int(k) & 0xFFFFFFFF) - 1), order[a:b])
            for k, a, b in zip(ordered[starts].tolist(), starts.tolist(), ends.tolist())]


def _spans(partition: np.ndarray, epoch: np.ndarray, offset: np.ndarray,
           into: dict[tuple[int, int], tuple[int, int]]) -> None:
    """Widen each (partition, leader epoch)'s (min, max) offset span of the current file by this batch."""
    for (p, e), sel in _groups(partition, epoch):
        o = offset[sel]
        lo, hi = into.get((p, e), (int(o.min()), int(o.max())))
        into[p, e] = (min(lo, int(o.min())), max(hi, int(o.max())))


# ---------------------------------------------------------------- columns


def _strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Codes (-1 for null) and the distinct names as str: one Python object per distinct value."""
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    codes = pc.fill_null(arr.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    names = arr.dictionary.cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
    return codes, names


def _floats(arr: pa.Array) -> np.ndarray:
    return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN


def _ints(arr: pa.Array) -> np.ndarray:
    """Integers, with -1 for null (never a Kafka partition or offset)."""
    return pc.fill_null(arr.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)


def _millis(arr: pa.Array) -> np.ndarray:
    if pa.types.is_timestamp(arr.type):
        arr = arr.cast(pa.timestamp("ms", arr.type.tz), safe=False)
    return arr.cast(pa.int64()).to_numpy(zero_copy_only=False)  # the time filter already dropped nulls


def _bound(ts_type: pa.DataType, ms: int) -> pa.Scalar:
    if pa.types.is_timestamp(ts_type):
        return pa.scalar(ms, pa.timestamp("ms", ts_type.tz))
    return pa.scalar(ms, pa.int64())


# ---------------------------------------------------------------- scan


@dataclass
class _Scan:
    features: Sequence[str]
    cols: dict[str, str]
    assets: list[str] | None
    start_ms: int
    end_ms: int
    batch_rows: int
    stats: ScanStats
    index: dict[str, int] = field(init=False)
    next_record: int = 0
    last_key: tuple[object, object] | None = None

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.features)}
        if len(self.index) != len(self.features) or not self.index:
            raise ArchiveError("features must be non-empty and distinct")

    def file(self, fs: pafs.FileSystem, path: str, seen: _Coverage) -> Iterator[DecodedBatch]:
        c = self.cols
        fragment = _FORMAT.make_fragment(path, filesystem=fs)
        try:
            schema = fragment.physical_schema
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArchiveError(f"{path} is not a readable Parquet file: {exc}") from None
        long = c["feature"] in schema.names
        wide = [f for f in self.features if f in schema.names]
        values = [c["feature"], c["value"]] if long else wide
        positions = [c["partition"], c["offset"]] if {c["partition"], c["offset"]} <= set(schema.names) else []
        if positions and c["leader_epoch"] in schema.names:
            positions.append(c["leader_epoch"])
        read = [c["asset"], c["ts_ms"], *values, *positions]
        missing = [name for name in read[:4 if long else 2] if name not in schema.names]
        if missing:
            raise ArchiveError(f"{path}: no column {', '.join(map(repr, missing))}; it has {schema.names}")
        size = self.batch_rows if long else max(1, self.batch_rows // max(1, len(wide)))
        spans: dict[tuple[int, int], tuple[int, int]] = {}
        topic = topic_id_of(schema)
        for rb in _named_errors(path, fragment.to_batches(columns=read, filter=self._filter(schema, path),
                                                          batch_size=size, batch_readahead=_READ_AHEAD)):
            self.stats.rows_read += rb.num_rows
            if positions:
                rb = self._dedupe(rb, seen, topic, spans)
            out = self._long(rb) if long else self._wide(rb, wide)
            if len(out):
                self.stats.rows += len(out)
                self.stats.records += out.n_records
                yield out
        seen.add(topic, spans)
        self.stats.files += 1

    def _filter(self, schema: pa.Schema, path: str) -> ds.Expression:
        ts_name, asset_name = self.cols["ts_ms"], self.cols["asset"]
        ts_type = schema.field(ts_name).type if ts_name in schema.names else pa.int64()
        if not (pa.types.is_integer(ts_type) or pa.types.is_timestamp(ts_type)):
            raise ArchiveError(f"{path}: {ts_name!r} must be integer milliseconds or a timestamp, not {ts_type}")
        ts = ds.field(ts_name)
        expr = (ts >= _bound(ts_type, self.start_ms)) & (ts < _bound(ts_type, self.end_ms))
        if self.assets is not None and asset_name in schema.names:
            asset_type = schema.field(asset_name).type
            value_type = asset_type.value_type if pa.types.is_dictionary(asset_type) else asset_type
            try:
                wanted = pa.array(self.assets, pa.string()).cast(value_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ArchiveError(f"{path}: asset names do not fit column {asset_name!r} ({asset_type}): "
                                   f"{exc}") from None
            expr &= ds.field(asset_name).isin(wanted)
        return expr

    def _dedupe(self, rb: pa.RecordBatch, seen: _Coverage, topic: str,
                spans: dict[tuple[int, int], tuple[int, int]]) -> pa.RecordBatch:
        partition, offset = _ints(rb.column(self.cols["partition"])), _ints(rb.column(self.cols["offset"]))
        epoch = self._epochs(rb)
        known = (partition >= 0) & (offset >= 0)
        dup = np.zeros(len(offset), bool)
        dup[known] = seen.contains(topic, partition[known], epoch[known], offset[known])
        if known.any():
            _spans(partition[known], epoch[known], offset[known], spans)
        if not dup.any():
            return rb
        self.stats.duplicates += int(dup.sum())
        return rb.filter(pa.array(~dup))

    def _epochs(self, rb: pa.RecordBatch) -> np.ndarray:
        """Each row's leader epoch, -1 (any) where the file has none or one Kafka cannot have
        (an archive written by others: epochs are int32, from 0)."""
        name = self.cols["leader_epoch"]
        if name not in rb.schema.names:
            return np.full(rb.num_rows, -1, np.int64)
        epoch = _ints(rb.column(name))
        return np.where((epoch >= 0) & (epoch < 2**31), epoch, -1)

    def _keys(self, rb: pa.RecordBatch, rows: np.ndarray, asset: np.ndarray,
              ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What identifies the selected rows' readings: their Kafka position if archived, else asset and time
        (also for the rows of a file that has the position columns but holds no position in them, e.g. a
        backfill: one key (-1, -1) made all of them one reading, every value under its first row's asset)."""
        c = self.cols
        if not {c["partition"], c["offset"]} <= set(rb.schema.names):
            return asset, ts
        partition, offset = _ints(rb.column(c["partition"]))[rows], _ints(rb.column(c["offset"]))[rows]
        unknown = (partition < 0) | (offset < 0)
        # Two records at one offset (a log truncated under its id) differ in epoch; partitions stay below 2**31.
        partition = partition + (self._epochs(rb)[rows] + 1) * 2**31
        if not unknown.any():
            return partition, offset
        first = partition.astype(object)  # an asset name never equals a partition number
        first[unknown] = asset[unknown]
        second = offset.copy()
        second[unknown] = ts[unknown]
        return first, second

    def _record_ids(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
        """Ids of readings, continuing across batches; returns the ids and the count of new readings."""
        new = np.ones(len(a), bool)
        new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        if len(a) and self.last_key == (a[0], b[0]):
            new[0] = False
        ids = self.next_record - 1 + np.cumsum(new)
        n_new = int(new.sum())
        self.next_record += n_new
        if len(a):
            self.last_key = (a[-1], b[-1])
        return ids, n_new

    def _long(self, rb: pa.RecordBatch) -> DecodedBatch:
        c = self.cols
        fcodes, fnames = _strings(rb.column(c["feature"]))
        lookup = np.array([self.index.get(n, -1) for n in fnames] + [-1], np.int64)
        feature = lookup[fcodes]  # code -1 (null) picks the trailing -1
        unknown = feature < 0
        for code, n in enumerate(np.bincount(fcodes[unknown & (fcodes >= 0)], minlength=len(fnames)).tolist()):
            if n:
                self.stats.unknown_features[fnames[code]] = self.stats.unknown_features.get(fnames[code], 0) + n
        acodes, anames = _strings(rb.column(c["asset"]))
        value = _floats(rb.column(c["value"]))
        usable = np.isfinite(value) & (acodes >= 0)
        self.stats.invalid += int((~unknown & ~usable).sum())
        ok = np.flatnonzero(~unknown & usable)
        asset, ts = anames[acodes[ok]], _millis(rb.column(c["ts_ms"]))[ok]
        ids, n_new = self._record_ids(*self._keys(rb, ok, asset, ts))
        return DecodedBatch(ids, asset, ts, feature[ok].astype(np.int32), value[ok], [], n_new)

    def _wide(self, rb: pa.RecordBatch, columns: list[str]) -> DecodedBatch:
        c = self.cols
        acodes, anames = _strings(rb.column(c["asset"]))
        values = np.column_stack([_floats(rb.column(name)) for name in columns]) if columns \
            else np.empty((rb.num_rows, 0))
        present = np.isfinite(values) & (acodes >= 0)[:, None]
        rows = np.flatnonzero(present.any(axis=1))
        self.stats.invalid += rb.num_rows - len(rows)
        asset, ts = anames[acodes[rows]], _millis(rb.column(c["ts_ms"]))[rows]
        ids, n_new = self._record_ids(*self._keys(rb, rows, asset, ts))
        row, col = np.nonzero(present[rows])
        to_index = np.array([self.index[name] for name in columns], np.int32)
        return DecodedBatch(ids[row], asset[row], ts[row], to_index[col], values[rows[row], col], [], n_new)
