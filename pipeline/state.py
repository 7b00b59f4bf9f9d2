"""All per-asset state of a detector, in one place, with a snapshot/restore pair.

Numeric state lives in row-per-asset arrays so a poll touches all its assets with
vectorised operations: the LSTM ``(h, c)`` per layer, the last next-step prediction,
steps since the last reset, the smoothed score and the online threshold statistics, and
the alert state machine. The event-time grid of each asset sits beside them. A snapshot
of one asset is plain JSON-able data; restoring it into any detector (after a restart or
a rebalance) continues that asset exactly where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.grid import AssetGrid, FleetGrid, GridConfig

# Names of the per-asset float/int/bool columns (besides the LSTM states and vectors).
_SCALARS: dict[str, type] = {
    "has_pred": bool,      # last_pred holds a prediction for the asset's next step
    "last_step": np.int64,  # last scored grid step
    "since_reset": np.int64,
    "smoothed": np.float64,  # EWMA of the step score (NaN until the first score)
    "adapt_mean": np.float64,  # online normal level of the smoothed score
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
}


class FleetState:
    """Rows of per-asset state, grown on demand."""

    def __init__(self, grid_cfg: GridConfig, units: Sequence[int], n_features: int, capacity: int = 64) -> None:
        self.grid = FleetGrid(grid_cfg)
        self.units = tuple(units)
        self.n_features = n_features
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self._cap = 0
        self.lstm: list[np.ndarray] = [np.empty((0, u), np.float32) for u in self.units for _ in range(2)]
        self.last_pred = np.empty((0, n_features), np.float32)
        self.alert_contrib = np.empty((0, n_features))  # summed feature contributions of the open alert
        self.cols: dict[str, np.ndarray] = {name: np.empty(0, t) for name, t in _SCALARS.items()}
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self.names)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self._cap
        self.lstm = [np.vstack([a, np.zeros((extra, a.shape[1]), np.float32)]) for a in self.lstm]
        self.last_pred = np.vstack([self.last_pred, np.zeros((extra, self.n_features), np.float32)])
        self.alert_contrib = np.vstack([self.alert_contrib, np.zeros((extra, self.n_features))])
        for name, col in self.cols.items():
            self.cols[name] = np.concatenate([col, np.zeros(extra, col.dtype)])
        self._cap = capacity
        self._init_rows(np.arange(capacity - extra, capacity))

    def _init_rows(self, rows: np.ndarray) -> None:
        for a in self.lstm:
            a[rows] = 0.0
        self.last_pred[rows] = 0.0
        self.alert_contrib[rows] = 0.0
        for name, col in self.cols.items():
            col[rows] = np.nan if col.dtype == np.float64 else 0
        self.cols["adapt_var"][rows] = np.nan

    def rows(self, assets: np.ndarray) -> np.ndarray:
        """Row of each asset, creating rows for assets seen for the first time."""
        out = np.empty(len(assets), np.int64)
        for i, name in enumerate(assets):
            r = self.index.get(name)
            if r is None:
                r = len(self.names)
                if r >= self._cap:
                    self._grow(max(2 * self._cap, 64))
                self.index[name] = r
                self.names.append(name)
            out[i] = r
        return out

    def reset_model_state(self, rows: np.ndarray) -> None:
        """Forget LSTM state and prediction (after a gap, or for a new model)."""
        for a in self.lstm:
            a[rows] = 0.0
        self.cols["has_pred"][rows] = False
        self.cols["since_reset"][rows] = 0

    def snapshot(self, asset: str) -> dict[str, Any]:
        """One asset's whole state as plain data."""
        r = self.index[asset]
        grid = self.grid.assets.get(asset)
        return {
            "grid": grid.snapshot() if grid is not None else None,
            "lstm": [a[r].tolist() for a in self.lstm],
            "last_pred": self.last_pred[r].tolist(),
            "alert_contrib": self.alert_contrib[r].tolist(),
            "cols": {name: _plain(col[r]) for name, col in self.cols.items()},
        }

    def restore(self, asset: str, snap: dict[str, Any]) -> None:
        (r,) = self.rows(np.array([asset], dtype=object))
        if snap["grid"] is not None:
            self.grid.assets[asset] = AssetGrid.restore(self.n_features, snap["grid"])
        for a, v in zip(self.lstm, snap["lstm"]):
            a[r] = v
        self.last_pred[r] = snap["last_pred"]
        self.alert_contrib[r] = snap["alert_contrib"]
        for name, v in snap["cols"].items():
            self.cols[name][r] = np.nan if v is None else v


def _plain(x: Any) -> Any:
    if isinstance(x, np.floating):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return int(x)
