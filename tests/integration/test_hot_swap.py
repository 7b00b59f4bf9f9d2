"""Hot swap: a new registry version takes over between two polls; bad bundles are refused."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from consumers.kafka_clients import make_producer
from pipeline import registry
from pipeline.bundle import ModelBundle
from pipeline.simulate import PlantSimulator

from .plant import PERIOD_MS, PLANT, detector_settings, feed_until, produce, read_topic, running_detector, wait_until


def _variant(bundle: ModelBundle, tag: str, **changes: Any) -> ModelBundle:
    """A different model: the same network with slightly scaled weights, under a new version."""
    weights = [w * np.float32(1.001) for w in bundle.weights]
    return dataclasses.replace(bundle, version=f"{bundle.version[:16]}-{tag}", weights=weights, **changes)


def test_new_version_swaps_in_while_readings_flow_and_bad_bundles_are_refused(
        broker: Any, settings_for: Any, fitted_plant: Any, tmp_path: Path) -> None:
    settings = detector_settings(settings_for, broker, {"detector.registry_poll_s": "0.5"}, scores=True)
    uri = settings.registry.uri
    v1 = fitted_plant.bundle
    registry.publish(uri, v1, keep=10)
    start = fitted_plant.stream_start_ms
    sim = PlantSimulator(PLANT)
    first_end = start + 400 * PERIOD_MS
    produce(settings, sim, start, first_end)

    with running_detector(settings, v1, follow_registry=True) as det:
        wait_until(lambda: det.stats.records >= 5 * 400, 60, "the first part to be read")
        v2 = _variant(v1, "v2")
        swapped = threading.Event()
        produced: list[int] = []
        feeding = threading.Thread(target=lambda: produced.extend(feed_until(settings, sim, first_end, swapped)))
        feeding.start()  # readings keep flowing while the new version is published and swapped in
        registry.publish(uri, v2, keep=10)
        producer = make_producer(settings)
        producer.send(settings.topics.models, key=b"current", value=json.dumps({"version": v2.version}).encode())
        producer.close()
        wait_until(lambda: det.engine.model_version == v2.version, 30, "the swap to v2")
        swapped.set()
        feeding.join()
        total = 5 * (produced[0] - start) // PERIOD_MS
        wait_until(lambda: det.stats.records >= total, 60, "every reading to be read")

        # Three broken versions: each refused, v2 keeps serving.
        bad = {
            "truncated": _variant(v1, "truncated"),
            "checksum": _variant(v1, "checksum"),
            "features": _variant(v1, "features", features=tuple(reversed(v1.features))),
        }
        for tag, b in bad.items():
            version = registry.publish(uri, b, keep=10)
            folder = Path(uri) / "models" / version
            if tag == "truncated":
                data = (folder / "weights.npz").read_bytes()
                (folder / "weights.npz").write_bytes(data[: len(data) // 3])
            elif tag == "checksum":
                data = bytearray((folder / "scaling.npz").read_bytes())
                data[-10] ^= 0xFF
                (folder / "scaling.npz").write_bytes(bytes(data))
            det.watcher.check_now()
            wait_until(lambda: version in det.watcher.refused, 30, f"the {tag} bundle to be refused")
            assert det.engine.model_version == v2.version
        pauses = list(det.swap_pauses_s)

    scores = [json.loads(r.value) for r in read_topic(settings, settings.topics.scores, until=lambda r: False,
                                                      timeout_s=5)]
    keys = Counter((s["asset"], s["step_ms"]) for s in scores)
    assert max(keys.values()) == 1, "a step was scored twice across the swap"
    for asset in PLANT.asset_ids:
        steps = sorted(k[1] for k in keys if k[0] == asset)
        gaps = np.diff(steps)
        assert (gaps == PERIOD_MS).all(), f"{asset}: a step was skipped across the swap"
        versions = [s["model_version"] for s in sorted(scores, key=lambda s: s["step_ms"]) if s["asset"] == asset]
        switch = versions.index(v2.version)
        assert set(versions[:switch]) == {v1.version} and set(versions[switch:]) == {v2.version}
    assert len(pauses) == 1
    print(f"swap pause {pauses[0] * 1000:.1f} ms")
    assert pauses[0] < 0.1
