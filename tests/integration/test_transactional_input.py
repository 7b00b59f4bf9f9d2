"""Readings written in transactions (an exactly-once pipeline upstream: Kafka Streams, Flink) are
read as committed: every reading of a committed transaction is scored, the transaction markers
are stepped over, and a reading of an aborted transaction is never scored (on a Kafka cluster;
the embedded broker delivers aborted records to every consumer)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kafka import KafkaProducer

from consumers.broker import LocalBroker
from consumers.kafka_clients import make_producer
from pipeline.readings import encode_wide
from pipeline.settings import Settings
from pipeline.simulate import PlantSimulator

from .plant import PERIOD_MS, PLANT, detector_settings, running_detector, wait_until

STEPS = 60  # per transaction


def transactional_producer(s: Settings) -> KafkaProducer:
    producer = make_producer(s, transactional_id=f"upstream-{uuid.uuid4().hex[:8]}")
    producer.init_transactions()
    return producer


def send_in_transaction(producer: KafkaProducer, s: Settings, start_ms: int, commit: bool) -> int:
    frame = PlantSimulator(PLANT).frame(start_ms, start_ms + STEPS * PERIOD_MS)
    producer.begin_transaction()
    for row in frame.itertuples(index=False):
        values = {f: float(getattr(row, f)) for f in PLANT.features}
        producer.send(s.topics.readings, key=row.asset.encode(), value=encode_wide(row.asset, row.ts_ms, values))
    if commit:
        producer.commit_transaction()
    else:
        producer.abort_transaction()
    return len(frame)


def test_readings_of_committed_transactions_are_all_scored(broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    s = detector_settings(settings_for, broker)
    producer = transactional_producer(s)
    total = sum(send_in_transaction(producer, s, fitted_plant.stream_start_ms + i * STEPS * PERIOD_MS, commit=True)
                for i in range(3))
    producer.close()
    with running_detector(s, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= total, 120, "every committed reading to be read")
    assert det.stats.records == det.stats.accepted == total
    assert det.stats.rejects == {}


def test_readings_of_an_aborted_transaction_are_never_scored(broker: Any, settings_for: Any,
                                                              fitted_plant: Any) -> None:
    if isinstance(broker, LocalBroker):
        pytest.skip("the embedded broker delivers some aborted records even to read_committed consumers (run with "
                    "PLANTWATCH_TEST_BOOTSTRAP pointing at a Kafka cluster)")
    s = detector_settings(settings_for, broker)
    producer = transactional_producer(s)
    start = fitted_plant.stream_start_ms
    committed = send_in_transaction(producer, s, start, commit=True)
    send_in_transaction(producer, s, start + STEPS * PERIOD_MS, commit=False)
    committed += send_in_transaction(producer, s, start + 2 * STEPS * PERIOD_MS, commit=True)
    producer.close()
    with running_detector(s, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= committed, 120, "every committed reading to be read")
    assert det.stats.records == det.stats.accepted == committed
