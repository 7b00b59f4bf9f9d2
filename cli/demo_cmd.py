"""``plantwatch demo``: the whole system on this machine, with live alerts and a measured summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=120.0, help="how long the plant streams (Ctrl-C ends it early)")
    p.add_argument("--assets", type=int, default=6, help="simulated pumps")
    p.add_argument("--workdir", default="var/demo", help="where the registry, archive and broker log go")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.demo import run_demo
    from consumers.signals import stop_on_signals

    result = run_demo(args.seconds, n_assets=args.assets, workdir=Path(args.workdir), stop=stop_on_signals())
    print(result.line(), flush=True)
    return 0
