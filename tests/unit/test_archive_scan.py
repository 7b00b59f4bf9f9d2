"""Archive scan: date pruning, filters, column mapping, wide files, bounded batches, dedupe."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import storage
from pipeline.readings import DecodedBatch
from trainers.archive_scan import ArchiveError, ScanStats, scan_archive

FEATURES = ("a", "b", "c")
DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def long_rows(start_ms: int, n: int, *, assets: tuple[str, ...] = ("p1",), features: tuple[str, ...] = FEATURES,
              partition: int = 0, first_offset: int = 0, period_ms: int = 1000) -> pa.Table:
    """n readings per asset, one row per feature, value = offset + feature position / 10."""
    k = np.arange(n * len(assets))
    offset = first_offset + k
    f = len(features)
    return pa.table({
        "asset": pa.array(np.repeat(np.array(assets * n, dtype=object), f), pa.string()),
        "ts_ms": pa.array(np.repeat(start_ms + (k // len(assets)) * period_ms, f), pa.int64()),
        "feature": pa.array(list(features) * len(k), pa.string()),
        "value": pa.array(np.repeat(offset, f) + np.tile(np.arange(f), len(k)) / 10, pa.float64()),
        "partition": pa.array(np.full(len(k) * f, partition), pa.int32()),
        "offset": pa.array(np.repeat(offset, f), pa.int64()),
    })


def write(root: str, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
    fs, path = storage.resolve(root)
    target = storage.join(path, rel)
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, target, filesystem=fs, row_group_size=row_group_size)


def day_dir(day: int) -> str:
    return f"date=2026-01-{day:02d}"


def scan(root: str, **kwargs: object) -> tuple[list[DecodedBatch], ScanStats]:
    stats = ScanStats()
    opts: dict[str, object] = {"start_ms": T0, "end_ms": T0 + 10 * DAY, **kwargs}
    return list(scan_archive(root, FEATURES, stats=stats, **opts)), stats  # type: ignore[arg-type]


def joined(batches: list[DecodedBatch]) -> DecodedBatch:
    cat = np.concatenate
    return DecodedBatch(cat([b.record_index for b in batches]), cat([b.asset for b in batches]),
                        cat([b.ts_ms for b in batches]), cat([b.feature for b in batches]),
                        cat([b.value for b in batches]), [], sum(b.n_records for b in batches))


@pytest.fixture(params=["local", "mock"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "archive") if request.param == "local" else f"mock://archive-{uuid.uuid4().hex[:8]}"


def test_reads_a_long_archive_in_date_order(root: str) -> None:
    write(root, f"{day_dir(2)}/part-0.parquet", long_rows(T0 + DAY, 4, first_offset=10))
    write(root, f"{day_dir(1)}/part-0.parquet", long_rows(T0, 3, assets=("p1", "p2")))
    batches, stats = scan(root)
    got = joined(batches)
    assert got.ts_ms.tolist() == [T0] * 6 + [T0 + 1000] * 6 + [T0 + 2000] * 6 + \
        [T0 + DAY + 1000 * k for k in range(4) for _ in FEATURES]
    assert got.asset[:6].tolist() == ["p1"] * 3 + ["p2"] * 3
    assert got.feature.tolist() == [0, 1, 2] * 10
    np.testing.assert_allclose(got.value[:6], [0.0, 0.1, 0.2, 1.0, 1.1, 1.2])
    assert got.record_index.tolist() == np.repeat(np.arange(10), 3).tolist()
    assert (got.n_records, stats.records, stats.rows, stats.files, stats.duplicates) == (10, 10, 30, 2, 0)


def test_time_range_is_start_inclusive_end_exclusive_and_prunes_dates(root: str) -> None:
    for day in (1, 2, 3):
        write(root, f"{day_dir(day)}/part-0.parquet", long_rows(T0 + (day - 1) * DAY, 10, period_ms=DAY // 10))
    fs, path = storage.resolve(root)
    storage.write_bytes(fs, storage.join(path, day_dir(3), "part-9.parquet"), b"not parquet: must never be opened")
    batches, stats = scan(root, start_ms=T0 + DAY // 10, end_ms=T0 + DAY + DAY // 2)
    ts = np.unique(joined(batches).ts_ms)
    assert ts.tolist() == [T0 + k * DAY // 10 for k in range(1, 15)]
    assert stats.files == 2
    with pytest.raises(ArchiveError, match="part-9.parquet is not a readable Parquet file"):
        scan(root)


def test_asset_filter(root: str) -> None:
    write(root, f"{day_dir(1)}/part-0.parquet", long_rows(T0, 5, assets=("p1", "p2", "p3")))
    batches, stats = scan(root, assets=["p3", "p1", "nope"])
    got = joined(batches)
    assert sorted(set(got.asset.tolist())) == ["p1", "p3"]
    assert len(got) == 5 * 2 * 3 and stats.rows_read == 30


def test_unknown_features_are_skipped_and_counted_and_bad_values_dropped(root: str) -> None:
    table = long_rows(T0, 4, features=("a", "x", "c", "y"))
    values = table.column("value").to_pylist()
    values[2] = None          # reading 0, feature c
    values[4] = float("nan")  # reading 1, feature a
    write(root, f"{day_dir(1)}/part-0.parquet", table.set_column(3, "value", pa.array(values, pa.float64())))
    batches, stats = scan(root)
    got = joined(batches)
    assert stats.unknown_features == {"x": 4, "y": 4}
    assert stats.invalid == 2
    pairs = list(zip(got.record_index.tolist(), got.feature.tolist()))
    assert pairs == [(0, 0), (1, 2), (2, 0), (2, 2), (3, 0), (3, 2)]
    assert got.n_records == 4


@pytest.mark.parametrize("batch_rows", [1, 7, 50])
def test_batches_are_bounded_and_readings_keep_one_id_across_batches(root: str, batch_rows: int) -> None:
    write(root, f"{day_dir(1)}/part-0.parquet", long_rows(T0, 40, assets=("p1", "p2")), row_group_size=64)
    write(root, f"{day_dir(1)}/part-1.parquet", long_rows(T0 + 40_000, 10, first_offset=80))
    batches, stats = scan(root, batch_rows=batch_rows)
    assert max(len(b) for b in batches) <= batch_rows
    got = joined(batches)
    assert len(got) == 270 and stats.rows == 270
    assert got.record_index.tolist() == np.repeat(np.arange(90), 3).tolist()
    assert got.n_records == 90


def test_a_crash_rewrite_is_read_once(root: str) -> None:
    write(root, f"{day_dir(1)}/part-a.parquet", long_rows(T0, 100))                         # offsets 0..99
    write(root, f"{day_dir(1)}/part-b.parquet", long_rows(T0 + 50_000, 100, first_offset=50))  # 50..149 again
    write(root, f"{day_dir(1)}/part-c.parquet", long_rows(T0, 20, partition=1))              # other partition
    write(root, f"{day_dir(2)}/part-a.parquet", long_rows(T0 + DAY, 20, first_offset=60))   # other date
    batches, stats = scan(root)
    got = joined(batches)
    assert len(got) == (150 + 20 + 20) * 3
    assert stats.duplicates == 50 * 3
    values, counts = np.unique(got.value[got.ts_ms < T0 + DAY], return_counts=True)
    offsets = np.floor(values).astype(int)
    assert offsets.tolist() == np.repeat(np.arange(150), 3).tolist()
    assert counts.tolist() == [2 if o < 20 else 1 for o in offsets]  # partitions 0 and 1 share offsets 0..19


@settings(max_examples=25, deadline=None)
@given(flushes=st.lists(st.tuples(st.integers(1, 15), st.integers(1, 15), st.booleans()), min_size=1, max_size=8),
       names=st.randoms(use_true_random=False))
def test_any_sequence_of_flushes_and_crashes_is_read_exactly_once(
        flushes: list[tuple[int, int, bool]], names: random.Random) -> None:
    """An archiver consuming two partitions writes one file per flush, split by date, and after a
    crash re-consumes from its last commit; file names do not follow write order."""
    root = f"mock://archive-{uuid.uuid4().hex[:8]}"
    n = 30  # readings per partition, crossing midnight: offsets 0..19 on day 1, 20..29 on day 2

    written_files = 0

    def flush(positions: list[int], sizes: list[int]) -> list[int]:
        nonlocal written_files
        ends = [min(n, pos + size) for pos, size in zip(positions, sizes)]
        table = pa.concat_tables([long_rows(T0 + DAY - 20_000 + 1000 * pos, end - pos, partition=p, first_offset=pos)
                                  for p, (pos, end) in enumerate(zip(positions, ends))])
        before_midnight = pc.less(table.column("ts_ms"), T0 + DAY)
        for day, rows in ((1, before_midnight), (2, pc.invert(before_midnight))):
            part = table.filter(rows)
            if part.num_rows:
                write(root, f"{day_dir(day)}/part-{names.getrandbits(8):03d}-{written_files}.parquet", part)
        written_files += 1
        return ends

    consumed, committed = [0, 0], [0, 0]
    for s0, s1, crash in flushes:
        written = flush(consumed, [s0, s1])
        consumed = list(committed) if crash else written
        committed = list(consumed)
    while consumed != [n, n]:
        consumed = flush(consumed, [n, n])
    batches, _ = scan(root)
    got = joined(batches)
    keys = sorted(zip(np.round(got.value, 1).tolist(), got.feature.tolist()))
    assert keys == sorted((round(o + f / 10, 1), f) for _ in range(2) for o in range(n) for f in range(3))
    assert got.n_records == 2 * n


def test_foreign_column_names_and_types(root: str) -> None:
    write(root, f"{day_dir(1)}/x.parquet", pa.table({
        "device_id": pa.array([17, 17, 18], pa.int64()),
        "event_time": pa.array([T0 * 1000, (T0 + 1000) * 1000, (T0 + 500) * 1000], pa.timestamp("us", "UTC")),
        "sensor": pa.array(["b", "c", "a"]).dictionary_encode(),
        "reading": pa.array([1.5, 2.5, 3.5], pa.float32()),
    }))
    mapping = {"asset": "device_id", "ts_ms": "event_time", "feature": "sensor", "value": "reading"}
    batches, _ = scan(root, columns_map=mapping, assets=["17"])
    got = joined(batches)
    assert got.asset.tolist() == ["17", "17"] and got.ts_ms.tolist() == [T0, T0 + 1000]
    assert got.feature.tolist() == [1, 2] and got.value.tolist() == [1.5, 2.5]
    assert got.record_index.tolist() == [0, 1]


def test_wide_archives_are_detected_by_the_missing_feature_column(root: str) -> None:
    write(root, "part-0.parquet", pa.table({  # no date directories: scanned whole
        "asset": ["p1", "p2", "p1", None],
        "ts_ms": pa.array([T0, T0, T0 + 1000, T0 + 1000], pa.int64()),
        "c": [1.0, None, 3.0, 4.0],
        "a": [10.0, 20.0, None, 40.0],
        "other": [0.0, 0.0, 0.0, 0.0],
    }))
    batches, stats = scan(root, batch_rows=4)
    assert max(len(b) for b in batches) <= 4
    got = joined(batches)
    assert list(zip(got.record_index.tolist(), got.asset.tolist(), got.feature.tolist(), got.value.tolist())) == [
        (0, "p1", 0, 10.0), (0, "p1", 2, 1.0), (1, "p2", 0, 20.0), (2, "p1", 2, 3.0)]
    assert stats.invalid == 1 and got.n_records == 3


def test_hidden_and_temporary_files_are_ignored(root: str) -> None:
    write(root, f"{day_dir(1)}/part-0.parquet", long_rows(T0, 2))
    fs, path = storage.resolve(root)
    for junk in (".part-1.parquet", "part-2.parquet.tmp", "_SUCCESS", "_temporary/part-3.parquet"):
        storage.write_bytes(fs, storage.join(path, day_dir(1), junk), b"garbage")
    batches, stats = scan(root)
    assert len(joined(batches)) == 6 and stats.files == 1


def test_errors_are_clear(root: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no archive"):
        scan(str(tmp_path / "missing"))
    write(root, f"{day_dir(1)}/part-0.parquet", long_rows(T0, 2).drop_columns(["asset"]))
    with pytest.raises(ArchiveError, match="no column 'asset'"):
        scan(root)
    with pytest.raises(ArchiveError, match="unknown column 'assets'"):
        scan(root, columns_map={"assets": "x"})
    with pytest.raises(ArchiveError, match="before start_ms"):
        scan(root, start_ms=T0 + 1, end_ms=T0)


def test_rows_without_a_kafka_position_are_told_apart_by_asset_and_time(root: str) -> None:
    """A backfill in the archive's own columns, positions left empty: each row is its own asset's."""
    n = 50
    table = long_rows(T0, n, assets=("A", "B"))
    table = table.set_column(table.schema.get_field_index("partition"), "partition", pa.nulls(len(table), pa.int32()))
    table = table.set_column(table.schema.get_field_index("offset"), "offset", pa.nulls(len(table), pa.int64()))
    write(root, f"{day_dir(1)}/backfill.parquet", table)
    batches, stats = scan(root, batch_rows=64)
    got = joined(batches)
    assert stats.records == 2 * n and stats.duplicates == 0
    for asset in ("A", "B"):
        rows = got.asset == asset
        assert rows.sum() == n * len(FEATURES)
        # every record's rows carry one asset: no value of A under B or the reverse
        assert set(got.record_index[rows].tolist()).isdisjoint(got.record_index[~rows].tolist())


def test_a_damaged_file_is_named_in_the_error(root: str, tmp_path: Path) -> None:
    write(root, f"{day_dir(1)}/good.parquet", long_rows(T0, 100))
    write(root, f"{day_dir(1)}/damaged.parquet", long_rows(T0 + 200_000, 2000), row_group_size=500)
    fs, path = storage.resolve(root)
    target = storage.join(path, f"{day_dir(1)}/damaged.parquet")
    data = bytearray(storage.read_bytes(fs, target))
    data[100:400] = bytes(300)  # a page header of the first row group
    with fs.open_output_stream(target) as fh:
        fh.write(bytes(data))
    with pytest.raises(ArchiveError, match="damaged.parquet"):
        scan(root)


def with_epoch(table: pa.Table, epoch: int) -> pa.Table:
    return table.append_column("leader_epoch", pa.array(np.full(table.num_rows, epoch), pa.int32()))


def test_offsets_written_again_under_a_later_leader_epoch_are_new_readings(root: str) -> None:
    """A log truncated under its topic id (an unclean leader election) numbers new records from the
    truncation point again, under a later leader epoch: those are kept; a rewrite of the same records
    (same epoch) and files written before epochs were archived (any epoch) still read once."""
    write(root, f"{day_dir(1)}/part-a.parquet", with_epoch(long_rows(T0, 100), 0))                  # 0..99
    write(root, f"{day_dir(1)}/part-b.parquet", with_epoch(long_rows(T0, 100, first_offset=50), 1))  # new 50..149
    write(root, f"{day_dir(1)}/part-c.parquet", with_epoch(long_rows(T0, 30, first_offset=120), 1))  # rewrite
    write(root, f"{day_dir(1)}/part-d.parquet", long_rows(T0, 10, first_offset=140))               # no epochs: 140..149
    write(root, f"{day_dir(2)}/part-a.parquet", long_rows(T0 + DAY, 10))                           # no epochs: 0..9
    write(root, f"{day_dir(2)}/part-b.parquet", with_epoch(long_rows(T0 + DAY, 20), 3))             # 0..9 again, 10..19
    batches, stats = scan(root)
    got = joined(batches)
    assert got.n_records == 100 + 100 + 20
    assert stats.duplicates == (30 + 10 + 10) * 3
    first_day = np.floor(got.value[got.ts_ms < T0 + DAY]).astype(int)
    assert np.bincount(first_day, minlength=150)[50:100].tolist() == [6] * 50  # offsets 50..99 twice, 3 values each


def test_epochs_kafka_cannot_have_count_as_unknown(root: str) -> None:
    """An archive written by others may hold any integers there: they match every epoch, as no epoch does."""
    write(root, f"{day_dir(1)}/part-a.parquet", with_epoch(long_rows(T0, 10), 0))
    write(root, f"{day_dir(1)}/part-b.parquet", long_rows(T0, 20).append_column(
        "leader_epoch", pa.array([-2] * 30 + [2**32 - 1] * 30, pa.int64())))  # offsets 0..9 again, 10..19
    batches, stats = scan(root)
    assert joined(batches).n_records == 20 and stats.duplicates == 10 * 3


def test_a_batch_without_rows_is_checked_against_existing_coverage() -> None:
    """The Parquet reader may hand over an empty batch (every row filtered out) after a file was read."""
    from trainers.archive_scan import _Coverage

    seen = _Coverage()
    seen.add("t", {(0, 0): (0, 9)})
    empty = np.empty(0, np.int64)
    assert seen.contains("t", empty, empty, empty).tolist() == []
