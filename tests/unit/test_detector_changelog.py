"""Restoring from the state topic when the readings topic was deleted and created again: positions
recorded for the old topic (named by the ``pw.topic_id`` header, or older than a record that names
it) are no positions in the new one."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

import consumers.detector as detector_module
from pipeline.settings import load_settings

Log = list[tuple[str, int, str | None, str]]  # (kind, position, topic id or None, snapshot payload)


def restore(monkeypatch: pytest.MonkeyPatch, log: Log, current: str) -> tuple[int, bytes, int]:
    def record(kind: str, position: int, topic_id: str | None, payload: str) -> SimpleNamespace:
        h = [(detector_module.KIND, kind.encode()), (detector_module.GROUP, b"g"),
             (detector_module.PARTITION, b"0"), (detector_module.POSITION, str(position).encode())]
        if topic_id is not None:
            h.append((detector_module.TOPIC_ID, topic_id.encode()))
        return SimpleNamespace(headers=h, value=payload.encode())

    def read_to_end(settings: Any, topic: str, take: Any, **kwargs: Any) -> None:
        for entry in log:
            take(record(*entry))

    monkeypatch.setattr(detector_module, "read_to_end", read_to_end)
    monkeypatch.setattr(detector_module, "read_snapshot_header", lambda blob: {"asset": "pump-1"})
    producer = SimpleNamespace(send=lambda *a, **k: SimpleNamespace(get=lambda timeout: SimpleNamespace(offset=0)))
    s = load_settings(env={})
    s = dataclasses.replace(s, detector=dataclasses.replace(s.detector, group_id="g"))
    snaps, info = detector_module.read_changelog(s, producer, {0}, lambda p: 0, current)[0]
    position, blob = snaps["pump-1"]
    return position, blob, info.emitted


@pytest.mark.parametrize(("log", "current", "want"), [
    # written before records named their topic, then for topic A; the readings topic is now B
    ([("snapshot", 5000, None, "old"), ("progress", 5000, None, ""),
      ("snapshot", 6000, "A", "a"), ("progress", 6000, "A", "")], "B", (-1, b"a", -1)),
    # the same, and B's own snapshot since
    ([("snapshot", 5000, None, "old"), ("snapshot", 6000, "A", "a"), ("progress", 6000, "A", ""),
      ("snapshot", 40, "B", "b"), ("progress", 40, "B", "")], "B", (40, b"b", 40)),
    # an upgrade without a new topic: the unnamed records are this topic's
    ([("snapshot", 5000, None, "old"), ("progress", 5000, None, "")], "B", (5000, b"old", 5000)),
    ([("snapshot", 5000, None, "old"), ("snapshot", 6000, "B", "b"), ("progress", 5000, None, "")], "B",
     (6000, b"b", 5000)),
    # a broker that reports no topic ids: every record counts, as before the ids
    ([("snapshot", 6000, "A", "a"), ("snapshot", 5000, None, "old"), ("progress", 6000, "A", "")], "",
     (6000, b"a", 6000)),
])
def test_positions_of_another_topic_id_are_not_positions_here(
        monkeypatch: pytest.MonkeyPatch, log: Log, current: str, want: tuple[int, bytes, int]) -> None:
    assert restore(monkeypatch, log, current) == want
