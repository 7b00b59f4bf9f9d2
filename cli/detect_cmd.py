"""``plantwatch detect``: the detector daemon (a consumer-group member on the readings topic)."""

from __future__ import annotations

import argparse
import threading
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
    stop = stop_on_signals()
    try:
        bundle = load_bundle(args.model, settings.model.features) if args.model else _wait_for_current(settings, stop)
    except BundleError as exc:
        raise UsageError(f"cannot load the model: {exc}") from None
    if bundle is None:
        return 0  # stopped while waiting for a first model
    ensure_topics(settings, standard_topics(settings))
    detector = Detector(settings, bundle, stop=stop, follow_registry=args.model is None)
    if settings.detector.http_port:
        serve(settings.detector.http_port, alive=lambda: time.monotonic() - detector.last_loop < 60,
              ready=lambda: detector.ready)
    return detector.run()


def _wait_for_current(settings: Settings, stop: threading.Event):  # type: ignore[no-untyped-def]
    """The registry's current bundle; a fresh deployment waits (logging) until a first one is published."""
    from pipeline.logs import get_logger
    from pipeline.registry import RegistryError, current_version, load_current

    log = get_logger("plantwatch.detect")
    while not stop.is_set():
        try:
            if current_version(settings.registry.uri) is not None:
                return load_current(settings.registry.uri, expected_features=settings.model.features)
        except RegistryError as exc:
            log.warning("registry not usable yet", error=str(exc))
        log.info("waiting for a first model in the registry", registry=settings.registry.uri)
        stop.wait(settings.detector.registry_poll_s)
    return None
