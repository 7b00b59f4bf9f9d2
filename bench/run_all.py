"""Run the benchmarks, each in a fresh process, repeated and interleaved, and write the medians
to bench/results.json (a flat mapping metric → number) and bench/results.md (a Markdown table).

    python -m bench.run_all [--repeats 3] [--only scoring_cost,poll_cost] [--full]

Round r runs every benchmark once, then round r + 1 starts, so load on a shared machine falls
on all of them alike; each metric is the median over the rounds. ``--full`` adds the
archive-training memory benchmark (5M and 1.25M readings; many minutes, run once). With
``--only``, the figures of the benchmarks not run are kept from the existing results.
Compare ratios within one run; absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("results.json")
TABLE = Path(__file__).with_name("results.md")

# name → (argv, {figure printed by the benchmark: metric in results.json})
BENCHES: dict[str, tuple[list[str], dict[str, str]]] = {
    "scoring_cost": (["-m", "bench.scoring_cost", "--assets", "1000"], {
        "carried_state_us_per_reading": "score_us_per_reading_1000",
        "recompute_over_carried": "recompute_over_step_ratio_1000",
        "recompute_tensorflow_over_carried": "recompute_tensorflow_over_step_ratio_1000",
        "full_engine_us_per_reading": "engine_us_per_reading_1000",
        "naive_over_engine": "detector_over_naive_ratio",
    }),
    "poll_cost": (["-m", "bench.poll_cost", "--polls", "20", "--fleets", "1,100,1000,10000,100000"], {
        "poll_us_per_record_1000_wide": "poll_us_per_record_1000_wide",
        **{f"poll_ms_fleet_{n}": f"poll_ms_fleet_{n}" for n in (1, 100, 1000, 10_000, 100_000)},
        "detector_bytes_per_asset_100000": "detector_bytes_per_asset_100000",
    }),
    "poll_cost_narrow": (["-m", "bench.poll_cost", "--polls", "20", "--format", "narrow"], {
        "poll_us_per_record_1000_narrow": "poll_us_per_record_1000_narrow",
    }),
    "poll_cost_narrow_feature_order": (["-m", "bench.poll_cost", "--polls", "20", "--format", "narrow",
                                        "--order", "feature"], {
        "poll_us_per_record_1000_narrow_feature_order": "poll_us_per_record_1000_narrow_feature_order",
    }),
    "startup": (["-m", "bench.startup", "--repeats", "1"], {"startup_s": "startup_s"}),
    "swap": (["-m", "bench.swap_memory", "--swaps", "12", "--assets", "10000"], {
        "pause_ms_median": "swap_pause_ms_10000",
    }),
    "throughput": (["-m", "bench.throughput", "--repeats", "1"], {
        "detector_over_bare_wide": "detector_over_bare_consumer_ratio",
        "detector_over_bare_narrow": "detector_over_bare_consumer_ratio_narrow",
        "detector_records_per_s_wide": "detector_records_per_s_wide",
        "bare_records_per_s_wide": "bare_consumer_records_per_s_wide",
        "detector_records_per_s_narrow": "detector_records_per_s_narrow",
        "bare_records_per_s_narrow": "bare_consumer_records_per_s_narrow",
    }),
    # Measured with short broker fetch waits (the embedded broker holds an idle fetch for the whole
    # wait); the default stays 500 ms, which tansu on object storage needs after a restart.
    "latency": (["-m", "bench.latency", "--set", "kafka.fetch_max_wait_ms=50"], {
        "latency_p99_ms": "latency_p99_ms",
        "latency_p50_ms": "latency_p50_ms",
        "rate_records_per_s": "latency_rate_records_per_s",
        "max_rate_records_per_s": "latency_max_rate_records_per_s",
        "allowed_lateness_s": "latency_allowed_lateness_s",
    }),
    "train_sources": (["-m", "bench.train_memory", "--sources", "--readings", "1000000", "--repeats", "1"], {
        "train_archive_over_memory_ratio": "train_archive_over_memory_ratio",
    }),
    "recovery_cost": (["-m", "bench.recovery_cost", "--fleets", "1000,100000", "--sigterm-assets", "0",
                       "--no-broker"], {
        "commit_plan_ms_100000": "commit_plan_ms_100000",
        "snapshot_us_per_asset_100000": "snapshot_us_per_asset_100000",
    }),
}
FULL: dict[str, tuple[list[str], dict[str, str]]] = {
    "train_memory": (["-m", "bench.train_memory", "--readings", "5000000"], {
        "peak_rss_ratio": "train_rss_growth_4x",
    }),
}
TARGETS = {
    "score_us_per_reading_1000": "<= 5", "recompute_over_step_ratio_1000": ">= 25",
    "engine_us_per_reading_1000": "<= 20", "detector_over_naive_ratio": ">= 100",
    "commit_plan_ms_100000": "<= 10", "detector_bytes_per_asset_100000": "< 20000", "startup_s": "<= 6",
    "swap_pause_ms_10000": "<= 100", "train_rss_growth_4x": "< 1.2",
    "detector_over_bare_consumer_ratio": ">= 0.7", "detector_over_bare_consumer_ratio_narrow": ">= 0.7",
    "latency_p99_ms": "< 250", "train_archive_over_memory_ratio": ">= 0.8",
}


def _last_json(text: str) -> dict[str, object]:
    """The JSON object a benchmark prints last (its logs may precede it)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


def run_once(argv: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return _last_json(done.stdout)


def medians(runs: dict[str, list[dict[str, object]]],
            benches: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, float]:
    """Flat metric → median over the rounds, for the figures each benchmark maps to a metric."""
    out: dict[str, float] = {}
    for name, figures in runs.items():
        for figure, metric in benches[name][1].items():
            values = [float(f[figure]) for f in figures if isinstance(f.get(figure), (int, float))]
            if values:
                out[metric] = round(statistics.median(values), 3)
    return out


def table(results: dict[str, float], rounds: int) -> str:
    lines = [f"Medians of {rounds} interleaved rounds, each benchmark in a fresh process "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             "| metric | median | target |", "|---|---:|---|"]
    lines += [f"| `{k}` | {v:g} | {TARGETS.get(k, '')} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians over them)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--full", action="store_true", help="also the archive-training memory benchmark (once)")
    args = ap.parse_args()
    benches = dict(BENCHES)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(benches) - set(FULL)
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join([*benches, *FULL])}")
        benches = {k: v for k, v in {**benches, **FULL}.items() if k in wanted}
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in benches}
    for r in range(args.repeats):
        for name, (argv, _) in benches.items():
            t = time.monotonic()
            figures = run_once(argv)
            runs[name].append(figures)
            print(f"round {r + 1} {name} ({time.monotonic() - t:.0f} s): {json.dumps(figures)}", flush=True)
    if args.full and not args.only:
        for name, (argv, _) in FULL.items():
            runs[name] = [run_once(argv)]
            benches[name] = FULL[name]
    results = medians(runs, {**benches, **FULL})
    if args.only and OUT.exists():  # the other benchmarks' figures stay
        results = {**json.loads(OUT.read_text()), **results}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    TABLE.write_text(table(results, args.repeats))
    print(TABLE.read_text())
    print(f"written {OUT} and {TABLE}")


if __name__ == "__main__":
    main()
