"""A full disk under the registry and under the archiver, simulated by a filesystem that
runs out of space (``OSError(ENOSPC)`` part-way through a write):

* a registry publish retries, removes every staging directory it made, leaves CURRENT as it
  was, and ``plantwatch models publish`` says so in one line and exits 1;
* the archiver keeps what it buffered, commits nothing that is not in a file, is not ready
  while it waits, and writes everything once space is back: nothing lost, nothing twice.

Each writes its row of ``tests/faults-report.json``."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from consumers import archiver as archiver_module
from consumers.archiver import Archiver
from consumers.health import Health
from pipeline import registry, storage
from pipeline.bundle import save_bundle
from pipeline.readings import encode_wide
from pipeline.settings import PUMP_FEATURES, StorageSettings, load_settings
from tests.integration.faults import record
from tests.unit.test_registry import make_bundle

from tests.delegating_fs import Delegating


# ---------------------------------------------------------------- a disk that fills up


class _Budget:
    """A file object that refuses writes beyond what is left on its (shared) disk."""

    def __init__(self, fh: Any, disk: DiskState) -> None:
        self.fh, self.disk, self.closed = fh, disk, False

    def write(self, data: bytes) -> int:
        with self.disk.lock:
            if self.disk.free is not None and len(data) > self.disk.free:
                self.disk.refused += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.disk.free is not None:
                self.disk.free -= len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.closed = True
        self.fh.close()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.fh.tell()


@dataclass
class DiskState:
    free: int | None = None  # bytes left; None = plenty
    refused: int = 0         # writes refused with ENOSPC
    opened: list[str] = field(default_factory=list)  # every file opened for writing
    lock: threading.Lock = field(default_factory=threading.Lock)


class _FullDisk(Delegating):
    """The local disk, through :class:`_Budget` writes."""

    def __init__(self, disk: DiskState) -> None:
        super().__init__(pafs.LocalFileSystem())
        self.disk = disk

    def get_type_name(self) -> str:
        return "fulldisk"

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self.disk.opened.append(path)
        return pa.PythonFile(_Budget(open(path, "wb"), self.disk), mode="w")


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[DiskState, Path]]:
    """Everything under ``tmp_path/disk`` is on a disk whose free space the test sets."""
    disk = DiskState()
    fs = pafs.PyFileSystem(_FullDisk(disk))
    root = tmp_path / "disk"
    original = storage.resolve

    def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
        found, path = original(uri)
        return (fs, path) if path.startswith(str(root)) else (found, path)

    monkeypatch.setattr(storage, "resolve", resolve)
    before = storage.config()
    yield disk, root
    storage.configure(before)


# ---------------------------------------------------------------- registry


def _staged(disk: DiskState) -> set[str]:
    """The staging directories publishes wrote into (one per try)."""
    return {p.split("/.staging/", 1)[1].split("/")[0] for p in disk.opened if "/.staging/" in p}


def test_a_publish_on_a_full_disk_retries_removes_its_staging_and_leaves_current(
        full_disk: tuple[DiskState, Path]) -> None:
    disk, root = full_disk
    uri = str(root / "registry")
    storage.configure(StorageSettings(retry_attempts=3, retry_backoff_s=0.01))
    registry.publish(uri, make_bundle("v1"), keep=5)
    current = (root / "registry" / "CURRENT").read_bytes()
    disk.free = 700  # room for part of the first file of a bundle
    disk.opened.clear()
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as caught:
        registry.publish(uri, make_bundle("v2"), keep=5)
    took = time.monotonic() - started
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"publishing version v2 in {uri} failed after 3 attempts over ")
    assert message.endswith("No space left on device")
    attempts = len(_staged(disk))
    staging_left = len(list((root / "registry" / ".staging").glob("*")))
    current_unchanged = (root / "registry" / "CURRENT").read_bytes() == current
    record("registry_publish_disk_full", {"attempts": attempts, "staging_left": staging_left,
                                          "current_unchanged": current_unchanged, "refused_writes": disk.refused,
                                          "seconds": round(took, 3)})
    assert attempts == 3 and disk.refused >= 3
    assert staging_left == 0 and current_unchanged
    assert os.listdir(root / "registry" / "models") == ["v1"]
    assert registry.load_current(uri).version == "v1"

    disk.free = None  # space again: the same publish succeeds
    registry.publish(uri, make_bundle("v2"), keep=5)
    assert registry.current_version(uri) == "v2"


def test_a_failing_pointer_write_leaves_current_as_it_was(full_disk: tuple[DiskState, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    disk, root = full_disk
    uri = str(root / "registry")
    storage.configure(StorageSettings(retry_attempts=2, retry_backoff_s=0.01))
    registry.publish(uri, make_bundle("v1"), keep=5)
    current = (root / "registry" / "CURRENT").read_bytes()
    original = registry._write_pointer

    def full_when_pointing(*args: Any, **kwargs: Any) -> None:
        disk.free = 10  # the bundle fitted; the pointer does not
        original(*args, **kwargs)

    monkeypatch.setattr(registry, "_write_pointer", full_when_pointing)
    with pytest.raises(storage.StorageError, match="pointing CURRENT at version v2 .* failed after 2 attempts"):
        registry.publish(uri, make_bundle("v2"), keep=5)
    assert (root / "registry" / "CURRENT").read_bytes() == current
    assert list((root / "registry" / ".staging").glob("*")) == []


def test_models_publish_on_a_full_disk_prints_one_line_and_exits_1(
        full_disk: tuple[DiskState, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    disk, root = full_disk
    uri = str(root / "registry")
    registry.publish(uri, make_bundle("v1"), keep=5)
    current = (root / "registry" / "CURRENT").read_bytes()
    save_bundle(make_bundle("v2"), str(tmp_path / "bundle"))
    capsys.readouterr()
    disk.free = 700
    code = main(["models", "publish", str(tmp_path / "bundle"), "--registry", uri, "--log-format", "json",
                 "--set", "storage.retry_attempts=2", "--set", "storage.retry_backoff_s=0.01"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"plantwatch models: publishing version v2 in {uri} failed after 2 attempts over ")
    assert last.endswith("[Errno 28] No space left on device") or last.endswith("No space left on device")
    assert "Traceback" not in err
    assert (root / "registry" / "CURRENT").read_bytes() == current
    assert list((root / "registry" / ".staging").glob("*")) == []


# ---------------------------------------------------------------- archiver


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0
    headers: tuple[Any, ...] = ()


class _Coordinator:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer

    async def _commit_offsets_sync_async(self, offsets: dict[TopicPartition, Any]) -> None:
        self.consumer.commit(offsets)

    async def fetch_committed_offsets_async(self, partitions: set[TopicPartition]) -> dict[TopicPartition, Any]:
        return {tp: OffsetAndMetadata(self.consumer.committed[tp], "", -1)
                for tp in partitions if tp in self.consumer.committed}


class FakeConsumer:
    """Two partitions of readings, handed out a few at a time; paused partitions give nothing.
    Every commit is checked against the archive on disk: each committed offset's readings must
    be in a file already."""

    def __init__(self, topic: str, records: dict[int, list[_Record]], archive: Path, per_poll: int = 10,
                 every_s: float = 0.05) -> None:
        self.topic, self.records, self.archive, self.per_poll = topic, records, archive, per_poll
        self.every_s, self.last = every_s, 0.0  # a live stream: per_poll records per partition every every_s
        self.tps = {TopicPartition(topic, p) for p in records}
        self.position = {tp: 0 for tp in self.tps}
        self.paused_tps: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.commits = 0
        self.violations: list[str] = []
        self.listener: Any = None  # until the first poll, which assigns
        self.hooks: Any = None
        self._coordinator = _Coordinator(self)
        self._fetcher = SimpleNamespace(_paused_partition_records={})  # nothing is ever parked here
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda topic: None))  # a broker without ids
        self.lock = threading.Lock()

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.listener = self.hooks = listener

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[_Record]]:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            asyncio.run(listener.on_partitions_assigned(set(self.tps)))
        out: dict[TopicPartition, list[_Record]] = {}
        if time.monotonic() - self.last < self.every_s:
            time.sleep(min(timeout_ms / 1000, self.every_s))
            return out
        self.last = time.monotonic()
        with self.lock:
            for tp in sorted(self.tps - self.paused_tps):
                pos = self.position[tp]
                batch = self.records[tp.partition][pos:pos + self.per_poll]
                if batch:
                    out[tp] = batch
                    self.position[tp] = pos + len(batch)
        if not out:
            time.sleep(min(timeout_ms, 20) / 1000)
        return out

    def delivered(self) -> int:
        with self.lock:
            return sum(self.position.values())

    def assignment(self) -> set[TopicPartition]:
        return set(self.tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self.lock:
            self.position[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.seek(tp, 0)

    def pause(self, *tps: TopicPartition) -> None:
        with self.lock:
            self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        with self.lock:
            self.paused_tps -= set(tps)

    def paused(self) -> set[TopicPartition]:
        with self.lock:
            return set(self.paused_tps)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records[tp.partition])

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        written = _archived(self.archive)
        for tp, om in offsets.items():
            missing = [o for o in range(om.offset) if (tp.partition, o) not in written]
            if missing:
                self.violations.append(f"partition {tp.partition}: committed {om.offset}, offset {missing[0]} "
                                       f"not in a file")
            self.committed[tp] = om.offset
        self.commits += 1

    def close(self, autocommit: bool = False) -> None:
        asyncio.run(self.hooks.on_partitions_revoked(set(self.tps)))


def _archived(root: Path, *, counts: bool = False) -> Any:
    """(partition, offset) of every reading in the archive's visible files (with how many rows)."""
    rows: Counter[tuple[int, int, str]] = Counter()
    for f in sorted(root.glob("date=*/*.parquet")):
        t = pq.read_table(f, columns=["partition", "offset", "feature"])
        rows.update(zip(t["partition"].to_pylist(), t["offset"].to_pylist(), t["feature"].to_pylist()))
    if counts:
        return rows
    return {(p, o) for p, o, _ in rows}


def test_the_archiver_waits_out_a_full_disk_and_loses_nothing(
        full_disk: tuple[DiskState, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    disk, root = full_disk
    archive = root / "archive"
    settings = load_settings(env={}, overrides={
        "archive.uri": str(archive), "archive.flush_seconds": "0.3", "archive.group_id": f"g-{uuid.uuid4().hex[:6]}",
        "storage.retry_backoff_s": "0.05", "storage.retry_backoff_max_s": "0.2"})
    start_ms = 1_767_225_600_000
    records: dict[int, list[_Record]] = {0: [], 1: []}
    rng = np.random.default_rng(0)
    for i in range(1500):
        asset = f"pump-{i % 4}"
        p = i % 4 % 2
        values = {f: float(v) for f, v in zip(PUMP_FEATURES, rng.normal(size=len(PUMP_FEATURES)))}
        records[p].append(_Record("readings", p, len(records[p]), asset.encode(),
                                  encode_wide(asset, start_ms + (i // 4) * 1000, values)))
    consumer = FakeConsumer("readings", records, archive)
    monkeypatch.setattr(archiver_module, "make_consumer", lambda *a, **k: consumer)
    health = Health(needs_model=False)
    health.broker_ok = True
    stop = threading.Event()
    arch = Archiver(settings, stop=stop, health=health)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", arch.run()), daemon=True)
    thread.start()
    try:
        _wait(lambda: arch.stats.files >= 2 and health.ready(), 20, "a first flush")
        disk.free = 0  # the disk is full from now on
        full_at_delivered = consumer.delivered()
        _wait(lambda: arch.stats.write_retries >= 1, 20, "a failed flush")
        reasons = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # full for 1.5 s: waiting, alive, not ready, fetching nothing
            reasons.add(health.not_ready_reason())
            assert thread.is_alive() and health.alive() and not arch.ready
            time.sleep(0.05)
        assert reasons == {"waiting for storage"}
        paused_delivered = consumer.delivered()
        assert consumer.paused() == consumer.tps
        assert paused_delivered - full_at_delivered <= 2 * 10 * 10  # polls until the flush fails, none after
        assert not consumer.violations
        retries_during = arch.stats.write_retries
        disk.free = None  # space again
        done = {TopicPartition("readings", p): len(records[p]) for p in records}
        _wait(lambda: consumer.committed == done, 30, "everything archived and committed")
        _wait(lambda: health.ready(), 10, "ready again")
    finally:
        stop.set()
        thread.join(30)
    assert result.get("code") == 0
    rows = _archived(archive, counts=True)
    sent = {(p, r.offset) for p, recs in records.items() for r in recs}
    archived = {(p, o) for p, o, _ in rows}
    lost = len(sent - archived)
    duplicates = sum(n - 1 for n in rows.values())
    row = {"sent": len(sent), "archived": len(archived), "lost": lost, "duplicates": duplicates,
           "retries": arch.stats.write_retries, "retries_while_full": retries_during,
           "refused_writes": disk.refused, "commits": consumer.commits, "commits_ahead_of_files": len(consumer.violations)}
    record("archiver_disk_full", row)
    assert lost == 0 and duplicates == 0 and len(archived) == 1500
    assert not consumer.violations
    assert consumer.committed == {TopicPartition("readings", p): len(records[p]) for p in records}
    assert retries_during >= 3
    assert not list((archive / ".archiver-tmp").rglob("*.tmp"))


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
