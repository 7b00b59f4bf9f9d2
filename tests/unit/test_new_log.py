"""A readings topic deleted and created again under a running consumer: which records of a poll
are the new log's, and where the client is sent back to (pure, with a stand-in client)."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace
from typing import Any

from kafka import TopicPartition

from consumers.kafka_clients import began_again, cut_at_new_log, known_id, poll_arrays, reread_moved_topic
from pipeline.logs import get_logger

LOG = get_logger("test")

Rec = namedtuple("Rec", "partition offset")
TP0, TP1 = TopicPartition("r", 0), TopicPartition("r", 1)


class _Client:
    def __init__(self, owned: tuple[TopicPartition, ...] = (TP0, TP1)) -> None:
        self.seeks: list[tuple[Any, ...]] = []
        self.owned = set(owned)
        self._client = SimpleNamespace(cluster=SimpleNamespace(_last_successful_refresh_ms=0.0))  # no refresh yet

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks += [(tp, "beginning") for tp in tps]


def test_a_poll_whose_offsets_drop_is_cut_there_and_the_client_sent_back() -> None:
    client = _Client()
    polled = {TP0: [Rec(0, o) for o in (998, 999, 0, 1)], TP1: [Rec(1, 5), Rec(1, 7)]}
    cut = cut_at_new_log(client, polled, *poll_arrays(polled)[1:])  # type: ignore[arg-type]
    assert cut is not None
    kept, drops = cut
    assert [r.offset for r in kept[TP0]] == [998, 999] and kept[TP1] == polled[TP1] and drops == {TP0: 0}
    assert client.seeks == [(TP0, 0)]
    rising = {TP0: [Rec(0, 3), Rec(0, 9)], TP1: [Rec(1, 0)]}  # gaps (compaction, markers) are no drop
    assert cut_at_new_log(client, rising, *poll_arrays(rising)[1:]) is None  # type: ignore[arg-type]


def test_partitions_whose_topic_id_changed_are_read_again_from_their_beginning() -> None:
    """Polled or not: the embedded broker leaves a client past the new topic's end waiting, with nothing
    to poll, until its metadata names the new id."""
    client = _Client()
    known = {0: "old", 1: ""}
    polled = {TP0: [Rec(0, 1200)], TP1: [Rec(1, 40)]}
    kept, moved = reread_moved_topic(client, polled, known, "new", LOG)  # type: ignore[arg-type]
    assert moved == [TP0] and list(kept) == [TP1]  # partition 1's id was not known: nothing to compare
    assert client.seeks == [(TP0, "beginning")] and known == {0: "new", 1: "new"}
    assert reread_moved_topic(client, polled, known, "", LOG) == (polled, [])  # type: ignore[arg-type]  # no ids
    assert reread_moved_topic(client, polled, known, "new", LOG) == (polled, [])  # type: ignore[arg-type]
    client.seeks.clear()
    assert reread_moved_topic(client, {}, known, "newer", LOG) == ({}, [TP0, TP1])  # type: ignore[arg-type]
    assert client.seeks == [(TP0, "beginning"), (TP1, "beginning")]


def test_a_log_seen_to_begin_again_only_learns_the_new_id() -> None:
    """Its offsets went back while the client's metadata still named the old topic: the new id, when
    the client learns it, is that log's, not one more move (which would read it all again)."""
    client = _Client(owned=(TP0,))
    known = {0: "old"}
    began_again(known, 0, "old")
    assert known_id(known, 0) == ""  # not known yet: not the old topic's
    assert reread_moved_topic(client, {}, known, "old", LOG) == ({}, [])  # type: ignore[arg-type]
    assert reread_moved_topic(client, {}, known, "new", LOG) == ({}, [])  # type: ignore[arg-type]
    assert known_id(known, 0) == "new" and client.seeks == []
    assert reread_moved_topic(client, {}, known, "newer", LOG)[1] == [TP0]  # type: ignore[arg-type]
    began_again(known, 0, "newest")  # the client already knew the new id when the offsets went back
    assert known_id(known, 0) == "newest"


def test_a_detector_that_sees_its_topic_move_commits_and_snapshots_no_old_position() -> None:
    """Between the new id and the new topic's first record, a checkpoint must not write the old topic's
    position under the new id (a successor would drop the new topic's records below it)."""
    from bench.poll_cost import Feed, make_detector

    det = make_detector()
    ids = {"t": "old"}
    client = _Client(owned=(TopicPartition(det.settings.topics.readings, 0),))
    cluster = SimpleNamespace(topic_id=lambda topic: ids["t"])
    client._client = SimpleNamespace(cluster=cluster)  # type: ignore[attr-defined]
    client._coordinator = det.consumer._coordinator  # type: ignore[attr-defined]
    client.highwater = det.consumer.highwater  # type: ignore[attr-defined]
    det.consumer = client
    feed = Feed(5, "wide")
    det.process(feed.poll(40))
    assert det._without_moved_topic({}) == {} and det.checkpoints.cursors[0].position == 40
    ids["t"] = "new"
    assert det._without_moved_topic({}) == {}
    assert client.seeks == [(TopicPartition(det.settings.topics.readings, 0), "beginning")]
    position, assets = det.checkpoints.pending()[0]
    assert position == 0 and len(assets) == 5  # every asset snapshotted again, at the new topic's start


def test_a_refreshed_id_comes_from_metadata_asked_for_after_the_call(monkeypatch: Any) -> None:
    """A refresh already in flight was sent before the offsets went back: its answer may still name the
    old topic, so it is waited out and a new one asked for; no answer in time is no id."""
    import threading

    from kafka.future import Future

    import consumers.kafka_clients as kc

    in_flight, asked = Future(), Future()
    ids = {"t": "old"}

    def request_update() -> Future:
        assert in_flight.is_done  # asked only once the earlier refresh is over
        return asked

    cluster = SimpleNamespace(topic_id=lambda topic: ids["t"], request_update=request_update,
                              metadata_refresh_in_progress=True, _refresh_future=in_flight)
    client = SimpleNamespace(_client=SimpleNamespace(cluster=cluster))

    def io_thread() -> None:  # the client's own thread answers both, in order
        in_flight.success(None)
        ids["t"] = "new"
        asked.success(None)

    threading.Timer(0.05, io_thread).start()
    assert kc.refreshed_topic_id(client, "t") == "new"  # type: ignore[arg-type]
    monkeypatch.setattr(kc, "READINGS_METADATA_MAX_AGE_MS", 50)
    cluster.metadata_refresh_in_progress, cluster.request_update = False, Future  # never answered
    assert kc.refreshed_topic_id(client, "t") is None  # type: ignore[arg-type]


def test_a_detector_whose_offsets_go_back_restarts_its_positions_under_the_refreshed_id() -> None:
    """The client, past a recreated topic's end, starts again from its earliest record before its
    periodic refresh: the refresh asked for then names the new topic, and the positions start afresh."""
    from kafka.future import Future

    from bench.poll_cost import Feed, make_detector

    det = make_detector()
    ids = {"t": "old"}

    def request_update() -> Future:
        ids["t"] = "new"
        return Future().success(None)

    client = _Client(owned=(TopicPartition(det.settings.topics.readings, 0),))
    cluster = SimpleNamespace(topic_id=lambda topic: ids["t"], request_update=request_update,
                              metadata_refresh_in_progress=False)
    client._client = SimpleNamespace(cluster=cluster)  # type: ignore[attr-defined]
    client._coordinator = det.consumer._coordinator  # type: ignore[attr-defined]
    client.highwater = det.consumer.highwater  # type: ignore[attr-defined]
    det.consumer = client
    det.topic_ids = {0: "old"}
    feed = Feed(5, "wide")
    det.process(feed.poll(40))
    assert det.checkpoints.cursors[0].position == 40
    feed.offset = 0  # the new log's records, from its first
    det.process(feed.poll(10))
    assert det.topic_ids == {0: "new"} and det.checkpoints.cursors[0].position == 10
