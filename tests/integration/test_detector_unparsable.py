"""A record batch the Kafka client cannot parse (here: a header name that is not UTF-8, which
librdkafka's and Go's producers can send) goes to the DLQ whole, as its raw bytes, and the
detector reads on after it: it neither stalls nor drops the readings around it. The archiver
reads on after it too."""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition

from consumers.detector import Detector
from consumers.kafka_clients import make_consumer, make_producer
from pipeline.readings import encode_wide
from pipeline.simulate import PlantSimulator
from trainers.archive_scan import ScanStats

from .plant import PERIOD_MS, PLANT, detector_settings, produce, read_topic, running_detector, wait_until
from .test_archiver import PLANT as ARCHIVE_PLANT
from .test_archiver import archive_settings, archived_rows, archiver_thread, assert_archived_once, committed_total, \
    expected_rows

BAD_NAME = b"\xff\xfeX"


class RawName(str):
    """A header name kafka-python writes as these raw bytes (it encodes names with ``str.encode``)."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return BAD_NAME


def committed(settings: Any, tp: TopicPartition) -> int:
    consumer = make_consumer(settings, group_id=settings.detector.group_id)
    try:
        return consumer.committed(tp) or 0
    finally:
        consumer.close(autocommit=False)


def test_a_batch_the_client_cannot_parse_is_dead_lettered_whole_and_the_stream_goes_on(
        broker: Any, settings_for: Any, fitted_plant: Any, monkeypatch: Any) -> None:
    # One checkpoint (at the start), so a successor replays the batch after its dead letter was sent.
    settings = detector_settings(settings_for, broker, {"detector.checkpoint_interval_ms": "3600000"})
    start = fitted_plant.stream_start_ms
    frame = PlantSimulator(PLANT).frame(start, start + 200 * PERIOD_MS)
    producer = make_producer(settings)
    good, poisoned = 0, None
    poison_value = encode_wide("pump-000", start, {f: 1.0 for f in PLANT.features})
    for i, row in enumerate(frame.itertuples(index=False)):
        producer.send(settings.topics.readings, key=row.asset.encode(),
                      value=encode_wide(row.asset, row.ts_ms, {f: float(getattr(row, f)) for f in PLANT.features}))
        good += 1
        if i == len(frame) // 2:  # a batch of its own, between readings of the same partition
            producer.flush()
            poisoned = producer.send(settings.topics.readings, key=b"pump-000", value=poison_value,
                                     headers=[(RawName("trace"), b"1")]).get(timeout=10)
            producer.flush()
    producer.flush()
    producer.close()
    assert poisoned is not None

    with monkeypatch.context() as m:
        m.setattr(Detector, "_final_checkpoint", lambda self: None)  # stopped like a kill: nothing committed
        with running_detector(settings, fitted_plant.bundle) as det:
            wait_until(lambda: det.stats.accepted >= good, 120, "every readable record to be read")
            dlq = read_topic(settings, settings.topics.dlq_topic, until=lambda r: len(r) >= 1, timeout_s=30)
            assert (det.stats.records, det.stats.accepted) == (good, good)  # nothing around the batch was lost
    tp = TopicPartition(settings.topics.readings, poisoned.partition)
    assert committed(settings, tp) <= poisoned.offset  # the successor meets the batch again
    with running_detector(settings, fitted_plant.bundle) as successor:
        wait_until(lambda: poisoned.partition in successor.checkpoints.cursors
                   and successor.checkpoints.cursors[poisoned.partition].position > poisoned.offset, 120,
                   "the replay past the batch")
    assert read_topic(settings, settings.topics.dlq_topic) == dlq[:1]  # not sent twice
    assert len(dlq) == 1
    h = {k: v for k, v in dlq[0].headers}
    assert h["reason"] == b"unparsable"
    assert (int(h["source.partition"]), int(h["source.offset"])) == (poisoned.partition, poisoned.offset)
    assert BAD_NAME in dlq[0].value and poison_value in dlq[0].value  # the batch's own bytes, as written
    assert dlq[0].key is None


def test_a_member_whose_first_poll_meets_the_batch_passes_it(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    """The batch is the first record of its partition: the poll that assigns the partitions fails on
    it, before any state is restored (kafka-python then loops for ever on a poll from its offset)."""
    settings = detector_settings(settings_for, broker)
    start = fitted_plant.stream_start_ms
    producer = make_producer(settings)
    poisoned = producer.send(settings.topics.readings, key=b"pump-000", headers=[(RawName("trace"), b"1")],
                             value=encode_wide("pump-000", start, {f: 1.0 for f in PLANT.features})).get(timeout=10)
    producer.close()
    assert poisoned.offset == 0
    good = produce(settings, PlantSimulator(PLANT), start, start + 100 * PERIOD_MS)
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.accepted >= good, 60, "every readable record to be read")
    assert (det.stats.records, det.stats.accepted) == (good, good)
    dlq = read_topic(settings, settings.topics.dlq_topic)
    assert [{k: v for k, v in r.headers}["reason"] for r in dlq] == [b"unparsable"]


def test_the_archiver_reads_on_after_a_batch_the_client_cannot_parse(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive"})
    start = 1_767_225_600_000
    half = start + 50 * 1000
    sim = PlantSimulator(ARCHIVE_PLANT)
    good = produce(s, sim, start, half)
    producer = make_producer(s)  # a reading no simulated one is: archived, it would show as unexpected
    value = encode_wide("pump-000", half + 500, {f: 1.0 for f in ARCHIVE_PLANT.features})
    producer.send(s.topics.readings, key=b"pump-000", value=value, headers=[(RawName("trace"), b"1")]).get(timeout=10)
    producer.close()
    good += produce(s, sim, half, start + 100 * 1000)
    with archiver_thread(s) as archiver:
        wait_until(lambda: committed_total(s) == good + 1, 60, "every offset committed, the batch's too")
        assert archiver.stats.rejects == {"unparsable": 1}
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, start + 100 * 1000))
