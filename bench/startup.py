"""Process start to first score, without a broker: a fresh interpreter imports the detector,
loads a saved bundle, builds and warms the engine and scores the first poll (enough steps for
the model's warm-up). The broker connection and group join are not included.

    python -m bench.startup [--repeats 3]

Prints one JSON object (``startup_s``: median wall time from spawning the process to the first
score); compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MARK = "first-score"


def child(model_dir: str) -> None:
    """What ``plantwatch detect`` does before its first score, minus Kafka."""
    from consumers.detector import Detector  # noqa: F401  (the daemon's imports)
    from pipeline.bundle import load_bundle
    from pipeline.engine import DetectionEngine
    from pipeline.readings import decode_batch, encode_wide
    from pipeline.settings import GridSettings

    bundle = load_bundle(model_dir)
    engine = DetectionEngine(bundle, GridSettings(allowed_lateness_s=0))
    t0 = 1_700_000_000_000
    n = bundle.warmup_steps + 3
    values = dict.fromkeys(bundle.features, 1.0)
    recs = [encode_wide(f"a{i}", t0 + 1000 * s, values) for s in range(n) for i in range(10)]
    out = engine.process(decode_batch(recs, bundle.features))
    if not np.isfinite(out.forecast_error).any():
        raise SystemExit("no step scored")
    print(MARK, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    from bench.scoring_cost import random_bundle
    from pipeline.bundle import save_bundle
    from pipeline.settings import PUMP_FEATURES

    model = Path(tempfile.mkdtemp()) / "model"
    save_bundle(random_bundle(len(PUMP_FEATURES)), str(model))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bench.startup", "--child", str(model)], capture_output=True,
                              text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if MARK not in done.stdout:
            raise SystemExit(f"start-up run failed: {done.stderr[-500:]}")
        times.append(time.perf_counter() - t)
    print(json.dumps({"startup_s": round(float(np.median(times)), 2), "startup_s_runs": [round(x, 2) for x in times]}))


if __name__ == "__main__":
    main()
