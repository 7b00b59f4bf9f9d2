"""A simulated plant, a model fitted on its history, and helpers to run and read the detector."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from consumers.detector import Detector
from consumers.kafka_clients import make_consumer, make_producer
from consumers.simulator_feed import feed
from consumers.topics import ensure_topics, standard_topics
from pipeline.bundle import ModelBundle
from pipeline.settings import Settings, load_settings
from pipeline.simulate import ANOMALY_KINDS, Anomaly, PlantConfig, PlantSimulator, plan_anomalies

T0 = 1_700_000_000_000
PERIOD_MS = 1000
HISTORY_STEPS = 12_000
MODEL_OVERRIDES = {"model.units": "32,16", "model.timesteps": "16", "model.epochs": "15", "model.patience": "3"}
PLANT = PlantConfig(n_assets=5, period_ms=PERIOD_MS, seed=3, day_ms=3_600_000)


@dataclass
class FittedPlant:
    bundle: ModelBundle
    bundle_dir: str
    stream_start_ms: int  # first event time after the history


def fit_plant_model(bundle_dir: str) -> FittedPlant:
    from pipeline.bundle import save_bundle
    from pipeline.fit import fit_bundle
    from pipeline.tables import frame_to_batch

    settings = load_settings(env={}, overrides=MODEL_OVERRIDES)
    history = PlantSimulator(PLANT).history(T0, HISTORY_STEPS)
    batch = frame_to_batch(history, settings.model.features, ts_col="ts_ms", asset_col="asset")
    bundle, _ = fit_bundle(batch, settings)
    save_bundle(bundle, bundle_dir)
    return FittedPlant(bundle, bundle_dir, T0 + HISTORY_STEPS * PERIOD_MS)


def one_anomaly_per_kind(start_ms: int, end_ms: int) -> list[Anomaly]:
    """Asset i gets one anomaly of kind i, somewhere in [start_ms, end_ms)."""
    out = []
    for i, kind in enumerate(ANOMALY_KINDS):
        plan = plan_anomalies(PLANT, start_ms, end_ms, per_asset=1, kinds=[kind], seed=i, min_gap_steps=20)
        out.append(next(a for a in plan if a.asset == PLANT.asset_ids[i]))
    return out


def detector_settings(settings_for: Callable[..., Settings], broker: Any, extra: dict[str, str] | None = None,
                      *, scores: bool = False) -> Settings:
    """This test's settings with its topics created; ``scores`` also turns on ``<readings>.scores``."""
    s = settings_for(broker, {**MODEL_OVERRIDES, **(extra or {})})
    if scores:
        s = dataclasses.replace(s, topics=dataclasses.replace(s.topics, scores=f"{s.topics.readings}.scores"))
    ensure_topics(s, standard_topics(s))
    return s


def produce(settings: Settings, sim: PlantSimulator, start_ms: int, end_ms: int, fmt: str = "wide") -> int:
    producer = make_producer(settings)
    try:
        return feed(producer, settings.topics.readings, sim, start_ms, end_ms, fmt=fmt).records
    finally:
        producer.close()


def feed_until(settings: Settings, sim: PlantSimulator, start_ms: int, done: threading.Event,
               slice_steps: int = 20, slices_after: int = 10) -> list[int]:
    """Produce small slices continuously until ``slices_after`` slices after ``done`` is set,
    so readings really flow across an event (a swap). Returns [end_ms] of what was produced."""
    produced = [start_ms]
    after = 0
    while after < slices_after:
        produce(settings, sim, produced[0], produced[0] + slice_steps * sim.config.period_ms)
        produced[0] += slice_steps * sim.config.period_ms
        after += done.is_set()
        done.wait(0.2)
    return produced


@contextmanager
def running(daemon: Any, stop: threading.Event) -> Iterator[Any]:
    """A daemon (``run() -> exit code``) in a background thread; stopped gracefully on exit, exit code 0."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", daemon.run()), daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), f"{type(daemon).__name__} did not stop"
        assert result.get("code") == 0, f"{type(daemon).__name__} exited with {result.get('code')}"


@contextmanager
def running_detector(settings: Settings, bundle: ModelBundle, follow_registry: bool = False) -> Iterator[Detector]:
    stop = threading.Event()
    with running(Detector(settings, bundle, stop=stop, follow_registry=follow_registry), stop) as det:
        yield det


def read_topic(settings: Settings, topic: str, *, until: Callable[[list[Any]], bool] | None = None,
               timeout_s: float = 120) -> list[Any]:
    """Records of a topic from the beginning, until ``until(records)`` holds (by default: every
    partition read to its high watermark) or the time runs out."""
    consumer = make_consumer(settings, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                records.extend(recs)
            if until(records) if until is not None else all(
                    consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp)
                    for tp in tps):
                break
        return records
    finally:
        consumer.close()


def alerts_of(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]


def recreate_readings_topic(settings: Settings) -> None:
    """Delete the readings topic and create it again: it numbers its records from 0 again, under a new id."""
    from consumers.kafka_clients import make_admin
    from consumers.topics import ensure_topics, standard_topics

    admin = make_admin(settings)
    try:
        admin.delete_topics([settings.topics.readings])
        wait_until(lambda: settings.topics.readings not in admin.list_topics(), 30, "the topic deleted")
    finally:
        admin.close()
    ensure_topics(settings, standard_topics(settings))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
