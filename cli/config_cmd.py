"""``plantwatch config``: the effective settings, or the reference generated from the settings code."""

from __future__ import annotations

import argparse
import json

from pipeline.settings import Settings, reference_markdown, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", action="store_true", help="print the configuration reference (Markdown)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    print(reference_markdown() if args.reference else json.dumps(to_dict(settings), indent=2))
    return 0
