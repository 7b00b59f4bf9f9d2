"""Readings from producers that compress their batches with any of Kafka's codecs (gzip, snappy,
lz4, zstd: what Java, librdkafka or Go clients are commonly configured with) are read like plain
ones, by the detector and by the archiver."""

from __future__ import annotations

import threading
from typing import Any

from consumers.detector import Detector
from consumers.kafka_clients import make_producer
from consumers.simulator_feed import feed
from pipeline.settings import Settings
from pipeline.simulate import PlantSimulator
from trainers.archive_scan import ScanStats

from .plant import PERIOD_MS, PLANT, detector_settings, running_detector, wait_until
from .test_archiver import PLANT as ARCHIVE_PLANT
from .test_archiver import (archive_settings, archived_rows, archiver_thread, assert_archived_once, committed_total,
                            expected_rows)

CODECS = ("gzip", "snappy", "lz4", "zstd")


def produce_compressed(s: Settings, sim: PlantSimulator, start_ms: int, steps_each: int) -> int:
    """Consecutive stretches of ``steps_each`` steps, each from a producer with its own codec."""
    total = 0
    for i, codec in enumerate(CODECS):
        producer = make_producer(s, compression_type=codec)
        try:
            begin = start_ms + i * steps_each * sim.config.period_ms
            total += feed(producer, s.topics.readings, sim, begin, begin + steps_each * sim.config.period_ms).records
        finally:
            producer.close()
    return total


def exit_code_when_it_stops(daemon: Any, timeout_s: float) -> int:
    """Run a daemon (``run() -> exit code``) that should stop by itself; its exit code."""
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", daemon.run()), daemon=True)
    thread.start()
    thread.join(timeout=timeout_s)
    assert not thread.is_alive(), f"{type(daemon).__name__} kept retrying batches it cannot decode"
    return result["code"]


def test_the_detector_scores_readings_compressed_with_every_codec(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    s = detector_settings(settings_for, broker)
    total = produce_compressed(s, PlantSimulator(PLANT), fitted_plant.stream_start_ms, 150)
    assert total == len(CODECS) * 150 * PLANT.n_assets
    with running_detector(s, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= total, 120, "every record to be read")
    assert det.stats.records == det.stats.accepted == total
    assert det.stats.rejects == {}
    # Every step closed but the last ones the allowed lateness still holds open, per asset.
    held_open = PLANT.n_assets * (int(s.grid.allowed_lateness_s * 1000) // PERIOD_MS + 1)
    assert total - held_open <= det.stats.steps <= total
    assert det.stats.scored == det.stats.steps - PLANT.n_assets * fitted_plant.bundle.warmup_steps


def test_the_archiver_archives_readings_compressed_with_every_codec(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive"})
    start = 1_767_225_600_000
    total = produce_compressed(s, PlantSimulator(ARCHIVE_PLANT), start, 100)
    with archiver_thread(s):
        wait_until(lambda: committed_total(s) == total, 60, "every offset committed")
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, start + len(CODECS) * 100 * 1000))
    assert stats.duplicates == 0


def test_a_codec_this_process_cannot_decode_stops_the_detector_with_a_clear_error(
        broker: Any, settings_for: Any, fitted_plant: Any, monkeypatch: Any, capsys: Any) -> None:
    import kafka.codec

    s = detector_settings(settings_for, broker)
    total = produce_compressed(s, PlantSimulator(PLANT), fitted_plant.stream_start_ms, 50)
    monkeypatch.setattr(kafka.codec, "zstd", None)  # as where the zstandard package is missing
    det = Detector(s, fitted_plant.bundle, stop=threading.Event())
    assert exit_code_when_it_stops(det, 120) == 1
    assert 0 < det.stats.records < total  # everything before the zstd batches was read
    logged = capsys.readouterr()  # console or JSON lines, on stdout or stderr, as logging is configured
    assert "compressed with a codec this process cannot decode" in logged.out + logged.err


def test_a_codec_this_process_cannot_decode_stops_the_archiver_with_exit_1(
        broker: Any, settings_for: Any, topic_prefix: str, monkeypatch: Any) -> None:
    import kafka.codec

    from consumers.archiver import Archiver

    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive"})
    total = produce_compressed(s, PlantSimulator(ARCHIVE_PLANT), 1_767_225_600_000, 50)
    monkeypatch.setattr(kafka.codec, "zstd", None)
    assert exit_code_when_it_stops(Archiver(s, stop=threading.Event()), 120) == 1
    assert committed_total(s) < total  # nothing after the undecodable batches counts as archived
