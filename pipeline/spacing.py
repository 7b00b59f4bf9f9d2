"""The data's own grid period: the median spacing of each asset's readings, and which period to fit with.

``fit``, ``train`` and ``evaluate`` read it the same way: the positive differences between
consecutive distinct stamps of each asset, pooled over assets, and their median. A median
ignores gaps (stopped plant, excluded alerts) and the odd repeated or jittered stamp.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.settings import Settings

DISAGREE_FACTOR = 2.0  # a period this many times off the data's spacing (either way) is worth a warning

Source = Literal["data", "settings", "serving model"]


def stamps_by_asset(asset: np.ndarray, ts_ms: np.ndarray) -> list[np.ndarray]:
    """Each asset's distinct stamps, ascending: long-format rows of one reading share a stamp,
    and assets may interleave in time."""
    if not len(ts_ms):
        return []
    codes, _ = pd.factorize(np.asarray(asset, dtype=object))
    ts = np.asarray(ts_ms, np.int64)
    return [np.unique(ts[codes == k]) for k in range(int(codes.max()) + 1)]


def median_period_s(stamps: Iterable[np.ndarray]) -> float | None:
    """Median of the positive differences between consecutive stamps of every series, pooled, in
    seconds; None with no two distinct stamps in any series."""
    diffs = [np.diff(np.asarray(s, np.int64)) for s in stamps]
    d = np.concatenate(diffs) if diffs else np.empty(0, np.int64)
    d = d[d > 0]
    return float(np.median(d)) / 1000 if d.size else None


class StampSample:
    """Up to ``per_asset`` first distinct stamps of each asset of a stream of batches: enough
    for a median spacing, in memory bounded by the fleet's size rather than its history."""

    def __init__(self, per_asset: int) -> None:
        if per_asset < 2:
            raise ValueError("per_asset must be >= 2")
        self.per_asset = per_asset
        self._stamps: dict[Any, list[np.ndarray]] = {}
        self._counts: dict[Any, int] = {}

    def add(self, asset: np.ndarray, ts_ms: np.ndarray) -> bool:
        """Take a batch's stamps; True when it named an asset not seen before."""
        if not len(ts_ms):
            return False
        codes, names = pd.factorize(np.asarray(asset, dtype=object))
        ts = np.asarray(ts_ms, np.int64)
        new = False
        for k, name in enumerate(names):
            if name not in self._counts:
                new = True
                self._stamps[name], self._counts[name] = [], 0
            room = self.per_asset - self._counts[name]
            if room > 0:
                taken = np.unique(ts[codes == k])[:room]
                self._stamps[name].append(taken)
                self._counts[name] += len(taken)
        return new

    @property
    def full(self) -> bool:
        """Every asset seen so far has its ``per_asset`` stamps."""
        return bool(self._counts) and min(self._counts.values()) >= self.per_asset

    def stamps(self) -> list[np.ndarray]:
        """Each asset's sampled stamps, distinct and ascending."""
        return [np.unique(np.concatenate(parts)) for parts in self._stamps.values() if parts]


def disagree(a_s: float, b_s: float, factor: float = DISAGREE_FACTOR) -> bool:
    """Whether two periods differ by more than ``factor`` either way."""
    return max(a_s, b_s) > factor * min(a_s, b_s)


@dataclass(frozen=True)
class PeriodChoice:
    """The grid period to fit with, where it came from and why, and a warning when it does
    not fit the data."""

    period_s: float
    source: Source
    data_period_s: float | None
    reason: str
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"period_s": self.period_s, "source": self.source, "data_period_s": self.data_period_s,
                "reason": self.reason}


def choose_period(configured_s: float, data_s: float | None, *, explicit: bool,
                  serving_s: float | None = None) -> PeriodChoice:
    """The grid period: ``grid.period_s`` when the user set it, else the serving model's when
    there is one (a hot swap needs the same period), else the data's own spacing, else the
    default. A chosen period more than :data:`DISAGREE_FACTOR` times off the data's spacing
    comes with a warning naming ``grid.period_s``."""
    if explicit:
        choice = PeriodChoice(configured_s, "settings", data_s, "grid.period_s is set")
    elif serving_s is not None:
        choice = PeriodChoice(serving_s, "serving model", data_s,
                              "grid.period_s is not set: the serving model's period, which a hot swap needs")
    elif data_s is not None:
        return PeriodChoice(data_s, "data", data_s,
                            "grid.period_s is not set: the median spacing of each asset's readings")
    else:
        return PeriodChoice(configured_s, "settings", None,
                            "grid.period_s is not set and the data has no two distinct stamps: the default")
    if data_s is not None and disagree(choice.period_s, data_s):
        return PeriodChoice(choice.period_s, choice.source, data_s, choice.reason,
                            f"the readings are {data_s:g} s apart (median) but the grid period is "
                            f"{choice.period_s:g} s ({choice.reason}); set grid.period_s={data_s:g} to fit "
                            "the data's spacing")
    return choice


def spacing_hint(period_s: float, data_s: float | None) -> str | None:
    """What to add to a fit error when the grid period does not fit the data's spacing, else None."""
    if data_s is None or not disagree(period_s, data_s):
        return None
    return (f"the readings are {data_s:g} s apart (median) and the grid period is {period_s:g} s: "
            f"set grid.period_s={data_s:g}")


def with_period(settings: Settings, period_s: float) -> Settings:
    """The settings with this grid period."""
    if period_s == settings.grid.period_s:
        return settings
    return dataclasses.replace(settings, grid=dataclasses.replace(settings.grid, period_s=period_s))
