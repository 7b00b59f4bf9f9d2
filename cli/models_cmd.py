"""``plantwatch models``: inspect the model registry, promote, roll back and unpin versions.

Every change (publish, promote, rollback, unpin) is announced on the control topic when a
broker is configured (``kafka.bootstrap_servers``), so running detectors swap within one
poll instead of at their next registry poll; the announcement is best effort (the change
stands if the broker is unreachable, and the registry poll still finds it).
"""

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
    listing = sub.add_parser("list", parents=[common], help="published versions, newest first")
    listing.add_argument("--all", action="store_true",
                         help="also the candidates the gate refused (kept under candidates/), with the gate's figures")
    show = sub.add_parser("show", parents=[common],
                          help="a version's manifest (published or candidate): metadata, thresholds, features, gate")
    show.add_argument("version")
    promote = sub.add_parser("promote", parents=[common],
                             help="make a version current and pin it (a candidate is published first)")
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
        "list": _list, "show": _show, "promote": lambda a, u: _promote(a, u, settings),
        "rollback": lambda a, u: _rollback(a, u, settings), "unpin": lambda a, u: _unpin(a, u, settings),
        "publish": lambda a, u: _publish(a, u, settings),
    }
    try:
        return actions[args.action](args, uri)
    except (RegistryError, BundleError) as exc:
        raise UsageError(str(exc)) from None


def _list(args: argparse.Namespace, uri: str) -> int:
    from pipeline.registry import list_versions

    everything = getattr(args, "all", False)
    versions = list_versions(uri, candidates=everything)
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in versions], indent=2))
        return 0
    if not versions:
        print(f"no versions in {uri}")
        return 0
    rows = [("", "VERSION", "PUBLISHED", "EPOCHS", "VAL ERROR", "THRESHOLD", "STATUS")]
    if everything:  # candidates were stored, not published: the date is when the gate decided
        rows = [("", "VERSION", "DATE", "EPOCHS", "VAL ERROR", "THRESHOLD", "STATUS", "GATE")]
    serving = next((v.version for v in versions if v.pinned and not v.candidate), None) \
        or next((v.version for v in versions if v.current and not v.candidate), None)
    for v in versions:
        status = "candidate" if v.candidate else \
            ", ".join(s for s, on in (("current", v.current), ("pinned", v.pinned)) if on)
        row = ("*" if v.version == serving and not v.candidate else "", v.version, _when(v.published_at),
               _num(v.epochs), _num(v.validation_error), _num(v.threshold), status)
        rows.append(row + ((gate_cell(v.gate),) if everything else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _show(args: argparse.Namespace, uri: str) -> int:
    from pipeline.bundle import BundleError
    from pipeline.registry import RegistryError, is_candidate, load_any, manifest, pointers, read_report

    m = manifest(uri, args.version)
    candidate = is_candidate(uri, args.version)
    try:
        bundle = load_any(uri, args.version)
        error, assets = None, len(bundle.scaler.asset_names)
    except BundleError as exc:
        error, assets = str(exc), None
    try:
        report = read_report(uri, args.version)
    except RegistryError:  # a report that is not JSON does not hide the bundle
        report = None
    p = pointers(uri)
    status = {"current": p.current == args.version and not candidate,
              "pinned": p.pinned == args.version and not candidate, "candidate": candidate,
              "verified": error is None, "error": error}
    if args.json:
        print(json.dumps({"version": args.version, **status, "manifest": m, "report": report}, indent=2))
    else:
        _print_manifest(m, status, assets, report is not None)
    return 0 if error is None else 1


def _print_manifest(m: dict[str, Any], status: dict[str, Any], assets: int | None, has_report: bool = False) -> None:
    from pipeline.registry import gate_summary

    meta = dict(m.get("metadata") or {})
    th = dict(m.get("thresholds") or {})
    flags = ", ".join(s for s in ("current", "pinned") if status[s]) or "-"
    if status.get("candidate"):
        flags = "candidate: refused by the gate, kept under candidates/ (plantwatch models promote publishes it)"
    gate = meta.pop("gate", None)
    summary = gate_summary(gate)
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
    if summary is not None:
        lines += [("gate", gate_cell(summary)), ("gate reason", str(summary.get("reason")))]
    if has_report:
        lines.append(("report", "report.json and report.png beside the bundle (loss curves, gate comparison)"))
    lines += [(key, _short(value)) for key, value in sorted(meta.items())]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def _publish(args: argparse.Namespace, uri: str, settings: Settings) -> int:
    from pipeline.bundle import load_bundle, read_report_files
    from pipeline.registry import publish
    from trainers.report import report_files

    bundle = load_bundle(args.bundle)
    extra = read_report_files(args.bundle) or report_files(bundle)  # a report beside every bundle
    version = publish(uri, bundle, keep=settings.registry.keep, extra=extra)
    return _report(args, uri, settings, "publish", f"published {version}: current")


def _promote(args: argparse.Namespace, uri: str, settings: Settings) -> int:
    from pipeline.registry import is_candidate, promote

    was_candidate = is_candidate(uri, args.version)
    promote(uri, args.version, keep=settings.registry.keep)
    how = " (the candidate is now published)" if was_candidate else ""
    return _report(args, uri, settings, "promote", f"promoted {args.version}: current and pinned{how}")


def _rollback(args: argparse.Namespace, uri: str, settings: Settings) -> int:
    from pipeline.registry import rollback

    version = rollback(uri, args.to)
    return _report(args, uri, settings, "rollback", f"rolled back: {version} pinned")


def _unpin(args: argparse.Namespace, uri: str, settings: Settings) -> int:
    from pipeline.registry import unpin

    version = unpin(uri)
    return _report(args, uri, settings, "unpin", f"unpinned: serving the current version {version or '(none)'}")


def _report(args: argparse.Namespace, uri: str, settings: Settings, action: str, message: str) -> int:
    """Print the outcome; with a broker configured, announce the change first (best effort)."""
    from pipeline.registry import pointers
    from trainers.announce import announce, has_broker

    p = pointers(uri)
    out: dict[str, Any] = {"serving": p.serving, "current": p.current, "pinned": p.pinned}
    if has_broker(settings):
        out["announced"] = announce(settings, p.serving, uri=uri, action=action)
        message += f" (announced on {settings.topics.models})" if out["announced"] else \
            f" (not announced on {settings.topics.models}: detectors find it at their next registry poll)"
    print(json.dumps(out) if args.json else message)
    return 0


def gate_cell(gate: dict[str, Any] | None) -> str:
    """The gate's verdict and intervals in one short cell: ``refuse  error +17.0% [+12.1%, +22.3%] …``."""
    if not gate:
        return "-"
    verdict = str(gate.get("decision") or "-")
    err, alert = gate.get("error_change"), gate.get("alert_change")
    if not isinstance(err, dict) or not isinstance(alert, dict):
        return f"{verdict} (no comparison)"
    return (f"{verdict}  error {_signed(err.get('estimate'), pct=True)} [{_signed(err.get('low'), pct=True)}, "
            f"{_signed(err.get('high'), pct=True)}] (limit {_signed(gate.get('error_allowed'), pct=True)})  "
            f"alerts {_signed(alert.get('estimate'))} [{_signed(alert.get('low'))}, {_signed(alert.get('high'))}] "
            f"(limit {_signed(gate.get('alert_allowed'))})")


def _signed(value: Any, pct: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    return f"{value:+.1%}" if pct else f"{value:+.4f}"


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
