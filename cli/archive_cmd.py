"""``plantwatch archive``: the archiver daemon (its own consumer group on the readings topic),
writing every reading to the Parquet archive the trainer scans."""

from __future__ import annotations

import argparse
import inspect

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
    """Serve the probes first, then wait (alive, not ready) for the broker, then archive.
    A stop signal while waiting exits 0."""
    from consumers.archiver import Archiver
    from consumers.health import Health
    from consumers.http_server import serve
    from consumers.kafka_clients import require_bootstrap
    from consumers.signals import stop_on_signals
    from consumers.topics import ensure_topics_retrying

    require_bootstrap(settings)
    stop = stop_on_signals()
    health = Health(needs_model=False)
    server = serve(args.http_port, health=health, setting="--http-port") if args.http_port else None
    try:
        t = settings.topics
        if not ensure_topics_retrying(settings, {t.readings: t.partitions}, stop=stop, health=health):
            return 0  # stopped while waiting for the broker
        if "health" in inspect.signature(Archiver).parameters:
            archiver = Archiver(settings, stop=stop, health=health)
        else:  # an Archiver that keeps its own fields: health follows them
            archiver = Archiver(settings, stop=stop)
            health.follow(archiver)
        return int(archiver.run(http_port=0))  # the endpoints are already served (from ``health``)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
