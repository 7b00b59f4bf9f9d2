"""``plantwatch archive``: the archiver daemon (its own consumer group on the readings topic),
writing every reading to the Parquet archive the trainer scans."""

from __future__ import annotations

import argparse

from pipeline.settings import Settings


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {port}")
    return port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=_port, default=0, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port (default 0: off)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.archiver import Archiver
    from consumers.kafka_clients import require_bootstrap
    from consumers.signals import stop_on_signals
    from consumers.topics import ensure_topics

    require_bootstrap(settings)
    t = settings.topics
    ensure_topics(settings, {t.readings: t.partitions})
    return Archiver(settings, stop=stop_on_signals()).run(http_port=args.http_port)
