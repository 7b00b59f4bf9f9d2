"""Releases a consumer poll that kafka-python left waiting for a fetch long past its timeout.

kafka-python (3.0.x) runs a client's network on its own IO thread. ``poll()`` waits for the
fetch on an event that a coroutine on that thread sets, at the latest when the poll's timer
fires. On a loaded machine that event was sometimes never set: the IO loop kept running, but
the poll blocked for good (seen in 2 of 7 runs of the fuzz suite with two busy CPU hogs beside
it, and once in CI: the archiver read nothing for 300 s). A daemon stuck there reads nothing,
commits nothing and only ``alive`` tells.

:class:`PollWatchdog` wraps a consumer's ``poll``. A watcher thread samples the polling thread
once a second; when a poll has run ``grace_s`` past its timeout and the thread is waiting inside
the fetcher's bounded wait (``Fetcher.fetch_records``), it fails that wait with the
``KafkaTimeoutError`` the fetcher already treats as its own timeout. The poll then returns what
is buffered (often nothing) and the next poll fetches again: no record is skipped, since
positions only move when records are returned. Waits elsewhere (a group join, a commit, a
rebalance listener) are never touched. Each release is logged (``kafka poll released``) and
counted (``plantwatch_kafka_poll_releases_total``).
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from types import FrameType
from typing import Any

from kafka.errors import KafkaTimeoutError
from prometheus_client import Counter

from pipeline.logs import get_logger

RELEASES = Counter("plantwatch_kafka_poll_releases_total",
                   "Consumer polls released by the watchdog after kafka-python left them waiting past their timeout")
GRACE_S = 10.0
CHECK_EVERY_S = 1.0
_FETCH_WAIT = ("fetch_records", "kafka/consumer/fetcher.py")

_log = get_logger("plantwatch.kafka")
_watched: weakref.WeakSet[PollWatchdog] = weakref.WeakSet()
_watcher_lock = threading.Lock()
_watcher: threading.Thread | None = None


def waiting_for_fetch(frame: FrameType | None) -> bool:
    """True if this stack is inside kafka-python's ``Fetcher.fetch_records``."""
    name, path = _FETCH_WAIT
    while frame is not None:
        code = frame.f_code
        if code.co_name == name and code.co_filename.replace("\\", "/").endswith(path):
            return True
        frame = frame.f_back
    return False


class PollWatchdog:
    """``poll`` of one consumer, released if kafka-python leaves its fetch wait hanging."""

    def __init__(self, consumer: Any, *, grace_s: float = GRACE_S, name: str = "") -> None:
        self.consumer = consumer
        self.grace_s = grace_s
        self.name = name
        self.releases = 0
        self._thread_id: int | None = None
        self._started = 0.0
        self._deadline: float | None = None  # monotonic time after which a poll counts as stuck
        _watch(self)

    def poll(self, timeout_ms: int, max_records: int | None = None) -> dict[Any, list[Any]]:
        self._thread_id = threading.get_ident()
        self._started = time.monotonic()
        self._deadline = self._started + timeout_ms / 1000 + self.grace_s
        try:
            result: dict[Any, list[Any]] = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
            return result
        finally:
            self._deadline = None

    def check(self, now: float | None = None) -> bool:
        """Release the poll if it is stuck in the fetch wait; True if it was."""
        deadline, thread_id = self._deadline, self._thread_id
        now = time.monotonic() if now is None else now
        if deadline is None or thread_id is None or now < deadline:
            return False
        if not waiting_for_fetch(sys._current_frames().get(thread_id)):
            return False
        net = getattr(self.consumer, "_net", None)
        release = getattr(net, "_fail_pending_waiters", None)
        if release is None:  # a kafka-python without the IO thread: nothing to release
            return False
        release(KafkaTimeoutError("fetch wait released by plantwatch's poll watchdog"))
        self.releases += 1
        RELEASES.inc()
        self._deadline = now + self.grace_s  # once per grace period at most
        _log.warning("kafka poll released", consumer=self.name, polling_s=round(now - self._started, 1),
                     releases=self.releases)
        return True


def _watch(guard: PollWatchdog) -> None:
    global _watcher
    with _watcher_lock:
        _watched.add(guard)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_run, name="plantwatch-poll-watchdog", daemon=True)
            _watcher.start()


def _run() -> None:
    while True:
        time.sleep(CHECK_EVERY_S)
        for guard in list(_watched):
            try:
                guard.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one consumer
                _log.warning("poll watchdog check failed", consumer=guard.name, error=str(exc))
