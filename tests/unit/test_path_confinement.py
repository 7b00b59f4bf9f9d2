"""Paths built from settings, bundle manifests, pointer files and records stay inside their root:
version and file names with ``..``, absolute paths and symbolic links leading out are refused."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import TopicPartition

from consumers.archiver import TMP_DIR, ArchiveWriteError, Archiver, ArchiveWriter, Rows, _Pending
from pipeline import registry, storage
from pipeline.bundle import MANIFEST, SCALING, WEIGHTS, BundleError, _manifest_checksum, decode_bundle, encode_bundle, \
    save_bundle
from pipeline.registry import RegistryError
from pipeline.settings import load_settings
from tests.unit.test_registry import make_bundle
from trainers.archive_scan import ArchiveError, scan_archive

FEATURES = ("a", "b", "c")
MIDNIGHT = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000
ESCAPES = ["..", "../outside", "../../etc", "/etc/passwd", "a/../../b", "..\\..\\x", "models/../..", "\0x"]


def tree(path: Path) -> list[str]:
    """Every file and link under ``path`` (links not followed)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the roots, holding a file that must stay untouched."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep.txt").write_text("not yours")
    return out


# ---------------------------------------------------------------- storage helpers


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\\b", "x\0"])
def test_a_path_component_must_be_one_plain_name(name: str) -> None:
    with pytest.raises(storage.PathEscapeError, match="not a single file or directory name"):
        storage.check_component(name, "file name")
    assert storage.check_component("date=2026-01-01", "x") == "date=2026-01-01"


def test_confined_refuses_climbing_out_and_links_leading_out(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    fs, path = storage.resolve(str(root))
    assert storage.confined(fs, path, f"{path}/sub/x") == f"{path}/sub/x"
    for bad in (f"{path}/../outside", "/etc/passwd", f"{path}/sub/../../x", f"{path}x/y"):
        with pytest.raises(storage.PathEscapeError, match="outside"):
            storage.confined(fs, path, bad)
    (root / "link").symlink_to(outside)
    with pytest.raises(storage.PathEscapeError, match="symbolic link"):
        storage.confined(fs, path, f"{path}/link/keep.txt")
    (root / "inner").symlink_to(root / "sub")  # a link that stays inside is fine
    assert storage.confined(fs, path, f"{path}/inner/x")
    mock_fs, mock = storage.resolve(f"mock://c-{uuid.uuid4().hex[:8]}")
    with pytest.raises(storage.PathEscapeError):
        storage.confined(mock_fs, mock, f"{mock}/../elsewhere")


# ---------------------------------------------------------------- registry: names


@pytest.mark.parametrize("name", ESCAPES + [None, 7])
def test_version_names_that_are_not_one_plain_component_are_refused(name: object) -> None:
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.check_version_name(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "..", "v1/../../outside"])
def test_every_registry_entry_point_refuses_an_escaping_version(name: str, tmp_path: Path, outside: Path) -> None:
    root = str(tmp_path / "registry")
    registry.publish(root, make_bundle("v1"), keep=5)
    save_bundle(make_bundle("outside"), str(outside))  # a valid bundle where "../outside" would lead
    for call in (lambda: registry.load_version(root, name), lambda: registry.manifest(root, name),
                 lambda: registry.promote(root, name), lambda: registry.rollback(root, name),
                 lambda: registry.publish(root, make_bundle(name), keep=5)):
        with pytest.raises(RegistryError, match="invalid version name"):
            call()
    assert registry.pointers(root).serving == "v1" and registry.pointers(root).pinned is None
    assert tree(outside) == sorted(["keep.txt", MANIFEST, WEIGHTS, SCALING])


@pytest.mark.parametrize("pointer,body", [
    ("CURRENT", {"version": "../../outside"}),
    ("CURRENT", {"version": "/etc"}),
    ("CURRENT", {"version": "v1", "previous": "../v0"}),
    ("PINNED", {"version": ".."}),
    ("PINNED", {"version": 3}),
])
def test_a_pointer_naming_an_escaping_version_is_a_clear_error(pointer: str, body: dict, tmp_path: Path) -> None:
    root = str(tmp_path / "registry")
    registry.publish(root, make_bundle("v1"), keep=5)
    (tmp_path / "registry" / pointer).write_text(json.dumps(body))
    with pytest.raises(RegistryError, match=f"{pointer} is damaged.*invalid version name"):
        registry.load_current(root)
    with pytest.raises(RegistryError, match=f"{pointer} is damaged"):
        registry.current_version(root)


# ---------------------------------------------------------------- registry: symbolic links


def test_a_version_directory_linking_out_of_the_root_is_refused_and_never_deleted(tmp_path: Path,
                                                                                  outside: Path) -> None:
    root = tmp_path / "registry"
    registry.publish(str(root), make_bundle("v1"), keep=1)
    save_bundle(make_bundle("v9"), str(outside / "v9"))
    (root / "models" / "v9").symlink_to(outside / "v9")
    with pytest.raises(RegistryError, match="outside .*symbolic link"):
        registry.load_version(str(root), "v9")
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.promote(str(root), "v9")
    assert [v.version for v in registry.list_versions(str(root))] == ["v1"]
    (root / "CURRENT").write_text(json.dumps({"version": "v9"}))
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.load_current(str(root))
    (root / "CURRENT").write_text(json.dumps({"version": "v1"}))
    assert registry.prune(str(root), keep=1, now=time.time() + 10 * registry.STALE_AFTER_S) == []
    assert (root / "models" / "v9").is_symlink()
    assert tree(outside) == sorted(["keep.txt", f"v9/{MANIFEST}", f"v9/{WEIGHTS}", f"v9/{SCALING}"])


def test_a_bundle_file_linking_out_of_the_root_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "registry"
    registry.publish(str(root), make_bundle("v1"), keep=5)
    weights = root / "models" / "v1" / WEIGHTS
    (outside / WEIGHTS).write_bytes(weights.read_bytes())  # identical bytes: only the link is wrong
    weights.unlink()
    weights.symlink_to(outside / WEIGHTS)
    with pytest.raises(RegistryError, match=f"{WEIGHTS} resolves to .*outside"):
        registry.load_version(str(root), "v1")
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.load_current(str(root))


def test_pointers_and_staging_linking_out_are_refused_not_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "registry"
    registry.publish(str(root), make_bundle("v1"), keep=5)
    (outside / "CURRENT").write_text(json.dumps({"version": "v1"}))
    (root / "CURRENT").unlink()
    (root / "CURRENT").symlink_to(outside / "CURRENT")
    with pytest.raises(RegistryError, match="CURRENT resolves to"):
        registry.load_current(str(root))
    (root / "CURRENT").unlink()
    (root / "CURRENT").write_text(json.dumps({"version": "v1"}))

    stale = outside / "old.tmp"
    stale.write_text("x")
    os.utime(stale, (0, 0))
    for entry in (root / ".staging").iterdir():
        entry.unlink() if entry.is_file() else None
    (root / ".staging").rmdir()
    (root / ".staging").symlink_to(outside)
    with pytest.raises(RegistryError, match=r"\.staging resolves to .*outside"):
        registry.prune(str(root), keep=5)
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.publish(str(root), make_bundle("v2"), keep=5)
    assert tree(outside) == ["CURRENT", "keep.txt", "old.tmp"]


def test_a_models_directory_linking_out_is_refused_on_publish(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    (root / "models").symlink_to(outside)
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.publish(str(root), make_bundle("v1"), keep=5)
    assert tree(outside) == ["keep.txt"]


# ---------------------------------------------------------------- bundle manifests


def _with_files(listed: dict[str, str]) -> dict[str, bytes]:
    files = encode_bundle(make_bundle("v1"))
    manifest = json.loads(files[MANIFEST])
    manifest["files"] = listed
    manifest["checksum"] = _manifest_checksum(manifest)
    return {**files, MANIFEST: json.dumps(manifest).encode()}


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "sub/weights.npz"])
def test_a_manifest_naming_a_path_is_refused(name: str) -> None:
    files = _with_files({**json.loads(encode_bundle(make_bundle("v1"))[MANIFEST])["files"], name: "0" * 64})
    with pytest.raises(BundleError, match="manifest.json refused: file name .* is not a single file"):
        decode_bundle(files)


def test_a_manifest_must_list_exactly_the_bundle_files() -> None:
    listed = json.loads(encode_bundle(make_bundle("v1"))[MANIFEST])["files"]
    with pytest.raises(BundleError, match="lists 'extra.npz'"):
        decode_bundle(_with_files({**listed, "extra.npz": "0" * 64}))
    with pytest.raises(BundleError, match=f"does not list {SCALING}"):
        decode_bundle(_with_files({WEIGHTS: listed[WEIGHTS]}))
    assert decode_bundle(encode_bundle(make_bundle("v1"))).version == "v1"


# ---------------------------------------------------------------- archive writer and scan


def rows(assets: list[str], start_ms: int = MIDNIGHT) -> Rows:
    n = len(assets)
    return Rows(np.repeat(np.array(assets, dtype=object), 3), np.repeat(start_ms + 1000 * np.arange(n), 3),
                np.tile(np.arange(3, dtype=np.int32), n), np.arange(3.0 * n), np.repeat(np.arange(n), 3))


def test_asset_ids_that_look_like_paths_never_reach_the_filesystem(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "archive"
    assets = ["../../etc", "/etc/passwd", "..", "a/../../outside/x", "date=../../x"]
    written = ArchiveWriter(str(root), FEATURES).write(0, rows(assets))
    assert len(written) == 1 and written[0].startswith(f"{root}/date=2026-01-01/part-")
    assert [p.split("/")[0] for p in tree(root)] == ["date=2026-01-01"]
    assert tree(outside) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["archive", "outside"]
    assert pq.read_table(written[0]).column("asset").unique().to_pylist() == assets
    batches = list(scan_archive(str(root), FEATURES, start_ms=MIDNIGHT, end_ms=MIDNIGHT + DAY))
    assert sorted(set(np.concatenate([b.asset for b in batches]))) == sorted(assets)


def test_a_date_directory_linking_out_makes_the_write_fail(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    (root / "date=2026-01-01").symlink_to(outside)
    writer = ArchiveWriter(str(root), FEATURES)
    with pytest.raises(storage.PathEscapeError, match="symbolic link"):
        writer.write(0, rows(["p1"]))
    assert tree(outside) == ["keep.txt"] and not (root / TMP_DIR).exists()


def test_the_archiver_reports_a_write_outside_the_root_as_a_failed_flush(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    (root / "date=2026-01-01").symlink_to(outside)
    settings = load_settings(env={}, overrides={"archive.uri": str(root), "model.features": ",".join(FEATURES)})
    a = Archiver(settings, stop=threading.Event())
    tp = TopicPartition("plant.readings", 0)
    a.pending[tp] = _Pending(end=1, chunks=[("", rows(["p1"]))], readings=1, records=1)
    with pytest.raises(ArchiveWriteError, match="symbolic link"):
        a.flush()
    assert a.committable() == {} and tree(outside) == ["keep.txt"]


def test_a_temporary_directory_linking_out_is_never_swept(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "archive"
    (root / TMP_DIR).mkdir(parents=True)
    (root / TMP_DIR / "default").symlink_to(outside)
    victim = outside / f"0badc0de-part-20260101T000000000000Z-00001-{7:019d}.parquet.tmp"
    victim.write_text("someone else's")
    writer = ArchiveWriter(str(root), FEATURES)
    with pytest.raises(storage.PathEscapeError, match="symbolic link"):
        writer.sweep([1])
    assert victim.exists()
    settings = load_settings(env={}, overrides={"archive.uri": str(root), "model.features": ",".join(FEATURES)})
    Archiver(settings).sweep([TopicPartition("plant.readings", 1)])  # logged, not raised
    assert victim.exists()


@pytest.mark.parametrize("link", ["date=2026-01-01", "date=2026-01-01/part-x.parquet", "part-x.parquet"])
def test_the_scan_refuses_archive_files_linking_out(link: str, tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "archive"
    table = pa.table({"asset": ["p1"] * 3, "ts_ms": pa.array([MIDNIGHT] * 3, pa.int64()),
                      "feature": list(FEATURES), "value": [1.0, 2.0, 3.0]})
    pq.write_table(table, outside / "part-x.parquet")
    target = outside if link == "date=2026-01-01" else outside / "part-x.parquet"
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(target)
    with pytest.raises(ArchiveError, match="refused: .*symbolic link"):
        list(scan_archive(str(root), FEATURES, start_ms=MIDNIGHT, end_ms=MIDNIGHT + DAY))
