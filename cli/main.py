"""The ``plantwatch`` command: one entry point, one subcommand per job.

Every subcommand takes ``--config FILE``, repeatable ``--set section.key=value``, ``--log-level``
and ``--log-format``, before or after the subcommand's name (``plantwatch --config pw.toml models
publish DIR`` and ``plantwatch models publish DIR --config pw.toml`` are the same);
``PLANTWATCH_<SECTION>__<KEY>`` environment variables sit between the file and ``--set``. Heavy
imports (TensorFlow, Kafka) happen inside the subcommand that needs them, so ``plantwatch config``
and ``--help`` stay instant.

TensorFlow's own log lines stay out of the output: :data:`TF_ENVIRONMENT` is set (where the
environment does not set it already) before any command imports TensorFlow.

A reader that goes away early (``plantwatch models list | head -1``) ends the command quietly
with exit status 141 (128 + SIGPIPE, what a shell reports for ``yes | head -1``), so scripts
under ``set -o pipefail`` see the same as with any other tool; the rest of the output is
discarded.
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TextIO

from pipeline.settings import Settings, SettingsError, load_settings, parse_assignments

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args, settings) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("cli.config_cmd", "show the effective settings or the configuration reference"),
    "fit": ("cli.fit_cmd", "train a model bundle from a CSV/Parquet file of normal readings"),
    "replay": ("cli.replay_cmd", "score a CSV/Parquet file through grid, model, thresholds and alerts"),
    "broker": ("cli.broker_cmd", "run the embedded Kafka-compatible broker in the foreground"),
    "detect": ("cli.detect_cmd", "run the detector daemon: score readings from Kafka, publish alerts"),
    "evaluate": ("cli.evaluate_cmd", "replay labelled recordings through the detection engine and report detection metrics and baselines"),
    "archive": ("cli.archive_cmd", "run the archiver daemon: write readings from Kafka to the Parquet archive"),
    "demo": ("cli.demo_cmd", "run the whole system locally: broker, simulated plant, model, detector, live alerts"),
    "models": ("cli.models_cmd", "list, show, promote, roll back or unpin model versions in the registry"),
    "train": ("cli.train_cmd", "retrain from the archive, gate against the serving model, publish and announce "
                               "(exit 0 published, 3 refused, 75 busy, 1 failed)"),
    "schedule": ("cli.schedule_cmd", "run the training job every trainer.interval_s or on trainer.cron, one run at a time"),
    "simulate": ("cli.simulate_cmd", "simulate a plant: produce readings to Kafka or write normal history"),
    "alerts": ("cli.alerts_cmd", "list the alerts on the alerts topic, or accept one's span as the new normal for the next retraining"),
    "report": ("cli.report_cmd", "draw what the detector saw for an asset and time range, or one alert: PNG and HTML"),
}

EXIT_FAILED = 1         # the command failed (e.g. the registry's store kept failing)
EXIT_USAGE = 2          # bad arguments or settings
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C outside a daemon's own stop handling
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: whoever read stdout went away (`| head`)

# Read by TensorFlow once, when a command first imports it; the environment's own values win.
TF_ENVIRONMENT: dict[str, str] = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # no INFO or WARNING lines from TensorFlow's C++ side
    # oneDNN's kernels print an ERROR line ("oneDNN supports DT_BOOL only on platforms with
    # AVX-512. Falling back to …") at the first fit or scoring call, even on AVX-512 machines,
    # which level 2 does not hide. Without them (Eigen kernels) the same fit reached the same
    # validation error, and scoring with carried state took 7.9 µs a reading against 8.4.
    "TF_ENABLE_ONEDNN_OPTS": "0",
}

_SET_DEST = "_assignments_"  # + nesting level: each level's --set list, joined outer to inner after parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plantwatch", description="Streaming anomaly detection for industrial sensors.")
    parser.add_argument("--version", action=_VersionAction)
    _add_settings_options(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
        _add_settings_options(p, 1)
    return parser


def _add_settings_options(parser: argparse.ArgumentParser, level: int) -> None:
    """The settings options on ``parser`` and on every subcommand under it, so they work in any position.

    Their defaults are suppressed: a level where an option is absent leaves what an outer level parsed.
    """
    group = parser.add_argument_group("settings options (before or after the command)")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML settings file")
    group.add_argument("--set", dest=f"{_SET_DEST}{level}", action="append", default=argparse.SUPPRESS,
                       metavar="SECTION.KEY=VALUE",
                       help="override one setting (repeatable); beats the file and the environment")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS,
                       help="log level")
    group.add_argument("--log-format", choices=["auto", "json", "console"], default=argparse.SUPPRESS,
                       help="log format")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_settings_options(child, level + 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the settings options gathered from every position."""
    args = build_parser().parse_args(argv)
    found = vars(args)
    levels = sorted((k for k in found if k.startswith(_SET_DEST)), key=lambda k: int(k[len(_SET_DEST):]))
    args.assignments = [a for key in levels for a in found.pop(key)]
    for name in ("config", "log_level", "log_format"):
        found.setdefault(name, None)
    return args


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = dict(parse_assignments(args.assignments))
    if args.log_level:
        overrides["log.level"] = args.log_level
    if args.log_format:
        overrides["log.format"] = args.log_format
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status. A closed stdout ends it quietly with 141."""
    quiet_tensorflow(os.environ)
    closed = threading.Event()
    previous_hook = threading.excepthook
    threading.excepthook = lambda hook_args: _thread_exception(hook_args, closed, previous_hook)
    ignored_sigint = _wake_on_closed_output(closed)
    try:
        try:
            code = _main(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # here rather than at exit, where a closed pipe would print a traceback
    except BrokenPipeError:
        if not _silence_closed_output():
            raise  # a socket's broken pipe, not our reader's: a real error
        return EXIT_CLOSED_PIPE
    except SystemExit as exc:  # --help: argparse drops an unbuffered stdout's write errors itself
        if exc.code in (0, None) and _silence_closed_output():
            return EXIT_CLOSED_PIPE
        raise
    finally:
        threading.excepthook = previous_hook
        if ignored_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return EXIT_CLOSED_PIPE if closed.is_set() else code


def _wake_on_closed_output(closed: threading.Event) -> bool:
    """Where SIGINT is ignored (a command started in the background, or under ``nohup``), the
    SIGINT :func:`_interrupt_main` sends would not wake the main thread: let it through when a
    thread found stdout closed, and keep ignoring any other SIGINT. True if a handler was installed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        return False

    def on_sigint(signum: int, frame: Any) -> None:
        if closed.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return True


def quiet_tensorflow(environ: MutableMapping[str, str]) -> None:
    """Put :data:`TF_ENVIRONMENT` into ``environ`` where it sets none of those keys itself."""
    for key, value in TF_ENVIRONMENT.items():
        environ.setdefault(key, value)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"plantwatch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pipeline import storage
    from pipeline.logs import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    storage.configure(settings.storage)
    run: Callable[[argparse.Namespace, Settings], int] = importlib.import_module(args._module).run
    try:
        return run(args, settings)
    except (SettingsError, UsageError) as exc:
        print(f"plantwatch {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except storage.StorageError as exc:  # the store is unreachable or kept failing: one line, no traceback
        print(f"plantwatch {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not type(exc).__module__.startswith("kafka."):
            raise
        # e.g. a one-shot command whose broker does not answer: one line naming where it looked
        print(f"plantwatch {args.command}: Kafka: {type(exc).__name__}: {exc} (kafka.bootstrap_servers is "
              f"{settings.kafka.bootstrap_servers or 'empty'!r})", file=sys.stderr)
        return EXIT_FAILED


def _thread_exception(hook_args: Any, closed: threading.Event, previous: Callable[[Any], object]) -> None:
    """A thread that wrote to a closed stdout (the demo's alert printer) stops the command, quietly."""
    if isinstance(hook_args.exc_value, BrokenPipeError) and _silence_closed_output():
        if not closed.is_set():
            closed.set()
            _interrupt_main()
        return
    previous(hook_args)


def _interrupt_main() -> None:
    """SIGINT to the main thread: a daemon's stop handler runs, or KeyboardInterrupt ends the command.

    A real signal, unlike ``_thread.interrupt_main``, also wakes a main thread blocked in a wait.
    """
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    else:
        _thread.interrupt_main()


def _silence_closed_output() -> bool:
    """Point stdout and stderr at /dev/null where their reader has gone; True if stdout's had.

    Python ignores SIGPIPE (sockets, Kafka's included, rely on that), so a write to a pipe
    nobody reads raises BrokenPipeError; /dev/null takes whatever is still buffered, so the
    flush at exit stays silent (the pattern in Python's documentation of SIGPIPE).
    """
    gone = False
    for stream in (sys.stdout, sys.stderr):
        if _reader_gone(stream):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
            gone = gone or stream is sys.stdout
    return gone


def _reader_gone(stream: TextIO | None) -> bool:
    """The stream is a pipe or socket whose reading end is closed (poll reports an error or hang-up)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)  # type: ignore[union-attr]
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no descriptor (replaced stream), or no poll()
        return False


class _VersionAction(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"plantwatch {version()}")
        parser.exit()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("plantwatch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class UsageError(ValueError):
    """A command-line problem the user can fix; printed without a traceback."""


if __name__ == "__main__":
    sys.exit(main())
