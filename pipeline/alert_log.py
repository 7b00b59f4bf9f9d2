"""The alert history on the alerts topic, folded per alert.

The detector publishes each alert's lifecycle (``open``, ``update``, ``close``). An operator
who decides that what an alert shows is the plant's new normal (a lasting move to another
operating point, not a fault) *accepts* it: ``plantwatch alerts accept`` publishes one more
event for the alert, state ``accepted``, carrying the alert's last published fields. Training
leaves every alert's span out of the data (a model must learn normal behaviour only) except
the accepted ones, so the next retraining learns the new operating point and the alert
closes when the new model serves.

One fold for the trainer (which spans to leave out) and for ``plantwatch alerts`` (list,
accept), so both read the topic the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LIFECYCLE = ("open", "update", "close")
ACCEPTED = "accepted"


@dataclass
class AlertRecord:
    """One alert as its events on the topic describe it."""

    alert_id: str
    asset: str
    start_ms: int
    end_ms: int | None = None        # where it closed (None while open)
    reason: str | None = None        # why it closed
    accepted_ms: int | None = None   # when an operator accepted it as normal
    note: str = ""
    last: dict[str, Any] = field(default_factory=dict)  # its latest lifecycle event, as published

    @property
    def is_open(self) -> bool:
        return self.end_ms is None


class AlertLog:
    """Alert id → record, folded from the raw values of the alerts topic in order; records that
    are not alert events (wrong JSON, missing fields) are skipped. ``keep_last`` keeps each
    alert's latest lifecycle event (for showing and accepting it; training needs only spans)."""

    def __init__(self, keep_last: bool = True) -> None:
        self.records: dict[str, AlertRecord] = {}
        self.keep_last = keep_last

    def add(self, value: bytes | None) -> None:
        try:
            e = json.loads(value or b"")
            key, asset, start, state = str(e["alert_id"]), str(e["asset"]), int(e["start_ms"]), e.get("state")
        except (ValueError, KeyError, TypeError):
            return
        rec = self.records.setdefault(key, AlertRecord(key, asset, start))
        if state == ACCEPTED:
            try:
                rec.accepted_ms = int(e["accepted_ms"])
            except (KeyError, TypeError, ValueError):
                return
            rec.note = str(e.get("note") or "")
        elif state in LIFECYCLE:
            if self.keep_last:
                rec.last = e
            if state == "close" and e.get("end_ms") is not None:
                try:
                    rec.end_ms = int(e["end_ms"])
                except (TypeError, ValueError):
                    return
                rec.reason = e.get("reason")


def fold_alert_events(values: Iterable[bytes | None], keep_last: bool = True) -> dict[str, AlertRecord]:
    """:class:`AlertLog` over ``values``."""
    log = AlertLog(keep_last)
    for value in values:
        log.add(value)
    return log.records


MIN_ID_PREFIX = 6


def may_name(wanted: str, alert_id: str) -> bool:
    """Whether a user's ``wanted`` may name this alert: its id, or a prefix of it of 6
    characters or more (so a typo does not pick an alert)."""
    return alert_id == wanted or (len(wanted) >= MIN_ID_PREFIX and alert_id.startswith(wanted))


def matching_ids(ids: Iterable[str], wanted: str) -> list[str]:
    """The alert ids ``wanted`` names: that id when present, else every id it is a prefix of, sorted."""
    found = sorted({i for i in ids if may_name(wanted, i)})
    return [wanted] if wanted in found else found


def excluded_spans(records: Iterable[AlertRecord], open_until_ms: int) -> list[tuple[str, int, int]]:
    """(asset, start, end) of every alert not accepted as normal; an open one runs to ``open_until_ms``."""
    return [(r.asset, r.start_ms, open_until_ms if r.end_ms is None else r.end_ms)
            for r in records if r.accepted_ms is None]


def acceptance_event(record: AlertRecord, now_ms: int, note: str = "") -> dict[str, Any]:
    """The ``accepted`` event to publish for ``record``: its last published fields, so every reader
    of the topic gets a well-formed alert event, plus when and why it was accepted."""
    return {**record.last, "alert_id": record.alert_id, "asset": record.asset, "start_ms": record.start_ms,
            "state": ACCEPTED, "step_ms": now_ms, "accepted_ms": now_ms, "note": note}
