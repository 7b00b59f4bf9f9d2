"""The live view: what it shows of a detector, and that it redraws until stopped."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from rich.console import Console

from cli.live_view import LiveView, OpenAlerts, Rate, Sample, detector_sample, gauge_total, render


def _text(renderable: Any, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(renderable)
    return console.export_text()


def _alert(alert_id: str, asset: str, state: str, score: float, peak: float | None = None) -> dict[str, Any]:
    return {"alert_id": alert_id, "asset": asset, "state": state, "start_ms": 1_800_000_000_000, "score": score,
            "peak_score": peak if peak is not None else score,
            "top_features": [{"feature": "vibration", "contribution": 0.71}, {"feature": "flow", "contribution": 0.2}]}


def test_the_view_shows_rate_lag_model_swaps_and_each_open_alert_with_its_top_features() -> None:
    sample = Sample(at_s=0, records=50_700, scored=50_472, lag=12, model_version="20261203T112044Z-c981c157", swaps=1,
                    last_swap_ms=3.24, open_alerts=[_alert("a1", "pump-003", "open", 2.41, 3.5)])
    text = _text(render(sample, 30.0))
    assert "readings/s 30.0" in text and "lag 12" in text and "scored 50,472" in text and "open alerts 1" in text
    assert "model 20261203T112044Z-c981c157" in text and "swaps 1 (last paused scoring 3.2 ms)" in text
    row = next(line for line in text.splitlines() if "pump-003" in line)
    assert "2.41" in row and "3.50" in row and "vibration 0.71, flow 0.20" in row and "08:00:00" in row


def test_before_anything_is_measured_the_view_says_so_and_has_no_table() -> None:
    text = _text(render(Sample(0, 0, 0, None, "v1", 0, None), None))
    assert "readings/s -" in text and "lag -" in text and "open alerts 0" in text and "asset" not in text


def test_more_open_alerts_than_rows_are_counted() -> None:
    alerts = [_alert(f"a{i}", f"pump-{i:03}", "open", 1.0 + i) for i in range(11)]
    text = _text(render(Sample(0, 0, 0, 0, "v1", 0, None, alerts), 1.0))
    assert sum("pump-" in line for line in text.splitlines()) == 8 and "… and 3 more" in text


def test_open_alerts_follow_open_update_and_close_highest_peak_first() -> None:
    alerts = OpenAlerts()
    alerts.add(_alert("a1", "pump-001", "open", 1.5))
    alerts.add(_alert("a2", "pump-002", "open", 1.2))
    alerts.add(_alert("a2", "pump-002", "update", 1.3, peak=4.0))
    assert [(a["asset"], a["peak_score"]) for a in alerts.current()] == [("pump-002", 4.0), ("pump-001", 1.5)]
    alerts.add(_alert("a1", "pump-001", "close", 0.4))
    alerts.add(_alert("zz", "pump-009", "close", 0.4))  # a close of an alert opened before the view started
    assert [a["asset"] for a in alerts.current()] == ["pump-002"]


def test_the_rate_is_over_the_last_seconds_only() -> None:
    rate = Rate(window_s=5)
    assert rate.add(0, 0) is None
    assert rate.add(1, 100) == 100
    for t in range(2, 11):
        rate.add(t, 100 + (t - 1) * 10)  # slows from 100/s to 10/s
    assert rate.add(11, 200) == 10


def test_a_sample_of_a_detector_reads_its_counters_model_and_swaps() -> None:
    detector = SimpleNamespace(stats=SimpleNamespace(records=10, scored=7), engine=SimpleNamespace(model_version="v2"),
                               swap_pauses_s=[0.002, 0.0031])
    alerts = OpenAlerts()
    alerts.add(_alert("a1", "pump-001", "open", 1.5))
    s = detector_sample(detector, alerts, lambda: 4)
    assert (s.records, s.scored, s.lag, s.model_version, s.swaps, round(s.last_swap_ms or 0, 1), len(s.open_alerts)) \
        == (10, 7, 4, "v2", 2, 3.1, 1)


def test_the_lag_is_the_sum_over_partitions_and_unknown_until_set() -> None:
    gauge = Gauge("lag_test", "lag", ["partition"], registry=CollectorRegistry())
    assert gauge_total(gauge) is None
    gauge.labels("0").set(3)
    gauge.labels("1").set(4)
    assert gauge_total(gauge) == 7


def test_the_view_redraws_while_running_and_shows_the_last_sample_when_stopped() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    counter = {"records": 0}

    def sample() -> Sample:
        counter["records"] += 25
        return Sample(time.monotonic(), counter["records"], 0, 0, "v1", 0, None)

    view = LiveView(sample, console=console, refresh_s=0.05).start()
    time.sleep(0.4)
    view.stop()
    drawn = counter["records"] // 25
    assert drawn >= 4  # first draw, several refreshes, the last one at stop
    assert "model v1" in out.getvalue()
