"""``plantwatch train``: one retraining run, for cron, a systemd timer, a Kubernetes CronJob or a person.

Prints one JSON line on stdout (status, version, reason or error) and exits with one of
:data:`EXIT_CODES`: 0 published, 3 refused by the gate (the serving model stays: not an
error), 75 busy (another run holds the lock: nothing was tried, try later), 1 failed, 2 usage.

Unless ``grid.period_s`` is set (``--set``, config file or environment), the grid period is the
serving model's, or for a first model the archive's own spacing (:func:`trainers.train.run_training`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
import time
from typing import Any, TextIO

from cli.evaluate_cmd import period_is_set
from pipeline.settings import Settings, SettingsError
from trainers.schedule import EXIT_FAILED, EXIT_PUBLISHED, EXIT_REFUSED, EXIT_USAGE

EXIT_BUSY = 75  # EX_TEMPFAIL in sysexits.h ("try again later"); systemd shows it as 75/TEMPFAIL

# exit status -> (summary status, meaning): the contract with cron, systemd, Kubernetes and `plantwatch schedule`
EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_PUBLISHED: ("published", "a new version passed the gate, is current and announced"),
    EXIT_REFUSED: ("refused", "the gate kept the serving model (an outcome, not an error)"),
    EXIT_BUSY: ("busy", "another run holds trainer.lock_path; nothing was tried"),
    EXIT_FAILED: ("failed", "the run failed: data, archive, registry or other error"),
    EXIT_USAGE: ("usage", "bad arguments or settings (no JSON line)"),
}

_REDRAW_S = 0.2  # scan progress redraws the terminal line at most this often
_CLEAR = "\r\x1b[2K"  # to the start of the line, and erase it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's table as written
    p.description = textwrap.fill(p.description or "", 79)
    p.epilog = exit_codes_help()
    p.add_argument("--end", metavar="TIME",
                   help="end of the training range, epoch milliseconds or ISO-8601 (default: now); for backfills")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.bundle import BundleError
    from pipeline.fit import FitError
    from pipeline.logs import get_logger
    from pipeline.registry import RegistryError
    from pipeline.storage import StorageError
    from trainers.archive_scan import ArchiveError
    from trainers.schedule import LockHeld, LockLost, RunLock
    from trainers.train import TrainError, run_training

    log = get_logger("plantwatch.train")
    try:
        now_ms = end_ms(args.end) if args.end else int(time.time() * 1000)
    except ValueError as exc:
        raise UsageError(f"--end: {exc}") from None
    terminal = _Terminal(sys.stderr) if sys.stderr.isatty() else None
    t = settings.trainer
    previous = _stop_on_sigterm()
    try:
        with RunLock(t.lock_path, t.lock_max_age_s, lease_s=t.lock_lease_s) as lock:
            outcome = run_training(settings, now_ms, progress=terminal, before_publish=lock.check,
                                   period_from_data=not period_is_set(args))
    except LockHeld as exc:
        log.error("training run not started", error=str(exc))
        _emit({"status": "busy", "error": str(exc)})
        return EXIT_BUSY
    except SettingsError:
        raise
    except (TrainError, FitError, ArchiveError, RegistryError, BundleError, StorageError, LockLost) as exc:
        # the data, the registry, its store, or a lease another run took over
        log.error("training run failed", error=str(exc), error_type=type(exc).__name__)
        _emit({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    except Stopped as exc:  # the lock is released on the way out; nothing half-published is current
        log.error("training run stopped", error=str(exc))
        _emit({"status": "failed", "error": f"Stopped: {exc}"})
        return EXIT_FAILED
    except Exception as exc:  # the job's one outcome line must exist whatever went wrong
        log.exception("training run failed", error=str(exc))
        _emit({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if terminal is not None:
            terminal.close()
    _emit(outcome.summary())
    return outcome.exit_code


class Stopped(BaseException):
    """SIGTERM (a CronJob's deadline, a node drain, systemd stopping the unit) ended the run. Not an
    :class:`Exception`, so no ``except Exception`` on the way (a fallback, a retry) carries on with it."""


def _stop_on_sigterm() -> Any:
    """SIGTERM raises :class:`Stopped` in the run, so its lock is released and its outcome line
    written (as PID 1 in a container, SIGTERM without a handler does nothing until the SIGKILL).
    Returns the handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_IGN)  # once: a second SIGTERM would break off the lock's release
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    return signal.signal(signal.SIGTERM, stop)


def end_ms(text: str) -> int:
    """``--end``: digits are epoch milliseconds (as a string, the ISO parser would misread them), else ISO-8601."""
    from pipeline.readings import DecodeLimits, parse_timestamp_ms

    digits = text.strip()
    ms = int(digits) if digits.isdigit() else parse_timestamp_ms(text)
    limits = DecodeLimits()
    if not limits.min_ts_ms <= ms <= limits.max_ts_ms:  # the readings' own bounds: nothing is archived outside
        raise ValueError(f"{text.strip()} is outside the years 2000-2199 that readings may carry")
    return ms


def exit_codes_help() -> str:
    """The exit statuses, for ``--help``."""
    lines = ["exit status (the JSON line on stdout names the same status):"]
    lines += [f"  {code:<5}  {status:<9}  {meaning}" for code, (status, meaning) in EXIT_CODES.items()]
    return "\n".join(lines)


def _emit(summary: dict[str, Any]) -> None:
    print(json.dumps(summary), flush=True)


class _Terminal:
    """A status line on a terminal, rewritten in place: rows scanned, epoch, loss.

    The cursor is left at the start of the line, so a log line printed meanwhile simply
    overwrites the status, which is drawn again on the next event.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.scan = ""
        self.fit = ""
        self.drawn = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if "rows" in event:
            if event["phase"] != "train":
                self.fit = ""  # training is over: the gate's scan is all there is to show
            self.scan = f"{event['phase']} scan pass {event['pass']}: {event['rows']:,} rows"
        else:
            self.fit = "  ".join(f"{k} {_short(v)}" for k, v in event.items() if k != "phase")
        now = time.monotonic()
        if "rows" in event and now - self.drawn < _REDRAW_S:
            return
        self.drawn = now
        self.stream.write(_CLEAR + " | ".join(part for part in (self.scan, self.fit) if part) + "\r")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
