"""A live plant: readings at wall-clock pace, one per asset per period, polls of one record;
an asset appears mid-run and one goes silent past the gap limit and comes back. The detector
stays up and scores every step exactly once — the same steps as the same readings replayed
through the engine in one go."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

import pandas as pd

from consumers.kafka_clients import make_producer
from pipeline.engine import DetectionEngine
from pipeline.readings import encode_wide
from pipeline.settings import GridSettings
from pipeline.simulate import PlantSimulator
from pipeline.tables import frame_to_batch

from .plant import PERIOD_MS, PLANT, detector_settings, read_topic, running_detector, wait_until

SECONDS = 36
GAP_RESET_STEPS = 4


def _live_plan(start_ms: int) -> list[tuple[int, str, dict[str, float]]]:
    """(event time, asset, values): assets 0–2 from the start, asset 3 from second 8, asset 1
    silent from second 10 to 20 (longer than the gap limit)."""
    sim = PlantSimulator(PLANT)
    frame = sim.frame(start_ms, start_ms + SECONDS * PERIOD_MS)
    ids = PLANT.asset_ids
    plan = []
    for row in frame.itertuples(index=False):
        t = (row.ts_ms - start_ms) // PERIOD_MS
        if row.asset == ids[4] or (row.asset == ids[3] and t < 8) or (row.asset == ids[1] and 10 <= t < 20):
            continue
        plan.append((int(row.ts_ms), row.asset, {f: float(getattr(row, f)) for f in PLANT.features}))
    return plan


def test_live_stream_at_wall_clock_pace_scores_every_step_exactly_once(broker: Any, settings_for: Any,
                                                                      fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker, {"kafka.max_poll_records": "1",
                                                        "grid.gap_reset_steps": str(GAP_RESET_STEPS)}, scores=True)
    start_ms = (math.floor(time.time()) + 15) * 1000  # time for the detector to join its group
    plan = _live_plan(start_ms)
    reference = DetectionEngine(fitted_plant.bundle, settings.grid)
    assert settings.grid == GridSettings(gap_reset_steps=GAP_RESET_STEPS)
    frame = pd.DataFrame([{"asset": a, "ts_ms": ts, **v} for ts, a, v in plan])
    out = reference.process(frame_to_batch(frame, PLANT.features, ts_col="ts_ms", asset_col="asset"))
    expected = {(a, int(s) * PERIOD_MS) for a, s, sc in zip(out.asset, out.step, out.forecast_error) if sc == sc}
    # the asset that appears mid-run is scored too (the one that goes silent restarts its warm-up)
    assert {a for a, _ in expected} >= {PLANT.asset_ids[0], PLANT.asset_ids[2], PLANT.asset_ids[3]}

    producer = make_producer(settings)
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.assigned, 30, "partition assignment")
        for ts, asset, values in plan:
            delay = ts / 1000 - time.time()
            if delay > 0:
                time.sleep(delay)
            producer.send(settings.topics.readings, key=asset.encode(), value=encode_wide(asset, ts, values))
            producer.flush()
        producer.close()
        wait_until(lambda: det.stats.records >= len(plan), 30, "every record polled")
        scores = read_topic(settings, settings.topics.scores, until=lambda r: len(r) >= len(expected), timeout_s=30)
        assert det.stats.rejects == {}
    got = Counter((json.loads(r.value)["asset"], json.loads(r.value)["step_ms"]) for r in scores)
    assert [k for k, n in got.items() if n > 1] == [], "a step was scored twice"
    assert set(got) == expected, f"missing {sorted(expected - set(got))[:5]}, extra {sorted(set(got) - expected)[:5]}"
