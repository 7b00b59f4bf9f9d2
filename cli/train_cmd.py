"""``plantwatch train``: one retraining run, for cron, a systemd timer, a Kubernetes CronJob or a person.

Prints one JSON line on stdout (status, version, reason or error) and exits with
0 published, 3 refused by the gate (the serving model stays: not an error), 2 usage,
1 failure, including another run holding the lock (status ``busy``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from pipeline.settings import Settings, SettingsError

_REDRAW_S = 0.2  # scan progress redraws the terminal line at most this often
_CLEAR = "\r\x1b[2K"  # to the start of the line, and erase it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--end", metavar="TIME",
                   help="end of the training range, epoch milliseconds or ISO-8601 (default: now); for backfills")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.bundle import BundleError
    from pipeline.fit import FitError
    from pipeline.logs import get_logger
    from pipeline.readings import parse_timestamp_ms
    from pipeline.registry import RegistryError
    from trainers.archive_scan import ArchiveError
    from trainers.schedule import EXIT_FAILED, LockHeld, RunLock
    from trainers.train import TrainError, run_training

    log = get_logger("plantwatch.train")
    try:
        now_ms = parse_timestamp_ms(args.end) if args.end else int(time.time() * 1000)
    except ValueError as exc:
        raise UsageError(f"--end: {exc}") from None
    terminal = _Terminal(sys.stderr) if sys.stderr.isatty() else None
    t = settings.trainer
    try:
        with RunLock(t.lock_path, t.lock_max_age_s):
            outcome = run_training(settings, now_ms, progress=terminal)
    except LockHeld as exc:
        log.error("training run not started", error=str(exc))
        _emit({"status": "busy", "error": str(exc)})
        return EXIT_FAILED
    except SettingsError:
        raise
    except (TrainError, FitError, ArchiveError, RegistryError, BundleError) as exc:  # the data or the registry
        log.error("training run failed", error=str(exc), error_type=type(exc).__name__)
        _emit({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    except Exception as exc:  # the job's one outcome line must exist whatever went wrong
        log.exception("training run failed", error=str(exc))
        _emit({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    finally:
        if terminal is not None:
            terminal.close()
    _emit(outcome.summary())
    return outcome.exit_code


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
