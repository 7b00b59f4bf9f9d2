"""A readings log that began again under a running archiver: between two polls (Kafka answers a
position past a recreated or truncated log's end as out of range, and the client starts again from
its earliest record, before its metadata names the new topic id), or seen as a new topic id in the
metadata. No reading of the new log is lost, and no commit skips any (stand-in client, real files)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaConnectionError
from kafka.future import Future

from consumers.archiver import Archiver
from consumers.kafka_clients import reread_moved_topic
from pipeline.readings import encode_wide
from pipeline.settings import PUMP_FEATURES, load_settings
from trainers.archive_scan import scan_archive

T0 = 1_767_225_600_000
TP = TopicPartition("readings", 0)


class _Client:
    """Only what the archiver asks of its client outside a poll: the topic id its metadata names, and a
    metadata refresh, which brings ``refreshed`` (None: the refresh fails)."""

    def __init__(self) -> None:
        self.topic = "old"
        self.refreshed: str | None = None
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.committed: dict[TopicPartition, int] = {}
        cluster = SimpleNamespace(topic_id=lambda topic: self.topic, request_update=self._request_update,
                                  metadata_refresh_in_progress=False)
        self._client = SimpleNamespace(cluster=cluster)

    def _request_update(self) -> Future:
        if self.refreshed is None:
            return Future().failure(KafkaConnectionError("no broker answered"))
        self.topic = self.refreshed
        return Future().success(None)

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.committed.update({tp: om.offset for tp, om in offsets.items()})


def _poll(offsets: range, first_s: int, epochs: dict[int, int] | None = None
          ) -> dict[TopicPartition, list[SimpleNamespace]]:
    """Records of these offsets; ``epochs``: offset → the record's leader epoch (none given: the record
    has no ``leader_epoch``, as a client that does not report it)."""
    values = {f: 1.0 for f in PUMP_FEATURES}
    return {TP: [SimpleNamespace(topic=TP.topic, partition=0, offset=o, key=b"p1", timestamp=T0,
                                 value=encode_wide("p1", T0 + (first_s + i) * 1_000, values),
                                 **({} if epochs is None else {"leader_epoch": epochs[o]}))
                 for i, o in enumerate(offsets)]}


def _archiver(tmp_path: Path) -> tuple[Archiver, _Client]:
    settings = load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")})
    archiver = Archiver(settings)
    client = _Client()
    client.seek_to_beginning = lambda *tps: client.seeks.extend((tp, 0) for tp in tps)  # type: ignore[attr-defined]
    client.highwater = lambda tp: None  # type: ignore[attr-defined]
    archiver.consumer = client  # type: ignore[assignment]
    archiver.topic_ids = {0: "old"}  # as on assignment
    return archiver, client


def _scanned(archiver: Archiver) -> int:
    s = archiver.settings
    return sum(b.n_records for b in scan_archive(s.archive.uri, s.model.features, start_ms=T0, end_ms=T0 + 86_400_000))


def test_a_recreated_topics_readings_are_stamped_with_the_id_a_metadata_refresh_brings(tmp_path: Path) -> None:
    archiver, client = _archiver(tmp_path)
    archiver.take(_poll(range(0, 6), 0))
    archiver.flush()
    client.refreshed = "new"
    archiver.take(_poll(range(0, 4), 100))  # the new log from its start, before the periodic refresh
    assert [tid for tid, _ in archiver.pending[TP].chunks] == ["new"]
    assert archiver.committable()[TP].offset == 0
    archiver.take(_poll(range(4, 8), 104))
    archiver.flush()
    assert client.seeks == [] and archiver.committable()[TP].offset == 8 and _scanned(archiver) == 6 + 8


def test_a_truncated_log_keeps_its_id_and_a_later_recreation_is_still_seen(tmp_path: Path) -> None:
    """Offsets going back under the same id (an unclean leader election, a reset to the earliest
    record): what is read again is the same topic's, and the scan drops it as duplicates."""
    archiver, client = _archiver(tmp_path)
    archiver.take(_poll(range(0, 6), 0))
    archiver.flush()
    client.refreshed = "old"
    archiver.take(_poll(range(0, 6), 0))  # read again from the earliest record
    assert [tid for tid, _ in archiver.pending[TP].chunks] == ["old"]
    archiver.flush()
    assert _scanned(archiver) == 6
    client.topic = "newer"  # then the topic is created again: a move, read from its beginning
    archiver.take({})
    assert client.seeks == [(TP, 0)] and archiver.committable()[TP].offset == 0


def test_records_a_truncated_log_wrote_again_at_its_old_offsets_are_kept_by_their_leader_epoch(tmp_path: Path) -> None:
    """An unclean leader election: the new leader (epoch 1) lacks offsets 3-5 of the old one (epoch 0) and
    writes new readings there, under the same topic id. Read again from the earliest record, offsets 0-2
    are the same records (dropped as duplicates), 3-7 new ones (kept, though the old 3-5 are archived)."""
    for flush_between in (True, False):
        archiver, client = _archiver(tmp_path / str(flush_between))
        archiver.take(_poll(range(0, 6), 0, {o: 0 for o in range(6)}))
        if flush_between:
            archiver.flush()
        client.refreshed = "old"
        archiver.take(_poll(range(0, 8), 0, {o: 0 if o < 3 else 1 for o in range(8)}))  # new records from offset 3 on
        archiver.flush()
        assert archiver.committable()[TP].offset == 8
        assert _scanned(archiver) == 6 + 5, f"flushed between the polls: {flush_between}"


def test_readings_of_a_log_that_began_again_between_polls_are_neither_the_old_logs_nor_committed_past(
        tmp_path: Path) -> None:
    """The metadata refresh asked for when the offsets went back fails: no id until the client learns it."""
    archiver, client = _archiver(tmp_path)
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
    assert _scanned(archiver) == 6 + 8  # both logs' readings, none taken for a duplicate


def test_a_partition_whose_topic_moved_commits_the_new_topics_start_not_the_old_topics_end(tmp_path: Path) -> None:
    """The metadata names a new id while the partition's readings of the old topic are written but not
    committed: committing the old topic's end would make the next owner skip the new topic's first records."""
    archiver, client = _archiver(tmp_path)
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
    assert _scanned(archiver) == 6 + 3


def test_a_commit_of_the_old_logs_end_is_moved_back_to_where_the_new_log_is_read_from(tmp_path: Path) -> None:
    """The old log's end was committed before its log began again: until the new log's first flush,
    a kill or a rebalance must leave the next owner reading the new log from there, not from 6."""
    archiver, client = _archiver(tmp_path)
    archiver.take(_poll(range(0, 6), 0, {o: 0 for o in range(6)}))
    archiver.flush()
    archiver._commit()
    assert client.committed[TP] == 6
    client.refreshed = "old"
    archiver.take(_poll(range(3, 10), 100, {o: 1 for o in range(3, 10)}))  # truncated to 3, new records from there
    archiver._commit()  # nothing of the new log is written: what a rebalance's hook or the next flush commits
    assert client.committed[TP] == 3
    archiver.flush()
    archiver._commit()
    assert client.committed[TP] == 10 and _scanned(archiver) == 6 + 7


def test_a_truncation_seen_without_a_refresh_takes_back_its_id_at_the_next_refresh_that_names_it(
        tmp_path: Path) -> None:
    """The refresh asked for when the offsets went back fails: the readings have no id until a later
    refresh (the client's periodic one) still names the same id, which makes it a truncated log's
    again, and a recreation after that is seen as a move."""
    archiver, client = _archiver(tmp_path)
    archiver.take(_poll(range(0, 6), 0))
    archiver.flush()
    archiver.take(_poll(range(0, 6), 0))  # read again from the earliest record; the refresh fails
    archiver.take({})
    assert [tid for tid, _ in archiver.pending[TP].chunks] == [""]
    client._client.cluster._last_successful_refresh_ms = time.monotonic() * 1000 + 1  # the periodic refresh: "old"
    archiver.take(_poll(range(6, 8), 6))
    assert [tid for tid, _ in archiver.pending[TP].chunks] == ["", "old"]
    client.topic = "newer"
    archiver.take({})
    assert client.seeks == [(TP, 0)]


def test_a_log_read_again_from_where_it_diverged_commits_nothing_past_what_is_buffered(tmp_path: Path) -> None:
    """kafka-python reads a truncated log again from where it diverged from the old one (8 here), which
    may lie above records buffered and not yet written (6, 7): a commit before the flush stops at 6."""
    archiver, client = _archiver(tmp_path)
    archiver.take(_poll(range(0, 6), 0, {o: 0 for o in range(6)}))
    archiver.flush()
    archiver._commit()
    archiver.take(_poll(range(6, 10), 6, {o: 0 for o in range(6, 10)}))  # buffered, not written
    client.refreshed = "old"
    archiver.take(_poll(range(8, 12), 20, {o: 1 for o in range(8, 12)}))
    archiver._commit()  # e.g. the flush failed, or a rebalance's hook commits before writing
    assert client.committed[TP] == 6
    archiver.flush()
    archiver._commit()
    assert client.committed[TP] == 12 and _scanned(archiver) == 10 + 4
