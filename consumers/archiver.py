"""The archiver: a consumer group of its own that writes every reading to the Parquet archive.

Layout (what :mod:`trainers.archive_scan` reads)::

    <archive.uri>/date=YYYY-MM-DD/part-<UTC write time>-<partition>-<first offset>.parquet
    <archive.uri>/.archiver-tmp/<group>/<run>-part-….parquet.tmp    files being written

long format, one row per (reading, feature): ``asset`` string, ``ts_ms`` int64, ``feature``
string, ``value`` float64, ``partition`` int32, ``offset`` int64, ``leader_epoch`` int32 (the
record's partition leader epoch, -1 where the client gives none), in Kafka order. The date
is the UTC date of ``ts_ms``. Nothing of a record enters a path (asset ids are column values
only), and every path written or swept is checked to stay inside the archive root: on a
local disk a symbolic link leading out of it (a date directory, ``.archiver-tmp``) makes the
write fail instead of being followed.

A flush writes, for each Kafka partition with buffered readings, one file per date holding
*every* reading of that partition consumed since the previous flush. That is what makes the
scan's dedupe exact: a file covers a contiguous offset range of one partition completely for
its date, so a later file's rows inside that range (of the same leader epoch) are duplicates.
File names start with the write time (kept strictly increasing within a process), so they sort
in write order and a rewrite after a crash lands in a later file; partition and first offset make
each name unique without coordination between archivers. Each file's Parquet metadata names the readings
topic's id (``plantwatch.topic_id``): a topic created again numbers its records from 0 again, and
the scan compares offsets only within one id.

Delivery (at-least-once, duplicates removed on read):

* A file is written in the hidden ``.archiver-tmp/<group>/`` directory (``<run>`` is random
  per process) and moved into place when complete (on an object store the move is a copy,
  still never a partial file under a visible name); on a local disk the file is fsynced
  before the move and its directories after. A kill can leave a temporary file behind: on
  start (its first assignment) and at every later assignment, the archiver deletes the
  temporary files that other runs of its group left for the partitions it was assigned.
  Those are leftovers: a partition has one owner at a time, and a revoked owner finishes its
  files before the partition moves on. (An owner evicted while still writing may lose its
  file or still move it into place; it commits nothing, so its readings are rewritten and
  the scan drops any duplicates.)
* Offsets are committed only after every file of the flush is in place. A crash between
  the move and the commit makes the next owner write those readings again, in a later
  file; the scan drops them.
* Partition revocation writes what is buffered for the revoked partitions and commits it
  from the rebalance hook, so the next owner starts where this one ended; a stop does the
  same for every partition.
* A write that fails (a full disk, an object store that is down or refuses) is not fatal: the
  archiver keeps what it buffered, commits nothing of it, pauses its partitions (it stays in
  the group, polling) and tries the flush again after a backoff (``storage.retry_backoff_s``
  doubled up to ``storage.retry_backoff_max_s``), until it succeeds or is stopped. Each
  failure is logged with its duration ("object store slow/failed, retrying"); meanwhile the
  archiver is alive but not ready (``waiting for storage``). Days of a partition already in
  place when a later day's file failed are not written again.

Records that do not decode are not archived, only counted and logged: the detector is
the one that dead-letters them.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import AuthorizationError, CorruptRecordError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge

from consumers import metrics
from consumers.fetch_holes import unparsable_batch
from consumers.health import Health
from consumers.http_server import serve
from consumers.kafka_clients import (Polled, cut_at_new_log, known_id, leader_epochs, logs_began_again, make_consumer,
                                     poll_arrays, record_clock, reread_moved_topic, resume, seek_to_committed,
                                     seek_to_committed_async, topic_id)
from pipeline import storage
from pipeline.grid import too_far_ahead
from pipeline.logs import get_logger
from pipeline.readings import DecodedBatch, DecodeLimits, Reject, decode_batch
from pipeline.settings import Settings
from pipeline.tables import ARCHIVE_TOPIC_ID_KEY

SCHEMA = pa.schema([("asset", pa.string()), ("ts_ms", pa.int64()), ("feature", pa.string()),
                    ("value", pa.float64()), ("partition", pa.int32()), ("offset", pa.int64()),
                    ("leader_epoch", pa.int32())])
# One row group per batch of the archive scan (its default batch_rows): time pruning skips
# whole batches, and a scan holds one row group in memory.
ROW_GROUP_ROWS = 262_144
DAY_MS = 86_400_000
POLL_TIMEOUT_MS = 500  # a stop or a due timed flush waits at most this long
TMP_DIR = ".archiver-tmp"  # under the archive root; the scan skips hidden paths
_TMP_NAME = re.compile(r"(?P<run>[0-9a-f]{8})-part-\d{8}T\d{12}Z-(?P<partition>\d{5,})-\d{19}\.parquet\.tmp")

RECORDS = Counter("plantwatch_archive_records_total", "Records read by the archiver")
REJECTS = Counter("plantwatch_archive_rejects_total", "Records not archived because they do not decode",
                  ["reason"])
FILES = Counter("plantwatch_archive_files_total", "Parquet files written to the archive")
BUFFERED = Gauge("plantwatch_archive_buffered_readings", "Readings consumed and not yet in an archive file")
LAG = Gauge("plantwatch_archive_lag", "Records behind the partition's high watermark", ["partition"])
WRITE_RETRIES = Counter("plantwatch_archive_write_retries_total",
                        "Flushes that failed on the store (full disk, object store error) and were retried")


class ArchiveWriteError(RuntimeError):
    """A file could not be written or moved into place: nothing of its flush is committed.
    ``retriable``: the store failed (an ``OSError``: full disk, object store down), as opposed
    to a path leaving the archive root or data pyarrow refuses."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass
class ArchiverStats:
    """What this archiver process did."""

    records: int = 0   # records consumed
    readings: int = 0  # readings in files moved into place
    rows: int = 0      # values in those files
    files: int = 0
    rejects: dict[str, int] = field(default_factory=dict)
    write_retries: int = 0  # flushes that failed on the store and were tried again


@dataclass
class Rows:
    """Long-format columns of one Kafka partition's readings, in offset order."""

    asset: np.ndarray    # object (str)
    ts_ms: np.ndarray    # int64
    feature: np.ndarray  # int32, index into the model features
    value: np.ndarray    # float64
    offset: np.ndarray   # int64
    # int32: the partition leader epoch of each row's record, -1 where the client did not say (None: all -1).
    # With the offset it names a record for good: a log truncated under its id (an unclean leader
    # election) writes new records at offsets it had used before, under a later epoch.
    leader_epoch: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.leader_epoch is None:
            self.leader_epoch = np.full(len(self.offset), -1, np.int32)

    @staticmethod
    def concat(chunks: Sequence[Rows]) -> Rows:
        if len(chunks) == 1:
            return chunks[0]
        return Rows(*(np.concatenate([getattr(c, name) for c in chunks])
                      for name in ("asset", "ts_ms", "feature", "value", "offset", "leader_epoch")))

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.asset[index], self.ts_ms[index], self.feature[index], self.value[index],
                    self.offset[index], self.leader_epoch[index])

    def table(self, partition: int, features: pa.Array) -> pa.Table:
        feature = pa.DictionaryArray.from_arrays(pa.array(self.feature, pa.int32()), features)
        return pa.Table.from_arrays([
            pa.array(self.asset, pa.string()), pa.array(self.ts_ms, pa.int64()), feature.cast(pa.string()),
            pa.array(self.value, pa.float64()), pa.array(np.full(len(self.value), partition, np.int32)),
            pa.array(self.offset, pa.int64()), pa.array(self.leader_epoch, pa.int32()),
        ], schema=SCHEMA)


class ArchiveWriter:
    """Writes one partition's flushed readings as one Parquet file per UTC date, atomically.

    Temporary files go to ``.archiver-tmp/<group>/`` (``group`` a consumer group id), named
    after this writer's random run id and the final name."""

    def __init__(self, uri: str, features: Sequence[str], *, group: str = "default") -> None:
        self.fs, self.root = storage.resolve(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.features = pa.array(list(features), pa.string())
        self.run = secrets.token_hex(4)
        self.tmp_dir = storage.join(self.root, TMP_DIR, re.sub(r"[^A-Za-z0-9_-]", "_", group) or "_")
        self._last_us = 0

    def write(self, partition: int, rows: Rows, *, done: set[int] | None = None, topic_id: str = "") -> list[str]:
        """The paths written, each complete and in place (and fsynced on a local disk).

        ``done``: days (since the epoch) already in place from an earlier try of the same rows,
        skipped; each day written is added to it, so a try that fails half-way is resumed.
        ``topic_id``: the readings topic's id, stamped on each file so the scan compares offsets
        only within one incarnation of the topic ("" when the broker does not report it)."""
        day = rows.ts_ms // DAY_MS
        days = np.unique(day)
        paths = []
        for d in days:
            if done is not None and int(d) in done:
                continue
            paths.append(self._write_file(_day_name(d), partition,
                                          rows if len(days) == 1 else rows.take(np.flatnonzero(day == d)), topic_id))
            if done is not None:
                done.add(int(d))
        # Local disk: the renames and new date directories persist, those of an earlier try of these
        # rows too (it failed before this step, and its offsets are committed once this returns).
        for directory in sorted({self._date_dir(_day_name(d)) for d in days} | {self.root}):
            storage.fsync(self.fs, directory)
        return paths

    def _date_dir(self, day: str) -> str:
        return self._inside(storage.join(self.root, storage.check_component(f"date={day}", "date directory")))

    def _write_file(self, day: str, partition: int, rows: Rows, topic_id: str) -> str:
        name = f"part-{self._stamp()}-{partition:05d}-{int(rows.offset[0]):019d}.parquet"
        final = self._inside(storage.join(self._date_dir(day), name))
        table = rows.table(partition, self.features)
        if topic_id:
            table = table.replace_schema_metadata({ARCHIVE_TOPIC_ID_KEY: topic_id.encode()})
        storage.write_atomic(self.fs, final, lambda tmp: pq.write_table(
            table, tmp, filesystem=self.fs, row_group_size=ROW_GROUP_ROWS, compression="zstd",
            use_dictionary=["asset", "feature", "partition"]),
            tmp=self._inside(storage.join(self.tmp_dir, f"{self.run}-{name}.tmp")), sync=self.local)
        return final

    def _inside(self, path: str) -> str:
        """``path``, or :class:`~pipeline.storage.PathEscapeError` if it would leave the archive root."""
        return storage.confined(self.fs, self.root, path)

    def sweep(self, partitions: Iterable[int]) -> list[str]:
        """Delete the temporary files of these partitions that other runs left; returns their paths."""
        if not storage.exists(self.fs, self._inside(self.tmp_dir)):  # never sweep a directory elsewhere
            return []
        wanted = set(partitions)
        swept = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.tmp_dir, recursive=False)):
            m = _TMP_NAME.fullmatch(posixpath.basename(info.path))
            if (info.type == pafs.FileType.File and m is not None and m["run"] != self.run
                    and int(m["partition"]) in wanted):
                self.fs.delete_file(info.path)
                swept.append(info.path)
        return swept

    def _stamp(self) -> str:
        """UTC write time in microseconds, strictly increasing even if the wall clock steps back."""
        us = max(time.time_ns() // 1000, self._last_us + 1)
        self._last_us = us
        return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y%m%dT%H%M%S") + f"{us % 1_000_000:06d}Z"


def _day_name(day: np.integer) -> str:
    """``YYYY-MM-DD`` of a day counted from the epoch."""
    return str(np.datetime64(int(day), "D"))


@dataclass
class _Pending:
    """A partition's records consumed since its last flush."""

    end: int  # next offset to consume: what is committed once the flush is durable
    chunks: list[tuple[str, Rows]] = field(default_factory=list)  # (the topic's id when polled, its rows)
    readings: int = 0
    records: int = 0
    # per run of chunks of one topic id: days in place from a failed try of this flush
    days_done: dict[int, set[int]] = field(default_factory=dict)
    start: int = -1  # offset of the first record consumed since the last flush (-1 at creation: ``end``)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.end

    def unwritten_from(self) -> int | None:
        """The first offset whose record is consumed but not written, None when none is."""
        return self.start if self.records else None

    def by_topic_id(self) -> list[tuple[str, Rows]]:
        """The chunks, each run polled under one topic id with offsets going forward concatenated: a
        topic deleted and created again while this process reads it numbers its records from 0
        again, and a log that began again under its id (read again from an earlier offset) rereads
        records, so each gets files of its own, which the scan compares with the earlier ones."""
        runs: list[tuple[str, list[Rows]]] = []
        for tid, chunk in self.chunks:
            if runs and runs[-1][0] == tid and chunk.offset[0] > runs[-1][1][-1].offset[-1]:
                runs[-1][1].append(chunk)
            else:
                runs.append((tid, [chunk]))
        return [(tid, Rows.concat(chunks)) for tid, chunks in runs]


class Archiver:
    """One archiver process (one member of the archive consumer group)."""

    def __init__(self, settings: Settings, *, stop: threading.Event | None = None,
                 health: Health | None = None) -> None:
        storage.configure(settings.storage)
        self.settings = settings
        self.stop = stop or threading.Event()
        self.health = health
        self.writer = ArchiveWriter(settings.archive.uri, settings.model.features, group=settings.archive.group_id)
        self.limits = DecodeLimits(max_record_bytes=settings.detector.max_record_bytes)
        self.log = get_logger("plantwatch.archiver").bind(group=settings.archive.group_id)
        self.pending: dict[TopicPartition, _Pending] = {}
        self.durable: dict[TopicPartition, int] = {}  # in files, not yet committed
        self.buffered_since: float | None = None
        self.consumer: KafkaConsumer | None = None
        self.last_loop = time.monotonic()
        self.assigned = False
        self.rewind: set[TopicPartition] = set()  # assigned, paused until sought to their committed offsets
        self.topic_ids: dict[int, str] = {}  # partition → the readings topic's id at its last poll
        self.rewind_at = 0.0                      # monotonic time of the next try
        self.rewind_failures = 0
        self.stats = ArchiverStats()
        self.write_failures = 0                # consecutive failed flushes
        self.retry_at: float | None = None     # monotonic time of the next try while the store fails
        self.failing_since: float | None = None
        if health is not None:
            health.follow(self)

    # ----------------------------------------------------------------- lifecycle
    def run(self, http_port: int = 0) -> int:
        """Archive until ``stop`` is set; returns the process exit code."""
        s = self.settings
        server = serve(http_port, alive=lambda: self.alive, ready=lambda: self.ready,
                       setting="--http-port") if http_port else None
        self.consumer = make_consumer(s, group_id=s.archive.group_id, never_compacted=True)
        self.consumer.subscribe([s.topics.readings], listener=_Listener(self))
        self.log.info("archiver started", topic=s.topics.readings, uri=s.archive.uri)
        code = 0
        try:
            while not self.stop.is_set():
                if self.rewind and time.monotonic() >= self.rewind_at:
                    self._rewind()
                try:
                    polled = self.consumer.poll(timeout_ms=self._poll_timeout_ms(),
                                                max_records=s.kafka.max_poll_records)
                except CorruptRecordError as exc:
                    if not self._pass_unparsable(exc):
                        raise
                    continue
                self.last_loop = time.monotonic()
                self.take(polled)
                if self.retry_at is not None:
                    self._pause_all()  # partitions assigned meanwhile wait too
                if self._due():
                    self._flush_or_wait()
                    self._commit()  # what is durable, even when another partition's file failed
            self.flush()
            self._commit()
        except (ArchiveWriteError, KafkaError) as exc:
            self.log.error("archiver failed; unwritten readings are left to the next owner", error=str(exc))
            self.pending.clear()
            code = 1
        finally:
            try:
                self.consumer.close(autocommit=False)  # revokes: the hook commits what is durable
            except KafkaError as exc:
                self.log.error("commit on close failed; the next owner rewrites from the last commit",
                               error=str(exc))
                code = code or 1
            if server is not None:
                server.shutdown()
                server.server_close()
        self.log.info("archiver stopped", exit_code=code, records=self.stats.records, files=self.stats.files)
        return code

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < 60

    @property
    def ready(self) -> bool:
        return self.assigned and self.retry_at is None and time.monotonic() - self.last_loop < 30

    def _poll_timeout_ms(self) -> int:
        if self.buffered_since is None:
            return POLL_TIMEOUT_MS
        due = self.retry_at if self.retry_at is not None else self.buffered_since + self.settings.archive.flush_seconds
        left = due - time.monotonic()
        return int(min(POLL_TIMEOUT_MS, max(0.0, left * 1000)))

    def _due(self) -> bool:
        a = self.settings.archive
        if self.buffered_since is None:
            return False
        if self.retry_at is not None:
            return time.monotonic() >= self.retry_at
        return (sum(p.readings for p in self.pending.values()) >= a.flush_rows
                or time.monotonic() - self.buffered_since >= a.flush_seconds)

    # ------------------------------------------------------ a failing store
    def _flush_or_wait(self) -> bool:
        """Flush; True if everything buffered is now in place. A store failure is logged and
        retried later (partitions paused meanwhile, nothing of it committed): False."""
        t0 = time.monotonic()
        try:
            self.flush()
        except ArchiveWriteError as exc:
            if not exc.retriable:
                raise
            self._store_failed(exc, time.monotonic() - t0)
            return False
        if self.retry_at is not None:
            self.log.info("archive writes succeed again; archiving resumed", attempts=self.write_failures + 1,
                          outage_s=round(time.monotonic() - (self.failing_since or t0), 3))
            self._store_recovered()
        return True

    def _store_failed(self, exc: ArchiveWriteError, seconds: float) -> None:
        now = time.monotonic()
        self.write_failures += 1
        self.stats.write_retries += 1
        WRITE_RETRIES.inc()
        if self.failing_since is None:
            self.failing_since = now
        delay = storage.backoff_s(self.write_failures)
        self.retry_at = now + delay
        storage.log_retry("archive write", self.settings.archive.uri, self.write_failures, seconds,
                          exc.__cause__ or exc, delay, buffered_readings=sum(p.readings for p in self.pending.values()),
                          failing_for_s=round(now - self.failing_since, 3))
        self._pause_all()
        if self.health is not None:
            self.health.waiting_for = "storage"

    def _store_recovered(self) -> None:
        self.write_failures = 0
        self.retry_at = self.failing_since = None
        if self.consumer is not None:
            paused = self.consumer.paused() - self.rewind  # those wait for their committed offsets
            if paused:
                resume(self.consumer, paused)
        if self.health is not None:
            self.health.waiting_for = None

    def _pause_all(self) -> None:
        """Stop fetching while the store fails (memory stays bounded); polls go on, so the member
        keeps its partitions."""
        if self.consumer is not None:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)

    # ------------------------------------------------------------------ one poll
    def take(self, polled: Polled) -> None:
        """One poll's records (empty polls too): partitions whose topic was created again are read
        again from their beginning, and what they buffered or wrote commits offset 0 of the new topic
        (:func:`~consumers.kafka_clients.reread_moved_topic`); the rest is buffered."""
        assert self.consumer is not None
        polled, moved = reread_moved_topic(self.consumer, polled, self.topic_ids,
                                           self._topic_id(self.settings.topics.readings), self.log)
        if polled:
            polled = self.add(polled)
            self._update_lag(polled)
        self._read_on_from({tp: 0 for tp in moved})

    def add(self, polled: Polled) -> Polled:
        """Decode a poll in one pass and buffer its readings per partition; returns what was buffered:
        a partition whose offsets drop within the poll (its log began again) only up to the drop, and
        the rest comes in the next poll (:func:`cut_at_new_log`)."""
        records, offsets, partitions = poll_arrays(polled)
        cut = None if self.consumer is None else cut_at_new_log(self.consumer, polled, offsets, partitions)
        if cut is not None:
            polled = cut[0]
            records, offsets, _ = poll_arrays(polled)
        self._began_again_before(polled)
        tps = sorted(polled)
        batch = decode_batch([r.value for r in records], self.settings.model.features,
                             fmt=self.settings.detector.input_format, limits=self.limits,
                             unknown_features="ignore")
        batch = self._without_future(batch, records)
        epochs = leader_epochs(records)
        # Records are grouped by partition and rows follow their records: each partition is one slice.
        record_bounds = np.cumsum([0] + [len(polled[tp]) for tp in tps])
        row_bounds = np.searchsorted(batch.record_index, record_bounds)
        readings_of = np.diff(np.searchsorted(np.unique(batch.record_index), record_bounds))
        for i, tp in enumerate(tps):
            pending = self.pending.setdefault(tp, _Pending(end=polled[tp][0].offset))
            pending.days_done.clear()  # new rows: a retry writes every day again (the scan drops duplicates)
            lo, hi = row_bounds[i], row_bounds[i + 1]
            if hi > lo:
                # The id now, not at the flush: by then the topic may be gone from the metadata, or created again.
                pending.chunks.append((self._stamp(tp), Rows(
                    batch.asset[lo:hi], batch.ts_ms[lo:hi], batch.feature[lo:hi], batch.value[lo:hi],
                    offsets[batch.record_index[lo:hi]], epochs[batch.record_index[lo:hi]])))
            pending.readings += int(readings_of[i])
            pending.records += len(polled[tp])
            pending.end = polled[tp][-1].offset + 1
        if self.buffered_since is None:
            self.buffered_since = time.monotonic()
        if cut is not None:  # after the old log's readings were stamped with its id
            self._began_again(cut[1])
            self._read_on_from(cut[1])
        self.stats.records += len(records)
        RECORDS.inc(len(records))
        BUFFERED.set(sum(p.readings for p in self.pending.values()))
        if batch.rejects:
            self._count_rejects(batch.rejects, records)
        return polled

    def _pass_unparsable(self, exc: CorruptRecordError) -> bool:
        """Read on after a record batch the client cannot parse (the detector dead-letters it whole;
        it stays in the readings topic too): its offsets commit as handled, after what is buffered
        below them is written. False when the batch cannot be told."""
        assert self.consumer is not None
        found = unparsable_batch(self.consumer)
        if found is None:
            return False
        tp, base, after, _ = found
        pending = self.pending.get(tp)
        if pending is not None and pending.records:
            pending.end = after
        else:  # nothing below it waits to be written
            self.durable[tp] = after
        self.consumer.seek(tp, after)
        REJECTS.labels("unparsable").inc()
        self.stats.rejects["unparsable"] = self.stats.rejects.get("unparsable", 0) + 1
        self.log.error("a record batch of the readings topic cannot be parsed: not archived, reading on after it",
                       partition=tp.partition, offsets=[base, after - 1], error=str(exc))
        return True

    def _began_again_before(self, polled: Polled) -> None:
        """Partitions whose poll starts below where their last one ended: their log began again
        between the polls (Kafka answers a position past a recreated or truncated log's end as out of
        range, and the client starts again from its earliest record). Their readings from here are
        the new log's (:meth:`_began_again`), and what is buffered commits this offset of the new log,
        not the old log's end."""
        restart = {tp: recs[0].offset for tp, recs in polled.items()
                   if tp in self.pending and recs and recs[0].offset < self.pending[tp].end}
        if not restart:
            return
        self.log.warning("readings log began again: its offsets went back between polls",
                         partitions={tp.partition: {"expected": self.pending[tp].end, "polled": offset}
                                     for tp, offset in sorted(restart.items())})
        self._began_again(restart)
        self._read_on_from(restart)

    def _began_again(self, tps: Iterable[TopicPartition]) -> None:
        """The logs of these partitions began again: their readings from here are stamped with the
        topic id of metadata refreshed now (a new id: the topic was created again; the same: its log
        was truncated, and the scan drops what is read again as duplicates). When no refresh
        completes in time (:func:`~consumers.kafka_clients.refreshed_topic_id`), with no id until
        the client's metadata names the new one (the old id would make the scan drop the new log's
        readings as the old log's)."""
        tps = list(tps)
        if tps and self.consumer is not None:
            logs_began_again(self.consumer, self.topic_ids, [tp.partition for tp in tps], tps[0].topic)

    def _without_future(self, batch: DecodedBatch, records: Sequence[Any]) -> DecodedBatch:
        """The batch without the records the detector sends to its dead-letter topic as ``future``
        (stamped further ahead of their record than ``grid.max_future_s``, judged alike on both
        sides: :func:`~consumers.kafka_clients.record_clock`). Archived, one such reading would drag
        its asset's watermark in training and drop the readings after it as late."""
        bound = record_clock(records, int(time.time() * 1000), self.limits.min_ts_ms)[batch.record_index]
        future = too_far_ahead(batch.ts_ms, bound, self.settings.grid.max_future_ms)
        if not future.any():
            return batch
        bad = np.unique(batch.record_index[future])
        rejects = [*batch.rejects, *(Reject(int(i), "future", "timestamp too far ahead of the time its record was "
                                               "written") for i in bad.tolist())]
        return batch.select(~np.isin(batch.record_index, bad), rejects=sorted(rejects, key=lambda r: r.index))

    def _update_lag(self, polled: Mapping[TopicPartition, Sequence[Any]]) -> None:
        assert self.consumer is not None
        for tp, recs in polled.items():
            hw = self.consumer.highwater(tp)  # from the last fetch: end_offsets() is off on some brokers
            if hw is not None:
                LAG.labels(str(tp.partition)).set(max(0, hw - (recs[-1].offset + 1)))

    def _count_rejects(self, rejects: Sequence[Reject], records: Sequence[Any]) -> None:
        by_reason: dict[str, int] = {}
        for r in rejects:
            by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
        for reason, n in by_reason.items():
            REJECTS.labels(reason).inc(n)
            self.stats.rejects[reason] = self.stats.rejects.get(reason, 0) + n
        first = records[rejects[0].index]
        self.log.warning("records not archived", rejects=by_reason, partition=first.partition,
                         offset=first.offset, reason=rejects[0].reason, detail=rejects[0].detail)

    # ------------------------------------------------------------ flush, commit
    def flush(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Write the buffered readings of these partitions (default: all) into the archive and
        mark their offsets durable."""
        chosen = list(self.pending) if tps is None else [tp for tp in tps if tp in self.pending]
        t0 = time.perf_counter()
        files = readings = rows = 0
        for tp in chosen:
            pending = self.pending[tp]
            if pending.records == 0:
                continue
            for run, (tid, data) in enumerate(pending.by_topic_id()):
                try:
                    with storage.timed("archive write", self.settings.archive.uri):
                        files += len(self.writer.write(tp.partition, data, topic_id=tid,
                                                       done=pending.days_done.setdefault(run, set())))
                except (OSError, pa.ArrowException, storage.PathEscapeError) as exc:
                    raise ArchiveWriteError(f"partition {tp.partition}: {exc}",
                                            retriable=isinstance(exc, OSError)) from exc
                rows += len(data.value)
            readings += pending.readings
            self.durable[tp] = pending.end
            self.pending[tp] = _Pending(end=pending.end)
        if not any(p.records for p in self.pending.values()):
            self.buffered_since = None
        BUFFERED.set(sum(p.readings for p in self.pending.values()))
        if files:
            self._count_written(files, readings, rows, time.perf_counter() - t0)

    def _read_on_from(self, restart_at: Mapping[TopicPartition, int]) -> None:
        """Partitions whose new log is read on from these offsets: what their buffered and written
        readings of the old log commit is that offset of the new one, not the old log's end, and a
        commit of the old log's end already made is moved back to it at the next commit (a kill or
        a rebalance before the new log's first flush would make the next owner start past it), or to
        the first record buffered and not yet written, if lower."""
        for tp, offset in restart_at.items():
            pending = self.pending.get(tp)
            unwritten = None if pending is None else pending.unwritten_from()
            if pending is not None:
                pending.end = offset
            # Not past what is buffered: a truncated log is read again from where it diverged, and the
            # old log's records buffered below that are still in Kafka, for the next owner to read.
            self.durable[tp] = offset if unwritten is None else min(offset, unwritten)

    def _stamp(self, tp: TopicPartition) -> str:
        """The topic id to stamp the partition's readings polled now with: "" while its log began again
        and the client's metadata still names the old topic (:func:`began_again`)."""
        if tp.partition in self.topic_ids:
            return known_id(self.topic_ids, tp.partition)
        return self._topic_id(tp.topic)

    def _topic_id(self, topic: str) -> str:
        return "" if self.consumer is None else topic_id(self.consumer, topic)

    def _count_written(self, files: int, readings: int, rows: int, seconds: float) -> None:
        st = self.stats
        st.files += files
        st.readings += readings
        st.rows += rows
        FILES.inc(files)
        metrics.ARCHIVED.inc(rows)
        self.log.info("archived", files=files, readings=readings, rows=rows, seconds=round(seconds, 3))

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        """Durable offsets not yet committed (of these partitions, default all)."""
        chosen = self.durable if tps is None else {tp: self.durable[tp] for tp in tps if tp in self.durable}
        return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in chosen.items()}

    def _commit(self) -> None:
        offsets = self.committable()
        if not offsets:
            return
        assert self.consumer is not None
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:  # e.g. a rebalance began: the revocation hook commits these
            self.log.warning("commit failed; retried with the next flush", error=str(exc))
            return
        for tp, om in offsets.items():
            if self.durable.get(tp) == om.offset:
                del self.durable[tp]

    # ------------------------------------------------------------ rebalancing
    def started(self, tps: Iterable[TopicPartition]) -> None:
        """Assigned partitions now start at their committed offsets: sweep, resume, report."""
        tps = set(tps)
        self.rewind -= tps
        tid = self._topic_id(self.settings.topics.readings)
        self.topic_ids.update({tp.partition: tid for tp in tps if tid})  # read from their commits under this id
        self.sweep(tps)
        held = self.consumer.paused() & tps if self.consumer is not None and self.retry_at is None else set()
        if held:  # paused for a rewind that a rebalance came before: kafka-python keeps a pause
            resume(self.consumer, held)  # type: ignore[arg-type]
        self.assigned = not self.rewind
        self.log.info("partitions assigned", partitions=sorted(tp.partition for tp in tps))

    def pause_for_rewind(self, tps: Iterable[TopicPartition], error: BaseException) -> None:
        """Their committed offsets could not be read: fetch nothing of them until they are
        (kafka-python keeps an assignment whose hook failed, fetching from wherever they were)."""
        assert self.consumer is not None
        tps = set(tps)
        self.rewind |= tps
        self.assigned = False
        self.consumer.pause(*tps)
        self.rewind_at = time.monotonic()
        self.log.warning("committed offsets of assigned partitions unknown; reading them once known",
                         partitions=sorted(tp.partition for tp in tps), error=str(error))

    def _rewind(self) -> None:
        """Seek the partitions paused for a rewind to their committed offsets (retried with a
        backoff while that fails, but for an authorisation refusal)."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        wanted = {tp for tp in self.rewind if tp in owned}
        self.rewind &= owned
        try:
            seek_to_committed(self.consumer, wanted, self.settings.kafka.request_timeout_ms)
        except AuthorizationError:
            raise  # a refusal no retry changes (a group this archiver is not authorised for): exit 1
        except KafkaError as exc:
            self.rewind_failures += 1
            delay = min(0.5 * 2 ** min(self.rewind_failures - 1, 5), 15.0)  # as the detector's broker backoff
            self.rewind_at = time.monotonic() + delay
            self.log.warning("committed offsets still unknown; trying again", error=str(exc), retry_in_s=delay)
            return
        self.rewind_failures = 0
        self.started(wanted)

    def sweep(self, tps: Iterable[TopicPartition]) -> None:
        """Delete what earlier runs left half written for partitions just assigned (harmless if
        it fails: the scan never reads temporary files)."""
        try:
            swept = self.writer.sweep(tp.partition for tp in tps)
        except (OSError, pa.ArrowException, storage.PathEscapeError) as exc:
            self.log.warning("could not sweep leftover temporary files", error=str(exc))
            return
        if swept:
            self.log.info("leftover temporary files deleted", files=len(swept), dir=self.writer.tmp_dir)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop all state of partitions this member no longer owns."""
        self.rewind -= tps
        for tp in tps:
            self.pending.pop(tp, None)
            self.durable.pop(tp, None)
            self.topic_ids.pop(tp.partition, None)
        if not any(p.records for p in self.pending.values()):
            self.buffered_since = None
            if self.retry_at is not None:  # nothing left to retry: fetch again, the next flush tells
                self._store_recovered()


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks. kafka-python runs them on the consumer's event loop, where blocking
    consumer calls are refused, so the commit awaits the coordinator's coroutine (pinned
    kafka-python version)."""

    def __init__(self, archiver: Archiver) -> None:
        self.archiver = archiver

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Write what is buffered for the revoked partitions and commit it, so the next owner
        starts where this member ended."""
        a = self.archiver
        a.assigned = False
        try:
            try:
                a.flush(revoked)
            except ArchiveWriteError as exc:  # not committed: the next owner rewrites them
                a.log.warning("could not write the revoked partitions' readings; the next owner rewrites them "
                              "from the last commit", error=str(exc))
            offsets = a.committable(revoked)
            if offsets:
                assert a.consumer is not None
                try:
                    await a.consumer._coordinator._commit_offsets_sync_async(offsets)
                    a.log.info("partitions handed over", partitions=sorted(tp.partition for tp in offsets))
                except KafkaError as exc:  # the next owner rewrites from the last commit; the scan dedupes
                    a.log.warning("commit on revocation failed", error=str(exc))
        finally:
            a.forget(revoked)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        """Evicted: the partitions already have a new owner, which rewrites what was buffered."""
        self.archiver.assigned = False
        self.archiver.forget(lost)
        self.archiver.log.warning("partitions lost", partitions=sorted(tp.partition for tp in lost))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Read from the committed offsets: what this member held before the rebalance and did not
        commit (a write that failed on the revocation, partitions lost) is read and written again."""
        assert self.archiver.consumer is not None
        try:
            await seek_to_committed_async(self.archiver.consumer, assigned)
        except Exception as exc:  # e.g. not authorised for the group: kafka-python keeps the assignment
            self.archiver.pause_for_rewind(assigned, exc)
            return
        self.archiver.started(assigned)
