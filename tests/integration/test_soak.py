"""A short soak in CI (``make soak`` runs 30 minutes): detector, archiver and a scheduled
retrain with hot swaps run as separate processes at a steady live rate with injected
anomalies; nothing exits, every live step is scored, and memory, descriptors, threads and
latency stay flat."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakConfig, run_soak, table

from .faults import record

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900)]


def test_three_minute_soak_with_retrains_and_swaps_stays_flat(tmp_path: Path) -> None:
    report = run_soak(SoakConfig(minutes=3, assets=20, retrain_every_s=60, sample_s=2, warmup_s=60,
                                 history_steps=3000, workdir=tmp_path))
    record("soak_3min", report)
    print(table(report))
    assert report["exit_codes"] == {"detector": 0, "archiver": 0, "scheduler": 0}, report["exit_codes"]
    assert report["retrains_published"] >= 1 and report["swaps"] >= 1, report
    # every live step the readings close is scored once, through retrains and swaps
    assert report["live_steps_closable"] >= 0.95 * report["sent"], report
    assert report["live_steps_missing"] == 0 and report["duplicate_scores"] == 0, report
    det = report["detector"]
    assert det["fds"]["end"] <= det["fds"]["start"] + 4, det
    assert det["threads"]["end"] <= det["threads"]["start"] + 2, det
    assert det["rss_mb"]["end"] <= 1.2 * det["rss_mb"]["start"], det
    arch = report["archiver"]
    assert arch["fds"]["end"] <= arch["fds"]["start"] + 4 and arch["rss_mb"]["end"] <= 1.2 * arch["rss_mb"]["start"], arch
    assert report["latency_ms"]["p99_trend"]["end"] < 5000, report["latency_ms"]
