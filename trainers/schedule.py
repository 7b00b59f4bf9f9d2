"""Running the training job periodically: a 5-field cron matcher, a run lock, and the loop.

* :class:`Cron` understands ``minute hour day-of-month month day-of-week`` with ``*``,
  lists, ranges, steps (``*/15``, ``8-18/2``, ``5/10``) and month/day names, in UTC. As in
  Vixie cron, when both day fields are restricted a day matching either one matches.
* :class:`RunLock` lets one training run at a time hold a lock file naming its pid, host
  and start time. The file is created whole (written aside, then hard-linked into place),
  so it is never half-written. A lock left by a crashed run (its pid is gone, on this
  host) or older than a maximum age (a hung run, or a run on another host sharing the
  file) is broken with a warning.
* :func:`run_schedule` calls the job at each due time until stopped, one run at a time,
  logs each run's outcome, and skips times missed while a run was still going rather than
  running again at once. A stop (SIGTERM) waits for the run in progress, never interrupts it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pipeline.logs import get_logger

log = get_logger(__name__)

_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_WEEKDAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_SEARCH_DAYS = 8 * 366  # two leap cycles: any satisfiable expression matches within this


class CronError(ValueError):
    """A cron expression is malformed or can never match."""


# ---------------------------------------------------------------- cron


def _value(text: str, lo: int, hi: int, names: dict[str, int], expr: str) -> int:
    token = text.lower()
    if token in names:
        return names[token]
    if not token.isdigit():
        raise CronError(f"{expr!r}: {text!r} is not a number{' or a name' if names else ''}")
    n = int(token)
    if not lo <= n <= hi:
        raise CronError(f"{expr!r}: {n} is outside {lo}-{hi}")
    return n


def _field(text: str, lo: int, hi: int, names: dict[str, int], expr: str) -> frozenset[int]:
    """The values one field allows: a comma list of ``*``, ``a``, ``a-b``, each with an optional ``/step``."""
    out: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = _value(step_text, 1, hi, {}, expr) if step_text else 1
        if span == "*":
            first, last = lo, hi
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = _value(a, lo, hi, names, expr), _value(b, lo, hi, names, expr)
            if first > last:
                raise CronError(f"{expr!r}: range {span!r} runs backwards")
        else:
            first = _value(span, lo, hi, names, expr)
            last = hi if step_text else first  # "5/10" means 5, 15, 25, …
        out.update(range(first, last + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool     # the day-of-month field is not "*…"
    weekdays_restricted: bool
    expr: str

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """Parse and check that the expression matches some minute (``30 0 31 2 *`` never does)."""
        parts = expr.split()
        if len(parts) != 5:
            raise CronError(f"{expr!r}: need 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
        minute, hour, dom, month, dow = parts
        weekdays = _field(dow, 0, 7, _WEEKDAYS, expr)
        cron = cls(_field(minute, 0, 59, {}, expr), _field(hour, 0, 23, {}, expr), _field(dom, 1, 31, {}, expr),
                   _field(month, 1, 12, _MONTHS, expr), frozenset(d % 7 for d in weekdays),  # 7 is Sunday too
                   not dom.startswith("*"), not dow.startswith("*"), expr)
        cron.next_after(datetime(2000, 1, 1, tzinfo=UTC).timestamp())
        return cron

    def _day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_date or by_weekday
        return by_date and by_weekday

    def matches(self, t: datetime) -> bool:
        return t.minute in self.minutes and t.hour in self.hours and self._day_matches(t)

    def next_after(self, ts: float) -> float:
        """The first matching minute strictly after ``ts`` (epoch seconds, UTC)."""
        t = datetime.fromtimestamp(ts, UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = t.replace(hour=0, minute=0)
        hours, minutes = sorted(self.hours), sorted(self.minutes)
        for _ in range(_SEARCH_DAYS):
            if self._day_matches(day):
                for h in hours:
                    for m in minutes:
                        candidate = day.replace(hour=h, minute=m)
                        if candidate >= t:
                            return candidate.timestamp()
            day += timedelta(days=1)
        raise CronError(f"{self.expr!r} never matches")


@dataclass(frozen=True)
class Interval:
    seconds: float

    def next_after(self, ts: float) -> float:
        return ts + self.seconds


class Schedule(Protocol):
    def next_after(self, ts: float) -> float: ...


def schedule_from(cron: str, interval_s: float) -> Schedule:
    """The cron expression if set, else a fixed interval."""
    return Cron.parse(cron) if cron.strip() else Interval(interval_s)


# ---------------------------------------------------------------- lock


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started_at: float  # epoch seconds

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds")
        return f"pid {self.pid} on {self.host} since {since}"


class LockHeld(RuntimeError):
    """Another training run holds the lock."""

    def __init__(self, path: str, holder: LockHolder | None) -> None:
        who = holder.describe() if holder else "a process that is replacing it"
        super().__init__(f"another training run holds {path}: {who}")
        self.holder = holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file on the local disk (or a shared volume) for one training run."""

    def __init__(self, path: str, max_age_s: float, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.clock = clock
        self._mine: bytes | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld`; a stale lock is broken first."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        me = LockHolder(os.getpid(), socket.gethostname(), self.clock())
        content = json.dumps({"pid": me.pid, "host": me.host, "started_at": me.started_at}).encode()
        holder: LockHolder | None = None
        for _ in range(3):  # another process may break or release it between our steps
            if self._create(content):
                self._mine = content
                return
            raw = self._read(self.path)
            if raw is None:
                continue  # released meanwhile
            holder = _parse(raw)
            why = self._stale(holder)
            if why is None:
                raise LockHeld(self.path, holder)
            log.warning("breaking a stale training lock", path=self.path, reason=why,
                        holder=holder.describe() if holder else raw[:200].decode(errors="replace"))
            self._break(raw)
        raise LockHeld(self.path, holder)

    def release(self) -> None:
        """Remove the lock if it is still ours (a run past the max age may have lost it)."""
        if self._mine is not None and self._read(self.path) == self._mine:
            os.unlink(self.path)
        self._mine = None

    def _create(self, content: bytes) -> bool:
        tmp = f"{self.path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)  # fails if the lock exists: creation and content are one step
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def _stale(self, holder: LockHolder | None) -> str | None:
        if holder is None:
            return "unreadable lock file"
        if holder.host == socket.gethostname() and not _alive(holder.pid):
            return f"process {holder.pid} is gone"
        age = self.clock() - holder.started_at
        if age > self.max_age_s:
            return f"held for {age:.0f} s, more than {self.max_age_s:.0f} s"
        return None

    def _break(self, seen: bytes) -> None:
        """Move the stale lock aside; if it changed since it was judged, put the new one back."""
        aside = f"{self.path}.{secrets.token_hex(4)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != seen:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)


def _parse(raw: bytes) -> LockHolder | None:
    try:
        d = json.loads(raw)
        return LockHolder(int(d["pid"]), str(d["host"]), float(d["started_at"]))
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- loop

# What the exit status of a training run (`plantwatch train`) means to cron, systemd and the loop below.
EXIT_PUBLISHED, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3

Status = Literal["published", "refused", "failed", "skipped"]


@dataclass(frozen=True)
class RunResult:
    status: Status
    detail: dict[str, Any]  # version, reason or error: what the log line says about the run


def result_of(returncode: int, summary: dict[str, Any] | None) -> RunResult:
    """A run's result from its exit status and the JSON summary it printed (if it got that far)."""
    s = summary or {}
    if returncode == EXIT_PUBLISHED:
        return RunResult("published", {"version": s.get("version")})
    if returncode == EXIT_REFUSED:
        return RunResult("refused", {"version": s.get("version"), "reason": s.get("reason")})
    if s.get("status") == "busy":
        return RunResult("skipped", {"reason": s.get("error")})
    if returncode < 0:
        return RunResult("failed", {"error": f"killed by signal {-returncode}"})
    return RunResult("failed", {"error": s.get("error") or f"exit status {returncode}"})


def run_schedule(schedule: Schedule, job: Callable[[], RunResult], stop: threading.Event, *,
                 run_now: bool = False, clock: Callable[[], float] = time.time,
                 wait: Callable[[float], bool] | None = None) -> int:
    """Run ``job`` at each due time until ``stop`` is set; returns the number of runs.

    ``wait(seconds)`` sleeps and returns True once stopped (default: ``stop.wait``).
    """
    pause = stop.wait if wait is None else wait
    due = clock() if run_now else schedule.next_after(clock())
    runs = 0
    while True:
        log.info("next training run", at=_iso(due))
        while (left := due - clock()) > 0:
            if pause(min(left, 60.0)):  # re-read the clock every minute: it may jump
                return runs
        if stop.is_set():
            return runs
        started = clock()
        result = job()
        runs += 1
        _log_result(result, clock() - started)
        due = schedule.next_after(started)
        if due <= clock():
            skipped_to = schedule.next_after(clock())
            log.warning("the run outlasted its slot; skipping missed runs", missed=_iso(due), next=_iso(skipped_to))
            due = skipped_to


def _log_result(result: RunResult, seconds: float) -> None:
    fields = {"outcome": result.status, "duration_s": round(seconds, 1), **result.detail}
    if result.status == "failed":
        log.error("training run failed", **fields)
    elif result.status == "skipped":
        log.warning("training run skipped", **fields)
    else:
        log.info(f"training run {result.status}", **fields)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
