"""Reading a topic once from its beginning to its end, against a real broker."""

from __future__ import annotations

import time

import pytest

from consumers.kafka_clients import ReadTimeout, make_producer, read_to_end
from consumers.topics import ensure_topics
from pipeline.settings import Settings

PARTITIONS = 3
RECORDS = 300


def _produce(settings: Settings, topic: str, values: range) -> dict[int, list[int]]:
    """Send ``values`` round-robin over the partitions; offsets of each partition, in order."""
    producer = make_producer(settings)
    try:
        sent = [producer.send(topic, value=str(v).encode(), partition=v % PARTITIONS) for v in values]
        offsets: dict[int, list[int]] = {}
        for future in sent:
            md = future.get(timeout=30)
            offsets.setdefault(md.partition, []).append(md.offset)
        return offsets
    finally:
        producer.close()


def test_every_record_once_in_offset_order_per_partition(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: PARTITIONS})
    _produce(settings, topic, range(RECORDS))
    seen: list[tuple[int, int, int]] = []
    n = read_to_end(settings, topic, lambda r: seen.append((r.partition, r.offset, int(r.value))), timeout_s=60)
    assert n == len(seen) == RECORDS
    assert sorted(v for _, _, v in seen) == list(range(RECORDS))
    for p in range(PARTITIONS):
        offsets = [o for part, o, _ in seen if part == p]
        assert offsets == sorted(offsets) and len(offsets) == RECORDS // PARTITIONS


def test_explicit_ends_stop_there_and_leave_out_later_records(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: PARTITIONS})
    first = _produce(settings, topic, range(30))
    marker = {p: offsets[-1] for p, offsets in first.items()}  # the last record sent to each partition
    _produce(settings, topic, range(30, 60))  # after the "marker": not to be passed
    seen: list[int] = []
    read_to_end(settings, topic, lambda r: seen.append(int(r.value)), ends={p: o + 1 for p, o in marker.items()},
                timeout_s=60)
    assert sorted(seen) == list(range(30))


def test_an_empty_or_missing_topic_is_read_at_once(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: PARTITIONS})
    assert read_to_end(settings, topic, lambda r: pytest.fail("no record expected"), timeout_s=10) == 0
    assert read_to_end(settings, topic + ".none", lambda r: pytest.fail("no record expected"), timeout_s=10) == 0


def test_an_end_that_is_never_reached_raises_in_time(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: 1})
    _produce_one = make_producer(settings)
    _produce_one.send(topic, value=b"x", partition=0).get(timeout=30)
    _produce_one.close()
    started = time.monotonic()
    with pytest.raises(ReadTimeout, match="not read to its end: no record for 2 s"):
        read_to_end(settings, topic, lambda r: None, ends={0: 5}, timeout_s=2)
    assert time.monotonic() - started < 20


def test_a_read_that_keeps_advancing_goes_on_past_its_timeout(settings: Settings) -> None:
    """A state topic the broker has not compacted can take longer to read than any fixed bound:
    a restore that gave up there would start over, and give up again, for ever."""
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: 1})
    producer = make_producer(settings)
    for v in range(40):
        producer.send(topic, value=str(v).encode(), partition=0)
    producer.flush(timeout=30)
    producer.close()
    seen: list[int] = []

    def slow(record: object) -> None:
        time.sleep(0.1)
        seen.append(int(record.value))  # type: ignore[attr-defined]

    started = time.monotonic()
    read_to_end(settings, topic, slow, timeout_s=1, max_records=4)  # ten polls of 0.4 s each
    assert seen == list(range(40)) and time.monotonic() - started > 2


def test_records_arriving_during_the_read_do_not_extend_it(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: 1})
    producer = make_producer(settings)
    try:
        for v in range(20):
            producer.send(topic, value=str(v).encode(), partition=0)
        producer.flush(timeout=30)
        seen: list[int] = []

        def take(record: object) -> None:
            seen.append(int(record.value))  # type: ignore[attr-defined]
            if len(seen) == 1:  # while reading: 20 more, acknowledged before the read goes on
                for v in range(100, 120):
                    producer.send(topic, value=str(v).encode(), partition=0)
                producer.flush(timeout=30)

        read_to_end(settings, topic, take, timeout_s=60)
    finally:
        producer.close()
    assert seen == list(range(20))
