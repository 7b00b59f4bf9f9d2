"""What the demo prints: live alerts in event-time order, the replayed history's apart, fit progress."""

from __future__ import annotations

from typing import Any

import pytest

from cli.demo import MIN_SECONDS, AlertPrinter, alert_line, epoch_line
from cli.main import main, parse_args
from pipeline.simulate import Anomaly

LIVE_FROM = 1_800_000_000_000  # the live stream's first event time


def _alert(asset: str, state: str, start_s: float, step_s: float, score: float = 2.0) -> dict[str, Any]:
    return {"asset": asset, "state": state, "start_ms": int(LIVE_FROM + start_s * 1000),
            "step_ms": int(LIVE_FROM + step_s * 1000), "end_ms": None, "score": score,
            "top_features": [{"feature": "vibration", "contribution": 0.8}]}


def _printer(lines: list[str], hold_ms: int = 3000) -> AlertPrinter:
    return AlertPrinter(LIVE_FROM, [], lines.append, hold_ms=hold_ms)


def test_alerts_print_in_event_time_order_whatever_order_they_arrive_in() -> None:
    lines: list[str] = []
    printer = _printer(lines)
    for alert in [_alert("pump-002", "open", 20, 20), _alert("pump-001", "open", 12, 12),
                  _alert("pump-001", "close", 12, 18), _alert("pump-003", "open", 15, 15)]:
        printer.add(alert)
    printer.release()
    assert [(line.split()[1], line.split()[2]) for line in lines] == [
        ("OPEN", "pump-001"), ("OPEN", "pump-003"), ("CLOSE", "pump-001"), ("OPEN", "pump-002")]
    stamps = [line.split()[0] for line in lines]
    assert stamps == sorted(stamps)


def test_an_alert_waits_until_the_stream_is_hold_ms_past_it_so_a_late_earlier_one_goes_first() -> None:
    lines: list[str] = []
    printer = _printer(lines, hold_ms=3000)
    printer.add(_alert("pump-002", "open", 10, 10))
    printer.release(LIVE_FROM + 12_000)  # 2 s after it: held
    assert lines == []
    printer.add(_alert("pump-001", "open", 9, 9))  # arrives later, happened earlier
    printer.release(LIVE_FROM + 13_000)
    assert [line.split()[2] for line in lines] == ["pump-001", "pump-002"]
    printer.add(_alert("pump-004", "open", 30, 30))
    printer.release(LIVE_FROM + 13_500)
    assert len(lines) == 2  # still held


def test_alerts_of_the_replayed_history_are_counted_not_printed_and_updates_never_print() -> None:
    lines: list[str] = []
    printer = _printer(lines)
    printer.add(_alert("pump-005", "open", -600, -600))  # raised while the detector replayed the history
    printer.add(_alert("pump-005", "update", -600, -590))
    printer.add(_alert("pump-005", "close", -600, 5))  # its close comes during the live stream
    printer.add(_alert("pump-001", "update", 2, 4))
    printer.release()
    assert (lines, printer.history_alerts) == ([], 1)


def test_an_alert_line_names_the_injected_fault_it_overlaps() -> None:
    anomaly = Anomaly(asset="pump-001", kind="drift", start_ms=LIVE_FROM + 11_000, end_ms=LIVE_FROM + 30_000,
                      sensors=("vibration",))
    line = alert_line(_alert("pump-001", "open", 12.3, 12.3, score=2.5), [anomaly])
    assert line.endswith("OPEN   pump-001  score 2.50  top: vibration 0.80  [injected drift on vibration]")
    assert line.split()[0].endswith(":12.3")
    assert "injected" not in alert_line(_alert("pump-002", "open", 12.3, 12.3), [anomaly])


def test_epoch_lines_show_the_epoch_out_of_the_most_and_the_losses() -> None:
    assert epoch_line({"epoch": 3, "loss": 0.04213, "val_loss": 0.0388}, 12, 41.2) == \
        "  epoch 3/12  loss 0.0421  validation 0.0388  (41 s)"
    assert epoch_line({"epoch": 0, "val_loss": None}, 12, 2) == "  epoch 0/12  (2 s)"


def test_a_stream_too_short_for_a_fault_per_pump_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "20"]) == 2
    assert capsys.readouterr().err == ("plantwatch demo: --seconds 20: at least 55, for one injected fault per pump "
                                       "between the stream's first 15 s and its last 10 s\n")
    with pytest.raises(SystemExit):
        parse_args(["demo", "--help"])
    assert f"at least {MIN_SECONDS:.0f}" in " ".join(capsys.readouterr().out.split())
