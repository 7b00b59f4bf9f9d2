"""The model registry: atomic publication, pointers, pinning, pruning, crash safety, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline import registry, storage
from pipeline.bundle import MANIFEST, WEIGHTS, BundleError, ModelBundle, Scaler, ThresholdParams
from pipeline.registry import RegistryError
from pipeline.settings import ThresholdSettings, load_settings

from tests.delegating_fs import Delegating

FEATURES = ("a", "b", "c")
REPO = Path(__file__).resolve().parents[2]


def make_bundle(version: str, features: tuple[str, ...] = FEATURES, units: tuple[int, ...] = (4, 3),
                seed: int | None = None) -> ModelBundle:
    """A valid bundle with tiny random weights (seeded by the version name unless given)."""
    rng = np.random.default_rng(zlib.crc32(version.encode()) if seed is None else seed)
    f = len(features)
    shapes: list[tuple[int, ...]] = []
    prev = f
    for u in units:
        shapes += [(prev, 4 * u), (u, 4 * u), (4 * u,)]
        prev = u
    shapes += [(prev, f), (f,)]
    scaler = Scaler(rng.normal(size=f), np.ones(f), ("p1",), rng.normal(size=(1, f)), np.ones((1, f)))
    calibrated = ThresholdParams.from_settings(ThresholdSettings(), normal_mean=0.5, normal_std=0.1)
    thresholds = dataclasses.replace(calibrated, threshold=1.5)
    return ModelBundle(version, features, 1000, 8, units, 8, scaler, error_scale=np.ones(f),
                       novelty_coef=rng.normal(size=(2 * f, f)), novelty_scale=np.ones(f), flat_limit=np.full(f, 30.0),
                       forecast_level=np.ones(f), novelty_level=np.ones(f), thresholds=thresholds,
                       weights=[rng.normal(size=s).astype(np.float32) for s in shapes],
                       metadata={"epochs": 3, "validation_error": 0.25, "created_at": "2026-01-02T03:04:05+00:00"})


@pytest.fixture(params=["local", "mock"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "registry") if request.param == "local" else f"mock://reg-{uuid.uuid4().hex[:8]}"


def _tree(uri: str, sub: str) -> list[str]:
    fs, path = storage.resolve(uri)
    base = storage.join(path, sub)
    if not storage.exists(fs, base):
        return []
    return sorted(i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=False)))


def _pointer(uri: str, name: str) -> dict[str, Any]:
    fs, path = storage.resolve(uri)
    return json.loads(storage.read_bytes(fs, storage.join(path, name)))


# ---------------------------------------------------------------- publish and load


def test_publish_makes_the_bundle_current_and_loadable(root: str) -> None:
    assert registry.current_version(root) is None
    assert registry.publish(root, make_bundle("v1"), keep=3) == "v1"
    assert registry.publish(root, make_bundle("v2"), keep=3) == "v2"
    loaded = registry.load_current(root, expected_features=FEATURES)
    assert loaded.version == "v2"
    for got, want in zip(loaded.weights, make_bundle("v2").weights):
        np.testing.assert_array_equal(got, want)
    assert loaded.metadata["published_at"] > loaded.metadata["created_at"]
    current = _pointer(root, "CURRENT")
    assert (current["version"], current["previous"]) == ("v2", "v1")
    assert _tree(root, "models") == ["v1", "v2"]
    assert _tree(root, ".staging") == []


def test_nothing_published_is_a_clear_error(root: str) -> None:
    with pytest.raises(RegistryError, match="no model has been published"):
        registry.load_current(root)
    assert registry.list_versions(root) == []


def test_a_bundle_for_other_features_is_refused_on_load(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=2)
    with pytest.raises(BundleError, match="differ"):
        registry.load_current(root, expected_features=("a", "b", "x"))


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 129])
def test_unsafe_version_names_are_refused(root: str, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.publish(root, make_bundle(name), keep=2)
    assert _tree(root, "models") == []


def test_republishing_the_same_content_is_idempotent_and_different_content_is_refused(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=2)
    registry.publish(root, make_bundle("v2"), keep=2)
    registry.publish(root, make_bundle("v1"), keep=2)
    assert registry.current_version(root) == "v1"
    assert _pointer(root, "CURRENT")["previous"] == "v2"
    with pytest.raises(RegistryError, match="different content"):
        registry.publish(root, make_bundle("v1", seed=99), keep=2)
    assert registry.current_version(root) == "v1"


def test_publish_without_making_current_stores_a_challenger(root: str) -> None:
    registry.publish(root, make_bundle("champion"), keep=3)
    registry.publish(root, make_bundle("challenger"), keep=3, make_current=False)
    assert registry.current_version(root) == "champion"
    assert registry.load_version(root, "challenger").version == "challenger"
    registry.promote(root, "challenger")
    assert registry.load_current(root).version == "challenger"


def test_list_versions_reads_each_manifest_newest_first(root: str) -> None:
    for v in ("v1", "v2", "v3"):
        registry.publish(root, make_bundle(v), keep=5)
    registry.rollback(root)
    infos = registry.list_versions(root)
    assert [i.version for i in infos] == ["v3", "v2", "v1"]
    assert [(i.current, i.pinned) for i in infos] == [(True, False), (False, True), (False, False)]
    assert (infos[0].epochs, infos[0].validation_error, infos[0].threshold) == (3, 0.25, 1.5)
    assert infos[0].published_at is not None and infos[0].published_at > infos[1].published_at  # type: ignore[operator]


# ---------------------------------------------------------------- pinning


def test_rollback_pins_the_previous_version_step_by_step(root: str) -> None:
    for v in ("v1", "v2", "v3"):
        registry.publish(root, make_bundle(v), keep=5)
    assert registry.rollback(root) == "v2"
    assert registry.load_current(root).version == "v2"
    assert registry.rollback(root) == "v1"
    with pytest.raises(RegistryError, match="no loadable version older than v1"):
        registry.rollback(root)
    registry.publish(root, make_bundle("v4"), keep=5)
    assert registry.current_version(root) == "v1"  # the pin outlives a publish
    assert registry.unpin(root) == "v4"
    assert registry.load_current(root).version == "v4"
    assert registry.unpin(root) == "v4"  # nothing pinned: no-op


def test_rollback_to_a_named_version_and_unknown_versions(root: str) -> None:
    for v in ("v1", "v2", "v3"):
        registry.publish(root, make_bundle(v), keep=5)
    assert registry.rollback(root, to="v1") == "v1"
    assert registry.pointers(root).pinned == "v1"
    with pytest.raises(RegistryError, match=r"unknown version 'v9'.*known: v1, v2, v3"):
        registry.rollback(root, to="v9")
    with pytest.raises(RegistryError, match="unknown version"):
        registry.promote(root, "v9")
    with pytest.raises(RegistryError, match="unknown version"):
        registry.load_version(root, "v9")


def test_promote_makes_current_and_pins(root: str) -> None:
    for v in ("v1", "v2"):
        registry.publish(root, make_bundle(v), keep=5)
    registry.promote(root, "v1")
    assert registry.pointers(root) == registry.Pointers("v1", "v2", registry.pointers(root).published_at, "v1")
    registry.publish(root, make_bundle("v3"), keep=5)
    assert (registry.pointers(root).current, registry.current_version(root)) == ("v3", "v1")


def test_corrupted_versions_are_never_pinned_and_rollback_skips_them(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    for v in ("v1", "v2", "v3"):
        registry.publish(root, make_bundle(v), keep=5)
    weights = tmp_path / "reg" / "models" / "v2" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RegistryError, match="refusing to promote v2"):
        registry.promote(root, "v2")
    assert registry.rollback(root) == "v1"
    assert registry.current_version(root) == "v1"


# ---------------------------------------------------------------- pruning


def test_prune_keeps_the_newest_plus_current_and_pinned(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=2)
    registry.rollback(root, to="v1")  # pinned: must survive
    for v in ("v2", "v3", "v4", "v5"):
        registry.publish(root, make_bundle(v), keep=2)
    assert _tree(root, "models") == ["v1", "v4", "v5"]
    registry.promote(root, "v4")  # replaces the pin on v1
    registry.publish(root, make_bundle("v6"), keep=1)
    assert _tree(root, "models") == ["v4", "v6"]
    registry.unpin(root)
    registry.publish(root, make_bundle("v7"), keep=1)
    assert _tree(root, "models") == ["v7"]
    assert _tree(root, ".staging") == []


def test_prune_removes_only_stale_staging_entries_and_incomplete_versions(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=2)
    fs, path = storage.resolve(root)
    storage.write_bytes(fs, storage.join(path, ".staging", "v2-dead", MANIFEST), b"{")
    storage.write_bytes(fs, storage.join(path, ".staging", "CURRENT-dead.tmp"), b"{}")
    storage.write_bytes(fs, storage.join(path, "models", "v0", WEIGHTS), b"half a copy")
    assert registry.prune(root, keep=2) == []
    assert _tree(root, ".staging") == ["CURRENT-dead.tmp", "v2-dead"]
    later = time.time() + registry.STALE_AFTER_S + 60
    assert registry.prune(root, keep=2, now=later) == ["v0"]
    assert _tree(root, ".staging") == []
    assert _tree(root, "models") == ["v1"]
    assert registry.load_current(root).version == "v1"


# ---------------------------------------------------------------- object-store semantics


class _NoDirMoves(Delegating):
    """An in-memory filesystem that, like S3 or GCS, cannot move a directory."""

    def get_type_name(self) -> str:
        return "nodirmoves"

    def move(self, src: str, dest: str) -> None:
        if self.fs.get_file_info(src).type == pafs.FileType.Directory:
            raise NotImplementedError("directory moves are not supported")
        self.fs.move(src, dest)


def test_filesystems_without_directory_moves_copy_then_point(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = pafs.PyFileSystem(_NoDirMoves(pafs._MockFileSystem()))
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, uri.removeprefix("objstore://")))
    root = "objstore://bucket/registry"
    for v in ("v1", "v2", "v3"):
        registry.publish(root, make_bundle(v), keep=2)
    assert _tree(root, "models") == ["v2", "v3"]
    assert _tree(root, ".staging") == []
    assert registry.load_current(root).version == "v3"
    assert registry.rollback(root) == "v2"


_KILLED_MID_COPY = """
import os, sys
import pyarrow.fs as pafs
from pipeline import registry, storage
from tests.unit.test_registry import _NoDirMoves, make_bundle

class Killed(_NoDirMoves):
    def open_output_stream(self, path, metadata):
        if "/models/" in path and path.endswith(sys.argv[2]):
            os._exit(9)  # killed as the copy into models/ reaches this file
        return self.fs.open_output_stream(path, metadata=metadata)

fs = pafs.PyFileSystem(Killed(pafs.LocalFileSystem()))
storage.resolve = lambda uri: (fs, uri)
registry.publish(sys.argv[1], make_bundle("v3"), keep=2)
"""


@pytest.mark.parametrize("killed_at", [WEIGHTS, MANIFEST])
def test_a_copy_into_models_killed_half_way_is_not_a_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            killed_at: str) -> None:
    """Where directories cannot move (S3, GCS), a publish copies the bundle into models/: killed
    there, it leaves no version that lacks files, keeps no retention slot and does not stop a rollback."""
    fs = pafs.PyFileSystem(_NoDirMoves(pafs.LocalFileSystem()))
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, uri))
    root = str(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(root, make_bundle(v), keep=2)
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_COPY, root, killed_at], cwd=REPO, timeout=120)
    assert done.returncode == 9
    assert [v.version for v in registry.list_versions(root)] == ["v2", "v1"]
    registry.publish(root, make_bundle("v4"), keep=2)
    assert registry.rollback(root) == "v2"
    assert registry.prune(root, keep=2, now=time.time() + 7200) == ["v3"]  # the incomplete directory, after an hour


# ---------------------------------------------------------------- crash safety


class Halting(Delegating):
    """Numbers the changes a process makes to a filesystem: creating a directory, creating a
    file, writing the first half of a write, moving, deleting (a directory's files one by one,
    then the directory). At change number ``halt_at``
    it writes ``halted <pid> <change>`` to ``report`` and waits to be killed: every change
    before that one is done, that one is not (a write is half done)."""

    def __init__(self, fs: pafs.FileSystem, root: str, halt_at: int, report: Any) -> None:
        super().__init__(fs)
        self.root, self.halt_at, self.report, self.changes = root, halt_at, report, 0

    def get_type_name(self) -> str:
        return "halting"

    def _change(self, what: str, *paths: str) -> None:
        self.changes += 1
        if self.changes == self.halt_at:
            names = " ".join(p[len(self.root) + 1:] or "." if p.startswith(self.root) else p for p in paths)
            print(f"halted {os.getpid()} {what} {names}", file=self.report, flush=True)
            time.sleep(60)
            os._exit(3)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._change("create-dir", path)
        super().create_dir(path, recursive)

    def delete_dir(self, path: str) -> None:
        """File by file, as an object store deletes, so a kill can land half-way."""
        for info in sorted(self.fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path):
            if info.type == pafs.FileType.File:
                self.delete_file(info.path)
        self._change("delete-dir", path)
        super().delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._change("delete-dir-contents", path)
        super().delete_dir_contents(path, missing_dir_ok)

    def delete_file(self, path: str) -> None:
        self._change("delete-file", path)
        super().delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._change("move", src, dest)
        super().move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._change("copy", src, dest)
        super().copy_file(src, dest)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self._change("create-file", path)
        return pa.PythonFile(_HalvedWrites(super().open_output_stream(path, metadata),
                                           lambda: self._change("half-written", path)), mode="w")


class _HalvedWrites:
    """A writable stream that calls ``halfway`` after writing (and flushing) half of each write."""

    def __init__(self, inner: Any, halfway: Any) -> None:
        self.inner, self.halfway = inner, halfway

    @property
    def closed(self) -> bool:
        return bool(self.inner.closed)

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.inner.write(data[:len(data) // 2])
        self.inner.flush()
        self.halfway()
        self.inner.write(data[len(data) // 2:])
        return len(data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def tell(self) -> int:
        return int(self.inner.tell())

    def writable(self) -> bool:
        return True


_PUBLISHER = """
import os, sys, traceback
import pyarrow.fs as pafs
from pipeline import registry, storage
from tests.unit.test_registry import Halting, make_bundle

root = sys.argv[1]
resolve = storage.resolve
report = os.fdopen(os.dup(1), "w")  # the protocol; anything else printed goes to stderr
os.dup2(2, 1)
for line in sys.stdin:
    version, halt_at = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            fs, path = resolve(root)
            halting = Halting(fs, path, int(halt_at), report)
            storage.resolve = lambda uri: (pafs.PyFileSystem(halting), resolve(uri)[1])
            registry.publish(root, make_bundle(version), keep=2)
            print(f"completed {os.getpid()} after {halting.changes} changes", file=report, flush=True)
        except BaseException as exc:
            traceback.print_exc()
            print(f"failed {os.getpid()} {exc!r}", file=report, flush=True)
        os._exit(0)
    print(os.waitpid(pid, 0)[1], file=report, flush=True)
"""


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that, per line ``<version> <n>`` on stdin, forks a child (imports paid once)
    that publishes the version and halts at its n-th filesystem change (see :class:`Halting`)."""
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path / "reg")], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a failed test left a child halted: end its process group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.timeout(300)
def test_sigkill_at_every_step_of_a_publish_never_breaks_the_current_pointer(
        tmp_path: Path, publisher: subprocess.Popen[str]) -> None:
    """Publishes killed at each filesystem change in turn (before the first change, before the
    second, ..., half-way through each write) until one completes; twice, the second time with
    a version pinned. After every kill the served version is a complete bundle, CURRENT names
    the version it named before until the move of its temp file and the new one from then on,
    and every directory in models/ is a complete version (this is a local disk)."""
    root = str(tmp_path / "reg")
    registry.publish(root, make_bundle("r-initial"), keep=2)
    assert publisher.stdin is not None and publisher.stdout is not None
    halts: list[str] = []
    for rnd, pinned in enumerate([None, "pinned"]):
        if pinned is not None:
            registry.publish(root, make_bundle(pinned), keep=2)
            registry.promote(root, pinned)
        switched: list[tuple[bool, str]] = []  # per kill: whether CURRENT names the new version, where it halted
        for step in range(1, 1000):
            version, before = f"r{rnd}-{step:03d}", registry.pointers(root).current
            publisher.stdin.write(f"{version} {step}\n")
            publisher.stdin.flush()
            outcome, pid, what = publisher.stdout.readline().strip().split(maxsplit=2)
            if outcome == "completed":
                assert int(publisher.stdout.readline()) == 0
                p = registry.pointers(root)
                assert (p.current, p.previous, p.pinned) == (version, before, pinned)
                break
            assert outcome == "halted", f"publish failed ({what})"
            os.kill(int(pid), signal.SIGKILL)
            status = int(publisher.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            halts.append(what)

            p = registry.pointers(root)
            assert p.current in (before, version) and p.pinned == pinned, f"killed at {what}: {p}"
            bundle = registry.load_current(root, expected_features=FEATURES)  # complete and verified
            assert bundle.version == (pinned or p.current)
            for got, want in zip(bundle.weights, make_bundle(bundle.version).weights):
                np.testing.assert_array_equal(got, want)
            for v in _tree(root, "models"):
                registry.load_version(root, v)
            switched.append((p.current == version, what))
        else:
            raise AssertionError("a publish never completed")
        # CURRENT switches once, at the move of a complete temp file over it, and stays switched
        flags = [f for f, _ in switched]
        first = flags.index(True) if True in flags else len(flags)
        assert flags == [False] * first + [True] * (len(flags) - first), switched
        assert 0 < first and re.fullmatch(r"move \.staging/CURRENT-[0-9a-f]{8}\.tmp CURRENT", switched[first - 1][1]), \
            switched
    for expected in (r"half-written \.staging/r\d-\d+-[0-9a-f]{8}/(manifest\.json|weights\.npz|scaling\.npz)",
                     r"half-written \.staging/CURRENT-[0-9a-f]{8}\.tmp",
                     r"move \.staging/r\d-\d+-[0-9a-f]{8} models/r\d-\d+",
                     r"move models/r\d-\d+ \.staging/r\d-\d+-[0-9a-f]{8}\.deleted",  # pruning
                     r"delete-file \.staging/r\d-\d+-[0-9a-f]{8}\.deleted/(manifest\.json|weights\.npz|scaling\.npz)",
                     r"delete-dir \.staging/r\d-\d+-[0-9a-f]{8}\.deleted"):
        assert any(re.fullmatch(expected, h) for h in halts), f"no kill at {expected}; kills: {halts}"
    registry.unpin(root)
    registry.publish(root, make_bundle("r-final"), keep=2)
    registry.prune(root, keep=2, now=time.time() + registry.STALE_AFTER_S + 60)
    assert _tree(root, ".staging") == []
    assert len(_tree(root, "models")) == 2
    assert registry.load_current(root).version == "r-final"


# ---------------------------------------------------------------- CLI


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from cli import models_cmd

    parser = argparse.ArgumentParser()
    models_cmd.add_arguments(parser)
    code = models_cmd.run(parser.parse_args(argv), load_settings(env={}))
    return code, capsys.readouterr().out


def _row(key: str, value: str) -> str:
    return f"{key:<17}  {value}"  # `show` aligns values after its longest key, "per-asset scaling"


def test_cli_list_show_and_pinning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(root, make_bundle(v), keep=5)
    code, out = _cli(capsys, "list", "--registry", root)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["VERSION", "PUBLISHED", "EPOCHS", "VAL", "ERROR", "THRESHOLD", "STATUS"]
    cells = lines[1].split()
    assert cells[:2] == ["*", "v2"] and cells[4:] == ["3", "0.25", "1.5", "current"]
    assert lines[2].split()[0] == "v1" and len(lines) == 3

    code, out = _cli(capsys, "show", "v1", "--registry", root)
    lines = out.splitlines()
    assert code == 0
    assert lines[:3] == [_row("version", "v1"), _row("status", "-"), _row("integrity", "ok (checksums verified)")]
    for row in [("features (3)", "a, b, c"), ("grid period", "1000 ms"), ("window", "8 steps, warm-up 8 steps"),
                ("LSTM layers", "4, 3"), ("per-asset scaling", "1 asset"), ("epochs", "3"),
                ("threshold", "1.5 (normal score mean 0.5, std 0.1)")]:
        assert _row(*row) in lines

    code, out = _cli(capsys, "rollback", "--registry", root, "--json")
    assert json.loads(out) == {"serving": "v1", "current": "v2", "pinned": "v1"}
    code, out = _cli(capsys, "list", "--registry", root, "--json")
    listed = [(v["version"], v["current"], v["pinned"]) for v in json.loads(out)]
    assert listed == [("v2", True, False), ("v1", False, True)]
    code, out = _cli(capsys, "unpin", "--registry", root)
    assert out.strip() == "unpinned: serving the current version v2"
    code, out = _cli(capsys, "promote", "v1", "--registry", root)
    assert out.strip() == "promoted v1: current and pinned"
    code, out = _cli(capsys, "show", "v1", "--registry", root, "--json")
    shown_json = json.loads(out)
    assert (shown_json["current"], shown_json["pinned"], shown_json["verified"]) == (True, True, True)
    assert shown_json["manifest"]["features"] == list(FEATURES)


def test_cli_reports_corruption_and_unknown_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import UsageError

    root = str(tmp_path / "reg")
    registry.publish(root, make_bundle("v1"), keep=5)
    (tmp_path / "reg" / "models" / "v1" / WEIGHTS).write_bytes(b"garbage")
    code, out = _cli(capsys, "show", "v1", "--registry", root)
    assert code == 1
    assert _row("integrity", "FAILED: weights.npz checksum mismatch (corrupted or truncated)") in out.splitlines()
    with pytest.raises(UsageError, match="unknown version 'v7'"):
        _cli(capsys, "promote", "v7", "--registry", root)


class _PinsDuringMoves(Delegating):
    """Runs ``during`` (an operator's action) as the first move of a version out of models/ begins."""

    def __init__(self, fs: pafs.FileSystem, during: Any) -> None:
        super().__init__(fs)
        self.during = during

    def get_type_name(self) -> str:
        return "pinsduringmoves"

    def move(self, src: str, dest: str) -> None:
        if self.during is not None and "/models/" in src and ".staging" in dest:
            during, self.during = self.during, None
            during()
        self.fs.move(src, dest)


def test_a_version_pinned_while_a_prune_deletes_it_is_kept_or_the_pin_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator rolls back to the version a publish's prune is deleting at that moment."""
    root = str(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(root, make_bundle(v), keep=2)
    outcome: list[str] = []

    def roll_back() -> None:
        try:
            outcome.append(registry.rollback(root, "v1"))
        except RegistryError as exc:
            outcome.append(str(exc))

    wrapped = _PinsDuringMoves(pafs.LocalFileSystem(), roll_back)
    monkeypatch.setattr(storage, "resolve", lambda uri: (pafs.PyFileSystem(wrapped), uri))
    registry.publish(root, make_bundle("v3"), keep=2)  # prunes v1
    pinned = registry.pointers(root).pinned
    assert outcome == ["v1"] and pinned == "v1"
    assert registry.load_version(root, pinned).version == "v1"  # the pinned version is still there
