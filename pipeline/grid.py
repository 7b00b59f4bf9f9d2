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

import math

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.record_runs import distinct_count, factorize_by_record
from pipeline.rowwise import row_all
from pipeline.settings import GridSettings

NO_POS = np.iinfo(np.int64).max
NO_GAP = np.iinfo(np.int64).min  # GridSteps.gap_start of a step that does not follow a gap


def too_far_ahead(ts_ms: np.ndarray, now_ms: int | np.ndarray, max_future_ms: int) -> np.ndarray:
    """Readings stamped more than ``max_future_ms`` after ``now_ms`` (their record's time): the
    ``future`` rejects. One rule for the detector's grid and the archiver, so both keep out the same."""
    return ts_ms > now_ms + max_future_ms


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


@dataclass(slots=True)
class _OpenStep:
    sum: np.ndarray
    count: np.ndarray
    n: int = 0
    min_pos: int = NO_POS
    full: bool = False  # every feature has a reading: the step closes without carried values

    def merge(self, feature: np.ndarray, value: np.ndarray, min_pos: int) -> None:
        """Add readings in arrival order (the same float additions, in the same order, however
        the readings were polled)."""
        np.add.at(self.sum, feature, value)
        np.add.at(self.count, feature, 1)
        self.n += len(feature)
        self.min_pos = min(self.min_pos, min_pos)
        self.full = bool(self.count.all())


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
            o.merge(f[sel], v[sel], int(p[sel].min()))
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

    def quiet_until(self, cfg: GridConfig, k: int, end: int) -> bool:
        """Whether closing the empty steps ``[k, end)`` emits nothing and counts nothing, and so
        only leaves a reset pending: no value was seen since the asset began or was last reset
        (nothing to carry, no hole to count) and the run stays within a gap. An asset's first
        steps, before its first reading, close that way."""
        return end <= k or (self.empty_run + end - k <= cfg.gap_reset_steps and bool(np.isnan(self.last_value).all()))

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
            "last_value": _floats(self.last_value),  # NaN: never seen; an average that overflowed: inf
            "last_step": self.last_step.tolist(),
            "pending_reset": self.pending_reset,
            "open": {str(k): [_floats(o.sum), o.count.tolist(), o.n, o.min_pos] for k, o in self.open.items()},
            "empty_run": self.empty_run,
            "gap_start": self.gap_start,
        }

    @classmethod
    def restore(cls, n_features: int, snap: dict[str, Any]) -> AssetGrid:
        g = cls(n_features)
        g.next_step = snap["next_step"]
        g.watermark_ms = int(snap["watermark_ms"])
        # None: NaN, as older versions wrote it; "inf" and "nan" by name, as _floats writes them
        g.last_value = np.array([np.nan if x is None else x for x in snap["last_value"]], dtype=float)
        g.last_step = np.array(snap["last_step"], dtype=np.int64)
        g.pending_reset = bool(snap["pending_reset"])
        g.open = {}
        for k, v in snap["open"].items():
            count = np.array(v[1], np.int32)
            g.open[int(k)] = _OpenStep(np.array(v[0], float), count, int(v[2]), int(v[3]), bool(count.all()))
        g.empty_run = int(snap.get("empty_run", 0))  # absent from snapshots of older versions
        g.gap_start = None if snap.get("gap_start") is None else int(snap["gap_start"])
        return g


def _floats(x: np.ndarray) -> list[float | str]:
    """Floats for a JSON snapshot; a non-finite one (a sum of huge readings can overflow) as its
    name, which JSON encoders do not turn into ``null`` and ``np.array(..., float)`` reads back."""
    out = x.tolist()
    if np.isfinite(x).all():
        return out
    return [v if math.isfinite(v) else repr(v) for v in out]


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
               record_index: np.ndarray, pos: np.ndarray, now_ms: int | np.ndarray | None) -> GridResult:
        """Place long-format readings (one row per value) and close what can be closed.

        ``record_index`` ties values to their source record (whose values all carry its asset) so
        rejects are per record;
        ``pos`` is the reading's position in its source (e.g. Kafka offset);
        ``now_ms`` the time a reading may be stamped at most ``max_future_ms`` ahead of (one for
        all or one per value; None: no bound).
        """
        cfg = self.cfg
        counters = GridCounters()
        future = np.zeros(len(ts_ms), bool) if now_ms is None else too_far_ahead(ts_ms, now_ms, cfg.max_future_ms)
        late = np.zeros(len(ts_ms), bool)
        steps = GridSteps.empty(cfg.n_features)
        keep = np.flatnonzero(~future)
        if len(keep):
            steps = self._place_and_close(asset, ts_ms, feature, value, pos, record_index, keep, late, counters)
        late_records = np.unique(record_index[late]) if late.any() else np.empty(0, record_index.dtype)
        future_records = np.unique(record_index[future]) if future.any() else np.empty(0, record_index.dtype)
        counters.late += len(late_records)
        counters.future += len(future_records)
        refused = late | future
        counters.accepted += distinct_count(record_index, ~refused if refused.any() else None)
        return GridResult(steps, late_records, future_records, counters)

    def _place_and_close(self, asset: np.ndarray, ts_ms: np.ndarray, feature: np.ndarray, value: np.ndarray,
                         pos: np.ndarray, record_index: np.ndarray, keep: np.ndarray, late: np.ndarray,
                         counters: GridCounters) -> GridSteps:
        """Vectorised over the poll's readings: lateness (each reading against its asset's watermark
        as it stood at the reading's arrival), aggregation per (asset, step), watermarks; then each
        asset in the poll closes what its watermark passed. Assets whose closable steps are all
        present with every feature take the vectorised path (those whose steps this poll completes
        close straight from its arrays); the rest (holes, gaps, carried values, first steps) go
        through :meth:`AssetGrid.close`, with identical results.
        Cost follows the readings of the poll, not the number of assets held. Sets ``late``."""
        cfg = self.cfg
        p, lateness, nf = cfg.period_ms, cfg.lateness_ms, cfg.n_features
        codes, names, _ = factorize_by_record(asset[keep], record_index[keep])
        order = np.argsort(codes, kind="stable")
        idx = keep[order]  # value rows grouped by asset, arrival order within an asset
        code = codes[order]
        n_assets = len(names)
        starts = np.searchsorted(code, np.arange(n_assets))
        names_l = names.tolist()
        grids: list[AssetGrid] = []
        for name in names_l:
            g = self.assets.get(name)
            if g is None:
                g = self.assets[name] = AssetGrid(nf)
            grids.append(g)
        wm = np.fromiter((g.watermark_ms for g in grids), np.int64, n_assets)
        ns = np.fromiter((_NONE if g.next_step is None else g.next_step for g in grids), np.int64, n_assets)

        ts = ts_ms[idx]
        step = ts // p
        before = _exclusive_group_max(ts, code, starts, n_assets)
        np.maximum(before, wm[code], out=before)
        late_s = ((step + 1) * p + lateness <= before) | (step < ns[code])
        late[idx] = late_s
        ok = ~late_s
        any_ok = np.logical_or.reduceat(ok, starts)
        if any_ok.any():
            first_step = np.minimum.reduceat(np.where(ok, step, _MAX), starts)
            first_ts = np.minimum.reduceat(np.where(ok, ts, _MAX), starts)
            last_ts = np.maximum.reduceat(np.where(ok, ts, _NONE), starts)
            # Leave room for an asset's first readings' stragglers (within the lateness bound).
            init = np.minimum(first_step, (first_ts - lateness) // p)
            for i in np.flatnonzero(any_ok).tolist():
                g = grids[i]
                if g.next_step is None:
                    g.next_step = int(init[i])
                g.watermark_ms = max(g.watermark_ms, int(last_ts[i]))
            # The loop's results as arrays: each asset's last closable step and next step to close.
            last = (np.where(any_ok, np.maximum(wm, last_ts), wm) - lateness) // p - 1
            nxt = np.where((ns == _NONE) & any_ok, init, ns)
            direct = self._accumulate(grids, np.flatnonzero(ok), code, step, feature[idx], value[idx], pos[idx],
                                      last, nxt)
            if direct is not None:
                counters.emitted += len(direct[2])
                rest, rest_codes = self._close_all(names_l, grids, counters, skip=direct[0])
                return _merge_by_asset(names, direct[1], direct[2], rest, rest_codes)
        return self._close_all(names_l, grids, counters)[0]

    def _accumulate(self, grids: list[AssetGrid], ok: np.ndarray, code: np.ndarray, step: np.ndarray,
                    feature: np.ndarray, value: np.ndarray, pos: np.ndarray, last: np.ndarray, nxt: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, GridSteps] | None:
        """Sum the accepted readings per (asset, step, feature) in one pass, in arrival order, and
        put each group on its asset's open step, except where the asset closes it in this call.

        An asset whose closable steps (its watermark now passes them) are exactly its next steps,
        each with every feature, none of them continuing a step begun in an earlier poll, closes
        them here from the poll's arrays, without an open step each (the common case of a live
        feed). ``last`` and ``nxt``: per asset, the last step its watermark closes and its next step
        to close. Returns (bool per asset: closed here, asset code per step, the steps) or None."""
        nf = self.cfg.n_features
        oc, os_ = code[ok], step[ok]  # codes ascend; steps mostly ascend within an asset already
        if ((oc[1:] != oc[:-1]) | (os_[1:] >= os_[:-1])).all():
            r = ok  # already in (asset, step) order: the stable sort below would leave it as it is
        else:
            r = ok[np.lexsort((os_, oc))]  # stable: arrival order inside a group
        gc, gs = code[r], step[r]
        new = np.ones(len(r), bool)
        new[1:] = (gc[1:] != gc[:-1]) | (gs[1:] != gs[:-1])
        gstart = np.flatnonzero(new)
        n_groups = len(gstart)
        gid = np.cumsum(new) - 1
        f, v = feature[r].astype(np.int64), value[r]
        # bincount adds each bin's weights in input order from 0.0: the same sums as np.add.at.
        sums = np.bincount(gid * nf + f, weights=v, minlength=n_groups * nf).reshape(n_groups, nf)
        counts = np.bincount(gid * nf + f, minlength=n_groups * nf).astype(np.int32).reshape(n_groups, nf)
        gend = np.append(gstart[1:], len(r))
        n_arr = gend - gstart
        pos_arr = np.minimum.reduceat(pos[r], gstart)
        full_arr = row_all(counts > 0)
        g_code, g_step = gc[gstart], gs[gstart]
        closed, emit = self._closes_here(grids, g_code, g_step, full_arr, last, nxt)
        keep = np.flatnonzero(~emit)
        n_values, min_pos, full = n_arr[keep].tolist(), pos_arr[keep].tolist(), full_arr[keep].tolist()
        once = row_all(counts[keep] <= 1).tolist()
        continued: list[tuple[int, _OpenStep, int, int]] = []
        for j, (i, c, k, a, b) in enumerate(zip(keep.tolist(), g_code[keep].tolist(), g_step[keep].tolist(),
                                                gstart[keep].tolist(), gend[keep].tolist())):
            opened = grids[c].open
            o = opened.get(k)
            if o is None:
                opened[k] = _OpenStep(sums[i], counts[i], n_values[j], min_pos[j], full[j])
            elif once[j]:  # a step begun in an earlier poll, each feature read at most once here
                continued.append((i, o, n_values[j], min_pos[j]))
            else:  # several readings of a feature: continue its sums reading by reading
                o.merge(f[a:b], v[a:b], min_pos[j])
        if continued:
            _continue_steps(continued, sums, counts)
        if not closed.any():
            return None
        return closed, *self._emit_closed(grids, closed, last, np.flatnonzero(emit), g_code, g_step, sums, counts,
                                          n_arr, pos_arr)

    def _closes_here(self, grids: list[AssetGrid], g_code: np.ndarray, g_step: np.ndarray, full: np.ndarray,
                     last: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which assets close their closable steps straight from this poll's groups (see
        :meth:`_accumulate`), and which groups they emit. The closable steps run without a hole
        from the first of them to ``last``; empty steps before it are allowed where closing them
        only leaves a reset pending (:meth:`AssetGrid.quiet_until`: an asset's first poll)."""
        n_assets = len(grids)
        closable = g_step <= last[g_code]
        new_closable = np.bincount(g_code, weights=closable, minlength=n_assets)
        new_partial = np.bincount(g_code, weights=closable & ~full, minlength=n_assets)
        has_groups = np.bincount(g_code, minlength=n_assets) > 0
        # Only where this poll completes a closable step: an asset that closes nothing but steps of
        # earlier polls (one reading a poll) is as cheap on the per-asset path.
        candidate = has_groups & (nxt != _NONE) & (last >= nxt) & (new_partial == 0) & (new_closable > 0)
        bounds = np.searchsorted(g_code, np.arange(n_assets + 1))
        first_new = g_step[np.minimum(bounds[:-1], len(g_step) - 1)].tolist()  # groups are sorted by step
        steps_l = g_step.tolist()
        for c in np.flatnonzero(candidate).tolist():
            opened = grids[c].open
            prior, first, lc = 0, first_new[c], int(last[c])
            if opened:
                new_steps = steps_l[bounds[c]:bounds[c + 1]]
                if any(k in opened for k in new_steps):
                    candidate[c] = False  # a step continued from an earlier poll: the per-step path
                    continue
                for k, o in opened.items():
                    if k <= lc:
                        if not o.full:
                            candidate[c] = False
                            break
                        prior += 1
                        first = min(first, k)
                if not candidate[c]:
                    continue
            k0 = int(nxt[c])
            candidate[c] = (new_closable[c] + prior == lc - first + 1 and first >= k0
                            and grids[c].quiet_until(self.cfg, k0, first))
        return candidate, candidate[g_code] & closable

    def _emit_closed(self, grids: list[AssetGrid], closed: np.ndarray, last: np.ndarray, emit: np.ndarray,
                     g_code: np.ndarray, g_step: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                     n_arr: np.ndarray, pos_arr: np.ndarray) -> tuple[np.ndarray, GridSteps]:
        """Close the steps of the assets in ``closed``: the groups ``emit`` of this poll and the
        open steps of earlier polls up to the asset's ``last`` closable step; update those assets' grid state as
        :meth:`AssetGrid.close` would."""
        nf = self.cfg.n_features
        # Open steps of earlier polls that the watermark passed: one row each.
        p_code: list[int] = []
        p_step: list[int] = []
        p_sum: list[np.ndarray] = []
        p_count: list[np.ndarray] = []
        p_n: list[int] = []
        p_pos: list[int] = []
        for c in np.flatnonzero(closed).tolist():
            g = grids[c]
            if not g.open:
                continue
            lc = int(last[c])
            for k in [k for k in g.open if k <= lc]:
                o = g.open.pop(k)
                p_code.append(c)
                p_step.append(k)
                p_sum.append(o.sum)
                p_count.append(o.count)
                p_n.append(o.n)
                p_pos.append(o.min_pos)
        code = np.concatenate([g_code[emit], np.array(p_code, np.int64)])
        step = np.concatenate([g_step[emit], np.array(p_step, np.int64)])
        values = sums[emit] / counts[emit]
        if p_code:
            earlier = np.concatenate(p_sum).reshape(-1, nf) / np.concatenate(p_count).reshape(-1, nf)
            values = np.vstack([values, earlier])
        ns = np.concatenate([n_arr[emit], np.array(p_n, np.int64)])
        ps = np.concatenate([pos_arr[emit], np.array(p_pos, np.int64)])
        order = np.lexsort((step, code))
        code, step, values = code[order], step[order], values[order]
        n = len(step)
        first = np.flatnonzero(np.append(True, code[1:] != code[:-1]))
        last_row = np.append(first[1:], n) - 1
        reset = np.zeros(n, bool)
        gap = np.full(n, NO_GAP, np.int64)
        for c, i, j in zip(code[first].tolist(), first.tolist(), last_row.tolist()):
            g = grids[c]
            reset[i] = g.pending_reset or int(step[i]) > g.next_step  # after quiet empty steps
            if g.gap_start is not None:
                gap[i] = g.gap_start
            g.pending_reset = False
            g.gap_start = None
            g.empty_run = 0
            g.next_step = int(step[j]) + 1
            g.last_step.fill(step[j])  # (fill: a third of a slice assignment's cost, per asset)
            g.last_value[:] = values[j]
        names = np.empty(n, dtype=object)
        return code, GridSteps(names, step, values, reset, ns[order].astype(np.int32), ps[order].astype(np.int64), gap)

    def _close_all(self, names: list[str], grids: list[AssetGrid], counters: GridCounters,
                   skip: np.ndarray | None = None) -> tuple[GridSteps, np.ndarray]:
        """Close what each asset's watermark passed (assets in ``skip`` closed theirs already);
        returns the steps and the position in ``names`` of each step's asset."""
        cfg = self.cfg
        nf = cfg.n_features
        lateness, period = cfg.lateness_ms, cfg.period_ms
        skipped = skip.tolist() if skip is not None else None
        # One tuple a step: (asset, code, step, sum, count, reset, n, min_pos, gap)
        out: list[tuple[str, int, int, np.ndarray, np.ndarray, bool, int, int, int]] = []
        finish: list[tuple[AssetGrid, int]] = []  # fast-closed grids and the row of their last step
        ones = np.ones(nf, np.int32)
        for ci, (name, g) in enumerate(zip(names, grids)):
            k = g.next_step
            if k is None or (skipped is not None and skipped[ci]):
                continue
            last = (g.watermark_ms - lateness) // period - 1
            opened = g.open
            if last == k and k in opened and opened[k].full and min(opened) == k:
                first = k  # a live feed's case: its oldest open step, complete, is the one to close
            else:
                closable = [s for s in opened if s <= last]
                if not closable and last < k:
                    continue  # the watermark closes nothing new
                first = min(closable, default=k)
                if not (closable and len(closable) == last - first + 1 and first >= k
                        and g.quiet_until(cfg, k, first) and all(opened[s].full for s in closable)):
                    rows, c = g.close(cfg)
                    counters.add(c)
                    out += [(name, ci, r[0], r[1], ones, r[2], r[3], r[4], r[5]) for r in rows]
                    continue
            # Every closable step present with every feature: no carried values.
            g.pending_reset = g.pending_reset or first > k  # (quiet empty steps before the first)
            for s in range(first, last + 1):
                o = opened.pop(s)
                out.append((name, ci, s, o.sum, o.count, g.pending_reset, o.n, o.min_pos,
                            NO_GAP if g.gap_start is None else g.gap_start))
                g.pending_reset = False
                g.gap_start = None
            counters.emitted += last - first + 1
            g.empty_run = 0
            g.next_step = last + 1
            g.last_step.fill(last)
            finish.append((g, len(out) - 1))
        if not out:
            return GridSteps.empty(nf), np.empty(0, np.int64)
        asset_t, code_t, step_t, sum_t, count_t, reset_t, n_t, pos_t, gap_t = zip(*out)
        # One concatenation of the flat rows (np.stack of thousands of small rows took 3-4 times as long).
        values = np.concatenate(sum_t).reshape(-1, nf) / np.concatenate(count_t).reshape(-1, nf)
        for g, j in finish:
            g.last_value[:] = values[j]
        assets = np.empty(len(out), dtype=object)
        assets[:] = asset_t
        return GridSteps(assets, np.array(step_t, np.int64), values, np.array(reset_t, bool),
                         np.array(n_t, np.int32), np.array(pos_t, np.int64), np.array(gap_t, np.int64)), \
            np.array(code_t, np.int64)

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


def _continue_steps(continued: list[tuple[int, _OpenStep, int, int]], sums: np.ndarray, counts: np.ndarray) -> None:
    """Add this poll's groups (row ``i`` of ``sums``/``counts``, each feature read at most once) to
    the open steps of earlier polls they continue: the same float additions as reading by reading.
    A group's sum of a feature is ``0.0 + v``, which is ``v`` itself except for ``v = -0.0``; an open
    step's sum starts at +0.0 and so is never -0.0, and adding +0.0 or -0.0 to it gives the same.
    """
    rows = np.fromiter((c[0] for c in continued), np.int64, len(continued))
    now = np.stack([c[1].count for c in continued]) + counts[rows]
    full = row_all(now > 0).tolist()
    for (i, o, n, min_pos), count, is_full in zip(continued, now, full):
        o.sum += sums[i]
        o.count = count
        o.n += n
        o.min_pos = min(o.min_pos, min_pos)
        o.full = is_full


_NONE = np.iinfo(np.int64).min
_MAX = np.iinfo(np.int64).max


def _exclusive_group_max(ts: np.ndarray, code: np.ndarray, starts: np.ndarray, n_groups: int) -> np.ndarray:
    """For values grouped by ``code`` (ascending): the largest earlier value of the same group,
    ``_NONE`` for a group's first value. One running maximum over the whole array, each group
    lifted above the previous ones so a maximum never crosses a group boundary."""
    out = np.empty(len(ts), np.int64)
    if len(ts) == 0:
        return out
    lo, hi = int(ts.min()), int(ts.max())
    span = hi - lo + 1
    if n_groups * span < 2**62:
        lift = code.astype(np.int64) * span
        running = np.maximum.accumulate(ts - lo + lift) - lift + lo
    else:  # timestamps too far apart to lift: grouped running maximum
        running = pd.Series(ts).groupby(code).cummax().to_numpy()
    out[1:] = running[:-1]
    out[starts] = _NONE
    return out


def _merge_by_asset(names: Any, code: np.ndarray, steps: GridSteps, rest: GridSteps, rest_code: np.ndarray
                    ) -> GridSteps:
    """The steps closed from the poll's arrays and those closed per asset, in the order of the
    poll's assets (each asset's steps come from one of the two, already in step order)."""
    steps.asset[:] = np.asarray(names, dtype=object)[code]
    if not len(rest):
        return steps
    both = GridSteps.concat([steps, rest], steps.values.shape[1])
    return both.take(np.argsort(np.concatenate([code, rest_code]), kind="stable"))


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
