"""What the detector's loop does when the broker refuses it: a refusal for good (not authorised)
stops it with exit 1 and nothing committed, whether the poll or a send raises it at once; a
retriable failure rewinds and tries again. Kafka clients are fakes; the engine is a stub."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError, UnknownTopicOrPartitionError

import consumers.detector as det
from pipeline.checkpoint import Restored
from pipeline.engine import EngineOutput
from pipeline.settings import load_settings

S = load_settings(env={})
TP = TopicPartition(S.topics.readings, 0)


class Future:
    def __init__(self, exc: Exception | None = None) -> None:
        self.is_done, self.exception = True, exc

    def failed(self) -> bool:
        return self.exception is not None


class Producer:
    """Sends to the dead-letter topic fail as ``dlq`` says: an exception raised at once, or a
    failed future."""

    def __init__(self, dlq: Any, stop: threading.Event, sends: list[str]) -> None:
        self.dlq, self.stop, self.sends, self._transaction_manager = dlq, stop, sends, None

    def send(self, topic: str, **kwargs: Any) -> Future:
        if topic != S.topics.dlq_topic:
            return Future()
        self.sends.append(topic)
        if len(self.sends) >= 3:
            self.stop.set()  # an operator's SIGTERM ends a loop that would retry for ever
        if isinstance(self.dlq, Exception):
            raise self.dlq
        return Future(self.dlq())

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass

    def partitions_for(self, topic: str) -> set[int]:
        return {0}


class Consumer:
    """Assigns one partition and delivers one malformed record (a dead letter) after each rewind;
    ``poll_error`` is raised by every poll after the assignment instead."""

    def __init__(self, poll_error: Exception | None) -> None:
        self.poll_error, self.delivered, self.joined, self.listener = poll_error, False, False, None
        self.paused_: set[TopicPartition] = set()
        self.commits: list[Any] = []
        self._fetcher = SimpleNamespace(_paused_partition_records={})

        async def fetch_async(tps: Any) -> dict[Any, Any]:
            return {}
        self._coordinator = SimpleNamespace(coordinator_unknown=lambda: False, generation_if_stable=lambda: 1,
                                            fetch_committed_offsets=lambda tps, timeout_ms=None: {},
                                            fetch_committed_offsets_async=fetch_async)
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda t: None))

    def subscribe(self, topics: Any, listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> dict[Any, Any]:
        if not self.joined:
            self.joined = True
            asyncio.run(self.listener.on_partitions_assigned({TP}))
        if self.poll_error is not None:
            raise self.poll_error
        if TP in self.paused_ or self.delivered:
            return {}
        self.delivered = True
        return {TP: [SimpleNamespace(topic=TP.topic, partition=0, offset=0, key=b"p1", value=b"{not json",
                                     headers=[], timestamp=int(time.time() * 1000))]}

    def seek(self, tp: Any, offset: int) -> None:
        self.delivered = False

    def seek_to_beginning(self, *tps: Any) -> None:
        self.delivered = False

    def pause(self, *tps: Any) -> None:
        self.paused_.update(tps)

    def resume(self, *tps: Any) -> None:
        self.paused_.difference_update(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_)

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: Any) -> None:
        return None

    def commit(self, offsets: Any, timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)

    def close(self, **kwargs: Any) -> None:
        pass


class Engine:
    def __init__(self, bundle: Any, grid: Any) -> None:
        self.bundle, self.model_version = bundle, bundle.version
        self.model = SimpleNamespace(step_runtime="stub")
        self.state = type("State", (), {"drop": lambda self, a: None, "__len__": lambda self: 0, "index": {}})()

    def process(self, batch: Any, record_pos: Any = None, now_ms: Any = None) -> EngineOutput:
        e = np.empty(0)
        return EngineOutput(np.empty(0, object), np.empty(0, np.int64), np.empty((0, 1)), e, e, e, np.empty((0, 1)))


def run(monkeypatch: pytest.MonkeyPatch, dlq: Any = None, poll_error: Exception | None = None
        ) -> tuple[int, list[str], Consumer]:
    stop, sends, consumer = threading.Event(), [], Consumer(poll_error)
    monkeypatch.setattr(det, "DetectionEngine", Engine)
    monkeypatch.setattr(det, "make_output_producer", lambda s: Producer(dlq, stop, sends))
    monkeypatch.setattr(det, "make_state_producer", lambda s: Producer(None, stop, []))
    monkeypatch.setattr(det, "make_consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(det, "read_changelog", lambda s, p, parts, sp, tid="": {q: ({}, Restored()) for q in parts})
    timer = threading.Timer(30, stop.set)  # a loop that never ends fails the test instead of hanging it
    timer.start()
    try:
        code = det.Detector(S, SimpleNamespace(version="v1", features=tuple(S.model.features)), stop=stop).run()
    finally:
        timer.cancel()
    return code, sends, consumer


@pytest.mark.parametrize("refusal", [TopicAuthorizationFailedError({S.topics.dlq_topic}),  # raised by send()
                                     TopicAuthorizationFailedError])                        # a failed future
def test_a_dead_letter_topic_not_authorised_stops_the_detector_with_nothing_committed(
        monkeypatch: pytest.MonkeyPatch, refusal: Any) -> None:
    code, sends, consumer = run(monkeypatch, dlq=refusal)
    assert (code, len(sends), consumer.commits) == (1, 1, [])


def test_a_group_not_authorised_stops_the_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    code, sends, consumer = run(monkeypatch, poll_error=GroupAuthorizationFailedError())
    assert (code, sends, consumer.commits) == (1, [], [])


def test_a_retriable_failure_rewinds_and_tries_the_same_dead_letter_again(monkeypatch: pytest.MonkeyPatch) -> None:
    code, sends, consumer = run(monkeypatch, dlq=UnknownTopicOrPartitionError)
    assert code == 0 and len(sends) == 3 and consumer.commits == []  # stopped from outside, nothing lost
