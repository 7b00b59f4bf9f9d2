"""Memory across many hot swaps in one process, through the detector's own swap path.

    python -m bench.swap_memory [--swaps 200] [--assets 1000]

Two versions alternate in a local registry; each swap is prepared by the ModelWatcher
(load, verify, set weights into the idle network, warm), warmed from a copy of every asset's
remembered steps as the detector's background thread does, and applied by the engine between
two polls (``--sync``: re-warming every asset inside the pause instead). Prints RSS before and after, and the swap pauses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time

import numpy as np

from bench.scoring_cost import random_bundle
from consumers.model_watch import ModelWatcher
from pipeline import registry
from pipeline.engine import DetectionEngine, warm_start
from pipeline.readings import DecodedBatch
from pipeline.settings import GridSettings, load_settings


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--swaps", type=int, default=200)
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--sync", action="store_true", help="re-warm every asset inside the pause (no warm start)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="plantwatch-swaps-")
    settings = load_settings(env={}, overrides={"registry.uri": root})
    a = random_bundle(8, seed=1)
    b = dataclasses.replace(random_bundle(8, seed=2), version="bench-b")
    a = dataclasses.replace(a, version="bench-a")
    for bundle in (a, b):
        registry.publish(root, bundle, keep=10)
    engine = DetectionEngine(a, GridSettings(allowed_lateness_s=0))
    names = np.array([f"a{i:05d}" for i in range(args.assets)], dtype=object)
    f = a.n_features
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000_000

    clock = [0]

    def poll(_: int) -> None:
        clock[0] += 1
        k = clock[0]
        n = args.assets * f
        engine.process(DecodedBatch(np.repeat(np.arange(args.assets), f), np.repeat(names, f),
                                    np.full(n, t0 + k * 1000), np.tile(np.arange(f, dtype=np.int32), args.assets),
                                    rng.normal(size=n), [], args.assets))

    for k in range(40):
        poll(k)
    watcher = ModelWatcher(settings, a)
    pauses, before = [], None
    for i in range(args.swaps):
        target = b if i % 2 == 0 else a
        watcher._prepare(target.version)  # the watcher thread's work, run inline here
        prepared = watcher.ready()
        assert prepared is not None
        old = engine.model
        if args.sync:
            t = time.perf_counter()
            engine.swap(prepared.bundle, prepared.model)
        else:  # as the detector does: warm from a copy of the rings (its background thread), a poll
            # goes by, then the swap continues each asset over the step since the copy
            start = warm_start(prepared.bundle, prepared.model, engine.ring_copy())
            poll(1000 + i)
            t = time.perf_counter()
            engine.swap_warm(prepared.bundle, prepared.model, start)
        pauses.append(time.perf_counter() - t)
        watcher.swapped(prepared, old)
        poll(40 + i)
        if i == 9:
            before = rss_mb()  # after the spare network exists and caches are warm
    after = rss_mb()
    print(json.dumps({"swaps": args.swaps, "assets": args.assets, "rss_mb_after_10_swaps": round(before or 0, 1),
                      f"rss_mb_after_{args.swaps}_swaps": round(after, 1),
                      "growth_mb": round(after - (before or 0), 1),
                      "pause_ms_median": round(float(np.median(pauses)) * 1000, 2),
                      "pause_ms_max": round(float(np.max(pauses)) * 1000, 2)}, indent=2))


if __name__ == "__main__":
    main()
