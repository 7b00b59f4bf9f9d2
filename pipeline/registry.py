"""The model registry: versioned bundle directories and a pointer to the version to serve.

Layout under a root on any filesystem pyarrow reaches (local disk, S3, GCS, HDFS)::

    models/<version>/   a complete bundle (manifest.json, weights.npz, scaling.npz)
    CURRENT             {"version", "published_at", "previous"}: the newest published version
    PINNED              {"version"}: chosen by an operator (promote, rollback); wins over CURRENT
    .staging/           uploads in progress, pointer temp files, deletions; never read

Why a crash cannot break readers: a bundle is written and verified under ``.staging``,
moved to ``models/<version>`` (where the filesystem cannot move a directory, as on object
stores, it is copied) and verified again there; only then does CURRENT name it, and
CURRENT is replaced by moving a complete temp file over it. Readers resolve versions only
through PINNED and CURRENT, so a process killed at any point leaves them naming a complete
bundle: the previous one or the new one. Pruning never deletes the current or pinned
version, and it first moves a doomed version into ``.staging`` where it can, so on local
disk ``models/`` only ever holds complete versions.

Every path is confined to the root: version names are single path components (letters,
digits, ``.``, ``_``, ``-``) wherever they come from (a command line, a pointer file, a
control-topic message), and on a local disk a symbolic link leading out of the root (a
version directory, a bundle file, a pointer, ``.staging``) is refused, never followed.

One publisher at a time (the trainer runs as a single job); readers are unlimited.
Loading raises :class:`~pipeline.bundle.BundleError` for a defective bundle and
:class:`RegistryError` for a registry-level problem (nothing published, unknown version).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.bundle import MANIFEST, SCALING, WEIGHTS, BundleError, ModelBundle, decode_bundle, encode_bundle
from pipeline.logs import get_logger

MODELS = "models"
STAGING = ".staging"
CURRENT = "CURRENT"
PINNED = "PINNED"
STALE_AFTER_S = 3600.0  # staging entries older than this belong to a dead publisher
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

log = get_logger(__name__)


class RegistryError(ValueError):
    """The registry has nothing to serve, or was asked about a version it does not hold."""


@dataclass(frozen=True)
class Pointers:
    """What CURRENT and PINNED say."""

    current: str | None
    previous: str | None
    published_at: str | None
    pinned: str | None

    @property
    def serving(self) -> str | None:
        """The version readers load: the pinned one, else the current one."""
        return self.pinned or self.current


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as its manifest describes it."""

    version: str
    published_at: str | None
    created_at: str | None
    epochs: int | None
    validation_error: float | None
    threshold: float | None
    current: bool
    pinned: bool


@dataclass(frozen=True)
class _Root:
    fs: pafs.FileSystem
    path: str
    uri: str

    def version_dir(self, version: str) -> str:
        return self.confined(storage.join(self.path, MODELS, check_version_name(version)))

    def bundle_file(self, version: str, name: str) -> str:
        return self.confined(storage.join(self.version_dir(version), name))

    def staging(self, name: str) -> str:
        return self.confined(storage.join(self.path, STAGING, name))

    def pointer(self, name: str) -> str:
        return self.confined(storage.join(self.path, name))

    def confined(self, path: str) -> str:
        try:
            return storage.confined(self.fs, self.path, path)
        except storage.PathEscapeError as exc:
            raise RegistryError(f"refused: {exc}") from None


def _root(uri: str) -> _Root:
    fs, path = storage.resolve(uri)
    return _Root(fs, path, uri)


def check_version_name(version: str) -> str:
    """Refuse names that are not a single safe path component (they become directory names):
    no ``/``, no ``..``, not absolute, not hidden."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise RegistryError(f"invalid version name {version!r}: use letters, digits, '.', '_' and '-' (max 128)")
    return version


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ---------------------------------------------------------------- pointers


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        data = storage.read_bytes(fs, path)
    except OSError:
        if storage.exists(fs, path):  # some object stores report a missing key as a plain OSError
            raise
        return None
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RegistryError(f"{path} must hold a JSON object")
    return obj


def _write_pointer(root: _Root, name: str, payload: dict[str, Any]) -> None:
    """Replace a pointer atomically: a complete temp file in .staging is moved over it."""
    storage.write_atomic(root.fs, root.pointer(name), json.dumps(payload, sort_keys=True).encode(),
                         tmp=root.staging(f"{name}-{secrets.token_hex(4)}.tmp"))


def _pointers(root: _Root) -> Pointers:
    cur = _read_json(root.fs, root.pointer(CURRENT)) or {}
    pin = _read_json(root.fs, root.pointer(PINNED)) or {}
    return Pointers(_named(cur, CURRENT, "version"), _named(cur, CURRENT, "previous"), cur.get("published_at"),
                    _named(pin, PINNED, "version"))


def _named(pointer: dict[str, Any], name: str, key: str) -> str | None:
    """A version a pointer file names, refused unless it is a valid version name."""
    version = pointer.get(key)
    if version is None:
        return None
    try:
        return check_version_name(version)
    except RegistryError as exc:
        raise RegistryError(f"{name} is damaged: {key}: {exc}") from None


def pointers(root_uri: str) -> Pointers:
    return _pointers(_root(root_uri))


def current_version(root_uri: str) -> str | None:
    """The version readers should serve (PINNED over CURRENT); None before the first publish."""
    return pointers(root_uri).serving


# ---------------------------------------------------------------- reading versions


def _read_bundle(root: _Root, version: str, expected_features: tuple[str, ...] | None) -> ModelBundle:
    paths = {name: root.bundle_file(version, name) for name in (MANIFEST, WEIGHTS, SCALING)}
    try:
        files = {name: storage.read_bytes(root.fs, path) for name, path in paths.items()}
    except OSError as exc:
        raise BundleError(f"cannot read version {version} in {root.uri}: {exc}") from None
    bundle = decode_bundle(files)
    if bundle.version != version:
        raise BundleError(f"directory of version {version} holds version {bundle.version}")
    if expected_features is not None and bundle.features != tuple(expected_features):
        raise BundleError(f"bundle features {list(bundle.features)} differ from the configured "
                          f"{list(expected_features)}")
    return bundle


def _manifests(root: _Root) -> list[tuple[str, dict[str, Any]]]:
    """Readable manifests of the version directories, oldest publication first."""
    found = []
    for name in storage.list_dirs(root.fs, storage.join(root.path, MODELS)):
        try:
            manifest = _read_json(root.fs, root.bundle_file(name, MANIFEST))
        except RegistryError:  # not a version, a link leading out, or a manifest that is not JSON
            continue
        if manifest is not None:
            found.append((name, manifest))
    return sorted(found, key=lambda item: (_published_at(item[1]) or "", item[0]))


def _published_at(manifest: dict[str, Any]) -> str | None:
    meta = manifest.get("metadata") or {}
    return meta.get("published_at") or meta.get("created_at")


def _require_known(root: _Root, version: str) -> None:
    if not storage.exists(root.fs, root.bundle_file(version, MANIFEST)):
        known = [v for v, _ in _manifests(root)]
        raise RegistryError(f"unknown version {version!r} in {root.uri}; known: {', '.join(known) or 'none'}")


def load_version(root_uri: str, version: str, expected_features: tuple[str, ...] | None = None) -> ModelBundle:
    root = _root(root_uri)
    _require_known(root, version)
    return _read_bundle(root, version, expected_features)


def load_current(root_uri: str, expected_features: tuple[str, ...] | None = None) -> ModelBundle:
    """The bundle to serve (PINNED over CURRENT), verified."""
    root = _root(root_uri)
    version = _pointers(root).serving
    if version is None:
        raise RegistryError(f"no model has been published to {root_uri}")
    return _read_bundle(root, version, expected_features)


def manifest(root_uri: str, version: str) -> dict[str, Any]:
    """A version's manifest as stored (not verified: use load_version for that)."""
    root = _root(root_uri)
    _require_known(root, version)
    found = _read_json(root.fs, root.bundle_file(version, MANIFEST))
    if found is None:  # deleted since _require_known looked
        raise RegistryError(f"version {version!r} was just deleted from {root_uri}")
    return found


def list_versions(root_uri: str) -> list[VersionInfo]:
    """Published versions, newest first."""
    root = _root(root_uri)
    p = _pointers(root)
    out = []
    for version, m in reversed(_manifests(root)):
        meta = m.get("metadata") or {}
        out.append(VersionInfo(
            version=version, published_at=meta.get("published_at"), created_at=meta.get("created_at"),
            epochs=meta.get("epochs"), validation_error=meta.get("validation_error"),
            threshold=(m.get("thresholds") or {}).get("threshold"),
            current=version == p.current, pinned=version == p.pinned,
        ))
    return out


# ---------------------------------------------------------------- publishing


def publish(root_uri: str, bundle: ModelBundle, *, keep: int, make_current: bool = True) -> str:
    """Publish a bundle as a new version (atomically, see the module docstring); returns the version.

    ``make_current=False`` stores it without serving it (a challenger to promote later).
    Republishing identical content is a no-op for the files; the same version name with
    different content is refused.
    """
    root = _root(root_uri)
    version = check_version_name(bundle.version)
    stamped = dataclasses.replace(bundle, metadata={**bundle.metadata, "published_at": _now()})
    files = encode_bundle(stamped)
    final = root.version_dir(version)
    if not _already_published(root, version, files):
        staged = root.staging(f"{version}-{secrets.token_hex(4)}")
        _write_files(root.fs, staged, files)
        decode_bundle(_read_files(root.fs, staged))  # what was written reads back intact
        _move_dir(root.fs, staged, final)
        _read_bundle(root, version, None)  # complete in place before anything names it
    if make_current:
        p = _pointers(root)
        _write_pointer(root, CURRENT, {"version": version, "published_at": _now(),
                                       "previous": p.current if p.current != version else None})
        if p.pinned is not None:
            log.warning("published while pinned: the pinned version is still served", version=version, pinned=p.pinned)
    _prune(root, keep, time.time())
    return version


def _already_published(root: _Root, version: str, files: dict[str, bytes]) -> bool:
    """True if this content already sits under ``models/<version>``; clears a broken leftover."""
    final = root.version_dir(version)
    if not storage.exists(root.fs, final):
        return False
    try:
        _read_bundle(root, version, None)
    except BundleError:
        root.fs.delete_dir(final)
        return False
    old = _read_json(root.fs, root.bundle_file(version, MANIFEST)) or {}
    if json.loads(files[MANIFEST])["files"] != old.get("files"):
        raise RegistryError(f"version {version} is already published with different content")
    return True


def _write_files(fs: pafs.FileSystem, path: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(fs, storage.join(path, name), data)


def _read_files(fs: pafs.FileSystem, path: str) -> dict[str, bytes]:
    return {n: storage.read_bytes(fs, storage.join(path, n)) for n in (MANIFEST, WEIGHTS, SCALING)}


def _move_dir(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """A rename where the filesystem has one; a copy where it cannot move directories."""
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    try:
        fs.move(src, dest)
    except (NotImplementedError, OSError):
        _write_files(fs, dest, _read_files(fs, src))
        fs.delete_dir(src)


# ---------------------------------------------------------------- operator actions


def promote(root_uri: str, version: str) -> None:
    """Make a version current and pin it (a later publish does not replace it until unpinned)."""
    root = _root(root_uri)
    _require_known(root, version)
    _verified(root, version, "promote")
    previous = _pointers(root).current
    _write_pointer(root, PINNED, {"version": version})
    _write_pointer(root, CURRENT, {"version": version, "published_at": _now(),
                                   "previous": previous if previous != version else None})


def rollback(root_uri: str, to: str | None = None) -> str:
    """Pin ``to``, or the version published just before the one being served; returns it."""
    root = _root(root_uri)
    if to is None:
        to = _version_before(root, _pointers(root).serving)
    _require_known(root, to)
    _verified(root, to, "roll back to")
    _write_pointer(root, PINNED, {"version": to})
    return to


def unpin(root_uri: str) -> str | None:
    """Serve CURRENT again; returns the version now served."""
    root = _root(root_uri)
    if storage.exists(root.fs, root.pointer(PINNED)):
        root.fs.delete_file(root.pointer(PINNED))
    return _pointers(root).current


def _verified(root: _Root, version: str, action: str) -> None:
    try:
        _read_bundle(root, version, None)
    except BundleError as exc:
        raise RegistryError(f"refusing to {action} {version}: {exc}") from None


def _version_before(root: _Root, serving: str | None) -> str:
    if serving is None:
        raise RegistryError(f"no model has been published to {root.uri}")
    ordered = [v for v, _ in _manifests(root)]
    if serving not in ordered:
        raise RegistryError(f"the served version {serving} is missing from {root.uri}")
    for candidate in reversed(ordered[:ordered.index(serving)]):
        try:
            _read_bundle(root, candidate, None)
        except BundleError:
            continue
        return candidate
    raise RegistryError(f"no loadable version older than {serving} in {root.uri}")


# ---------------------------------------------------------------- pruning


def prune(root_uri: str, *, keep: int, now: float | None = None) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current or pinned one), incomplete
    version directories and staging entries untouched for an hour; returns the deleted versions."""
    return _prune(_root(root_uri), keep, time.time() if now is None else now)


def _prune(root: _Root, keep: int, now: float) -> list[str]:
    if keep < 1:
        raise ValueError("keep must be >= 1")
    p = _pointers(root)
    protected = {p.current, p.pinned}
    complete = [v for v, _ in _manifests(root)]
    doomed = [v for v in complete[:max(0, len(complete) - keep)] if v not in protected]
    for d in storage.list_dirs(root.fs, storage.join(root.path, MODELS)):
        if d in complete or d in protected:
            continue
        try:
            path = root.version_dir(d)
        except RegistryError as exc:  # not a version name, or a link leading out: not ours to delete
            log.warning("registry entry left alone", entry=d, reason=str(exc))
            continue
        if _stale(root.fs, path, now):
            doomed.append(d)
    for version in doomed:
        _remove_version(root, version)
    _clean_staging(root, now)
    return doomed


def _remove_version(root: _Root, version: str) -> None:
    """Move out of ``models/`` first where possible, so a kill mid-delete leaves no half version."""
    src = root.version_dir(version)
    trash = root.staging(f"{version}-{secrets.token_hex(4)}.deleted")
    try:
        root.fs.create_dir(root.confined(storage.join(root.path, STAGING)), recursive=True)
        root.fs.move(src, trash)
    except (NotImplementedError, OSError):
        trash = src
    root.fs.delete_dir(trash)


def _clean_staging(root: _Root, now: float) -> None:
    staging = root.confined(storage.join(root.path, STAGING))  # never sweep a directory elsewhere
    if not storage.exists(root.fs, staging):
        return
    for info in root.fs.get_file_info(pafs.FileSelector(staging, recursive=False)):
        if not _stale(root.fs, info.path, now):
            continue
        if info.type == pafs.FileType.Directory:
            root.fs.delete_dir(info.path)
        else:
            root.fs.delete_file(info.path)


def _stale(fs: pafs.FileSystem, path: str, now: float) -> bool:
    """Untouched for STALE_AFTER_S: judged by the newest file inside (directory times are unreliable)."""
    info = fs.get_file_info(path)
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos += fs.get_file_info(pafs.FileSelector(path, recursive=True))
    times = [i.mtime.timestamp() for i in infos if i.mtime is not None and i.type == pafs.FileType.File]
    if not times and info.mtime is not None:
        times = [info.mtime.timestamp()]
    return not times or now - max(times) > STALE_AFTER_S
