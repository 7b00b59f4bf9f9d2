"""The live view of ``plantwatch detect --live`` follows the alerts topic of a real broker."""

from __future__ import annotations

import io
import json
import threading
import time
from types import SimpleNamespace

from rich.console import Console

from cli.live_view import run_with_view
from consumers.kafka_clients import make_producer
from consumers.topics import ensure_topics
from pipeline.settings import Settings


class _Detector:
    """Stands in for consumers.detector.Detector: counts readings until stopped."""

    def __init__(self) -> None:
        self.stats = SimpleNamespace(records=0, scored=0)
        self.engine = SimpleNamespace(model_version="v-test")
        self.swap_pauses_s: list[float] = []
        self.stop = threading.Event()

    def run(self) -> int:
        while not self.stop.wait(0.05):
            self.stats.records += 10
        return 0


def _event(alert_id: str, state: str) -> bytes:
    return json.dumps({"alert_id": alert_id, "asset": "pump-007", "state": state, "start_ms": 1_800_000_000_000,
                       "step_ms": 1_800_000_000_000, "score": 2.5, "peak_score": 2.5,
                       "top_features": [{"feature": "pressure", "contribution": 0.9}]}).encode()


def test_an_alert_opened_while_the_view_runs_shows_with_its_top_feature_and_goes_when_closed(
        settings: Settings) -> None:
    ensure_topics(settings, {settings.topics.alerts: 1})
    out = io.StringIO()
    detector = _Detector()
    runner = threading.Thread(target=lambda: run_with_view(
        detector, settings, console=Console(file=out, width=120, force_terminal=True, color_system=None),
        refresh_s=0.1))
    runner.start()
    producer = make_producer(settings)
    try:
        deadline = time.monotonic() + 60
        while "pump-007" not in out.getvalue() and time.monotonic() < deadline:
            # the follower starts at the topic's end: send until the view has it
            producer.send(settings.topics.alerts, value=_event("a1", "open")).get(timeout=30)
            time.sleep(0.5)
        assert "pressure 0.90" in out.getvalue() and "open alerts 1" in out.getvalue()
        producer.send(settings.topics.alerts, value=_event("a1", "close")).get(timeout=30)
        deadline = time.monotonic() + 30
        while "open alerts 0" not in out.getvalue().split("pump-007")[-1] and time.monotonic() < deadline:
            time.sleep(0.2)  # a redraw after the last one that showed the alert has none open
        assert "open alerts 0" in out.getvalue().split("pump-007")[-1]
    finally:
        producer.close()
        detector.stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert "model v-test" in out.getvalue()
