"""The detector daemon: a consumer-group member that scores every reading and publishes alerts.

Per poll: decode every record in one pass → place on the event-time grid → score all new
steps of all assets in one model call → thresholds and alert lifecycle → publish alert
events and dead letters → wait for the broker's acknowledgements → commit.

Delivery (at-least-once, idempotent alerts):

* Offsets are committed only after every alert and dead letter derived from the poll is
  acknowledged (idempotent producer, ``acks=all``).
* The committed offset of a partition is held back to the oldest reading any of its
  assets still needs: readings on open grid steps, and the last ``warmup`` steps that
  rebuild a cold LSTM state. After a crash, the replay from there re-warms each asset and
  re-scores what was not yet scored; alert ids are deterministic, so re-emitted alerts
  carry the same ids.
* On a graceful stop or a partition revocation, each asset's whole state (grid, LSTM,
  thresholds, open alert) is written to the state topic with the partition's position,
  and that position is committed. The next owner restores the snapshots whose position
  equals the committed offset, so nothing is scored twice or skipped.
* A record whose asset differs from its Kafka key is refused (``key_mismatch``): the key
  decides the partition, and an asset must live in exactly one partition.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from consumers import metrics
from consumers.kafka_clients import make_consumer, make_producer
from pipeline.alerts import AlertEvent
from pipeline.bundle import ModelBundle
from pipeline.engine import DetectionEngine, SwapError
from pipeline.grid import NO_POS
from pipeline.logs import get_logger
from pipeline.readings import DecodeLimits, Reject, decode_batch
from pipeline.settings import Settings

PARTITION_MARKER = "__partition__"


@dataclass
class DetectorStats:
    """What this detector process did (also exported as Prometheus counters)."""

    records: int = 0
    accepted: int = 0
    steps: int = 0
    scored: int = 0
    alert_events: int = 0
    rejects: dict[str, int] = field(default_factory=dict)


class DeliveryError(RuntimeError):
    """The broker did not acknowledge an alert, dead letter or snapshot: nothing is committed."""


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


class Detector:
    """One detector process (one consumer-group member)."""

    def __init__(self, settings: Settings, bundle: ModelBundle, *, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time, follow_registry: bool = False) -> None:
        self.settings = settings
        self.engine = DetectionEngine(bundle, settings.grid)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.log = get_logger("plantwatch.detector").bind(group=settings.detector.group_id)
        self.limits = DecodeLimits(max_record_bytes=settings.detector.max_record_bytes)
        self.assets_of: dict[int, set[str]] = defaultdict(set)
        self.positions: dict[TopicPartition, int] = {}  # next offset to process, per owned partition
        self.consumer: KafkaConsumer | None = None
        self.producer: Any = None
        self.last_loop = time.monotonic()
        self.assigned = False
        self.stats = DetectorStats()
        self.follow_registry = follow_registry
        self.watcher: Any = None
        self.swap_pauses_s: list[float] = []
        metrics.MODEL.info({"version": bundle.version})

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> int:
        """Consume until ``stop`` is set; returns the process exit code."""
        s = self.settings
        self.producer = make_producer(s)
        self.consumer = make_consumer(s, group_id=s.detector.group_id)
        self.consumer.subscribe([s.topics.readings], listener=_Listener(self))
        self.log.info("detector started", topic=s.topics.readings, model_version=self.engine.model_version)
        if self.follow_registry:
            from consumers.model_watch import ModelWatcher

            self.watcher = ModelWatcher(s, self.engine.bundle).start()
        code = 0
        try:
            while not self.stop.is_set():
                polled = self.consumer.poll(timeout_ms=s.detector.poll_timeout_ms, max_records=s.kafka.max_poll_records)
                self.last_loop = time.monotonic()
                if polled:
                    self.process(polled)
                if self.watcher is not None:
                    self._maybe_swap()
        except DeliveryError as exc:
            self.log.error("delivery failed; stopping without commit", error=str(exc))
            code = 1
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            try:
                # Leaving the group revokes our partitions: the listener hands their state over.
                self.consumer.close(autocommit=False)
            except Exception as exc:  # a failed hand-over: the next owner replays instead
                self.log.error("state hand-over on close failed", error=str(exc))
                code = code or 1
            self.producer.close(timeout=10)
        self.log.info("detector stopped", exit_code=code)
        return code

    @property
    def ready(self) -> bool:
        return self.assigned and time.monotonic() - self.last_loop < 30

    # ------------------------------------------------------------------ one poll
    def process(self, polled: dict[TopicPartition, list[Any]]) -> None:
        t0 = time.perf_counter()
        s = self.settings
        records = [r for tp in sorted(polled) for r in polled[tp]]
        metrics.RECORDS.inc(len(records))
        offsets = np.fromiter((r.offset for r in records), np.int64, len(records))
        partitions = np.fromiter((r.partition for r in records), np.int64, len(records))
        batch = decode_batch([r.value for r in records], self.engine.bundle.features, fmt=s.detector.input_format,
                             limits=self.limits, unknown_features=s.detector.unknown_features)
        rejects: list[Reject] = list(batch.rejects)

        keys = np.array([_text(r.key) for r in records], dtype=object)
        mismatch = batch.asset != keys[batch.record_index]
        if mismatch.any():
            bad = np.unique(batch.record_index[mismatch])
            rejects += [Reject(int(i), "key_mismatch", f"key {keys[i]!r} differs from the asset in the value")
                        for i in bad]
            keep = ~np.isin(batch.record_index, bad)
            for name in ("record_index", "asset", "ts_ms", "feature", "value"):
                setattr(batch, name, getattr(batch, name)[keep])

        for asset, part in set(zip(batch.asset.tolist(), partitions[batch.record_index].tolist())):
            self.assets_of[part].add(asset)

        t1 = time.perf_counter()
        out = self.engine.process(batch, record_pos=offsets, now_ms=int(self.clock() * 1000))
        metrics.SCORE_SECONDS.observe(time.perf_counter() - t1)
        rejects += [Reject(int(i), "late", "reading older than the allowed lateness") for i in out.late_records]
        rejects += [Reject(int(i), "future", "timestamp too far ahead of the wall clock")
                    for i in out.future_records]
        scored = np.isfinite(out.score)
        metrics.STEPS_SCORED.inc(int(scored.sum()))
        st = self.stats
        st.records += len(records)
        st.accepted += out.counters.accepted
        st.steps += len(out)
        st.scored += int(scored.sum())
        st.alert_events += len(out.events)
        for r in rejects:
            st.rejects[r.reason] = st.rejects.get(r.reason, 0) + 1

        futures = [self._dead_letter(records[r.index], r) for r in rejects]
        futures += [self._publish_alert(e, batch.asset, batch.record_index, offsets, partitions) for e in out.events]
        if s.topics.scores:
            futures += self._publish_scores(out, scored)
        self._await(futures)

        commits = {}
        for tp, recs in polled.items():
            end = recs[-1].offset + 1
            self.positions[tp] = end
            replay = min((self.engine.state.replay_position(a) for a in self.assets_of[tp.partition]), default=NO_POS)
            commits[tp] = OffsetAndMetadata(int(min(end, replay)), "", -1)
        assert self.consumer is not None
        self.consumer.commit(commits)
        metrics.ASSETS.set(len(self.engine.state))
        for tp in polled:
            hw = self.consumer.highwater(tp)
            if hw is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(0, hw - (polled[tp][-1].offset + 1)))
        metrics.POLL_SECONDS.observe(time.perf_counter() - t0)
        if out.events or rejects:
            self.log.debug("poll", records=len(records), steps=len(out), alerts=len(out.events), rejects=len(rejects))

    def _dead_letter(self, record: Any, reject: Reject) -> Any:
        metrics.REJECTS.labels(reject.reason).inc()
        headers = [("reason", reject.reason.encode()), ("detail", reject.detail.encode()),
                   ("source.topic", record.topic.encode()), ("source.partition", str(record.partition).encode()),
                   ("source.offset", str(record.offset).encode())]
        return self.producer.send(self.settings.topics.dlq_topic, key=record.key, value=record.value or b"",
                                  headers=headers)

    def _publish_alert(self, e: AlertEvent, assets: np.ndarray, record_index: np.ndarray, offsets: np.ndarray,
                       partitions: np.ndarray) -> Any:
        metrics.ALERT_EVENTS.labels(e.state).inc()
        rec = record_index[assets == e.asset]
        body = e.to_dict()
        if len(rec):
            body["source"] = {"topic": self.settings.topics.readings, "partition": int(partitions[rec[0]]),
                              "offsets": [int(offsets[rec].min()), int(offsets[rec].max())]}
        self.log.info("alert", alert_id=e.alert_id, asset=e.asset, state=e.state, score=round(e.score, 3),
                      top=[f for f, _ in e.top_features], model_version=e.model_version)
        return self.producer.send(self.settings.topics.alerts, key=e.asset.encode(),
                                  value=json.dumps(body, separators=(",", ":")).encode())

    def _publish_scores(self, out: Any, scored: np.ndarray) -> list[Any]:
        period = self.engine.bundle.period_ms
        topic, version = self.settings.topics.scores, self.engine.model_version
        futures = []
        for i in np.flatnonzero(scored):
            body = {"asset": out.asset[i], "step_ms": int(out.step[i]) * period, "score": round(float(out.smoothed[i]), 5),
                    "threshold": round(float(out.threshold[i]), 5), "model_version": version}
            futures.append(self.producer.send(topic, key=str(out.asset[i]).encode(),
                                              value=json.dumps(body, separators=(",", ":")).encode()))
        return futures

    def _await(self, futures: list[Any]) -> None:
        """Block until the broker acknowledged every send, or fail the poll."""
        if not futures:
            return
        self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
        for f in futures:
            if not f.is_done:
                raise DeliveryError("send not acknowledged in time")
            if f.failed():
                raise DeliveryError(str(f.exception))

    def _maybe_swap(self) -> None:
        """Swap to a prepared model between two polls; the pause is measured and logged."""
        prepared = self.watcher.ready()
        if prepared is None:
            return
        old_version, old_model = self.engine.model_version, self.engine.model
        t = time.perf_counter()
        try:
            warmed = self.engine.swap(prepared.bundle, prepared.model)
        except SwapError as exc:
            self.watcher.refused.add(prepared.bundle.version)
            metrics.MODEL_SWAPS.labels("refused").inc()
            self.log.error("model refused; the current one keeps serving", version=prepared.bundle.version,
                           error=str(exc))
            return
        pause = time.perf_counter() - t
        self.swap_pauses_s.append(pause)
        self.watcher.swapped(prepared, old_model)
        metrics.MODEL_SWAPS.labels("swapped").inc()
        metrics.MODEL.info({"version": prepared.bundle.version})
        self.log.info("model swapped", old=old_version, new=prepared.bundle.version, assets_rewarmed=warmed,
                      pause_ms=round(pause * 1000, 2), prepare_s=round(prepared.prepare_s, 3))

    # -------------------------------------------------------- state hand-over
    def prepare_handover(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata]:
        """Publish the snapshots of these partitions' assets (acknowledged), forget the assets,
        and return the offsets to commit: everything processed, since the state holds the rest."""
        s = self.settings
        group = s.detector.group_id
        commits, futures, dropped = {}, [], []
        for tp in partitions:
            position = self.positions.pop(tp, None)
            assets = sorted(self.assets_of.pop(tp.partition, set()))
            if position is None:
                continue
            for a in assets:
                body = {"group": group, "partition": tp.partition, "generation": position,
                        "model_version": self.engine.model_version, "snapshot": self.engine.state.snapshot(a)}
                futures.append(self.producer.send(s.topics.state_topic, key=a.encode(),
                                                  value=json.dumps(body, separators=(",", ":")).encode()))
            marker = {"group": group, "partition": tp.partition, "offset": position, "assets": len(assets),
                      "model_version": self.engine.model_version}
            futures.append(self.producer.send(s.topics.state_topic,
                                              key=f"{PARTITION_MARKER}/{group}/{tp.partition}".encode(),
                                              value=json.dumps(marker).encode()))
            commits[tp] = OffsetAndMetadata(position, "", -1)
            dropped += assets
        self._await(futures)
        self.engine.state.drop(dropped)
        if commits:
            self.log.info("state handed over", partitions=sorted(tp.partition for tp in commits), assets=len(dropped))
        return commits

    def restore(self, committed: dict[TopicPartition, int]) -> None:
        """Restore the snapshots written for exactly the committed position of each partition."""
        for tp, offset in committed.items():
            self.positions[tp] = offset
        wanted = {tp.partition: off for tp, off in committed.items()}
        if not wanted:
            return
        markers, snaps = read_state_topic(self.settings, set(wanted))
        restored = 0
        for p, offset in wanted.items():
            marker = markers.get(p)
            if marker is None or marker["offset"] != offset or marker["model_version"] != self.engine.model_version:
                continue
            for asset, body in snaps.get(p, {}).items():
                if body["generation"] == offset:
                    self.engine.state.restore(asset, body["snapshot"])
                    self.assets_of[p].add(asset)
                    restored += 1
        self.log.info("state restored", partitions=sorted(wanted), assets=restored)


def read_state_topic(settings: Settings, partitions: set[int], timeout_s: float = 15.0
                     ) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, dict[str, Any]]]]:
    """Latest partition markers and asset snapshots of this group for the given partitions."""
    s = settings
    group = s.detector.group_id
    consumer = make_consumer(s, group_id=None)
    try:
        parts = consumer.partitions_for_topic(s.topics.state_topic) or set()
        tps = [TopicPartition(s.topics.state_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        markers: dict[int, dict[str, Any]] = {}
        snaps: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        deadline = time.monotonic() + timeout_s
        while tps and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200, max_records=10000).values():
                for r in recs:
                    try:
                        body = json.loads(r.value)
                    except (TypeError, ValueError):
                        continue
                    if body.get("group") != group or body.get("partition") not in partitions:
                        continue
                    if (r.key or b"").startswith(PARTITION_MARKER.encode()):
                        markers[body["partition"]] = body
                    else:
                        snaps[body["partition"]][_text(r.key) or ""] = body
            if all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp) for tp in tps):
                break
        return markers, snaps
    finally:
        consumer.close(autocommit=False)


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks. kafka-python 3 runs them on the consumer's event loop, where blocking
    consumer calls are refused, so the commit and the committed-offset fetch use the
    coordinator's coroutines (pinned kafka-python version)."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.detector.assigned = False
        commits = self.detector.prepare_handover(revoked)
        if commits:
            assert self.detector.consumer is not None
            await self.detector.consumer._coordinator._commit_offsets_sync_async(commits)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.detector.consumer is not None
        fetched = await self.detector.consumer._coordinator.fetch_committed_offsets_async(set(assigned))
        committed = {tp: om.offset for tp, om in fetched.items() if om is not None and om.offset >= 0}
        self.detector.restore(committed)
        self.detector.assigned = True
