"""``plantwatch detect``: the detector daemon (a consumer-group member on the readings topic)."""

from __future__ import annotations

import argparse
import time

from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="serve this bundle directory and never swap (default: follow the registry's current "
                        "version, hot-swapping when a new one is published)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from consumers.detector import Detector
    from consumers.http_server import serve
    from consumers.kafka_clients import require_bootstrap
    from consumers.signals import stop_on_signals
    from consumers.topics import ensure_topics, standard_topics
    from pipeline.bundle import BundleError, load_bundle

    require_bootstrap(settings)
    try:
        bundle = load_bundle(args.model, settings.model.features) if args.model else _current(settings)
    except BundleError as exc:
        raise UsageError(f"cannot load the model: {exc}") from None
    ensure_topics(settings, standard_topics(settings))
    stop = stop_on_signals()
    detector = Detector(settings, bundle, stop=stop, follow_registry=args.model is None)
    if settings.detector.http_port:
        serve(settings.detector.http_port, alive=lambda: time.monotonic() - detector.last_loop < 60,
              ready=lambda: detector.ready)
    return detector.run()


def _current(settings: Settings):  # type: ignore[no-untyped-def]
    from pipeline.registry import load_current

    return load_current(settings.registry.uri, expected_features=settings.model.features)
