"""The detector daemon: a consumer-group member that scores every reading and publishes alerts.

Per poll: decode every record in one pass → place on the event-time grid → score all new
steps of all assets in one model call → thresholds and alert lifecycle → publish alert
events and dead letters → wait for the broker's acknowledgements → record the progress.
Every ``detector.checkpoint_interval_ms`` the state of each asset that changed is written to
the state topic and, once acknowledged, the partition positions are committed. The loop does not
wait for that acknowledgement: it goes on polling and commits at the first poll after it.

Recovery is exact (see :mod:`pipeline.checkpoint`): a successor restores each asset's latest
snapshot, replays at most about two checkpoint intervals, drops readings already in a snapshot and
keeps quiet about outputs already published, so alerts and their ids are those of an
uninterrupted run. A member that lost its partitions (fenced by a rebalance, a stall past
``max_poll_interval_ms``, a failed commit) forgets their state without publishing or writing
anything for them and rejoins; the next owner restores from the state topic.

A record whose asset differs from its Kafka key is refused (``key_mismatch``): the key
decides the partition, and an asset must live in exactly one partition.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (AuthorizationError, CommitFailedError, CorruptRecordError, InvalidProducerEpochError,
                          KafkaError, KafkaTimeoutError, OutOfOrderSequenceNumberError, RebalanceInProgressError,
                          UnknownProducerIdError, UnsupportedCodecError)
from kafka.structs import OffsetAndMetadata

from consumers import metrics
from consumers.fetch_holes import unparsable_batch
from consumers.health import Health
from consumers.heap import settle_heap
from consumers.kafka_clients import (KeyPartitions, ReadTimeout, cut_at_new_log, known_id, logs_began_again,
                                     make_consumer, make_producer, poll_arrays, read_to_end, record_clock,
                                     reread_moved_topic, resume, seek_to_committed, seek_to_committed_async, topic_id)
from pipeline.alerts import AlertEvent
from pipeline.bundle import ModelBundle
from pipeline.checkpoint import Checkpoints, Restored
from pipeline.dead_letters import dead_letter
from pipeline.engine import DetectionEngine, EngineOutput, SwapError, warm_start
from pipeline.logs import get_logger
from pipeline.readings import DecodeLimits, Reject, decode_batch
from pipeline.record_runs import factorize_by_record, record_starts
from pipeline.settings import Settings
from pipeline.state import read_snapshot_header

# Headers of the state topic's records (values of snapshots are opaque bytes).
KIND, GROUP, PARTITION, POSITION = "pw.kind", "pw.group", "pw.partition", "pw.position"
# The id of the readings topic a position belongs to: a topic created again numbers its records from 0
# again, so positions recorded for another id say nothing about it (absent: written before the header).
TOPIC_ID = "pw.topic_id"
# A produced record (key + value + headers) must stay below the producer's request limit.
MAX_PRODUCE_BYTES = 1_000_000
# Output batches: one flush per poll sends them, so a large batch only means fewer, fuller
# requests (and fewer wake-ups of the sender thread) when a poll publishes many scores.
OUTPUT_BATCH_BYTES = 1 << 18
# Errors that mean the broker no longer knows this producer's id or sequence (a broker restarted
# with less of its log than it acknowledged): a new producer, with a new id, can send again.
PRODUCER_STATE_ERRORS = (OutOfOrderSequenceNumberError, UnknownProducerIdError, InvalidProducerEpochError)


@dataclass
class DetectorStats:
    """What this detector process did (also exported as Prometheus counters)."""

    records: int = 0
    accepted: int = 0
    steps: int = 0
    scored: int = 0
    alert_events: int = 0
    replayed: int = 0  # records re-processed silently after a restore
    rejects: dict[str, int] = field(default_factory=dict)


class DeliveryError(RuntimeError):
    """The broker did not acknowledge an output: nothing of the poll counts as published."""

    def __init__(self, message: str, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class Fenced(RuntimeError):
    """This member no longer owns its partitions: their state must not be published or written."""


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


def _key_mismatch(key: str | None) -> str:
    if key is None:  # e.g. a producer that sends no key: its records would spread an asset over partitions
        return "the record has no key: produce each reading with its asset id as the key"
    return f"key {key!r} differs from the asset in the value"


class Detector:
    """One detector process (one consumer-group member)."""

    def __init__(self, settings: Settings, bundle: ModelBundle, *, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time, follow_registry: bool = False, health: Health | None = None) -> None:
        self.settings = settings
        self.engine = DetectionEngine(bundle, settings.grid)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.health = health
        self.log = get_logger("plantwatch.detector").bind(group=settings.detector.group_id)
        self.limits = DecodeLimits(max_record_bytes=settings.detector.max_record_bytes)
        self.checkpoints = Checkpoints(settings.detector.checkpoint_interval_ms)
        self.to_restore: dict[TopicPartition, int] = {}  # assigned, state not yet restored: committed offset
        self.rewind: set[TopicPartition] = set()  # paused until re-read from the committed offset
        # per readings partition: the topic's id when its records were last polled (or restored),
        # which the positions recorded for it belong to
        self.topic_ids: dict[int, str] = {}
        self.consumer: KafkaConsumer | None = None
        self.producer: Any = None
        self._key_partitions: KeyPartitions | None = None
        self.state_producer: Any = None
        self.last_loop = time.monotonic()
        self.assigned = False
        self.stats = DetectorStats()
        self.follow_registry = follow_registry
        self.watcher: Any = None
        self.swap_pauses_s: list[float] = []
        self._warming: tuple[Any, threading.Thread, dict[str, Any]] | None = None  # a swap being prepared
        self._in_flight: _InFlight | None = None  # a checkpoint whose snapshots are not yet acknowledged
        self.restore_s: list[float] = []
        metrics.MODEL.info({"version": bundle.version, "step_runtime": self.engine.model.step_runtime})
        self._set_health(model_loaded=True)

    def _set_health(self, **values: Any) -> None:
        if self.health is not None:
            self.health.update(**values)

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> int:
        """Consume until ``stop`` is set; returns the process exit code."""
        s = self.settings
        self.producer = make_output_producer(s)
        self._key_partitions = KeyPartitions(self.producer)
        self.state_producer = make_state_producer(s)
        self.consumer = make_consumer(s, group_id=s.detector.group_id, never_compacted=True)
        self.consumer.subscribe([s.topics.readings], listener=_Listener(self))
        settle_heap()
        self.log.info("detector started", topic=s.topics.readings, model_version=self.engine.model_version,
                      step_runtime=self.engine.model.step_runtime)
        if self.follow_registry:
            from consumers.model_watch import ModelWatcher

            self.watcher = ModelWatcher(s, self.engine.bundle).start()
        code = 0
        backoff = 0.5
        try:
            while not self.stop.is_set():
                try:
                    if self.rewind:
                        self._rewind()
                    try:
                        polled = self.consumer.poll(timeout_ms=s.detector.poll_timeout_ms,
                                                    max_records=s.kafka.max_poll_records)
                    except CorruptRecordError as exc:
                        if not self._pass_unparsable(exc):
                            raise  # not told apart: read again from the last checkpoint, below
                        continue
                    self.last_loop = time.monotonic()
                    self._set_health(last_loop=self.last_loop)
                    if self.to_restore:
                        self._restore_assigned()
                    polled = self._without_moved_topic(polled)
                    if polled:
                        self.process(polled)
                    self._finish_checkpoint(wait=False)
                    if self._in_flight is None and self.checkpoints.due(self.clock() * 1000):
                        self._begin_checkpoint()
                    if self.watcher is not None:
                        self._maybe_swap()
                    backoff = 0.5
                    # The coordinator is marked unknown within a few heartbeats of losing the broker.
                    self._set_health(broker_ok=not self.consumer._coordinator.coordinator_unknown())
                except Fenced as exc:
                    # Partitions still assigned after the rejoin are re-read from their committed offsets.
                    self._forget_all(f"fenced: {exc}", rewind=True)
                except UnsupportedCodecError as exc:  # no retry reads those batches: say so and stop
                    self.log.error("records on the readings topic are compressed with a codec this process "
                                   "cannot decode; stopping without commit", error=str(exc))
                    code = 1
                    break
                except AuthorizationError as exc:  # refused for good (a poll, or a send that asked for metadata)
                    self.log.error("not authorised for a topic or the group; stopping without commit", error=str(exc))
                    code = 1
                    break
                except (DeliveryError, KafkaError) as exc:
                    renewed = self._renew_lost_producers(exc)
                    if isinstance(exc, DeliveryError) and not exc.retriable and not renewed:
                        self.log.error("an output cannot be delivered; stopping without commit", error=str(exc))
                        code = 1
                        break
                    self._retry(exc, backoff)
                    backoff = min(backoff * 2, 15.0)
            if code == 0:
                self.log.info("stopping: final checkpoint")
                self._final_checkpoint()
        finally:
            t = time.perf_counter()
            if self.watcher is not None:
                self.watcher.stop()
            try:
                self.consumer.close(autocommit=False, timeout_ms=10_000)
            except Exception as exc:  # leaving the group failed: the session timeout does it
                self.log.warning("leaving the group failed", error=str(exc))
            self.producer.close(timeout=5)
            self.state_producer.close(timeout=5)
            close_s = time.perf_counter() - t
        self.log.info("detector stopped", exit_code=code, close_s=round(close_s, 2))
        return code

    def _renew_lost_producers(self, exc: BaseException) -> list[str]:
        """Replace each producer that lost its producer id for good; returns their names.

        After a broker lost acknowledged records (e.g. restarted from storage behind its log), an
        idempotent producer's sequence is out of order; kafka-python then asks for a new id, and
        when that fails too the producer stays in a fatal state and fails every later send. A new
        producer gets a new id; the poll is then rewound to the last checkpoint like any failed
        delivery, so nothing is lost (outputs already published stay quiet on the replay).
        """
        cause = exc.__cause__ if isinstance(exc, DeliveryError) else exc
        state_error = isinstance(cause, PRODUCER_STATE_ERRORS)
        renewed = []
        for name in ("producer", "state_producer"):
            producer = getattr(self, name)
            if producer is not None and (state_error or _producer_failed(producer)):
                renewed.append(name)
        if not renewed:
            return renewed
        self.log.warning("producer lost its id at the broker; replacing it", producers=renewed, error=str(exc))
        s = self.settings
        for name in renewed:
            try:
                getattr(self, name).close(timeout=0)
            except Exception as close_exc:  # a fatal producer may refuse even to close cleanly
                self.log.warning("closing the failed producer failed", producer=name, error=str(close_exc))
        if "producer" in renewed:
            self.producer = make_output_producer(s)
            self._key_partitions = KeyPartitions(self.producer)
        if "state_producer" in renewed:
            self.state_producer = make_state_producer(s)
        metrics.PRODUCERS_RENEWED.inc(len(renewed))
        return renewed

    @property
    def ready(self) -> bool:
        return self.assigned and not self.to_restore and time.monotonic() - self.last_loop < 30

    def _retry(self, exc: Exception, backoff: float) -> None:
        """Rewind every owned partition to its last checkpoint and wait ``backoff`` seconds."""
        self._set_health(broker_ok=False)
        if isinstance(exc, CorruptRecordError):
            self.log.error("a fetched batch of the readings topic cannot be parsed; rewinding to the last "
                           "checkpoint and reading it again", error=str(exc), retry_in_s=backoff)
        else:
            self.log.warning("broker did not acknowledge; rewinding to the last checkpoint",
                             error=str(exc), retry_in_s=backoff)
        self._forget_all("delivery failed", rewind=True)
        self.stop.wait(backoff)

    def _pass_unparsable(self, exc: CorruptRecordError) -> bool:
        """Dead-letter the record batch the client cannot parse (a CRC that does not match, a header
        name that is not UTF-8) as its raw bytes, and read on after it; False when the batch cannot
        be told, and so is not passed. A successor replaying past it does not send it again."""
        assert self.consumer is not None
        found = unparsable_batch(self.consumer)  # first: it drops the failed records, else a retry would spin
        if self.to_restore:  # assigned in the poll that failed: its cursor first (a restore does not seek)
            self._restore_assigned()
        cur = None if found is None else self.checkpoints.cursors.get(found[0].partition)
        if found is None or cur is None:
            return False
        tp, base, after, raw = found
        self._check_membership()
        if after > cur.emitted:
            batch = SimpleNamespace(key=None, value=raw, headers=[], topic=tp.topic, partition=tp.partition,
                                    offset=base, timestamp=-1)
            self._await([self._dead_letter(batch, Reject(-1, "unparsable",
                                                         f"record batch of offsets {base}-{after - 1}: {exc}"))])
        self.log.error("a record batch of the readings topic cannot be parsed: dead-lettered whole, reading on "
                       "after it", partition=tp.partition, offsets=[base, after - 1], error=str(exc))
        self.consumer.seek(tp, after)
        self.checkpoints.processed(tp.partition, after, ())
        self._record_progress(self.checkpoints.published([tp.partition]))
        return True

    def _final_checkpoint(self) -> None:
        """On a graceful stop: write the changed state and commit, so a successor replays nothing."""
        try:
            self.checkpoint()
        except (Fenced, DeliveryError, KafkaError) as exc:  # (a send or commit that raises at once)
            self.log.warning("final checkpoint failed; the next owner replays since the last one", error=str(exc))

    def _forget_all(self, why: str, rewind: bool = False) -> None:
        """Drop the state of every owned partition (it is in the state topic up to the last
        checkpoint); with ``rewind``, restore it and re-read from the committed offsets."""
        owned = [TopicPartition(self.settings.topics.readings, p) for p in self.checkpoints.owned]
        for tp in owned:
            self.topic_ids.pop(tp.partition, None)  # the restore learns it again
        dropped = self.checkpoints.revoke_all()
        self._in_flight = None  # its positions are not committed; the rewind goes to the last committed
        self.engine.state.drop(dropped)
        self.log.warning("state of owned partitions dropped", reason=why, partitions=[tp.partition for tp in owned],
                         assets=len(dropped))
        if rewind and owned:
            self._pause_for_rewind(owned)

    def _pause_for_rewind(self, partitions: list[TopicPartition]) -> None:
        """Stop fetching these partitions until they are re-read from their committed offsets."""
        assert self.consumer is not None
        self.rewind.update(partitions)
        self.consumer.pause(*partitions)

    def _rewind(self) -> None:
        """Seek paused partitions back to their committed offsets and restore their state."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        wanted = [tp for tp in self.rewind if tp in owned]
        committed = seek_to_committed(self.consumer, wanted, self.settings.kafka.request_timeout_ms)
        self.rewind.clear()
        self.to_restore.update(committed)
        resume(self.consumer, wanted)

    def _check_membership(self) -> None:
        """Raise :class:`Fenced` when the group no longer counts this member (checked before
        anything derived from owned partitions is published or written)."""
        assert self.consumer is not None
        if self.consumer._coordinator.generation_if_stable() is None:  # pinned kafka-python internals
            raise Fenced("group membership lost")

    # ------------------------------------------------------------------ one poll
    def process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        t0 = time.perf_counter()
        s = self.settings
        records, offsets, partitions = poll_arrays(polled)
        cut = None if self.consumer is None else cut_at_new_log(self.consumer, polled, offsets, partitions)
        drops: dict[TopicPartition, int] = {}
        if cut is not None:
            polled, drops = cut  # type: ignore[assignment]
            records, offsets, partitions = poll_arrays(polled)
        metrics.RECORDS.inc(len(records))
        self.stats.records += len(records)
        keys = np.array([_text(r.key) for r in records], dtype=object)
        restarted = self.checkpoints.restarted(partitions, offsets)
        for p, first in restarted.items():
            self.log.warning("readings partition began again below its position (topic created again, broker on "
                             "fresh storage, or truncated): its records are read as new", partition=p, offset=first,
                             position=self.checkpoints.cursors[p].position)
        self._began_again(restarted)
        plan = self.checkpoints.plan(partitions, offsets, keys)
        todo = np.flatnonzero(plan.process)
        silent_rec = plan.silent[todo]  # per processed record

        batch = decode_batch([records[i].value for i in todo], self.engine.bundle.features,
                             fmt=s.detector.input_format, limits=self.limits,
                             unknown_features=s.detector.unknown_features)
        rejects: list[Reject] = list(batch.rejects)
        starts = record_starts(batch.record_index)  # a record's rows are adjacent and share its asset
        mismatch = batch.asset[starts] != keys[todo][batch.record_index[starts]]
        if mismatch.any():
            bad = np.unique(batch.record_index[starts[mismatch]])
            rejects += [Reject(int(i), "key_mismatch", _key_mismatch(keys[todo[i]])) for i in bad]
            batch = batch.select(~np.isin(batch.record_index, bad))

        pos = offsets[todo]
        touched: dict[int, set[str]] = {}
        if len(batch):  # each asset once (an asset lives in one partition)
            _, names, first = factorize_by_record(batch.asset, batch.record_index)
            parts = partitions[todo][batch.record_index[first]]
            for p in np.unique(parts).tolist():
                touched[p] = set(names[parts == p].tolist())
        quiet = silent_rec[batch.record_index]
        t1 = time.perf_counter()
        now_ms = record_clock(records, int(self.clock() * 1000), self.limits.min_ts_ms)[todo]
        if quiet.any():
            replay = self.engine.process(batch.select(quiet), record_pos=pos, now_ms=now_ms)
            self.stats.replayed += int(silent_rec.sum())
            self.stats.steps += len(replay)
            batch = batch.select(~quiet)
        out = self.engine.process(batch, record_pos=pos, now_ms=now_ms)
        metrics.SCORE_SECONDS.observe(time.perf_counter() - t1)
        rejects += [Reject(int(i), "late", "reading older than the allowed lateness") for i in out.late_records]
        rejects += [Reject(int(i), "future", "timestamp too far ahead of the time its record was written")
                    for i in out.future_records]
        rejects = [r for r in rejects if not silent_rec[r.index]]
        scored = np.isfinite(out.forecast_error)
        metrics.STEPS_SCORED.inc(int(scored.sum()))
        st = self.stats
        st.accepted += out.counters.accepted
        st.steps += len(out)
        st.scored += int(scored.sum())
        st.alert_events += len(out.events)
        for r in rejects:
            st.rejects[r.reason] = st.rejects.get(r.reason, 0) + 1

        # Nothing derived from a partition this member lost may leave the process.
        self._check_membership()
        futures = [self._dead_letter(records[todo[r.index]], r) for r in rejects]
        futures += self._publish_alerts(out.events, batch.asset, batch.record_index, pos, partitions[todo])
        if s.topics.scores:
            futures += self._publish_scores(out, scored)
        self._await(futures)

        for tp, recs in polled.items():
            if tp.partition in self.checkpoints.cursors:  # (records of a partition not restored were not processed)
                self.checkpoints.processed(tp.partition, recs[-1].offset + 1, touched.get(tp.partition, ()))
        # The old log's records are processed: its new log goes on from the drop.
        self._began_again({tp.partition: offset for tp, offset in drops.items()
                           if tp.partition in self.checkpoints.cursors})
        if futures:
            self._record_progress(self.checkpoints.published(sorted({tp.partition for tp in polled})))
        metrics.ASSETS.set(len(self.engine.state))
        for tp in polled:
            hw = self.consumer.highwater(tp) if self.consumer is not None else None
            if hw is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(0, hw - (polled[tp][-1].offset + 1)))
        metrics.POLL_SECONDS.observe(time.perf_counter() - t0)
        if out.events or rejects:
            self.log.debug("poll", records=len(records), steps=len(out), alerts=len(out.events), rejects=len(rejects))

    # ------------------------------------------------------------------ outputs
    def _dead_letter(self, record: Any, reject: Reject) -> Any:
        metrics.REJECTS.labels(reject.reason).inc()
        d = dead_letter(key=record.key, value=record.value, headers=list(record.headers or []),
                        reason=reject.reason, detail=reject.detail, topic=record.topic, partition=record.partition,
                        offset=record.offset, timestamp_ms=record.timestamp, max_bytes=MAX_PRODUCE_BYTES)
        return self.producer.send(self.settings.topics.dlq_topic, key=d.key, value=d.value, headers=d.headers)

    def _publish_alerts(self, events: list[AlertEvent], assets: np.ndarray, record_index: np.ndarray,
                        offsets: np.ndarray, partitions: np.ndarray) -> list[Any]:
        if not events:
            return []
        # Each asset's source records in this poll, once for all its events.
        codes, names, first = factorize_by_record(assets, record_index)
        runs = record_starts(record_index)  # one row a record is enough: its rows share its offset
        lo = np.full(len(names), np.iinfo(np.int64).max)
        hi = np.full(len(names), -1)
        np.minimum.at(lo, codes[runs], offsets[record_index[runs]])
        np.maximum.at(hi, codes[runs], offsets[record_index[runs]])
        where = {a: i for i, a in enumerate(names)}
        futures = []
        for e in events:
            metrics.ALERT_EVENTS.labels(e.state).inc()
            body = e.to_dict()
            i = where.get(e.asset)
            if i is not None:
                part = int(partitions[record_index[first[i]]])
                body["source"] = {"topic": self.settings.topics.readings, "partition": part,
                                  "offsets": [int(lo[i]), int(hi[i])]}
            self.log.info("alert", alert_id=e.alert_id, asset=e.asset, state=e.state, score=round(e.score, 3),
                          top=[f for f, _ in e.top_features], model_version=e.model_version)
            futures.append(self.producer.send(self.settings.topics.alerts, key=e.asset.encode(),
                                              value=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)))
        return futures

    def _publish_scores(self, out: EngineOutput, scored: np.ndarray) -> list[Any]:
        """One score record per scored step; the columns are converted once for the whole poll
        and each record is encoded by orjson (about 10x json.dumps here)."""
        idx = np.flatnonzero(scored)
        if not len(idx):
            return []
        topic, version, send = self.settings.topics.scores, self.engine.model_version, self.producer.send
        partition = self._partitions(topic)
        assets = out.asset[idx].tolist()
        step_ms = (out.step[idx] * self.engine.bundle.period_ms).tolist()
        score = [round(x, 5) for x in out.alert_score[idx].tolist()]
        threshold = [round(x, 5) for x in out.threshold[idx].tolist()]
        learning = out.learning[idx].tolist() if len(out.learning) else [False] * len(idx)
        return [send(topic, key=(k := a.encode()), partition=partition(k), value=orjson.dumps(
                    {"asset": a, "step_ms": t, "score": sc, "threshold": th, "model_version": version, "learning": ln}))
                for a, t, sc, th, ln in zip(assets, step_ms, score, threshold, learning)]

    def _partitions(self, topic: str) -> Callable[[bytes], int]:
        """Key → partition of ``topic`` as the output producer's partitioner places it, cached."""
        if self._key_partitions is None:
            self._key_partitions = KeyPartitions(self.producer)
        return self._key_partitions.of(topic)

    def _await(self, futures: list[Any], producer: Any = None) -> None:
        """Block until the broker acknowledged every send, or fail the poll."""
        if not futures:
            return
        try:
            (producer or self.producer).flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
        except KafkaTimeoutError:
            raise DeliveryError("sends not acknowledged within kafka.request_timeout_ms") from None
        for f in futures:
            if not f.is_done:
                raise DeliveryError("send not acknowledged in time")
            if f.failed():
                exc = f.exception
                raise DeliveryError(f"{type(exc).__name__}: {exc}",
                                    retriable=bool(getattr(exc, "retriable", False))) from exc

    # ------------------------------------------------------------ state topic
    def _without_moved_topic(self, polled: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """The poll without the partitions of a readings topic created again (:func:`reread_moved_topic`),
        whose positions start afresh at 0 at once: they were the old topic's, and a checkpoint before the
        new topic's first record must neither snapshot nor commit them under the new id."""
        assert self.consumer is not None
        kept, moved = reread_moved_topic(self.consumer, polled, self.topic_ids, self._readings_topic_id(), self.log)
        for tp in moved:
            if tp.partition in self.checkpoints.cursors:
                self.checkpoints.restart(tp.partition, 0)
        return kept  # type: ignore[return-value]

    def _began_again(self, restarts: Mapping[int, int]) -> None:
        """These partitions' logs began again (partition → offset): their positions start afresh there,
        under the topic id of metadata refreshed now (one refresh for all), or the id the client learns
        next when no refresh completes in time (:func:`logs_began_again`)."""
        for partition, offset in restarts.items():
            self.checkpoints.restart(partition, offset)
        if restarts and self.consumer is not None:
            logs_began_again(self.consumer, self.topic_ids, list(restarts), self.settings.topics.readings)

    def _state_send(self, partition: int, key: str, value: bytes | None, kind: str, position: int,
                    producer: Any = None) -> Any:
        s = self.settings
        headers = [(KIND, kind.encode()), (GROUP, s.detector.group_id.encode()),
                   (PARTITION, str(partition).encode()), (POSITION, str(position).encode()),
                   (TOPIC_ID, (known_id(self.topic_ids, partition) or self._readings_topic_id()).encode())]
        return (producer or self.state_producer).send(s.topics.state_topic, key=f"{s.detector.group_id}\x00{key}".encode(),
                                  value=value, headers=headers, partition=self._state_partition(partition))

    def _readings_topic_id(self) -> str:
        return "" if self.consumer is None else topic_id(self.consumer, self.settings.topics.readings)

    def _state_partition(self, partition: int) -> int:
        parts = self.state_producer.partitions_for(self.settings.topics.state_topic)
        return partition % max(1, len(parts))

    def _record_progress(self, emitted: dict[int, int]) -> None:
        """Outputs of records below these positions are acknowledged (read back after a restore).

        Sent with the output producer: waiting on the state producer would wait for the snapshots
        of a checkpoint in flight too. A restore takes the highest progress, in any order."""
        self._await([self._state_send(p, f"\x00progress\x00{p}", b"", "progress", e, self.producer)
                     for p, e in emitted.items()])

    def checkpoint(self) -> dict[int, int]:
        """Write the changed assets' snapshots and commit their partitions' positions, waiting for
        both (on a graceful stop); the loop itself does not wait (:meth:`_begin_checkpoint`)."""
        self._finish_checkpoint(wait=True)
        self._begin_checkpoint()
        return self._finish_checkpoint(wait=True)

    def _begin_checkpoint(self) -> None:
        """Start a checkpoint of the assets changed since the last one: its first slice of
        snapshots goes now, the rest over the next polls (:meth:`_finish_checkpoint`)."""
        if not self.checkpoints.has_pending():
            self.checkpoints.checkpointed({}, self.clock() * 1000)
            return
        self._check_membership()
        pending = self.checkpoints.begin()
        cursors = {p: (position, self.checkpoints.cursors[p]) for p, (position, _) in pending.items()}
        todo = [(p, a) for p, (_, assets) in pending.items() for a in assets]
        self._in_flight = _InFlight([], cursors, todo[::-1], time.monotonic(), self.clock() * 1000, len(todo), 0)
        self._send_snapshots(self._in_flight, CHECKPOINT_SLICE_S)

    def _send_snapshots(self, f: _InFlight, budget_s: float) -> None:
        """Send the next snapshots of a checkpoint for about ``budget_s`` (all with ``inf``).

        A snapshot taken after the checkpoint began carries the position its partition has
        reached then, and a successor drops that asset's records below it: committing the
        position the checkpoint began at stays exact however many polls it is spread over."""
        if not f.todo:
            return
        self._check_membership()
        f.slices += 1
        t = time.perf_counter()
        version = {"model_version": self.engine.model_version}
        while f.todo and time.perf_counter() - t < budget_s:
            chunk = [f.todo.pop() for _ in range(min(SNAPSHOT_CHUNK, len(f.todo)))]
            for p in sorted({p for p, _ in chunk}):
                cur = f.cursors[p][1]
                if self.checkpoints.cursors.get(p) is not cur:
                    continue  # revoked since: its state is no longer ours to write
                assets = [a for q, a in chunk if q == p]
                blobs = self.engine.state.snapshot(assets, version)
                f.futures += [self._state_send(p, a, b, "snapshot", cur.position) for a, b in zip(assets, blobs)]

    def _finish_checkpoint(self, wait: bool) -> dict[int, int]:
        """Go on with the checkpoint in flight: send its next slice of snapshots and, once all are
        acknowledged, commit its positions (of the partitions still owned since it began).

        Without ``wait``, return while snapshots are left or unacknowledged, unless the
        checkpoint is older than its interval or ``kafka.request_timeout_ms``: it then sends
        the rest and waits (so a successor replays at most about two intervals, and a send
        that is not acknowledged fails the loop)."""
        f = self._in_flight
        if f is None:
            return {}
        age_ms = (time.monotonic() - f.began) * 1000
        if age_ms >= min(self.checkpoints.interval_ms, self.settings.kafka.request_timeout_ms):
            wait = True  # every snapshot is sent before the commit, whichever limit came first
        self._send_snapshots(f, float("inf") if wait else CHECKPOINT_SLICE_S)
        if not wait and (f.todo or not all(x.is_done for x in f.futures)):
            return {}
        self._in_flight = None
        self._await(f.futures, self.state_producer)
        assert self.consumer is not None
        done = {p: pos for p, (pos, cur) in f.cursors.items()
                if self.checkpoints.cursors.get(p) is cur and pos >= 0}
        topic = self.settings.topics.readings
        commits = {TopicPartition(topic, p): OffsetAndMetadata(pos, "", -1) for p, pos in done.items()}
        try:
            if commits:
                self.consumer.commit(commits, timeout_ms=self.settings.kafka.request_timeout_ms)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            raise Fenced(f"commit refused: {type(exc).__name__}") from None
        except KafkaTimeoutError:
            raise DeliveryError("offset commit not acknowledged within kafka.request_timeout_ms") from None
        self.checkpoints.checkpointed(done, f.began_ms)  # the next is due an interval after this one began
        self.log.debug("checkpoint", positions=done, assets=f.assets, slices=f.slices)
        metrics.CHECKPOINT_SECONDS.observe(time.monotonic() - f.began)
        metrics.CHECKPOINT_ASSETS.inc(f.assets)
        return done

    def _restore_assigned(self) -> None:
        """Restore the state of newly assigned partitions from the state topic (main thread)."""
        t = time.perf_counter()
        wanted = dict(self.to_restore)
        self.to_restore.clear()
        try:
            tid = self._readings_topic_id()
            found = read_changelog(self.settings, self.state_producer, {tp.partition for tp in wanted},
                                   self._state_partition, tid)
        except Exception:
            self._pause_for_rewind(list(wanted))  # the polled records of these partitions are re-read
            raise
        restored_assets, rewarm = 0, []
        for tp, committed in sorted(wanted.items()):
            if tid:
                self.topic_ids[tp.partition] = tid
            blobs, info = found.get(tp.partition, ({}, Restored()))
            good = {}
            for asset, (position, blob) in blobs.items():
                try:
                    head = self.engine.state.restore(blob)
                except ValueError as exc:
                    self.log.warning("snapshot refused; the asset starts afresh", asset=asset, error=str(exc))
                    continue
                good[asset] = position
                if head.get("model_version") != self.engine.model_version:
                    rewarm.append(self.engine.state.index[asset])
            self.checkpoints.assign(tp.partition, committed, Restored(good, info.emitted))
            restored_assets += len(good)
            cur = self.checkpoints.cursors[tp.partition]
            self.log.info("partition restored", partition=tp.partition, committed=committed, emitted=cur.emitted,
                          snapshots=len(good), newest_snapshot=max(good.values(), default=None))
        if rewarm:
            self.engine.adopt(np.array(rewarm, np.int64))
        self._set_health(assigned=True)
        settle_heap()  # the restored state is long-lived too
        self.restore_s.append(time.perf_counter() - t)
        self.log.info("state restored", partitions=sorted(tp.partition for tp in wanted), assets=restored_assets,
                      rewarmed=len(rewarm), seconds=round(self.restore_s[-1], 3))

    # ------------------------------------------------------------------ swaps
    def _maybe_swap(self) -> None:
        """Swap to a prepared model between two polls. The new model's state is first warmed
        from a copy of every asset's remembered steps on a background thread; the swap itself
        continues each asset over the steps since the copy, so the pause (measured and logged)
        does not grow with the fleet."""
        if self._warming is None:
            prepared = self.watcher.ready()
            if prepared is None:
                return
            try:
                self.engine.check_swap(prepared.bundle, prepared.model)
            except SwapError as exc:
                self._refuse(prepared, exc)
                return
            ring, box = self.engine.ring_copy(), {}

            def work() -> None:
                try:
                    box["warm"] = warm_start(prepared.bundle, prepared.model, ring)
                except Exception as exc:  # the swap then re-warms on the main thread
                    box["error"] = exc

            thread = threading.Thread(target=work, name="warm-start", daemon=True)
            thread.start()
            self._warming = (prepared, thread, box)
            return
        prepared, thread, box = self._warming
        if thread.is_alive():
            return
        self._warming = None
        if self.watcher.superseded(prepared):  # rolled back while it was warmed
            self.watcher.withdraw(prepared)
            return
        if "error" in box:
            self.log.warning("warm start failed; re-warming at the swap", error=str(box["error"]))
        old_version, old_model = self.engine.model_version, self.engine.model
        t = time.perf_counter()
        try:
            if "warm" in box:
                warmed = self.engine.swap_warm(prepared.bundle, prepared.model, box["warm"])
            else:
                warmed = self.engine.swap(prepared.bundle, prepared.model)
        except SwapError as exc:
            self._refuse(prepared, exc)
            return
        pause = time.perf_counter() - t
        self.swap_pauses_s.append(pause)
        self.watcher.swapped(prepared, old_model)
        metrics.MODEL_SWAPS.labels("swapped").inc()
        metrics.MODEL.info({"version": prepared.bundle.version, "step_runtime": prepared.model.step_runtime})
        self.log.info("model swapped", old=old_version, new=prepared.bundle.version, assets_rewarmed=warmed,
                      pause_ms=round(pause * 1000, 2), prepare_s=round(prepared.prepare_s, 3),
                      step_runtime=prepared.model.step_runtime)

    def _refuse(self, prepared: Any, exc: SwapError) -> None:
        self.watcher.refused.add(prepared.bundle.version)
        metrics.MODEL_SWAPS.labels("refused").inc()
        self.log.error("model refused; the current one keeps serving", version=prepared.bundle.version,
                       error=str(exc))


@dataclass
class _InFlight:
    """A checkpoint under way: per partition, the position to commit and the cursor it was taken
    from (a partition revoked and assigned again has a new cursor); the (partition, asset)
    snapshots still to send, last first; the sends so far."""

    futures: list[Any]
    cursors: dict[int, tuple[int, Any]]
    todo: list[tuple[int, str]]
    began: float   # monotonic
    began_ms: float  # the detector's clock, ms
    assets: int
    slices: int      # how many times snapshots were sent (1: all in the first slice)


# A checkpoint's snapshots are sent in slices of about this long between polls (about 50 µs an
# asset: 200 assets), in chunks encoded together, so a large fleet's checkpoint does not hold
# back the readings that arrive meanwhile.
CHECKPOINT_SLICE_S = 0.010
SNAPSHOT_CHUNK = 64


def _producer_failed(producer: Any) -> bool:
    """Whether an idempotent producer is in kafka-python's fatal state, where every send fails
    (pinned kafka-python internals, like the consumer's coordinator)."""
    manager = getattr(producer, "_transaction_manager", None)
    return manager is not None and manager.has_fatal_error()


def make_output_producer(settings: Settings) -> Any:
    """The producer of alerts, scores and dead letters: room for a full-size dead letter."""
    return make_producer(settings, max_request_size=MAX_PRODUCE_BYTES + 48_576, batch_size=OUTPUT_BATCH_BYTES)


def make_state_producer(settings: Settings) -> Any:
    """The producer of the state topic: snapshots go in bulk at a checkpoint, so large lz4 batches
    (about 45,000 snapshots/s here, against 5,000 with the latency-tuned output producer)."""
    return make_producer(settings, batch_size=1 << 20, linger_ms=20, compression_type="lz4",
                         max_request_size=4 << 20)


@dataclass
class _PartitionLog:
    """What the state topic holds for one readings partition, by whose topic id wrote it: this
    topic's, none (written before records named it), or another (the topic before it was deleted
    and created again)."""

    # asset → kind → (position, order read, snapshot), the newest of each kind
    snaps: dict[str, dict[str, tuple[int, int, bytes]]] = field(default_factory=dict)
    emitted: dict[str, int] = field(default_factory=dict)  # kind → highest progress
    other_seen: bool = False

    def add(self, kind: str, asset: str | None, position: int, seq: int, blob: bytes) -> None:
        if kind == "other":
            self.other_seen = True
        if asset is None:
            self.emitted[kind] = max(self.emitted.get(kind, -1), position)
            return
        best = self.snaps.setdefault(asset, {})
        if kind not in best or best[kind][:2] <= (position, seq):
            best[kind] = (position, seq, blob)

    def restored(self) -> tuple[dict[str, tuple[int, bytes]], Restored]:
        """Each asset's newest snapshot and the highest progress, positions of another topic id as
        -1. Once another id has written here, records without one are older still: another topic too."""
        stale = {"other", "none"} if self.other_seen else {"other"}
        snaps = {}
        for asset, by_kind in self.snaps.items():
            pos, _, blob = max((-1 if kind in stale else pos, seq, blob) for kind, (pos, seq, blob) in by_kind.items())
            snaps[asset] = (pos, blob)
        return snaps, Restored(emitted=max((e for k, e in self.emitted.items() if k not in stale), default=-1))


def read_changelog(settings: Settings, producer: Any, partitions: set[int], state_partition: Callable[[int], int],
                   readings_topic_id: str = "", timeout_s: float = 60.0
                   ) -> dict[int, tuple[dict[str, tuple[int, bytes]], Restored]]:
    """Per readings partition: each asset's snapshot with the highest position, and the highest
    published-outputs position, as this group left them in the state topic.

    Positions recorded for another id of the readings topic (one deleted and created again, which
    numbers its records from 0 again) are not positions in this one: such a snapshot is restored
    as the asset's state at position -1 (no record of the new topic is taken as already in it;
    the newest such snapshot, in log order), and such progress is ignored. Records without the id
    count as this topic's, unless a record of another id exists for the partition (the records
    without one were written before the header, so before any id's: older still). A broker that
    reports no topic ids (``readings_topic_id`` "") makes every record this topic's.

    The end of the log is found by writing a fresh marker and reading up to it (a broker's high
    watermark can lag the end), so nothing acknowledged before this call is missed.
    """
    s = settings
    group = s.detector.group_id
    topic = s.topics.state_topic
    nonce = uuid.uuid4().hex
    ends: dict[int, int] = {}
    for sp in sorted({state_partition(p) for p in partitions}):
        md = producer.send(topic, key=f"{group}\x00\x00open".encode(), value=nonce.encode(),
                           headers=[(KIND, b"open"), (GROUP, group.encode())], partition=sp)
        ends[sp] = md.get(timeout=s.kafka.request_timeout_ms / 1000).offset
    logs = {p: _PartitionLog() for p in partitions}
    seq = iter(range(1 << 62))

    def take(r: Any) -> None:
        h = dict(r.headers or [])
        if h.get(GROUP) != group.encode() or PARTITION not in h:
            return
        p, position = int(h[PARTITION]), int(h[POSITION])
        if p not in logs:
            return
        written_for = h.get(TOPIC_ID, b"").decode("utf-8", "replace")
        kind = "none" if not written_for or not readings_topic_id else \
            "this" if written_for == readings_topic_id else "other"
        if h[KIND] == b"progress":
            logs[p].add(kind, None, position, next(seq), b"")
        elif h[KIND] == b"snapshot" and r.value:
            try:
                asset = read_snapshot_header(r.value)["asset"]
            except ValueError:
                return
            logs[p].add(kind, asset, position, next(seq), r.value)

    try:  # up to the markers, included
        read_to_end(s, topic, take, ends={sp: end + 1 for sp, end in ends.items()}, timeout_s=timeout_s,
                    max_records=20000)
    except ReadTimeout as exc:
        raise DeliveryError(f"state {exc}") from None
    return {p: log.restored() for p, log in logs.items()}


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks. kafka-python 3 runs them on the consumer's event loop, where blocking
    consumer calls are refused: they only record what changed; the main loop restores."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def _drop(self, partitions: set[TopicPartition], why: str) -> None:
        d = self.detector
        d.assigned = False
        f = d._in_flight
        if f is not None and not all(x.is_done for x in f.futures):
            # Snapshots of these partitions must reach the state topic before their next owner
            # writes its own: compaction keeps the later record of an asset, whatever its position.
            try:
                d.state_producer.flush(timeout=d.settings.kafka.request_timeout_ms / 1000)
            except KafkaTimeoutError:
                d.log.warning("snapshots of released partitions not acknowledged in time")
        d._set_health(assigned=False)
        for tp in partitions:
            d.to_restore.pop(tp, None)
            d.rewind.discard(tp)
            d.topic_ids.pop(tp.partition, None)
        dropped = d.checkpoints.revoke(tp.partition for tp in partitions)
        d.engine.state.drop(dropped)
        d.log.info("partitions released", reason=why, partitions=sorted(tp.partition for tp in partitions),
                   assets=len(dropped))

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._drop(revoked, "revoked")

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._drop(lost, "lost")

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        d = self.detector
        assert d.consumer is not None
        # The state restored is the committed one, so reading starts there.
        try:
            committed_offsets = await seek_to_committed_async(d.consumer, assigned)
        except Exception as exc:  # e.g. not authorised for the group: kafka-python keeps the assignment
            # Left as they are, these partitions would be fetched from wherever they were, with no
            # state restored: the main loop's rewind seeks them to their commits and restores them.
            d.log.warning("committed offsets of assigned partitions unknown; reading them after a rewind",
                          partitions=sorted(tp.partition for tp in assigned), error=str(exc))
            d._pause_for_rewind(list(assigned))
            d.assigned = True
            return
        for tp, committed in committed_offsets.items():
            d.to_restore[tp] = committed
            d.rewind.discard(tp)
        held = d.consumer.paused() & set(assigned)
        if held:  # paused for a rewind the rebalance came before: kafka-python keeps the pause, the seek is the rewind
            resume(d.consumer, held)
        d.assigned = True  # ready once the main loop has restored these partitions
