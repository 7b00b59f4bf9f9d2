"""The event-time grid: aggregation, lateness, future cap, carry-forward, holes and gaps."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grid import NO_GAP, NO_POS, AssetGrid, FleetGrid, GridConfig, GridSteps

CFG = GridConfig(period_ms=1000, lateness_ms=3000, max_future_ms=60_000, carry_forward_steps=2,
                 gap_reset_steps=10, n_features=2)


def feed(grid: FleetGrid, rows: list[tuple[str, int, int, float]], now_ms: int | None = None):
    """rows: (asset, ts_ms, feature, value); one record per row."""
    a = np.array([r[0] for r in rows], dtype=object)
    ts = np.array([r[1] for r in rows], np.int64)
    f = np.array([r[2] for r in rows], np.int32)
    v = np.array([r[3] for r in rows], float)
    idx = np.arange(len(rows), dtype=np.int64)
    return grid.ingest(a, ts, f, v, idx, idx, now_ms)


def both(asset: str, ts: int, x: float, y: float) -> list[tuple[str, int, int, float]]:
    return [(asset, ts, 0, x), (asset, ts, 1, y)]


def test_readings_in_a_step_are_averaged_and_closed_after_lateness() -> None:
    g = FleetGrid(CFG)
    rows = both("a", 0, 1.0, 10.0) + both("a", 500, 3.0, 30.0)
    r = feed(g, rows)
    assert len(r.steps) == 0  # watermark 500 has not passed step 0 + lateness
    r = feed(g, both("a", 4000, 0.0, 0.0))  # watermark 4000 - 3000 lateness closes step 0
    assert r.steps.step.tolist() == [0]
    np.testing.assert_allclose(r.steps.values[0], [2.0, 20.0])
    assert r.steps.reset.tolist() == [True]  # first step of an asset starts from a clean state
    assert r.steps.n_readings.tolist() == [4]


def test_out_of_order_within_lateness_lands_in_its_step_and_later_is_late() -> None:
    g = FleetGrid(CFG)
    feed(g, both("a", 5000, 1.0, 1.0))
    feed(g, both("a", 7000, 1.0, 1.0))
    r = feed(g, both("a", 4200, 5.0, 5.0))  # 2.8 s behind the watermark: accepted
    assert len(r.late_records) == 0
    feed(g, both("a", 12000, 1.0, 1.0))  # closes steps up to 8
    r = feed(g, both("a", 6500, 9.0, 9.0))  # step 6 is closed: late
    assert r.late_records.tolist() == [0, 1] and r.counters.late == 2
    out = feed(g, both("a", 30000, 0, 0)).steps
    assert 6 not in out.step.tolist()  # step 6 was emitted before; a closed step never changes


def test_future_timestamps_are_rejected_and_do_not_move_the_watermark() -> None:
    g = FleetGrid(CFG)
    now = 100_000
    feed(g, both("a", now, 1.0, 1.0), now_ms=now)
    r = feed(g, both("a", now + 10**9, 1.0, 1.0), now_ms=now)
    assert r.future_records.tolist() == [0, 1]
    assert g.assets["a"].watermark_ms == now
    r = feed(g, both("a", now + 500, 2.0, 2.0), now_ms=now)
    assert r.counters.late == 0


def test_missing_feature_carried_forward_up_to_limit_then_hole_and_reset() -> None:
    g = FleetGrid(CFG)
    rows = both("a", 0, 1.0, 1.0)
    rows += [("a", t * 1000, 0, float(t)) for t in range(1, 8)]  # feature 1 stops after step 0
    rows += both("a", 8000, 8.0, 8.0)
    rows += both("a", 20000, 0.0, 0.0)
    steps = feed(g, rows).steps
    # steps 1,2 carry feature 1 (limit 2); 3..7 are holes; 8 restarts with reset; 9,10 carry
    # both features; 11..16 (closed by the watermark 20 s - 3 s lateness) are holes again
    assert steps.step.tolist() == [0, 1, 2, 8, 9, 10]
    np.testing.assert_allclose(steps.values[1:3, 1], [1.0, 1.0])
    assert steps.reset.tolist()[:4] == [True, False, False, True]


def test_long_gap_resets_the_asset_without_inventing_steps() -> None:
    g = FleetGrid(CFG)
    feed(g, both("a", 0, 1.0, 1.0))
    r = feed(g, both("a", 10**8, 2.0, 2.0) + both("a", 10**8 + 5000, 2.0, 2.0))
    assert r.steps.step.tolist() == [0, 10**5, 10**5 + 1]  # nothing invented across the gap
    assert r.steps.reset.tolist() == [True, True, False]
    assert r.counters.gap_resets == 1


def test_the_step_after_a_gap_says_where_the_gap_began_and_a_hole_is_no_gap() -> None:
    g = FleetGrid(CFG)
    rows = [r for t in range(6) for r in both("a", t * 1000, 1.0, 1.0)]        # steps 0-5
    rows += [("a", t * 1000, 0, 1.0) for t in range(6, 12)]                   # feature 1 silent: a hole
    rows += [r for t in range(12, 14) for r in both("a", t * 1000, 1.0, 1.0)]  # steps 12-13
    rows += [r for t in range(30, 40) for r in both("a", t * 1000, 1.0, 1.0)]  # 16 empty steps: a gap
    steps = feed(g, rows).steps
    by_step = dict(zip(steps.step.tolist(), zip(steps.reset.tolist(), steps.gap_start.tolist())))
    assert by_step[12] == (True, NO_GAP)  # the hole restarts the model but is no gap
    assert by_step[30] == (True, 14)      # the gap began after step 13, the last with readings
    assert steps.gap.tolist() == [s == 30 for s in steps.step.tolist()]


def test_a_gap_closed_over_several_polls_is_one_gap_as_in_one_batch() -> None:
    """With lateness, the watermark closes a gap's empty steps over several polls; the gap is
    measured over all of them, so one batch and a poll per reading see the same gap."""
    rows = [r for t in list(range(6)) + list(range(18, 30)) for r in both("a", t * 1000, 1.0, 1.0)]  # 12 empty
    whole = FleetGrid(CFG)
    one = feed(whole, rows)
    polled = FleetGrid(CFG)
    parts = [feed(polled, rows[i:i + 2]) for i in range(0, len(rows), 2)]
    for r in (one, *parts):
        assert r.steps.gap_start[r.steps.step == 18].tolist() in ([], [6])
    assert one.counters.gap_resets == sum(p.counters.gap_resets for p in parts) == 1
    got = GridSteps.concat([p.steps for p in parts], 2)
    assert got.gap_start[got.step == 18].tolist() == one.steps.gap_start[one.steps.step == 18].tolist() == [6]
    assert got.gap.sum() == 1


def test_a_gap_not_yet_reported_travels_in_the_snapshot() -> None:
    rows = [r for t in range(6) for r in both("a", t * 1000, 1.0, 1.0)]
    later = [r for t in range(31, 40) for r in both("a", t * 1000, 2.0, 2.0)]
    g1 = FleetGrid(CFG)
    feed(g1, rows)
    assert len(feed(g1, both("a", 30_000, 2.0, 2.0)).steps.step) == 4  # steps 2-5; the gap is seen, step 30 open
    snap = g1.assets["a"].snapshot()
    assert snap["gap_start"] == 6
    g2 = FleetGrid(CFG)
    g2.assets["a"] = AssetGrid.restore(2, snap)
    out1, out2 = feed(g1, later).steps, feed(g2, later).steps
    assert out1.step.tolist() == out2.step.tolist() and out1.step[0] == 30
    assert out1.gap_start.tolist() == out2.gap_start.tolist() == [6] + [NO_GAP] * (len(out1) - 1)
    old = {k: v for k, v in snap.items() if k not in ("gap_start", "empty_run")}  # written by an older version
    assert AssetGrid.restore(2, old).gap_start is None


def test_flush_closes_everything_and_pending_positions_track_open_steps() -> None:
    g = FleetGrid(CFG)
    feed(g, both("a", 0, 1.0, 1.0) + both("b", 0, 2.0, 2.0))
    assert g.assets["a"].oldest_pending_pos() == 0
    assert g.assets["b"].oldest_pending_pos() == 2
    r = g.flush()
    assert sorted(r.steps.asset.tolist()) == ["a", "b"]
    assert g.assets["a"].oldest_pending_pos() == NO_POS


def test_snapshot_restore_round_trip_gives_identical_future_output() -> None:
    rows = [("a", t * 700, t % 2, float(t)) for t in range(40)]
    g1 = FleetGrid(CFG)
    feed(g1, rows[:20])
    g2 = FleetGrid(CFG)
    g2.assets["a"] = AssetGrid.restore(2, g1.assets["a"].snapshot())
    out1, out2 = feed(g1, rows[20:]).steps, feed(g2, rows[20:]).steps
    assert out1.step.tolist() == out2.step.tolist()
    np.testing.assert_array_equal(out1.values, out2.values)


def _collect(rows: list[tuple[str, int, int, float]], batch: int) -> GridSteps:
    g = FleetGrid(CFG)
    parts = [feed(g, rows[i:i + batch]).steps for i in range(0, len(rows), batch)]
    parts.append(g.flush().steps)
    return GridSteps.concat(parts, 2)


@st.composite
def shuffled_within_lateness(draw):  # type: ignore[no-untyped-def]
    """Readings of two assets, and an arrival order where no reading is later than the lateness bound."""
    n = draw(st.integers(5, 60))
    gaps = draw(st.lists(st.integers(0, 1500), min_size=n, max_size=n))
    ts = np.cumsum(gaps)
    rows = [(draw(st.sampled_from(["a", "b"])), int(t), draw(st.integers(0, 1)), float(draw(st.integers(-50, 50))))
            for t in ts]
    # Shuffle inside blocks spanning at most the lateness: every reading is then at most
    # `lateness` behind the newest one seen before it.
    blocks, start = [], 0
    for i in range(1, n + 1):
        if i == n or ts[i] - ts[start] > CFG.lateness_ms:
            block = rows[start:i]
            blocks.append(draw(st.permutations(block)))
            start = i
    arrival = [r for b in blocks for r in b]
    batch = draw(st.integers(1, 10))
    return rows, arrival, batch


@settings(max_examples=150, deadline=None)
@given(shuffled_within_lateness())
def test_any_arrival_order_within_lateness_gives_the_sorted_grid(case) -> None:  # type: ignore[no-untyped-def]
    rows, arrival, batch = case
    expected = _collect(rows, 1)
    got = _collect(arrival, batch)
    key_e = sorted(zip(expected.asset, expected.step, map(tuple, expected.values), expected.reset))
    key_g = sorted(zip(got.asset, got.step, map(tuple, got.values), got.reset))
    assert key_e == key_g


def test_lateness_is_judged_at_each_readings_arrival_even_within_one_batch() -> None:
    g = FleetGrid(CFG)
    rows = both("a", 100_000, 1.0, 1.0) + both("a", 100_000 - 3_600_000, 9.0, 9.0) + both("a", 99_000, 2.0, 2.0)
    r = feed(g, rows)
    assert r.late_records.tolist() == [2, 3]  # an hour behind the newest reading seen before it
    assert g.assets["a"].next_step == (100_000 - CFG.lateness_ms) // 1000  # not dragged back an hour


def test_an_overflowed_open_sum_survives_a_json_snapshot_as_infinity() -> None:
    """orjson writes inf as null: the snapshot names it, so a restored step averages to inf, as
    the uninterrupted one does, not to a missing value."""
    import orjson

    rows = [("a", 0, 0, 1e308), ("a", 100, 0, 1e308), ("a", 200, 1, 1.0)]  # one step, feature 0 overflows
    g1 = FleetGrid(CFG)
    feed(g1, rows)
    snap = orjson.loads(orjson.dumps(g1.assets["a"].snapshot()))
    g2 = FleetGrid(CFG)
    g2.assets["a"] = AssetGrid.restore(2, snap)
    (open1,), (open2,) = g1.assets["a"].open.values(), g2.assets["a"].open.values()
    assert np.isposinf(open1.sum[0]) and np.isposinf(open2.sum[0])
    np.testing.assert_array_equal(open1.sum, open2.sum)


def test_a_carried_value_that_overflowed_survives_a_json_snapshot_as_infinity() -> None:
    """The last value carried forward is named too: inf stays inf, never-seen stays NaN."""
    import orjson

    rows = [("a", 0, 0, 1e308), ("a", 100, 0, 1e308), ("a", 4_500, 0, 1.0)]  # step 0 closes at inf
    g1 = FleetGrid(CFG)
    feed(g1, rows)
    assert np.isposinf(g1.assets["a"].last_value[0]) and np.isnan(g1.assets["a"].last_value[1])
    snap = orjson.loads(orjson.dumps(g1.assets["a"].snapshot()))
    restored = AssetGrid.restore(2, snap)
    np.testing.assert_array_equal(restored.last_value, g1.assets["a"].last_value)
