"""The vectorised grid placement gives exactly what placing each asset's readings one asset at a
time gives (the straightforward reading of the grid's rules): same steps, values to the bit,
rejects, counters and state, for any arrival order, gaps, holes, missing features and polls."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grid import AssetGrid, FleetGrid, GridConfig, GridCounters, GridSteps, _rows_to_steps

CFG = GridConfig(period_ms=1000, lateness_ms=2000, max_future_ms=20_000, carry_forward_steps=2,
                 gap_reset_steps=4, n_features=3)


def reference_ingest(grids: dict[str, AssetGrid], cfg: GridConfig, asset: np.ndarray, ts_ms: np.ndarray,
                     feature: np.ndarray, value: np.ndarray, record_index: np.ndarray, pos: np.ndarray,
                     now_ms: int | None) -> tuple[GridSteps, np.ndarray, np.ndarray, GridCounters]:
    """One asset at a time: AssetGrid.add then AssetGrid.close."""
    counters = GridCounters()
    future = np.zeros(len(ts_ms), bool) if now_ms is None else ts_ms > now_ms + cfg.max_future_ms
    late = np.zeros(len(ts_ms), bool)
    parts = []
    keep = np.flatnonzero(~future)
    if len(keep):
        codes, names = pd.factorize(asset[keep])
        for i, name in enumerate(names):
            idx = keep[codes == i]
            grid = grids.setdefault(name, AssetGrid(cfg.n_features))
            late[idx] = grid.add(cfg, ts_ms[idx] // cfg.period_ms, feature[idx], value[idx], pos[idx], ts_ms[idx])
            rows, c = grid.close(cfg)
            counters.add(c)
            parts.append(_rows_to_steps(name, rows, cfg.n_features))
    late_records, future_records = np.unique(record_index[late]), np.unique(record_index[future])
    counters.late += len(late_records)
    counters.future += len(future_records)
    counters.accepted += len(np.unique(record_index[~late & ~future]))
    return GridSteps.concat(parts, cfg.n_features), late_records, future_records, counters


# Per asset and second: which features arrive (0 = none), an arrival jitter and a value.
seconds = st.lists(st.tuples(st.sampled_from([0, 1, 3, 7, 7, 7, 7]), st.integers(-2500, 2500),
                             st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(plan=st.lists(seconds, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 200), max_size=6),
       now=st.none() | st.integers(5_000, 40_000))
def test_vectorised_placement_equals_one_asset_at_a_time(plan, cuts, now) -> None:  # type: ignore[no-untyped-def]
    # Mostly regular readings (every feature, every second) with dropped features, silences
    # longer than a hole or a gap, and arrival out of order within and past the lateness.
    arrivals = []
    for a, secs in enumerate(plan):
        for s, (mask, jitter, v) in enumerate(secs):
            t = 1000 * s + (s * 137) % 1000
            gap = 6000 * (s >= len(secs) // 2 and a == 1)  # asset "b" pauses past the gap limit
            arrivals += [(t + gap + jitter, f"abc"[a], t + gap, mask, v)]
    recs = []
    for i, (_, a, ts, mask, v) in enumerate(sorted(arrivals)):
        recs += [(i, a, ts, f, v + f) for f in range(3) if mask >> f & 1]
    compare(recs, [c for c in cuts if c < len(recs)], now)


def compare(recs: list[tuple[int, str, int, int, float]], cuts: list[int], now: int | None,
            cfg: GridConfig = CFG) -> None:
    """Feed (record, asset, ts, feature, value) rows in polls cut at ``cuts`` to both paths."""
    fast, ref = FleetGrid(cfg), {}
    bounds = sorted({0, len(recs), *cuts})
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = recs[lo:hi]
        ri = np.array([r[0] for r in chunk], np.int64)
        args = (np.array([r[1] for r in chunk], dtype=object), np.array([r[2] for r in chunk], np.int64),
                np.array([r[3] for r in chunk], np.int32), np.array([r[4] for r in chunk], float), ri, ri * 10)
        got = fast.ingest(*args, now)
        want_steps, want_late, want_future, want_counters = reference_ingest(ref, cfg, *args, now)
        for name in ("asset", "step", "reset", "n_readings", "pos", "gap_start"):
            assert getattr(got.steps, name).tolist() == getattr(want_steps, name).tolist(), name
        np.testing.assert_array_equal(got.steps.values, want_steps.values)  # bit for bit
        assert got.late_records.tolist() == want_late.tolist()
        assert got.future_records.tolist() == want_future.tolist()
        assert got.counters == want_counters
    assert set(fast.assets) == set(ref)
    for name, grid in ref.items():
        assert fast.assets[name].snapshot() == grid.snapshot()


# A live feed: every asset sends every feature once a second, now and then one feature or a whole
# second goes missing, and readings arrive a little out of order; polls cut anywhere.
live_seconds = st.lists(st.tuples(st.sampled_from([7] * 12 + [3, 0]), st.integers(-300, 300),
                                  st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(plan=st.lists(live_seconds, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 300), max_size=8),
       lateness_ms=st.sampled_from([0, 1500]))
def test_a_live_feed_closed_from_the_polls_arrays_equals_one_asset_at_a_time(plan, cuts, lateness_ms) -> None:  # type: ignore[no-untyped-def]
    # Most steps close in the poll that completes them, straight from its arrays; a step begun
    # in an earlier poll, a missing feature or a silent second takes the per-asset path.
    cfg = GridConfig(1000, lateness_ms, 20_000, 2, 4, 3)
    arrivals = []
    for a, secs in enumerate(plan):
        for s, (mask, jitter, v) in enumerate(secs):
            t = 1000 * s + 100 * a
            arrivals += [(t + jitter + f, f"abc"[a], t + 7 * f, f, mask, v) for f in range(3)]
    recs = [(i, a, ts, f, v + f) for i, (_, a, ts, f, mask, v) in enumerate(sorted(arrivals)) if mask >> f & 1]
    recs = [(i, a, ts, f, v) for i, (_, a, ts, f, v) in enumerate(recs)]
    compare(recs, [c for c in cuts if c < len(recs)], None, cfg)


def _regular_feed(seconds: int, silent: range = range(0)) -> list[tuple[int, str, int, int, float]]:
    """Two assets sending every feature once a second (asset "a" silent in ``silent``)."""
    recs = []
    for s in range(seconds):
        for a in "ab":
            if not (a == "a" and s in silent):
                recs += [(len(recs), a, 1000 * s + 10 * f, f, float(s + f)) for f in range(3)]
    return [(i, a, ts, f, v) for i, (_, a, ts, f, v) in enumerate(recs)]


def test_a_first_poll_with_more_room_for_stragglers_than_a_gap_counts_the_gap_as_one_asset_does() -> None:
    # The lateness leaves 6 empty steps before each asset's first reading, more than a gap (4):
    # the per-asset rules count a gap reset there, so those steps may not close as quiet ones.
    cfg = GridConfig(1000, 6000, 20_000, 2, 4, 3)
    recs = _regular_feed(20)
    compare(recs, [len(recs) // 2], None, cfg)
    quiet = GridConfig(1000, 3000, 20_000, 2, 4, 3)  # 3 empty steps: within a gap, quiet
    compare(recs, [len(recs) // 2], None, quiet)


def test_a_silence_past_the_carry_cut_across_polls_counts_its_holes_as_one_asset_does() -> None:
    # Asset "a" misses seconds 6-8 (past the 2-step carry, within the 4-step gap). With a lateness
    # of 2 s and a poll a second, one poll closes only the silence's first step and a later one
    # starts with its last, empty, step before a present one: a hole (a value is still held).
    recs = _regular_feed(16, silent=range(6, 9))
    cuts = sorted({i for i, r in enumerate(recs) if r[3] == 0 and r[1] == "b"})
    compare(recs, cuts, None, GridConfig(1000, 2000, 20_000, 2, 4, 3))


def test_a_reset_or_gap_left_pending_by_one_poll_is_reported_on_the_next_polls_first_step() -> None:
    def every(a: str, t0: int, n: int, feats: tuple[int, ...] = (0, 1, 2)) -> list[tuple[int, str, int, int, float]]:
        return [(0, a, t0 + 1000 * s, f, float(s + f)) for s in range(n) for f in feats]

    # "a": feature 2 silent past carry-forward (a hole, pending reset); "b": silent past the gap limit.
    recs = every("a", 0, 4) + every("a", 4000, 5, (0, 1)) + every("b", 0, 3) + every("b", 12_000, 2)
    recs += every("a", 9000, 8) + every("b", 14_000, 8)
    recs = [(i, a, ts, f, v) for i, (_, a, ts, f, v) in enumerate(recs)]
    first = len(recs) - 48
    for cut in range(first - 30, first + 30, 3):
        compare(recs, [cut], None)


def test_timestamps_too_far_apart_to_lift_still_judge_lateness_per_asset() -> None:
    cfg = GridConfig(1000, 2000, 10**18, 2, 4, 1)
    fast, ref = FleetGrid(cfg), {}
    ts = np.array([0, 5, 4 * 10**18, 1, 4 * 10**18 - 10_000], np.int64)
    asset = np.array(["a", "a", "b", "a", "b"], dtype=object)
    ri = np.arange(5, dtype=np.int64)
    args = (asset, ts, np.zeros(5, np.int32), np.arange(5, dtype=float), ri, ri)
    got = fast.ingest(*args, None)
    want = reference_ingest(ref, cfg, *args, None)
    assert got.late_records.tolist() == want[1].tolist() == [4]
    assert got.steps.step.tolist() == want[0].step.tolist()


# Readings of a step spread over several polls, some features read more than once, values whose
# sums depend on the order of the additions ((0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)) and signed zeros.
repeated = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1),
                              st.sampled_from([0.1, 0.2, 0.3, -0.0, 0.0, 1e16])), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(readings=repeated, cuts=st.lists(st.integers(0, 60), max_size=8))
def test_a_step_continued_over_polls_sums_as_reading_by_reading(readings, cuts) -> None:  # type: ignore[no-untyped-def]
    # (asset, step, feature, value) in arrival order, none late; the last readings close steps 0 and 1.
    recs = [(i, "ab"[a], 1000 * s + 10 * i, f, v) for i, (a, s, f, v) in enumerate(readings)]
    recs += [(len(recs) + a, "ab"[a], 9000, 0, 0.0) for a in range(2)]
    compare(recs, [c for c in cuts if c < len(recs)], None, GridConfig(1000, 5000, 20_000, 9, 9, 3))
