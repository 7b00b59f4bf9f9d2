"""The engine: replay equals streaming, and swapping models keeps scoring without a cold gap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.engine import DetectionEngine, SwapError
from pipeline.model import StepFunction
from pipeline.settings import GridSettings
from pipeline.tables import frame_to_batch

from .conftest import FEATURES, sine_frame


def _batch(frame):  # type: ignore[no-untyped-def]
    return frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset")


def test_polls_of_any_size_give_the_same_scores_and_alerts_as_one_batch(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    frame = sine_frame(300, assets=("p1", "p2"), seed=5)
    frame.loc[200:210, "b"] += 8.0
    whole = DetectionEngine(tiny_bundle, GridSettings())
    a = whole.process(_batch(frame))
    a_flush = whole.flush()
    polled = DetectionEngine(tiny_bundle, GridSettings())
    outs = [polled.process(_batch(frame.iloc[i:i + 37])) for i in range(0, len(frame), 37)] + [polled.flush()]
    key = lambda o: {(x, int(s)): v for x, s, v in zip(o.asset, o.step, o.alert_score)}  # noqa: E731
    merged: dict = {}
    for o in outs:
        merged.update(key(o))
    expected = {**key(a), **key(a_flush)}
    assert merged.keys() == expected.keys()
    np.testing.assert_allclose([merged[k] for k in expected], list(expected.values()), atol=1e-5)
    ids = lambda evs: [(e.alert_id, e.state) for e in evs]  # noqa: E731
    assert ids([e for o in outs for e in o.events]) == ids(a.events + a_flush.events)
    closes = [e.reason for e in a.events + a_flush.events if e.state == "close"]
    assert closes and set(closes) == {"recovered"}  # no gap in these readings


def test_swap_rewarms_from_recent_steps_so_scoring_has_no_cold_gap(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    frame = sine_frame(200, assets=("p1",), seed=6)
    engine = DetectionEngine(tiny_bundle, GridSettings(allowed_lateness_s=0))
    engine.process(_batch(frame.iloc[:120]))
    new = dataclasses.replace(tiny_bundle, version="v2")
    warmed = engine.swap(new, StepFunction(new.n_features, new.units, new.weights))
    assert warmed == 1
    out = engine.process(_batch(frame.iloc[120:]))
    assert len(out) > 50 and np.isfinite(out.forecast_error).all()  # no warm-up after the swap
    reference = DetectionEngine(tiny_bundle, GridSettings(allowed_lateness_s=0))
    ref = reference.process(_batch(frame))
    tail = {int(s): v for s, v in zip(ref.step, ref.forecast_error)}
    diffs = [abs(tail[int(s)] - v) for s, v in zip(out.step, out.forecast_error)]
    assert np.median(diffs) < 0.1 * np.nanmedian(list(tail.values()))  # re-warmed state ≈ carried state


def test_an_open_alert_keeps_its_id_across_a_swap(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    frame = sine_frame(260, assets=("p1",), seed=7)
    frame.loc[150:259, "b"] += 30.0
    engine = DetectionEngine(tiny_bundle, GridSettings(allowed_lateness_s=0))
    first = engine.process(_batch(frame.iloc[:170]))
    opened = [e for e in first.events if e.state == "open"]
    assert opened
    new = dataclasses.replace(tiny_bundle, version="v2")
    engine.swap(new, StepFunction(new.n_features, new.units, new.weights))
    later = engine.process(_batch(frame.iloc[170:]))
    same = [e for e in later.events if e.alert_id == opened[0].alert_id]
    assert same and all(e.model_version == tiny_bundle.version for e in same)


def test_a_model_for_other_features_or_period_cannot_take_over(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    engine = DetectionEngine(tiny_bundle, GridSettings())
    other = dataclasses.replace(tiny_bundle, version="v3", features=("a", "c", "b"))
    with pytest.raises(SwapError):
        engine.swap(other, engine.model)
    slower = dataclasses.replace(tiny_bundle, version="v4", period_ms=5000)
    with pytest.raises(SwapError):
        engine.swap(slower, engine.model)
    assert engine.model_version == tiny_bundle.version


def test_each_asset_is_judged_against_its_own_levels(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Lowering one asset's levels raises only that asset's alert score, by the same factor."""
    from pipeline.bundle import AssetLevels

    frame = sine_frame(300, assets=("p1", "p2"), seed=5)
    uncapped = dataclasses.replace(tiny_bundle.thresholds, novelty_cap=float("inf"))  # the cap scales with the level
    tiny_bundle = dataclasses.replace(tiny_bundle, thresholds=uncapped)
    own = tiny_bundle.asset_levels
    i = own.names.index("p1")
    fc, nv = own.forecast.copy(), own.novelty.copy()
    fc[i] /= 4
    nv[i] /= 4
    tight = dataclasses.replace(tiny_bundle, asset_levels=AssetLevels(own.names, fc, nv, own.agree))
    outs = {}
    for name, b in (("base", tiny_bundle), ("tight", tight)):
        e = DetectionEngine(b, GridSettings())
        o = [e.process(_batch(frame)), e.flush()]
        outs[name] = {(a, int(s)): (v, t) for x in o for a, s, v, t in zip(x.asset, x.step, x.alert_score, x.terms)}
    keys = [k for k in outs["base"] if np.isfinite(outs["base"][k][0])]
    p1 = [k for k in keys if k[0] == "p1"]
    p2 = [k for k in keys if k[0] == "p2"]
    assert p1 and p2
    np.testing.assert_allclose([outs["tight"][k][1][:2] for k in p1], [4 * outs["base"][k][1][:2] for k in p1],
                               rtol=1e-6)
    np.testing.assert_array_equal([outs["tight"][k][0] for k in p2], [outs["base"][k][0] for k in p2])


def _events_with_silence(bundle, silent: range, poll: int | None = None):  # type: ignore[no-untyped-def]
    """Alert events of one asset whose feature b is far off from second 150 on and which sends
    nothing during ``silent`` (seconds), in one batch or in polls of ``poll`` rows."""
    frame = sine_frame(400, assets=("p1",), seed=7)
    frame.loc[150:, "b"] += 30.0
    frame = frame.drop(index=silent)
    engine = DetectionEngine(bundle, GridSettings())  # gap_reset_steps 30, carry_forward_steps 5
    size = poll or len(frame)
    outs = [engine.process(_batch(frame.iloc[i:i + size])) for i in range(0, len(frame), size)] + [engine.flush()]
    t0 = int(frame.ts.iloc[0])
    return [e for o in outs for e in o.events], t0, sum(o.counters.gap_resets for o in outs)


def test_a_data_gap_closes_the_open_alert_and_a_persisting_fault_opens_a_new_one(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    events, t0, gap_resets = _events_with_silence(tiny_bundle, range(200, 286))  # 86 s without readings
    assert gap_resets == 1
    closes = [e for e in events if e.state == "close"]
    assert [e.reason for e in closes] == ["data_gap"]
    (gap,) = closes
    first = [e for e in events if e.alert_id == gap.alert_id]
    assert first[0].state == "open" and first[0].start_ms == t0 + 150_000
    assert first[-1] is gap and gap.end_ms == t0 + 200_000  # the end of second 199, the last with readings
    assert gap.step_ms == t0 + 286_000  # seen when the asset is back
    after = [e for e in events if e.step_ms > gap.step_ms]
    assert after and after[0].state == "open" and after[0].alert_id != gap.alert_id
    assert after[0].start_ms >= gap.step_ms  # the new alert starts after the gap
    assert all(e.alert_id == after[0].alert_id for e in after)
    polled, _, _ = _events_with_silence(tiny_bundle, range(200, 286), poll=7)
    assert [(e.alert_id, e.state, e.reason, e.end_ms) for e in polled] == \
        [(e.alert_id, e.state, e.reason, e.end_ms) for e in events]


def test_a_short_hole_leaves_the_open_alert_open(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    events, _, gap_resets = _events_with_silence(tiny_bundle, range(200, 212))  # 12 s: a hole, not a gap
    assert gap_resets == 0
    assert {e.alert_id for e in events} == {events[0].alert_id} and events[0].state == "open"
    assert [e.state for e in events[1:]] == ["update"] * (len(events) - 1)
    assert all(e.reason is None for e in events)


def test_an_absurd_but_finite_reading_alerts_and_the_asset_keeps_being_scored(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """1e39 overflows float32: the step must score as a huge error, not leave the asset's LSTM state NaN."""
    from pipeline.readings import decode_batch, encode_wide
    from tests.unit.conftest import sine_frame

    f = sine_frame(300, assets=("p1",), seed=3, start_ms=1_700_000_600_000)
    f.loc[150, "a"] = 1e39
    records = [encode_wide(r.asset, int(r.ts), {k: float(getattr(r, k)) for k in tiny_bundle.features})
               for r in f.itertuples()]
    out = DetectionEngine(tiny_bundle, GridSettings()).process(decode_batch(records, tiny_bundle.features))
    after = out.step > out.step[np.flatnonzero(out.forecast_error == out.forecast_error)[0]] + 160  # well past the absurd step
    assert np.isfinite(out.forecast_error[after]).all() and after.sum() > 100
    assert any(e.state == "open" for e in out.events)
