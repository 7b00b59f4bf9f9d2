"""Fault-injection harness: a seeded live stream, a clean reference of what it must produce,
detector processes to hurt, and the comparison written to ``tests/faults-report.json``.

The reference is the same readings through the same engine in one uninterrupted pass; a
faulted run must publish the same scored steps and the same alert events (ids, states,
steps) — nothing lost, every alert that closes in the reference closed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumers.http_server import probe_ready
from consumers.kafka_clients import make_producer
from pipeline.engine import DetectionEngine
from pipeline.readings import encode_wide
from pipeline.settings import Settings
from pipeline.simulate import PlantSimulator
from pipeline.tables import frame_to_batch

from .plant import PERIOD_MS, PLANT, one_anomaly_per_kind, read_topic

REPORT = Path(__file__).resolve().parents[1] / "faults-report.json"
LOGS = REPORT.with_name("faults-logs")  # each fault's process logs, kept after the run
_report_lock = threading.Lock()


@dataclass
class Reference:
    records: list[tuple[str, int, bytes]]  # (asset, event time, value) in production order
    steps: set[tuple[str, int]]            # (asset, step_ms) scored
    events: list[tuple[str, str, int]]     # (alert_id, state, step_ms) in order
    closes: set[str]                       # alert ids closed in the reference


def reference(bundle: Any, settings: Settings, start_ms: int, steps: int) -> Reference:
    """The seeded stream (one anomaly of each kind) and what an uninterrupted detector makes of it."""
    end = start_ms + steps * PERIOD_MS
    sim = PlantSimulator(PLANT, one_anomaly_per_kind(start_ms + 60 * PERIOD_MS, end - 60 * PERIOD_MS))
    frame = sim.frame(start_ms, end)
    records = [(r.asset, int(r.ts_ms), encode_wide(r.asset, int(r.ts_ms), {f: float(getattr(r, f))
                                                                              for f in PLANT.features}))
               for r in frame.itertuples(index=False)]
    engine = DetectionEngine(bundle, settings.grid)
    out = engine.process(frame_to_batch(frame, PLANT.features, ts_col="ts_ms", asset_col="asset"))
    scored = {(a, int(s) * PERIOD_MS) for a, s, sc in zip(out.asset, out.step, out.forecast_error) if sc == sc}
    events = [(e.alert_id, e.state, e.step_ms) for e in out.events]
    return Reference(records, scored, events, {e.alert_id for e in out.events if e.state == "close"})


def reference_of(bundle: Any, settings: Settings, held: list[Any]) -> Reference:
    """The reference of the readings a topic really holds (``held``: its records, in partition order)."""
    import pandas as pd

    rows = [json.loads(r.value) for r in held]
    frame = pd.DataFrame([{"asset": b["asset"], "ts_ms": b["ts"], **b["values"]} for b in rows])
    frame = frame.sort_values("ts_ms", kind="stable")
    records = [(r.key.decode(), int(b["ts"]), r.value) for r, b in zip(held, rows)]
    engine = DetectionEngine(bundle, settings.grid)
    out = engine.process(frame_to_batch(frame, PLANT.features, ts_col="ts_ms", asset_col="asset"))
    scored = {(a, int(s) * PERIOD_MS) for a, s, sc in zip(out.asset, out.step, out.forecast_error) if sc == sc}
    return Reference(records, scored, [(e.alert_id, e.state, e.step_ms) for e in out.events],
                     {e.alert_id for e in out.events if e.state == "close"})


class Stream:
    """Produces the reference records at a steady rate from a background thread."""

    def __init__(self, settings: Settings, ref: Reference, rate: float) -> None:
        self.settings, self.ref, self.rate = settings, ref, rate
        self.sent = 0
        self.done = threading.Event()
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def sent_at(self, index: int) -> float:
        """Wall-clock time the record at ``index`` was due to be sent."""
        return self.started + index / self.rate

    def _run(self) -> None:
        producer = make_producer(self.settings)
        t0 = time.monotonic()
        self.started = time.time()
        try:
            for i, (asset, _, value) in enumerate(self.ref.records):
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                producer.send(self.settings.topics.readings, key=asset.encode(), value=value)
                self.sent = i + 1
                if i % 50 == 0:
                    producer.flush()
            producer.flush()
        finally:
            producer.close()
            self.done.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the stream did not finish"


def detector_flags(settings: Settings, extra: dict[str, str] | None = None) -> list[str]:
    s = settings
    pairs = {
        "kafka.bootstrap_servers": s.kafka.bootstrap_servers, "topics.readings": s.topics.readings,
        "topics.alerts": s.topics.alerts, "topics.models": s.topics.models, "topics.scores": s.topics.scores,
        "detector.group_id": s.detector.group_id, "log.format": "json", "grid.gap_reset_steps": str(s.grid.gap_reset_steps),
        "detector.checkpoint_interval_ms": str(s.detector.checkpoint_interval_ms), **(extra or {}),
    }
    return [x for k, v in pairs.items() for x in ("--set", f"{k}={v}")]


def start_detector(settings: Settings, bundle_dir: str, log: Path, extra: dict[str, str] | None = None
                   ) -> subprocess.Popen[bytes]:
    """``plantwatch detect --model DIR`` as a separate process (so it can be killed for real);
    its probe port is ``proc.http_port``."""
    from consumers.broker import free_port

    port = int((extra or {}).get("detector.http_port") or free_port())
    cmd = [sys.executable, "-m", "cli", "detect", "--model", bundle_dir,
           *detector_flags(settings, {**(extra or {}), "detector.http_port": str(port)})]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    proc.http_port = port  # type: ignore[attr-defined]
    return proc


def ready(port: int) -> bool:
    """The detector on ``port`` answers /readyz with 200 (partitions assigned and restored)."""
    return probe_ready(port, timeout_s=2.0)


def wait_ready(*procs: Any, timeout_s: float = 120) -> None:
    """Block until every detector process is ready, so a fault lands on running members."""
    deadline = time.monotonic() + timeout_s
    while not all(ready(p.http_port) for p in procs):
        assert all(p.poll() is None for p in procs), "a detector exited before it was ready"
        assert time.monotonic() < deadline, "detectors not ready in time"
        time.sleep(0.3)


def log_path(fault: str, name: str) -> Path:
    folder = LOGS / fault
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    path.unlink(missing_ok=True)
    return path


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout_s)


def wait_for_scores(settings: Settings, ref: Reference, timeout_s: float) -> list[Any]:
    """The scores topic once it holds every reference step (or the time is up)."""
    def complete(records: list[Any]) -> bool:
        got = {(b["asset"], b["step_ms"]) for b in map(lambda r: json.loads(r.value), records)}
        return ref.steps <= got

    deadline = time.monotonic() + timeout_s
    records: list[Any] = []
    while time.monotonic() < deadline:
        records = read_topic(settings, settings.topics.scores, until=complete, timeout_s=min(20.0, timeout_s))
        if complete(records):
            break
    return records


def compare(settings: Settings, ref: Reference, sent: int, scores: list[Any], fault_at: float | None
            ) -> dict[str, Any]:
    """The report row of a faulted run against its reference."""
    alerts = [json.loads(r.value) for r in read_topic(settings, settings.topics.alerts, until=lambda r: False,
                                                      timeout_s=4)]
    got_steps = Counter((json.loads(r.value)["asset"], json.loads(r.value)["step_ms"]) for r in scores)
    got_events = Counter((a["alert_id"], a["state"], a["step_ms"]) for a in alerts)
    ref_events = Counter(ref.events)
    closed = {a["alert_id"] for a in alerts if a["state"] == "close"}
    recovery = None
    if fault_at is not None:
        firsts: dict[int, float] = {}
        for r in scores:
            t = r.timestamp / 1000
            if t > fault_at:
                firsts[r.partition] = min(firsts.get(r.partition, t), t)
        recovery = round(max(firsts.values()) - fault_at, 2) if firsts else None
    return {
        "sent": sent,
        "scored": len(got_steps),
        "lost": len(ref.steps - set(got_steps)) + sum((ref_events - got_events).values()),
        "extra": len(set(got_steps) - ref.steps) + sum(1 for e in got_events if e not in ref_events),
        "duplicate_scores": sum(n - 1 for n in got_steps.values()),
        "duplicate_alert_events": sum(n - 1 for n in got_events.values()),
        "alert_ids_identical": {a["alert_id"] for a in alerts} == {e[0] for e in ref.events},
        "orphaned_alerts": len(ref.closes - closed),
        "reference_alerts": len({e[0] for e in ref.events}),
        "recovery_s": recovery,
        "lost_steps": sorted(ref.steps - set(got_steps)),
        "examples": {"duplicated": [k for k, n in got_steps.items() if n > 1][:3]},
    }


def record(fault: str, row: dict[str, Any]) -> None:
    """Merge one fault's row into the report (other faults' rows are kept)."""
    with _report_lock:
        report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
        report[fault] = row
        REPORT.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def assert_exact(row: dict[str, Any]) -> None:
    assert row["lost"] == 0, row
    assert row["extra"] == 0, row
    assert row["alert_ids_identical"], row
    assert row["orphaned_alerts"] == 0, row
