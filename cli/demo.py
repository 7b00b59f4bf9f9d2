"""The demo: embedded broker, simulated plant, archiver, detector, trainer and live alerts.

1. The plant's recent history goes through Kafka; the archiver writes it to Parquet, and a
   first model is fitted on it and published to the registry.
2. The detector (following the registry) scores the plant live; alerts print in event-time
   order, a few seconds behind the stream. The detector also scores the replayed history
   (it starts at the beginning of the topic); alerts raised there are counted apart, not shown.
3. Part-way through, the trainer refits on the archive (history plus what streamed since),
   gates the new model against the serving one and publishes it; the detector hot-swaps.

Everything runs in one process on 127.0.0.1 and stops by itself after ``seconds`` (or on
Ctrl-C) with a measured summary whose last line is::

    demo: readings=N scored=N alerts=M injected=K caught=J
"""

from __future__ import annotations

import dataclasses
import heapq
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from cli.live_view import LiveView, OpenAlerts, alert_follower, detector_sample, gauge_total
from consumers import metrics
from consumers.archiver import Archiver
from consumers.broker import LocalBroker
from consumers.detector import Detector
from consumers.kafka_clients import make_producer
from consumers.simulator_feed import feed
from consumers.topics import ensure_topics, standard_topics
from pipeline.settings import Settings, load_settings
from pipeline.simulate import ANOMALY_KINDS, Anomaly, PlantConfig, PlantSimulator, plan_anomalies

DEMO_OVERRIDES = {
    "grid.period_s": "0.2", "grid.allowed_lateness_s": "1", "model.units": "32,16", "model.timesteps": "16",
    "model.epochs": "12", "model.patience": "3", "log.level": "warning", "detector.registry_poll_s": "2",
    "archive.flush_seconds": "3", "trainer.min_rows": "1000", "trainer.gate_margin": "0.25",
}
HISTORY_STEPS = 8000
# Faults are injected into the live stream after its first LEAD_S and before its last TAIL_S
# seconds (so the detector is warm, and has time to close the last alert), one per pump:
# GAP_STEPS of normal behaviour, then FAULT_STEPS of fault.
LEAD_S, TAIL_S = 15.0, 10.0
GAP_STEPS, FAULT_STEPS = 50, (60, 100)
MIN_SECONDS = LEAD_S + TAIL_S + (GAP_STEPS + FAULT_STEPS[1]) * float(DEMO_OVERRIDES["grid.period_s"])


@dataclasses.dataclass
class DemoResult:
    readings: int  # records the detector read (history and live)
    scored: int    # grid steps it scored
    alerts: int    # alerts opened during the live stream
    injected: int  # anomalies injected into the live stream
    caught: int    # … with an alert on the right asset overlapping them

    def line(self) -> str:
        return (f"demo: readings={self.readings} scored={self.scored} alerts={self.alerts} "
                f"injected={self.injected} caught={self.caught}")


def _plan(config: PlantConfig, start_ms: int, end_ms: int) -> list[Anomaly]:
    """One anomaly per asset, kinds in turn, inside the live window."""
    out = []
    for i, asset in enumerate(config.asset_ids):
        kind = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
        plan = plan_anomalies(config, start_ms, end_ms, per_asset=1, kinds=[kind], seed=i, min_gap_steps=GAP_STEPS,
                              duration_steps=FAULT_STEPS)
        out += [a for a in plan if a.asset == asset]
    return out


def caught(anomalies: list[Anomaly], alerts: list[dict[str, Any]], slack_ms: int) -> list[Anomaly]:
    """Injected anomalies with an alert on the right asset overlapping them."""
    return [a for a in anomalies if any(
        al["asset"] == a.asset and al["start_ms"] <= a.end_ms + slack_ms
        and (al["end_ms"] is None or al["end_ms"] >= a.start_ms) for al in alerts)]


def alert_line(alert: dict[str, Any], anomalies: list[Anomaly]) -> str:
    """``HH:MM:SS.s OPEN   pump-003  score 2.41  top: …  [injected …]`` (event time, UTC)."""
    top = ", ".join(f"{f['feature']} {f['contribution']:.2f}" for f in alert["top_features"])
    truth = [a for a in anomalies if a.asset == alert["asset"] and a.start_ms - 10_000 <= alert["start_ms"] <= a.end_ms]
    note = f"  [injected {truth[0].kind} on {', '.join(truth[0].sensors)}]" if truth else ""
    seconds = alert["step_ms"] / 1000
    stamp = time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 10) % 10}"
    return f"{stamp} {alert['state'].upper():6} {alert['asset']}  score {alert['score']:.2f}  top: {top}{note}"


class AlertPrinter:
    """The live stream's alerts (open and close), printed in event-time order.

    Alerts reach the demo in arrival order: partitions interleave, and a step is scored once
    its grid period closes. Each one is held until the stream is ``hold_ms`` past its event
    time, then printed with whatever earlier ones arrived meanwhile. Alerts that started
    before ``live_from_ms`` were raised on the replayed history: counted, not printed.
    """

    def __init__(self, live_from_ms: int, anomalies: list[Anomaly], print_line: Callable[[str], None],
                 hold_ms: int = 3000) -> None:
        self.live_from_ms = live_from_ms
        self.anomalies = anomalies
        self.print_line = print_line
        self.hold_ms = hold_ms
        self.history_alerts = 0
        self._pending: list[tuple[int, int, dict[str, Any]]] = []
        self._seq = 0

    def add(self, alert: dict[str, Any]) -> None:
        if alert.get("state") not in ("open", "update", "close"):  # e.g. an operator's "accepted"
            return
        if alert["start_ms"] < self.live_from_ms:
            self.history_alerts += alert["state"] == "open"
            return
        if alert["state"] == "update":
            return
        heapq.heappush(self._pending, (int(alert["step_ms"]), self._seq, alert))
        self._seq += 1

    def release(self, now_ms: int | None = None) -> None:
        """Print the held alerts older than ``now_ms - hold_ms`` (all of them when ``now_ms`` is None)."""
        while self._pending and (now_ms is None or self._pending[0][0] <= now_ms - self.hold_ms):
            self.print_line(alert_line(heapq.heappop(self._pending)[2], self.anomalies))


def epoch_line(event: dict[str, Any], epochs: int, elapsed_s: float) -> str:
    """One line of fit progress: ``  epoch 3/12  loss 0.0421  validation 0.0388  (41 s)``."""
    parts = [f"  epoch {event['epoch']}/{epochs}"]
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("val_loss") is not None:
        parts.append(f"validation {event['val_loss']:.4f}")
    return "  ".join(parts) + f"  ({elapsed_s:.0f} s)"


def run_demo(seconds: float, *, n_assets: int = 6, workdir: Path = Path("var/demo"), out: TextIO | None = None,
             stop: threading.Event | None = None, say: Callable[[str], None] | None = None,
             live: bool = False) -> DemoResult:
    """Run the demo for ``seconds`` (at least :data:`MIN_SECONDS`) of live stream; with ``live``, a
    terminal view of the detector stays below the lines it prints."""
    if seconds < MIN_SECONDS:
        raise ValueError(f"the live stream must last at least {MIN_SECONDS:.0f} s to fit a fault per pump")
    stop = stop or threading.Event()
    # sys.stdout as it is when printing: the live view redirects it to print above itself
    say = say or (lambda msg: print(msg, file=out or sys.stdout, flush=True))
    workdir.mkdir(parents=True, exist_ok=True)
    with LocalBroker(log_path=workdir / "broker.log") as broker:
        settings = load_settings(env={}, overrides={
            **DEMO_OVERRIDES, "kafka.bootstrap_servers": broker.bootstrap_servers,
            "registry.uri": str(workdir / "registry"), "archive.uri": str(workdir / "archive"),
            "trainer.lock_path": str(workdir / "trainer.lock"),
            # the retrain covers the history and the live stream; its newest 15 s feed the gate
            "trainer.lookback_hours": str((HISTORY_STEPS * 0.2 + seconds + 600) / 3600),
            "trainer.holdout_hours": str(15 / 3600)})
        from pipeline.logs import configure_logging

        configure_logging(settings.log.level, "console")
        say(f"broker on {broker.bootstrap_servers}")
        ensure_topics(settings, standard_topics(settings))
        period = settings.grid.period_ms
        config = PlantConfig(n_assets=n_assets, period_ms=period, seed=7, day_ms=600_000)
        threads = [threading.Thread(target=Archiver(settings, stop=stop).run, name="archiver", daemon=True)]
        threads[0].start()
        bundle = _first_model(settings, config, _aligned_now(period), say)
        now = _aligned_now(period)  # the live stream starts when the model is ready
        end = now + int(seconds * 1000)
        anomalies = _plan(config, now + int(LEAD_S * 1000), end - int(TAIL_S * 1000))
        say(f"streaming {n_assets} pumps at {1000 / period:.0f} Hz for {seconds:.0f} s with "
            f"{len(anomalies)} injected anomalies; alerts appear below")

        detector = Detector(settings, bundle, stop=stop, follow_registry=True)
        alerts: list[dict[str, Any]] = []
        printer = AlertPrinter(now, anomalies, say)
        open_alerts = OpenAlerts()

        def on_alert(alert: dict[str, Any]) -> None:
            alerts.append(alert)
            printer.add(alert)
            if alert["start_ms"] >= now:  # the view shows the live stream's alerts only
                open_alerts.add(alert)

        threads += [threading.Thread(target=detector.run, name="detector", daemon=True),
                    alert_follower(settings, on_alert, stop, from_beginning=True,
                                   every_poll=lambda: printer.release(int(time.time() * 1000)))]
        retrain_at = time.monotonic() + 0.45 * seconds
        threads.append(threading.Thread(target=_retrain, args=(settings, retrain_at, detector, stop, say),
                                        name="trainer", daemon=True))
        for t in threads[1:]:
            t.start()
        view = LiveView(lambda: detector_sample(detector, open_alerts, lambda: gauge_total(metrics.LAG))).start() \
            if live else None
        try:
            producer = make_producer(settings)
            stats = feed(producer, settings.topics.readings, PlantSimulator(config, anomalies), now, end,
                         realtime=True, stop=stop)
            producer.close()
            # Let the detector close the last steps it can, then stop everything.
            deadline = time.monotonic() + 10
            while detector.stats.records < stats.records + HISTORY_STEPS * n_assets and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            if view is not None:
                view.stop()

    printer.release()  # what the stop left held
    if printer.history_alerts:
        say(f"history: {printer.history_alerts} alert{'s' * (printer.history_alerts != 1)} on the replayed "
            f"history (before the live stream; not shown, not counted)")
    injected = [a for a in anomalies if a.end_ms <= end]
    found = caught(injected, alerts, slack_ms=30 * period)
    for a in injected:
        if a not in found:
            say(f"missed: {a.kind} on {a.asset} {', '.join(a.sensors)}")
    live_alerts = [a for a in alerts if a["state"] == "open" and a["start_ms"] >= now]
    return DemoResult(readings=detector.stats.records, scored=detector.stats.scored, alerts=len(live_alerts),
                      injected=len(injected), caught=len(found))


def _retrain(settings: Settings, at: float, detector: Detector, stop: threading.Event,
             say: Callable[[str], None]) -> None:
    """One training run on the archive part-way through, then report the detector's swap."""
    from trainers.train import TrainError, run_training

    if stop.wait(max(0.0, at - time.monotonic())):
        return
    say("trainer: refitting on the archive (history + live) …")
    try:
        outcome = run_training(settings, int(time.time() * 1000))
    except TrainError as exc:
        say(f"trainer: run failed: {exc}")
        return
    if not outcome.published:
        say(f"trainer: {outcome.version} refused by the gate: {outcome.gate.reason}")
        return
    say(f"trainer: {outcome.version} published ({outcome.gate.reason})")
    deadline = time.monotonic() + 30
    while detector.engine.model_version != outcome.version and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.1)
    if detector.swap_pauses_s:
        say(f"detector: now serving {detector.engine.model_version}, swapped between polls in "
            f"{detector.swap_pauses_s[-1] * 1000:.1f} ms")


def _aligned_now(period_ms: int) -> int:
    return (int(time.time() * 1000) // period_ms + 1) * period_ms


def _first_model(settings: Settings, config: PlantConfig, now_ms: int, say: Callable[[str], None]) -> Any:
    """Send the plant's recent history through Kafka (the archiver keeps it), fit the first
    model on it, publish it, and return it."""
    from pipeline.fit import fit_bundle
    from pipeline.registry import publish
    from pipeline.tables import frame_to_batch

    sim = PlantSimulator(config)
    history_start = now_ms - HISTORY_STEPS * config.period_ms
    producer = make_producer(settings)
    feed(producer, settings.topics.readings, sim, history_start, now_ms)
    producer.close()
    history = sim.history(history_start, HISTORY_STEPS)
    say(f"fitting the first model on {len(history):,} readings of the plant's recent history "
        f"(at most {settings.model.epochs} epochs) …")
    t = time.monotonic()
    batch = frame_to_batch(history, settings.model.features, ts_col="ts_ms", asset_col="asset")
    bundle, report = fit_bundle(batch, settings, metadata={"source": "demo history"},
                                progress=lambda e: say(epoch_line(e, settings.model.epochs, time.monotonic() - t)))
    version = publish(settings.registry.uri, bundle, keep=settings.registry.keep)
    say(f"model {version} published ({report.epochs} epochs, {time.monotonic() - t:.0f} s)")
    return bundle
