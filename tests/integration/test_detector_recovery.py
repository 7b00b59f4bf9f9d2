"""Detector restarts: kill -9 loses nothing; SIGTERM hands over so nothing is scored twice or skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine import DetectionEngine
from pipeline.settings import GridSettings
from pipeline.simulate import PlantSimulator
from pipeline.tables import frame_to_batch

from .plant import PERIOD_MS, PLANT, detector_settings, one_anomaly_per_kind, produce, read_topic

STEPS = 3000


def _flags(settings: Any) -> list[str]:
    s = settings
    pairs = {
        "kafka.bootstrap_servers": s.kafka.bootstrap_servers, "topics.readings": s.topics.readings,
        "topics.alerts": s.topics.alerts, "topics.models": s.topics.models, "topics.scores": s.topics.scores,
        "detector.group_id": s.detector.group_id, "kafka.max_poll_records": "500", "log.format": "json",
    }
    return [x for k, v in pairs.items() for x in ("--set", f"{k}={v}")]


def _start(settings: Any, bundle_dir: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cli", "detect", "--model", bundle_dir, *_flags(settings)]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _scores(settings: Any, n: int, timeout_s: float) -> list[dict[str, Any]]:
    recs = read_topic(settings, settings.topics.scores, until=lambda r: len(r) >= n, timeout_s=timeout_s)
    return [json.loads(r.value) for r in recs]


def _reference(fitted: Any, frame: Any) -> tuple[set[tuple[str, int]], list[Any]]:
    """The same readings through the same engine, uninterrupted."""
    engine = DetectionEngine(fitted.bundle, GridSettings())
    out = engine.process(frame_to_batch(frame, PLANT.features, ts_col="ts_ms", asset_col="asset"))
    steps = {(a, int(s) * PERIOD_MS) for a, s, sc in zip(out.asset, out.step, out.forecast_error) if sc == sc}
    return steps, [e for e in out.events if e.state == "open"]


def _stream(fitted: Any, settings: Any) -> Any:
    start = fitted.stream_start_ms - 300 * PERIOD_MS
    end = fitted.stream_start_ms + STEPS * PERIOD_MS
    anomalies = one_anomaly_per_kind(fitted.stream_start_ms + 1000 * PERIOD_MS, end)
    sim = PlantSimulator(PLANT, anomalies)
    produce(settings, sim, start, end)
    return sim.frame(start, end)


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_scores_every_reading_and_loses_no_alert(
        broker: Any, settings_for: Any, fitted_plant: Any, tmp_path: Path) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    frame = _stream(fitted_plant, settings)
    expected, ref_alerts = _reference(fitted_plant, frame)
    assert len(ref_alerts) >= 3  # enough alerts to compare across the crash

    first = _start(settings, fitted_plant.bundle_dir, tmp_path / "a.log")
    _scores(settings, len(expected) // 3, 120)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = _start(settings, fitted_plant.bundle_dir, tmp_path / "b.log")
    try:
        got = _scores(settings, len(expected), 180)
        deadline = time.monotonic() + 60
        while not expected <= {(g["asset"], g["step_ms"]) for g in got} and time.monotonic() < deadline:
            got = _scores(settings, len(got) + 1, 5)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    scored = {(g["asset"], g["step_ms"]) for g in got}
    assert expected <= scored, f"{len(expected - scored)} steps never scored"
    alerts = [json.loads(r.value) for r in read_topic(settings, settings.topics.alerts, until=lambda r: False,
                                                      timeout_s=3)]
    for ref in ref_alerts:
        assert any(a["asset"] == ref.asset and a["start_ms"] <= ref.start_ms + 30 * PERIOD_MS
                   and (a["end_ms"] is None or a["end_ms"] >= ref.start_ms) for a in alerts), f"lost {ref}"


@pytest.mark.slow
def test_sigterm_mid_stream_then_restart_scores_each_step_exactly_once_with_the_same_alerts(
        broker: Any, settings_for: Any, fitted_plant: Any, tmp_path: Path) -> None:
    settings = detector_settings(settings_for, broker, scores=True)
    frame = _stream(fitted_plant, settings)
    expected, ref_alerts = _reference(fitted_plant, frame)

    first = _start(settings, fitted_plant.bundle_dir, tmp_path / "a.log")
    _scores(settings, len(expected) // 3, 120)
    t = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    stop_s = time.monotonic() - t
    second = _start(settings, fitted_plant.bundle_dir, tmp_path / "b.log")
    try:
        got = _scores(settings, len(expected), 180)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    keys = Counter((g["asset"], g["step_ms"]) for g in got)
    twice = [k for k, n in keys.items() if n > 1]
    assert twice == [], f"{len(twice)} steps scored twice"
    assert set(keys) == expected, f"skipped {len(expected - set(keys))}, extra {len(set(keys) - expected)}"
    alerts = [json.loads(r.value) for r in read_topic(settings, settings.topics.alerts, until=lambda r: False,
                                                      timeout_s=3)]
    assert sorted(a["alert_id"] for a in alerts if a["state"] == "open") == sorted(e.alert_id for e in ref_alerts)
    assert stop_s < 10
