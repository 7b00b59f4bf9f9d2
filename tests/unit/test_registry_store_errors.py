"""A store that fails to answer is not a broken model: nothing deletes, refuses or skips a version,
and no training run publishes past the gate, because one read of it failed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers.model_watch import ModelWatcher
from pipeline import registry, storage
from pipeline.settings import StorageSettings, load_settings
from trainers.train import _champion

from .test_registry import make_bundle


@pytest.fixture
def fast_retries() -> Iterator[None]:
    before = storage.config()
    storage.configure(StorageSettings(retry_attempts=3, retry_backoff_s=0.01))
    yield
    storage.configure(before)


def _failing_reads(monkeypatch: pytest.MonkeyPatch, suffix: str, times: int) -> list[str]:
    """The next ``times`` reads of files ending in ``suffix`` fail with EIO; returns the failures."""
    real = storage.read_bytes
    failed: list[str] = []

    def read(fs: Any, path: str) -> bytes:
        if path.endswith(suffix) and len(failed) < times:
            failed.append(path)
            raise OSError(5, "Input/output error")
        return real(fs, path)

    monkeypatch.setattr(storage, "read_bytes", read)
    return failed


def test_republishing_the_serving_version_through_a_read_error_leaves_it_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: None) -> None:
    uri = str(tmp_path / "registry")
    bundle = make_bundle("v1")
    registry.publish(uri, bundle, keep=5)
    failed = _failing_reads(monkeypatch, "models/v1/weights.npz", 1)
    writes: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda fs, path, data: (writes.append(path), real_write(fs, path, data)))
    registry.publish(uri, bundle, keep=5)  # the same content: a no-op, also when one read failed
    assert failed and not [w for w in writes if "/models/" in w or "/.staging/" in w]
    assert registry.load_current(uri).version == "v1"


def test_a_serving_model_that_cannot_be_read_fails_the_training_run_instead_of_skipping_the_gate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: None) -> None:
    uri = str(tmp_path / "registry")
    registry.publish(uri, make_bundle("v1"), keep=5)
    settings = load_settings(env={}, overrides={"registry.uri": uri})
    _failing_reads(monkeypatch, "models/v1/weights.npz", 1)
    assert _champion(settings).bundle is not None  # one failure: read again
    _failing_reads(monkeypatch, "models/v1/weights.npz", 100)
    with pytest.raises(storage.StorageError):
        _champion(settings)


def test_a_detector_tries_a_version_again_after_a_read_error_and_refuses_only_a_broken_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: None) -> None:
    uri = str(tmp_path / "registry")
    v1 = make_bundle("v1")
    registry.publish(uri, v1, keep=5)
    watcher = ModelWatcher(load_settings(env={}, overrides={"registry.uri": uri}), v1)  # threads not started
    registry.publish(uri, make_bundle("v2"), keep=5)
    _failing_reads(monkeypatch, "models/v2/weights.npz", 100)
    watcher._prepare("v2")
    assert "v2" not in watcher.refused
    monkeypatch.undo()
    (tmp_path / "registry" / "models" / "v2" / "weights.npz").write_bytes(b"not a bundle")
    watcher._prepare("v2")
    assert "v2" in watcher.refused


def test_a_local_publish_is_on_the_disk_before_current_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss after CURRENT moved must not leave it naming files the disk never got."""
    uri = str(tmp_path / "registry")
    synced: list[str] = []
    real = storage.fsync
    monkeypatch.setattr(storage, "fsync", lambda fs, path: (synced.append(path), real(fs, path)))
    registry.publish(uri, make_bundle("v1"), keep=5)
    names = [p.replace(str(tmp_path / "registry"), "") for p in synced]
    version_dir = names.index("/models/v1")
    pointer = next(i for i, n in enumerate(names) if "/CURRENT-" in n)
    staged = {n.rsplit("/", 1)[-1] for n in names[:version_dir] if "/.staging/" in n}
    assert staged >= {"weights.npz"} and len(staged) >= 3  # every file of the bundle, before its move
    assert version_dir < names.index("/models") < pointer < names.index("")  # then the registry's directory
