"""Would parsing the Kafka client's records in a second process let the detector keep up with
its client? A measurement of that design, not of the product's detector.

    python -m bench.fetch_split [--records 100000] [--assets 1000] [--repeats 3]

An embedded broker holds ``--records`` wide readings of ``--assets`` assets. In fresh processes,
one after the other (the order rotates between rounds), each reads them all from the beginning:

* ``bare``: a consumer built as the detector builds its own, polling and parsing nothing more;
* ``inline``: the same consumer, each poll handed to ``Detector.process`` in the same process
  (outputs acknowledged at once, as in ``bench/poll_cost.py``: the Kafka client's cost and the
  detector's own work, without producing alerts or snapshots);
* ``split``: the same consumer in a child process, which sends each poll's keys, values and
  offsets to the parent over a pipe; the parent hands them to the same ``Detector.process``.

Prints one JSON object: records/s of each (medians) and ``inline_over_bare`` and
``split_over_bare`` (medians of per-round ratios). Both ratios exclude producing the detector's
outputs, so they are upper bounds of what the detector would reach; compare them with each other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import namedtuple
from pathlib import Path
from typing import Any

from bench.throughput import REPO, bench_settings, fit_tiny_bundle, produce_readings

PolledRecord = namedtuple("PolledRecord", "topic partition offset timestamp key value headers")


def _consumer(bootstrap: str, topic: str, partitions: list[int]) -> tuple[Any, Any]:
    from kafka import TopicPartition

    from consumers.kafka_clients import make_consumer

    s = bench_settings(bootstrap, topic)
    consumer = make_consumer(s, group_id=None)
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    for tp in tps:  # connected and positioned before any clock starts
        consumer.position(tp)
    return consumer, s


def _fetch_child(bootstrap: str, topic: str, partitions: list[int], n_records: int, conn: Any) -> None:
    """Poll and send each poll as columns: (partition, [offsets], [keys], [values]) per partition."""
    consumer, s = _consumer(bootstrap, topic, partitions)
    seen = 0
    conn.send(time.time())  # the clock starts with the first poll, as in the other kinds
    try:
        while seen < n_records:
            polled = consumer.poll(timeout_ms=s.detector.poll_timeout_ms, max_records=s.kafka.max_poll_records)
            if not polled:
                continue
            parts = [(tp.partition, [r.offset for r in recs], [r.key for r in recs], [r.value for r in recs])
                     for tp, recs in polled.items()]
            seen += sum(len(p[1]) for p in parts)
            conn.send(parts)
        conn.send(None)
    finally:
        consumer.close(autocommit=False)


def _detector(bootstrap: str, topic: str, bundle_uri: str, partitions: list[int]) -> Any:
    """The detector of ``bench/throughput.py`` (its model and settings), its outputs acknowledged at once."""
    from bench.poll_cost import _Consumer, _Producer
    from consumers.detector import Detector
    from pipeline.bundle import load_bundle
    from pipeline.checkpoint import Restored
    from pipeline.logs import configure_logging
    from pipeline.tf_threads import require_tf_threads

    s = bench_settings(bootstrap, topic)
    require_tf_threads(s.detector.tf_threads)  # as `plantwatch detect` sets them
    configure_logging("warning", "json")
    d = Detector(s, load_bundle(bundle_uri, s.model.features))
    d.consumer, d.producer, d.state_producer = _Consumer(), _Producer(), _Producer()
    for p in partitions:
        d.checkpoints.assign(p, 0, Restored())
    return d


def run(kind: str, bootstrap: str, topic: str, n_records: int, bundle_uri: str) -> dict[str, Any]:
    from kafka import TopicPartition

    from consumers.kafka_clients import make_consumer

    probe = make_consumer(bench_settings(bootstrap, topic), group_id=None)  # one listing for every process
    partitions = sorted(probe.partitions_for_topic(topic))
    probe.close(autocommit=False)
    seen, busy = 0, 0.0  # busy: seconds inside Detector.process
    if kind == "split":
        d = _detector(bootstrap, topic, bundle_uri, partitions)
        parent, child = mp.Pipe(duplex=False)
        proc = mp.get_context("spawn").Process(target=_fetch_child, args=(bootstrap, topic, partitions, n_records, child),
                                               daemon=True)
        proc.start()
        start = parent.recv()
        parts = parent.recv()
        while parts is not None:
            polled = {TopicPartition(topic, p): [PolledRecord(topic, p, o, 0, k, v, [])
                                                  for o, k, v in zip(offs, keys, vals)]
                      for p, offs, keys, vals in parts}
            t = time.perf_counter()
            d.process(polled)
            busy += time.perf_counter() - t
            seen += sum(len(v) for v in polled.values())
            parts = parent.recv()
        seconds = time.time() - start
        proc.join(timeout=30)
    else:
        consumer, s = _consumer(bootstrap, topic, partitions)
        d = _detector(bootstrap, topic, bundle_uri, partitions) if kind == "inline" else None
        start = time.time()
        try:
            while seen < n_records:
                polled = consumer.poll(timeout_ms=s.detector.poll_timeout_ms, max_records=s.kafka.max_poll_records)
                if d is not None and polled:
                    t = time.perf_counter()
                    d.process(polled)
                    busy += time.perf_counter() - t
                seen += sum(len(v) for v in polled.values())
            seconds = time.time() - start
        finally:
            consumer.close(autocommit=False)
    return {"records": seen, "seconds": round(seconds, 3), "records_per_s": round(seen / seconds, 1),
            "process_us_per_record": round(busy / seen * 1e6, 2)}


def worker(kind: str, bootstrap: str, topic: str, n_records: int, bundle_uri: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.fetch_split", "--worker", kind, "--bootstrap", bootstrap,
            "--topic", topic, "--records", str(n_records), "--bundle", bundle_uri]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} exited {done.returncode}: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(n_records: int, n_assets: int, repeats: int) -> dict[str, Any]:
    from consumers.broker import LocalBroker
    from consumers.topics import ensure_topics, standard_topics

    kinds = ["bare", "inline", "split"]
    with tempfile.TemporaryDirectory(prefix="plantwatch-split-") as tmp, \
            LocalBroker(log_path=Path(tmp) / "broker.log") as broker:
        topic = f"bench.split.{uuid.uuid4().hex[:6]}"
        s = bench_settings(broker.bootstrap_servers, topic)
        ensure_topics(s, standard_topics(s))
        produce_readings(s, "wide", n_records, n_assets)
        bundle_uri = fit_tiny_bundle(str(Path(tmp) / "bundle"))
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(repeats):
            order = kinds[r % 3:] + kinds[:r % 3]
            got = {k: worker(k, broker.bootstrap_servers, topic, n_records, bundle_uri) for k in order}
            for k in kinds:
                rates[k].append(got[k]["records_per_s"])
            print(f"round {r + 1}: " + json.dumps(got), file=sys.stderr, flush=True)
    ratio = {k: [a / b for a, b in zip(rates[k], rates["bare"])] for k in ("inline", "split")}
    return {**{f"{k}_records_per_s": round(statistics.median(v), 1) for k, v in rates.items()},
            **{f"{k}_over_bare": round(statistics.median(v), 3) for k, v in ratio.items()},
            **{f"{k}_over_bare_range": [round(min(v), 3), round(max(v), 3)] for k, v in ratio.items()},
            "records": n_records, "assets": n_assets, "rounds": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=("bare", "inline", "split"), help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run(args.worker, args.bootstrap, args.topic, args.records, args.bundle)), flush=True)
        return
    print(json.dumps(measure(args.records, args.assets, args.repeats)))


if __name__ == "__main__":
    main()
