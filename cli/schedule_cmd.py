"""``plantwatch schedule``: run ``plantwatch train`` every ``trainer.interval_s`` or on ``trainer.cron``.

Each run is a child process with this command's settings (config file, ``--set``, and the
environment it inherits). A run's memory, TensorFlow's included, goes back to the system
when it ends; a crash or an out-of-memory kill of one run is logged as a failed run and
the scheduler carries on; and the child takes the run lock exactly as a cron-started
``plantwatch train`` would, so the two can share a machine. SIGTERM or SIGINT stops the
scheduler between runs; a run in progress is finished first. The run dies with the
scheduler: it runs in a session of its own (a terminal's Ctrl-C reaches the scheduler only)
and the kernel kills it when the scheduler dies, even by ``kill -9`` (Linux
``PR_SET_PDEATHSIG``), so no orphaned run goes on holding the lock.

Exit status of the scheduler itself: 0 stopped by SIGTERM or SIGINT, 2 bad settings (such as
``trainer.cron``), 1 the scheduler failed. A run's exit status is logged, never returned: see
:func:`exit_codes_help`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from typing import Any

from pipeline.settings import Settings
from trainers.schedule import RunResult, result_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's table as written
    p.description = textwrap.fill(p.description or "", 79)
    p.epilog = exit_codes_help()
    p.add_argument("--now", action="store_true", help="run once right away, then on the schedule")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from consumers.signals import stop_on_signals
    from pipeline.logs import get_logger
    from trainers.schedule import CronError, run_schedule, schedule_from

    t = settings.trainer
    try:
        schedule = schedule_from(t.cron, t.interval_s)
    except CronError as exc:
        raise UsageError(f"trainer.cron: {exc}") from None
    argv = [sys.executable, "-m", "cli", "train", *_forwarded(args)]
    log = get_logger("plantwatch.schedule")
    log.info("scheduler started", cron=t.cron or None, interval_s=None if t.cron else t.interval_s,
             lock=t.lock_path)
    runs = run_schedule(schedule, lambda: run_child(argv), stop_on_signals(), run_now=args.now)
    log.info("scheduler stopped", runs=runs)
    return 0


def exit_codes_help() -> str:
    """The scheduler's exit statuses and how it reads a run's, for ``--help``."""
    from cli.train_cmd import EXIT_CODES

    outcome = {"published": "published", "refused": "refused", "busy": "skipped", "failed": "failed"}
    lines = ["exit status: 0 stopped by SIGTERM or SIGINT, 2 bad arguments or settings",
             "(such as trainer.cron), 1 the scheduler itself failed.",
             "",
             "each run is a `plantwatch train` process; its exit status is logged as the",
             "run's outcome, and the scheduler carries on:"]
    lines += [f"  {code:<5}  {outcome[status]:<9}  {meaning}" for code, (status, meaning) in EXIT_CODES.items()
              if status in outcome]
    lines.append(f"  {'other':<5}  {'failed':<9}  a crash, an out-of-memory kill or a signal")
    return "\n".join(lines)


def _forwarded(args: argparse.Namespace) -> list[str]:
    """This command's settings flags, so each run sees the same settings."""
    out = ["--config", args.config] if args.config else []
    for assignment in args.assignments:
        out += ["--set", assignment]
    if args.log_level:
        out += ["--log-level", args.log_level]
    if args.log_format:
        out += ["--log-format", args.log_format]
    return out


def run_child(argv: list[str]) -> RunResult:
    """One training run in a child process; its logs go to our stderr, its summary line is read."""
    from cli.train_cmd import EXIT_BUSY
    from consumers.child_process import die_with_parent

    # The run is ours: in a session of its own, Ctrl-C in a terminal reaches only the scheduler
    # (which lets the run finish, as for SIGTERM); and if the scheduler dies, even by kill -9,
    # the kernel kills the run (PR_SET_PDEATHSIG), whose lock any next run then takes over.
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False, start_new_session=True,
                          preexec_fn=die_with_parent())
    summary = _last_json(done.stdout)
    if done.returncode == EXIT_BUSY:  # skipped, not failed, even if the summary line was lost
        summary = {"error": "another training run holds the lock", **(summary or {}), "status": "busy"}
    return result_of(done.returncode, summary)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None
