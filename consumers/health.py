"""The health of a daemon process, as its probes (/healthz, /readyz) report it.

The daemon owns one :class:`Health` and sets its fields as it goes (any thread may set or
read them):

- ``broker_ok``: the last interaction with the broker succeeded;
- ``model_loaded``: a model is loaded (daemons that serve no model pass ``needs_model=False``);
- ``assigned``: the consumer holds a partition assignment;
- ``last_loop``: :func:`time.monotonic` when the main loop last turned (:meth:`Health.beat`);
- ``waiting_for``: a known wait the process is in (``"broker"``, ``"first model"``), else ``None``.

Liveness and readiness differ on purpose. A process that waits for the broker or for a first
model is alive (restarting it would not help) but not ready (it serves nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

ALIVE_STALL_S = 60.0
READY_STALL_S = 30.0


class _Tracked(Protocol):
    assigned: bool
    last_loop: float


class Health:
    """Thread-safe health fields of one daemon process, with the probe answers derived from them."""

    def __init__(self, *, needs_model: bool = True, ready_stall_s: float = READY_STALL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.needs_model = needs_model
        self.ready_stall_s = ready_stall_s
        self._broker_ok = False
        self._model_loaded = False
        self._assigned = False
        self._last_loop = clock()
        self._waiting_for: str | None = None
        self._source: _Tracked | None = None

    # ------------------------------------------------------------------ fields
    @property
    def broker_ok(self) -> bool:
        with self._lock:
            return self._broker_ok

    @broker_ok.setter
    def broker_ok(self, value: bool) -> None:
        with self._lock:
            self._broker_ok = bool(value)

    @property
    def model_loaded(self) -> bool:
        with self._lock:
            return self._model_loaded

    @model_loaded.setter
    def model_loaded(self, value: bool) -> None:
        with self._lock:
            self._model_loaded = bool(value)

    @property
    def assigned(self) -> bool:
        with self._lock:
            return self._assigned_locked()

    @assigned.setter
    def assigned(self, value: bool) -> None:
        with self._lock:
            self._assigned = bool(value)

    @property
    def last_loop(self) -> float:
        with self._lock:
            return self._last_loop_locked()

    @last_loop.setter
    def last_loop(self, value: float) -> None:
        with self._lock:
            self._last_loop = float(value)

    @property
    def waiting_for(self) -> str | None:
        with self._lock:
            return self._waiting_for

    @waiting_for.setter
    def waiting_for(self, value: str | None) -> None:
        with self._lock:
            if value != self._waiting_for:
                # Entering or leaving a wait counts as a loop turn: a long wait must not make the
                # first moments after it look like a stall.
                self._last_loop = self._clock()
            self._waiting_for = value

    def beat(self) -> None:
        """The main loop turned."""
        with self._lock:
            self._last_loop = self._clock()

    def update(self, **fields: Any) -> None:
        """Set several fields, e.g. ``health.update(broker_ok=True, waiting_for=None)``."""
        for name, value in fields.items():
            if name not in ("broker_ok", "model_loaded", "assigned", "last_loop", "waiting_for"):
                raise AttributeError(f"Health has no field {name!r}")
            setattr(self, name, value)

    def follow(self, source: _Tracked) -> None:
        """Take ``assigned`` and ``last_loop`` from a daemon object that keeps them itself (one that
        does not report into a :class:`Health` yet). Fields set here still count: the later
        ``last_loop`` wins, and ``assigned`` is the source's."""
        with self._lock:
            self._source = source

    # ------------------------------------------------------------------ probes
    def alive(self, stall_s: float = ALIVE_STALL_S) -> bool:
        """The main loop turned within ``stall_s``, or the process is in a known wait."""
        with self._lock:
            return self._waiting_for is not None or self._clock() - self._last_loop_locked() < stall_s

    def ready(self) -> bool:
        """A model is loaded, partitions are assigned, the broker answers and the loop turns."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the process is not ready (the first reason found), or ``None`` when it is."""
        with self._lock:
            if self._waiting_for is not None:
                return f"waiting for {self._waiting_for}"
            if self.needs_model and not self._model_loaded:
                return "no model loaded"
            if not self._broker_ok:
                return "broker not reachable"
            if not self._assigned_locked():
                return "no partition assigned"
            stalled = self._clock() - self._last_loop_locked()
            if stalled >= self.ready_stall_s:
                return f"main loop stalled for {stalled:.0f}s"
            return None

    def snapshot(self) -> dict[str, Any]:
        """All fields at one instant (for logs and probe bodies)."""
        with self._lock:
            return {
                "broker_ok": self._broker_ok,
                "model_loaded": self._model_loaded,
                "assigned": self._assigned_locked(),
                "loop_age_s": round(self._clock() - self._last_loop_locked(), 3),
                "waiting_for": self._waiting_for,
            }

    # ------------------------------------------------------------------ helpers (lock held)
    def _assigned_locked(self) -> bool:
        if self._source is not None:
            return bool(self._source.assigned)
        return self._assigned

    def _last_loop_locked(self) -> float:
        if self._source is not None:
            return max(self._last_loop, float(self._source.last_loop))
        return self._last_loop
