"""``plantwatch alerts``: list the alerts on the alerts topic, and accept one as the new normal.

Accepting an alert (``plantwatch alerts accept ID``) publishes an ``accepted`` event for it on
the alerts topic (:mod:`pipeline.alert_log`). Training leaves every other alert's span out of
its data; an accepted one's span is trained on, so after the next ``plantwatch train`` (or
scheduled run) the model knows the asset's new operating point and the alert closes once that
model serves. For a move that nobody accepts, ``threshold.rebaseline_after_s`` closes a long
alert automatically and the asset learns its current behaviour (README, Operations).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cli.arg_types import non_negative_int
from pipeline.settings import Settings

READ_TIMEOUT_S = 120.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="alerts on the alerts topic, newest first (one JSON object a line)")
    listing.add_argument("--asset", help="only this asset's alerts")
    listing.add_argument("--open", action="store_true", help="only the alerts still open")
    listing.add_argument("--limit", type=non_negative_int, default=50, help="at most this many (default 50; 0 = all)")
    accept = sub.add_parser("accept", help="accept an alert's span as normal: the next retraining trains on it")
    accept.add_argument("alert_id", help="the alert's id, or a unique prefix of 6+ characters")
    accept.add_argument("--note", default="", help="why (kept with the acceptance)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cli.main import UsageError
    from consumers.kafka_clients import ReadTimeout, read_to_end, require_bootstrap
    from pipeline.alert_log import AlertLog

    try:
        require_bootstrap(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    log = AlertLog()
    try:
        read_to_end(settings, settings.topics.alerts, lambda r: log.add(r.value), timeout_s=READ_TIMEOUT_S)
    except ReadTimeout as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    if args.action == "list":
        return _list(args, log)
    return _accept(args, log, settings)


def _summary(rec: Any) -> dict[str, Any]:
    last = rec.last
    return {"alert_id": rec.alert_id, "asset": rec.asset, "start_ms": rec.start_ms, "end_ms": rec.end_ms,
            "open": rec.is_open, "reason": rec.reason, "peak_score": last.get("peak_score"),
            "top_features": [f.get("feature") for f in last.get("top_features") or [] if isinstance(f, dict)],
            "model_version": last.get("model_version"), "accepted_ms": rec.accepted_ms, "note": rec.note or None}


def _list(args: argparse.Namespace, log: Any) -> int:
    recs = [r for r in log.records.values()
            if (args.asset is None or r.asset == args.asset) and (not args.open or r.is_open)]
    recs.sort(key=lambda r: -r.start_ms)
    for r in recs[:args.limit or None]:
        print(json.dumps(_summary(r)))
    return 0


def _accept(args: argparse.Namespace, log: Any, settings: Settings) -> int:
    from cli.main import UsageError
    from consumers.kafka_clients import make_producer
    from pipeline.alert_log import acceptance_event, matching_ids

    wanted = args.alert_id
    found = [log.records[key] for key in matching_ids(log.records, wanted)]
    if not found:
        raise UsageError(f"alert {wanted!r} is not on the alerts topic {settings.topics.alerts!r} "
                         f"({len(log.records)} alerts read)")
    if len(found) > 1:
        raise UsageError(f"alert {wanted!r} is ambiguous: {', '.join(sorted(r.alert_id for r in found)[:5])}")
    rec = found[0]
    if rec.accepted_ms is not None:
        print(json.dumps({**_summary(rec), "accepted": "already"}))
        return 0
    event = acceptance_event(rec, int(time.time() * 1000), args.note)
    producer = make_producer(settings)
    try:
        producer.send(settings.topics.alerts, key=rec.asset.encode(), value=json.dumps(event).encode()).get(timeout=30)
    finally:
        producer.close(timeout=10)
    print(json.dumps({**_summary(rec), "accepted_ms": event["accepted_ms"], "note": args.note or None,
                      "next": "the next retraining (plantwatch train, or the schedule) trains on this span"}))
    return 0
