"""The ``plantwatch`` command: one entry point, one subcommand per job.

Every subcommand takes ``--config FILE`` and repeatable ``--set section.key=value``;
``PLANTWATCH_<SECTION>__<KEY>`` environment variables sit between the two. Heavy imports
(TensorFlow, Kafka) happen inside the subcommand that needs them, so ``plantwatch config``
and ``--help`` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

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
    "train": ("cli.train_cmd", "retrain from the archive, gate against the serving model, publish and announce (exit 0 published, 3 refused)"),
    "schedule": ("cli.schedule_cmd", "run the training job every trainer.interval_s or on trainer.cron, one run at a time"),
    "simulate": ("cli.simulate_cmd", "simulate a plant: produce readings to Kafka or write normal history"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plantwatch", description="Streaming anomaly detection for industrial sensors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", help="TOML settings file")
        p.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one setting (repeatable); beats the file and the environment")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
        p.add_argument("--log-format", choices=["auto", "json", "console"], help="log format")
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = dict(parse_assignments(args.assignments))
    if args.log_level:
        overrides["log.level"] = args.log_level
    if args.log_format:
        overrides["log.format"] = args.log_format
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"plantwatch: {exc}", file=sys.stderr)
        return 2
    from pipeline.logs import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    run: Callable[[argparse.Namespace, Settings], int] = importlib.import_module(args._module).run
    try:
        return run(args, settings)
    except (SettingsError, UsageError) as exc:
        print(f"plantwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class UsageError(ValueError):
    """A command-line problem the user can fix; printed without a traceback."""


if __name__ == "__main__":
    sys.exit(main())
