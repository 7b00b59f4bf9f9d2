"""Faults injected into a live stream on real broker processes; each run is compared with an
uninterrupted reference of the same seeded input and written to ``tests/faults-report.json``.

Run alone with ``pytest -m faults``; ``make test-fast`` skips them.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import KafkaError

from consumers.broker import LocalBroker, free_port
from consumers.detector import Detector, Fenced
from pipeline import registry

from . import faults
from .s3_emulator import MotoS3
from .plant import detector_settings, read_topic, running, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(420)]

STEPS = 1500  # per asset: 7,500 readings
RATE = 300.0  # readings per second: a 25 s live stream


def _ref(fitted_plant: Any, settings: Any, steps: int = STEPS) -> faults.Reference:
    return faults.reference(fitted_plant.bundle, settings, fitted_plant.stream_start_ms, steps)


def _finish(name: str, settings: Any, ref: faults.Reference, stream: faults.Stream, fault_at: float | None,
            *procs: Any) -> dict[str, Any]:
    stream.join(120)
    scores = faults.wait_for_scores(settings, ref, 150)
    for p in procs:
        assert faults.stop(p) == 0, f"detector exited with {p.returncode}"
    row = faults.compare(settings, ref, stream.sent, scores, fault_at)
    faults.record(name, row)
    print(name, json.dumps(row))
    return row


def _stream_through(det: Detector, stop: threading.Event, settings: Any, ref: faults.Reference,
                    injected: Callable[[], bool], what: str, name: str,
                    while_running: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """A live stream through an in-process detector that injects its own fault (``injected`` is true
    once it has); the run compared with the reference and recorded as ``name``. ``while_running``
    checks the detector once every score is in, before it stops."""
    with running(det, stop):
        stream = faults.Stream(settings, ref, RATE).start()
        wait_until(injected, 90, what)
        fault_at = time.time()
        stream.join(120)
        scores = faults.wait_for_scores(settings, ref, 150)
        while_running()
    row = faults.compare(settings, ref, stream.sent, scores, fault_at)
    faults.record(name, row)
    return row


def test_detector_kill_9_during_a_live_stream(broker: Any, settings_for: Any, fitted_plant: Any,
                                               ) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    ref = _ref(fitted_plant, settings)
    first = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("detector_kill_9", "a"))
    faults.wait_ready(first)
    stream = faults.Stream(settings, ref, RATE).start()
    wait_until(lambda: stream.sent > len(ref.records) // 3, 60, "a third of the stream")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    fault_at = time.time()
    second = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("detector_kill_9", "b"))
    faults.assert_exact(_finish("detector_kill_9", settings, ref, stream, fault_at, second))


def test_sigterm_of_one_of_two_members_while_readings_flow(broker: Any, settings_for: Any, fitted_plant: Any,
                                                           ) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    ref = _ref(fitted_plant, settings)
    a = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("member_sigterm", "a"))
    b = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("member_sigterm", "b"))
    faults.wait_ready(a, b)
    stream = faults.Stream(settings, ref, RATE).start()
    wait_until(lambda: stream.sent > len(ref.records) // 3, 60, "a third of the stream")
    fault_at = time.time()
    assert faults.stop(a) == 0
    row = _finish("member_sigterm", settings, ref, stream, fault_at, b)
    row["stop_s"] = round(time.time() - fault_at, 2)
    faults.assert_exact(row)
    assert row["duplicate_alert_events"] == 0 and row["duplicate_scores"] == 0, row


def test_member_stopped_for_20_s_then_resumed(broker: Any, settings_for: Any, fitted_plant: Any,
                                              ) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    ref = _ref(fitted_plant, settings, steps=2400)  # 40 s: the stall sits inside the stream
    a = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("member_stopped_20s", "a"))
    b = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("member_stopped_20s", "b"))
    faults.wait_ready(a, b)
    stream = faults.Stream(settings, ref, RATE).start()
    wait_until(lambda: stream.sent > len(ref.records) // 5, 60, "a fifth of the stream")
    fault_at = time.time()
    a.send_signal(signal.SIGSTOP)
    time.sleep(20)
    a.send_signal(signal.SIGCONT)
    faults.assert_exact(_finish("member_stopped_20s", settings, ref, stream, fault_at, a, b))


class _SlowOnce(Detector):
    """A detector whose one poll takes longer than ``max_poll_interval_ms`` (a slow model, a GC pause)."""

    stall_s = 12.0

    def process(self, polled: Any) -> None:
        if self.stats.records > 1500 and self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0.0
        super().process(polled)


def test_a_poll_past_max_poll_interval_rejoins_without_exiting_or_re_emitting(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker, {"kafka.max_poll_interval_ms": "7000"}, scores=True)
    ref = _ref(fitted_plant, settings)
    stop = threading.Event()
    det = _SlowOnce(settings, fitted_plant.bundle, stop=stop)
    row = _stream_through(det, stop, settings, ref, lambda: det.stall_s == 0, "the slow poll",
                          "poll_past_max_poll_interval")
    faults.assert_exact(row)
    assert row["duplicate_alert_events"] == 0 and row["duplicate_scores"] == 0, row


class _RebalanceBeforeRewind(Detector):
    """A detector fenced out (its session expired) whose group rebalances before it could rewind:
    the partitions it keeps were paused for that rewind, and kafka-python keeps a pause across a
    rebalance."""

    fence_after = 1500
    rejoin_first = False

    def process(self, polled: Any) -> None:
        super().process(polled)
        if self.fence_after and self.stats.records > self.fence_after:
            self.fence_after = 0
            self.rejoin_first = True
            raise Fenced("group membership lost (injected)")

    def _rewind(self) -> None:
        if self.rejoin_first:  # the rewind's committed-offset lookup waits; the rebalance comes first
            self.rejoin_first = False
            assert self.consumer is not None
            self.consumer._coordinator.request_rejoin()
            return
        super()._rewind()


def test_a_rebalance_before_the_rewind_of_a_fenced_member_leaves_no_partition_paused(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    ref = _ref(fitted_plant, settings)
    stop = threading.Event()
    det = _RebalanceBeforeRewind(settings, fitted_plant.bundle, stop=stop)
    def nothing_left_paused() -> None:
        assert det.rejoin_first is False and not det.consumer.paused()

    row = _stream_through(det, stop, settings, ref, lambda: det.fence_after == 0, "the injected fencing",
                          "rebalance_before_rewind", while_running=nothing_left_paused)
    faults.assert_exact(row)


def test_producers_the_broker_no_longer_knows_are_replaced_without_losing_an_output(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    """What a broker restarted behind its own log leaves an idempotent producer with: its id was
    refused (out-of-order sequence), a new one could not be had, and kafka-python holds the producer
    in its fatal state, failing every send. The detector replaces both producers and goes on."""
    settings = detector_settings(settings_for, broker, scores=True)
    ref = _ref(fitted_plant, settings)
    stop = threading.Event()
    det = Detector(settings, fitted_plant.bundle, stop=stop)
    with running(det, stop):
        stream = faults.Stream(settings, ref, RATE).start()
        wait_until(lambda: stream.sent > len(ref.records) // 3 and det.stats.scored > 0, 90, "a third of the stream")
        lost = (det.producer, det.state_producer)
        fault_at = time.time()
        for producer in lost:
            producer._transaction_manager.transition_to_fatal_error(
                KafkaError("Unexpected error in InitProducerIdResponse: [Error -1] UnknownError"))
        wait_until(lambda: det.producer is not lost[0] and det.state_producer is not lost[1], 60,
                   "both producers to be replaced")
        stream.join(120)
        scores = faults.wait_for_scores(settings, ref, 150)
    row = faults.compare(settings, ref, stream.sent, scores, fault_at)
    faults.record("producers_lost_their_id", row)
    faults.assert_exact(row)


def test_broker_down_for_30_s_at_start_up(settings_for: Any, fitted_plant: Any) -> None:
    own = LocalBroker(port=free_port())
    settings = settings_for(own, {"detector.http_port": str(free_port())})
    settings = dataclasses.replace(settings, topics=dataclasses.replace(
        settings.topics, scores=f"{settings.topics.readings}.scores"))
    ref = _ref(fitted_plant, settings, steps=600)
    det = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("broker_down_30s_at_start", "d"),
                                {"detector.http_port": str(settings.detector.http_port)})
    try:
        time.sleep(30)
        assert det.poll() is None, "the detector gave up while the broker was down"
        own.start()
        fault_at = time.time()
        wait_until(lambda: faults.ready(settings.detector.http_port), 60, "the detector to be ready")
        stream = faults.Stream(settings, ref, RATE).start()
        row = _finish("broker_down_30s_at_start", settings, ref, stream, fault_at, det)
        faults.assert_exact(row)
    finally:
        if det.poll() is None:
            det.kill()
        own.close()


def test_a_corrupt_bundle_published_while_following_the_registry_is_refused(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker, {"detector.registry_poll_s": "0.5"}, scores=True)
    uri = settings.registry.uri
    registry.publish(uri, fitted_plant.bundle, keep=10)
    ref = _ref(fitted_plant, settings)
    stop = threading.Event()
    det = Detector(settings, fitted_plant.bundle, stop=stop, follow_registry=True)
    with running(det, stop):
        stream = faults.Stream(settings, ref, RATE).start()
        wait_until(lambda: stream.sent > len(ref.records) // 3, 60, "a third of the stream")
        bad = dataclasses.replace(fitted_plant.bundle, version=f"{fitted_plant.bundle.version[:16]}-corrupt")
        version = registry.publish(uri, bad, keep=10)
        weights = Path(uri) / "models" / version / "weights.npz"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        fault_at = time.time()
        wait_until(lambda: version in det.watcher.refused, 30, "the corrupt bundle to be refused")
        assert det.engine.model_version == fitted_plant.bundle.version
        stream.join(120)
        scores = faults.wait_for_scores(settings, ref, 150)
    row = faults.compare(settings, ref, stream.sent, scores, fault_at)
    faults.record("corrupt_bundle_published", row)
    faults.assert_exact(row)


BROKER_LOSS_WINDOW_S = 5.0


def _closing_index(ref: faults.Reference, asset: str, step_ms: int) -> int:
    """Index of the record that closed the step: the asset's first reading past its end plus the lateness."""
    limit = step_ms + 1000 + 5000
    return next((i for i, (a, ts, _) in enumerate(ref.records) if a == asset and ts >= limit), len(ref.records) - 1)


def test_broker_kill_9_and_restart_on_durable_storage(settings_for: Any, fitted_plant: Any) -> None:
    s3 = MotoS3()
    own = LocalBroker(port=free_port(), storage_url=s3.url, extra_env=s3.env, log_path=faults.log_path("broker_kill_9_restart_s3", "broker"))
    try:
        own.start()
        settings = detector_settings(settings_for, own, scores=True)
        ref = _ref(fitted_plant, settings)
        det = faults.start_detector(settings, fitted_plant.bundle_dir, faults.log_path("broker_kill_9_restart_s3", "d"))
        faults.wait_ready(det)
        stream = faults.Stream(settings, ref, RATE).start()
        wait_until(lambda: stream.sent > len(ref.records) // 3, 90, "a third of the stream")
        own.kill()
        fault_at = time.time()
        time.sleep(5)
        own.start()
        stream.join(180)
        # What the broker itself lost (acknowledged just before its kill) is its durability, not
        # the detector's: the reference is rebuilt from the readings the topic really holds.
        held = read_topic(settings, settings.topics.readings, until=lambda r: len(r) >= stream.sent, timeout_s=30)
        broker_lost = stream.sent - len(held)
        if broker_lost:
            ref = faults.reference_of(fitted_plant.bundle, settings, sorted(held, key=lambda r: (r.partition, r.offset)))
        row = _finish("broker_kill_9_restart_s3", settings, ref, stream, fault_at, det)
        row["broker_lost_readings"] = broker_lost
        # An output acknowledged in the last moments before the kill can vanish with the broker
        # (its durability): lost steps whose closing reading was sent then are counted apart. The
        # send time comes from the stream's own order: a reference rebuilt from the topic is in
        # partition order, and its indices are not send times.
        lost_outputs = [step for step in row["lost_steps"]
                        if fault_at - BROKER_LOSS_WINDOW_S <= stream.sent_at(_closing_index(stream.ref, *step)) <= fault_at]
        row["broker_lost_outputs"] = len(lost_outputs)
        row["lost"] -= len(lost_outputs)
        faults.record("broker_kill_9_restart_s3", row)
        faults.assert_exact(row)
    finally:
        own.close()
        s3.close()
