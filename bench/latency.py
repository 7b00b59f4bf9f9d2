"""Latency from the reading that closes a grid step to the broker's acknowledgement of its score.

    python -m bench.latency [--assets 1000] [--seconds 30] [--fraction 0.5] [--max-rate R]
                            [--lateness-s 0] [--set key=value ...]

An embedded broker. The detector's maximum rate is measured first, in the configuration
measured here (scores topic on, the same lateness and ``--set`` settings): its rate on 100,000
wide records produced beforehand, as :mod:`bench.throughput` measures it, is offered live, which
is more than it can take beside a producer on the same machine, and the rate it then sustains is
the maximum (or ``--max-rate``). Then a live feed of
``--assets`` assets sends wide readings at ``--fraction`` of it: each asset once per grid period,
the assets spread evenly over the period, each reading stamped with its send time (its event
time and its Kafka CreateTime). The grid period is ``assets / rate`` and the model is fitted at
that period. The detector (``Detector`` as ``plantwatch detect --model`` runs it, scores topic
on, ``grid.allowed_lateness_s`` = ``--lateness-s``) runs in its own process; its output
producer notes when the broker acknowledged each score record (the send's callback, in the
client that sent it: the topic's LogAppendTime is not available on the embedded broker).

Latency of a step = acknowledgement of its score − CreateTime of the asset's first reading
stamped at or after the step's end + the allowed lateness (the reading that made it closable).
The lateness is the user's choice and is reported beside the figure, not subtracted. Steps
closed in the first ``--warmup-s`` seconds (model start-up) are left out. Prints one JSON object,
with where the time goes (p50 and p99 of each part): from a reading's CreateTime until a poll
returned it (the broker, the fetch, and the detector busy with the previous poll or a
checkpoint), the processing of a poll, from a score's send to its acknowledgement, and the
checkpoints' stalls between two polls (every ``detector.checkpoint_interval_ms``: each slice of
the snapshots, then the commit once they are acknowledged).
"""

from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.throughput import REPO, bench_settings, fit_tiny_bundle, produce_readings, worker

TOPIC = "bench.live"


# ------------------------------------------------------------------ detector process
# One score record in this many has its acknowledgement noted: a callback on every record cost
# the detector's thread about an eighth of its time at 6,000 scores/s (py-spy), which the
# figure would have counted as the detector's latency. Which records are noted does not depend
# on their latency, so the sample's quantiles estimate the whole's.
NOTE_EVERY = 4


class _AckedProducer:
    """A producer that notes when records sent to ``topic`` were acknowledged (one in :data:`NOTE_EVERY`)."""

    def __init__(self, producer: Any, topic: str, acks: list[tuple[bytes, float, float]]) -> None:
        self._producer, self._topic, self._acks = producer, topic, acks
        self._n = 0

    def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic != self._topic:
            return self._producer.send(topic, *args, **kwargs)
        self._n += 1
        if self._n % NOTE_EVERY:
            return self._producer.send(topic, *args, **kwargs)
        sent = time.time()
        future = self._producer.send(topic, *args, **kwargs)
        value = kwargs.get("value")
        acks = self._acks
        future.add_callback(lambda _md: acks.append((value, sent, time.time())))
        return future

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def run_live_detector(settings: Any, bundle_uri: str, out: str) -> dict[str, Any]:
    """Run the detector until a line arrives on stdin; write every score's acknowledgement time."""
    import dataclasses

    from pipeline.tf_threads import require_tf_threads

    require_tf_threads(settings.detector.tf_threads)  # as `plantwatch detect` sets them

    from consumers import detector as detector_module
    from consumers.detector import Detector
    from consumers.topics import ensure_topics, standard_topics
    from pipeline.bundle import load_bundle
    from pipeline.logs import configure_logging

    run = uuid.uuid4().hex[:8]
    s = settings
    s = dataclasses.replace(s, detector=dataclasses.replace(s.detector, group_id=f"bench-latency-{run}"))
    configure_logging(s.log.level, s.log.format)
    ensure_topics(s, standard_topics(s))
    acks: list[tuple[bytes, float, float]] = []
    make_producer = detector_module.make_producer

    def acked_producer(settings: Any, **overrides: Any) -> Any:
        return _AckedProducer(make_producer(settings, **overrides), s.topics.scores, acks)

    detector_module.make_producer = acked_producer  # type: ignore[assignment]
    d = Detector(s, load_bundle(bundle_uri, s.model.features))
    progress: list[tuple[float, int, float]] = []  # (wall time, records processed, seconds) per poll
    waited: list[tuple[float, float]] = []  # per record: (poll time, ms from its CreateTime to the poll)
    process = d.process

    def noted(polled: Any) -> None:
        now_ms = time.time() * 1000
        waited.extend((now_ms, now_ms - r.timestamp) for records in polled.values() for r in records)
        t = time.perf_counter()
        process(polled)
        progress.append((time.time(), d.stats.records, time.perf_counter() - t))

    d.process = noted  # type: ignore[method-assign]
    # (wall time, seconds) of each stall of the loop for a checkpoint: a slice of its snapshots,
    # or its commit once they are acknowledged (the waits between them are not stalls)
    checkpoints: list[tuple[float, float]] = []
    begin, finish = d._begin_checkpoint, d._finish_checkpoint

    def timed_begin() -> None:
        t = time.perf_counter()
        begin()
        checkpoints.append((time.time(), time.perf_counter() - t))

    def timed_finish(wait: bool) -> dict[int, int]:
        busy = d._in_flight is not None and (d._in_flight.todo or all(x.is_done for x in d._in_flight.futures))
        t = time.perf_counter()
        done = finish(wait)
        if busy:
            checkpoints.append((time.time(), time.perf_counter() - t))
        return done

    d._begin_checkpoint = timed_begin  # type: ignore[method-assign]
    d._finish_checkpoint = timed_finish  # type: ignore[method-assign]

    def control() -> None:
        while not d.ready and not d.stop.is_set():
            time.sleep(0.05)
        print("READY", flush=True)
        sys.stdin.readline()
        d.stop.set()

    threading.Thread(target=control, daemon=True).start()
    code = d.run()
    if code != 0:
        raise SystemExit(f"the detector stopped with exit code {code} (see its log above)")
    rows = []
    for value, sent, at in acks:
        body = json.loads(value)
        rows.append([body["asset"], int(body["step_ms"]), at, sent])
    Path(out).write_text(json.dumps({"acks": rows, "progress": progress, "waited": waited,
                                     "checkpoints": checkpoints}))
    return {"exit_code": code, "scores": len(rows), "records": d.stats.records, "late": d.stats.rejects.get("late", 0)}


# ------------------------------------------------------------------ feed and figures
class LiveFeed:
    """Wide readings of ``n`` assets, each once per ``period_ms``, spread evenly over the period."""

    def __init__(self, settings: Any, n_assets: int, period_ms: int, seed: int = 5) -> None:
        self.settings, self.n, self.period_ms = settings, n_assets, period_ms
        self.names = [f"pump-{i:04d}" for i in range(n_assets)]
        self.rng = np.random.default_rng(seed)
        self.sent: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))  # event ts, CreateTime
        self.behind_ms = 0.0

    def run(self, seconds: float) -> int:
        from consumers.kafka_clients import make_producer
        from pipeline.readings import encode_wide

        features = self.settings.model.features
        producer = make_producer(self.settings)
        topic = self.settings.topics.readings
        slot = self.period_ms / self.n
        start = (int(time.time() * 1000) // self.period_ms + 1) * self.period_ms
        total = int(seconds * 1000 / self.period_ms) * self.n
        base = self.rng.normal(size=len(features))
        i = 0
        try:
            while i < total:
                now = time.time() * 1000
                due = min(total, int((now - start) // slot) + 1)
                if due <= i:
                    time.sleep(min(0.002, (start + i * slot - now) / 1000))
                    continue
                self.behind_ms = max(self.behind_ms, now - (start + i * slot))
                values = base + 0.1 * self.rng.normal(size=(due - i, len(features)))
                for j, row in zip(range(i, due), values.tolist()):
                    asset = self.names[j % self.n]
                    ts = int(start + j * slot)
                    created = int(time.time() * 1000)
                    producer.send(topic, key=asset.encode(), value=encode_wide(asset, ts, dict(zip(features, row))),
                                  timestamp_ms=created)
                    stamps, creates = self.sent[asset]
                    stamps.append(ts)
                    creates.append(created)
                i = due
            producer.flush()
        finally:
            producer.close()
        return total

    def closing_created(self, asset: str, step_ms: int, lateness_ms: int) -> int | None:
        """CreateTime of the reading that made ``step_ms`` of ``asset`` closable."""
        stamps, creates = self.sent.get(asset, ([], []))
        k = bisect.bisect_left(stamps, step_ms + self.period_ms + lateness_ms)
        return creates[k] if k < len(creates) else None


def latencies_ms(feed: LiveFeed, rows: list[list[Any]], lateness_ms: int, after_ms: float) -> np.ndarray:
    out = []
    for asset, step_ms, acked, _ in rows:
        created = feed.closing_created(asset, step_ms, lateness_ms)
        if created is not None and created >= after_ms:
            out.append(acked * 1000 - created)
    return np.array(out, dtype=np.float64)


@dataclass
class LiveRun:
    feed: LiveFeed
    acks: list[list[Any]]
    progress: list[list[float]]
    waited: list[list[float]]
    checkpoints: list[list[float]]
    sent: int
    feed_s: float
    started_ms: float
    summary: dict[str, Any]


def live_run(broker: Any, tmp: Path, name: str, rate: float, args: argparse.Namespace,
             overrides: dict[str, str], say: Any) -> tuple[Any, LiveRun]:
    """Fit the model at the period of ``rate``, start a detector process, feed it live for
    ``args.seconds`` and return what it acknowledged and when it processed what."""
    from consumers.topics import ensure_topics, standard_topics

    period_ms = max(1, round(args.assets * 1000 / rate))
    topic = f"{TOPIC}.{name}"
    settings = {"grid.period_s": str(period_ms / 1000), "grid.allowed_lateness_s": str(args.lateness_s),
                "topics.scores": f"{topic}.scores", **overrides}
    s = bench_settings(broker.bootstrap_servers, topic, settings)
    ensure_topics(s, standard_topics(s))
    t = time.monotonic()
    bundle = fit_tiny_bundle(str(tmp / f"bundle-{name}"), period_ms=period_ms)
    say(f"{name}: model fitted at a {period_ms} ms period in {time.monotonic() - t:.0f} s")
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    argv = [sys.executable, "-m", "bench.latency", "--worker", "--bootstrap", broker.bootstrap_servers,
            "--topic", topic, "--bundle", bundle, "--out", str(out),
            *sum((["--set", f"{k}={v}"] for k, v in settings.items()), [])]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{name}: the detector did not start: {log.read_text()[-3000:]}")
        feed = LiveFeed(s, args.assets, period_ms)
        started_ms = time.time() * 1000
        t = time.monotonic()
        sent = feed.run(args.seconds)
        feed_s = time.monotonic() - t
        time.sleep(3)  # the last steps close and their scores are acknowledged
        try:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        except BrokenPipeError:  # it stopped by itself: its exit code and log say why
            pass
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{name}: the detector exited {proc.returncode}: {log.read_text()[-3000:]}")
    got = json.loads(out.read_text())
    return s, LiveRun(feed, got["acks"], got["progress"], got["waited"], got["checkpoints"], sent, feed_s, started_ms,
                      json.loads(stdout.strip().splitlines()[-1]))


def sustained_rate(run: LiveRun, warmup_s: float) -> float:
    """Records/s the detector processed between the end of the warm-up and the end of the feed."""
    t0, t1 = run.started_ms / 1000 + warmup_s, run.started_ms / 1000 + run.feed_s
    marks = [(t, n) for t, n, _ in run.progress if t0 <= t <= t1]
    if len(marks) < 2:
        raise RuntimeError("too few polls to measure a rate")
    return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])


def measure(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from consumers.broker import LocalBroker
    from consumers.topics import ensure_topics, standard_topics

    overrides = dict(kv.split("=", 1) for kv in args.set)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="plantwatch-latency-") as tmp_dir, \
            LocalBroker(log_path=Path(tmp_dir) / "broker.log") as broker:
        tmp = Path(tmp_dir)
        max_rate = args.max_rate
        if not max_rate:
            # Offered more than it can take (its rate on a topic produced beforehand), the detector
            # runs flat out beside a live producer: its rate then is the maximum it sustains here.
            same = {"topics.scores": "bench.max.scores", "grid.allowed_lateness_s": str(args.lateness_s),
                    **overrides}
            s = bench_settings(broker.bootstrap_servers, "bench.max", same)
            ensure_topics(s, standard_topics(s))
            produce_readings(s, "wide", 100_000, args.assets)
            bundle = fit_tiny_bundle(str(tmp / "bundle-max"))
            offered = worker("detector", broker.bootstrap_servers, "bench.max", 100_000, bundle, same)["records_per_s"]
            _, flat_out = live_run(broker, tmp, "max", offered, args, overrides, say)
            max_rate = sustained_rate(flat_out, args.warmup_s)
            out.update(produced_topic_records_per_s=round(offered, 1),
                       live_feed_records_per_s_at_max=round(flat_out.sent / flat_out.feed_s, 1))
            say(f"detector maximum: {offered:.0f} records/s from a topic produced beforehand, "
                f"{max_rate:.0f} records/s beside a live feed")
        rate = max_rate * args.fraction
        s, run = live_run(broker, tmp, "half", rate, args, overrides, say)
    lat = latencies_ms(run.feed, run.acks, s.grid.lateness_ms, run.started_ms + args.warmup_s * 1000)
    if not len(lat):
        raise RuntimeError(f"no score acknowledged after the warm-up: {run.summary}")
    after = run.started_ms / 1000 + args.warmup_s
    ack_ms = np.array([(at - sent) * 1000 for _, _, at, sent in run.acks if sent >= after])
    polls = np.array([d for t, _, d in run.progress if t >= after]) * 1000
    checkpoints = np.array([d for t, d in run.checkpoints if t >= after] or [0.0]) * 1000
    waited = np.array([w for at, w in run.waited if at >= after * 1000])
    return {
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "latency_max_ms": round(float(lat.max()), 1),
        "latency_samples": int(len(lat)),
        "allowed_lateness_s": args.lateness_s,
        "rate_records_per_s": round(rate, 1), "feed_records_per_s": round(run.sent / run.feed_s, 1),
        "feed_behind_ms_max": round(run.feed.behind_ms, 1), "max_rate_records_per_s": round(max_rate, 1),
        **out, "period_ms": run.feed.period_ms, "assets": args.assets,
        "poll_timeout_ms": s.detector.poll_timeout_ms, "max_poll_records": s.kafka.max_poll_records,
        "fetch_max_wait_ms": s.kafka.fetch_max_wait_ms,
        "parts_p50_p99_ms": {
            "createtime_to_polled": [round(float(np.percentile(waited, q)), 1) for q in (50, 99)],
            "poll_processing": [round(float(np.percentile(polls, q)), 1) for q in (50, 99)],
            "score_send_to_ack": [round(float(np.percentile(ack_ms, q)), 1) for q in (50, 99)],
            "checkpoint": [round(float(np.percentile(checkpoints, q)), 1) for q in (50, 99)]},
        "checkpoint_interval_ms": s.detector.checkpoint_interval_ms,
        "late_rejects": run.summary["late"], "timestamp": "score ack (producer callback) - reading CreateTime",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the live feed")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="steps closed earlier are left out")
    ap.add_argument("--fraction", type=float, default=0.5, help="feed rate as a fraction of the maximum")
    ap.add_argument("--max-rate", type=float, default=0.0, help="the detector's maximum records/s (0: measure it)")
    ap.add_argument("--lateness-s", type=float, default=0.0, help="grid.allowed_lateness_s of the detector")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="detector settings")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if any("=" not in kv for kv in args.set):
        raise SystemExit("--set takes KEY=VALUE")
    if args.worker:
        s = bench_settings(args.bootstrap, args.topic, dict(kv.split("=", 1) for kv in args.set))
        print(json.dumps(run_live_detector(s, args.bundle, args.out)), flush=True)
        return
    if not 0 < args.fraction <= 1:
        raise SystemExit("--fraction must be in (0, 1]")
    print(json.dumps(measure(args, say=lambda m: print(m, file=sys.stderr, flush=True))))


if __name__ == "__main__":
    main()
