"""What one detector poll costs without a broker: decode → grid → score → thresholds → alerts →
serialisation → bookkeeping, i.e. ``Detector.process`` fed synthetic Kafka records, with a
producer that acknowledges at once (the client's own cost is measured beside it by the
throughput benchmark).

    python -m bench.poll_cost [--assets 1000] [--poll 5000] [--polls 40] [--format wide]
                              [--order asset|feature] [--fleet 100000]

* ``poll_us_per_record_<A>``: median cost of a poll of ``--poll`` records spread over A assets;
* ``poll_ms_fleet_<N>``: median cost of a poll of (at most 1,000) records over min(N, 1,000) assets
  while the detector holds N assets (per-poll cost must follow the records, not the fleet);
* ``detector_bytes_per_asset_<N>``: resident memory the N held assets added, per asset (N >= 10,000).

Also the py-spy target: ``py-spy record -o prof.txt -f raw -- python -m bench.poll_cost``.
Prints one JSON object; compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.scoring_cost import random_bundle
from pipeline.readings import encode_narrow, encode_wide
from pipeline.settings import PUMP_FEATURES, load_settings

T0 = 1_700_000_000_000
TOPIC = "bench.readings"


@dataclass(frozen=True)
class Record:
    """The fields of a kafka-python ConsumerRecord the detector reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes
    value: bytes
    headers: list[Any]


class _Done:
    is_done = True

    def failed(self) -> bool:
        return False


class _Producer:
    """Acknowledges every send at once; counts the bytes it was given."""

    def __init__(self) -> None:
        self.sent = 0
        self.bytes = 0

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, **_: Any) -> _Done:
        self.sent += 1
        self.bytes += len(value or b"")
        return _Done()

    def flush(self, timeout: float | None = None) -> None:
        return None

    def partitions_for(self, topic: str) -> set[int]:
        return {0}


class _Coordinator:
    def generation_if_stable(self) -> int:
        return 1


class _Cluster:
    def topic_id(self, topic: str) -> None:
        return None  # as a broker before Kafka 2.8 reports it


class _Client:
    cluster = _Cluster()


class _Consumer:
    _coordinator = _Coordinator()
    _client = _Client()

    def highwater(self, tp: Any) -> None:
        return None


def make_detector(scores_topic: bool = False) -> Any:
    from consumers.detector import Detector
    from pipeline.checkpoint import Restored
    from pipeline.logs import configure_logging

    configure_logging("info", "json")  # as a daemon logs: JSON lines on stderr

    overrides = {"topics.readings": TOPIC, "grid.allowed_lateness_s": "1", "log.level": "warning"}
    if scores_topic:
        overrides["topics.scores"] = "bench.scores"
    settings = load_settings(env={}, overrides=overrides)
    d = Detector(settings, random_bundle(len(PUMP_FEATURES)))
    d.consumer, d.producer, d.state_producer = _Consumer(), _Producer(), _Producer()
    d.checkpoints.assign(0, 0, Restored())
    return d


class Feed:
    """Readings of A assets at 1 Hz, in event-time order, as Kafka records of one partition."""

    def __init__(self, n_assets: int, fmt: str, seed: int = 0, prefix: str = "a", order: str = "asset") -> None:
        self.names = [f"{prefix}{i:06d}" for i in range(n_assets)]
        self.fmt = fmt
        self.order = order  # narrow: each asset's sensors in turn, or every asset's first sensor, then the second...
        self.rng = np.random.default_rng(seed)
        self.offset = 0
        self.second = 0
        self.pending: list[tuple[str, bytes]] = []

    def _fill(self) -> None:
        ts = T0 + 1000 * self.second
        self.second += 1
        noise = self.rng.normal(size=(len(self.names), len(PUMP_FEATURES)))
        # A few assets drift far off so alerts open, update and close during the run.
        noise[: max(1, len(self.names) // 50)] += 6 * ((self.second // 20) % 2)
        if self.fmt == "narrow" and self.order == "feature":
            for j, f in enumerate(PUMP_FEATURES):
                self.pending += [(a, encode_narrow(a, ts, f, v)) for a, v in zip(self.names, noise[:, j].tolist())]
            return
        for a, row in zip(self.names, noise.tolist()):
            if self.fmt == "wide":
                self.pending.append((a, encode_wide(a, ts, dict(zip(PUMP_FEATURES, row)))))
            else:
                self.pending += [(a, encode_narrow(a, ts, f, v)) for f, v in zip(PUMP_FEATURES, row)]

    def poll(self, n: int) -> dict[Any, list[Record]]:
        from kafka import TopicPartition

        while len(self.pending) < n:
            self._fill()
        take, self.pending = self.pending[:n], self.pending[n:]
        recs = [Record(TOPIC, 0, self.offset + i, 0, a.encode(), v, []) for i, (a, v) in enumerate(take)]
        self.offset += n
        return {TopicPartition(TOPIC, 0): recs}


def poll_costs(n_assets: int, poll: int, polls: int, fmt: str, scores_topic: bool = False,
               order: str = "asset") -> list[float]:
    d = make_detector(scores_topic)
    feed = Feed(n_assets, fmt, order=order)
    return timed_polls(d, feed, poll, polls)


def timed_polls(d: Any, feed: Feed, poll: int, polls: int) -> list[float]:
    """Seconds of ``d.process`` for each of ``polls`` polls of ``poll`` records, after five
    warm-up polls (first steps, the model's warm-up steps) and the garbage-collector setting the
    detector's run makes."""
    from consumers.heap import settle_heap

    for _ in range(5):
        d.process(feed.poll(poll))
    settle_heap()
    times = []
    for _ in range(polls):
        batch = feed.poll(poll)
        t = time.perf_counter()
        d.process(batch)
        times.append(time.perf_counter() - t)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fleet_cost(fleet: int, poll: int, polls: int) -> tuple[float, float]:
    """Median poll cost over min(fleet, 1,000) active assets while ``fleet`` assets are held,
    and the resident memory the held assets added, per asset."""
    d = make_detector()
    active = min(fleet, 1000)
    rss0 = rss_bytes()
    if fleet > active:
        idle = Feed(fleet - active, "wide", seed=1, prefix="z")
        while idle.second < 2:  # two steps each: a closed, scored step and an open one
            d.process(idle.poll(min(20_000, fleet - active)))
    feed = Feed(active, "wide")
    feed.offset = 10**9
    times = timed_polls(d, feed, poll, polls)
    gc.unfreeze()  # (timed_polls froze the heap, as the detector does: cycles made until then count otherwise)
    gc.collect()
    return float(np.median(times)), (rss_bytes() - rss0) / fleet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--poll", type=int, default=5000)
    ap.add_argument("--polls", type=int, default=40)
    ap.add_argument("--format", choices=("wide", "narrow"), default="wide")
    ap.add_argument("--scores", action="store_true", help="also publish every score")
    ap.add_argument("--order", choices=("asset", "feature"), default="asset",
                    help="narrow records: each asset's sensors in turn, or sensor by sensor across the fleet")
    ap.add_argument("--fleets", default="", help="comma-separated fleet sizes for poll_ms_fleet_<N>")
    args = ap.parse_args()
    times = poll_costs(args.assets, args.poll, args.polls, args.format, args.scores, args.order)
    suffix = "_feature_order" if args.format == "narrow" and args.order == "feature" else ""
    out: dict[str, Any] = {f"poll_us_per_record_{args.assets}_{args.format}{suffix}": round(
        float(np.median(times)) / args.poll * 1e6, 2)}
    for n in (int(x) for x in args.fleets.split(",") if x):
        ms, per_asset = fleet_cost(n, min(args.poll, 1000), max(5, args.polls // 4))
        out[f"poll_ms_fleet_{n}"] = round(ms * 1e3, 2)
        if n >= 10_000:
            out[f"detector_bytes_per_asset_{n}"] = round(per_asset)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
