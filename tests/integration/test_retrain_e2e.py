"""Simulator → archiver → Parquet → training job → registry → the running detector swaps."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from collections import Counter
from typing import Any

import numpy as np

from consumers.archiver import Archiver
from pipeline import registry
from pipeline.simulate import PlantSimulator
from trainers.train import run_training

from .plant import PERIOD_MS, PLANT, detector_settings, feed_until, produce, read_topic, running_detector, wait_until

HISTORY = 3000


def test_a_model_retrained_on_the_archive_is_swapped_in_while_readings_flow(
        broker: Any, settings_for: Any, fitted_plant: Any, tmp_path: Path) -> None:
    start = fitted_plant.stream_start_ms
    live_start = start + HISTORY * PERIOD_MS
    settings = detector_settings(settings_for, broker, {
        "detector.registry_poll_s": "0.5",
        "archive.flush_seconds": "1", "model.epochs": "3", "trainer.min_rows": "1000",
        "trainer.lookback_hours": str((HISTORY + 100) / 3600), "trainer.holdout_hours": str(300 / 3600),
        # the gate runs against the serving model; this test is about the chain, not its verdict on a 3-epoch model
        "trainer.gate_margin": "10.0", "trainer.lock_path": str(tmp_path / "trainer.lock")}, scores=True)
    v1 = fitted_plant.bundle
    registry.publish(settings.registry.uri, v1, keep=5)
    sim = PlantSimulator(PLANT)
    produce(settings, sim, start, live_start)

    stop = threading.Event()
    archiver = Archiver(settings, stop=stop)
    arch_thread = threading.Thread(target=archiver.run, daemon=True)
    arch_thread.start()
    try:
        with running_detector(settings, v1, follow_registry=True) as det:
            wait_until(lambda: archiver.stats.readings >= 5 * HISTORY, 90, "the history to be archived")
            swapped = threading.Event()
            produced: list[int] = []
            feeding = threading.Thread(target=lambda: produced.extend(feed_until(settings, sim, live_start, swapped)))
            feeding.start()  # readings flow before, during and after the training run and the swap
            outcome = run_training(settings, live_start)
            assert outcome.published, outcome.summary()
            assert outcome.gate.champion is not None and outcome.gate.champion.version == v1.version
            wait_until(lambda: det.engine.model_version == outcome.version, 30, "the swap")
            swapped.set()
            feeding.join()
            total = 5 * (produced[0] - start) // PERIOD_MS
            wait_until(lambda: det.stats.records >= total, 60, "every reading to be scored")
            pauses = list(det.swap_pauses_s)
    finally:
        stop.set()
        arch_thread.join(30)

    assert "gate" in registry.manifest(settings.registry.uri, outcome.version)["metadata"]
    scores = [json.loads(r.value) for r in read_topic(settings, settings.topics.scores, until=lambda r: False,
                                                      timeout_s=5)]
    keys = Counter((s["asset"], s["step_ms"]) for s in scores)
    assert max(keys.values()) == 1
    for asset in PLANT.asset_ids:
        mine = sorted((s for s in scores if s["asset"] == asset), key=lambda s: s["step_ms"])
        assert (np.diff([s["step_ms"] for s in mine]) == PERIOD_MS).all()
        versions = [s["model_version"] for s in mine]
        assert versions[-1] == outcome.version and versions[0] == v1.version
    print(f"swap pause {pauses[0] * 1000:.1f} ms; training {outcome.metadata.get('duration_s')} s")
    assert len(pauses) == 1 and pauses[0] < 0.1
