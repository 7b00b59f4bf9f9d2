"""A swap warmed beforehand from a copy of the rings (off the main thread in the detector) leaves
every asset where a swap re-warming at that moment would, up to float rounding of chunked calls;
assets whose ring restarted or changed hands since the copy are re-warmed at the swap."""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.engine import DetectionEngine, warm_start
from pipeline.model import StepFunction
from pipeline.settings import GridSettings

from .conftest import FEATURES, sine_frame
from pipeline.tables import frame_to_batch


def _batch(frame):  # type: ignore[no-untyped-def]
    return frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset")


def _pair(tiny_bundle, frame, upto):  # type: ignore[no-untyped-def]
    engines = [DetectionEngine(tiny_bundle, GridSettings(allowed_lateness_s=0)) for _ in range(2)]
    for e in engines:
        e.process(_batch(frame.iloc[:upto]))
    return engines


def test_a_warm_start_plus_the_steps_since_equals_re_warming_at_the_swap(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    h = tiny_bundle.warmup_steps
    frame = sine_frame(3 * h, assets=("p1", "p2", "p3"), seed=3)
    rows_per_step = 3
    copy_at, swap_at = (h // 3) * rows_per_step, (h - 2) * rows_per_step  # the rings never fill up
    sync, warm = _pair(tiny_bundle, frame, copy_at)
    new = dataclasses.replace(tiny_bundle, version="v2")
    net = StepFunction(new.n_features, new.units, new.weights)
    ring = warm.ring_copy()
    start = warm_start(new, net, ring)
    for e in (sync, warm):
        e.process(_batch(frame.iloc[copy_at:swap_at]))
    assert sync.swap(new, net) == warm.swap_warm(new, net, start) == 3
    for a, b in zip(sync.state.lstm, warm.state.lstm):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(sync.state.last_pred, warm.state.last_pred, atol=1e-5)
    for name in ("has_pred", "since_reset"):
        assert sync.state.cols[name].tolist() == warm.state.cols[name].tolist()
    out_sync, out_warm = (e.process(_batch(frame.iloc[swap_at:])) for e in (sync, warm))
    np.testing.assert_allclose(out_sync.forecast_error, out_warm.forecast_error, atol=1e-4)
    assert [e.alert_id for e in out_sync.events] == [e.alert_id for e in out_warm.events]


def test_an_asset_restored_or_new_since_the_copy_is_re_warmed_at_the_swap(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    h = tiny_bundle.warmup_steps
    frame = sine_frame(4 * h, assets=("p1", "p2"), seed=4)
    sync, warm = _pair(tiny_bundle, frame, 2 * h * 2)
    old_p1 = [e.state.snapshot(["p1"])[0] for e in (sync, warm)]  # p1 as it was h steps before the copy
    for e in (sync, warm):
        e.process(_batch(frame.iloc[2 * h * 2:3 * h * 2]))
    new = dataclasses.replace(tiny_bundle, version="v2")
    net = StepFunction(new.n_features, new.units, new.weights)
    start = warm_start(new, net, warm.ring_copy())
    for e, blob in zip((sync, warm), old_p1):  # p1 comes back from the older snapshot; p9 is new
        e.state.drop(["p1"])
        e.state.restore(blob)
        e.process(_batch(sine_frame(h, assets=("p9",), seed=5)))
    sync.swap(new, net)
    warm.swap_warm(new, net, start)
    for asset in ("p1", "p2", "p9"):
        r_sync, r_warm = sync.state.index[asset], warm.state.index[asset]
        for a, b in zip(sync.state.lstm, warm.state.lstm):
            np.testing.assert_allclose(a[r_sync], b[r_warm], atol=1e-5)


def test_assets_restored_from_snapshots_of_another_model_continue_as_if_it_had_been_swapped_in_there(
        tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    """A partition that moves to a member serving a newer model (or that member's restart) restores
    snapshots taken under the old one: each asset then makes the swap's transition where its
    snapshot was taken, an asset still learning its levels (one the model was not fitted on) too."""
    frame = sine_frame(900, assets=("p1", "p9"), seed=7)  # p9: unknown to the model, past its cold start
    upto = 600 * 2
    old = DetectionEngine(tiny_bundle, GridSettings(allowed_lateness_s=0))
    old.process(_batch(frame.iloc[:upto]))
    blobs = old.state.snapshot(["p1", "p9"], {"model_version": tiny_bundle.version})
    new = dataclasses.replace(tiny_bundle, version="v2")
    net = StepFunction(new.n_features, new.units, new.weights)
    old.swap(new, net)
    successor = DetectionEngine(new, GridSettings(allowed_lateness_s=0), model=net)
    rows = [successor.state.index[successor.state.restore(blob)["asset"]] for blob in blobs]
    successor.adopt(np.array(rows, np.int64))
    out_old, out_new = (e.process(_batch(frame.iloc[upto:])) for e in (old, successor))
    assert out_old.learning.sum() > 0  # p9 relearns its levels under the new model
    assert out_old.learning.tolist() == out_new.learning.tolist()
    np.testing.assert_allclose(out_old.alert_score, out_new.alert_score, atol=1e-5)
    assert [e.alert_id for e in out_old.events] == [e.alert_id for e in out_new.events]
