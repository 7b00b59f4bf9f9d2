"""Simulator → readings topic → detector → alerts topic, on the real broker."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from prometheus_client import REGISTRY

from pipeline.evaluation import Series, replay
from pipeline.simulate import PlantSimulator

from .plant import (
    PERIOD_MS,
    PLANT,
    alerts_of,
    detector_settings,
    one_anomaly_per_kind,
    produce,
    read_topic,
    running_detector,
    wait_until,
)

CLEAN_STEPS = 2100
TOTAL_STEPS = 3000
SLACK_MS = 30 * PERIOD_MS  # an alert may trail its anomaly by the smoothing


def test_every_injected_anomaly_alerts_on_its_asset_and_clean_stretches_stay_quiet(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker)
    start = fitted_plant.stream_start_ms
    warm = start - 500 * PERIOD_MS  # the detector first sees the end of the history, like a running plant
    anomalies = one_anomaly_per_kind(start + CLEAN_STEPS * PERIOD_MS, start + TOTAL_STEPS * PERIOD_MS)
    sent = produce(settings, PlantSimulator(PLANT, anomalies), warm, start + TOTAL_STEPS * PERIOD_MS)
    assert sent == 5 * 3500

    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= sent, 180, "the detector to read every reading")
        served = REGISTRY.get_sample_value("plantwatch_model_info", {"version": fitted_plant.bundle.version,
                                                                     "step_runtime": "litert"})
    assert served == 1.0
    assert det.stats.accepted == sent and det.stats.rejects == {}

    alerts = alerts_of(read_topic(settings, settings.topics.alerts, until=lambda r: False, timeout_s=5))
    opened = [a for a in alerts if a["state"] == "open"]
    for an in anomalies:
        hits = [a for a in alerts if a["asset"] == an.asset and a["start_ms"] <= an.end_ms + SLACK_MS
                and (a["end_ms"] is None or a["end_ms"] >= an.start_ms)]
        assert hits, f"no alert for {an}"
        named = {f["feature"] for a in hits for f in a["top_features"]}
        assert set(an.sensors) <= named, f"{an.kind} on {an.sensors}: alerts named {named}"
        assert all(a["model_version"] == fitted_plant.bundle.version for a in hits)
        assert hits[0]["source"]["topic"] == settings.topics.readings
    clean_end = start + CLEAN_STEPS * PERIOD_MS
    false_alarms = [a for a in opened if a["start_ms"] < clean_end]
    assert false_alarms == [], f"alerts in the clean stretch: {false_alarms}"

    # The evaluation path (``plantwatch evaluate``) replays the same readings offline and must
    # find the same alerts. It flushes the grid at the end, the live detector keeps the last
    # steps open, so alerts still open at the end are compared by their start only.
    frame = PlantSimulator(PLANT, anomalies).frame(warm, start + TOTAL_STEPS * PERIOD_MS)
    features = list(fitted_plant.bundle.features)
    series = [Series(a, g["ts_ms"].to_numpy(np.int64), g[features].to_numpy(np.float64))
              for a, g in frame.groupby("asset", sort=True)]
    traces = replay(fitted_plant.bundle, settings.grid, series)
    live: dict[str, dict[str, tuple[int, float]]] = {}
    for a in alerts:
        end = math.inf if a["end_ms"] is None else float(a["end_ms"])
        live.setdefault(a["asset"], {})[a["alert_id"]] = (a["start_ms"], end)
    for s in series:
        offline = traces[s.name].spans
        online = sorted(live.get(s.name, {}).values())
        assert [st for st, _ in online] == [st for st, _ in offline], f"{s.name}: alert starts differ"
        for (_, on_end), (_, off_end) in zip(online, offline):
            assert on_end == math.inf or on_end == off_end, f"{s.name}: alert ends differ"
    assert sum(len(t.spans) for t in traces.values()) >= len(anomalies)
