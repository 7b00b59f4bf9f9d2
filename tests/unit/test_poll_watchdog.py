"""The poll watchdog releases only kafka-python's fetch wait (with the broker: tests/integration)."""

from __future__ import annotations

import threading
import time
from typing import Any

from consumers.poll_watchdog import PollWatchdog, waiting_for_fetch


def _in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", call()), daemon=True)
    thread.start()
    return thread, out


def test_a_poll_waiting_elsewhere_is_left_alone() -> None:
    """Only the fetcher's bounded wait is released; any other wait (a join, a commit) is not."""
    released: list[BaseException] = []
    blocked = threading.Event()

    class Net:
        def _fail_pending_waiters(self, exc: BaseException) -> None:
            released.append(exc)

    class Consumer:
        _net = Net()

        def poll(self, timeout_ms: int, max_records: int | None = None) -> dict[Any, Any]:
            blocked.wait(30)  # a wait that is not Fetcher.fetch_records
            return {}

    guard = PollWatchdog(Consumer(), grace_s=0.0, name="test")
    thread, out = _in_thread(lambda: guard.poll(0))
    time.sleep(0.3)
    assert guard.check(now=time.monotonic() + 3600) is False
    blocked.set()
    thread.join(5)
    assert out["result"] == {} and not released and guard.releases == 0


def test_the_fetch_wait_is_recognised_by_function_and_module() -> None:
    import sys

    assert not waiting_for_fetch(sys._getframe())
    assert not waiting_for_fetch(None)
