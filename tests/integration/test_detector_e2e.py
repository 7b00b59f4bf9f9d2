"""Simulator → readings topic → detector → alerts topic, on the real broker."""

from __future__ import annotations

from typing import Any

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
