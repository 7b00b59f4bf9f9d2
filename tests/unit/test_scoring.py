"""Carried-state scoring: chunked feeding equals whole feeding, one trace, resets, warm-up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grid import GridConfig, GridSteps
from pipeline.model import StepFunction
from pipeline.scoring import cross_sectional_residuals, rank_within_asset, score_steps
from pipeline.state import FleetState

from .conftest import FEATURES


def _steps(assets: list[str], n: int, seed: int = 1) -> GridSteps:
    rng = np.random.default_rng(seed)
    rows = []
    for a in assets:
        t = np.arange(n)
        vals = np.stack([10 + np.sin(t / 6), 2 * np.sin(t / 6), 100 + 5 * np.cos(t / 6)], axis=1)
        vals += 0.1 * rng.normal(size=vals.shape)
        rows.append((a, t, vals))
    return GridSteps(np.concatenate([np.full(n, a, object) for a, _, _ in rows]),
                     np.concatenate([t for _, t, _ in rows]), np.concatenate([v for _, _, v in rows]),
                     np.concatenate([np.r_[True, np.zeros(n - 1, bool)] for _ in rows]),
                     np.ones(n * len(rows), np.int32), np.arange(n * len(rows), dtype=np.int64))


def _fresh(bundle):  # type: ignore[no-untyped-def]
    cfg = GridConfig(1000, 0, 10**6, 2, 10, len(FEATURES))
    return FleetState(cfg, bundle.units, bundle.n_features), StepFunction(bundle.n_features, bundle.units, bundle.weights)


def test_random_chunking_gives_the_same_scores_as_whole_feeding(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assets = ["p1", "p2", "p3"]
    steps = _steps(assets, 200)
    state, model = _fresh(tiny_bundle)
    whole = score_steps(state, model, tiny_bundle, steps)

    state2, model2 = _fresh(tiny_bundle)
    rng = np.random.default_rng(7)
    pos = {a: 0 for a in assets}
    per_asset = {a: np.flatnonzero(steps.asset == a) for a in assets}
    got: dict[tuple[str, int], float] = {}
    while any(pos[a] < 200 for a in assets):
        idx = []
        for a in assets:  # each poll: a random number of new steps per asset (0..17)
            k = int(rng.integers(0, 18))
            idx.extend(per_asset[a][pos[a]:pos[a] + k])
            pos[a] = min(200, pos[a] + k)
        if not idx:
            continue
        out = score_steps(state2, model2, tiny_bundle, steps.take(np.array(idx)))
        for a, s, v in zip(out.asset, out.step, out.score):
            got[(a, int(s))] = v
    expected = {(a, int(s)): v for a, s, v in zip(whole.asset, whole.step, whole.score)}
    assert got.keys() == expected.keys()
    diffs = [abs(got[k] - expected[k]) for k in expected if not np.isnan(expected[k])]
    assert all(np.isnan(got[k]) for k in expected if np.isnan(expected[k]))
    assert len(diffs) > 500 and max(diffs) <= 1e-5
    assert model2.tracing_count == 1  # varying batch and chunk sizes never retrace


def test_warm_up_steps_after_a_reset_are_not_scored(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    state, model = _fresh(tiny_bundle)
    out = score_steps(state, model, tiny_bundle, _steps(["p1"], 50))
    w = tiny_bundle.warmup_steps
    assert np.isnan(out.score[:w]).all() and np.isfinite(out.score[w:]).all()


def test_a_reset_inside_a_batch_restarts_the_state(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    steps = _steps(["p1"], 60)
    steps.reset[30] = True
    state, model = _fresh(tiny_bundle)
    out = score_steps(state, model, tiny_bundle, steps)
    # After the reset the asset is scored exactly as a fresh stream starting at step 30.
    tail = steps.take(np.arange(30, 60))
    state2, model2 = _fresh(tiny_bundle)
    fresh = score_steps(state2, model2, tiny_bundle, tail)
    np.testing.assert_allclose(out.score[30:], fresh.score, rtol=0, atol=1e-5)  # the float32 chunk-parity bound
    assert np.isnan(out.score[30:30 + tiny_bundle.warmup_steps]).all()


def test_a_restart_between_two_single_steps_of_a_poll_scores_as_whole_feeding(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    # Polls of one step an asset, except one that holds an asset's last step before a restart and
    # its first after: two one-step segments of the same asset in one call.
    steps = _steps(["p1", "p2"], 40)
    steps.reset[30] = True  # p1's step 30
    state, model = _fresh(tiny_bundle)
    whole = score_steps(state, model, tiny_bundle, steps)
    state2, model2 = _fresh(tiny_bundle)
    scores = np.full(len(steps), np.nan)
    for polled in [[k, 40 + k] for k in range(29)] + [[29, 30, 69]] + [[k, 40 + k - 1] for k in range(31, 40)] + [[79]]:
        idx = np.array(polled)
        scores[idx] = score_steps(state2, model2, tiny_bundle, steps.take(idx)).score
    np.testing.assert_allclose(scores, whole.score, rtol=0, atol=1e-5)
    for got, want in zip(state2.lstm, state.lstm):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(state2.last_pred, state.last_pred, rtol=0, atol=1e-5)


def test_contributions_point_at_the_disturbed_feature(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    steps = _steps(["p1"], 80)
    steps.values[60, 1] += 50.0  # a big spike on feature "b"
    state, model = _fresh(tiny_bundle)
    out = score_steps(state, model, tiny_bundle, steps)
    # The spike shows at its step, and in the prediction made from it for the next step.
    assert np.nanargmax(out.score) in (60, 61)
    assert out.score[60] > 5 * np.nanmedian(out.score)
    assert int(np.argmax(out.errors[60] ** 2)) == 1


@pytest.mark.parametrize("n_assets", [1, 1000])
def test_states_are_kept_per_asset(tiny_bundle, n_assets: int) -> None:  # type: ignore[no-untyped-def]
    names = [f"a{i}" for i in range(n_assets)]
    state, model = _fresh(tiny_bundle)
    steps = _steps(names, 3)
    score_steps(state, model, tiny_bundle, steps)
    assert len(state) == n_assets
    assert state.cols["since_reset"][:n_assets].tolist() == [3] * n_assets


def test_recent_ring_keeps_the_last_steps_since_reset(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    cfg = GridConfig(1000, 0, 10**6, 2, 10, len(FEATURES))
    state = FleetState(cfg, tiny_bundle.units, tiny_bundle.n_features, history=5)
    model = StepFunction(tiny_bundle.n_features, tiny_bundle.units, tiny_bundle.weights)
    steps = _steps(["p1", "p2"], 12)  # positions 0..11 for p1, 12..23 for p2
    score_steps(state, model, tiny_bundle, steps.take(np.r_[0:3, 12:20]))
    score_steps(state, model, tiny_bundle, steps.take(np.r_[3:9, 20:22]))
    values = state.recent(state.index["p1"])
    np.testing.assert_allclose(values, steps.values[4:9].astype(np.float32))
    reset_steps = steps.take(np.arange(9, 12))
    reset_steps.reset[1] = True  # a reset at position 10
    score_steps(state, model, tiny_bundle, reset_steps)
    np.testing.assert_allclose(state.recent(state.index["p1"]), steps.values[10:12].astype(np.float32))


def test_an_asset_with_its_own_output_layer_is_predicted_by_it(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    from pipeline.bundle import AssetHeads
    from pipeline.scoring import predicted_change

    rng = np.random.default_rng(1)
    u, f = tiny_bundle.units[-1], tiny_bundle.n_features
    heads = AssetHeads(("p1",), rng.normal(size=(1, u, f)), rng.normal(size=(1, f)))
    b = dataclasses.replace(tiny_bundle, heads=heads)
    y, top = rng.normal(size=(2, 5, f)).astype(np.float32), rng.normal(size=(2, 5, u)).astype(np.float32)
    out = predicted_change(b, np.array(["p1", "other"], dtype=object), y, top)
    np.testing.assert_allclose(out[0], top[0] @ heads.kernel[0] + heads.bias[0], rtol=1e-5)
    np.testing.assert_array_equal(out[1], y[1])
    both = predicted_change(b, np.array(["p1", "p1"], dtype=object), y, top)  # every row its own layer
    np.testing.assert_allclose(both, top @ heads.kernel[0] + heads.bias[0], rtol=1e-5)
    assert out.dtype == both.dtype == y.dtype


def test_a_feature_far_outside_its_training_range_moves_only_its_own_cross_sectional_residual(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """The quadratic map is held to where it was fitted: past a feature's training maximum, the
    other features' residuals stay what they are at that maximum; only the feature's own grows."""
    low, high = tiny_bundle.novelty_range
    edge = np.zeros((1, len(FEATURES)), np.float32)
    edge[0, 0] = high[0]
    far = edge.copy()
    far[0, 0] = high[0] + 20.0
    held_edge, held_far = cross_sectional_residuals(tiny_bundle, edge), cross_sectional_residuals(tiny_bundle, far)
    np.testing.assert_allclose(held_far[0, 1:], held_edge[0, 1:], rtol=1e-6)
    assert abs(held_far[0, 0] - held_edge[0, 0]) == pytest.approx(20.0 / tiny_bundle.novelty_scale[0], rel=1e-6)
    unheld = dataclasses.replace(tiny_bundle, novelty_range=None)
    assert not np.allclose(cross_sectional_residuals(unheld, far)[0, 1:], held_edge[0, 1:], rtol=1e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=9), min_size=1, max_size=4), st.integers(1, 5))
def test_remembering_one_step_per_asset_a_call_equals_remembering_them_at_once(resets, history) -> None:  # type: ignore[no-untyped-def]
    """The ring's one-step-per-asset path (the streaming case) keeps what the general path keeps
    for the same steps given in one call."""
    cfg = GridConfig(1000, 0, 10**6, 2, 10, 2)
    names = [f"a{i}" for i in range(len(resets))]
    values = {a: np.arange(len(r) * 2, dtype=np.float32).reshape(-1, 2) + 100 * i
              for i, (a, r) in enumerate(zip(names, resets))}
    stepwise, at_once = (FleetState(cfg, (4,), 2, history=history) for _ in range(2))
    for k in range(max(len(r) for r in resets)):  # poll k: the k-th step of every asset that has one
        live = [i for i, r in enumerate(resets) if k < len(r)]
        assets = np.array([names[i] for i in live], object)
        stepwise.remember(stepwise.rows(assets), np.stack([values[names[i]][k] for i in live]),
                          np.array([resets[i][k] for i in live]), np.zeros(len(live), np.int64))
    assets = np.concatenate([np.full(len(r), a, object) for a, r in zip(names, resets)])
    at_once.remember(at_once.rows(assets), np.concatenate([values[a] for a in names]),
                     np.concatenate([np.array(r) for r in resets]), rank_within_asset(assets))
    rows = stepwise.rows(np.array(names, object))
    assert rows.tolist() == at_once.rows(np.array(names, object)).tolist()
    for kept in ("recent_n", "recent_head"):
        assert stepwise.cols[kept][rows].tolist() == at_once.cols[kept][rows].tolist()
    got, want = stepwise.recent_batch(rows), at_once.recent_batch(rows)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0][got[1]], want[0][want[1]])
    assert ((stepwise.epoch[rows] > 0) == (at_once.epoch[rows] > 0)).all()


def test_one_assets_backlog_among_many_one_step_assets_is_scored_in_groups_as_one_call_would(
        tiny_bundle, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Padded to the longest run, 300 one-step assets beside a 2,000-step backlog would take 301 ×
    2,000 cells; grouped by run length they take about as many as there are steps."""
    import pipeline.scoring as scoring

    short, long = _steps([f"a{i}" for i in range(300)], 1), _steps(["big"], 2000)
    steps = GridSteps(*(np.concatenate([getattr(short, k), getattr(long, k)])
                        for k in ("asset", "step", "values", "reset", "n_readings", "pos", "gap_start")))
    widths: list[int] = []
    real_call = StepFunction.__call__

    def call(self, x, mask, init):  # type: ignore[no-untyped-def]
        widths.append(x.shape[0] * x.shape[1])
        return real_call(self, x, mask, init)

    monkeypatch.setattr(StepFunction, "__call__", call)
    state, model = _fresh(tiny_bundle)
    grouped = score_steps(state, model, tiny_bundle, steps)
    assert widths and max(widths) <= 2 * len(steps)
    state1, model1 = _fresh(tiny_bundle)
    one = score_steps(state1, model1, tiny_bundle, steps, split=False)
    assert max(widths) == 301 * 2000  # the single call, for comparison
    for name in ("score", "errors", "novelty", "top"):
        np.testing.assert_allclose(getattr(grouped, name), getattr(one, name), atol=1e-5, equal_nan=True)
    for a, b in zip(state.lstm, state1.lstm):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(state.last_pred, state1.last_pred, atol=1e-5)
    assert scoring.PAD_FACTOR * len(steps) + scoring.PAD_SLACK < 301 * 2000
