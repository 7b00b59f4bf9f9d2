"""Exact recovery without a broker: the checkpoint bookkeeping and the state snapshot pair.

The detector's poll → produce → checkpoint → commit sequence is replayed here by hand: an
uninterrupted engine and one that "crashes" at every possible point and recovers through
snapshots, committed offsets and progress records must publish the same alert events.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from pipeline.checkpoint import Checkpoints, Restored
from pipeline.engine import DetectionEngine
from pipeline.readings import decode_batch, encode_wide
from pipeline.settings import GridSettings
from pipeline.state import read_snapshot_header

FEATURES = ("a", "b")


def test_plan_drops_records_already_in_a_snapshot_and_silences_published_outputs() -> None:
    cp = Checkpoints(interval_ms=1000)
    cp.assign(0, committed=10, restored=Restored({"x": 14, "y": 8}, emitted=16))
    offsets = np.arange(10, 20)
    keys = np.array(["x", "y"] * 5, dtype=object)
    plan = cp.plan(np.zeros(10, np.int64), offsets, keys)
    # x's records below 14 are in its snapshot; y's snapshot is older than the commit
    assert plan.process.tolist() == [False, True, False, True, True, True, True, True, True, True]
    # outputs of records below 16 were published
    assert plan.silent.tolist() == [False, True, False, True, True, True, False, False, False, False]


def test_records_of_partitions_not_owned_are_never_processed() -> None:
    cp = Checkpoints(interval_ms=1000)
    cp.assign(1, committed=0, restored=Restored())
    plan = cp.plan(np.array([0, 1]), np.array([5, 5]), np.array(["a", "b"], dtype=object))
    assert plan.process.tolist() == [False, True]


def test_checkpoint_covers_changed_assets_and_revoke_returns_the_partitions_assets() -> None:
    cp = Checkpoints(interval_ms=1000)
    cp.assign(0, committed=-1, restored=Restored())
    cp.assign(1, committed=7, restored=Restored({"z": 7}))
    assert not cp.has_pending()
    cp.processed(0, 5, ["a", "b"])
    assert cp.has_pending()
    assert cp.pending() == {0: (5, ["a", "b"])}
    assert cp.published([0, 1]) == {0: 5}
    assert cp.published([0]) == {}  # nothing new
    assert cp.begin() == {0: (5, ["a", "b"])}
    cp.processed(0, 6, ["b"])  # changed while the checkpoint's snapshots are on their way
    cp.checkpointed({0: 5}, now_ms=0)
    assert cp.pending() == {0: (6, ["b"])}  # b goes into the next one
    cp.begin()
    cp.checkpointed({0: 6}, now_ms=0)
    assert cp.pending() == {} and not cp.has_pending()
    assert sorted(cp.revoke([0, 1])) == ["a", "b", "z"]
    assert cp.owned == []


def test_a_log_that_began_again_below_the_position_is_read_as_new() -> None:
    """Records below a partition's position come only from a log that began again under the client
    (a topic created again): processed and published, with every asset snapshotted again at the new
    position, and the snapshots restored for the old log no longer drop anything."""
    cp = Checkpoints(interval_ms=1000)
    cp.assign(0, committed=100, restored=Restored({"x": 120}, emitted=130))
    cp.assign(1, committed=50, restored=Restored())
    cp.processed(0, 140, ["x", "y"])
    cp.processed(1, 60, ["z"])
    cp.begin()
    in_flight = cp.cursors[0]
    partitions, offsets = np.array([0, 0, 1]), np.array([0, 1, 60])
    assert cp.restarted(partitions, offsets) == {0: 0}  # partition 1 goes on from its position
    cp.restart(0, 0)
    assert cp.cursors[0] is not in_flight  # the checkpoint begun on the old log does not commit it
    plan = cp.plan(partitions, offsets, np.array(["x", "x", "z"], dtype=object))
    assert plan.process.tolist() == [True, True, True] and not plan.silent.any()
    cp.processed(0, 2, ["x"])
    assert cp.pending()[0] == (2, ["x", "y"])  # x and y: snapshotted again at the new position
    assert cp.restarted(np.array([0]), np.array([2])) == {}


def test_due_after_the_interval() -> None:
    cp = Checkpoints(interval_ms=1000)
    assert not cp.due(0)
    assert not cp.due(999)
    assert cp.due(1000)
    cp.checkpointed({}, now_ms=1000)
    assert not cp.due(1500)


def test_snapshot_round_trip_continues_exactly(tiny_bundle: Any) -> None:
    a, b = DetectionEngine(tiny_bundle, GridSettings()), DetectionEngine(tiny_bundle, GridSettings())
    first, second = _batches(tiny_bundle, 0, 300), _batches(tiny_bundle, 300, 600)
    a.process(first)
    blobs = a.state.snapshot(sorted(a.state.index), {"model_version": "v"})
    assert read_snapshot_header(blobs[0])["model_version"] == "v"
    for blob in blobs:
        b.state.restore(blob)
    out_a, out_b = a.process(second), b.process(second)
    np.testing.assert_array_equal(out_a.step, out_b.step)
    np.testing.assert_allclose(out_a.alert_score, out_b.alert_score, rtol=1e-6)
    assert [e.to_dict() for e in out_a.events] == [e.to_dict() for e in out_b.events]


def test_more_snapshots_than_a_fresh_state_has_rows_restore_each_asset_whole(tiny_bundle: Any) -> None:
    """Restoring grows the state's arrays past their first size: every row lands in the new ones."""
    a, b = DetectionEngine(tiny_bundle, GridSettings()), DetectionEngine(tiny_bundle, GridSettings())
    a.process(_batches(tiny_bundle, 0, 40, assets=150))
    assets = sorted(a.state.index)
    for blob in a.state.snapshot(assets):
        b.state.restore(blob)
    again = b.state.snapshot(assets)
    assert [x[8 + struct.unpack(">I", x[4:8])[0]:] for x in again] == \
        [x[8 + struct.unpack(">I", x[4:8])[0]:] for x in a.state.snapshot(assets)]


def test_restore_refuses_bytes_that_are_not_a_snapshot_of_this_layout(tiny_bundle: Any) -> None:
    e = DetectionEngine(tiny_bundle, GridSettings())
    e.process(_batches(tiny_bundle, 0, 50))
    blob = e.state.snapshot(["p0"])[0]
    with pytest.raises(ValueError):
        e.state.restore(b"garbage")
    with pytest.raises(ValueError):
        e.state.restore(blob + b"x")


@pytest.mark.parametrize("damage", ["trailing byte", "short", "unreadable grid"])
def test_a_refused_snapshot_leaves_no_state_of_its_asset_behind(tiny_bundle: Any, damage: str) -> None:
    """The detector lets an asset whose snapshot is refused start afresh and re-reads its records:
    state half-written from the refused bytes would count those records twice."""
    e = DetectionEngine(tiny_bundle, GridSettings())
    e.process(_batches(tiny_bundle, 0, 50))
    (blob,) = e.state.snapshot(["p0"])
    if damage == "trailing byte":
        blob += b"x"
    elif damage == "short":
        blob = blob[:-40]
    else:
        head = read_snapshot_header(blob)
        raw = json.dumps({**head, "grid": {"next_step": 1}}).encode()
        blob = blob[:4] + struct.pack(">I", len(raw)) + raw + blob[8 + struct.unpack(">I", blob[4:8])[0]:]
    fresh = DetectionEngine(tiny_bundle, GridSettings())
    with pytest.raises(ValueError):
        fresh.state.restore(blob)
    assert "p0" not in fresh.state.index and "p0" not in fresh.state.grid.assets


def test_a_header_orjson_refuses_is_written_and_read_by_the_standard_encoder(tiny_bundle: Any) -> None:
    """Snapshot headers are orjson; an asset id with a lone surrogate falls back, and a header of
    a feature never seen (NaN last value) reads back as NaN either way."""
    e = DetectionEngine(tiny_bundle, GridSettings())
    e.process(_batches(tiny_bundle, 0, 50))
    (blob,) = e.state.snapshot(["p0"])
    head = read_snapshot_header(blob)
    odd = {**head, "asset": "pump\udc80", "grid": {**head["grid"], "last_value": [float("nan")] * 2}}
    raw = json.dumps(odd, separators=(",", ":")).encode()
    back = read_snapshot_header(blob[:4] + struct.pack(">I", len(raw)) + raw)
    assert back["asset"] == "pump\udc80" and np.isnan(back["grid"]["last_value"]).all()
    from pipeline import fast_json

    assert json.loads(fast_json.dumps(odd))["asset"] == "pump\udc80"
    with pytest.raises(ValueError, match="not JSON"):
        read_snapshot_header(blob[:8] + b"}" + blob[9:])


def _batches(bundle: Any, start: int, end: int, assets: int = 3) -> Any:
    rng = np.random.default_rng(start)
    values = []
    for t in range(start, end):
        for i in range(assets):
            v = {f: float(np.sin(t / 7 + i) + 0.05 * rng.normal()) for f in bundle.features}
            if 400 <= t < 430 and i == 1:
                v = {f: x + 4.0 for f, x in v.items()}  # an anomaly that opens and closes an alert
            values.append(encode_wide(f"p{i}", 1_700_000_000_000 + t * 1000, v))
    return decode_batch(values, bundle.features)


@pytest.mark.parametrize("spread", [False, True], ids=["at_once", "spread_over_polls"])
@pytest.mark.parametrize("crash_after", [1, 3, 4, 5, 7, 10])
def test_crash_at_any_poll_then_recovery_publishes_the_same_events(tiny_bundle: Any, crash_after: int,
                                                                    spread: bool) -> None:
    """Polls of 60 records; a checkpoint every 3 polls; the process dies after ``crash_after``
    polls having published their outputs; the successor restores and must publish exactly the
    events the uninterrupted run publishes after the crash point — no more, no fewer.

    ``spread``: as the detector spreads a checkpoint over polls, one asset's snapshot is taken at
    the checkpoint, the other's a poll later at the position reached then, and the checkpoint's
    own position is committed after both."""
    records = _records(tiny_bundle, 0, 800)
    polls = [list(range(i, min(i + 60, len(records)))) for i in range(0, len(records), 60)]

    reference = _run(tiny_bundle, records, polls)
    assert any(e["state"] == "close" for e in reference)

    # The first process: runs crash_after polls, checkpointing every 3.
    log: dict[str, Any] = {"snapshots": {}, "committed": -1, "emitted": -1}
    published = _run(tiny_bundle, records, polls[:crash_after], log=log, spread=spread)
    # The successor: restores, reads from the committed offset to the end.
    engine = DetectionEngine(tiny_bundle, GridSettings())
    positions = {}
    for asset, (pos, blob) in log["snapshots"].items():
        engine.state.restore(blob)
        positions[asset] = pos
    cp = Checkpoints(interval_ms=0)
    cp.assign(0, committed=max(0, log["committed"]), restored=Restored(positions, log["emitted"]))
    rest = [[i for i in poll if i >= max(0, log["committed"])] for poll in polls]
    published += _run(tiny_bundle, records, [p for p in rest if p], engine=engine, cp=cp)
    assert published == reference


def _records(bundle: Any, start: int, end: int) -> list[tuple[str, bytes]]:
    """Two assets like the tiny model's training data, one with a fault that opens and closes alerts."""
    from tests.unit.conftest import sine_frame

    t0 = 1_700_000_600_000
    f = sine_frame((end - start) // 2, assets=("p1", "p2"), seed=5, start_ms=t0)
    fault = (f.asset == "p2") & (f.ts >= t0 + 150_000) & (f.ts < t0 + 180_000)
    f.loc[fault, "a"] += 3
    f.loc[fault, "c"] -= 10
    return [(r.asset, encode_wide(r.asset, int(r.ts), {k: float(getattr(r, k)) for k in bundle.features}))
            for r in f.itertuples()]


def _run(bundle: Any, records: list[tuple[str, bytes]], polls: list[list[int]], *, log: dict[str, Any] | None = None,
         engine: DetectionEngine | None = None, cp: Checkpoints | None = None,
         spread: bool = False) -> list[dict[str, Any]]:
    """Drive the detector's per-poll sequence over one partition; returns published events."""
    engine = engine or DetectionEngine(bundle, GridSettings())
    if cp is None:
        cp = Checkpoints(interval_ms=0)
        cp.assign(0, committed=-1, restored=Restored())
    published: list[dict[str, Any]] = []
    later: list[tuple[int, list[str]]] = []  # a spread checkpoint's snapshots still to take
    for n, poll in enumerate(polls, 1):
        offsets = np.array(poll, np.int64)
        keys = np.array([records[i][0] for i in poll], dtype=object)
        plan = cp.plan(np.zeros(len(poll), np.int64), offsets, keys)
        todo = offsets[plan.process]
        silent = plan.silent[plan.process]
        batch = decode_batch([records[i][1] for i in todo], bundle.features)
        quiet = silent[batch.record_index]
        if quiet.any():
            engine.process(batch.select(quiet), record_pos=todo)
        out = engine.process(batch.select(~quiet), record_pos=todo)
        published += [e.to_dict() for e in out.events]
        cp.processed(0, int(offsets[-1]) + 1, set(batch.asset.tolist()))
        emitted = cp.published([0])
        if log is not None:
            log["emitted"] = max(log["emitted"], emitted.get(0, -1))
            if later:  # the rest of a spread checkpoint, at the position reached now
                begun_at, assets = later.pop()
                for a, blob in zip(assets, engine.state.snapshot(assets)):
                    log["snapshots"][a] = (cp.cursors[0].position, blob)
                log["committed"] = begun_at
                cp.checkpointed({0: begun_at}, now_ms=0)
            if n % 3 == 0:
                for p, (position, assets) in cp.begin().items():
                    now, rest = (assets[:1], assets[1:]) if spread else (assets, [])
                    for a, blob in zip(now, engine.state.snapshot(now)):
                        log["snapshots"][a] = (position, blob)
                    if rest:
                        later.append((position, rest))
                    else:
                        log["committed"] = position
                        cp.checkpointed({0: position}, now_ms=0)
    return published


def test_an_asset_with_readings_but_no_closed_step_snapshots_restores_and_drops(tiny_bundle: Any) -> None:
    a, b = DetectionEngine(tiny_bundle, GridSettings()), DetectionEngine(tiny_bundle, GridSettings())
    one = decode_batch([encode_wide("new", 1_700_000_000_000, dict.fromkeys(tiny_bundle.features, 1.0))],
                       tiny_bundle.features)
    assert len(a.process(one)) == 0  # its first step is still open
    (blob,) = a.state.snapshot(["new"])
    b.state.restore(blob)
    assert b.state.grid.assets["new"].open  # the open step travelled
    a.state.drop(["new"])
    assert "new" not in a.state.grid.assets and "new" not in a.state.index
