"""A failed partition assignment hook neither stops the detector nor skips a reading."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.errors import GroupAuthorizationFailedError

import consumers.detector as detector_module
from consumers.kafka_clients import make_producer
from pipeline.readings import encode_wide
from pipeline.simulate import PlantSimulator

from .plant import PERIOD_MS, PLANT, detector_settings, running_detector, wait_until


def test_committed_offsets_unknown_at_assignment_are_read_after_a_rewind_with_every_reading_scored(
        broker: Any, settings_for: Any, fitted_plant: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python keeps an assignment whose hook failed and raises the error from poll(): the
    partitions must still be restored and read from their commits, not fetched from anywhere."""
    settings = detector_settings(settings_for, broker)
    start = fitted_plant.stream_start_ms
    frame = PlantSimulator(PLANT).frame(start, start + 300 * PERIOD_MS)
    producer = make_producer(settings)
    for row in frame.itertuples(index=False):
        values = {f: float(getattr(row, f)) for f in PLANT.features}
        producer.send(settings.topics.readings, key=row.asset.encode(), value=encode_wide(row.asset, row.ts_ms, values))
    producer.flush()
    producer.close()

    real = detector_module.seek_to_committed_async
    failures = []

    async def failing_once(consumer: Any, partitions: Any) -> Any:
        if not failures:
            failures.append(sorted(tp.partition for tp in partitions))
            raise GroupAuthorizationFailedError("injected")
        return await real(consumer, partitions)

    monkeypatch.setattr(detector_module, "seek_to_committed_async", failing_once)
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.accepted >= len(frame), 120, "every reading to be placed")
        assert failures, "the injected failure never ran"
        assert det.stats.accepted == len(frame) and not det.stats.rejects
        assert det.ready
