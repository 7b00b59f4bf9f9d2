"""A consumer poll whose fetch wait is never woken is released, against a real broker and kafka-python.

The fault is the one seen under load: the coroutine that ends the fetcher's bounded wait never
resumes (its timer gone), so ``KafkaConsumer.poll`` blocks for good. It is injected by making
the connection manager's ``wait_for`` await a future nothing resolves.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from consumers.kafka_clients import make_consumer, make_producer
from consumers.poll_watchdog import PollWatchdog
from consumers.topics import ensure_topics
from pipeline.settings import Settings


def _assigned(consumer: Any, topic: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200)
    assert consumer.assignment(), "no partition assigned"


def _in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", call()), daemon=True)
    thread.start()
    return thread, out


def test_a_fetch_wait_never_woken_is_released_and_the_consumer_reads_on(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings, {topic: 1})
    consumer = make_consumer(settings, group_id=f"{topic}-watchdog")
    consumer.subscribe([topic])
    try:
        _assigned(consumer, topic)
        never = Future()

        async def lost_wait(future: Any, timeout_ms: float) -> Any:
            return await never

        consumer._manager.wait_for = lost_wait  # the fetcher looks it up on every wait

        # Without the watchdog the poll does not return: the fault is real.
        bare, _ = _in_thread(lambda: consumer.poll(timeout_ms=200))
        bare.join(4)
        assert bare.is_alive(), "the injected fault did not block the poll"
        consumer._net._fail_pending_waiters(KafkaTimeoutError("test cleanup"))
        bare.join(10)
        assert not bare.is_alive()

        # With it, the poll returns a grace period after its timeout, empty.
        guard = PollWatchdog(consumer, grace_s=1.0, name="test")
        started = time.monotonic()
        guarded, out = _in_thread(lambda: guard.poll(200))
        guarded.join(15)
        assert not guarded.is_alive(), "the watchdog did not release the poll"
        assert out["result"] == {} and guard.releases == 1
        assert time.monotonic() - started < 6

        # The consumer goes on: the first record of the topic is read, none skipped.
        del consumer._manager.wait_for
        producer = make_producer(settings)
        producer.send(topic, value=b"after").get(timeout=30)
        producer.close()
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = [r for records in guard.poll(500).values() for r in records]
        assert [(r.offset, r.value) for r in got] == [(0, b"after")]
        assert guard.releases == 1
    finally:
        consumer.close(autocommit=False)
