"""Kafka clients built from the settings, so every process connects (TLS, SASL, timeouts) the same way.

Every KafkaConsumer, KafkaProducer and KafkaAdminClient of plantwatch is built here (a unit
test checks that no other module constructs one), so the ``kafka.security_protocol``,
``kafka.sasl_*`` and ``kafka.ssl_*`` settings reach all of them. The SASL password is read
from ``kafka.sasl_password_file`` each time a client is built, and masked in plantwatch's
log output from then on.

Keys and values stay raw bytes: decoding is done in batches by the pipeline, not per record
by a client-side deserializer.

:func:`read_to_end` reads a whole topic once, from its beginning to its end (the trainer's
alert exclusions, the detector's state changelog).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from consumers.fetch_holes import FetchHoleGuard
from pipeline.logs import mask_secret
from pipeline.settings import KafkaSettings, Settings, SettingsError

_SSL_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
READINGS_METADATA_MAX_AGE_MS = 10_000  # the client's default is five minutes
_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def _bootstrap_hosts(kafka: KafkaSettings) -> list[str]:
    hosts = [h.strip() for h in kafka.bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        # kafka-python would silently fall back to localhost:9092
        raise SettingsError(
            "kafka.bootstrap_servers",
            "empty: set it (PLANTWATCH_KAFKA__BOOTSTRAP_SERVERS or --set kafka.bootstrap_servers=host:port); "
            "only `plantwatch demo` starts a local broker by itself",
        )
    return hosts


def require_bootstrap(settings: Settings) -> str:
    """The bootstrap servers of a daemon, or a :class:`SettingsError` naming the key when empty."""
    return ",".join(_bootstrap_hosts(settings.kafka))


def client_options(kafka: KafkaSettings) -> dict[str, object]:
    """Connection options shared by consumers, producers and admin clients (kafka-python names)."""
    options: dict[str, object] = {
        "bootstrap_servers": _bootstrap_hosts(kafka),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.security_protocol in _SASL_PROTOCOLS:
        password = kafka.sasl_secret()
        mask_secret(password)
        # kafka-python takes the user name and password under these names for PLAIN and SCRAM alike
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = password
    if kafka.security_protocol in _SSL_PROTOCOLS:
        options["ssl_check_hostname"] = kafka.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(kafka, key):
                options[key] = getattr(kafka, key)
    return options


def _with_role(kafka: KafkaSettings, role: str) -> dict[str, object]:
    """Options with ``client_id`` = ``<prefix>-<role>`` so broker logs tell the clients apart."""
    return {**client_options(kafka), "client_id": f"{kafka.client_id}-{role}"}


def make_consumer(
    settings: Settings, *, group_id: str | None, topics: Sequence[str] = (), never_compacted: bool = False,
    **overrides: object
) -> KafkaConsumer:
    """A manually committing consumer that starts at the earliest offset of a new group and reads
    only committed records (an aborted transaction of an exactly-once producer upstream is skipped).

    Offsets are committed by the caller only after the results of a poll are acknowledged
    (at-least-once), hence no auto-commit. With ``never_compacted`` (the readings topic), a fetch
    response that skips offsets is fetched again (:mod:`consumers.fetch_holes`).
    """
    k = settings.kafka
    config: dict[str, object] = {
        **_with_role(k, "consumer"),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "max_poll_records": k.max_poll_records,
        "fetch_max_bytes": k.fetch_max_bytes,
        "max_partition_fetch_bytes": k.max_partition_fetch_bytes,
        "fetch_max_wait_ms": k.fetch_max_wait_ms,
        "isolation_level": "read_committed",
        **overrides,
    }
    if never_compacted:  # the readings topic: a topic created again is seen within this (reread_moved_topic)
        config.setdefault("metadata_max_age_ms", READINGS_METADATA_MAX_AGE_MS)
    consumer = KafkaConsumer(*topics, **config)
    if never_compacted:
        FetchHoleGuard(consumer)
    return consumer


def resume(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
    """Resume fetching these partitions.

    kafka-python 3.0.12 parks the fetched records of a partition paused while they were being
    returned, and brings them back only at a poll that starts with no other partition's records
    buffered; until then the partition is not fetched at all, so after a partial pause it could
    stay unread for good. The parked records were not returned: dropping them lets the next fetch
    read them again from the partition's position (pinned kafka-python internals).
    """
    tps = list(partitions)
    consumer.resume(*tps)
    parked = consumer._fetcher._paused_partition_records
    for tp in tps:
        records = parked.pop(tp, None)
        if records is not None:
            records.drain()


def seek_to_committed(consumer: KafkaConsumer, partitions: Iterable[TopicPartition],
                      timeout_ms: int) -> dict[TopicPartition, int]:
    """Start each partition at its committed offset, or at its beginning without one; returns
    those offsets (-1: none). From the polling thread; a rebalance hook uses the ``_async`` form."""
    tps = set(partitions)
    return _start_at(consumer, tps, consumer._coordinator.fetch_committed_offsets(tps, timeout_ms=timeout_ms))


async def seek_to_committed_async(consumer: KafkaConsumer,
                                  partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    """:func:`seek_to_committed` from a rebalance hook (it runs on kafka-python's event loop).

    kafka-python 3 keeps the fetch position of a partition held before and after a rebalance. A
    member that dropped what it had read since its last commit must read it again, as a new owner
    would, or it is lost.
    """
    tps = set(partitions)
    return _start_at(consumer, tps, await consumer._coordinator.fetch_committed_offsets_async(tps))


def _start_at(consumer: KafkaConsumer, partitions: set[TopicPartition],
              fetched: Mapping[TopicPartition, Any]) -> dict[TopicPartition, int]:
    committed = {}
    for tp in partitions:  # pinned kafka-python: the coordinator's committed offsets, without a commit absent
        om = fetched.get(tp)
        committed[tp] = om.offset if om is not None and om.offset >= 0 else -1
        if committed[tp] >= 0:
            consumer.seek(tp, committed[tp])
        else:
            consumer.seek_to_beginning(tp)
    return committed


def make_producer(settings: Settings, **overrides: object) -> KafkaProducer:
    """An idempotent producer acknowledged by all in-sync replicas.

    ``retries`` stays at kafka-python's default (unbounded within ``delivery_timeout_ms``):
    with idempotence, retries cannot duplicate records, and an explicit 0 would be refused.
    """
    config: dict[str, object] = {
        **_with_role(settings.kafka, "producer"),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "compression_type": None,
        **overrides,
    }
    return KafkaProducer(**config)


class KeyPartitions:
    """The partition kafka-python's default partitioner gives a key (murmur2 of the key bytes
    over the sorted partitions), computed once per topic and key: the hash is pure Python, about
    a tenth of the cost of sending a small record. A change of the topic's partitions starts over."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self._tables: dict[str, tuple[list[int], dict[bytes, int]]] = {}

    def of(self, topic: str) -> Callable[[bytes], int]:
        """A lookup key → partition for ``topic`` (its partitions as the producer knows them now)."""
        partitions = sorted(self._producer.partitions_for(topic))
        known = self._tables.get(topic)
        if known is None or known[0] != partitions:
            known = self._tables[topic] = (partitions, {})
        table, n = known[1], len(partitions)

        def lookup(key: bytes) -> int:
            p = table.get(key)
            if p is None:
                p = table[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % n]
            return p

        return lookup


def make_admin(settings: Settings, **overrides: object) -> KafkaAdminClient:
    """An admin client for topic set-up and cluster checks (it connects while being built)."""
    return KafkaAdminClient(**{**_with_role(settings.kafka, "admin"), **overrides})


class ReadTimeout(TimeoutError):
    """A topic was not read to its end in time (a partial read must not pass for a whole one)."""


def read_to_end(settings: Settings, topic: str, on_record: Callable[[Any], object], *,
                ends: Mapping[int, int] | None = None, timeout_s: float, max_records: int = 10_000) -> int:
    """Pass every record of ``topic``, from the beginning of each partition to its end, to
    ``on_record`` (in offset order within a partition); returns how many were passed.

    The end of a partition is ``ends[partition]`` (exclusive) when given: a reader that wrote
    a marker and must see everything acknowledged before it passes the marker's offset + 1 (a
    broker's high watermark can lag what it acknowledged). Without ``ends``, it is the high
    watermark of the partition's first fetch, so records arriving meanwhile do not keep the
    read going. (Not the ListOffsets answer: the embedded broker reports 1 for a partition of
    100 records there.) Records at or past an end are not passed. ``timeout_s`` passing without
    a record read, before every end is reached, raises :class:`ReadTimeout`: a long topic (a
    state topic the broker has not compacted yet, years of alerts) is read as long as it takes,
    while a read that stopped advancing ends.
    """
    consumer = make_consumer(settings, group_id=None)
    passed = 0
    try:
        if ends is None:
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            stop_at: dict[TopicPartition, int | None] = dict.fromkeys(tps)
        else:
            stop_at = {TopicPartition(topic, p): end for p, end in sorted(ends.items())}
        if not stop_at:
            return 0
        consumer.assign(list(stop_at))
        consumer.seek_to_beginning(*stop_at)
        deadline = time.monotonic() + timeout_s
        unread = set(stop_at)
        while True:
            for tp in unread:
                if stop_at[tp] is None:
                    stop_at[tp] = consumer.highwater(tp)  # known once a fetch has answered
            unread = {tp for tp in unread if (end := stop_at[tp]) is None or consumer.position(tp) < end}
            if not unread:
                return passed
            if time.monotonic() > deadline:
                raise ReadTimeout(f"topic {topic!r} not read to its end: no record for {timeout_s:.0f} s "
                                  f"({len(unread)} of {len(stop_at)} partitions unfinished)")
            polled = consumer.poll(timeout_ms=200, max_records=max_records)
            if polled:
                deadline = time.monotonic() + timeout_s
            for tp, records in polled.items():
                end = stop_at[tp]
                if end is None:
                    end = stop_at[tp] = consumer.highwater(tp)
                for record in records:
                    if end is None or record.offset < end:
                        on_record(record)
                        passed += 1
    finally:
        consumer.close(autocommit=False)


def topic_id(consumer: KafkaConsumer, topic: str) -> str:
    """The topic's id as the broker last reported it in metadata ("" if it reports none, before
    Kafka 2.8's metadata v10): a topic deleted and created again has a new id, and numbers its
    records from 0 again."""
    found = consumer._client.cluster.topic_id(topic)  # pinned kafka-python internals
    return "" if found is None else str(found)


Polled = Mapping[TopicPartition, Sequence[Any]]


def poll_arrays(polled: Polled) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """A poll's records in partition order, with their offsets and partitions as arrays."""
    records = [r for tp in sorted(polled) for r in polled[tp]]
    offsets = np.fromiter((r.offset for r in records), np.int64, len(records))
    partitions = np.fromiter((r.partition for r in records), np.int64, len(records))
    return records, offsets, partitions


def leader_epochs(records: Sequence[Any]) -> np.ndarray:
    """Each record's partition leader epoch (int32), -1 where the client or the broker gives none
    (message formats before v2)."""
    return np.fromiter((-1 if e is None else e for e in (getattr(r, "leader_epoch", -1) for r in records)),
                       np.int32, len(records))


_NEW_LOG = "\x00began again under "  # a known id's marker: the log began again while the client still knew this id


def reread_moved_topic(consumer: KafkaConsumer, polled: Polled, known: dict[int, str], tid: str,
                       log: Any) -> tuple[Polled, list[TopicPartition]]:
    """The poll without the assigned partitions whose topic id changed (``known``, partition → the
    id their positions belong to, is brought up to date), which are sent back to their beginning
    with a warning; and those partitions, whose positions the caller starts afresh at 0. Call it
    after every poll, empty ones too.

    The topic was deleted and created again under the client. Its position in the old topic says
    nothing about the new one: where the new topic has reached it, the client reads on from there,
    past the new topic's earlier records, and a broker that does not report a position past the
    end as out of range (the embedded one) leaves it waiting there. The client learns the new id at
    its next metadata refresh (at most ``metadata_max_age_ms``, see :func:`make_consumer`). A
    partition whose log was already seen to begin again (:func:`began_again`) only learns the new
    id. A broker that reports no ids (``tid`` "") changes nothing."""
    if not tid:
        return polled, []
    moved = []
    for tp in consumer.assignment():
        was = known.get(tp.partition, "")
        marked = _marked(was)
        if marked is not None and marked[0] == tid and not _refreshed_after(consumer, marked[1]):
            continue  # the client's metadata may still name the old topic
        if _other_id(was, tid):
            moved.append(tp)
        known[tp.partition] = tid  # marked: the new log's id, or, refreshed since and the same, a truncated log's
    if not moved:
        return polled, []
    moved.sort()
    log.warning("readings topic created again: its partitions are read from their beginning",
                partitions=[tp.partition for tp in moved], topic_id=tid)
    consumer.seek_to_beginning(*moved)
    return {tp: recs for tp, recs in polled.items() if tp not in moved}, moved


def began_again(known: dict[int, str], partition: int, tid: str, *, fresh: bool = False) -> None:
    """The partition's log began again (its offsets went back); ``tid`` is the topic's id in the
    client's metadata. ``fresh``: that metadata was refreshed after the offsets went back
    (:func:`refreshed_topic_id`), so ``tid`` is the new log's id: another id than the known one is a
    topic created again, the same id a log truncated (an unclean leader election, a broker started
    on fresh storage under the same id). Else the metadata may still name the old topic, and the id
    it names next is the new log's, not a move (:func:`reread_moved_topic`), or, if a refresh after
    this still names the same id, the log was truncated and keeps it; until then the positions' id
    is unknown (:func:`known_id`)."""
    if fresh:
        known[partition] = tid
    else:
        known[partition] = tid if _other_id(known.get(partition, ""), tid) else _mark(tid)


def refreshed_topic_id(consumer: KafkaConsumer, topic: str) -> str | None:
    """The topic's id in metadata the broker sent after this call (see :func:`topic_id`); None when
    none came within ``READINGS_METADATA_MAX_AGE_MS``, after which the periodic refresh would have
    brought it anyway. For the rare moment a partition's offsets went back, where the id says whether
    the topic was created again or its log truncated. Blocks the calling thread, which only waits:
    the client's own I/O thread sends the request and applies the answer (it alone may drive the
    client's event loop). A refresh already in flight was asked for before the call, so its answer
    is waited out and a new one asked for."""
    cluster = consumer._client.cluster  # pinned kafka-python internals
    deadline = time.monotonic() + READINGS_METADATA_MAX_AGE_MS / 1000
    if cluster.metadata_refresh_in_progress and not _waited(cluster._refresh_future, deadline):
        return None
    future = cluster.request_update()
    if not _waited(future, deadline) or future.failed():
        return None
    return topic_id(consumer, topic)


def logs_began_again(consumer: KafkaConsumer, known: dict[int, str], partitions: Iterable[int], topic: str) -> None:
    """These partitions' logs began again (their offsets went back): each takes the topic id of
    metadata refreshed now (one refresh for all, :func:`refreshed_topic_id`), or, when none completes
    in time, the id the client learns next (:func:`began_again`)."""
    fresh = refreshed_topic_id(consumer, topic)
    tid = topic_id(consumer, topic) if fresh is None else fresh
    for partition in partitions:
        began_again(known, partition, tid, fresh=fresh is not None)


def _waited(future: Any, deadline: float) -> bool:
    """Whether the kafka-python future completed (either way) before ``deadline`` (monotonic s)."""
    done = threading.Event()
    future.add_both(lambda *_: done.set())
    return done.wait(max(0.0, deadline - time.monotonic()))


def _mark(tid: str) -> str:
    """The marker of a log that began again while the client's metadata named ``tid``, with the time
    (the client's metadata clock, monotonic ms) after which a refresh that still names it settles it."""
    return f"{_NEW_LOG}{tid}\x00{time.monotonic() * 1000!r}"


def _marked(was: str) -> tuple[str, float] | None:
    """The id and time of a marker (:func:`_mark`), None for a plain id."""
    if not was.startswith(_NEW_LOG):
        return None
    tid, _, since = was[len(_NEW_LOG):].rpartition("\x00")
    return tid, float(since)


def _refreshed_after(consumer: KafkaConsumer, since_ms: float) -> bool:
    """Whether the client's metadata was refreshed after ``since_ms`` (its own monotonic clock)."""
    return float(getattr(consumer._client.cluster, "_last_successful_refresh_ms", 0)) > since_ms  # pinned internals


def _other_id(was: str, tid: str) -> bool:
    """Whether the positions' known id ``was`` is a topic's other than ``tid`` (not unknown, not marked)."""
    return bool(was) and not was.startswith(_NEW_LOG) and was != tid


def known_id(known: dict[int, str], partition: int) -> str:
    """The id the partition's positions belong to, "" while not known (the log began again and the
    client's metadata still names the old topic)."""
    tid = known.get(partition, "")
    return "" if tid.startswith(_NEW_LOG) else tid


def cut_at_new_log(consumer: KafkaConsumer, polled: Polled, offsets: np.ndarray,
                   partitions: np.ndarray) -> tuple[Polled, dict[TopicPartition, int]] | None:
    """None when every partition's offsets rise through the poll (``offsets`` and ``partitions``:
    the poll's records in partition order); else the poll cut where a partition's offsets drop,
    and per partition cut the offset of the drop, where its new log is read on from.

    A drop means the log began again within the poll (a topic created again, a broker on fresh
    storage, a truncation: the client, past the new log's end, starts again from its earliest
    record). The records before the drop are the old log's; the client is sent back to the drop,
    so the next poll starts with the new log."""
    if not ((np.diff(offsets) < 0) & (partitions[1:] == partitions[:-1])).any():
        return None
    out, drops = {}, {}
    for tp, recs in polled.items():
        at = next((i for i in range(1, len(recs)) if recs[i].offset < recs[i - 1].offset), None)
        if at is not None:
            drops[tp] = recs[at].offset
            consumer.seek(tp, drops[tp])
            recs = recs[:at]
        out[tp] = recs
    return out, drops


def record_clock(records: Sequence[Any], wall_ms: int, earliest_ms: int) -> np.ndarray:
    """Per record, the time its reading may be stamped at most ``grid.max_future_s`` ahead of: the
    record's Kafka timestamp, or the wall clock where that is earlier or the record has none (or
    one before ``earliest_ms``, the readings' own lower bound: not a clock reading).

    The record's timestamp (the producer's send time, or the broker's append time) is the same
    when the record is read again after a rebalance, a rewind or a restart, and for every consumer
    of it, so a replay rejects exactly the readings the first pass rejected, and the archive holds
    the readings the detector accepted. The wall clock at processing would move on between passes.
    The wall clock still bounds a producer that stamps its records with the readings' own times.
    """
    stamps = np.fromiter((r.timestamp for r in records), np.int64, len(records))
    return np.where(stamps >= earliest_ms, np.minimum(stamps, wall_ms), wall_ms)
