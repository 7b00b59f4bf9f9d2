"""Records/s of the detector against a bare kafka-python consumer on the same topic.

    python -m bench.throughput [--records 100000] [--narrow-records N] [--assets 1000] [--repeats 3]
                               [--formats wide,narrow]

An embedded broker (memory storage); readings of ``--assets`` assets × 8 features produced once
per format: ``--records`` wide ones (one record per asset and step with every feature) and as many
steps of narrow ones (one record per feature reading: 800,000 by default, so both formats are
scored past the model's warm-up); a small model fitted on simulated history. Then, per round and
format, in fresh processes one after the other (the order alternates between rounds):

* ``bare``: a consumer built by :func:`consumers.kafka_clients.make_consumer` (the detector's
  client settings and packages, e.g. the C CRC32C, and its garbage-collector setting,
  :func:`consumers.heap.settle_heap`) polling with the detector's timeout and
  ``max_poll_records``, decoding nothing kafka-python does not;
* ``detector``: :class:`consumers.detector.Detector` as ``plantwatch detect --model`` runs it
  (scores topic off), from the beginning of the topic.

Each is timed from the moment the group assigned it the partitions (the group join is start-up,
as is the detector's restore of its empty state, subtracted) until every record is processed. Prints one JSON object:
``<kind>_records_per_s_<format>`` (medians over rounds) and ``detector_over_bare_<format>``
(median of the per-round ratios). Compare ratios, not absolute rates, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEED = 7
# The tiny model of the integration tests (cost per step is what matters, not its quality).
MODEL_OVERRIDES = {"model.units": "32,16", "model.timesteps": "16", "model.epochs": "3", "model.patience": "2"}


def bench_settings(bootstrap: str, readings: str, extra: dict[str, str] | None = None) -> Any:
    from pipeline.settings import load_settings

    return load_settings(env={}, overrides={"kafka.bootstrap_servers": bootstrap, "topics.readings": readings,
                                            "log.level": "info", "log.format": "json", **MODEL_OVERRIDES,
                                            **(extra or {})})


def fit_tiny_bundle(uri: str, history_steps: int = 3000, period_ms: int = 1000) -> str:
    """Fit the small model on simulated normal history of five assets and save it at ``uri``."""
    from pipeline.bundle import save_bundle
    from pipeline.fit import fit_bundle
    from pipeline.settings import load_settings
    from pipeline.simulate import PlantConfig, PlantSimulator
    from pipeline.tables import frame_to_batch

    settings = load_settings(env={}, overrides={**MODEL_OVERRIDES, "grid.period_s": str(period_ms / 1000)})
    plant = PlantConfig(n_assets=5, seed=3, period_ms=period_ms)
    history = PlantSimulator(plant).history(1_700_000_000_000 // period_ms * period_ms, history_steps)
    bundle, _ = fit_bundle(frame_to_batch(history, settings.model.features, ts_col="ts_ms", asset_col="asset"),
                           settings)
    save_bundle(bundle, uri)
    return uri


def produce_readings(settings: Any, fmt: str, n_records: int, n_assets: int, period_ms: int = 1000) -> int:
    """Produce exactly ``n_records`` readings (event times in the recent past, in time order)."""
    from consumers.kafka_clients import make_producer
    from consumers.simulator_feed import encode_frame
    from pipeline.simulate import PlantConfig, PlantSimulator

    per_step = n_assets * (1 if fmt == "wide" else len(settings.model.features))
    steps = -(-n_records // per_step)
    start = (int(time.time() * 1000) // period_ms - steps - 10) * period_ms
    sim = PlantSimulator(PlantConfig(n_assets=n_assets, period_ms=period_ms, seed=SEED))
    pairs = encode_frame(sim.frame(start, start + steps * period_ms), settings.model.features, fmt)[:n_records]
    producer = make_producer(settings)
    try:
        for key, value in pairs:
            producer.send(settings.topics.readings, key=key, value=value)
        producer.flush()
    finally:
        producer.close()
    return len(pairs)


# ---------------------------------------------------------------------------- workers
def run_bare(settings: Any, n_records: int) -> dict[str, Any]:
    from kafka.consumer.subscription_state import ConsumerRebalanceListener

    from consumers.heap import settle_heap
    from consumers.kafka_clients import make_consumer

    marks: dict[str, float] = {}

    class Mark(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            return None

        def on_partitions_assigned(self, assigned: Any) -> None:
            marks.setdefault("assigned", time.perf_counter())

    s = settings
    consumer = make_consumer(s, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([s.topics.readings], listener=Mark())
    settle_heap()  # the detector's process setting of the garbage collector, as `run` makes it
    seen = 0
    try:
        while seen < n_records:
            polled = consumer.poll(timeout_ms=s.detector.poll_timeout_ms, max_records=s.kafka.max_poll_records)
            for records in polled.values():
                seen += len(records)
        seconds = time.perf_counter() - marks["assigned"]
    finally:
        consumer.close(autocommit=False)
    return {"records": seen, "seconds": round(seconds, 3), "records_per_s": round(seen / seconds, 1)}


def run_detector(settings: Any, bundle_uri: str, n_records: int) -> dict[str, Any]:
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
    # A fresh group and state topic: nothing to restore, no earlier run's snapshots to read.
    s = dataclasses.replace(s, detector=dataclasses.replace(s.detector, group_id=f"bench-detector-{run}"),
                            topics=dataclasses.replace(s.topics, state=f"{s.topics.readings}.state.{run}"))
    configure_logging(s.log.level, s.log.format)
    ensure_topics(s, standard_topics(s))
    d = Detector(s, load_bundle(bundle_uri, s.model.features))
    marks: dict[str, float] = {}
    process = d.process
    on_assigned = detector_module._Listener.on_partitions_assigned

    async def assigned(self: Any, partitions: Any) -> None:
        marks.setdefault("assigned", time.perf_counter())
        await on_assigned(self, partitions)

    detector_module._Listener.on_partitions_assigned = assigned  # type: ignore[method-assign]

    def timed(polled: Any) -> None:
        process(polled)
        if d.stats.records >= n_records and "end" not in marks:
            marks["end"] = time.perf_counter()
            d.stop.set()

    d.process = timed  # type: ignore[method-assign]
    code = d.run()
    if code != 0 or "end" not in marks:
        raise SystemExit(f"detector exited {code} after {d.stats.records} of {n_records} records")
    # Restoring the (empty) state is start-up, not throughput.
    seconds = marks["end"] - marks["assigned"] - sum(d.restore_s)
    st = d.stats
    return {"records": st.records, "seconds": round(seconds, 3), "records_per_s": round(st.records / seconds, 1),
            "steps": st.steps, "scored": st.scored, "alert_events": st.alert_events,
            "rejects": sum(st.rejects.values())}


def worker(kind: str, bootstrap: str, topic: str, n_records: int, bundle: str,
           overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement in a fresh process (``overrides``: settings, as ``--set`` takes them)."""
    argv = [sys.executable, "-m", "bench.throughput", "--worker", kind, "--bootstrap", bootstrap,
            "--topic", topic, "--records", str(n_records), "--bundle", bundle,
            *sum((["--set", f"{k}={v}"] for k, v in (overrides or {}).items()), [])]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {topic} exited {done.returncode}: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(n_records: int, n_assets: int, repeats: int, formats: list[str], overrides: dict[str, str],
            say: Any = print, narrow_records: int | None = None) -> dict[str, Any]:
    """``n_records`` wide records; narrow ones cover the same steps (one record per feature) unless
    ``narrow_records`` says otherwise: 100,000 narrow records of 1,000 assets × 8 features are 12
    steps an asset, all inside the model's warm-up, so nothing would be scored."""
    from consumers.broker import LocalBroker
    from consumers.topics import ensure_topics, standard_topics

    with tempfile.TemporaryDirectory(prefix="plantwatch-throughput-") as tmp, \
            LocalBroker(log_path=Path(tmp) / "broker.log") as broker:
        t = time.monotonic()
        bundle = fit_tiny_bundle(str(Path(tmp) / "bundle"))
        say(f"model fitted in {time.monotonic() - t:.0f} s")
        topics = {fmt: f"bench.{fmt}" for fmt in formats}
        n_features = len(bench_settings(broker.bootstrap_servers, "bench", overrides).model.features)
        counts = {"wide": n_records, "narrow": narrow_records or n_records * n_features}
        for fmt, topic in topics.items():
            s = bench_settings(broker.bootstrap_servers, topic, overrides)
            ensure_topics(s, standard_topics(s))
            t = time.monotonic()
            n = produce_readings(s, fmt, counts[fmt], n_assets)
            say(f"{n} {fmt} records produced in {time.monotonic() - t:.1f} s")
        rates: dict[tuple[str, str], list[float]] = {}
        ratios: dict[str, list[float]] = {fmt: [] for fmt in formats}
        extra: dict[str, Any] = {}
        for r in range(repeats):
            for fmt, topic in topics.items():
                got = {}
                for kind in (("bare", "detector") if r % 2 == 0 else ("detector", "bare")):
                    got[kind] = worker(kind, broker.bootstrap_servers, topic, counts[fmt], bundle, overrides)
                    rates.setdefault((kind, fmt), []).append(got[kind]["records_per_s"])
                    say(f"round {r + 1} {fmt} {kind}: {json.dumps(got[kind])}")
                ratios[fmt].append(got["detector"]["records_per_s"] / got["bare"]["records_per_s"])
                extra[f"steps_scored_{fmt}"] = got["detector"]["scored"]
    out: dict[str, Any] = {f"{kind}_records_per_s_{fmt}": round(statistics.median(v), 1)
                           for (kind, fmt), v in rates.items()}
    for fmt, v in ratios.items():
        out[f"detector_over_bare_{fmt}"] = round(statistics.median(v), 3)
        out[f"detector_over_bare_{fmt}_range"] = [round(min(v), 3), round(max(v), 3)]
    return {**out, **extra, **{f"records_{fmt}": counts[fmt] for fmt in formats}, "assets": n_assets,
            "rounds": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000, help="wide records (and the worker's count)")
    ap.add_argument("--narrow-records", type=int, default=None,
                    help="narrow records (default: as many steps as the wide ones, one record per feature)")
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--formats", default="wide,narrow")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings of both consumers (e.g. kafka.max_poll_records=1000)")
    ap.add_argument("--worker", choices=("bare", "detector"), help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if any("=" not in kv for kv in args.set):
        raise SystemExit("--set takes KEY=VALUE")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.worker:
        settings = bench_settings(args.bootstrap, args.topic, overrides)
        result = run_bare(settings, args.records) if args.worker == "bare" \
            else run_detector(settings, args.bundle, args.records)
        print(json.dumps(result), flush=True)
        return
    formats = [f for f in args.formats.split(",") if f]
    if not formats or set(formats) - {"wide", "narrow"}:
        raise SystemExit("--formats: a comma-separated subset of wide,narrow")
    print(json.dumps(measure(args.records, args.assets, args.repeats, formats, overrides,
                             say=lambda m: print(m, file=sys.stderr, flush=True), narrow_records=args.narrow_records)))


if __name__ == "__main__":
    main()
