"""Producing simulated plant readings to Kafka, as fast as possible or at wall-clock pace."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.readings import encode_narrow, encode_wide
from pipeline.simulate import PlantSimulator


@dataclass
class FeedStats:
    rows: int = 0
    records: int = 0


def encode_frame(frame: pd.DataFrame, features: Sequence[str], fmt: str) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs: one wide record per row, or one narrow record per row and feature."""
    assets = frame["asset"].tolist()
    ts = frame["ts_ms"].tolist()
    values = frame[list(features)].to_numpy(np.float64).tolist()
    out: list[tuple[bytes, bytes]] = []
    for a, t, row in zip(assets, ts, values):
        key = a.encode()
        if fmt == "wide":
            out.append((key, encode_wide(a, t, dict(zip(features, row)))))
        else:
            out.extend((key, encode_narrow(a, t, f, v)) for f, v in zip(features, row))
    return out


def feed(producer: object, topic: str, sim: PlantSimulator, start_ms: int, end_ms: int, *, fmt: str = "wide",
         realtime: bool = False, slice_steps: int = 500, stop: threading.Event | None = None) -> FeedStats:
    """Produce every reading of [start_ms, end_ms).

    ``realtime`` produces each period's readings when the wall clock reaches their event
    time (start_ms should then be about now); otherwise slices go out as fast as the
    broker takes them.
    """
    period = sim.config.period_ms
    stats = FeedStats()
    step_ms = period if realtime else period * slice_steps
    t = start_ms
    while t < end_ms and not (stop is not None and stop.is_set()):
        upto = min(end_ms, t + step_ms)
        if realtime:
            delay = upto / 1000 - time.time()
            if delay > 0:
                time.sleep(delay)
        frame = sim.frame(t, upto)
        for key, value in encode_frame(frame, sim.config.features, fmt):
            producer.send(topic, key=key, value=value)  # type: ignore[attr-defined]
            stats.records += 1
        stats.rows += len(frame)
        t = upto
    producer.flush()  # type: ignore[attr-defined]
    return stats
