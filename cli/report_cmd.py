"""``plantwatch report``: what the detector saw, for an asset and a time range or for one alert.

The asset's readings come from the Parquet archive (``archive.uri``) and go through the same
detection engine as the live detector, with a model from the registry (``registry.uri``: the
served version by default, ``--model`` for another). The replay starts a warm-up margin
before ``--from`` (the model's warm-up steps plus the time its score averages take to
settle), so the first steps drawn are scored as the running detector would score them; only
``[--from, --to)`` is drawn. ``--alert ID`` looks the alert up on the alerts topic and
reports its asset over its span plus ``--margin`` on each side, with the model version the
alert was raised under when the registry still holds it (the replay then re-derives the
same alert id).

Writes ``DIR/report.png`` and ``DIR/report.html`` (the page embeds the PNG, so it is one
file to share); see :mod:`cli.report_render` for what they show.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.settings import Settings

if TYPE_CHECKING:
    from cli.report_render import AlertRow, ReportData
    from pipeline.alerts import AlertEvent
    from pipeline.bundle import ModelBundle

SETTLE_TIME_CONSTANTS = 3.0   # an EWMA is within e^-3 (5 %) of its start after 3 / alpha steps
DEFAULT_MARGIN = "10m"
ALERTS_TIMEOUT_S = 60.0
PNG_NAME, HTML_NAME = "report.png", "report.html"
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d)?\s*", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_SCAN_PROBE_BATCHES = 4       # batches read to name other assets when the asked one has no readings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asset", help="asset to report on (with --from and --to)")
    p.add_argument("--from", dest="start", metavar="TIME",
                   help="start of the range drawn: ISO-8601 (UTC unless it says otherwise), epoch milliseconds, "
                        "'now' or 'now-DURATION' (e.g. now-2h)")
    p.add_argument("--to", dest="end", metavar="TIME", help="end of the range drawn (exclusive), same forms")
    p.add_argument("--alert", metavar="ID",
                   help="report on one alert instead: its asset and span, found on the alerts topic "
                        "(a unique prefix of at least 6 characters will do)")
    p.add_argument("--margin", default=DEFAULT_MARGIN, metavar="DURATION",
                   help=f"with --alert: time drawn before and after the alert (default: {DEFAULT_MARGIN})")
    p.add_argument("--model", metavar="VERSION",
                   help="model version from the registry (default: the served one; with --alert, the alert's own "
                        "version while the registry holds it)")
    p.add_argument("--warmup", metavar="DURATION",
                   help="replay this long before the range so the model state and score averages settle "
                        "(default: the model's warm-up steps + 3 time constants of its slowest score average)")
    p.add_argument("--labels", metavar="FILE",
                   help="labelled abnormal periods to mark (asset, start_ms, end_ms; local path or URI; "
                        "default: trainer.labels_uri when set)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write report.png and report.html to")
    p.add_argument("--alerts-timeout", type=float, default=ALERTS_TIMEOUT_S, metavar="SECONDS",
                   help=f"with --alert: longest wait to read the alerts topic to its end (default: {ALERTS_TIMEOUT_S:g})")


# --------------------------------------------------------------------------- parsing


def parse_duration_ms(text: str, option: str) -> int:
    """``90``, ``90s``, ``10m``, ``1.5h``, ``2d``, ``500ms`` (a bare number is seconds)."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise _usage(f"{option}: {text!r} is not a duration (e.g. 90s, 10m, 2h, 1d)")
    return round(float(m[1]) * _UNIT_MS[(m[2] or "s").lower()])


def parse_time_ms(text: str, option: str, now_ms: int) -> int:
    """Epoch milliseconds from ISO-8601, a number of milliseconds, ``now`` or ``now-DURATION``."""
    from pipeline.readings import parse_timestamp_ms

    t = text.strip()
    if t.lower() == "now":
        return now_ms
    if t.lower().startswith("now-"):
        return now_ms - parse_duration_ms(t[4:], option)
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    try:
        return parse_timestamp_ms(t)
    except ValueError as exc:
        raise _usage(f"{option}: {exc}") from None


def default_warmup_ms(bundle: ModelBundle) -> int:
    """The model's warm-up steps plus the settling time of its slowest score average, in ms."""
    th = bundle.thresholds
    settle = math.ceil(SETTLE_TIME_CONSTANTS / min(th.smoothing_alpha, th.novelty_alpha))
    return (bundle.warmup_steps + settle) * bundle.period_ms


def _usage(message: str) -> Exception:
    from cli.main import UsageError

    return UsageError(message)


# --------------------------------------------------------------------------- the alert asked for


@dataclass(frozen=True)
class RecordedAlert:
    """An alert as its events on the alerts topic describe it."""

    alert_id: str
    asset: str
    start_ms: int
    end_ms: int | None       # None while it has no close event
    last_step_ms: int        # event time of its latest event
    peak_score: float
    top_features: tuple[tuple[str, float], ...]
    model_version: str
    reason: str | None


def fold_recorded(values: Iterable[dict[str, Any]], wanted: str, *, where: str = "the alerts topic") -> RecordedAlert:
    """The alert ``wanted`` names (its id, or a unique prefix of 6+ characters) from published
    alert events; a usage error naming what was read otherwise."""
    from pipeline.alert_log import matching_ids, may_name

    events: dict[str, list[dict[str, Any]]] = {}
    seen = 0
    for e in values:
        seen += 1
        key = str(e.get("alert_id", ""))
        if may_name(wanted, key):
            events.setdefault(key, []).append(e)
    events = {key: events[key] for key in matching_ids(events, wanted)}
    if not events:
        raise _usage(f"alert {wanted!r} is not on {where} ({seen} alert events read)")
    if len(events) > 1:
        raise _usage(f"alert {wanted!r} is ambiguous: {', '.join(sorted(events)[:5])}")
    key, found = next(iter(events.items()))
    try:
        last = max(found, key=lambda e: int(e["step_ms"]))
        close = next((e for e in found if e.get("state") == "close" and e.get("end_ms") is not None), None)
        return RecordedAlert(
            alert_id=key, asset=str(last["asset"]), start_ms=int(last["start_ms"]),
            end_ms=None if close is None else int(close["end_ms"]), last_step_ms=int(last["step_ms"]),
            peak_score=max(float(e.get("peak_score") or 0.0) for e in found),
            top_features=tuple((str(f["feature"]), float(f["contribution"])) for f in last.get("top_features") or []),
            model_version=str(last.get("model_version") or ""), reason=None if close is None else close.get("reason"))
    except (KeyError, TypeError, ValueError) as exc:
        raise _usage(f"alert {key}: its events on {where} are malformed ({exc!r})") from None


def read_alert(settings: Settings, wanted: str, timeout_s: float) -> RecordedAlert:
    """The alert from the alerts topic, read from its beginning to its end."""
    import json

    from consumers.kafka_clients import read_to_end
    from trainers.announce import has_broker

    if not has_broker(settings):
        raise _usage("--alert reads the alerts topic, but kafka.bootstrap_servers is empty")
    values: list[dict[str, Any]] = []

    def note(record: Any) -> None:
        try:
            value = json.loads(record.value or b"")
        except ValueError:
            return
        if isinstance(value, dict) and "alert_id" in value:
            values.append(value)

    with _quiet("kafka"):  # an unreachable broker is reported once, by run(), not per connection attempt
        read_to_end(settings, settings.topics.alerts, note, timeout_s=timeout_s)
    return fold_recorded(values, wanted, where=f"the alerts topic {settings.topics.alerts!r}")


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only CRITICAL records of ``logger`` while inside."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------------- replay


@dataclass
class Replay:
    """The engine's output for one asset over the drawn range, and its alert events."""

    step: np.ndarray
    values: np.ndarray
    alert_score: np.ndarray
    threshold: np.ndarray
    forecast_error: np.ndarray
    events: list[AlertEvent]
    readings: int            # readings read, warm-up included
    readings_in_range: int
    unknown_features: dict[str, int]


def replay(settings: Settings, bundle: ModelBundle, asset: str, from_ms: int, to_ms: int, warmup_ms: int) -> Replay:
    """Scan ``asset`` over ``[from_ms - warmup_ms, to_ms)`` and score it; keep steps from ``from_ms`` on."""
    from pipeline.engine import DetectionEngine
    from trainers.archive_scan import ScanStats, scan_archive

    stats = ScanStats()
    batches = scan_archive(settings.archive.uri, bundle.features, start_ms=from_ms - warmup_ms, end_ms=to_ms,
                           assets=[asset], stats=stats)
    first = next(batches, None)  # a missing archive fails here, before a model is built
    engine = DetectionEngine(bundle, settings.grid) if first is not None else None
    parts: list[tuple[np.ndarray, ...]] = []
    events: list[AlertEvent] = []
    first_step = from_ms // bundle.period_ms
    in_range, last_id = 0, -1  # reading ids rise through the scan; one reading's values may span two batches

    def keep(out: Any) -> None:
        sel = np.flatnonzero((out.asset == asset) & (out.step >= first_step) & (out.step * bundle.period_ms < to_ms))
        if len(sel):
            parts.append((out.step[sel], out.values[sel], out.alert_score[sel], out.threshold[sel],
                          out.forecast_error[sel]))
        events.extend(e for e in out.events if e.asset == asset)

    if engine is not None and first is not None:
        for batch in itertools.chain([first], batches):
            ids = np.unique(batch.record_index[batch.ts_ms >= from_ms])
            in_range += int(np.count_nonzero(ids > last_id))
            last_id = max(last_id, int(ids[-1])) if len(ids) else last_id
            keep(engine.process(batch))
        keep(engine.flush())
    empty = (np.empty(0, np.int64), np.empty((0, bundle.n_features)), np.empty(0), np.empty(0), np.empty(0))
    step, values, alert_score, threshold, forecast_error = (
        np.concatenate([p[i] for p in parts]) if parts else empty[i] for i in range(5))
    return Replay(step, values, alert_score, threshold, forecast_error, events, stats.records, in_range,
                  dict(stats.unknown_features))


def fold_events(events: Sequence[AlertEvent], from_ms: int, to_ms: int) -> list[AlertRow]:
    """One row per alert overlapping ``[from_ms, to_ms)``, from its latest event (peak, top features, close)."""
    from cli.report_render import AlertRow

    latest: dict[str, AlertEvent] = {}
    end: dict[str, tuple[int | None, str | None]] = {}
    for e in events:
        latest[e.alert_id] = e
        if e.state == "close":
            end[e.alert_id] = (e.end_ms, e.reason)
    rows = []
    for key, e in latest.items():
        end_ms, reason = end.get(key, (None, None))
        if e.start_ms < to_ms and (end_ms is None or end_ms > from_ms):
            rows.append(AlertRow(key, e.start_ms, end_ms, e.peak_score, e.top_features, reason))
    return sorted(rows, key=lambda r: (r.start_ms, r.alert_id))


def recorded_row(alert: RecordedAlert) -> AlertRow:
    from cli.report_render import AlertRow

    return AlertRow(alert.alert_id, alert.start_ms, alert.end_ms, alert.peak_score, alert.top_features,
                    alert.reason, recorded=True)


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Request:
    asset: str
    from_ms: int
    to_ms: int
    recorded: RecordedAlert | None = None


def resolve_request(args: argparse.Namespace, settings: Settings, now_ms: int) -> Request:
    """Asset and range from the options, or from the alert on the alerts topic."""
    if args.alert:
        if args.asset or args.start or args.end:
            raise _usage("--alert takes the asset and range from the alert; leave out --asset, --from and --to")
        margin = parse_duration_ms(args.margin, "--margin")
        alert = read_alert(settings, args.alert.strip(), args.alerts_timeout)
        end = alert.end_ms if alert.end_ms is not None else alert.last_step_ms
        return Request(alert.asset, alert.start_ms - margin, max(end, alert.start_ms + 1) + margin, alert)
    missing = [o for o, v in (("--asset", args.asset), ("--from", args.start), ("--to", args.end)) if not v]
    if missing:
        raise _usage(f"give --asset, --from and --to (missing {', '.join(missing)}), or --alert ID")
    start, end = parse_time_ms(args.start, "--from", now_ms), parse_time_ms(args.end, "--to", now_ms)
    if end <= start:
        from cli.report_render import iso

        raise _usage(f"the range is empty: --to {iso(end)} is not after --from {iso(start)}")
    return Request(args.asset, start, end)


def load_model(settings: Settings, version: str | None, recorded: RecordedAlert | None) -> ModelBundle:
    from pipeline.bundle import BundleError
    from pipeline.logs import get_logger
    from pipeline.registry import RegistryError, current_version, load_any, load_current

    uri = settings.registry.uri
    try:
        if version:
            return load_any(uri, version)  # a candidate too: a report is for inspection
        if recorded is not None and recorded.model_version:
            try:
                return load_any(uri, recorded.model_version)
            except RegistryError:
                get_logger("plantwatch.report").warning(
                    "the alert's model version is no longer in the registry; replaying with the served one",
                    alert_version=recorded.model_version, served=current_version(uri))
        return load_current(uri)
    except (RegistryError, BundleError) as exc:
        raise _usage(f"{exc} (registry.uri = {uri})") from None


def no_readings(settings: Settings, bundle: ModelBundle, req: Request, result: Replay) -> Exception:
    """Why nothing was drawn: an asset the archive does not know then, or a range with no readings at all."""
    from cli.report_render import iso
    from trainers.archive_scan import scan_archive

    span = f"between {iso(req.from_ms)} and {iso(req.to_ms)} in {settings.archive.uri}"
    if result.unknown_features and not result.readings:
        names = ", ".join(sorted(result.unknown_features)[:8])
        return _usage(f"asset {req.asset!r} has readings {span}, but of features ({names}) that model "
                      f"{bundle.version} does not have ({', '.join(bundle.features)})")
    others: set[str] = set()
    for k, batch in enumerate(scan_archive(settings.archive.uri, bundle.features, start_ms=req.from_ms,
                                           end_ms=req.to_ms)):
        others.update(batch.asset.tolist())
        if k + 1 >= _SCAN_PROBE_BATCHES or len(others) >= 8:
            break
    if not others:
        return _usage(f"no readings {span}: the range is empty")
    listed = ", ".join(sorted(others)[:8])
    return _usage(f"no readings of asset {req.asset!r} {span}; assets with readings then include {listed}")


def settings_table(settings: Settings, bundle: ModelBundle, req: Request, warmup_ms: int,
                   result: Replay) -> dict[str, str]:
    from cli.report_render import duration_text, iso

    th = bundle.thresholds
    published = bundle.metadata.get("published_at") or bundle.metadata.get("created_at")
    rows = {
        "asset": req.asset,
        "range": f"{iso(req.from_ms)} to {iso(req.to_ms)}",
        "model version": bundle.version + (f" (published {published})" if published else ""),
        "features": ", ".join(bundle.features),
        "grid period": duration_text(bundle.period_ms),
        "replay warm-up": f"{duration_text(warmup_ms)} before the range ({warmup_ms // bundle.period_ms} steps)",
        "readings": f"{result.readings_in_range} in the range, {result.readings} replayed",
        "steps drawn": str(len(result.step)),
        "alert lifecycle": f"open_after={th.open_after}, close_after={th.close_after}, close_ratio={th.close_ratio:g}",
        "score averages": f"smoothing_alpha={th.smoothing_alpha:g}, novelty_alpha={th.novelty_alpha:g}",
        "threshold adaptation": f"adapt_alpha={th.adapt_alpha:g}, adapt_z={th.adapt_z:g}",
        "grid": f"lateness_ms={settings.grid.lateness_ms}, carry_forward_steps={settings.grid.carry_forward_steps}, "
                f"gap_reset_steps={settings.grid.gap_reset_steps}",
        "archive": settings.archive.uri,
        "registry": settings.registry.uri,
    }
    if req.recorded is not None:
        rows = {"alert": req.recorded.alert_id, **rows}
    return rows


def asset_labels(uri: str, asset: str, from_ms: int, to_ms: int) -> tuple[tuple[int, int], ...]:
    """The asset's labelled periods meeting the range, from the label reader training uses."""
    from trainers.train import TrainError, read_label_ranges

    try:
        found = read_label_ranges(uri)
    except TrainError as exc:
        raise _usage(str(exc)) from None
    return tuple(sorted((int(a), int(b)) for name, a, b in found if name == asset and b >= from_ms and a < to_ms))


def build_report(settings: Settings, bundle: ModelBundle, req: Request, warmup_ms: int, result: Replay,
                 labels: tuple[tuple[int, int], ...] = ()) -> ReportData:
    from cli.report_render import ReportData

    alerts = fold_events(result.events, req.from_ms, req.to_ms)
    if req.recorded is not None and req.recorded.alert_id not in {a.alert_id for a in alerts}:
        alerts.append(recorded_row(req.recorded))
    assets = np.full(len(result.step), req.asset, dtype=object)
    return ReportData(
        asset=req.asset, model_version=bundle.version, features=tuple(bundle.features), from_ms=req.from_ms,
        to_ms=req.to_ms, period_ms=bundle.period_ms, step_ms=result.step * bundle.period_ms,
        standardised=bundle.scaler.transform(assets, result.values), alert_score=result.alert_score,
        threshold=result.threshold, forecast_error=result.forecast_error, alerts=tuple(alerts),
        settings=settings_table(settings, bundle, req, warmup_ms, result),
        focus=None if req.recorded is None else req.recorded.alert_id, labels=labels)


def write_report(out_dir: Path, data: ReportData) -> tuple[Path, Path]:
    from cli.report_render import figure_png, html_page

    png = figure_png(data)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PNG_NAME).write_bytes(png)
        (out_dir / HTML_NAME).write_text(html_page(data, png), encoding="utf-8")
    except OSError as exc:
        raise _usage(f"--out {out_dir}: {exc.strerror or exc}") from None
    return out_dir / PNG_NAME, out_dir / HTML_NAME


def run(args: argparse.Namespace, settings: Settings) -> int:
    from kafka.errors import KafkaError

    from consumers.kafka_clients import ReadTimeout
    from trainers.archive_scan import ArchiveError

    try:
        req = resolve_request(args, settings, int(time.time() * 1000))
    except (KafkaError, ReadTimeout) as exc:
        print(f"plantwatch report: could not read the alerts topic {settings.topics.alerts!r}: {exc}", file=sys.stderr)
        return 1
    bundle = load_model(settings, args.model, req.recorded)
    warmup_ms = parse_duration_ms(args.warmup, "--warmup") if args.warmup else default_warmup_ms(bundle)
    try:
        result = replay(settings, bundle, req.asset, req.from_ms, req.to_ms, warmup_ms)
        if result.readings_in_range == 0:
            raise no_readings(settings, bundle, req, result)
    except ArchiveError as exc:
        raise _usage(f"{exc} (archive.uri = {settings.archive.uri})") from None
    labels_uri = args.labels or settings.trainer.labels_uri
    labels = asset_labels(labels_uri, req.asset, req.from_ms, req.to_ms) if labels_uri else ()
    data = build_report(settings, bundle, req, warmup_ms, result, labels)
    png, page = write_report(Path(args.out), data)
    print(f"report: asset={req.asset} steps={len(result.step)} alerts={len(data.alerts)} model={bundle.version} "
          f"png={png} html={page}")
    return 0
