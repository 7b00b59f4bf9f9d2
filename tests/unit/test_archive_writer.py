"""The archive writer's temporary files: where they are written, that a failed write leaves
none, and the sweep of those a killed run left (the kill itself: tests/integration/test_archiver.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from consumers import archiver
from consumers.archiver import TMP_DIR, ArchiveWriter, Rows
from pipeline import storage

FEATURES = ("a", "b", "c")
MIDNIGHT = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(params=["local", "mock"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "archive") if request.param == "local" else f"mock://archive-{uuid.uuid4().hex[:8]}"


def rows(first_offset: int, n: int, start_ms: int) -> Rows:
    """``n`` readings of one asset, one second apart, three values each."""
    ts = np.repeat(start_ms + 1000 * np.arange(n, dtype=np.int64), 3)
    return Rows(np.full(3 * n, "pump-1", dtype=object), ts, np.tile(np.arange(3, dtype=np.int32), n),
                np.arange(3 * n, dtype=np.float64), np.repeat(first_offset + np.arange(n, dtype=np.int64), 3))


def files_under(uri: str) -> list[str]:
    """Every file under ``uri``, hidden ones included."""
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        return []
    return sorted(i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File)


def test_files_go_through_the_groups_temporary_directory_and_none_is_left(root: str) -> None:
    writer = ArchiveWriter(root, FEATURES, group="plant.archiver/1")
    fs, path = storage.resolve(root)
    assert writer.tmp_dir == storage.join(path, TMP_DIR, "plant_archiver_1")
    written = writer.write(2, rows(100, 20, MIDNIGHT - 10_000))  # ten readings on each side of midnight
    assert [p[len(path) + 1:] for p in written] == files_under(root)
    assert [f.split("/")[0] for f in files_under(root)] == ["date=2025-12-31", "date=2026-01-01"]
    assert sum(pq.read_metadata(p, filesystem=fs).num_rows for p in written) == 60


def test_a_failed_write_leaves_no_file(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(table: Any, where: str, *args: Any, filesystem: Any = None, **kwargs: Any) -> None:
        with filesystem.open_output_stream(where) as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(archiver.pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ArchiveWriter(root, FEATURES).write(0, rows(0, 5, MIDNIGHT))
    assert files_under(root) == []


def test_the_sweep_deletes_only_what_other_runs_left_for_the_given_partitions(root: str) -> None:
    writer = ArchiveWriter(root, FEATURES, group="plantwatch-archiver")
    assert writer.sweep([0, 1]) == []  # nothing written yet: no temporary directory
    fs, path = storage.resolve(root)

    def tmp(run: str, partition: int, group: str = "plantwatch-archiver") -> str:
        name = f"{run}-part-20260101T000000000000Z-{partition:05d}-{7:019d}.parquet.tmp"
        return f"{TMP_DIR}/{group}/{name}"

    leftovers = [tmp("0badc0de", 1), tmp("0badc0de", 3), tmp("12345678", 3)]
    kept = [tmp("0badc0de", 2),  # a partition not assigned: another member may be writing it
            tmp(writer.run, 1),  # this run's own
            tmp("0badc0de", 1, group="other-group"),  # another consumer group's
            f"{TMP_DIR}/plantwatch-archiver/notes.tmp",  # not an archiver's name
            "date=2026-01-01/.part-20260101T000000000000Z-00001-0000000000000000007.parquet.tmp"]
    for rel in leftovers + kept:
        storage.write_bytes(fs, storage.join(path, rel), b"half a file")
    assert sorted(writer.sweep([1, 3])) == sorted(storage.join(path, rel) for rel in leftovers)
    assert files_under(root) == sorted(kept)
    assert writer.sweep([1, 3]) == []


def test_offsets_of_a_topic_created_again_are_new_readings_and_a_rewrite_within_one_topic_is_not(root: str) -> None:
    """A topic deleted and created again (or a broker started afresh on memory storage) numbers
    its records from 0 again: its files are stamped with the new topic id, and the scan drops
    only what repeats offsets within one id. Unstamped files (a broker without topic ids) are one topic."""
    from trainers.archive_scan import ScanStats, scan_archive

    w = ArchiveWriter(root, FEATURES)
    w.write(0, rows(0, 100, MIDNIGHT), topic_id="topic-a")
    w.write(0, rows(0, 100, MIDNIGHT + 200_000), topic_id="topic-b")   # offsets 0..99 again, later readings
    w.write(0, rows(50, 100, MIDNIGHT + 50_000), topic_id="topic-a")   # a rewrite: 50..99 again, then 100..149
    w.write(0, rows(0, 10, MIDNIGHT + 400_000))                         # unstamped
    w.write(0, rows(5, 10, MIDNIGHT + 405_000))                         # unstamped rewrite of 5..9, then 10..14
    fs, path = storage.resolve(root)
    stamped = [pq.read_schema(storage.join(path, f), filesystem=fs).metadata for f in files_under(root)]
    assert sorted((m or {}).get(b"plantwatch.topic_id", b"") for m in stamped) == [b"", b"", b"topic-a", b"topic-a",
                                                                                   b"topic-b"]
    stats = ScanStats()
    batches = list(scan_archive(root, FEATURES, start_ms=MIDNIGHT, end_ms=MIDNIGHT + 86_400_000, stats=stats))
    assert sum(b.n_records for b in batches) == 150 + 100 + 15
    assert stats.duplicates == (50 + 5) * 3


def test_readings_polled_before_and_after_the_topic_was_created_again_are_stamped_with_their_own_ids(
        tmp_path: Path) -> None:
    """The id is the one the client knew when the records were polled, not at the flush: one flush
    holding the old topic's offsets 900..999 and the new one's 0..99 writes a file for each, so the
    new topic's later offsets 100..999 are not taken for duplicates."""
    from types import SimpleNamespace

    from kafka import TopicPartition
    from kafka.future import Future

    from consumers.archiver import Archiver
    from pipeline.readings import encode_wide
    from pipeline.settings import load_settings
    from trainers.archive_scan import ScanStats, scan_archive

    settings = load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")})
    features = settings.model.features
    ids = {settings.topics.readings: "topic-a"}
    archiver = Archiver(settings)
    cluster = SimpleNamespace(topic_id=ids.get, request_update=lambda: Future().success(None),  # refreshed at once
                              metadata_refresh_in_progress=False)
    archiver.consumer = SimpleNamespace(_client=SimpleNamespace(cluster=cluster))
    tp = TopicPartition(settings.topics.readings, 0)

    def records(first: int, n: int, start_ms: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(offset=first + i, timestamp=start_ms + 1000 * i, partition=0,
                                value=encode_wide("pump-1", start_ms + 1000 * i, {f: 1.0 for f in features}))
                for i in range(n)]

    archiver.add({tp: records(900, 100, MIDNIGHT)})
    ids[tp.topic] = "topic-b"  # the client's metadata now names the topic created again
    archiver.add({tp: records(0, 100, MIDNIGHT + 200_000)})
    assert [tid for tid, _ in archiver.pending[tp].chunks] == ["topic-a", "topic-b"]
    archiver.flush()
    archiver.add({tp: records(100, 900, MIDNIGHT + 300_000)})
    archiver.flush()
    stats = ScanStats()
    got = sum(b.n_records for b in scan_archive(settings.archive.uri, features, start_ms=MIDNIGHT,
                                                end_ms=MIDNIGHT + 86_400_000, stats=stats))
    assert (got, stats.duplicates, stats.files) == (1100, 0, 3)


def test_a_retried_write_makes_the_days_an_earlier_try_wrote_durable_too(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first try writes the first day and fails on the second; the retry skips the first day's file
    but still flushes its directory, whose offsets are committed once the retry returns."""
    root = str(tmp_path / "archive")
    synced: list[str] = []
    fsync = storage.fsync
    monkeypatch.setattr(storage, "fsync", lambda fs, path: (synced.append(path), fsync(fs, path))[1])
    write_table, calls = archiver.pq.write_table, []

    def second_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("input/output error")
        write_table(*args, **kwargs)

    monkeypatch.setattr(archiver.pq, "write_table", second_fails)
    writer, done = ArchiveWriter(root, FEATURES), set()
    with pytest.raises(OSError):
        writer.write(0, rows(0, 10, MIDNIGHT - 5_000), done=done)  # five readings on each side of midnight
    assert len(done) == 1
    synced.clear()
    assert [p.split("/")[-2] for p in writer.write(0, rows(0, 10, MIDNIGHT - 5_000), done=done)] == ["date=2026-01-01"]
    assert {p.rsplit("/", 1)[-1] for p in synced} >= {"date=2025-12-31", "date=2026-01-01", "archive"}
