"""All per-asset state of a detector, in one place, with a snapshot/restore pair.

Numeric state lives in row-per-asset arrays so a poll touches all its assets with
vectorised operations: the LSTM ``(h, c)`` per layer, the last next-step prediction,
steps since the last reset, the per-feature score terms and the online threshold statistics, and
the alert state machine, and a ring of the asset's last ``history`` grid values — enough to
re-warm a fresh LSTM state for a new model. The event-time grid of each asset sits beside
them. :meth:`FleetState.snapshot` encodes assets' whole state as compact bytes (a JSON
header plus the rows' raw arrays, written to the changelog every checkpoint);
:meth:`FleetState.restore` puts one back, so any detector (after a crash, a restart or a
rebalance) continues that asset exactly where it was.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import fast_json
from pipeline.bundle import asset_rows
from pipeline.grid import AssetGrid, FleetGrid, GridConfig

SNAPSHOT_MAGIC = b"PWS1"

PRIOR_LEVEL = 1.0  # normal level of a normalised squared error: where the term EWMAs start

# Names of the per-asset float/int/bool columns (besides the LSTM states and vectors).
_SCALARS: dict[str, type] = {
    "has_pred": bool,      # last_pred holds a prediction for the asset's next step
    "last_step": np.int64,  # last scored grid step
    "since_reset": np.int64,
    "adapt_mean": np.float64,  # online normal level of the combined score
    "adapt_var": np.float64,
    "above": np.int64,     # consecutive steps above the threshold
    "below": np.int64,     # consecutive steps below the closing level while an alert is open
    "alert_open": bool,
    "alert_start": np.int64,  # first step of the open alert
    "alert_peak": np.float64,
    "alert_peak_sent": np.float64,  # peak reported in the last event
    "alert_last_event": np.int64,  # step of the last event of the open alert
    "alert_steps": np.int64,
    "run_start": np.int64,  # first step of the current run above the threshold
    "recent_head": np.int64,  # next slot of the recent-steps ring
    "recent_n": np.int64,   # valid steps in the ring (since the last reset, at most `history`)
}
_VECTORS: dict[str, type] = {"forecast_ewma": np.float64, "novelty_ewma": np.float64, "prev_value": np.float64,
                             "flat_run": np.int64}
# Cold start of an asset the model was not fitted on (pipeline.cold_start). Snapshots carry
# these after the blocks above, so a snapshot written before they existed still restores.
_COLD_SCALARS: dict[str, type] = {
    "cold_start": np.int64,  # 0 = not yet decided, 1 = the model knows the asset, 2 = learning its own scaling
    "cold_steps": np.int64,  # steps since the asset's cold start began
}
_COLD_VECTORS: dict[str, type] = {
    "own_count": np.int64,   # finite readings per feature while the scaling is learned
    "own_sum": np.float64,
    "own_sq": np.float64,
    "own_mean": np.float64,  # the learned scaling, NaN until the first third of the cold start
    "own_scale": np.float64,
    "cold_fc_max": np.float64,  # largest smoothed forecast / novelty term per feature while the levels are learned
    "cold_nv_max": np.float64,
    "cold_flat_max": np.int64,   # longest unchanged run per feature while the levels are learned
    "own_fc_level": np.float64,  # the learned term levels, NaN until learned
    "own_nv_level": np.float64,
    "own_flat_limit": np.float64,
}


class FleetState:
    """Rows of per-asset state, grown on demand."""

    def __init__(self, grid_cfg: GridConfig, units: Sequence[int], n_features: int, history: int = 1,
                 capacity: int = 64) -> None:
        self.grid = FleetGrid(grid_cfg)
        self.units = tuple(units)
        self.n_features = n_features
        self.history = max(1, history)
        self.index: dict[str, int] = {}
        self.names: list[str | None] = []
        self._free: list[int] = []
        self._cap = 0
        self.recent_values = np.empty((0, self.history, n_features), np.float32)
        self.lstm: list[np.ndarray] = [np.empty((0, u), np.float32) for u in self.units for _ in range(2)]
        self.last_pred = np.empty((0, n_features), np.float32)
        self.alert_contrib = np.empty((0, n_features))  # summed feature contributions of the open alert
        # Per-feature score state: EWMA of squared forecast errors and of squared novelty
        # residuals, the previous raw values and how long each has stayed unchanged.
        self.vectors: dict[str, np.ndarray] = {name: np.empty((0, n_features), dt)
                                               for name, dt in {**_VECTORS, **_COLD_VECTORS}.items()}
        # Model version an open alert was opened under: its id and events keep it across a swap.
        self.alert_version: dict[int, str] = {}
        self.cols: dict[str, np.ndarray] = {name: np.empty(0, t) for name, t in {**_SCALARS, **_COLD_SCALARS}.items()}
        # Bumped whenever a row's ring restarts or is replaced (reset, restore): lets a warm
        # start computed off the main thread tell whether it still continues the row's ring.
        # Not part of snapshots.
        self.epoch = np.empty(0, np.int64)
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self.index)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self._cap
        self.lstm = [np.vstack([a, np.zeros((extra, a.shape[1]), np.float32)]) for a in self.lstm]
        self.last_pred = np.vstack([self.last_pred, np.zeros((extra, self.n_features), np.float32)])
        self.alert_contrib = np.vstack([self.alert_contrib, np.zeros((extra, self.n_features))])
        self.recent_values = np.concatenate(
            [self.recent_values, np.zeros((extra, self.history, self.n_features), np.float32)])
        for name, arr in self.vectors.items():
            self.vectors[name] = np.vstack([arr, np.zeros((extra, self.n_features), arr.dtype)])
        for name, col in self.cols.items():
            self.cols[name] = np.concatenate([col, np.zeros(extra, col.dtype)])
        self.epoch = np.concatenate([self.epoch, np.zeros(extra, np.int64)])
        self._cap = capacity
        self._init_rows(np.arange(capacity - extra, capacity))

    def _init_rows(self, rows: np.ndarray) -> None:
        for a in self.lstm:
            a[rows] = 0.0
        self.last_pred[rows] = 0.0
        self.alert_contrib[rows] = 0.0
        self.recent_values[rows] = 0.0
        for name, arr in self.vectors.items():
            arr[rows] = np.nan if arr.dtype == np.float64 else 0
        self.vectors["forecast_ewma"][rows] = PRIOR_LEVEL
        self.vectors["novelty_ewma"][rows] = PRIOR_LEVEL
        for name, col in self.cols.items():
            col[rows] = np.nan if col.dtype == np.float64 else 0
        self.cols["adapt_var"][rows] = np.nan
        for name in ("own_sum", "own_sq", "cold_fc_max", "cold_nv_max"):
            self.vectors[name][rows] = 0.0
        self.epoch[rows] += 1

    def rows(self, assets: np.ndarray) -> np.ndarray:
        """Row of each asset, creating rows for assets seen for the first time."""
        known = asset_rows(self.index, assets)
        if (known >= 0).all():  # the steady state: every asset has a row (one C-level pass)
            return known
        out = np.empty(len(assets), np.int64)
        for i, name in enumerate(assets):
            r = self.index.get(name)
            if r is None:
                if self._free:
                    r = self._free.pop()
                    self.names[r] = name
                else:
                    r = len(self.names)
                    if r >= self._cap:
                        self._grow(max(2 * self._cap, 64))
                    self.names.append(name)
                self.index[name] = r
            out[i] = r
        return out

    def drop(self, assets: Sequence[str]) -> None:
        """Forget assets (e.g. their partition moved to another detector); rows are reused."""
        for name in assets:
            self.grid.assets.pop(name, None)
            r = self.index.pop(name, None)
            if r is not None:
                self.names[r] = None
                self.alert_version.pop(r, None)
                self._init_rows(np.array([r]))
                self._free.append(r)

    def remember(self, rows: np.ndarray, values: np.ndarray, reset: np.ndarray, rank: np.ndarray) -> None:
        """Append scored steps to each asset's ring (``rank`` = position within the asset in this call)."""
        if len(rows) == 0:
            return
        h = self.history
        head, count = self.cols["recent_head"], self.cols["recent_n"]
        if not rank.any():  # one step per asset (the streaming case): the rows are distinct
            slot = head[rows]
            self.recent_values[rows, slot] = values
            head[rows] = (slot + 1) % h
            if reset.any():
                self.epoch[rows[reset]] += 1
                count[rows] = np.where(reset, 1, np.minimum(h, count[rows] + 1))
            else:
                count[rows] = np.minimum(h, count[rows] + 1)
            return
        uniq, inv, n_new = np.unique(rows, return_inverse=True, return_counts=True)
        keep = rank >= n_new[inv] - h  # only the last `history` steps can survive in the ring
        slot = (head[rows] + rank) % h
        self.recent_values[rows[keep], slot[keep]] = values[keep]
        head[uniq] = (head[uniq] + n_new) % h
        # A reset starts a new run: steps before it are not continuous with the ones after.
        last_reset = np.full(len(uniq), -1)
        np.maximum.at(last_reset, inv, np.where(reset, rank, -1))
        self.epoch[uniq[last_reset >= 0]] += 1
        count[uniq] = np.minimum(h, np.where(last_reset >= 0, n_new - last_reset, count[uniq] + n_new))

    def recent(self, row: int) -> np.ndarray:
        """The asset's remembered grid values since its last reset, oldest first."""
        n = int(self.cols["recent_n"][row])
        head = int(self.cols["recent_head"][row])
        slots = (head - n + np.arange(n)) % self.history
        return self.recent_values[row, slots]

    def recent_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Remembered steps of many assets, oldest first, left-aligned: values (R, H, F) and a mask (R, H)."""
        h = self.history
        n = self.cols["recent_n"][rows]
        head = self.cols["recent_head"][rows]
        offsets = np.arange(h)
        slots = (head[:, None] - n[:, None] + offsets[None, :]) % h
        values = self.recent_values[rows[:, None], slots]
        return values, offsets[None, :] < n[:, None]

    def reset_model_state(self, rows: np.ndarray) -> None:
        """Forget LSTM state and prediction (after a gap, or for a new model)."""
        for a in self.lstm:
            a[rows] = 0.0
        self.cols["has_pred"][rows] = False
        self.cols["since_reset"][rows] = 0
        self.epoch[rows] += 1

    def _blocks(self) -> list[np.ndarray]:
        """The per-row arrays a snapshot carries, in their fixed order (the cold-start ones last)."""
        return [*self.lstm, self.last_pred, self.alert_contrib, *(self.vectors[n] for n in _VECTORS),
                self.recent_values, *(self.cols[n] for n in _SCALARS), *self._cold_blocks()]

    def _cold_blocks(self) -> list[np.ndarray]:
        return [*(self.cols[n] for n in _COLD_SCALARS), *(self.vectors[n] for n in _COLD_VECTORS)]

    def snapshot(self, assets: Sequence[str], meta: dict[str, Any] | None = None) -> list[bytes]:
        """The whole state of each asset as bytes: ``PWS1``, a JSON header (asset, grid, open
        alert's model version, layout, ``meta``) and the asset's row of every array, raw.

        Encoded for many assets at once, so a checkpoint of a large fleet stays cheap.
        """
        if not assets:
            return []
        rows = self.rows(np.array(assets, dtype=object))  # an asset may have readings but no scored step yet
        raw = np.concatenate([np.ascontiguousarray(b[rows]).reshape(len(rows), -1).view(np.uint8)
                              for b in self._blocks()], axis=1)
        layout = {"units": list(self.units), "features": self.n_features, "history": self.history}
        out = []
        for i, (a, r) in enumerate(zip(assets, rows.tolist())):
            grid = self.grid.assets.get(a)
            head = fast_json.dumps({"asset": a, "grid": grid.snapshot() if grid is not None else None,
                                    "alert_version": self.alert_version.get(r), "layout": layout, **(meta or {})})
            out.append(SNAPSHOT_MAGIC + struct.pack(">I", len(head)) + head + raw[i].tobytes())
        return out

    def restore(self, blob: bytes) -> dict[str, Any]:
        """Put one asset's snapshot back (creating its row); returns the snapshot's header.

        Raises ``ValueError`` for bytes that are not a snapshot of this state's layout, so a
        changelog written by another model shape is refused rather than misread.
        """
        head = read_snapshot_header(blob)
        layout = {"units": list(self.units), "features": self.n_features, "history": self.history}
        if head.get("layout") != layout:
            raise ValueError(f"snapshot layout {head.get('layout')} differs from this state's {layout}")
        start = 8 + struct.unpack(">I", blob[4:8])[0]
        blocks = self._blocks()
        cold = len(blocks) - len(self._cold_blocks())
        widths = [b.dtype.itemsize * int(np.prod(b.shape[1:])) for b in blocks]
        # Checked before anything is written: a refused snapshot leaves no row behind, so the asset
        # really starts afresh (written before cold start existed, it lacks the cold-start blocks).
        if len(blob) - start not in (sum(widths), sum(widths[:cold])):
            raise ValueError(f"snapshot of {head['asset']!r} holds {len(blob) - start} bytes of state, "
                             f"not {sum(widths)}")
        try:
            grid = None if head.get("grid") is None else AssetGrid.restore(self.n_features, head["grid"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"snapshot of {head['asset']!r} holds an unreadable grid: {exc!r}") from None
        (r,) = self.rows(np.array([head["asset"]], dtype=object))
        blocks = self._blocks()  # (a new row may have grown them into new arrays)
        for i, b in enumerate(blocks):
            if i == cold and start == len(blob):  # written before cold start existed: decided afresh
                for c in blocks[cold:]:
                    c[r] = 0
                for name in ("own_mean", "own_scale", "own_fc_level", "own_nv_level", "own_flat_limit"):
                    self.vectors[name][r] = np.nan
                break
            b[r] = np.frombuffer(blob, dtype=b.dtype, count=b[r].size, offset=start).reshape(b[r].shape)
            start += widths[i]
        self.epoch[r] += 1
        if grid is not None:
            self.grid.assets[head["asset"]] = grid
        else:
            self.grid.assets.pop(head["asset"], None)
        if head.get("alert_version"):
            self.alert_version[r] = head["alert_version"]
        else:
            self.alert_version.pop(r, None)
        return head


def read_snapshot_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a snapshot (``ValueError`` if the bytes are not one)."""
    if len(blob) < 8 or blob[:4] != SNAPSHOT_MAGIC:
        raise ValueError("not a plantwatch state snapshot")
    n = struct.unpack(">I", blob[4:8])[0]
    try:
        head = fast_json.loads(blob[8:8 + n])
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"snapshot header is not JSON: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("asset"), str):
        raise ValueError("snapshot header without an asset")
    return head
