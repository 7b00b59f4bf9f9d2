"""The archiver against a real broker: every reading lands in the archive exactly once as the
trainer's scan reads it, through a rewrite after lost commits, ``kill -9`` and a graceful stop."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from kafka import TopicPartition

from consumers.archiver import SCHEMA, Archiver
from consumers.kafka_clients import make_consumer, make_producer
from consumers.simulator_feed import feed
from consumers.topics import ensure_topics, standard_topics
from pipeline import storage
from pipeline.readings import encode_wide
from pipeline.settings import Settings, to_dict
from pipeline.simulate import PlantConfig, PlantSimulator
from trainers.archive_scan import ScanStats, scan_archive

from . import faults
from .plant import produce, recreate_readings_topic, running, wait_until

REPO = pathlib.Path(__file__).resolve().parents[2]
MIDNIGHT = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the streams below cross it
PLANT = PlantConfig(n_assets=4, period_ms=1000, seed=11)
FEATURES = PLANT.features
FILE_NAME = re.compile(r"part-\d{8}T\d{12}Z-(\d{5})-(\d{19})\.parquet")
ARCHIVE_FILE = re.compile(r"date=\d{4}-\d{2}-\d{2}/" + FILE_NAME.pattern)
Row = tuple[str, int, str, float]


def archive_settings(settings_for: Any, broker: Any, **overrides: object) -> Settings:
    s = settings_for(broker, {"kafka.session_timeout_ms": 3000, "kafka.heartbeat_interval_ms": 1000,
                              "archive.flush_seconds": 0.3, **overrides})
    ensure_topics(s, standard_topics(s))
    return s


def expected_rows(start_ms: int, end_ms: int) -> list[Row]:
    frame = PlantSimulator(PLANT).frame(start_ms, end_ms)
    long = frame.melt(id_vars=["asset", "ts_ms"], value_vars=list(FEATURES), var_name="feature")
    return list(zip(long["asset"].tolist(), long["ts_ms"].tolist(), long["feature"].tolist(), long["value"].tolist()))


def archived_rows(s: Settings, stats: ScanStats) -> list[Row]:
    rows: list[Row] = []
    for b in scan_archive(s.archive.uri, FEATURES, start_ms=MIDNIGHT - 86_400_000, end_ms=MIDNIGHT + 86_400_000,
                          stats=stats):
        rows += zip(b.asset.tolist(), b.ts_ms.tolist(), [FEATURES[f] for f in b.feature.tolist()], b.value.tolist())
    return rows


def assert_archived_once(got: list[Row], want: list[Row]) -> None:
    keys = {r[:3] for r in got}
    assert len(keys) == len(got), f"{len(got) - len(keys)} duplicate (asset, ts, feature) rows"
    missing, extra = set(want) - set(got), set(got) - set(want)
    assert not missing and not extra, \
        f"{len(missing)} missing (e.g. {sorted(missing)[:2]}), {len(extra)} unexpected (e.g. {sorted(extra)[:2]})"


def committed_total(s: Settings) -> int:
    consumer = make_consumer(s, group_id=s.archive.group_id)
    try:
        topic = s.topics.readings
        return sum(consumer.committed(TopicPartition(topic, p)) or 0
                   for p in consumer.partitions_for_topic(topic) or set())
    finally:
        consumer.close(autocommit=False)


def archive_files(s: Settings) -> list[str]:
    """Every file under the archive root, hidden and temporary ones included."""
    fs, root = storage.resolve(s.archive.uri)
    if not storage.exists(fs, root):
        return []
    return sorted(i.path[len(root):].lstrip("/") for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                  if i.type == pafs.FileType.File)


@contextmanager
def archiver_thread(s: Settings) -> Iterator[Archiver]:
    stop = threading.Event()
    with running(Archiver(s, stop=stop), stop) as archiver:
        yield archiver


# ``plantwatch archive`` that, once it has written ``after`` files, stops half-way through the
# next one: it writes half of the file's bytes to the temporary path, fsyncs them, names that
# path in the file ``paused`` and waits to be killed.
_PAUSING_ARCHIVE = """
import os, sys, time
import pyarrow as pa
import pyarrow.parquet as pq
from cli.main import main

paused, after = sys.argv[1], int(sys.argv[2])
written = 0
write_table = pq.write_table

def pausing_write_table(table, where, *args, filesystem=None, **kwargs):
    global written
    if written < after:
        write_table(table, where, *args, filesystem=filesystem, **kwargs)
        written += 1
        return
    sink = pa.BufferOutputStream()
    write_table(table, sink, *args, **kwargs)
    data = sink.getvalue().to_pybytes()
    with open(where, "wb") as fh:
        fh.write(data[:len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    with open(paused + ".part", "w") as fh:
        fh.write(where)
    os.rename(paused + ".part", paused)
    time.sleep(600)
    os._exit(3)

pq.write_table = pausing_write_table
sys.exit(main(sys.argv[3:]))
"""


def archive_process(s: Settings, log: pathlib.Path, *args: str,
                    pause: tuple[pathlib.Path, int] | None = None) -> subprocess.Popen[bytes]:
    """``plantwatch archive`` with every non-default setting of ``s`` as a ``--set`` flag;
    ``pause=(path, n)``: one that stops half-way through a file after ``n`` files (see above)."""
    mine, default = to_dict(s, redact=False), to_dict(Settings(), redact=False)
    flags = [f"--set={section}.{key}={_flag_value(v)}"
             for section, values in mine.items() for key, v in values.items() if v != default[section][key]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    launch = ["-m", "cli"] if pause is None else ["-c", _PAUSING_ARCHIVE, str(pause[0]), str(pause[1])]
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *launch, "archive", "--log-format=json", *flags, *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _flag_value(v: object) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def alive(proc: subprocess.Popen[bytes], log: pathlib.Path) -> bool:
    """True while the archiver runs; its log in the failure when it stopped on its own."""
    if proc.poll() is not None:
        raise AssertionError(f"archiver exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
    return True


def exit_code(proc: subprocess.Popen[bytes], log: pathlib.Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"archiver did not exit in {timeout_s} s; log:\n{log.read_text()[-3000:]}") from None


def test_every_reading_is_archived_once_split_by_date_and_bad_records_are_counted(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 2500, "kafka.max_poll_records": 1000})
    start, end = MIDNIGHT - 2_500_000, MIDNIGHT + 2_500_000
    total = produce(s, PlantSimulator(PLANT), start, end)
    assert total == 20_000
    producer = make_producer(s)
    for value in [b"{not json", b'{"asset": "pump-001", "values": {"Current": 1.0}}',  # the second has no ts
                  encode_wide("pump-002", end, {"Bogus": 1.0}),
                  encode_wide("pump-003", end, {"Current": 1.5, "Bogus": 2.0})]:  # archived without Bogus
        producer.send(s.topics.readings, key=b"pump-003", value=value)
    producer.flush()
    producer.close()

    with archiver_thread(s) as archiver:
        wait_until(lambda: committed_total(s) == total + 4, 60, "every offset committed")
    assert archiver.stats.rejects == {"malformed_json": 1, "missing_field": 1, "unknown_feature": 1}
    assert (archiver.stats.readings, archiver.stats.rows) == (total + 1, total * 8 + 1)

    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end) + [("pump-003", end, "Current", 1.5)])
    assert stats.duplicates == 0 and stats.unknown_features == {}

    files = archive_files(s)
    assert {f.split("/")[0] for f in files} == {"date=2025-12-31", "date=2026-01-01"}
    fs, root = storage.resolve(s.archive.uri)
    first_offsets: dict[tuple[str, int], list[int]] = {}
    for f in files:
        day, name = f.split("/")
        match = FILE_NAME.fullmatch(name)
        assert match, f"unexpected file {f}"
        meta = pq.read_metadata(storage.join(root, f), filesystem=fs)
        assert meta.schema.to_arrow_schema().remove_metadata() == SCHEMA
        epochs = pq.read_table(storage.join(root, f), filesystem=fs, columns=["leader_epoch"]).column(0)
        assert pc.min(epochs).as_py() >= 0  # the client's leader epoch of each record, not "unknown"
        first_offsets.setdefault((day, int(match[1])), []).append(int(match[2]))
    assert stats.files == len(files) > 8
    # names sort in write order: within a date, each partition's files follow its offsets
    assert all(offsets == sorted(offsets) and len(set(offsets)) == len(offsets) for offsets in first_offsets.values())


def test_a_rewrite_after_commits_were_lost_is_read_once(broker: Any, settings_for: Any, topic_prefix: str) -> None:
    """Files in place but offsets never committed (a crash between the move and the commit):
    the next archiver writes the readings again, in later files with other boundaries."""
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 1500})
    start, end = MIDNIGHT - 1_000_000, MIDNIGHT + 1_000_000
    total = produce(s, PlantSimulator(PLANT), start, end)
    with archiver_thread(s):
        wait_until(lambda: committed_total(s) == total, 60, "first archiver committed")
    first_files = archive_files(s)

    again = archive_settings(settings_for, broker, **{"archive.uri": s.archive.uri, "archive.flush_rows": 2200,
                                                      "archive.group_id": f"{topic_prefix}-archiver-again"})
    with archiver_thread(again):
        wait_until(lambda: committed_total(again) == total, 60, "second archiver committed")
    assert set(first_files) < set(archive_files(s))

    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end))
    assert stats.duplicates == total * len(FEATURES)


def test_a_topic_deleted_and_created_again_on_the_same_day_is_archived_whole(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    """The readings topic is deleted and created again (as a broker started afresh on memory
    storage does): its records are numbered from 0 again. The archiver, started again with the
    same group, writes them into the same date directory; the scan reads both topics' readings,
    none taken for a duplicate of the other's at the same offsets."""
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive"})
    first_start, first_end = MIDNIGHT + 10_000_000, MIDNIGHT + 11_000_000
    first = produce(s, PlantSimulator(PLANT), first_start, first_end)
    with archiver_thread(s):
        wait_until(lambda: committed_total(s) == first, 60, "the first topic archived")

    recreate_readings_topic(s)
    second_start, second_end = MIDNIGHT + 20_000_000, MIDNIGHT + 21_500_000  # more records than the first
    second = produce(s, PlantSimulator(PLANT), second_start, second_end)
    with archiver_thread(s) as again:
        wait_until(lambda: committed_total(s) == second, 60, "the second topic archived")
    assert again.stats.records == second
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(first_start, first_end)
                         + expected_rows(second_start, second_end))
    assert stats.duplicates == 0


def test_a_topic_created_again_under_a_running_archiver_is_archived_whole(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    """The same, with the archiver running through the deletion. Its client goes on from its position
    in the old topic (the embedded broker reports no position past the end as out of range) until
    its metadata names the new topic's id; the partitions are then read from their beginning. No
    reading of either topic is lost; the new topic's readings after the old positions may be
    archived twice meanwhile (once under each id)."""
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 2200})
    first_start, first_end = MIDNIGHT + 10_000_000, MIDNIGHT + 11_000_000
    first = produce(s, PlantSimulator(PLANT), first_start, first_end)
    second_start, second_end = MIDNIGHT + 20_000_000, MIDNIGHT + 21_500_000  # more records than the first
    with archiver_thread(s) as arch:
        wait_until(lambda: committed_total(s) == first, 60, "the first topic archived")
        recreate_readings_topic(s)
        second = produce(s, PlantSimulator(PLANT), second_start, second_end)
        wait_until(lambda: arch.stats.records >= first + second, 90, "the new topic read from its beginning")
        wait_until(lambda: committed_total(s) == second, 60, "the new topic archived")
    got = archived_rows(s, ScanStats())
    first_rows, second_rows = expected_rows(first_start, first_end), expected_rows(second_start, second_end)
    missing, extra = set(first_rows + second_rows) - set(got), set(got) - set(first_rows + second_rows)
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} unexpected"
    assert len([r for r in got if r[1] < second_start]) == len(first_rows)  # the old topic's, once each


def test_a_revoked_partition_is_written_and_committed_before_the_next_owner_takes_it(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 1_000_000, "archive.flush_seconds": 600.0})
    start, middle, end = MIDNIGHT - 1_000_000, MIDNIGHT, MIDNIGHT + 1_000_000
    first_half = produce(s, PlantSimulator(PLANT), start, middle)
    with archiver_thread(s) as first:
        wait_until(lambda: first.stats.records == first_half, 30, "the first member buffering everything")
        assert first.stats.files == 0 and committed_total(s) == 0
        with archiver_thread(s) as second:
            wait_until(lambda: second.assigned and first.assigned, 30, "the partitions shared by both members")
            assert first.stats.readings == first_half and committed_total(s) == first_half
            second_half = produce(s, PlantSimulator(PLANT), middle, end)
            wait_until(lambda: first.stats.records + second.stats.records == first_half + second_half, 30,
                       "the second half consumed")
    assert committed_total(s) == first_half + second_half
    assert second.stats.readings > 0  # range assignment: pump-002 is in partition 1, the others in 2 and 3
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end))
    assert stats.duplicates == 0  # the next owner started exactly where the revoked one ended


def test_readings_whose_write_failed_at_a_rebalance_are_read_again_by_the_member_given_them_back(
        broker: Any, settings_for: Any, topic_prefix: str) -> None:
    """The store fails while a second member joins: the first member's revoked readings are neither
    written nor committed. The member given some of those partitions back keeps its fetch position
    in kafka-python, so unless it starts again from the commit, their readings are lost."""
    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 1_000_000, "archive.flush_seconds": 600.0})
    start, end = MIDNIGHT - 1_000_000, MIDNIGHT + 1_000_000
    total = produce(s, PlantSimulator(PLANT), start, end)
    with archiver_thread(s) as first:
        wait_until(lambda: first.stats.records == total, 30, "the first member buffering everything")
        write, failed = first.writer.write, []

        def write_failing_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(args[0])
                raise OSError("store unavailable")
            return write(*args, **kwargs)

        first.writer.write = write_failing_once
        with archiver_thread(s) as second:
            # Each revoked reading is read again once: by the member that now owns its partition.
            wait_until(lambda: first.stats.records + second.stats.records == 2 * total, 30,
                       "the readings of the failed write read again")
            assert failed and first.assigned and second.assigned
    assert committed_total(s) == total
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end))
    assert stats.duplicates == 0


def test_committed_offsets_unknown_at_assignment_are_read_later_and_nothing_is_skipped(
        broker: Any, settings_for: Any, topic_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails while a second member joins, so the first member's revoked readings are
    neither written nor committed; then reading the committed offsets fails in the hook that gives
    it partitions back. kafka-python keeps that assignment, fetching from where the member was: the
    member must wait for the committed offsets instead, and read those readings again from them."""
    import consumers.archiver as archiver_module
    from kafka.errors import GroupAuthorizationFailedError

    s = archive_settings(settings_for, broker, **{"archive.uri": f"mock://{topic_prefix}/archive",
                                                  "archive.flush_rows": 1_000_000, "archive.flush_seconds": 600.0})
    start, end = MIDNIGHT - 1_000_000, MIDNIGHT + 1_000_000
    total = produce(s, PlantSimulator(PLANT), start, end)
    real, failures = archiver_module.seek_to_committed_async, []

    async def failing_on_the_second_assignment(consumer: Any, partitions: Any) -> Any:
        failures.append(sorted(tp.partition for tp in partitions))
        if len(failures) == 2:
            raise GroupAuthorizationFailedError("injected")
        return await real(consumer, partitions)

    monkeypatch.setattr(archiver_module, "seek_to_committed_async", failing_on_the_second_assignment)
    with archiver_thread(s) as first:
        wait_until(lambda: first.stats.records == total, 30, "the first member buffering everything")
        write = first.writer.write

        def write_failing_once(*args: Any, **kwargs: Any) -> Any:
            first.writer.write = write
            raise OSError("store unavailable")

        first.writer.write = write_failing_once
        with archiver_thread(s) as second:
            # Each revoked reading is read again once: by the member that now owns its partition.
            wait_until(lambda: first.stats.records + second.stats.records == 2 * total, 30,
                       "the readings of the failed write read again")
            wait_until(lambda: first.assigned and second.assigned, 30, "both members reading")
            assert len(failures) >= 3
    assert committed_total(s) == total
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end))


def test_kill_9_mid_file_and_restart_lose_nothing_duplicate_nothing_and_leave_no_temporary_file(
        broker: Any, settings_for: Any, tmp_path: pathlib.Path) -> None:
    """The first archiver is killed while its seventh file is half written; readings keep
    arriving while it is down; the next one sweeps the half-written file and rewrites."""
    s = archive_settings(settings_for, broker, **{"archive.flush_rows": 300, "archive.flush_seconds": 0.2,
                                                  "kafka.max_poll_records": 500})
    log, paused = tmp_path / "archiver.log", tmp_path / "paused"
    start, end, slice_ms = MIDNIGHT - 3_000_000, MIDNIGHT + 3_000_000, 100_000
    # 8,000 records before the crash: a flush holds at most 799 readings (300 - 1 plus one
    # poll), so they fill at least 11 files, and the seventh is always reached
    crash_at = MIDNIGHT - 1_000_000
    produced: list[int] = []
    crashed = threading.Event()

    def produce_across_the_crash() -> None:
        producer = make_producer(s)
        try:
            for t in range(start, end, slice_ms):
                if t == crash_at:
                    crashed.wait(90)
                produced.append(feed(producer, s.topics.readings, PlantSimulator(PLANT), t, t + slice_ms).records)
                time.sleep(0.05)
        finally:
            producer.close()

    procs = [archive_process(s, log, pause=(paused, 6))]
    producer = threading.Thread(target=produce_across_the_crash, daemon=True)
    producer.start()
    try:
        wait_until(lambda: alive(procs[0], log) and paused.exists(), 60, "the first archiver half-way through a file")
        half_written = pathlib.Path(paused.read_text())
        assert half_written.parent.parent == pathlib.Path(s.archive.uri) / ".archiver-tmp"
        assert half_written.stat().st_size > 0
        with pytest.raises(pa.ArrowInvalid):
            pq.read_metadata(half_written)  # really half a file
        procs[0].send_signal(signal.SIGKILL)
        assert exit_code(procs[0], log, 10) == -signal.SIGKILL
        assert half_written.exists()  # what the kill left behind
        assert sum(produced) <= 8_000
        crashed.set()
        procs.append(archive_process(s, log))
        producer.join(timeout=60)
        assert sum(produced) == 24_000
        wait_until(lambda: alive(procs[1], log) and committed_total(s) == 24_000, 60,
                   "every offset committed after the restart")
        procs[1].send_signal(signal.SIGTERM)
        assert exit_code(procs[1], log, 15) == 0
    finally:
        crashed.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    stats = ScanStats()
    got, want = archived_rows(s, stats), expected_rows(start, end)
    files = archive_files(s)  # hidden ones included
    faults.record("archiver_kill_9_mid_file", {
        "sent": sum(produced), "archived_rows": len({r[:3] for r in got}), "expected_rows": len(want),
        "lost": len(set(want) - set(got)), "duplicate_rows": len(got) - len({r[:3] for r in got}),
        "leftover_temporary_files": len([f for f in files if not ARCHIVE_FILE.fullmatch(f)]) + half_written.exists()})
    assert_archived_once(got, want)
    assert not half_written.exists()
    assert [f for f in files if not ARCHIVE_FILE.fullmatch(f)] == [], "files other than archive files are left"
    assert stats.files == len(files)


def test_sigterm_writes_the_buffer_commits_and_exits_0(
        broker: Any, settings_for: Any, tmp_path: pathlib.Path) -> None:
    s = archive_settings(settings_for, broker, **{"archive.flush_rows": 1_000_000, "archive.flush_seconds": 600.0})
    start, end = MIDNIGHT - 1_000_000, MIDNIGHT + 1_000_000
    total = produce(s, PlantSimulator(PLANT), start, end)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "archiver.log"
    proc = archive_process(s, log, f"--http-port={port}")
    try:
        wait_until(lambda: alive(proc, log) and _metric(port, "plantwatch_archive_buffered_readings") == total, 40,
                   "every reading consumed and buffered")
        assert _metric(port, "plantwatch_archive_files_total") == 0  # nothing written before the signal
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        assert committed_total(s) == 0
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, log, 10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert committed_total(s) == total
    stats = ScanStats()
    assert_archived_once(archived_rows(s, stats), expected_rows(start, end))
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [e["exit_code"] for e in events if e.get("event") == "archiver stopped"] == [0]


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else None
