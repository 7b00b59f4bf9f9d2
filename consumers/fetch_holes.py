"""A guard against fetch responses that skip offsets the partition holds.

Offsets in a partition that is not compacted have no holes: a transaction's commit or abort
marker is a batch of its own, and records removed by retention are below the log start. A fetch
response therefore covers the offsets from the one asked for without a hole. The embedded broker
breaks this when producers on several connections append to one partition at once: a consumer at
the end of the partition can be handed the batches appended after a large one that is not yet
readable, and kafka-python then moves its position past the large one, which that consumer never
sees (a later read from the beginning has it). The guard cuts such a response at its first hole,
so the next fetch asks for the missing offset again. A hole still there after ``patience_s`` is
taken for a real one (a compacted topic) and logged.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import Counter

from pipeline.logs import get_logger

log = get_logger("plantwatch.fetch")
HOLES = Counter("plantwatch_fetch_holes_total", "Fetch responses of the readings topic that skipped offsets: "
                "cut and fetched again (outcome=refetched), or read on after the patience (outcome=accepted)",
                ["outcome"])

_HEADER = struct.Struct(">qiibIhi")  # base offset, batch length, leader epoch, magic, crc, attributes, last offset delta
_LENGTH_OVERHEAD = 12  # the base offset and the batch length precede what the length counts


def _batches(records: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(start, stop, base offset, last offset delta, magic) of each whole batch of a fetch response,
    in order; a last batch cut short by the fetch size is left out."""
    pos, end = 0, len(records)
    while end - pos >= _HEADER.size:
        base, length, _, magic, _, _, last_delta = _HEADER.unpack_from(records, pos)
        stop = pos + _LENGTH_OVERHEAD + length
        if length < 0 or stop > end:
            return
        yield pos, stop, base, last_delta, magic
        pos = stop


def first_hole(records: bytes | memoryview, fetch_offset: int) -> tuple[int, int] | None:
    """Where the batches of one partition's fetch response (record format v2) first skip an
    offset: (bytes before that batch, the first offset missing), or None without a hole.

    A batch that starts before ``fetch_offset`` (asked for mid-batch) is no hole, nor is a last
    batch cut short by the fetch size. Responses in the legacy formats are not checked.
    """
    expected = fetch_offset
    for pos, _, base, last_delta, magic in _batches(records):
        if magic < 2:
            return None
        if base > expected:
            return pos, expected
        expected = max(expected, base + last_delta + 1)
    return None


_RECORDS_COUNT = struct.Struct(">i")
_RECORDS_COUNT_AT = 57  # after the header above, two timestamps, the producer id, epoch and base sequence


def batch_at(records: bytes | memoryview, offset: int) -> tuple[int, int, bytes] | None:
    """The record batch (format v2) of a fetch response that holds ``offset``: its base offset, the
    offset after it, and its bytes. None unless the response holds it whole and its header is
    consistent (a batch that fails its CRC may have a damaged header: its offset delta must match
    its record count, as in a topic that is never compacted, and end before the next batch)."""
    for pos, stop, base, last_delta, magic in _batches(records):
        if magic < 2 or stop - pos < _RECORDS_COUNT_AT + _RECORDS_COUNT.size:
            return None
        if base <= offset <= base + last_delta:
            (count,) = _RECORDS_COUNT.unpack_from(records, pos + _RECORDS_COUNT_AT)
            after = base + last_delta + 1
            overlaps = len(records) - stop >= 8 and struct.unpack_from(">q", records, stop)[0] < after
            if count != last_delta + 1 or overlaps:
                return None
            return base, after, bytes(records[pos:stop])
    return None


class FetchHoleGuard:
    """Wraps a consumer's parsing of fetch responses (pinned kafka-python internals): a response
    with a hole is cut there until the hole has lasted ``patience_s``. The parsed records keep the
    raw bytes they come from (``raw_records``, as long as kafka-python keeps them), so a batch the
    client fails to parse can be dead-lettered whole (:func:`unparsable_batch`)."""

    def __init__(self, consumer: KafkaConsumer, patience_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.patience_s = patience_s
        self.clock = clock
        self.holes: dict[TopicPartition, tuple[int, float]] = {}  # partition → (missing offset, first seen)
        self.cut = 0       # responses cut at a hole
        self.accepted = 0  # holes taken for real after the patience
        fetcher = consumer._fetcher
        self._parse = fetcher._parse_fetched_data
        fetcher._parse_fetched_data = self._parse_guarded

    def _parse_guarded(self, completed: Any) -> Any:
        data = completed.partition_data  # mutable in the pinned kafka-python
        if data.error_code == 0 and data.records:
            hole = first_hole(data.records, completed.fetched_offset)
            tp = completed.topic_partition
            if hole is None:
                self.holes.pop(tp, None)
            elif self._wait(tp, hole[1], hole[0] == 0):
                data.records = data.records[:hole[0]]
        parsed = self._parse(completed)
        if parsed is not None and data.error_code == 0:
            parsed.raw_records = data.records
        return parsed

    def _wait(self, tp: TopicPartition, missing: int, at_start: bool) -> bool:
        """Whether to cut the response at this hole (else it is taken as real)."""
        now = self.clock()
        seen = self.holes.get(tp)
        if seen is None or seen[0] != missing:
            self.holes[tp] = (missing, now)
        elif at_start and now - seen[1] >= self.patience_s:
            del self.holes[tp]
            self.accepted += 1
            HOLES.labels("accepted").inc()
            log.warning("offsets missing from a partition that is not being compacted as expected; reading on",
                        topic=tp.topic, partition=tp.partition, first_missing=missing,
                        waited_s=round(now - seen[1], 2))
            return False
        self.cut += 1
        HOLES.labels("refetched").inc()
        return True



def _drop_failed(fetcher: Any) -> None:
    """Forget the records kafka-python failed to parse. The pinned kafka-python leaves them in
    line, spent but not drained: a poll from the offset they stopped at loops over them for ever
    (a seek elsewhere drains them)."""
    failing = fetcher._next_partition_records
    if failing is not None:
        failing.drain()
        fetcher._next_partition_records = None


def unparsable_batch(consumer: KafkaConsumer) -> tuple[TopicPartition, int, int, bytes] | None:
    """After ``poll`` raised ``CorruptRecordError``: the partition whose records kafka-python failed
    to parse, and the whole record batch that failed (base offset, the offset after it, its bytes).
    kafka-python parses a batch's records in turn and cannot go on inside it after one that fails
    (a seek inside it parses the batch from its start again): only past it reads on.
    The failed records are dropped either way (see :func:`_drop_failed`). None when the consumer
    has no :class:`FetchHoleGuard` or the batch cannot be told apart."""
    failing = consumer._fetcher._next_partition_records  # the records being taken when the parse failed
    records = getattr(failing, "raw_records", None)
    found = None if records is None else batch_at(records, failing.next_fetch_offset)
    _drop_failed(consumer._fetcher)
    return None if found is None else (failing.topic_partition, *found)
