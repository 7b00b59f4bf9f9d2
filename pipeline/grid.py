"""The event-time grid: readings of each asset resampled onto steps of a fixed period.

A reading with timestamp ``ts`` belongs to step ``ts // period``. Readings inside a step
are averaged per feature. A step is *closed* (emitted, never to change again) once the
asset's watermark — its newest accepted event time — has passed the end of the step by
the allowed lateness; so readings arriving out of order within that bound land in the
right step, and readings for an already closed step are rejected as ``late``. A reading
stamped further ahead of the wall clock than ``max_future`` is rejected as ``future``
so one bad clock cannot close every open step of its asset.

A closed step whose feature has no reading keeps that feature's last value for at most
``carry_forward_steps`` steps; past that the step is a *hole*: not emitted, and the next
emitted step carries ``reset=True`` so the model starts that asset from a clean state
instead of scoring invented data. More than ``gap_reset_steps`` empty steps in a row are a
*gap*: the carried values are forgotten, and the next emitted step carries ``gap_start``,
the first step of the gap (the step after the last one with readings), besides ``reset``.
A gap is measured over consecutive empty steps however many calls closed them, so it does
not depend on how the readings were polled.

Everything here is pure: the caller passes ``now_ms`` and a position (e.g. the Kafka
offset) per reading; :meth:`AssetGrid.oldest_pending_pos` lets a consumer commit only
offsets whose readings are already on emitted steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.settings import GridSettings

NO_POS = np.iinfo(np.int64).max
NO_GAP = np.iinfo(np.int64).min  # GridSteps.gap_start of a step that does not follow a gap


@dataclass(frozen=True)
class GridConfig:
    period_ms: int
    lateness_ms: int
    max_future_ms: int
    carry_forward_steps: int
    gap_reset_steps: int
    n_features: int

    @classmethod
    def from_settings(cls, grid: GridSettings, n_features: int) -> GridConfig:
        return cls(grid.period_ms, grid.lateness_ms, grid.max_future_ms, grid.carry_forward_steps,
                   grid.gap_reset_steps, n_features)


@dataclass
class GridSteps:
    """Closed steps, grouped by asset and in step order within an asset."""

    asset: np.ndarray    # object (n,)
    step: np.ndarray     # int64 (n,): step index; the step starts at step * period_ms
    values: np.ndarray   # float64 (n, F)
    reset: np.ndarray    # bool (n,): the asset's model state must restart before this step
    n_readings: np.ndarray  # int32 (n,): readings aggregated into the step (0 = fully carried forward)
    pos: np.ndarray      # int64 (n,): smallest source position of the step's readings (NO_POS if none)
    # int64 (n,): first step of the data gap (longer than gap_reset_steps) that reset the asset
    # just before this step, NO_GAP if none; a gap implies ``reset``, a hole resets without one.
    gap_start: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.gap_start is None:
            self.gap_start = np.full(len(self.step), NO_GAP, np.int64)

    def __len__(self) -> int:
        return len(self.step)

    @property
    def gap(self) -> np.ndarray:
        """bool (n,): the step follows a gap reset."""
        return self.gap_start != NO_GAP

    @classmethod
    def empty(cls, n_features: int) -> GridSteps:
        return cls(np.empty(0, dtype=object), np.empty(0, np.int64), np.empty((0, n_features)),
                   np.empty(0, bool), np.empty(0, np.int32), np.empty(0, np.int64))

    @classmethod
    def concat(cls, parts: list[GridSteps], n_features: int) -> GridSteps:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(n_features)
        return cls(np.concatenate([p.asset for p in parts]), np.concatenate([p.step for p in parts]),
                   np.concatenate([p.values for p in parts]), np.concatenate([p.reset for p in parts]),
                   np.concatenate([p.n_readings for p in parts]), np.concatenate([p.pos for p in parts]),
                   np.concatenate([p.gap_start for p in parts]))

    def take(self, idx: np.ndarray) -> GridSteps:
        return GridSteps(self.asset[idx], self.step[idx], self.values[idx], self.reset[idx], self.n_readings[idx],
                         self.pos[idx], self.gap_start[idx])


@dataclass
class GridCounters:
    """What the grid did with its input, for metrics and tests."""

    accepted: int = 0
    late: int = 0
    future: int = 0
    holes: int = 0
    gap_resets: int = 0
    emitted: int = 0

    def add(self, other: GridCounters) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _OpenStep:
    sum: np.ndarray
    count: np.ndarray
    n: int = 0
    min_pos: int = NO_POS


@dataclass
class AssetGrid:
    """Grid state of one asset: open steps, watermark and carried values."""

    n_features: int
    next_step: int | None = None  # first step not yet closed; None before the first reading
    watermark_ms: int = -(2**62)
    last_value: np.ndarray = field(default=None)  # type: ignore[assignment]
    last_step: np.ndarray = field(default=None)   # type: ignore[assignment]
    pending_reset: bool = True
    open: dict[int, _OpenStep] = field(default_factory=dict)
    empty_run: int = 0  # empty steps closed in a row since the last step with readings
    gap_start: int | None = None  # first step of a gap not yet reported on an emitted step

    def __post_init__(self) -> None:
        if self.last_value is None:
            self.last_value = np.full(self.n_features, np.nan)
        if self.last_step is None:
            self.last_step = np.full(self.n_features, -(2**62), dtype=np.int64)

    def oldest_pending_pos(self) -> int:
        """Smallest position of a reading still on an open step (NO_POS if none)."""
        return min((o.min_pos for o in self.open.values()), default=NO_POS)

    def add(self, cfg: GridConfig, step: np.ndarray, feature: np.ndarray, value: np.ndarray,
            pos: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """Place readings (in arrival order) on open steps; returns the mask of readings rejected as late.

        A reading is late when its step was already closed by the watermark as it stood when
        the reading arrived — judged reading by reading, even inside one batch.
        """
        seen = np.maximum.accumulate(ts_ms)
        before = np.maximum(self.watermark_ms, np.concatenate([[self.watermark_ms], seen[:-1]]))
        late = (step + 1) * cfg.period_ms + cfg.lateness_ms <= before
        if self.next_step is not None:
            late |= step < self.next_step
        ok = ~late
        if not ok.any():
            return late
        if self.next_step is None:
            # Leave room for the first readings' stragglers (within the lateness bound).
            self.next_step = int(min(step[ok].min(), (ts_ms[ok].min() - cfg.lateness_ms) // cfg.period_ms))
        s, f, v, p = step[ok], feature[ok], value[ok], pos[ok]
        for k in np.unique(s):
            sel = s == k
            o = self.open.get(int(k))
            if o is None:
                o = self.open[int(k)] = _OpenStep(np.zeros(self.n_features), np.zeros(self.n_features, np.int32))
            np.add.at(o.sum, f[sel], v[sel])
            np.add.at(o.count, f[sel], 1)
            o.n += int(sel.sum())
            o.min_pos = min(o.min_pos, int(p[sel].min()))
        self.watermark_ms = max(self.watermark_ms, int(ts_ms[ok].max()))
        return late

    def close(self, cfg: GridConfig, up_to_step: int | None = None) -> tuple[list[Any], GridCounters]:
        """Close every step the watermark has passed (or every step up to ``up_to_step``).

        Returns rows ``(step, values, reset, n_readings, min_pos, gap_start)`` and the counters of
        holes/resets.
        """
        counters = GridCounters()
        rows: list[Any] = []
        if self.next_step is None:
            return rows, counters
        last_closable = (self.watermark_ms - cfg.lateness_ms) // cfg.period_ms - 1
        if up_to_step is not None:
            last_closable = max(last_closable, up_to_step)
        k = self.next_step
        for present in sorted(s for s in self.open if s <= last_closable):
            self._close_empty(cfg, k, present, rows, counters)
            self._close_one(cfg, present, self.open.pop(present), rows, counters)
            self.empty_run = 0
            k = present + 1
        # Trailing empty steps up to what can be closed.
        if last_closable >= k:
            self._close_empty(cfg, k, last_closable + 1, rows, counters)
            k = last_closable + 1
        self.next_step = k
        return rows, counters

    def _close_empty(self, cfg: GridConfig, k: int, end: int, rows: list[Any], counters: GridCounters) -> None:
        """Close the empty steps ``[k, end)``; a run of more than ``gap_reset_steps`` of them
        (counting those closed by earlier calls) is one gap: nothing is invented across it."""
        n = end - k
        if n <= 0:
            return
        run = self.empty_run + n
        if run > cfg.gap_reset_steps:
            if self.empty_run <= cfg.gap_reset_steps:  # the run crosses the limit here
                counters.gap_resets += 1
                self._forget()
                self.gap_start = k - self.empty_run
            # else the gap was already counted; past the forget, empty steps emit nothing
        else:
            for empty_step in range(k, end):
                self._close_one(cfg, empty_step, None, rows, counters)
        self.empty_run = run

    def _forget(self) -> None:
        self.last_value[:] = np.nan
        self.last_step[:] = -(2**62)
        self.pending_reset = True

    def _close_one(self, cfg: GridConfig, step: int, o: _OpenStep | None, rows: list[Any],
                   counters: GridCounters) -> None:
        n, min_pos = 0, NO_POS
        if o is not None:
            min_pos = o.min_pos
            seen = o.count > 0
            self.last_value[seen] = o.sum[seen] / o.count[seen]
            self.last_step[seen] = step
            n = o.n
        fresh = step - self.last_step <= cfg.carry_forward_steps
        if fresh.all():
            rows.append((step, self.last_value.copy(), self.pending_reset, n, min_pos,
                         NO_GAP if self.gap_start is None else self.gap_start))
            self.pending_reset = False
            self.gap_start = None
            counters.emitted += 1
        else:
            if not np.isnan(self.last_value).all():
                counters.holes += 1
            self.pending_reset = True

    def snapshot(self) -> dict[str, Any]:
        """Plain, JSON-able state (for changelogs and restarts)."""
        return {
            "next_step": self.next_step,
            "watermark_ms": self.watermark_ms,
            "last_value": [None if np.isnan(x) else float(x) for x in self.last_value],
            "last_step": [int(x) for x in self.last_step],
            "pending_reset": self.pending_reset,
            "open": {str(k): [o.sum.tolist(), o.count.tolist(), o.n, o.min_pos] for k, o in self.open.items()},
            "empty_run": self.empty_run,
            "gap_start": self.gap_start,
        }

    @classmethod
    def restore(cls, n_features: int, snap: dict[str, Any]) -> AssetGrid:
        g = cls(n_features)
        g.next_step = snap["next_step"]
        g.watermark_ms = int(snap["watermark_ms"])
        g.last_value = np.array([np.nan if x is None else x for x in snap["last_value"]], dtype=float)
        g.last_step = np.array(snap["last_step"], dtype=np.int64)
        g.pending_reset = bool(snap["pending_reset"])
        g.open = {int(k): _OpenStep(np.array(v[0], float), np.array(v[1], np.int32), int(v[2]), int(v[3]))
                  for k, v in snap["open"].items()}
        g.empty_run = int(snap.get("empty_run", 0))  # absent from snapshots of older versions
        g.gap_start = None if snap.get("gap_start") is None else int(snap["gap_start"])
        return g


@dataclass
class GridResult:
    steps: GridSteps
    late_records: np.ndarray     # record indices rejected as late
    future_records: np.ndarray   # record indices rejected as too far in the future
    counters: GridCounters


class FleetGrid:
    """The grids of all assets; one call per poll places a whole decoded batch."""

    def __init__(self, cfg: GridConfig) -> None:
        self.cfg = cfg
        self.assets: dict[str, AssetGrid] = {}

    def ingest(self, asset: np.ndarray, ts_ms: np.ndarray, feature: np.ndarray, value: np.ndarray,
               record_index: np.ndarray, pos: np.ndarray, now_ms: int | None) -> GridResult:
        """Place long-format readings (one row per value) and close what can be closed.

        ``record_index`` ties values to their source record so rejects are per record;
        ``pos`` is the reading's position in its source (e.g. Kafka offset).
        """
        cfg = self.cfg
        counters = GridCounters()
        future = np.zeros(len(ts_ms), bool) if now_ms is None else ts_ms > now_ms + cfg.max_future_ms
        late = np.zeros(len(ts_ms), bool)
        parts: list[GridSteps] = []
        keep = np.flatnonzero(~future)
        if len(keep):
            codes, names = pd.factorize(asset[keep])
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
            steps_all = ts_ms // cfg.period_ms
            for i, name in enumerate(names):
                idx = keep[order[bounds[i]:bounds[i + 1]]]
                grid = self.assets.get(name)
                if grid is None:
                    grid = self.assets[name] = AssetGrid(cfg.n_features)
                late[idx] = grid.add(cfg, steps_all[idx], feature[idx], value[idx], pos[idx], ts_ms[idx])
                rows, c = grid.close(cfg)
                counters.add(c)
                parts.append(_rows_to_steps(name, rows, cfg.n_features))
        late_records = np.unique(record_index[late])
        future_records = np.unique(record_index[future])
        counters.late += len(late_records)
        counters.future += len(future_records)
        counters.accepted += len(np.unique(record_index[~late & ~future]))
        return GridResult(GridSteps.concat(parts, cfg.n_features), late_records, future_records, counters)

    def flush(self) -> GridResult:
        """Close every open step of every asset (end of a replay)."""
        parts, counters = [], GridCounters()
        for name, grid in self.assets.items():
            if grid.open:
                rows, c = grid.close(self.cfg, up_to_step=max(grid.open))
                counters.add(c)
                parts.append(_rows_to_steps(name, rows, self.cfg.n_features))
        empty = np.empty(0, np.int64)
        return GridResult(GridSteps.concat(parts, self.cfg.n_features), empty, empty, counters)


def _rows_to_steps(name: str, rows: list[Any], n_features: int) -> GridSteps:
    if not rows:
        return GridSteps.empty(n_features)
    return GridSteps(
        np.full(len(rows), name, dtype=object),
        np.fromiter((r[0] for r in rows), np.int64, len(rows)),
        np.stack([r[1] for r in rows]),
        np.fromiter((r[2] for r in rows), bool, len(rows)),
        np.fromiter((r[3] for r in rows), np.int32, len(rows)),
        np.fromiter((r[4] for r in rows), np.int64, len(rows)),
        np.fromiter((r[5] for r in rows), np.int64, len(rows)),
    )
