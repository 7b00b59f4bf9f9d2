"""The scheduler's parts: the cron matcher, the run lock, the loop, and reading a run's outcome."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from trainers.schedule import (EXIT_FAILED, EXIT_PUBLISHED, EXIT_REFUSED, Cron, CronError, Interval, LockHeld,
                               RunLock, RunResult, result_of, run_schedule, schedule_from)

REPO = Path(__file__).resolve().parents[2]


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# ---------------------------------------------------------------- cron


def test_fields_accept_lists_ranges_steps_and_names() -> None:
    c = Cron.parse("*/15 8-18/5 1,15,31 jan,jul-aug 1-5")
    assert c.minutes == {0, 15, 30, 45}
    assert c.hours == {8, 13, 18}
    assert c.days == {1, 15, 31}
    assert c.months == {1, 7, 8}
    assert c.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("5/20 * * * *").minutes == {5, 25, 45}
    assert Cron.parse("0 0 * * 7").weekdays == {0}          # 7 is Sunday, as 0
    assert Cron.parse("0 0 * * SUN,sat").weekdays == {0, 6}


@pytest.mark.parametrize("expr, problem", [
    ("* * * *", "need 5 fields"),
    ("60 * * * *", "outside 0-59"),
    ("* 24 * * *", "outside 0-23"),
    ("* * 0 * *", "outside 1-31"),
    ("* * * 13 *", "outside 1-12"),
    ("10-5 * * * *", "runs backwards"),
    ("*/0 * * * *", "outside 1-59"),
    ("x * * * *", "not a number"),
    ("0 0 30 feb *", "never matches"),
])
def test_malformed_or_impossible_expressions_are_refused(expr: str, problem: str) -> None:
    with pytest.raises(CronError, match=problem):
        Cron.parse(expr)


def test_next_after_is_strictly_after_and_rolls_over_days_months_and_years() -> None:
    daily = Cron.parse("0 0 * * *")
    assert when(daily.next_after(ts(2026, 1, 1))) == datetime(2026, 1, 2, tzinfo=UTC)
    assert when(daily.next_after(ts(2026, 1, 1, 23, 59, 30))) == datetime(2026, 1, 2, tzinfo=UTC)
    assert when(daily.next_after(ts(2026, 12, 31, 12))) == datetime(2027, 1, 1, tzinfo=UTC)
    leap = Cron.parse("30 2 29 2 *")
    assert when(leap.next_after(ts(2026, 3, 1))) == datetime(2028, 2, 29, 2, 30, tzinfo=UTC)
    office = Cron.parse("*/15 8-18 * * mon-fri")
    assert when(office.next_after(ts(2026, 1, 3, 12))) == datetime(2026, 1, 5, 8, 0, tzinfo=UTC)  # Sat → Mon
    assert when(office.next_after(ts(2026, 1, 5, 8, 7))) == datetime(2026, 1, 5, 8, 15, tzinfo=UTC)


def test_two_restricted_day_fields_match_either_and_a_star_field_defers_to_the_other() -> None:
    # 2026-02-01 is a Sunday; 2026-02-13 a Friday.
    either = Cron.parse("0 12 13 * mon")
    assert when(either.next_after(ts(2026, 2, 1))) == datetime(2026, 2, 2, 12, tzinfo=UTC)   # Monday
    assert when(either.next_after(ts(2026, 2, 12))) == datetime(2026, 2, 13, 12, tzinfo=UTC)  # the 13th
    both = Cron.parse("0 12 */2 * mon")  # "*/2" is unrestricted as in Vixie cron: odd days AND Monday
    assert when(both.next_after(ts(2026, 2, 1))) == datetime(2026, 2, 9, 12, tzinfo=UTC)


@settings(max_examples=60, deadline=None)
@given(minutes=st.sets(st.integers(0, 59), min_size=1, max_size=4),
       hours=st.sets(st.integers(0, 23), min_size=1, max_size=3),
       start=st.integers(int(ts(2025, 1, 1)), int(ts(2030, 1, 1))))
def test_next_after_is_the_first_matching_minute(minutes: set[int], hours: set[int], start: int) -> None:
    cron = Cron.parse(f"{','.join(map(str, sorted(minutes)))} {','.join(map(str, sorted(hours)))} * * *")
    found = when(cron.next_after(start))
    assert found > when(start) and cron.matches(found) and found.second == 0
    t = when(start).replace(second=0, microsecond=0) + timedelta(minutes=1)
    while t < found:
        assert not cron.matches(t), t
        t += timedelta(minutes=1)


def test_schedule_from_uses_the_cron_expression_when_set() -> None:
    assert schedule_from("", 90.0) == Interval(90.0)
    assert schedule_from("0 3 * * *", 90.0) == Cron.parse("0 3 * * *")
    assert Interval(90.0).next_after(1000.0) == 1090.0


# ---------------------------------------------------------------- lock


def write_lock(path: Path, pid: int, started_at: float, host: str | None = None) -> None:
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started_at": started_at}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trainer.lock"
    with RunLock(str(path), 3600) as lock:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            RunLock(str(path), 3600).acquire()
        assert lock is not None
    assert not path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temp files left


def test_lock_of_a_dead_pid_is_broken_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    write_lock(path, dead_pid(), started_at=1.0e9)
    with capture_logs() as logs, RunLock(str(path), 1e12):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "is gone" in warnings[0]["reason"]


def test_lock_older_than_max_age_is_broken_even_if_its_process_lives(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    write_lock(path, os.getpid(), started_at=1000.0)
    lock = RunLock(str(path), max_age_s=600, clock=lambda: 1500.0)
    with pytest.raises(LockHeld):
        lock.acquire()  # 500 s old: still held
    lock = RunLock(str(path), max_age_s=600, clock=lambda: 1700.0)
    lock.acquire()      # 700 s old: broken
    assert json.loads(path.read_text())["started_at"] == 1700.0
    lock.release()


def test_pid_of_another_host_is_not_checked_only_the_age(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    write_lock(path, dead_pid(), started_at=1000.0, host="elsewhere")
    with pytest.raises(LockHeld, match="on elsewhere"):
        RunLock(str(path), max_age_s=600, clock=lambda: 1500.0).acquire()


def test_unreadable_lock_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    path.write_bytes(b"\x00garbage")
    with capture_logs() as logs, RunLock(str(path), 3600):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert [e["reason"] for e in logs if e["log_level"] == "warning"] == ["unreadable lock file"]


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    lock = RunLock(str(path), 3600)
    lock.acquire()
    write_lock(path, 4242, started_at=5.0, host="other")  # broken by a run elsewhere after max age
    lock.release()
    assert json.loads(path.read_text())["pid"] == 4242


def test_lock_of_a_crashed_run_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "trainer.lock"
    code = ("import sys, time; from trainers.schedule import RunLock; RunLock(sys.argv[1], 3600).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
            RunLock(str(path), 3600).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(path.read_text())["pid"] == proc.pid  # the crash left it behind
    with RunLock(str(path), 3600):
        assert json.loads(path.read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- loop


class FakeClock:
    """Time that moves only when the loop waits or a job says it took a while."""

    def __init__(self, start: float, stop: threading.Event) -> None:
        self.now = start
        self.stop = stop
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.stop.is_set()


def counting_job(clock: FakeClock, started: list[float], runs_before_stop: int, seconds: float = 10.0,
                 result: RunResult = RunResult("published", {"version": "v1"})) -> Callable[[], RunResult]:
    """A job taking ``seconds``, during whose last run SIGTERM arrives (it finishes, no other starts)."""

    def job() -> RunResult:
        started.append(clock.now)
        clock.now += seconds
        if len(started) == runs_before_stop:
            clock.stop.set()
        return result

    return job


def test_interval_runs_at_fixed_rate_and_stops_between_runs() -> None:
    stop = threading.Event()
    clock = FakeClock(1000.0, stop)
    started: list[float] = []
    with capture_logs() as logs:
        runs = run_schedule(Interval(100.0), counting_job(clock, started, 3), stop, clock=clock, wait=clock.wait)
    assert runs == 3
    assert started == [1100.0, 1200.0, 1300.0]
    outcomes = [e for e in logs if e["event"] == "training run published"]
    assert [(e["outcome"], e["version"], e["duration_s"]) for e in outcomes] == [("published", "v1", 10.0)] * 3


def test_run_now_and_cron_times() -> None:
    start = ts(2026, 1, 1, 10, 7)
    stop = threading.Event()
    clock = FakeClock(start, stop)
    started: list[float] = []
    run_schedule(Cron.parse("0 * * * *"), counting_job(clock, started, 3), stop, run_now=True,
                 clock=clock, wait=clock.wait)
    assert [when(t) for t in started] == [when(start), datetime(2026, 1, 1, 11, tzinfo=UTC),
                                          datetime(2026, 1, 1, 12, tzinfo=UTC)]
    assert max(clock.waits) <= 60.0  # the clock is re-read at least every minute


def test_a_run_outlasting_its_slot_skips_the_missed_times() -> None:
    stop = threading.Event()
    clock = FakeClock(0.0, stop)
    started: list[float] = []
    refused = RunResult("refused", {"version": "v2", "reason": "worse"})
    slow = counting_job(clock, started, 2, seconds=250.0, result=refused)
    with capture_logs() as logs:
        run_schedule(Interval(100.0), slow, stop, clock=clock, wait=clock.wait)
    assert started == [100.0, 450.0]  # ended at 350: 200 and 300 are skipped, next is 350 + 100
    assert any(e["event"] == "the run outlasted its slot; skipping missed runs" for e in logs)
    assert [e["reason"] for e in logs if e["event"] == "training run refused"] == ["worse", "worse"]


def test_a_run_that_cannot_start_is_a_failed_run_and_the_schedule_keeps_its_cadence() -> None:
    stop = threading.Event()
    clock = FakeClock(0.0, stop)
    started: list[float] = []
    ok = counting_job(clock, started, 3)

    def job() -> RunResult:
        if len(started) == 0:
            started.append(clock.now)
            raise BlockingIOError(11, "Resource temporarily unavailable")  # fork failed
        return ok()

    with capture_logs() as logs:
        runs = run_schedule(Interval(100.0), job, stop, clock=clock, wait=clock.wait)
    assert runs == 3 and started == [100.0, 200.0, 300.0]
    failed = [e for e in logs if e["event"] == "training run failed"]
    assert len(failed) == 1 and "BlockingIOError" in failed[0]["error"]


def test_stop_while_waiting_returns_without_running() -> None:
    stop = threading.Event()
    clock = FakeClock(0.0, stop)
    stop.set()
    assert run_schedule(Interval(100.0), lambda: pytest.fail("ran"), stop, clock=clock, wait=clock.wait) == 0


@pytest.mark.parametrize("code, summary, expected", [
    (EXIT_PUBLISHED, {"status": "published", "version": "v9"}, RunResult("published", {"version": "v9"})),
    (EXIT_REFUSED, {"status": "refused", "version": "v9", "reason": "worse"},
     RunResult("refused", {"version": "v9", "reason": "worse"})),
    (EXIT_FAILED, {"status": "busy", "error": "held"}, RunResult("skipped", {"reason": "held"})),
    (EXIT_FAILED, {"status": "failed", "error": "boom"}, RunResult("failed", {"error": "boom"})),
    (EXIT_FAILED, None, RunResult("failed", {"error": "exit status 1"})),
    (-9, None, RunResult("failed", {"error": "killed by signal 9"})),
])
def test_result_of_a_run(code: int, summary: dict[str, str] | None, expected: RunResult) -> None:
    assert result_of(code, summary) == expected
