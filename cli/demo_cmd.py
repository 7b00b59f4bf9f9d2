"""``plantwatch demo``: the whole system on this machine, with live alerts and a measured summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.arg_types import positive_int
from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=120.0, help="how long the plant streams, at least 55 (Ctrl-C ends it early)")
    p.add_argument("--assets", type=positive_int, default=6, help="simulated pumps")
    p.add_argument("--workdir", default="var/demo", help="where the registry, archive and broker log go")
    p.add_argument("--no-live", dest="live", action="store_false",
                   help="no live view (readings/s, lag, model, swaps, open alerts) below the output; "
                        "there is none anyway when stdout is not a terminal")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.demo import LEAD_S, MIN_SECONDS, TAIL_S, run_demo
    from cli.main import UsageError
    from consumers.signals import stop_on_signals

    if args.seconds < MIN_SECONDS:
        raise UsageError(f"--seconds {args.seconds:g}: at least {MIN_SECONDS:.0f}, for one injected fault per pump "
                         f"between the stream's first {LEAD_S:.0f} s and its last {TAIL_S:.0f} s")
    if args.assets < 1:
        raise UsageError("--assets: at least 1")
    result = run_demo(args.seconds, n_assets=args.assets, workdir=Path(args.workdir), stop=stop_on_signals(),
                      live=args.live and sys.stdout.isatty())
    print(result.line(), flush=True)
    return 0
