"""``plantwatch alerts`` against a real broker: an accepted alert's span is trained on, the others are not."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cli.main import main
from consumers.kafka_clients import make_producer
from consumers.topics import ensure_topics, standard_topics
from trainers.train import Span, read_alert_ranges

T0 = 1_767_225_600_000
MINUTE = 60_000


def _publish(settings: Any, events: list[dict[str, Any]]) -> None:
    producer = make_producer(settings)
    try:
        for e in events:
            producer.send(settings.topics.alerts, key=e["asset"].encode(), value=json.dumps(e).encode())
        producer.send(settings.topics.alerts, key=b"x", value=b"{not an alert")
        producer.flush(timeout=30)
    finally:
        producer.close()


def _event(alert_id: str, asset: str, state: str, start: int, end: int | None = None, reason: str | None = None
           ) -> dict[str, Any]:
    return {"alert_id": alert_id, "asset": asset, "state": state, "start_ms": start, "end_ms": end,
            "step_ms": end or start, "score": 2.0, "peak_score": 3.0, "threshold": 1.0,
            "top_features": [{"feature": "Pressure", "contribution": 0.7}], "model_version": "v1", "reason": reason}


def test_an_accepted_alert_is_trained_on_and_listed_as_accepted(broker: Any, settings_for: Any,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_for(broker)
    ensure_topics(s, standard_topics(s))
    new_normal, fault = "a1b2c3d4e5f6a7b8c9d0e1f2", "ffff00001111222233334444"
    _publish(s, [
        _event(new_normal, "pump-000", "open", T0 + 10 * MINUTE),
        _event(new_normal, "pump-000", "close", T0 + 10 * MINUTE, T0 + 70 * MINUTE, "rebaselined"),
        _event(fault, "pump-001", "open", T0 + 20 * MINUTE),
    ])
    span = Span(T0, T0 + 120 * MINUTE)
    assert sorted(read_alert_ranges(s, span)) == [("pump-000", T0 + 10 * MINUTE, T0 + 70 * MINUTE),
                                                  ("pump-001", T0 + 20 * MINUTE, T0 + 120 * MINUTE)]
    flags = ["--set", f"kafka.bootstrap_servers={broker.bootstrap_servers}", "--set", f"topics.alerts={s.topics.alerts}"]
    capsys.readouterr()

    assert main(["alerts", "accept", new_normal[:8], "--note", "valve replaced", *flags]) == 0
    accepted = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert accepted["alert_id"] == new_normal and accepted["note"] == "valve replaced" and accepted["accepted_ms"]
    assert read_alert_ranges(s, span) == [("pump-001", T0 + 20 * MINUTE, T0 + 120 * MINUTE)]

    assert main(["alerts", "list", *flags]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["alert_id"], a["open"], a["accepted_ms"] is not None) for a in listed] == [
        (fault, True, False), (new_normal, False, True)]
    assert listed[1]["reason"] == "rebaselined" and listed[1]["top_features"] == ["Pressure"]

    assert main(["alerts", "list", "--open", *flags]) == 0
    assert [json.loads(line)["alert_id"] for line in capsys.readouterr().out.splitlines()] == [fault]

    assert main(["alerts", "accept", new_normal, *flags]) == 0  # again: nothing new is published
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["accepted"] == "already"
    assert main(["alerts", "accept", "0" * 24, *flags]) == 2
    assert "is not on the alerts topic" in capsys.readouterr().err
