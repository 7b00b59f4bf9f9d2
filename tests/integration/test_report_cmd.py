"""``plantwatch report --alert ID`` against a real broker: the alert is found on the alerts topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from consumers.kafka_clients import make_producer
from consumers.topics import ensure_topics, standard_topics
from tests.unit.test_report_cmd import (MINUTE, T0, Case, alert_rows, assert_self_contained, full_replay_events,
                                        keep_sample, plant)

__all__ = ["plant"]  # the module-scoped fixture: a simulated drift in an archive, a model in a registry


def test_an_alert_published_on_the_topic_is_reported(plant: Case, broker: Any, settings_for: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    s = settings_for(broker)
    ensure_topics(s, standard_topics(s))
    events = full_replay_events(plant, T0 + 60 * MINUTE)
    producer = make_producer(s)
    try:
        producer.send(s.topics.alerts, key=b"noise", value=b"{not an alert")
        for e in events:  # as the detector publishes them, with the readings' source beside
            body = {**e.to_dict(), "source": {"topic": s.topics.readings, "partition": 0, "offsets": [0, 1]}}
            producer.send(s.topics.alerts, key=e.asset.encode(), value=json.dumps(body).encode())
        producer.flush()
    finally:
        producer.close()
    close = next(e for e in events if e.state == "close")
    out = tmp_path / "alert"
    argv = plant.argv("--alert", close.alert_id, "--out", str(out), "--set",
                      f"kafka.bootstrap_servers={broker.bootstrap_servers}", "--set", f"topics.alerts={s.topics.alerts}")
    capsys.readouterr()  # the topics' creation is logged
    assert main(argv) == 0
    keep_sample(out, "simulated-drift-alert-from-broker")
    assert capsys.readouterr().out.splitlines()[-1].startswith("report: asset=pump-000 ")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    [row] = alert_rows(page)
    assert row["alert id"] == close.alert_id
    assert f'<tr class="focus"><td>A1</td><td><code>{close.alert_id}</code>' in page

    assert main([*argv[:2], "0" * 24, *argv[3:]]) == 2
    assert capsys.readouterr().err == (f"plantwatch report: alert '{'0' * 24}' is not on the alerts topic "
                                       f"'{s.topics.alerts}' ({len(events)} alert events read)\n")
