"""The guard against fetch responses that skip offsets, on record batches built here (no broker)."""

from __future__ import annotations

import collections
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import CompletedFetch, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c
from kafka.structs import OffsetAndMetadata

from consumers.fetch_holes import FetchHoleGuard, batch_at, first_hole, unparsable_batch

TP = TopicPartition("readings", 0)


def batch(base: int, n: int) -> bytes:
    """A record batch (format v2) of ``n`` records from offset ``base``, as a broker returns it."""
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(n):
        b.append(i, timestamp=0, key=None, value=b"v" * 10, headers=[])
    buf = b.build()
    struct.pack_into(">q", buf, 0, base)  # the broker assigns the base offset (outside the CRC)
    return bytes(buf)


def offsets(records: bytes) -> list[int]:
    mr, out = MemoryRecords(records), []
    while (b := mr.next_batch()) is not None:
        out += [r.offset for r in b]
    return out


def test_batches_that_cover_every_offset_from_the_one_asked_for_have_no_hole() -> None:
    response = batch(0, 5) + batch(5, 3) + batch(8, 1)
    assert offsets(response) == list(range(9))
    assert first_hole(response, 0) is None
    assert first_hole(batch(3, 5) + batch(8, 2), 5) is None  # asked for mid-batch
    assert first_hole(b"", 7) is None


def test_a_skipped_offset_is_found_between_batches_and_before_the_first() -> None:
    first = batch(0, 5)
    assert first_hole(first + batch(6, 2) + batch(8, 1), 0) == (len(first), 5)
    assert first_hole(batch(6, 2), 5) == (0, 5)
    assert offsets((first + batch(6, 2))[:len(first)]) == list(range(5))  # the cut keeps whole batches


def test_a_last_batch_cut_short_by_the_fetch_size_and_legacy_formats_are_not_holes() -> None:
    response = batch(0, 5) + batch(5, 40)
    assert first_hole(response[:-7], 0) is None
    legacy = bytearray(batch(9, 1))
    legacy[16] = 1  # the magic byte: a v1 message set is not checked
    assert first_hole(bytes(legacy), 0) is None


class FakeConsumer:
    def __init__(self) -> None:
        self.parsed: list[Any] = []
        self._fetcher = SimpleNamespace(_parse_fetched_data=self.parsed.append)


def fetch(at: int, records: bytes) -> CompletedFetch:
    return CompletedFetch(TP, at, 12, SimpleNamespace(error_code=0, records=records), None)


def test_a_response_with_a_hole_is_cut_there_until_the_hole_outlasts_the_patience() -> None:
    now = [100.0]
    consumer = FakeConsumer()
    guard = FetchHoleGuard(consumer, patience_s=2.0, clock=lambda: now[0])  # type: ignore[arg-type]
    parse = consumer._fetcher._parse_fetched_data
    head, tail = batch(0, 5), batch(6, 2)

    parse(fetch(0, head + tail))  # offset 5 is not readable yet: deliver 0-4, ask for 5 again
    assert offsets(consumer.parsed[-1].partition_data.records) == [0, 1, 2, 3, 4]
    parse(fetch(5, tail))
    assert consumer.parsed[-1].partition_data.records == b""
    parse(fetch(5, batch(5, 1) + tail))  # now it is
    assert offsets(consumer.parsed[-1].partition_data.records) == [5, 6, 7]
    assert (guard.cut, guard.accepted, guard.holes) == (2, 0, {})

    parse(fetch(8, batch(9, 1)))  # a hole that stays (a compacted topic): read on after the patience
    now[0] += 1.0
    parse(fetch(8, batch(9, 1)))
    assert consumer.parsed[-1].partition_data.records == b""
    now[0] += 1.5
    parse(fetch(8, batch(9, 1)))
    assert offsets(consumer.parsed[-1].partition_data.records) == [9]
    assert (guard.cut, guard.accepted, guard.holes) == (4, 1, {})


def test_error_responses_pass_through_untouched() -> None:
    consumer = FakeConsumer()
    FetchHoleGuard(consumer)  # type: ignore[arg-type]
    failed = CompletedFetch(TP, 5, 12, SimpleNamespace(error_code=1, records=batch(9, 1)), None)
    consumer._fetcher._parse_fetched_data(failed)
    assert consumer.parsed == [failed]


def test_the_batch_that_holds_an_offset_is_found_whole_in_a_response() -> None:
    first, second, third = batch(0, 5), batch(5, 3), batch(20, 2)
    response = first + second + third
    assert batch_at(response, 0) == (0, 5, first)
    assert batch_at(response, 6) == (5, 8, second)
    assert batch_at(memoryview(response), 21) == (20, 22, third)
    assert batch_at(response, 9) is None   # between batches
    assert batch_at(response, 22) is None
    assert batch_at(response[:-1], 20) is None  # the last batch cut short by the fetch size


def test_a_batch_whose_header_does_not_add_up_is_not_taken() -> None:
    """A batch that fails its CRC may have a damaged offset delta: it must not send a skip far ahead
    (past good records never dead-lettered) nor onto the batch after it."""
    first, second = bytearray(batch(0, 3)), batch(3, 2)
    huge = bytearray(first)
    struct.pack_into(">i", huge, 23, 1_000_000)  # last offset delta
    assert batch_at(bytes(huge) + second, 1) is None
    negative = bytearray(first)
    struct.pack_into(">i", negative, 23, -1)
    assert batch_at(bytes(negative) + second, 1) is None
    overlapping = bytearray(first)
    struct.pack_into(">i", overlapping, 23, 3)   # offsets 0-3, but the next batch starts at 3
    struct.pack_into(">i", overlapping, 57, 4)   # (its record count agreeing)
    assert batch_at(bytes(overlapping) + second, 1) is None
    assert batch_at(bytes(first) + second, 1) == (0, 3, bytes(first))


def poisoned_batch(base: int, n: int, bad: int) -> bytes:
    """``n`` records from ``base``, record ``bad`` with a header name that is not UTF-8 (CRC valid)."""
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(n):
        b.append(i, timestamp=0, key=None, value=b"v" * 10, headers=[("HK", b"1")] if i == bad else [])
    raw = bytearray(b.build())
    struct.pack_into(">q", raw, 0, base)
    i = raw.index(b"HK")
    raw[i:i + 2] = b"\xff\xfe"
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))
    return bytes(raw)


def test_a_batch_the_client_fails_on_is_found_and_dropped_so_the_next_poll_does_not_spin() -> None:
    response = batch(0, 3) + poisoned_batch(3, 3, 0) + batch(6, 2)

    class Subscriptions:
        assignment = {TP: SimpleNamespace(position=OffsetAndMetadata(3, "", -1), highwater=None)}

        def is_paused(self, tp: Any) -> bool:
            return False

        is_assigned = is_fetchable = lambda self, tp: True  # noqa: E731

    fetcher = Fetcher.__new__(Fetcher)
    fetcher.config, fetcher._sensors = {"max_poll_records": 10}, None
    fetcher._next_in_line_exception_metadata, fetcher._completed_fetches = None, collections.deque()
    fetcher._paused_completed_fetches, fetcher._paused_partition_records = {}, {}
    fetcher._subscriptions = Subscriptions()
    part = Fetcher.PartitionRecords(3, TP, MemoryRecords(response))
    part.raw_records = response
    fetcher._next_partition_records = part
    consumer = SimpleNamespace(_fetcher=fetcher)
    with pytest.raises(CorruptRecordError):
        fetcher.fetched_records(10)
    assert unparsable_batch(consumer) == (TP, 3, 6, poisoned_batch(3, 3, 0))

    appends = []
    append = fetcher._append

    def counted(*args: Any) -> int:
        appends.append(1)
        assert len(appends) < 1000, "kafka-python loops on the spent records"
        return append(*args)
    fetcher._append = counted
    assert fetcher.fetched_records(10) == ({}, False)  # from the same offset: returns at once
