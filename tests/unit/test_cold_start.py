"""Cold start: an asset the model was not fitted on learns its own scaling and levels before it can alert."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.bundle import ModelBundle, Scaler
from pipeline.cold_start import COLD, KNOWN, PRIOR_STEPS, UNDECIDED, ColdPlan
from pipeline.engine import DetectionEngine, EngineOutput
from pipeline.model import StepFunction
from pipeline.settings import GridSettings
from pipeline.tables import frame_to_batch

from .conftest import FEATURES, sine_frame

GRID = GridSettings(allowed_lateness_s=0)


def _newcomer(n: int, seed: int = 3, name: str = "p9") -> pd.DataFrame:
    """A pump like the training ones, at another operating point: other levels and spreads."""
    frame = sine_frame(n, assets=("p1",), seed=seed)
    frame["asset"] = name
    frame["a"] += 40.0
    frame["c"] = 300.0 + 3.0 * (frame["c"] - 100.0)
    return frame


def _run(bundle: ModelBundle, frame: pd.DataFrame, chunk: int = 97) -> tuple[DetectionEngine, list[EngineOutput]]:
    engine = DetectionEngine(bundle, GRID)
    outs = [engine.process(frame_to_batch(frame.iloc[i:i + chunk], FEATURES, ts_col="ts", asset_col="asset"))
            for i in range(0, len(frame), chunk)]
    return engine, outs


def _with_cold_start(bundle: ModelBundle, steps: int) -> ModelBundle:
    return dataclasses.replace(bundle, thresholds=dataclasses.replace(bundle.thresholds, cold_start_steps=steps))


def test_without_cold_start_a_new_operating_point_alerts_at_once(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    _, outs = _run(_with_cold_start(tiny_bundle, 0), _newcomer(500))
    assert any(e.state == "open" for o in outs for e in o.events)
    assert not any(o.learning.any() for o in outs)


def test_a_new_asset_learns_its_scaling_then_stays_quiet_and_still_alerts_on_a_fault(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_cold_start(tiny_bundle, 240)
    plan = ColdPlan.of(bundle)
    frame = _newcomer(900)
    frame.loc[700:760, "b"] += 8.0
    engine, outs = _run(bundle, frame)
    learning = np.concatenate([o.learning for o in outs])
    assert learning[:plan.total].all() and not learning[plan.total:].any()
    opens = [e for o in outs for e in o.events if e.state == "open"]
    start = int(frame["ts"].iloc[0])
    assert opens and all(e.start_ms - start >= 690_000 for e in opens)  # only the fault, after the cold start
    row = engine.state.index["p9"]
    own_mean = engine.state.vectors["own_mean"][row]
    head = frame.iloc[:plan.total][list(FEATURES)]  # learned over the whole cold start, then frozen
    np.testing.assert_allclose(own_mean, head.mean().to_numpy(), rtol=1e-6)
    prior = bundle.scaler.rows_for(np.array(["p9"], dtype=object))[1][0]  # the fleet's: p9 is unknown
    n = plan.total
    shrunk = np.sqrt((n * head.std(ddof=0).to_numpy() ** 2 + PRIOR_STEPS * prior**2) / (n + PRIOR_STEPS))
    np.testing.assert_allclose(engine.state.vectors["own_scale"][row], shrunk, rtol=1e-6)
    assert engine.state.cols["cold_start"][row] == COLD


def test_assets_the_model_knows_never_cold_start(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    engine, outs = _run(tiny_bundle, sine_frame(200, assets=("p1", "p2"), seed=11))
    assert not any(o.learning.any() for o in outs)
    assert set(engine.state.cols["cold_start"][[engine.state.index["p1"], engine.state.index["p2"]]]) == {KNOWN}


def test_polls_of_any_size_learn_the_same(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_cold_start(tiny_bundle, 120)
    frame = _newcomer(300)
    one, a = _run(bundle, frame, chunk=len(frame))
    many, b = _run(bundle, frame, chunk=13)
    score = lambda outs: np.concatenate([o.alert_score for o in outs])  # noqa: E731
    np.testing.assert_allclose(score(a), score(b), atol=1e-5)
    r1, r2 = one.state.index["p9"], many.state.index["p9"]
    for name in ("own_mean", "own_scale", "own_fc_level", "own_nv_level", "own_flat_limit"):
        np.testing.assert_allclose(one.state.vectors[name][r1], many.state.vectors[name][r2], rtol=1e-6)


def test_a_snapshot_carries_the_cold_start_and_an_older_snapshot_still_restores(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_cold_start(tiny_bundle, 120)
    frame = _newcomer(300)
    first, rest = frame.iloc[:60], frame.iloc[60:]
    engine, _ = _run(bundle, first)
    (blob,) = engine.state.snapshot(["p9"])
    restored = DetectionEngine(bundle, GRID)
    restored.state.restore(blob)
    batch = frame_to_batch(rest, FEATURES, ts_col="ts", asset_col="asset")
    np.testing.assert_allclose(restored.process(batch).alert_score, engine.process(batch).alert_score, atol=1e-6)

    cold_bytes = sum(b[0].nbytes for b in engine.state._cold_blocks())
    older = DetectionEngine(bundle, GRID)
    older.state.restore(blob[:-cold_bytes])  # written before cold start existed
    row = older.state.index["p9"]
    assert older.state.cols["cold_start"][row] == UNDECIDED
    assert np.isnan(older.state.vectors["own_scale"][row]).all()


def test_a_model_fitted_on_the_asset_takes_over_its_scaling(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_cold_start(tiny_bundle, 120)
    engine, _ = _run(bundle, _newcomer(200))
    row = engine.state.index["p9"]
    assert np.isfinite(engine.state.vectors["own_scale"][row]).all()
    s = bundle.scaler
    names = s.asset_names + ("p9",)
    knows = dataclasses.replace(bundle, version="v2", scaler=Scaler(
        s.mean, s.scale, names, np.vstack([s.asset_mean, s.mean + 1]), np.vstack([s.asset_scale, s.scale])))
    engine.swap(knows, StepFunction(knows.n_features, knows.units, knows.weights))
    assert engine.state.cols["cold_start"][row] == KNOWN
    assert np.isnan(engine.state.vectors["own_scale"][row]).all()

    still_unknown = dataclasses.replace(bundle, version="v3")
    engine2, _ = _run(bundle, _newcomer(200))
    row2 = engine2.state.index["p9"]
    engine2.swap(still_unknown, StepFunction(bundle.n_features, bundle.units, bundle.weights))
    assert np.isfinite(engine2.state.vectors["own_scale"][row2]).all()  # its scaling stays
    assert np.isnan(engine2.state.vectors["own_fc_level"][row2]).all()  # its levels are learned again
    assert engine2.state.cols["cold_steps"][row2] == ColdPlan.of(bundle).scaling


def _shifted(n: int, at: int) -> pd.DataFrame:
    """p1 moves to a new operating point for good at row ``at``."""
    frame = sine_frame(n, assets=("p1",), seed=21)
    frame.loc[at:, "a"] += 6.0
    frame.loc[at:, "c"] += 30.0
    return frame


def _rebaselining(bundle: ModelBundle, after_s: float, cold_steps: int = 120) -> ModelBundle:
    t = dataclasses.replace(bundle.thresholds, rebaseline_after_s=after_s, cold_start_steps=cold_steps)
    return dataclasses.replace(bundle, thresholds=t)


def test_a_lasting_move_alerts_for_ever_without_rebaselining(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    _, outs = _run(_rebaselining(tiny_bundle, 0.0), _shifted(900, 300))
    events = [e for o in outs for e in o.events]
    assert [e.state for e in events if e.state != "update"] == ["open"]  # never closes


def test_an_alert_open_longer_than_the_stated_time_closes_and_the_asset_learns_its_new_normal(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = _rebaselining(tiny_bundle, 100.0)
    frame = _shifted(900, 300)
    engine, outs = _run(bundle, frame)
    events = [e for o in outs for e in o.events if e.state != "update"]
    assert [(e.state, e.reason) for e in events] == [("open", None), ("close", "rebaselined")]
    opened, closed = events
    assert closed.end_ms - opened.start_ms == 100_000 - 1000  # open for 100 steps, ending at the step that closed it
    learning = np.concatenate([o.learning for o in outs])
    step_of_close = int(np.flatnonzero(np.concatenate([o.step for o in outs]) * 1000 == closed.step_ms)[0])
    assert learning[step_of_close + 1:step_of_close + 121].all() and not learning[step_of_close + 121:].any()
    row = engine.state.index["p1"]
    assert engine.state.cols["cold_start"][row] == COLD
    new_rows = frame.iloc[step_of_close + 1:step_of_close + 1 + ColdPlan.of(bundle).scaling]
    np.testing.assert_allclose(engine.state.vectors["own_mean"][row][0], new_rows["a"].mean(), atol=0.5)

    _, polled = _run(bundle, frame, chunk=len(frame))  # one poll: the same events at the same steps
    same = [(e.state, e.reason, e.start_ms, e.end_ms) for o in polled for e in o.events if e.state != "update"]
    assert same == [(e.state, e.reason, e.start_ms, e.end_ms) for e in events]


def test_evaluation_replays_a_paired_recording_as_the_asset_the_model_was_fitted_on(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    from pipeline.evaluation import Series, replay

    bundle = _with_cold_start(tiny_bundle, 120)
    frame = sine_frame(300, assets=("p1",), seed=31)
    recording = Series("p1 test split", frame["ts"].to_numpy(), frame[list(FEATURES)].to_numpy())
    unseen = replay(bundle, GRID, [recording])["p1 test split"]
    assert unseen.learning_steps == ColdPlan.of(bundle).total  # a name the model does not know: cold start
    paired = replay(bundle, GRID, [recording], as_asset="p1")["p1 test split"]
    assert paired.learning_steps == 0 and len(paired.step_ms) == len(unseen.step_ms)


def test_many_new_assets_at_different_points_of_their_cold_start(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Assets that finish their cold start while others in the same poll already have their own levels."""
    bundle = _with_cold_start(tiny_bundle, 60)
    parts = [_newcomer(400, seed=40 + k, name=f"new-{k}").iloc[20 * k:] for k in range(5)]
    frame = pd.concat(parts).sort_values(["ts", "asset"]).reset_index(drop=True)
    engine, outs = _run(bundle, frame, chunk=53)
    learning = np.concatenate([o.learning for o in outs])
    assets = np.concatenate([o.asset for o in outs])
    for k in range(5):
        mine = learning[assets == f"new-{k}"]
        assert mine[:60].all() and not mine[60:].any()
        row = engine.state.index[f"new-{k}"]
        assert np.isfinite(engine.state.vectors["own_flat_limit"][row]).all()


def test_a_slow_feature_widens_the_novelty_level_a_cold_start_learns(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Its level part holds few independent values of a slow residual: the level widens as the fit's do."""
    from pipeline.thresholds import MIN_BATCHES, excursion_factor, feature_quantile, scale_uncertainty_factor

    f = len(FEATURES)
    memory = np.array([1.0, 40.0, 8.0][:f] + [1.0] * max(f - 3, 0))
    base = _with_cold_start(dataclasses.replace(tiny_bundle, novelty_memory=None), 120)
    slow = dataclasses.replace(base, novelty_memory=memory)
    frame = _newcomer(300)
    levels = {}
    for name, bundle in (("none", base), ("slow", slow)):
        engine, _ = _run(bundle, frame)
        row = engine.state.index["p9"]
        levels[name] = (engine.state.vectors["own_nv_level"][row].copy(), engine.state.vectors["cold_nv_max"][row].copy())
    p, plan = base.thresholds, ColdPlan.of(base)
    q = feature_quantile(p.quantile, f)
    stretch = p.novelty_margin * excursion_factor(plan.level, p.novelty_alpha, q)
    attested = np.maximum(np.minimum(memory, plan.level / MIN_BATCHES), 1.0)  # 40 steps is more than 80 can attest
    widen = scale_uncertainty_factor(plan.level / attested, q)
    np.testing.assert_allclose(levels["none"][1], levels["slow"][1])  # the same sample ...
    np.testing.assert_allclose(levels["none"][0], np.maximum(base.novelty_level, levels["none"][1] * stretch))
    np.testing.assert_allclose(levels["slow"][0], np.maximum(base.novelty_level, levels["slow"][1] * stretch * widen))
    assert widen[1] == widen[2] > 1.3 > widen[0]
    assert levels["slow"][0][1] > levels["none"][0][1]  # ... read with a wider level where the residual is slow


def test_an_asset_with_levels_of_its_own_needs_both_terms_at_those_levels_to_agree(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Its levels are a short sample's largest values: the agreement term, whose fleet level is
    calibrated on held-out steps the asset has none of, is judged at 1 (or the fleet's, if higher)."""
    from pipeline.cold_start import OWN_AGREE_LEVEL, with_own_levels
    from pipeline.thresholds import TermLevels, combine

    bundle = dataclasses.replace(_with_cold_start(tiny_bundle, 120), agree_level=0.6)
    frame = pd.concat([_newcomer(200), sine_frame(200, assets=("p1",), seed=5)]).sort_values(["ts", "asset"])
    engine, _ = _run(bundle, frame)
    names = np.array(["p9", "p1"], dtype=object)
    rows = np.array([engine.state.index[n] for n in names])
    fleet = TermLevels.for_assets(bundle, names)
    own = with_own_levels(fleet, engine.state, rows)
    assert OWN_AGREE_LEVEL == 1.0 and own.agree[0, 0] == 1.0  # p9 learned its levels in a cold start
    assert own.agree[1, 0] == fleet.agree[1, 0]               # p1: the model's calibrated level

    # Both terms at 0.9 of p9's own levels on one feature: agreement under its level, whereas
    # a level of 0.6 would have alerted.
    fc_level, nv_level = own.forecast[0], own.novelty[0]
    fc, nv = np.zeros((1, len(FEATURES))), np.zeros((1, len(FEATURES)))
    fc[0, 0], nv[0, 0] = (0.9 * fc_level[0]) ** 2, (0.9 * nv_level[0]) ** 2
    runs = np.zeros((1, len(FEATURES)), np.int64)
    assert combine(fc, nv, runs, own.take(np.array([0]))).score[0] < 1.0
    assert combine(fc, nv, runs, dataclasses.replace(own.take(np.array([0])), agree=np.array([0.6]))).score[0] > 1.0


def test_one_assets_huge_reading_neither_reaches_another_asset_nor_poisons_its_own_state(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """Both unseen, read in the same polls: a reading of 1e200 (its square overflows) on one must
    leave the other's learned scaling as it is without it (to float rounding), and its own state finite."""
    quiet = _newcomer(600, seed=5, name="p8")
    loud = _newcomer(600, seed=3, name="p7")  # (first in every poll)
    loud.loc[loud.index[12], "a"] = 1e200

    def run(frames: list[pd.DataFrame]) -> DetectionEngine:
        both = pd.concat(frames).sort_values(["ts", "asset"], kind="stable").reset_index(drop=True)
        engine, _ = _run(tiny_bundle, both)
        return engine

    alone, shared = run([quiet]), run([quiet, loud])
    a, s = alone.state, shared.state
    for name in ("own_count", "own_sum", "own_sq", "own_mean", "own_scale"):
        np.testing.assert_allclose(s.vectors[name][s.index["p8"]], a.vectors[name][a.index["p8"]], rtol=1e-12)
    r = s.index["p7"]
    assert all(np.isfinite(layer[r]).all() for layer in s.lstm) and np.isfinite(s.last_pred[r]).all()
    assert np.isfinite(s.vectors["own_scale"][r]).all()
    assert not s.cols["alert_open"][r]


_NO_IMPORT_IN_THE_HOT_PATH = '''
import dataclasses, sys
import numpy as np
from bench.scoring_cost import random_bundle
from pipeline.bundle import Scaler
from pipeline.engine import DetectionEngine
from pipeline.readings import DecodedBatch
from pipeline.settings import GridSettings

bundle = random_bundle(8)
f = bundle.n_features  # a model fitted on two other assets: "p9" cold-starts
bundle = dataclasses.replace(bundle, novelty_memory=np.full(f, 5.0), scaler=Scaler(
    bundle.scaler.mean, bundle.scaler.scale, ("x0", "x1"), np.zeros((2, f)), np.ones((2, f))))
engine = DetectionEngine(bundle, GridSettings(allowed_lateness_s=0))
rng = np.random.default_rng(0)

def poll(first: int, n: int) -> None:
    steps = np.repeat(np.arange(first, first + n), f)
    engine.process(DecodedBatch(steps - first, np.full(len(steps), "p9", object), 1_700_000_000_000 + 1000 * steps,
                                np.tile(np.arange(f, dtype=np.int32), n), rng.normal(size=len(steps)), [], n))

poll(0, 20)
before = set(sys.modules)
for first in range(20, 420, 20):
    poll(first, 20)
row = engine.state.index["p9"]
assert np.isfinite(engine.state.vectors["own_nv_level"][row]).all(), "the cold start did not end"
print(sorted(set(sys.modules) - before))
'''


def test_no_module_is_imported_while_polls_are_processed_through_an_assets_cold_start() -> None:
    """An import in the hot path stalls that poll: scipy's quantiles, first needed when an asset's cold
    start ends, took 0.6–0.75 s to import. A fresh interpreter, so nothing was imported before."""
    done = subprocess.run([sys.executable, "-c", _NO_IMPORT_IN_THE_HOT_PATH], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
