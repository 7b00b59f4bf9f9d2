"""``plantwatch models``: inspect the model registry, promote, roll back and unpin versions."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from pipeline.settings import Settings

_WIDTH = 100  # longest metadata value shown on a terminal; --json has everything


def add_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URI", help="registry root (default: the registry.uri setting)")
    common.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", parents=[common], help="published versions, newest first")
    show = sub.add_parser("show", parents=[common], help="a version's manifest: metadata, thresholds, features")
    show.add_argument("version")
    promote = sub.add_parser("promote", parents=[common], help="make a version current and pin it")
    promote.add_argument("version")
    rollback = sub.add_parser("rollback", parents=[common],
                              help="pin the version published before the served one (or --to VERSION)")
    rollback.add_argument("--to", metavar="VERSION", help="pin this version instead")
    sub.add_parser("unpin", parents=[common], help="serve the current version again")
    publish = sub.add_parser("publish", parents=[common],
                             help="publish a bundle directory (e.g. from `plantwatch fit --out`) and make it current")
    publish.add_argument("bundle", help="bundle directory or pyarrow filesystem URI")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from pipeline.bundle import BundleError
    from pipeline.registry import RegistryError

    uri = args.registry or settings.registry.uri
    actions: dict[str, Callable[[argparse.Namespace, str], int]] = {
        "list": _list, "show": _show, "promote": _promote, "rollback": _rollback, "unpin": _unpin,
        "publish": lambda a, u: _publish(a, u, settings),
    }
    try:
        return actions[args.action](args, uri)
    except (RegistryError, BundleError) as exc:
        raise UsageError(str(exc)) from None


def _list(args: argparse.Namespace, uri: str) -> int:
    from pipeline.registry import list_versions

    versions = list_versions(uri)
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions in {uri}")
        return 0
    rows = [("", "VERSION", "PUBLISHED", "EPOCHS", "VAL ERROR", "THRESHOLD", "STATUS")]
    serving = next((v.version for v in versions if v.pinned), None) \
        or next((v.version for v in versions if v.current), None)
    for v in versions:
        status = ", ".join(s for s, on in (("current", v.current), ("pinned", v.pinned)) if on)
        rows.append(("*" if v.version == serving else "", v.version, _when(v.published_at), _num(v.epochs),
                     _num(v.validation_error), _num(v.threshold), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _show(args: argparse.Namespace, uri: str) -> int:
    from pipeline.bundle import BundleError
    from pipeline.registry import load_version, manifest, pointers

    m = manifest(uri, args.version)
    try:
        bundle = load_version(uri, args.version)
        error, assets = None, len(bundle.scaler.asset_names)
    except BundleError as exc:
        error, assets = str(exc), None
    p = pointers(uri)
    status = {"current": p.current == args.version, "pinned": p.pinned == args.version, "verified": error is None,
              "error": error}
    if args.json:
        print(json.dumps({"version": args.version, **status, "manifest": m}, indent=2))
    else:
        _print_manifest(m, status, assets)
    return 0 if error is None else 1


def _print_manifest(m: dict[str, Any], status: dict[str, Any], assets: int | None) -> None:
    meta = dict(m.get("metadata") or {})
    th = dict(m.get("thresholds") or {})
    flags = ", ".join(s for s in ("current", "pinned") if status[s]) or "-"
    lines = [
        ("version", str(m.get("version"))),
        ("status", flags),
        ("integrity", "ok (checksums verified)" if status["verified"] else f"FAILED: {status['error']}"),
        ("published", _when(meta.pop("published_at", None))),
        ("created", _when(meta.pop("created_at", None))),
        (f"features ({len(m.get('features', []))})", ", ".join(m.get("features", []))),
        ("grid period", f"{m.get('period_ms')} ms"),
        ("window", f"{m.get('timesteps')} steps, warm-up {m.get('warmup_steps')} steps"),
        ("LSTM layers", ", ".join(map(str, m.get("units", [])))),
        ("per-asset scaling", _assets(assets)),
        ("threshold", f"{_num(th.pop('threshold', None))} (normal score mean {_num(th.pop('normal_mean', None))}, "
                      f"std {_num(th.pop('normal_std', None))})"),
        ("alerting", " ".join(f"{k}={v}" for k, v in sorted(th.items()))),
    ]
    lines += [(key, _short(value)) for key, value in sorted(meta.items())]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def _publish(args: argparse.Namespace, uri: str, settings: Settings) -> int:
    from pipeline.bundle import load_bundle
    from pipeline.registry import publish

    version = publish(uri, load_bundle(args.bundle), keep=settings.registry.keep)
    return _report(args, uri, f"published {version}: current")


def _promote(args: argparse.Namespace, uri: str) -> int:
    from pipeline.registry import promote

    promote(uri, args.version)
    return _report(args, uri, f"promoted {args.version}: current and pinned")


def _rollback(args: argparse.Namespace, uri: str) -> int:
    from pipeline.registry import rollback

    version = rollback(uri, args.to)
    return _report(args, uri, f"rolled back: {version} pinned")


def _unpin(args: argparse.Namespace, uri: str) -> int:
    from pipeline.registry import unpin

    version = unpin(uri)
    return _report(args, uri, f"unpinned: serving the current version {version or '(none)'}")


def _report(args: argparse.Namespace, uri: str, message: str) -> int:
    from pipeline.registry import pointers

    p = pointers(uri)
    print(json.dumps({"serving": p.serving, "current": p.current, "pinned": p.pinned}) if args.json else message)
    return 0


def _assets(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n} asset{'s' * (n != 1)}" if n else "global only"


def _when(iso: str | None) -> str:
    return "-" if not iso else iso[:19].replace("T", " ") + "Z"


def _num(value: float | int | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= _WIDTH else text[:_WIDTH - 1] + "…"
