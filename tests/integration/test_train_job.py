"""The training job against a real broker: a Parquet archive written by the archiver's writer,
alerts on the alerts topic and a labels file excluded, a first model published without a gate,
later runs gated against it, and each publication announced on the models topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from consumers.archiver import ArchiveWriter, Rows
from consumers.kafka_clients import make_producer
from consumers.topics import ensure_topics, standard_topics
from pipeline.registry import current_version, list_versions, manifest, pointers
from pipeline.settings import Settings
from pipeline.simulate import PlantConfig, PlantSimulator
from trainers.train import TrainOutcome, run_training


from .plant import read_topic

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
PLANT = PlantConfig(n_assets=3, period_ms=1000, seed=21)
FEATURES = PLANT.features
TINY = {"model.units": "8,4", "model.timesteps": "8", "model.epochs": "2", "trainer.lookback_hours": "1.5",
        "trainer.holdout_hours": "0.25", "trainer.min_rows": "1000"}


def write_archive(uri: str, start_ms: int, end_ms: int) -> None:
    """The simulated plant's readings as the archiver writes them: two Kafka partitions, long format."""
    frame = PlantSimulator(PLANT).frame(start_ms, end_ms)
    writer = ArchiveWriter(uri, FEATURES)
    for partition, assets in enumerate((PLANT.asset_ids[0::2], PLANT.asset_ids[1::2])):
        part = frame[frame["asset"].isin(assets)]
        n, f = len(part), len(FEATURES)
        writer.write(partition, Rows(
            asset=np.repeat(part["asset"].to_numpy(object), f), ts_ms=np.repeat(part["ts_ms"].to_numpy(), f),
            feature=np.tile(np.arange(f, dtype=np.int32), n), value=part[list(FEATURES)].to_numpy().ravel(),
            offset=np.repeat(np.arange(n, dtype=np.int64), f)))


def publish_alerts(settings: Settings) -> None:
    """A closed alert inside the range, one long closed before it, one still open, and a stray record."""
    events: list[dict[str, Any]] = [
        {"alert_id": "closed", "asset": "pump-000", "state": "open", "start_ms": T0 + 30 * MINUTE, "end_ms": None},
        {"alert_id": "closed", "asset": "pump-000", "state": "update", "start_ms": T0 + 30 * MINUTE, "end_ms": None},
        {"alert_id": "closed", "asset": "pump-000", "state": "close", "start_ms": T0 + 30 * MINUTE,
         "end_ms": T0 + 40 * MINUTE},
        {"alert_id": "old", "asset": "pump-001", "state": "open", "start_ms": T0 - 180 * MINUTE, "end_ms": None},
        {"alert_id": "old", "asset": "pump-001", "state": "close", "start_ms": T0 - 180 * MINUTE,
         "end_ms": T0 - 120 * MINUTE},
        {"alert_id": "open", "asset": "pump-002", "state": "open", "start_ms": T0 + 80 * MINUTE, "end_ms": None},
    ]
    producer = make_producer(settings)
    try:
        for e in events:
            producer.send(settings.topics.alerts, key=e["asset"].encode(), value=json.dumps(e).encode())
        producer.send(settings.topics.alerts, key=b"pump-000", value=b"not an alert")
        producer.flush(timeout=30)
    finally:
        producer.close()


def announced(settings: Settings) -> list[tuple[bytes, dict[str, Any]]]:
    return [(r.key, json.loads(r.value)) for r in read_topic(settings, settings.topics.models, timeout_s=30)]


def test_first_run_publishes_then_runs_are_gated(broker: Any, settings_for: Any, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("asset,start_ms,end_ms\npump-001,2026-01-01T00:50:00Z,2026-01-01T00:55:00Z\n")
    settings = settings_for(broker, {**TINY, "trainer.labels_uri": str(labels)})
    ensure_topics(settings, standard_topics(settings))
    write_archive(settings.archive.uri, T0, T0 + 105 * MINUTE)
    publish_alerts(settings)
    registry = settings.registry.uri

    # Run 1 ends at 1:30: trains on [0:00, 1:15), holds out [1:15, 1:30). No model yet: no gate.
    first = run_training(settings, T0 + 90 * MINUTE)
    assert first.published and first.exit_code == 0
    assert first.gate.reason == "first model: nothing published to compare with"
    assert current_version(registry) == first.version
    training = manifest(registry, first.version)["metadata"]["training"]
    # Excluded from training: pump-000 0:30-0:40 (closed alert), pump-001 0:50-0:55 (label); the
    # open alert of pump-002 (from 1:20) falls in the held-out part, the old alert in neither.
    assert training["excluded"] == {"readings": 600 + 300, "rows": 900 * len(FEATURES), "alerts_ranges": 2,
                                    "labels_ranges": 1}
    assert training["readings"] == 3 * 75 * 60 - 900
    assert (training["range"]["start_ms"], training["range"]["end_ms"]) == (T0, T0 + 75 * MINUTE)
    assert (training["holdout"]["start_ms"], training["holdout"]["end_ms"]) == (T0 + 75 * MINUTE, T0 + 90 * MINUTE)
    meta = first.metadata
    assert meta["code_version"] and meta["versions"]["plantwatch"] == meta["code_version"]
    assert {"tensorflow", "numpy", "pyarrow", "kafka-python"} <= set(meta["versions"])
    assert meta["gate"] == {"decision": "publish", "reason": first.gate.reason, "margin": 0.05,
                            "champion": None, "challenger": None}
    assert meta["epochs"] == 2 and len(meta["train_loss"]) == 2
    assert announced(settings) == [(b"current", {"version": first.version, "uri": registry,
                                                 "published_at": pointers(registry).published_at})]

    # Run 2 ends at 1:45 and is compared with run 1's model on [1:30, 1:45).
    second = run_training(settings, T0 + 105 * MINUTE)
    gate = second.metadata["gate"]
    assert gate["champion"]["version"] == first.version and gate["challenger"]["version"] == second.version
    assert gate["champion"]["steps"] == gate["challenger"]["steps"] > 0
    excluded = second.metadata["training"]["excluded"]
    assert excluded["readings"] == 600 + 300 + 600  # the open alert now covers pump-002 1:20-1:30 of training
    check_consistent(settings, second, [first.version])
    served = current_version(registry)

    # Run 3: a model whose thresholds sit inside normal variation alerts on much of the held-out data.
    jumpy = settings_for(broker, {**TINY, "trainer.labels_uri": str(labels), "threshold.quantile": "0.5",
                                  "threshold.margin": "0.5", "threshold.adapt_z": "0.01"})
    third = run_training(jumpy, T0 + 105 * MINUTE)
    assert not third.published and third.exit_code == 3
    assert "alert fraction" in third.gate.reason and third.metadata["gate"]["decision"] == "refuse"
    assert third.gate.challenger is not None and third.gate.champion is not None
    assert third.gate.challenger.alert_fraction > 10 * third.gate.champion.alert_fraction
    assert current_version(registry) == served
    assert third.version not in {v.version for v in list_versions(registry)}
    assert len(announced(settings)) == len({v.version for v in list_versions(registry)})


def check_consistent(settings: Settings, outcome: TrainOutcome, before: list[str]) -> None:
    """Published: current, listed and announced. Refused: nothing changed, and the reason says why."""
    registry = settings.registry.uri
    versions = {v.version for v in list_versions(registry)}
    keys = [key for key, _ in announced(settings)]
    if outcome.published:
        assert outcome.exit_code == 0 and "not worse" in outcome.gate.reason
        assert current_version(registry) == outcome.version and versions == {*before, outcome.version}
        assert manifest(registry, outcome.version)["metadata"]["gate"]["decision"] == "publish"
        assert keys == [b"current"] * (len(before) + 1)
    else:
        assert outcome.exit_code == 3 and "worse than the serving model" in outcome.gate.reason
        assert current_version(registry) == before[-1] and versions == set(before)
        assert keys == [b"current"] * len(before)
