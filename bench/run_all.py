"""Run the benchmarks, each in a fresh process, and write their figures to bench/results.json.

    python -m bench.run_all [--full]

``--full`` adds the archive-training memory benchmark (5M and 1.25M readings; many minutes).
Compare ratios within one run; absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("results.json")
QUICK = {
    "scoring_cost": ["-m", "bench.scoring_cost", "--assets", "1000"],
    "swap_memory": ["-m", "bench.swap_memory", "--swaps", "200", "--assets", "1000"],
    "recovery_cost": ["-m", "bench.recovery_cost", "--fleets", "1000,100000", "--sigterm-assets", "100000"],
}
FULL = {"train_memory": ["-m", "bench.train_memory", "--readings", "5000000"]}


def _last_json(text: str) -> object:
    """The JSON object a benchmark prints last (its logs may precede it)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="also the archive-training memory benchmark")
    args = ap.parse_args()
    results: dict[str, object] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, argv in {**QUICK, **(FULL if args.full else {})}.items():
        t = time.monotonic()
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
        results[name] = {"figures": _last_json(done.stdout), "wall_s": round(time.monotonic() - t, 1)}
        print(f"{name}: {json.dumps(results[name]['figures'])}", flush=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
