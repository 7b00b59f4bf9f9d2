"""A compact terminal view of a running detector: throughput, lag, model, swaps and open alerts.

``plantwatch detect --live`` and ``plantwatch demo`` (on a terminal) keep it at the bottom of
the screen while log and alert lines scroll above it. It only reads: the detector's counters
and model, the consumer-lag gauge the detector sets for Prometheus, and the alerts topic
(any member's alerts, from when the view starts), so it changes nothing the detector does.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

RATE_WINDOW_S = 5.0  # readings/s is averaged over this many seconds
MAX_ROWS = 8         # open alerts shown; the rest are counted


@dataclass(frozen=True)
class Sample:
    """What the view shows at one moment."""

    at_s: float                 # monotonic clock
    records: int                # readings read so far
    scored: int                 # grid steps scored so far
    lag: int | None             # records behind the high watermarks (None: not measured yet)
    model_version: str
    swaps: int
    last_swap_ms: float | None  # pause of the latest swap
    open_alerts: list[dict[str, Any]] = field(default_factory=list)


class OpenAlerts:
    """The alerts open now, by id, from the alert events as they arrive (open, update, close)."""

    def __init__(self) -> None:
        self._open: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, alert: dict[str, Any]) -> None:
        with self._lock:
            state = alert.get("state")
            if state == "close":
                self._open.pop(alert.get("alert_id", ""), None)
            elif state in ("open", "update"):  # an operator's "accepted" event changes nothing here
                self._open[alert.get("alert_id", "")] = alert

    def current(self) -> list[dict[str, Any]]:
        """Open alerts, highest score first."""
        with self._lock:
            return sorted(self._open.values(), key=lambda a: -float(a.get("peak_score", a.get("score", 0.0))))


class Rate:
    """Readings per second over the last :data:`RATE_WINDOW_S`."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._points: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, at_s: float, count: int) -> float | None:
        self._points.append((at_s, count))
        while len(self._points) > 2 and self._points[1][0] <= at_s - self.window_s:
            self._points.popleft()
        (t0, c0), (t1, c1) = self._points[0], self._points[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None


def render(sample: Sample, per_second: float | None) -> Group:
    """The view: two status lines and a table of the open alerts (pure: a sample in, renderables out)."""
    rate = "-" if per_second is None else f"{per_second:,.1f}"
    lag = "-" if sample.lag is None else f"{sample.lag:,}"
    swap = f"{sample.swaps}" + (f" (last paused scoring {sample.last_swap_ms:.1f} ms)"
                                if sample.last_swap_ms is not None else "")
    head = Text.assemble(("readings/s ", "dim"), (rate, "bold"), ("   lag ", "dim"), (lag, "bold"),
                         ("   scored ", "dim"), (f"{sample.scored:,}", "bold"),
                         ("   open alerts ", "dim"), (str(len(sample.open_alerts)), "bold red" if sample.open_alerts
                                                      else "bold green"))
    model = Text.assemble(("model ", "dim"), (sample.model_version, "bold"), ("   swaps ", "dim"), (swap, "bold"))
    parts: list[Any] = [head, model]
    if sample.open_alerts:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="dim")
        for column in ("asset", "since (UTC)", "score", "peak", "top features"):
            table.add_column(column, justify="right" if column in ("score", "peak") else "left")
        for alert in sample.open_alerts[:MAX_ROWS]:
            top = ", ".join(f"{f['feature']} {f['contribution']:.2f}" for f in alert.get("top_features", []))
            since = time.strftime("%H:%M:%S", time.gmtime(int(alert["start_ms"]) / 1000))
            table.add_row(str(alert["asset"]), since, f"{alert['score']:.2f}",
                          f"{alert.get('peak_score', alert['score']):.2f}", top)
        parts.append(table)
        if len(sample.open_alerts) > MAX_ROWS:
            parts.append(Text(f"… and {len(sample.open_alerts) - MAX_ROWS} more", style="dim"))
    return Group(*parts)


def detector_sample(detector: Any, alerts: OpenAlerts, lag: Callable[[], int | None]) -> Sample:
    """A :class:`Sample` of a running :class:`consumers.detector.Detector` (read without locking:
    counters and the model version are single attribute reads)."""
    pauses = list(detector.swap_pauses_s)
    return Sample(at_s=time.monotonic(), records=detector.stats.records, scored=detector.stats.scored, lag=lag(),
                  model_version=detector.engine.model_version, swaps=len(pauses),
                  last_swap_ms=pauses[-1] * 1000 if pauses else None, open_alerts=alerts.current())


def gauge_total(gauge: Any) -> int | None:
    """The sum of a labelled Prometheus gauge over its labels (None before any is set)."""
    values = [s.value for metric in gauge.collect() for s in metric.samples]
    return int(sum(values)) if values else None


class LiveView:
    """Redraws :func:`render` of ``sample()`` every ``refresh_s`` in a thread, until :meth:`stop`.

    While it runs, what the process prints (stdout and stderr) scrolls above it.
    """

    def __init__(self, sample: Callable[[], Sample], *, console: Console | None = None, refresh_s: float = 1.0) -> None:
        self.sample = sample
        self.console = console or Console()
        self.refresh_s = refresh_s
        self.rate = Rate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def _renderable(self) -> Group:
        s = self.sample()
        return render(s, self.rate.add(s.at_s, s.records))

    def start(self) -> LiveView:
        self._live = Live(self._renderable(), console=self.console, auto_refresh=False, transient=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            assert self._live is not None
            self._live.update(self._renderable(), refresh=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._live is not None:
            self._live.update(self._renderable(), refresh=True)
            self._live.stop()


def alert_follower(settings: Any, on_alert: Callable[[dict[str, Any]], None], stop: threading.Event, *,
                   from_beginning: bool = False, every_poll: Callable[[], None] | None = None) -> threading.Thread:
    """A thread (not started) passing each alert event of the alerts topic to ``on_alert``, from
    the topic's end or its beginning, and calling ``every_poll`` after each poll, until ``stop``."""
    import json

    from consumers.kafka_clients import make_consumer

    def run() -> None:
        consumer = make_consumer(settings, group_id=None, topics=[settings.topics.alerts],
                                 auto_offset_reset="earliest" if from_beginning else "latest")
        try:
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=300).values():
                    for r in records:
                        try:
                            alert = json.loads(r.value)
                        except (ValueError, TypeError):
                            continue  # not an alert event
                        if isinstance(alert, dict):
                            on_alert(alert)
                if every_poll is not None:
                    every_poll()
        finally:
            consumer.close(autocommit=False)

    return threading.Thread(target=run, name="alerts", daemon=True)


def run_with_view(detector: Any, settings: Any, console: Console | None = None, refresh_s: float = 1.0) -> int:
    """``detector.run()`` with the view below its log lines, fed by the alerts topic from now on."""
    from consumers import metrics

    alerts = OpenAlerts()
    done = threading.Event()
    follower = alert_follower(settings, alerts.add, done)
    follower.start()
    view = LiveView(lambda: detector_sample(detector, alerts, lambda: gauge_total(metrics.LAG)), console=console,
                    refresh_s=refresh_s).start()
    try:
        return int(detector.run())
    finally:
        done.set()
        view.stop()
        follower.join(timeout=5)
