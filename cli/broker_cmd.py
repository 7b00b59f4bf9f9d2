"""``plantwatch broker``: the embedded Kafka-compatible broker, in the foreground."""

from __future__ import annotations

import argparse

from pipeline.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--storage", default="memory://tansu/", help="tansu storage URL (memory:// or s3://BUCKET/)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.broker import run_foreground

    return run_foreground(args.port, args.storage)
