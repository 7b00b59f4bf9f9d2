"""Running the training job periodically: a 5-field cron matcher, a run lock, and the loop.

* :class:`Cron` understands ``minute hour day-of-month month day-of-week`` with ``*``,
  lists, ranges, steps (``*/15``, ``8-18/2``, ``5/10``) and month/day names, in UTC. As in
  Vixie cron, when both day fields are restricted a day matching either one matches.
* :class:`RunLock` lets one training run at a time hold a lock file naming its owner (host,
  pid, start time, a random token) and a heartbeat the run renews: a lease. The file is
  created whole (written aside, then hard-linked into place), so it is never half-written.
  A lock left by a crashed run (its pid is gone, on this host), one whose heartbeat is older
  than the lease (a killed or stuck run, on any host sharing the file) or one older than a
  maximum age (a hung run) is taken over with a warning.
* :func:`run_schedule` calls the job at each due time until stopped, one run at a time,
  logs each run's outcome, and skips times missed while a run was still going rather than
  running again at once. A stop (SIGTERM) waits for the run in progress, never interrupts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from consumers.child_process import die_with_parent
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
    token: str = ""    # random per run: who holds it, whatever the pid and host say
    heartbeat_at: float | None = None  # last renewal (epoch seconds); None in a lock without a lease

    @property
    def beat(self) -> float:
        return self.started_at if self.heartbeat_at is None else self.heartbeat_at

    def describe(self, now: float | None = None) -> str:
        since = datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds")
        beat = f", last heartbeat {now - self.beat:.0f} s ago" if now is not None and self.heartbeat_at else ""
        return f"pid {self.pid} on {self.host} since {since}{beat}"


class LockHeld(RuntimeError):
    """Another training run holds the lock."""

    def __init__(self, path: str, holder: LockHolder | None, now: float | None = None) -> None:
        who = holder.describe(now) if holder else "a process that is replacing it"
        super().__init__(f"another training run holds {path}: {who}")
        self.holder = holder


class LockLost(RuntimeError):
    """This run's lease was taken over: its heartbeat stopped for longer than the lease (a
    stalled process or a partitioned volume) and another run holds the lock now."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed process that nobody reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


_GUARD_SUFFIX = ".takeover"   # exists while one run deletes a stale lock
_GUARD_STALE_S = 30.0         # a takeover takes milliseconds: a guard this old was abandoned
_ACQUIRE_TRIES = 40
_TAKEOVER_WAIT_S = 0.05


class RunLock:
    """An exclusive lock file for one training run, held as a lease.

    The file (JSON) names its owner: host, pid, start time and a random token, and a heartbeat
    time. With ``lease_s`` set, a thread renews the heartbeat every ``heartbeat_s`` (default a
    quarter of the lease), and a lock whose heartbeat is older than ``lease_s`` is taken over:
    its holder was killed or is stuck, on whatever host (a lock without a heartbeat, written
    without a lease, is judged by its pid and age only). That works across hosts sharing the
    file (a volume the trainers mount), where a pid means nothing. On this host, a lock whose
    pid is gone is taken over at once. A lock held longer than ``max_age_s`` is taken over even
    with a fresh heartbeat (a hung run).

    Taking over is safe against a race of takers. A lock is only ever created exclusively (a
    complete file hard-linked into place: the link fails if the lock exists), and the winner
    re-reads it to confirm its token. Deleting the expired lock is one taker's job at a time:
    the one that created the ``<lock>.takeover`` guard file (exclusively, the same way) checks
    that the lock still holds exactly what it judged expired (a holder that renewed meanwhile
    keeps it), deletes it and removes the guard; then all takers race to create the lock, and
    one link wins. A renewal writes a new file and renames it over the lock after checking
    that the token is still ours, then re-reads it; a run that finds another token has lost
    its lease (:meth:`check` raises :class:`LockLost`, so it does not publish). Hosts' clocks
    must agree to well within the lease (NTP).
    """

    def __init__(self, path: str, max_age_s: float, *, lease_s: float | None = None,
                 heartbeat_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else (lease_s / 4 if lease_s else None)
        self.clock = clock
        self.token: str | None = None
        self.lost: str | None = None  # why this run lost its lease
        self._mine: LockHolder | None = None
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None
        self._renew_lock = threading.Lock()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld`; an expired or stale lock is taken over first.
        With a lease, the heartbeat thread starts."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        now = self.clock()
        me = LockHolder(os.getpid(), socket.gethostname(), now, secrets.token_hex(16),
                        now if self.lease_s else None)
        holder: LockHolder | None = None
        for _ in range(_ACQUIRE_TRIES):  # others may take over, release or create it between our steps
            if self._create(self.path, _encode(me)):
                found = _parse(self._read(self.path) or b"")
                if found is None or found.token != me.token:  # re-read: not ours after all
                    continue
                self._mine, self.token, self.lost = me, me.token, None
                self._start_heartbeat()
                return
            raw = self._read(self.path)
            if raw is None:
                continue  # released meanwhile
            holder = _parse(raw)
            why = self._stale(holder)
            if why is None:
                raise LockHeld(self.path, holder, self.clock())
            if not self._remove_stale(raw, why, holder, me):
                time.sleep(_TAKEOVER_WAIT_S)  # another run is taking it over: see who won
        raise LockHeld(self.path, holder, self.clock())

    def _remove_stale(self, seen: bytes, why: str, holder: LockHolder | None, me: LockHolder) -> bool:
        """Delete the lock judged stale (``seen``), unless it changed since. One taker at a time:
        the taker that creates the ``.takeover`` guard file (exclusively) compares and deletes;
        the others wait. Then every taker races to create the lock, and exactly one link wins.
        False when another taker holds the guard."""
        guard = self.path + _GUARD_SUFFIX
        if not self._create(guard, _encode(me)):
            self._clear_abandoned_guard(guard)
            return False
        try:
            if self._read(self.path) != seen:
                return True  # renewed, released or taken over meanwhile: judge again
            log.warning("taking over a stale training lock", path=self.path, reason=why,
                        holder=holder.describe(self.clock()) if holder else seen[:200].decode(errors="replace"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        finally:
            found = _parse(self._read(guard) or b"")
            if found is not None and found.token == me.token:
                os.unlink(guard)

    def _clear_abandoned_guard(self, guard: str) -> None:
        """A guard left by a taker that died mid-takeover (its pid is gone here, or it is older
        than a takeover could take) would block every takeover: remove it."""
        raw = self._read(guard)
        if raw is None:
            return
        owner = _parse(raw)
        abandoned = (owner is None or self.clock() - owner.started_at > _GUARD_STALE_S
                     or (owner.host == socket.gethostname() and not _alive(owner.pid)))
        if abandoned and self._read(guard) == raw:
            log.warning("removing an abandoned lock takeover guard", path=guard)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (a run that lost its lease
        leaves the new holder's lock alone)."""
        self._stop_heartbeat()
        if self.token is not None:
            found = _parse(self._read(self.path) or b"")
            if found is not None and found.token == self.token:
                os.unlink(self.path)
        self._mine = self.token = None

    def check(self) -> None:
        """Raise :class:`LockLost` unless the lock file still carries this run's token."""
        if self.token is None:
            raise LockLost(f"{self.path} is not held by this run")
        if self.lost is None:
            found = _parse(self._read(self.path) or b"")
            if found is None or found.token != self.token:
                self.lost = f"the lock now names {found.describe(self.clock()) if found else 'nobody'}"
        if self.lost is not None:
            raise LockLost(f"this training run lost {self.path}: {self.lost}")

    def renew(self) -> None:
        """Write a fresh heartbeat: a new file renamed over the lock, after checking the token
        is still ours, and re-read to confirm. Raises :class:`LockLost` if it is not."""
        with self._renew_lock:
            if self._mine is None:
                return
            self.check_settled()
            beat = dataclasses.replace(self._mine, heartbeat_at=self.clock())
            tmp = self._write_tmp(_encode(beat))
            try:
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._mine = beat
            self.check()

    def check_settled(self, attempts: int = 3, pause_s: float = 0.2) -> None:
        """:meth:`check`, forgiving a moment without the file (between a taker's deletion of an
        expired lock and its own lock's creation nothing is there). A renewal written between a
        taker's comparison and its deletion is deleted with the lock: this run then finds the
        taker's token, or none, and does not publish."""
        for n in range(attempts):
            try:
                self.check()
                return
            except LockLost:
                if n == attempts - 1 or self._read(self.path) is not None:
                    raise
                self.lost = None
                time.sleep(pause_s)

    # ------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        if not self.heartbeat_s:
            return
        self._stop_beat.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="trainer-lock-heartbeat", daemon=True)
        self._beat.start()

    def _stop_heartbeat(self) -> None:
        self._stop_beat.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=10)
        self._beat = None

    def _heartbeat(self) -> None:
        assert self.heartbeat_s is not None
        while not self._stop_beat.wait(self.heartbeat_s):
            try:
                self.renew()
            except LockLost as exc:
                log.error("training lock lost: another run took it over; this run will not publish",
                          path=self.path, reason=str(exc))
                return
            except OSError as exc:  # the next beat tries again; the lease allows three misses
                log.warning("training lock heartbeat failed", path=self.path, error=str(exc))

    # ------------------------------------------------------------ files
    def _write_tmp(self, content: bytes) -> str:
        tmp = f"{self.path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _create(self, path: str, content: bytes) -> bool:
        tmp = self._write_tmp(content)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # fails if the file exists: creation and content are one step
            # Judged by the link count, not link()'s answer, which NFS may get wrong on a retry.
            return os.stat(tmp).st_nlink == 2
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
        now = self.clock()
        if self.lease_s is not None and holder.heartbeat_at is not None and now - holder.beat > self.lease_s:
            return f"no heartbeat for {now - holder.beat:.0f} s, more than the lease of {self.lease_s:.0f} s"
        age = now - holder.started_at
        if age > self.max_age_s:
            return f"held for {age:.0f} s, more than {self.max_age_s:.0f} s"
        return None


def _encode(holder: LockHolder) -> bytes:
    body: dict[str, Any] = {"pid": holder.pid, "host": holder.host, "started_at": holder.started_at,
                            "token": holder.token}
    if holder.heartbeat_at is not None:
        body["heartbeat_at"] = holder.heartbeat_at
    return json.dumps(body).encode()


def _parse(raw: bytes) -> LockHolder | None:
    try:
        d = json.loads(raw)
        beat = d.get("heartbeat_at")
        return LockHolder(int(d["pid"]), str(d["host"]), float(d["started_at"]), str(d.get("token", "")),
                          None if beat is None else float(beat))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# ---------------------------------------------------------------- child processes

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
        try:
            result = job()
        except Exception as exc:  # (starting the run failed: no process, no memory) the next slot tries again
            result = RunResult("failed", {"error": f"{type(exc).__name__}: {exc}"})
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
