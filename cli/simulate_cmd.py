"""``plantwatch simulate``: a simulated plant producing readings to Kafka, or writing normal history or a
recording with injected anomalies to a file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cli.arg_types import non_negative_int, positive_int
from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", type=positive_int, default=10, help="number of assets (pump-000, pump-001, …)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (same seed, same plant)")
    p.add_argument("--steps", type=positive_int, default=3600, help="grid periods to simulate per asset")
    p.add_argument("--start-ms", type=int, default=None, help="event time of the first reading (default: now)")
    p.add_argument("--realtime", action="store_true", help="produce at wall-clock pace (event time = now)")
    p.add_argument("--format", choices=["wide", "narrow"], default="wide", help="reading format")
    p.add_argument("--day-s", type=float, default=86400.0, help="length of the simulated daily cycle in seconds")
    p.add_argument("--anomalies-per-asset", type=non_negative_int, default=1, help="injected anomalies per asset")
    p.add_argument("--truth", default=None, help="write the injected anomalies here (JSON lines)")
    p.add_argument("--history-out", default=None,
                   help="write anomaly-free history to this .parquet/.csv file instead of producing to Kafka")
    p.add_argument("--recording-out", default=None,
                   help="write the plant with its injected anomalies (see --truth) to this .parquet/.csv file "
                        "instead of producing to Kafka, e.g. for plantwatch replay")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.simulate import PlantConfig, PlantSimulator, plan_anomalies

    period = settings.grid.period_ms
    start = args.start_ms if args.start_ms is not None else (int(time.time() * 1000) // period + 1) * period
    end = start + args.steps * period
    config = PlantConfig(n_assets=args.assets, period_ms=period, seed=args.seed, day_ms=int(args.day_s * 1000),
                         features=settings.model.features)
    if args.history_out and args.recording_out:
        raise UsageError("--history-out and --recording-out are alternatives: give one")
    if args.history_out:
        frame = PlantSimulator(config).history(start, args.steps)
        _write_frame(frame, Path(args.history_out))
        print(json.dumps({"history": args.history_out, "rows": len(frame), "start_ms": start, "end_ms": end}))
        return 0
    try:
        anomalies = plan_anomalies(config, start, end, per_asset=args.anomalies_per_asset) \
            if args.anomalies_per_asset else []
    except ValueError as exc:  # too few steps for the anomalies asked
        from cli.main import UsageError

        raise UsageError(f"{exc}: give more --steps or fewer --anomalies-per-asset") from None
    if args.truth:
        with open(args.truth, "w", encoding="utf-8") as fh:
            for a in anomalies:
                fh.write(json.dumps(a.to_dict()) + "\n")
    if args.recording_out:
        frame = PlantSimulator(config, anomalies).frame(start, end)
        _write_frame(frame, Path(args.recording_out))
        print(json.dumps({"recording": args.recording_out, "rows": len(frame), "anomalies": len(anomalies),
                          "start_ms": start, "end_ms": end}))
        return 0

    from consumers.kafka_clients import make_producer, require_bootstrap
    from consumers.signals import stop_on_signals
    from consumers.simulator_feed import feed

    require_bootstrap(settings)
    producer = make_producer(settings)
    try:
        stats = feed(producer, settings.topics.readings, PlantSimulator(config, anomalies), start, end,
                     fmt=args.format, realtime=args.realtime, stop=stop_on_signals())
    finally:
        producer.close()
    print(json.dumps({"rows": stats.rows, "records": stats.records, "anomalies": len(anomalies),
                      "start_ms": start, "end_ms": end}))
    return 0


def _write_frame(frame: Any, out: Path) -> None:
    frame.to_parquet(out, index=False) if out.suffix == ".parquet" else frame.to_csv(out, index=False)
