"""A readings log that began again under a running archiver: between two polls (Kafka answers a
position past a recreated or truncated log's end as out of range, and the client starts again from
its earliest record, before its metadata names the new topic id), or seen as a new topic id in the
metadata. No reading of the new log is lost, and no commit skips any (stand-in client, real files)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kafka import TopicPartition

from consumers.archiver import Archiver
from consumers.kafka_clients import reread_moved_topic
from pipeline.readings import encode_wide
from pipeline.settings import PUMP_FEATURES, load_settings
from trainers.archive_scan import scan_archive

T0 = 1_767_225_600_000
TP = TopicPartition("readings", 0)


class _Client:
    """Only what the archiver asks of its client outside a poll: the topic id its metadata names."""

    def __init__(self) -> None:
        self.topic = "old"
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda topic: self.topic))
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _poll(offsets: range, first_s: int) -> dict[TopicPartition, list[SimpleNamespace]]:
    values = {f: 1.0 for f in PUMP_FEATURES}
    return {TP: [SimpleNamespace(topic=TP.topic, partition=0, offset=o, key=b"p1", timestamp=T0,
                                 value=encode_wide("p1", T0 + (first_s + i) * 1_000, values))
                 for i, o in enumerate(offsets)]}


def test_readings_of_a_log_that_began_again_between_polls_are_neither_the_old_logs_nor_committed_past(
        tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")})
    archiver = Archiver(settings)
    client = _Client()
    archiver.consumer = client  # type: ignore[assignment]
    archiver.topic_ids = {0: "old"}  # as on assignment
    archiver.add(_poll(range(0, 6), 0))  # the old log
    archiver.flush()
    assert archiver.committable()[TP].offset == 6
    archiver.add(_poll(range(0, 4), 100))  # the new log from its start; the metadata still names the old id
    assert [tid for tid, _ in archiver.pending[TP].chunks] == [""]
    assert archiver.committable()[TP].offset == 0  # not the old log's 6: the new log's 0-3 are not written yet
    client.topic = "new"  # the metadata refresh: the new id names the log already being read, no move
    assert reread_moved_topic(client, {}, archiver.topic_ids, "new", archiver.log) == ({}, [])  # type: ignore[arg-type]
    archiver.add(_poll(range(4, 8), 104))
    assert [tid for tid, _ in archiver.pending[TP].chunks] == ["", "new"]
    archiver.flush()
    assert archiver.committable()[TP].offset == 8 and client.seeks == []
    scanned = list(scan_archive(settings.archive.uri, settings.model.features, start_ms=T0, end_ms=T0 + 86_400_000))
    assert sum(b.n_records for b in scanned) == 6 + 8  # both logs' readings, none taken for a duplicate


def test_a_partition_whose_topic_moved_commits_the_new_topics_start_not_the_old_topics_end(tmp_path: Path) -> None:
    """The metadata names a new id while the partition's readings of the old topic are written but not
    committed: committing the old topic's end would make the next owner skip the new topic's first records."""
    settings = load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")})
    archiver = Archiver(settings)
    client = _Client()
    client.seek_to_beginning = lambda *tps: client.seeks.extend((tp, 0) for tp in tps)  # type: ignore[attr-defined]
    client.highwater = lambda tp: None  # type: ignore[attr-defined]
    archiver.consumer = client  # type: ignore[assignment]
    archiver.topic_ids = {0: "old"}
    archiver.take(_poll(range(0, 6), 0))
    archiver.flush()
    assert archiver.committable()[TP].offset == 6
    client.topic = "new"
    archiver.take({})  # nothing polled: the client waits past the new topic's end
    assert client.seeks == [(TP, 0)] and archiver.committable()[TP].offset == 0
    archiver.take(_poll(range(0, 3), 100))
    archiver.flush()
    assert archiver.committable()[TP].offset == 3
    assert [tid for tid, _ in archiver.pending[TP].chunks] == []
    scanned = list(scan_archive(settings.archive.uri, settings.model.features, start_ms=T0, end_ms=T0 + 86_400_000))
    assert sum(b.n_records for b in scanned) == 6 + 3
