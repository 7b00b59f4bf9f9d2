"""The trainer's run lock as a lease: a heartbeat the running job renews, taken over once it is
older than the lease (on any host sharing the file), never while it is fresh, and by exactly
one of several takers racing for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from trainers.schedule import LockHeld, LockLost, RunLock

REPO = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
LEASE = 120.0
MAX_AGE = 43_200.0


def write_holder(path: Path, *, heartbeat_at: float, host: str = "trainer-b", pid: int = 4242,
                 started_at: float | None = None, token: str = "their-token") -> bytes:
    body = json.dumps({"pid": pid, "host": host, "started_at": heartbeat_at - 600 if started_at is None else started_at,
                       "token": token, "heartbeat_at": heartbeat_at}).encode()
    path.write_bytes(body)
    return body


def lock_at(path: Path, now: float = NOW, **kwargs: Any) -> RunLock:
    """A lease lock whose clock reads ``now``; no heartbeat thread unless asked for."""
    kwargs.setdefault("heartbeat_s", 0)
    return RunLock(str(path), MAX_AGE, lease_s=LEASE, clock=lambda: now, **kwargs)


def held(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_the_lock_file_names_its_owner_and_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    lock = lock_at(path)
    lock.acquire()
    body = held(path)
    assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
    assert body["started_at"] == body["heartbeat_at"] == NOW
    assert len(body["token"]) == 32 and body["token"] == lock.token
    lock.release()
    assert not path.exists() and leftovers(path) == []


def test_an_expired_lease_is_taken_over_even_from_another_host(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    write_holder(path, heartbeat_at=NOW - LEASE - 1)  # host trainer-b: its pid cannot be checked from here
    with capture_logs() as logs:
        lock = lock_at(path)
        lock.acquire()
    assert held(path)["token"] == lock.token
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "no heartbeat for 121 s, more than the lease of 120 s" in warnings[0]["reason"]
    lock.release()
    assert leftovers(path) == []


def test_a_live_lease_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    body = write_holder(path, heartbeat_at=NOW - 30, started_at=NOW - 5 * 3600)  # a long run, renewing
    with pytest.raises(LockHeld, match="pid 4242 on trainer-b since .*, last heartbeat 30 s ago"):
        lock_at(path).acquire()
    assert path.read_bytes() == body and leftovers(path) == []


def test_a_lock_without_a_heartbeat_is_judged_by_pid_and_age_only(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    path.write_text(json.dumps({"pid": 4242, "host": "trainer-b", "started_at": NOW - 3600}))  # a lease-less writer
    with pytest.raises(LockHeld):
        lock_at(path).acquire()
    lock = lock_at(path, now=NOW - 3600 + MAX_AGE + 1)
    lock.acquire()
    lock.release()


def test_a_fresh_heartbeat_beats_the_maximum_age_only_until_it_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    write_holder(path, heartbeat_at=NOW - 10, started_at=NOW - MAX_AGE - 1)  # renewing, but hung for 12 h
    lock = lock_at(path)
    lock.acquire()
    lock.release()


def test_the_running_job_renews_its_heartbeat_and_release_stops_it(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    lock = RunLock(str(path), MAX_AGE, lease_s=1.0, heartbeat_s=0.05)
    lock.acquire()
    first = held(path)["heartbeat_at"]
    deadline = time.monotonic() + 5
    while held(path)["heartbeat_at"] <= first + 0.1:
        assert time.monotonic() < deadline, "the heartbeat was not renewed"
        time.sleep(0.02)
    assert held(path)["started_at"] == first and held(path)["token"] == lock.token
    with pytest.raises(LockHeld):
        RunLock(str(path), MAX_AGE, lease_s=1.0, heartbeat_s=0).acquire()
    lock.release()
    assert not any(t.name == "trainer-lock-heartbeat" for t in threading.enumerate())
    assert not path.exists() and leftovers(path) == []


def test_a_run_that_lost_its_lease_knows_it_and_leaves_the_new_lock_alone(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    lock = lock_at(path)
    lock.acquire()
    lock.check()  # still ours
    successor = write_holder(path, heartbeat_at=NOW + 200, token="successor")  # it stalled past the lease
    with pytest.raises(LockLost, match="pid 4242 on trainer-b"):
        lock.check()
    with pytest.raises(LockLost):
        lock.renew()
    assert path.read_bytes() == successor  # the renewal did not overwrite the successor's lock
    lock.release()
    assert path.read_bytes() == successor


def test_a_holder_that_renews_while_being_judged_keeps_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trainer.lock"
    write_holder(path, heartbeat_at=NOW - LEASE - 5)
    renewed = json.dumps({"pid": 4242, "host": "trainer-b", "started_at": NOW - 600, "token": "their-token",
                          "heartbeat_at": NOW}).encode()
    judge = RunLock._stale

    def judged_then_renewed(self: RunLock, holder: Any) -> str | None:
        why = judge(self, holder)
        (tmp_path / "renewal").write_bytes(renewed)
        os.replace(tmp_path / "renewal", path)  # the holder's heartbeat lands just after the judgement
        return why

    monkeypatch.setattr(RunLock, "_stale", judged_then_renewed)
    with pytest.raises(LockHeld):
        lock_at(path).acquire()
    assert path.read_bytes() == renewed and leftovers(path) == []


def test_two_takers_judging_the_same_expired_lease_make_one_winner(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst interleaving, forced: both takers have judged the expired lock before either
    touches it. Repeated, so each of the orders in which their renames and links land occurs."""
    judge = RunLock._stale
    barrier = threading.Barrier(2)
    judged: set[int] = set()

    def judged_together(self: RunLock, holder: Any) -> str | None:
        why = judge(self, holder)
        if why is not None and id(self) not in judged:  # each taker's first judgement waits for the other's
            judged.add(id(self))
            barrier.wait(timeout=5)
        return why

    monkeypatch.setattr(RunLock, "_stale", judged_together)
    for round_ in range(40):
        path = tmp_path / f"round-{round_}" / "trainer.lock"
        path.parent.mkdir()
        write_holder(path, heartbeat_at=NOW - LEASE - 1)
        barrier.reset()
        judged.clear()
        results = _race([lock_at(path) for _ in range(2)])
        winners = [lock for lock, outcome in results if outcome == "won"]
        assert len(winners) == 1, (round_, results)
        assert held(path)["token"] == winners[0].token
        assert leftovers(path) == []
        winners[0].release()


def test_many_takers_racing_for_an_expired_lease_make_one_winner(tmp_path: Path) -> None:
    for round_ in range(25):
        path = tmp_path / f"round-{round_}" / "trainer.lock"
        path.parent.mkdir()
        write_holder(path, heartbeat_at=NOW - LEASE - 1)
        results = _race([lock_at(path) for _ in range(6)])
        winners = [lock for lock, outcome in results if outcome == "won"]
        assert len(winners) == 1, (round_, results)
        assert held(path)["token"] == winners[0].token
        assert leftovers(path) == []


def _race(locks: list[RunLock]) -> list[tuple[RunLock, str]]:
    start = threading.Barrier(len(locks))
    out: list[tuple[RunLock, str]] = []

    def take(lock: RunLock) -> None:
        start.wait()
        try:
            lock.acquire()
            out.append((lock, "won"))
        except LockHeld:
            out.append((lock, "held"))

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


_TAKER = """
import json, sys, time
from trainers.schedule import LockHeld, RunLock
path, at = sys.argv[1], float(sys.argv[2])
lock = RunLock(path, 43200.0, lease_s=120.0, heartbeat_s=0, clock=lambda: 1_800_000_000.0)
time.sleep(max(0.0, at - time.time()))
try:
    lock.acquire()
    print(json.dumps({"won": lock.token}), flush=True)
except LockHeld:
    print(json.dumps({"won": None}), flush=True)
sys.stdin.read()  # alive (a winner holding the lock) until every taker has answered
"""


def test_takers_in_separate_processes_make_one_winner(tmp_path: Path) -> None:
    for round_ in range(3):
        path = tmp_path / f"round-{round_}" / "trainer.lock"
        path.parent.mkdir()
        write_holder(path, heartbeat_at=NOW - LEASE - 1)
        at = time.time() + 1.5  # every process imported and waiting: they start together
        procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(path), str(at)], cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
        won = [_answer(p) for p in procs]
        for p in procs:
            p.communicate(timeout=30)
        assert sum(w is not None for w in won) == 1, won
        assert held(path)["token"] == next(w for w in won if w)


def _answer(proc: subprocess.Popen[str]) -> str | None:
    assert proc.stdout is not None
    for line in proc.stdout:  # log lines first, then the answer
        if line.startswith('{"won"'):
            return json.loads(line)["won"]
    raise AssertionError("no answer")


_HOLDER = """
import socket, sys, time
socket.gethostname = lambda: "trainer-b"  # a run on another host sharing the volume
from trainers.schedule import RunLock
lock = RunLock(sys.argv[1], 43200.0, lease_s=2.0, heartbeat_s=0.2)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_run_on_another_host_is_taken_over_once_its_lease_runs_out(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        time.sleep(1.0)
        with pytest.raises(LockHeld, match="on trainer-b"):  # alive and renewing beyond one lease... not yet
            RunLock(str(path), MAX_AGE, lease_s=2.0, heartbeat_s=0).acquire()
        assert held(path)["heartbeat_at"] > held(path)["started_at"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.monotonic()
    with pytest.raises(LockHeld):  # its pid is not ours to check (another host): only the lease tells
        RunLock(str(path), MAX_AGE, lease_s=2.0, heartbeat_s=0).acquire()
    taker = RunLock(str(path), MAX_AGE, lease_s=2.0, heartbeat_s=0)
    while True:
        try:
            taker.acquire()
            break
        except LockHeld:
            assert time.monotonic() - killed_at < 10, "the lease never ran out"
            time.sleep(0.1)
    waited = time.monotonic() - killed_at
    assert 0.5 < waited < 3.5, waited  # the lease (2 s) after its last heartbeat (≤ 0.2 s before the kill)
    taker.release()
