"""Soak: the daemons as an operator runs them, at a steady rate, for a long time.

An embedded broker; a simulated plant streaming at wall-clock pace with injected anomalies;
``plantwatch detect`` (following the registry), ``plantwatch archive`` and ``plantwatch
schedule`` (a retrain every ``--retrain-every-s``, each published model hot-swapped) as
separate processes, as in production. Every ``--sample-s`` it samples each daemon's RSS,
open file descriptors and threads from ``/proc``, and it measures the latency of every
scored step: from the wall-clock send of the reading that closes the step (event time ≥
step end + allowed lateness) to the score record's produce timestamp on the scores topic.

Prints a table and writes ``--out`` (JSON): per daemon and figure the start and end values
(medians of the first and last tenth of the samples after the warm-up) and the slope of a
least-squares line per hour; p99 latency per minute likewise; swaps, alerts, exits.
``make soak`` runs 30 minutes; ``tests/integration/test_soak.py`` a short one in CI.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consumers.http_server import probe_ready

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("detector", "archiver", "scheduler")
FIGURES = ("rss_mb", "fds", "threads")
PERIOD_S = 0.2
LATENESS_S = 1.0


@dataclass
class SoakConfig:
    minutes: float = 30.0
    assets: int = 20
    retrain_every_s: float = 300.0
    sample_s: float = 5.0
    warmup_s: float = 60.0      # samples before this (from the live start) are not in start/end/slope
    history_steps: int = 3000   # backdated readings per asset the first model is fitted on
    workdir: Path | None = None


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def proc_figures(pid: int) -> dict[str, float] | None:
    """RSS (MB), open descriptors and threads of a live process, from ``/proc``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "fds": float(fds), "threads": float(fields["Threads"])}


def trend(t: list[float], v: list[float], after_s: float) -> dict[str, float | None]:
    """Start and end (medians of the first and last tenth) and the least-squares slope per hour."""
    ts, vs = np.asarray(t, float), np.asarray(v, float)
    keep = ts >= after_s
    ts, vs = ts[keep], vs[keep]
    if len(ts) < 3:
        return {"start": None, "end": None, "slope_per_h": None, "n": int(len(ts))}
    k = max(1, len(ts) // 10)
    slope = float(np.polyfit(ts / 3600.0, vs, 1)[0])
    return {"start": round(float(np.median(vs[:k])), 3), "end": round(float(np.median(vs[-k:])), 3),
            "slope_per_h": round(slope, 3), "n": int(len(ts))}


def _metric(port: int, name: str) -> float:
    """Sum of a Prometheus counter's samples on a daemon's /metrics (0 when absent)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


class Plant(threading.Thread):
    """Sends one reading per asset per period at wall-clock pace and remembers when each was sent."""

    def __init__(self, settings: Any, config: Any, anomalies: list[Any], start_ms: int, end_ms: int,
                 stop: threading.Event) -> None:
        super().__init__(name="plant", daemon=True)
        from pipeline.simulate import PlantSimulator

        self.settings, self.sim, self.stop = settings, PlantSimulator(config, anomalies), stop
        self.start_ms, self.end_ms, self.period_ms = start_ms, end_ms, config.period_ms
        self.features = config.features
        self.sent_at: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        self.lock = threading.Lock()
        self.sent = 0
        self.behind_ms = 0.0

    def run(self) -> None:
        from consumers.kafka_clients import make_producer
        from pipeline.readings import encode_wide

        producer = make_producer(self.settings)
        chunk_ms = 60_000
        try:
            for c0 in range(self.start_ms, self.end_ms, chunk_ms):
                frame = self.sim.frame(c0, min(c0 + chunk_ms, self.end_ms))
                for ts, rows in frame.groupby("ts_ms", sort=True):
                    delay = ts / 1000 - time.time()
                    if delay > 0 and self.stop.wait(delay):
                        return
                    self.behind_ms = max(self.behind_ms, -delay * 1000)
                    now = time.time()
                    for r in rows.itertuples(index=False):
                        body = encode_wide(r.asset, int(ts), {f: float(getattr(r, f)) for f in self.features})
                        producer.send(self.settings.topics.readings, key=r.asset.encode(), value=body)
                        with self.lock:
                            stamps, sends = self.sent_at[r.asset]
                            stamps.append(int(ts))
                            sends.append(now)
                        self.sent += 1
                    producer.flush()
        finally:
            producer.close()

    def closable_steps(self, lateness_ms: int, warmup_steps: int) -> set[tuple[str, int]]:
        """(asset, step_ms) of every live step the readings sent so far close and score: the live
        stream starts after a gap longer than the reset limit, so each asset warms up again first."""
        first = self.start_ms + warmup_steps * self.period_ms
        with self.lock:
            return {(asset, step) for asset, (stamps, _) in self.sent_at.items() if stamps
                    for step in range(first, stamps[-1] - self.period_ms - lateness_ms + 1, self.period_ms)}

    def closing_send(self, asset: str, step_ms: int, lateness_ms: int) -> float | None:
        """When the reading that closed ``step_ms`` of ``asset`` was sent (None: not sent yet)."""
        with self.lock:
            stamps, sends = self.sent_at.get(asset, ([], []))
            i = bisect.bisect_left(stamps, step_ms + self.period_ms + lateness_ms)
            return sends[i] if i < len(sends) else None


class ScoreWatch(threading.Thread):
    """Reads the scores topic and turns each score into a latency sample."""

    def __init__(self, settings: Any, plant: Plant, stop: threading.Event) -> None:
        super().__init__(name="scores", daemon=True)
        self.settings, self.plant, self.stop = settings, plant, stop
        self.latencies: list[tuple[float, float]] = []  # (wall time of the score, latency s)
        self.live: set[tuple[str, int]] = set()  # (asset, step_ms) of the live steps scored
        self.duplicates = 0
        self.scores = 0  # score records read, history included

    def run(self) -> None:
        from consumers.kafka_clients import make_consumer

        consumer = make_consumer(self.settings, group_id=None, topics=[self.settings.topics.scores])
        lateness = self.settings.grid.lateness_ms
        try:
            while not self.stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for r in records:
                        body = json.loads(r.value)
                        self.scores += 1
                        if int(body["step_ms"]) < self.plant.start_ms:
                            continue  # a step of the history, closed by a reading sent before the live stream
                        key = (body["asset"], int(body["step_ms"]))
                        self.duplicates += key in self.live
                        self.live.add(key)
                        sent = self.plant.closing_send(body["asset"], int(body["step_ms"]), lateness)
                        if sent is not None:
                            self.latencies.append((r.timestamp / 1000, r.timestamp / 1000 - sent))
        finally:
            consumer.close()


def _wait_caught_up(ports: dict[str, int], procs: dict[str, subprocess.Popen[bytes]], say: Any,
                    timeout_s: float = 300) -> None:
    """Until the detector and the archiver answer /readyz and have read the history (lag 0)."""
    deadline = time.monotonic() + timeout_s
    lags = {"detector": "plantwatch_consumer_lag", "archiver": "plantwatch_archive_lag"}
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.values()):
            return  # the sampling loop reports the exit
        if all(probe_ready(ports[n]) and _metric(ports[n], lags[n]) == 0 for n in lags):
            return
        time.sleep(1)
    say("soak: the daemons did not catch up with the history in time; streaming anyway")


def _env(overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    env.update({"PLANTWATCH_" + k.replace(".", "__").upper(): v for k, v in overrides.items()})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run_soak(cfg: SoakConfig, say: Any = print) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring)."""
    from consumers.broker import LocalBroker, free_port
    from consumers.kafka_clients import make_producer
    from consumers.topics import ensure_topics, standard_topics
    from pipeline.fit import fit_bundle
    from pipeline.registry import publish
    from pipeline.settings import load_settings
    from pipeline.simulate import PlantConfig, PlantSimulator, plan_anomalies
    from pipeline.tables import frame_to_batch

    own_tmp = None
    if cfg.workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="plantwatch-soak-")
        cfg.workdir = Path(own_tmp.name)
    work = cfg.workdir
    work.mkdir(parents=True, exist_ok=True)
    period_ms = round(PERIOD_S * 1000)
    live_s = cfg.minutes * 60
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports = {name: free_port() for name in ("detector", "archiver")}
    stop = threading.Event()
    with LocalBroker(log_path=work / "broker.log") as broker:
        overrides = {
            "kafka.bootstrap_servers": broker.bootstrap_servers, "topics.readings": "soak.readings",
            "topics.alerts": "soak.alerts", "topics.dlq": "soak.dlq", "topics.models": "soak.models",
            "topics.scores": "soak.readings.scores",
            "grid.period_s": str(PERIOD_S), "grid.allowed_lateness_s": str(LATENESS_S),
            "model.units": "32,16", "model.timesteps": "16", "model.epochs": "3", "model.patience": "2",
            "registry.uri": str(work / "registry"), "archive.uri": str(work / "archive"),
            "archive.flush_seconds": "5", "detector.registry_poll_s": "2", "log.format": "json",
            "trainer.lock_path": str(work / "trainer.lock"), "trainer.min_rows": "1000",
            "trainer.interval_s": str(cfg.retrain_every_s),
            # training sees the history and the live stream so far; the gate compares on the newest minute
            "trainer.lookback_hours": str((cfg.history_steps * PERIOD_S + live_s + 600) / 3600),
            "trainer.holdout_hours": str(60 / 3600),
            # this run soaks the retrain-and-swap cycle: every fitted model is published, whatever the gate says
            "trainer.gate_margin": "100",
        }
        settings = load_settings(env={}, overrides=overrides)
        ensure_topics(settings, standard_topics(settings))
        plant = PlantConfig(n_assets=cfg.assets, period_ms=period_ms, seed=11, day_ms=600_000)
        now_ms = (int(time.time() * 1000) // period_ms + 1) * period_ms
        history_start = now_ms - cfg.history_steps * period_ms
        sim = PlantSimulator(plant)
        say(f"soak: {cfg.assets} assets at {1 / PERIOD_S:.0f} Hz for {cfg.minutes:g} min, "
            f"retrain every {cfg.retrain_every_s:g} s; fitting the first model on {cfg.history_steps} steps …")
        history = sim.frame(history_start, now_ms)
        producer = make_producer(settings)
        from consumers.simulator_feed import encode_frame

        for key, value in encode_frame(history, plant.features, "wide"):
            producer.send(settings.topics.readings, key=key, value=value)
        producer.flush()
        producer.close()
        bundle, _ = fit_bundle(frame_to_batch(history, plant.features, ts_col="ts_ms", asset_col="asset"),
                               load_settings(env={}, overrides={**overrides, "model.epochs": "8"}),
                               metadata={"source": "soak history"})
        publish(settings.registry.uri, bundle, keep=settings.registry.keep)

        env = _env(overrides)
        cli = [sys.executable, "-m", "cli"]
        commands = {
            "detector": [*cli, "detect", "--set", f"detector.http_port={ports['detector']}"],
            "archiver": [*cli, "archive", "--http-port", str(ports["archiver"])],
            "scheduler": [*cli, "schedule"],
        }
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=(work / f"{name}.log").open("ab"),
                                           stderr=subprocess.STDOUT)
        _wait_caught_up(ports, procs, say)  # the live stream starts on running daemons, as in production
        live_start = (int(time.time() * 1000) // period_ms + 1) * period_ms
        live_end = live_start + int(live_s * 1000)
        anomalies = plan_anomalies(plant, live_start + 60_000, live_end, per_asset=max(1, int(cfg.minutes // 10)))
        feed = Plant(settings, plant, anomalies, live_start, live_end, stop)
        watch = ScoreWatch(settings, feed, stop)
        feed.start()
        watch.start()

        samples = {name: Samples() for name in DAEMONS}
        load_t: list[float] = []
        load: list[float] = []  # the machine's 1-minute load average: latency on a shared machine follows it
        exits: dict[str, int | None] = {}
        t0 = live_start / 1000
        next_say = time.time() + 60
        while feed.is_alive():
            for name, proc in procs.items():
                figs = proc_figures(proc.pid) if proc.poll() is None else None
                if figs is None:
                    exits.setdefault(name, proc.poll())
                    continue
                samples[name].t.append(time.time() - t0)
                for k, v in figs.items():
                    samples[name].values[k].append(v)
            load_t.append(time.time() - t0)
            load.append(os.getloadavg()[0])
            if exits:
                say(f"soak: a daemon exited: {exits}")
                stop.set()
                break
            if time.time() >= next_say:
                next_say += 60
                say(f"soak: {time.time() - t0:5.0f} s, sent {feed.sent}, scores {watch.scores}, detector RSS "
                    f"{samples['detector'].values['rss_mb'][-1]:.0f} MB")
            time.sleep(cfg.sample_s)
        closable = feed.closable_steps(settings.grid.lateness_ms, bundle.warmup_steps)
        deadline = time.monotonic() + 60  # the last closable steps are scored and their scores read
        while not closable <= watch.live and time.monotonic() < deadline and not exits:
            time.sleep(0.5)
        swaps = _metric(ports["detector"], 'plantwatch_model_swaps_total{outcome="swapped"}')
        alerts = _metric(ports["detector"], 'plantwatch_alert_events_total{state="open"}')
        stop.set()
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                exits[name] = exits.get(name, proc.wait(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                exits[name] = None
        watch.join(10)
    from pipeline.registry import list_versions

    published = sum('"training run published"' in line for line in (work / "scheduler.log").read_text().splitlines())
    report = _report(cfg, samples, watch, feed, exits, swaps, alerts, published, live_s)
    missing = sorted(closable - watch.live)
    report.update(live_steps_closable=len(closable), live_steps_missing=len(missing),
                  live_steps_extra=len(watch.live - closable), missing_examples=missing[:5],
                  duplicate_scores=watch.duplicates)
    report["load_avg_1m"] = trend(load_t, load, cfg.warmup_s)
    report["registry_versions"] = [v.version for v in list_versions(str(work / "registry"))]
    if own_tmp is not None:
        own_tmp.cleanup()
    return report


def _report(cfg: SoakConfig, samples: dict[str, Samples], watch: ScoreWatch, feed: Plant,
            exits: dict[str, int | None], swaps: float, alerts: float, published: int, live_s: float
            ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "minutes": cfg.minutes, "assets": cfg.assets, "rate_per_s": round(cfg.assets / PERIOD_S, 1),
        "sent": feed.sent, "scores": watch.scores, "live_steps_scored": len(watch.latencies), "swaps": swaps,
        "alerts_opened": alerts, "retrains_published": published, "exit_codes": exits, "producer_behind_ms_max": round(feed.behind_ms, 1),
    }
    for name, s in samples.items():
        out[name] = {k: trend(s.t, s.values[k], cfg.warmup_s) for k in FIGURES}
    window_s = max(15.0, min(60.0, live_s / 10))  # p99 per window: a minute in a long soak
    by_window: dict[int, list[float]] = defaultdict(list)
    for t, lat in watch.latencies:
        by_window[int((t - feed.start_ms / 1000) // window_s)].append(lat)
    windows = sorted(by_window)
    p99 = [float(np.percentile(by_window[w], 99)) * 1000 for w in windows]
    all_lat = [lat for _, lat in watch.latencies]
    out["latency_ms"] = {
        "p50": round(float(np.percentile(all_lat, 50)) * 1000, 1) if all_lat else None,
        "p99": round(float(np.percentile(all_lat, 99)) * 1000, 1) if all_lat else None,
        "window_s": window_s,
        "p99_per_window": [round(v, 1) for v in p99],
        "p99_trend": trend([(w + 0.5) * window_s for w in windows], p99, cfg.warmup_s),
        "definition": "wall-clock send of the reading that closes a step → the score record's produce "
                      f"timestamp; allowed lateness {LATENESS_S} s and period {PERIOD_S} s not included",
    }
    return out


def table(report: dict[str, Any]) -> str:
    """The soak's figures as a Markdown table."""
    rows = ["| daemon | figure | start | end | slope per hour |", "|---|---|---|---|---|"]
    for name in DAEMONS:
        for k in FIGURES:
            f = report[name][k]
            rows.append(f"| {name} | {k} | {f['start']} | {f['end']} | {f['slope_per_h']} |")
    p = report["latency_ms"]["p99_trend"]
    rows.append(f"| detector | p99 latency ms (per window)  | {p['start']} | {p['end']} | {p['slope_per_h']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--assets", type=int, default=20)
    ap.add_argument("--retrain-every-s", type=float, default=300.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="left out of start, end and slopes")
    ap.add_argument("--out", default=str(REPO / "bench" / "soak.json"))
    ap.add_argument("--workdir", default=None, help="keep the run's files (logs, archive, registry) here")
    a = ap.parse_args(argv)
    cfg = SoakConfig(minutes=a.minutes, assets=a.assets, retrain_every_s=a.retrain_every_s, sample_s=a.sample_s, warmup_s=a.warmup_s,
                     workdir=Path(a.workdir) if a.workdir else None)
    report = run_soak(cfg)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"sent {report['sent']}, scores {report['scores']}, swaps {report['swaps']}, alerts opened "
          f"{report['alerts_opened']}, latency p50 {report['latency_ms']['p50']} ms p99 {report['latency_ms']['p99']} ms, "
          f"exit codes {report['exit_codes']}")
    return 0 if all(c == 0 for c in report["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
