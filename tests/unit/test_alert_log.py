"""Folding the alerts topic: spans, closes, acceptances, and records that are not alert events."""

from __future__ import annotations

import json

from pipeline.alert_log import ACCEPTED, AlertLog, acceptance_event, excluded_spans, fold_alert_events


def _b(**e: object) -> bytes:
    return json.dumps(e).encode()


def test_spans_closes_and_acceptances_are_folded_per_alert() -> None:
    values = [
        _b(alert_id="a", asset="p1", state="open", start_ms=100, step_ms=100, score=2.0),
        b"{broken", None, _b(alert_id="x"), _b(alert_id="b", asset="p2", state="open", start_ms="soon"),
        _b(alert_id="b", asset="p2", state="open", start_ms=200, step_ms=200),
        _b(alert_id="a", asset="p1", state="close", start_ms=100, end_ms=150, step_ms=154, reason="recovered"),
        _b(alert_id="a", asset="p1", state=ACCEPTED, start_ms=100, accepted_ms=999, note="new pump"),
        _b(alert_id="b", asset="p2", state=ACCEPTED, start_ms=200),  # no accepted_ms: not an acceptance
    ]
    recs = fold_alert_events(values)
    assert set(recs) == {"a", "b"}
    a, b = recs["a"], recs["b"]
    assert (a.end_ms, a.reason, a.accepted_ms, a.note, a.last["state"]) == (150, "recovered", 999, "new pump", "close")
    assert (b.is_open, b.accepted_ms) == (True, None)
    assert excluded_spans(recs.values(), open_until_ms=500) == [("p2", 200, 500)]
    assert AlertLog(keep_last=False).records == {}


def test_an_acceptance_carries_the_alerts_last_fields() -> None:
    recs = fold_alert_events([_b(alert_id="a", asset="p1", state="open", start_ms=100, step_ms=100, score=2.0,
                                 top_features=[{"feature": "f", "contribution": 1.0}])])
    event = acceptance_event(recs["a"], now_ms=5000, note="ok")
    assert event["state"] == ACCEPTED and event["accepted_ms"] == event["step_ms"] == 5000
    assert event["score"] == 2.0 and event["top_features"] and event["note"] == "ok"
    folded = fold_alert_events([json.dumps(event).encode()])
    assert folded["a"].accepted_ms == 5000


def test_an_id_names_itself_a_prefix_of_six_names_one_alert_and_a_shorter_one_none() -> None:
    from pipeline.alert_log import matching_ids

    ids = ["pump-1-000100", "pump-1-000100b", "pump-2-000300"]
    assert matching_ids(ids, "pump-1-000100") == ["pump-1-000100"]  # exact wins over longer ids
    assert matching_ids(ids, "pump-2") == ["pump-2-000300"]
    assert matching_ids(ids, "pump-1") == ["pump-1-000100", "pump-1-000100b"]  # ambiguous: the caller says so
    assert matching_ids(ids, "pump") == []  # under six characters: only an exact id
