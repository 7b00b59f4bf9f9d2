"""What exact recovery costs: per poll, per checkpoint, and at a graceful stop.

    python -m bench.recovery_cost [--fleets 1000,100000] [--poll 1000] [--sigterm-assets 100000]

* ``commit_plan_ms_<N>``: the commit bookkeeping of one poll of ``--poll`` records (which records
  to process, which are silent, which assets changed, the progress to record) with N assets
  held, all restored from snapshots inside the replayed interval;
* ``snapshot_us_per_asset_<N>``: encoding one asset's state for the changelog;
* ``checkpoint_s_<N>``: writing N changed assets to the state topic on the local broker and
  waiting for the acknowledgements (the worst case: every asset changed in one interval);
* ``sigterm_exit_s_<M>``: ``plantwatch detect`` holding M assets, all changed since its last
  checkpoint, from SIGTERM to exit 0 (final checkpoint and commit included).

Prints one JSON object; compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.scoring_cost import random_bundle
from pipeline.checkpoint import Checkpoints, Restored
from pipeline.engine import DetectionEngine
from pipeline.readings import decode_batch, encode_wide
from pipeline.settings import GridSettings, PUMP_FEATURES

T0 = 1_700_000_000_000


def _engine_with(n: int) -> DetectionEngine:
    """An engine holding n assets (one open grid step each, a state row each)."""
    bundle = random_bundle(len(PUMP_FEATURES))
    engine = DetectionEngine(bundle, GridSettings())
    names = [f"a{i:06d}" for i in range(n)]
    values = dict.fromkeys(PUMP_FEATURES, 1.0)
    for i in range(0, n, 20000):
        engine.process(decode_batch([encode_wide(a, T0, values) for a in names[i:i + 20000]], PUMP_FEATURES))
    engine.state.rows(np.array(names, dtype=object))
    return engine


def pure_costs(n: int, poll: int, repeats: int = 20) -> dict[str, float]:
    engine = _engine_with(n)
    names = np.array(sorted(engine.state.grid.assets), dtype=object)
    cp = Checkpoints(interval_ms=2000)
    rng = np.random.default_rng(0)
    # Restored after a crash: every asset's snapshot is somewhere in the replayed interval, so
    # the plan drops records already in a snapshot for the whole run (the worst case).
    span = poll * (repeats + 1) * 10
    cp.assign(0, committed=0, restored=Restored(dict(zip(names.tolist(), rng.integers(1, span, n).tolist()))))
    plan_t, snap_t = [], []
    offset = 1
    for _ in range(repeats):
        keys = names[rng.integers(0, n, poll)]
        offsets = np.arange(offset, offset + poll)
        offset += poll
        t = time.perf_counter()
        plan = cp.plan(np.zeros(poll, np.int64), offsets, keys)
        cp.processed(0, int(offsets[-1]) + 1, set(keys[plan.process].tolist()))
        cp.published([0])
        plan_t.append(time.perf_counter() - t)
        dirty = sorted(set(keys.tolist()))
        t = time.perf_counter()
        blobs = engine.state.snapshot(dirty, {"model_version": "bench"})
        snap_t.append((time.perf_counter() - t) / len(dirty))
        cp.begin()
        cp.checkpointed({0: int(offsets[-1]) + 1}, 0)
    return {f"commit_plan_ms_{n}": round(float(np.median(plan_t)) * 1e3, 3),
            f"snapshot_us_per_asset_{n}": round(float(np.median(snap_t)) * 1e6, 2),
            "snapshot_bytes_per_asset": len(blobs[0])}


def checkpoint_cost(bootstrap: str, n: int) -> float:
    from consumers.detector import make_state_producer
    from pipeline.settings import load_settings

    engine = _engine_with(n)
    names = sorted(engine.state.grid.assets)
    settings = load_settings(env={}, overrides={"kafka.bootstrap_servers": bootstrap})
    producer = make_state_producer(settings)
    try:
        t = time.perf_counter()
        for i in range(0, n, 5000):
            chunk = names[i:i + 5000]
            for a, b in zip(chunk, engine.state.snapshot(chunk, {"model_version": "bench"})):
                producer.send("bench.state", key=a.encode(), value=b, partition=0)
        producer.flush()
        return time.perf_counter() - t
    finally:
        producer.close()


def sigterm_exit(bootstrap: str, n: int) -> dict[str, float]:
    """A detector process holding n assets, all changed since its last checkpoint: SIGTERM → exit."""
    from consumers.kafka_clients import make_producer
    from pipeline.bundle import save_bundle
    from pipeline.settings import load_settings

    tmp = Path(tempfile.mkdtemp())
    save_bundle(random_bundle(len(PUMP_FEATURES)), str(tmp / "model"))
    port = _free_port()
    flags = {"kafka.bootstrap_servers": bootstrap, "topics.readings": "bench.readings", "topics.alerts": "bench.alerts",
             "detector.group_id": "bench-detector", "detector.http_port": str(port),
             "detector.checkpoint_interval_ms": "600000", "log.format": "json", "topics.partitions": "1"}
    argv = [x for k, v in flags.items() for x in ("--set", f"{k}={v}")]
    log = open(tmp / "detect.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "detect", "--model", str(tmp / "model"), *argv],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    settings = load_settings(env={}, overrides={"kafka.bootstrap_servers": bootstrap})
    _wait(lambda: _metric(port, "plantwatch_assets") is not None, 120)
    producer = make_producer(settings)
    values = dict.fromkeys(PUMP_FEATURES, 1.0)
    for i in range(n):
        a = f"a{i:06d}"
        producer.send("bench.readings", key=a.encode(), value=encode_wide(a, T0 + 1000 * (i % 5), values))
    producer.flush()
    producer.close()
    _wait(lambda: (_metric(port, "plantwatch_records_total") or 0) >= n, 600)
    _wait(lambda: (_metric(port, "plantwatch_assets") or 0) >= 0, 10)
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(300)
    exit_s = time.perf_counter() - t
    log.close()
    tail = (tmp / "detect.log").read_text().splitlines()[-3:]
    return {f"sigterm_exit_s_{n}": round(exit_s, 2), f"sigterm_exit_code_{n}": code,
            "sigterm_log_tail": [line[:200] for line in tail]}


def _free_port() -> int:
    from consumers.broker import free_port

    return free_port()


def _metric(port: int, name: str) -> float | None:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _wait(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fleets", default="1000,100000")
    ap.add_argument("--poll", type=int, default=1000)
    ap.add_argument("--sigterm-assets", type=int, default=100000)
    ap.add_argument("--no-broker", action="store_true", help="only the per-poll and snapshot costs")
    args = ap.parse_args()
    from consumers.broker import LocalBroker

    out: dict[str, Any] = {}
    for n in (int(x) for x in args.fleets.split(",")):
        out.update(pure_costs(n, args.poll))
    if args.no_broker:
        print(json.dumps(out))
        return
    with LocalBroker() as broker:
        for n in (int(x) for x in args.fleets.split(",")):
            out[f"checkpoint_s_{n}"] = round(checkpoint_cost(broker.bootstrap_servers, n), 3)
        if args.sigterm_assets:
            out.update(sigterm_exit(broker.bootstrap_servers, args.sigterm_assets))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
