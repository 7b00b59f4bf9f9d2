"""``plantwatch detect``: the detector daemon (a consumer-group member on the readings topic)."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings

if TYPE_CHECKING:
    from consumers.health import Health


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="serve this bundle directory and never swap (default: follow the registry's current "
                        "version, hot-swapping when a new one is published)")
    p.add_argument("--live", action="store_true",
                   help="show a live view on the terminal: readings/s, lag, model version, swaps, open alerts")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the probes first, then wait (alive, not ready) for a first model and for the broker,
    then detect. A stop signal during either wait exits 0."""
    from cli.main import UsageError
    from consumers.health import Health
    from consumers.http_server import serve
    from consumers.kafka_clients import require_bootstrap
    from consumers.signals import stop_on_signals
    from consumers.topics import ensure_topics_retrying, standard_topics
    from pipeline.bundle import BundleError, load_bundle

    require_bootstrap(settings)
    if args.live and not sys.stdout.isatty():
        raise UsageError("--live needs a terminal on stdout")
    stop = stop_on_signals()
    health = Health()
    if not args.model:  # before the probes answer: loading the registry's modules takes a while
        health.waiting_for = "first model"
    server = serve(settings.detector.http_port, health=health) if settings.detector.http_port else None
    try:
        try:
            bundle = load_bundle(args.model, settings.model.features) if args.model \
                else _wait_for_current(settings, stop, health)
        except BundleError as exc:
            raise UsageError(f"cannot load the model: {exc}") from None
        if bundle is None:
            return 0  # stopped while waiting for a first model
        health.model_loaded = True
        if not ensure_topics_retrying(settings, standard_topics(settings), stop=stop, health=health):
            return 0  # stopped while waiting for the broker
        from pipeline.logs import get_logger
        from pipeline.tf_threads import limit_tf_threads

        if not limit_tf_threads(settings.detector.tf_threads):
            get_logger("plantwatch.detect").warning("TensorFlow had started: detector.tf_threads not applied")
        from consumers.detector import Detector  # TensorFlow: imported once the probes answer

        detector = Detector(settings, bundle, stop=stop, follow_registry=args.model is None, health=health)
        if args.live:
            from cli.live_view import run_with_view

            return run_with_view(detector, settings)
        return int(detector.run())
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def _wait_for_current(settings: Settings, stop: threading.Event, health: Health):  # type: ignore[no-untyped-def]
    """The registry's serving bundle. A fresh deployment waits (logging) until a first one is
    published, and a serving version that cannot be loaded (damaged, or deleted under its pointer)
    until an operator rolls back or a new one is published: a restart would fail the same way. A
    sound bundle of other features than the configured ones is a configuration error (exit 2)."""
    from pipeline.bundle import BundleError, FeatureMismatch
    from pipeline.logs import get_logger
    from pipeline.registry import RegistryError, current_version, load_current

    log = get_logger("plantwatch.detect")
    health.waiting_for = "first model"
    try:
        while not stop.is_set():
            try:
                if current_version(settings.registry.uri) is not None:
                    return load_current(settings.registry.uri, expected_features=settings.model.features)
                log.info("waiting for a first model in the registry", registry=settings.registry.uri)
            except FeatureMismatch:
                raise
            except BundleError as exc:
                health.waiting_for = "a loadable model"
                log.error("the registry's serving model cannot be loaded; waiting for a rollback or a new version",
                          registry=settings.registry.uri, error=str(exc))
            except (RegistryError, OSError) as exc:  # (OSError: the store did not answer this time)
                log.warning("registry not usable yet", error=str(exc))
            stop.wait(settings.detector.registry_poll_s)
        return None
    finally:
        health.waiting_for = None
