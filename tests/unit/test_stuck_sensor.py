"""A stuck analogue sensor (its reading repeated exactly, step after step) opens an alert, and the
flatline term stays over its level while it is stuck."""

from __future__ import annotations

import numpy as np

from pipeline.bundle import ModelBundle
from pipeline.engine import DetectionEngine
from pipeline.tables import frame_to_batch

from .conftest import FEATURES, sine_frame, tiny_settings

STUCK_FROM, STUCK_STEPS = 150, 60


def test_a_stuck_analogue_sensor_opens_an_alert_the_flatline_term_explains(tiny_bundle: ModelBundle) -> None:
    assert tiny_bundle.flat_limit[0] < 100  # "a" is noisy: it never repeated in training
    frame = sine_frame(300, assets=("p1",), seed=1, start_ms=1_700_001_000_000)
    stuck = slice(STUCK_FROM, STUCK_FROM + STUCK_STEPS)
    frame.loc[frame.index[stuck], "a"] = frame["a"].iloc[STUCK_FROM - 1]
    engine = DetectionEngine(tiny_bundle, tiny_settings().grid)
    out = [engine.process(frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset")), engine.flush()]
    steps = np.concatenate([o.step for o in out])
    terms = np.concatenate([o.terms for o in out])
    first = int(steps.min())
    opened = [e for o in out for e in o.events if e.state == "open"]
    inside = [e for e in opened if STUCK_FROM <= e.step_ms // 1000 - first < STUCK_FROM + STUCK_STEPS]
    assert inside, f"no alert opened while 'a' was stuck: {[(e.step_ms // 1000 - first) for e in opened]}"
    assert inside[0].top_features[0][0] == "a"
    # Once the repeat outlasts the limit, the flatline term is over its level (whatever else the
    # stuck value does to the forecast), and it falls back when the sensor moves again.
    row = steps - first
    held = (row >= STUCK_FROM + tiny_bundle.flat_limit[0] + 1) & (row < STUCK_FROM + STUCK_STEPS)
    assert held.sum() > 30 and (terms[held, 2] > 1).all()
    assert (terms[row >= STUCK_FROM + STUCK_STEPS + 1, 2] < 1).all()
