"""The retraining job: archive scan → exclusions → fit → gate → publish → announce.

One run (``plantwatch train``, or one tick of ``plantwatch schedule``):

1. The range ends at the run's time ``now``: ``[now - lookback, now - holdout)`` is trained
   on, the newest ``holdout`` hours are kept out of training for the gate. The grid period is
   ``grid.period_s`` when the user set it, else the serving model's (a hot swap needs the same
   period), else, for a first model, the data's own spacing: the median spacing of the first
   readings of each asset in the training range (:mod:`pipeline.spacing`). A period more than
   twice off that spacing is logged as a warning naming ``grid.period_s``.
2. Periods known to be abnormal are dropped from both: the alerts on the alerts topic
   (per asset, from the alert's start to its close, or to ``now`` while open) and the
   labelled ranges of ``trainer.labels_uri``. A model must learn normal behaviour only,
   and the gate's held-out data is taken as normal. The filter works batch by batch on the
   archive scan, so memory stays bounded by the scan's batch size, and dropped stretches
   become gaps that reset the grid rather than joining the readings around them.
3. :func:`~pipeline.fit.fit_stream` trains, validates and calibrates, re-opening the
   filtered scan as often as it needs. With ``trainer.fine_tune`` it starts from the
   serving model's weights when its features and layers match (and keeps them unless an
   epoch improves on them), else from the seeded initialisation.
4. The gate (:mod:`trainers.gate`) compares the new model with the one serving on the
   held-out data, step by step; a first model, or one whose features or grid period
   changed on purpose, is published without comparison.
5. The bundle, with the run's metadata and the gate's figures and decision, and its
   training report beside it (:mod:`trainers.report`), is published atomically to the
   registry and announced on the control topic (key ``current``). A refused model is kept
   under ``candidates/`` with the same report (``registry.keep_candidates``), where
   ``plantwatch models show`` finds it and ``plantwatch models promote`` can publish it.

Failures raise; a refusal by the gate is an outcome, not an error (exit code 3).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.bundle import BundleError, ModelBundle
from pipeline.fit import FitError, fit_stream
from pipeline.logs import get_logger
from pipeline.readings import DecodedBatch
from pipeline.registry import RegistryError, current_version, load_version, publish, store_candidate
from pipeline.settings import Settings
from pipeline.spacing import PeriodChoice, StampSample, choose_period, median_period_s, spacing_hint, with_period
from trainers.archive_scan import scan_archive
from trainers.gate import GateDecision, compare, decide, incompatibility, unconditional
from trainers.announce import announce, has_broker
from trainers.report import report_files, warn_features
from trainers.schedule import EXIT_PUBLISHED, EXIT_REFUSED

HOUR_MS = 3_600_000
LOG_EVERY_S = 30.0          # scan progress is logged at most this often (epochs and passes always)
ALERTS_TIMEOUT_S = 120.0    # longest wait to read the alerts topic to its end
PERIOD_SAMPLE_STAMPS = 256  # first distinct stamps of each asset read for the data's own spacing
_LIBRARIES = ("pyarrow", "pandas", "kafka-python", "structlog")

Range = tuple[str, int, int]  # asset, start_ms, end_ms (end exclusive)
Progress = Callable[[dict[str, Any]], None]

log = get_logger(__name__)


class TrainError(RuntimeError):
    """The run cannot produce a model: too little data, unreadable labels, an alerts topic that cannot be read."""


@dataclass(frozen=True)
class Span:
    start_ms: int
    end_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"start_ms": self.start_ms, "end_ms": self.end_ms,
                "start": _iso(self.start_ms), "end": _iso(self.end_ms)}


def spans(now_ms: int, lookback_hours: float, holdout_hours: float) -> tuple[Span, Span | None]:
    """The training span and the held-out span after it (None when holdout_hours is 0)."""
    cut = now_ms - round(holdout_hours * HOUR_MS)
    train = Span(now_ms - round(lookback_hours * HOUR_MS), cut)
    return train, (Span(cut, now_ms) if cut < now_ms else None)


# ---------------------------------------------------------------- exclusions


class Exclusions:
    """Abnormal periods per asset, merged into sorted, disjoint ``[start, end)`` ranges."""

    def __init__(self, ranges: Iterable[Range]) -> None:
        by_asset: dict[str, list[tuple[int, int]]] = {}
        for asset, start, end in ranges:
            if end > start:
                by_asset.setdefault(asset, []).append((start, end))
        self.ranges = {asset: _merged(spans) for asset, spans in by_asset.items()}

    def __len__(self) -> int:
        return sum(len(starts) for starts, _ in self.ranges.values())

    def mask(self, asset: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """True where a row falls inside one of its asset's ranges."""
        out = np.zeros(len(ts_ms), bool)
        if not self.ranges or not len(ts_ms):
            return out
        codes, names = pd.factorize(asset)
        for k, name in enumerate(names):
            found = self.ranges.get(name)
            if found is None:
                continue
            starts, ends = found
            rows = np.flatnonzero(codes == k)
            t = ts_ms[rows]
            i = np.searchsorted(starts, t, side="right") - 1  # the last range starting at or before t
            out[rows] = (i >= 0) & (t < ends[np.maximum(i, 0)])
        return out

    def apply(self, batch: DecodedBatch) -> tuple[DecodedBatch, int]:
        """The batch without excluded rows, and the number of readings dropped.

        The rows of a reading share its asset and time, so a reading goes whole, and they
        are consecutive, so the dropped readings are the runs of dropped record indices.
        """
        drop = self.mask(batch.asset, batch.ts_ms)
        if not drop.any():
            return batch, 0
        dropped_ids = batch.record_index[drop]
        readings = 1 + int(np.count_nonzero(dropped_ids[1:] != dropped_ids[:-1]))
        return batch.select(~drop, n_records=max(0, batch.n_records - readings)), readings


def _merged(spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    arr = np.array(out, np.int64)
    return arr[:, 0], arr[:, 1]


def read_alert_ranges(settings: Settings, span: Span, timeout_s: float = ALERTS_TIMEOUT_S) -> list[Range]:
    """Per alert on the alerts topic overlapping ``span`` and not accepted as normal
    (:mod:`pipeline.alert_log`): (asset, start, close or span end).

    The topic is read from the beginning to the end it has when the read starts. A partial read
    would let abnormal periods into training, so not reaching the end in time is an error.
    """
    from consumers.kafka_clients import ReadTimeout, read_to_end
    from pipeline.alert_log import AlertLog, excluded_spans

    alerts = AlertLog(keep_last=False)
    try:
        read_to_end(settings, settings.topics.alerts, lambda r: alerts.add(r.value), timeout_s=timeout_s)
    except ReadTimeout as exc:
        raise TrainError(f"could not read the alerts: {exc}") from None
    ranges = excluded_spans(alerts.records.values(), span.end_ms)
    return [r for r in ranges if r[1] < span.end_ms and r[2] > span.start_ms]


def read_label_ranges(uri: str) -> list[Range]:
    """Labelled abnormal periods from a label file (``pipeline.labels``: asset, start_ms, end_ms
    as milliseconds, datetimes or ISO strings, or Numenta's windows JSON), local or in object storage."""
    from pipeline.labels import LabelError, parse_label_ranges

    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as fh:
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read the labels {uri}: {exc}") from None
    try:
        found = parse_label_ranges(bytes(data), uri)
    except LabelError as exc:
        raise TrainError(str(exc)) from None
    if any(r.unit == "row" for r in found):
        raise TrainError(f"labels {uri}: row-index ranges name rows of a file, not archived readings; "
                         "give start_ms, end_ms times")
    return [(r.name, r.start, r.end) for r in found]


def load_exclusions(settings: Settings, span: Span) -> tuple[Exclusions, dict[str, int]]:
    """The abnormal periods to drop, and how many came from each source."""
    t = settings.trainer
    ranges: list[Range] = []
    counts: dict[str, int] = {}
    if t.exclude_alerts and has_broker(settings):
        found = read_alert_ranges(settings, span)
        counts["alerts"] = len(found)
        ranges += found
    elif t.exclude_alerts:
        log.info("alerts are not excluded: no broker configured")
    if t.labels_uri:
        found = [r for r in read_label_ranges(t.labels_uri) if r[1] < span.end_ms and r[2] > span.start_ms]
        counts["labels"] = len(found)
        ranges += found
    return Exclusions(ranges), counts


# ---------------------------------------------------------------- scanning with progress


@dataclass
class ScanCounts:
    readings: int = 0
    rows: int = 0
    excluded_readings: int = 0
    excluded_rows: int = 0


class _Reporter:
    """Progress to a callback (a terminal) on every event, to the log on milestones or every LOG_EVERY_S."""

    def __init__(self, progress: Progress | None, run_log: Any) -> None:
        self.progress = progress
        self.log = run_log
        self.last = time.monotonic()

    def emit(self, message: str, event: dict[str, Any], *, milestone: bool) -> None:
        if self.progress is not None:
            self.progress(event)
        now = time.monotonic()
        if milestone or now - self.last >= LOG_EVERY_S:
            self.last = now
            self.log.info(message, **event)


class _Source:
    """The filtered archive scan of one span, re-openable, counting what it reads."""

    def __init__(self, settings: Settings, span: Span, exclusions: Exclusions, phase: str, reporter: _Reporter,
                 min_readings: int = 0) -> None:
        self.settings, self.span, self.exclusions = settings, span, exclusions
        self.phase, self.reporter, self.min_readings = phase, reporter, min_readings
        self.passes = 0
        self.first = ScanCounts()

    def open(self) -> Iterator[DecodedBatch]:
        self.passes += 1
        counts = ScanCounts()
        if self.passes == 1:
            self.first = counts
        return self._scan(self.passes, counts)

    def _scan(self, n: int, counts: ScanCounts) -> Iterator[DecodedBatch]:
        s = self.settings
        for batch in scan_archive(s.archive.uri, s.model.features, start_ms=self.span.start_ms,
                                  end_ms=self.span.end_ms):
            kept, dropped = self.exclusions.apply(batch)
            counts.rows += len(kept)
            counts.readings += kept.n_records
            counts.excluded_rows += len(batch) - len(kept)
            counts.excluded_readings += dropped
            self.reporter.emit("scanning", self._event(n, counts), milestone=False)
            if len(kept):
                yield kept
        self.reporter.emit("scan pass done", self._event(n, counts), milestone=True)
        if n == 1 and counts.readings < self.min_readings:
            raise TrainError(f"only {counts.readings} readings in {s.archive.uri} between {_iso(self.span.start_ms)} "
                             f"and {_iso(self.span.end_ms)} after exclusions; trainer.min_rows is {self.min_readings}")

    def _event(self, n: int, counts: ScanCounts) -> dict[str, Any]:
        return {"phase": self.phase, "pass": n, **dataclasses.asdict(counts)}


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class TrainOutcome:
    published: bool
    version: str          # the new model's version (published or not)
    gate: GateDecision
    announced: bool
    metadata: dict[str, Any]
    candidate: bool = False  # refused and kept under candidates/ (plantwatch models show / promote)

    @property
    def exit_code(self) -> int:
        return EXIT_PUBLISHED if self.published else EXIT_REFUSED

    def summary(self) -> dict[str, Any]:
        """One JSON-able line for scripts and the scheduler."""
        out = {"status": "published" if self.published else "refused", "version": self.version,
               "reason": self.gate.reason, "announced": self.announced,
               "champion": self.gate.champion.version if self.gate.champion else None}
        if not self.published:
            out["candidate"] = self.candidate
        return out


def run_training(settings: Settings, now_ms: int, *, progress: Progress | None = None,
                 before_publish: Callable[[], None] | None = None, period_from_data: bool = False) -> TrainOutcome:
    """One training run ending at ``now_ms``; raises on failure (see :class:`TrainError`).

    ``before_publish`` is called just before publishing and may raise to stop it (the run
    lock's check that this run still holds its lease). ``period_from_data``: the user has not
    set ``grid.period_s``, so the run takes the serving model's period, or the data's spacing."""
    storage.configure(settings.storage)
    t = settings.trainer
    train_span, holdout = spans(now_ms, t.lookback_hours, t.holdout_hours)
    run_log = log.bind(run_at=_iso(now_ms))
    reporter = _Reporter(progress, run_log)
    started = time.monotonic()
    exclusions, sources = load_exclusions(settings, Span(train_span.start_ms, now_ms))
    run_log.info("training run started", archive=settings.archive.uri, train=train_span.to_dict(),
                 holdout=holdout.to_dict() if holdout else None, excluded_ranges=sources)
    excluded_at = time.monotonic()

    champion = _champion(settings)
    period = _grid_period(settings, train_span, exclusions, champion, period_from_data, run_log)
    settings = with_period(settings, period.period_s)
    start = _starting_point(settings, champion)
    source = _Source(settings, train_span, exclusions, "train", reporter, t.min_rows)
    try:
        bundle, report = fit_stream(source.open, settings,
                                    progress=lambda e: reporter.emit("training progress", {"phase": "fit", **e},
                                                                     milestone=True),
                                    initial_weights=start.weights if start else None,
                                    metadata={"grid_period": period.to_dict(),
                                              **({"fine_tuned_from": start.version} if start else {})})
    except FitError as exc:
        hint = spacing_hint(period.period_s, period.data_period_s)
        if hint is None:
            raise
        raise FitError(f"{exc}; {hint}") from None
    fitted_at = time.monotonic()
    warn_features(run_log, bundle)
    run_log.info("model fitted", version=bundle.version, epochs=report.epochs, best_epoch=report.best_epoch,
                 validation_error=bundle.metadata.get("validation_error"), duration_s=round(report.duration_s, 1),
                 fine_tuned_from=start.version if start else None, initial_val_loss=report.initial_val_loss)

    if current_version(settings.registry.uri) != (champion.bundle.version if champion.bundle else None):
        champion = _champion(settings)  # the registry changed during the fit: gate against what serves now
    decision = _gate(settings, bundle, champion, holdout, exclusions, reporter)
    gated_at = time.monotonic()
    run_log.info("gate", decision="publish" if decision.publish else "refuse", reason=decision.reason,
                 champion=decision.champion.to_dict() if decision.champion else None,
                 challenger=decision.challenger.to_dict() if decision.challenger else None)

    durations = {"exclusions": excluded_at - started, "fit": fitted_at - excluded_at, "gate": gated_at - fitted_at}
    bundle = dataclasses.replace(bundle, metadata={
        **bundle.metadata,
        **_run_metadata(settings, bundle, train_span, holdout, source.first, sources, durations),
        "gate": decision.to_dict(),
    })
    files = report_files(bundle)
    if not decision.publish:
        kept = settings.registry.keep_candidates > 0
        if kept:
            store_candidate(settings.registry.uri, bundle, keep=settings.registry.keep_candidates, extra=files)
        run_log.warning("model refused by the gate: nothing published", version=bundle.version, reason=decision.reason,
                        kept_as_candidate=kept)
        return TrainOutcome(False, bundle.version, decision, False, bundle.metadata, candidate=kept)
    if before_publish is not None:
        before_publish()
    version = publish(settings.registry.uri, bundle, keep=settings.registry.keep, extra=files)
    announced = announce(settings, version) if has_broker(settings) else False
    run_log.info("model published", version=version, registry=settings.registry.uri, announced=announced,
                 duration_s=round(time.monotonic() - started, 1))
    return TrainOutcome(True, version, decision, announced, bundle.metadata)


def sample_data_period_s(settings: Settings, span: Span, exclusions: Exclusions,
                         per_asset: int = PERIOD_SAMPLE_STAMPS) -> float | None:
    """The archive's own spacing over ``span``: the median spacing of the first ``per_asset``
    distinct stamps of each asset, excluded periods left out.

    The scan stops once every asset seen has its stamps and a batch names no new one, so it
    costs a fraction of a training pass; an asset first seen later in the range is not sampled."""
    sample = StampSample(per_asset)
    batches = scan_archive(settings.archive.uri, settings.model.features, start_ms=span.start_ms,
                           end_ms=span.end_ms)
    try:
        for batch in batches:
            kept, _ = exclusions.apply(batch)
            if not sample.add(kept.asset, kept.ts_ms) and sample.full:
                break
    finally:
        batches.close()
    return median_period_s(sample.stamps())


def _grid_period(settings: Settings, span: Span, exclusions: Exclusions, champion: _Champion,
                 from_data: bool, run_log: Any) -> PeriodChoice:
    data_s = sample_data_period_s(settings, span, exclusions)
    serving_s = champion.bundle.period_ms / 1000 if champion.bundle is not None else None
    choice = choose_period(settings.grid.period_s, data_s, explicit=not from_data, serving_s=serving_s)
    run_log.info("grid period", period_s=choice.period_s, source=choice.source, data_period_s=data_s,
                 reason=choice.reason)
    if choice.warning:
        run_log.warning(choice.warning)
    return choice


@dataclass(frozen=True)
class _Champion:
    """The serving model for the gate: its bundle, or why there is none to compare with."""

    bundle: ModelBundle | None
    why_not: str


def _champion(settings: Settings) -> _Champion:
    uri = settings.registry.uri
    serving = current_version(uri)
    if serving is None:
        return _Champion(None, "first model: nothing published to compare with")
    try:
        # A store that does not answer fails the run (StorageError, after the retries): publishing
        # without the gate is for a serving model that is broken, not for one that could not be read.
        return _Champion(load_version(uri, serving), "")
    except (BundleError, RegistryError) as exc:
        log.warning("the serving model cannot be loaded; training from scratch, publishing without comparison",
                    version=serving, error=str(exc))
        return _Champion(None, f"the serving model {serving} cannot be loaded ({exc})")


def _starting_point(settings: Settings, champion: _Champion) -> ModelBundle | None:
    """The serving model to fine-tune from: with trainer.fine_tune, when its network has the
    configured features and layers (a deliberate change of either trains from scratch)."""
    b, m = champion.bundle, settings.model
    if not settings.trainer.fine_tune or b is None:
        return None
    if b.features != tuple(m.features) or tuple(b.units) != tuple(m.units):
        log.info("training from scratch: the serving model's network differs", version=b.version,
                 serving_units=list(b.units), units=list(m.units))
        return None
    return b


def _gate(settings: Settings, challenger: ModelBundle, serving: _Champion, holdout: Span | None,
          exclusions: Exclusions, reporter: _Reporter) -> GateDecision:
    t = settings.trainer
    margin = t.gate_margin
    champion = serving.bundle
    if champion is None:
        return unconditional(serving.why_not, margin)
    why = incompatibility(champion, challenger)
    if why is not None:
        log.warning("the new model is not comparable with the serving one", version=champion.version, change=why)
        return unconditional(f"not comparable with the serving model {champion.version}: {why}", margin)
    if holdout is None:
        return unconditional("no held-out period (trainer.holdout_hours = 0): published without comparison", margin)
    source = _Source(settings, holdout, exclusions, "gate", reporter)
    return decide(compare(champion, challenger, source.open(), settings.grid), margin, t.gate_alert_tolerance)


def _run_metadata(settings: Settings, bundle: ModelBundle, train: Span, holdout: Span | None, counts: ScanCounts,
                  sources: dict[str, int], durations: dict[str, float]) -> dict[str, Any]:
    code = code_version()
    return {
        "code_version": code,
        "versions": {**bundle.metadata.get("versions", {}), **library_versions(), "plantwatch": code},
        "training": {
            "archive": settings.archive.uri, "range": train.to_dict(),
            "holdout": holdout.to_dict() if holdout else None,
            "readings": counts.readings, "rows": counts.rows,
            "excluded": {"readings": counts.excluded_readings, "rows": counts.excluded_rows,
                         **{f"{name}_ranges": n for name, n in sources.items()}},
            "durations_s": {name: round(s, 2) for name, s in durations.items()},
        },
    }


def code_version() -> str:
    """``git describe`` of the source checkout if there is one, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            done = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=root,
                                  capture_output=True, text=True, timeout=10, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return importlib.metadata.version("plantwatch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
