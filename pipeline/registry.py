"""The model registry: versioned bundle directories and a pointer to the version to serve.

Layout under a root on any filesystem pyarrow reaches (local disk, S3, GCS, HDFS)::

    models/<version>/   a complete bundle (manifest.json, weights.npz, scaling.npz), with its
                        training report beside it (report.json, report.png) when it has one
    candidates/<version>/  a model the gate refused, kept with its report for inspection and
                        ``promote``; the newest ``keep_candidates`` are kept. Never served.
    CURRENT             {"version", "published_at", "previous"}: the newest published version
    PINNED              {"version"}: chosen by an operator (promote, rollback); wins over CURRENT
    .staging/           uploads in progress, pointer temp files, deletions; never read

Why a crash cannot break readers: a bundle is written and verified under ``.staging``,
moved to ``models/<version>`` (where the filesystem cannot move a directory, as on object
stores, it is copied) and verified again there; only then does CURRENT name it, and
CURRENT is replaced by moving a complete temp file over it. Readers resolve versions only
through PINNED and CURRENT, so a process killed at any point leaves them naming a complete
bundle: the previous one or the new one. Pruning never deletes the current or pinned version,
and it first moves a doomed version into ``.staging`` where it can, so on local disk ``models/``
only ever holds complete versions. An operator may pin a version while a publish prunes it: the
prune reads the pointers again before each deletion and puts back a version pinned while it was
being moved out, and the pin checks that its version is still there. On an object store, where a
version is deleted in place, a pin in the moment between that re-read and the deletion can still
lose it (the pin then names a missing version: roll back again).

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.bundle import (MANIFEST, REPORT_FILES, REPORT_JSON, SCALING, WEIGHTS, BundleError, ModelBundle,
                             check_features, decode_bundle, encode_bundle)
from pipeline.logs import get_logger

MODELS = "models"
CANDIDATES = "candidates"
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

    @property
    def protected(self) -> set[str | None]:
        """The versions a prune must keep."""
        return {self.current, self.pinned}


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
    candidate: bool = False                 # refused by the gate, kept under candidates/
    gate: dict[str, Any] | None = None      # the gate's verdict and paired figures (see gate_summary)


@dataclass(frozen=True)
class _Root:
    fs: pafs.FileSystem
    path: str
    uri: str

    def version_dir(self, version: str) -> str:
        return self.confined(storage.join(self.path, MODELS, check_version_name(version)))

    def bundle_file(self, version: str, name: str) -> str:
        return self.confined(storage.join(self.version_dir(version), name))

    def area_dir(self, area: str, version: str) -> str:
        """A version's directory under ``models/`` or ``candidates/``."""
        return self.confined(storage.join(self.path, area, check_version_name(version)))

    def area_file(self, area: str, version: str, name: str) -> str:
        return self.confined(storage.join(self.area_dir(area, version), name))

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
    """Replace a pointer atomically: a complete temp file in .staging is moved over it (on a local
    disk flushed first, and the move after it: after a power loss the pointer is the old or the
    new one, and the version it names is on the disk, see :func:`_store_version`)."""
    path = root.pointer(name)
    storage.write_atomic(root.fs, path, json.dumps(payload, sort_keys=True).encode(),
                         tmp=root.staging(f"{name}-{secrets.token_hex(4)}.tmp"), sync=True)
    storage.fsync(root.fs, posixpath.dirname(path))


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


def _read_bundle(root: _Root, version: str, expected_features: tuple[str, ...] | None,
                 area: str = MODELS) -> ModelBundle:
    """A version's bundle, verified. A file missing from it is a defect (:class:`BundleError`); a
    store that fails to answer (an I/O error, a 503, access denied) raises ``OSError``: the
    version may be fine, so nobody may treat it as broken (delete it, refuse it, skip it)."""
    paths = {name: root.area_file(area, version, name) for name in (MANIFEST, WEIGHTS, SCALING)}
    files = {}
    for name, path in paths.items():
        try:
            files[name] = storage.read_bytes(root.fs, path)
        except OSError as exc:
            if storage.exists(root.fs, path):  # (some object stores report a missing key as a plain OSError)
                raise
            raise BundleError(f"cannot read version {version} in {root.uri}: {exc}") from None
    bundle = decode_bundle(files)
    if bundle.version != version:
        raise BundleError(f"directory of version {version} holds version {bundle.version}")
    if expected_features is not None:
        check_features(bundle, expected_features)
    return bundle


def _manifests(root: _Root, area: str = MODELS) -> list[tuple[str, dict[str, Any]]]:
    """Readable manifests of the version directories, oldest publication first."""
    found = []
    for name in storage.list_dirs(root.fs, storage.join(root.path, area)):
        try:
            manifest = _read_json(root.fs, root.area_file(area, name, MANIFEST))
        except RegistryError:  # not a version, a link leading out, or a manifest that is not JSON
            continue
        if manifest is not None:
            found.append((name, manifest))
    return sorted(found, key=lambda item: (_published_at(item[1]) or "", item[0]))


def _published_at(manifest: dict[str, Any]) -> str | None:
    meta = manifest.get("metadata") or {}
    return meta.get("published_at") or meta.get("stored_at") or meta.get("created_at")


def _require_known(root: _Root, version: str) -> None:
    if not storage.exists(root.fs, root.bundle_file(version, MANIFEST)):
        known = [v for v, _ in _manifests(root)]
        raise RegistryError(f"unknown version {version!r} in {root.uri}; known: {', '.join(known) or 'none'}")


def load_version(root_uri: str, version: str, expected_features: tuple[str, ...] | None = None) -> ModelBundle:
    root = _root(root_uri)
    _require_known(root, version)
    return _read_retrying(root, version, expected_features)


def _read_retrying(root: _Root, version: str, expected_features: tuple[str, ...] | None = None,
                   area: str = MODELS) -> ModelBundle:
    """:func:`_read_bundle` through the store's retries: a store that keeps failing raises
    :class:`~pipeline.storage.StorageError`, never a verdict on the version."""
    return storage.retrying(f"reading version {version}", root.uri,
                            lambda: _read_bundle(root, version, expected_features, area))


def load_current(root_uri: str, expected_features: tuple[str, ...] | None = None) -> ModelBundle:
    """The bundle to serve (PINNED over CURRENT), verified."""
    root = _root(root_uri)
    version = _pointers(root).serving
    if version is None:
        raise RegistryError(f"no model has been published to {root_uri}")
    return _read_retrying(root, version, expected_features)


def manifest(root_uri: str, version: str) -> dict[str, Any]:
    """A version's manifest as stored, published or candidate (not verified: use load_version for that)."""
    root = _root(root_uri)
    area = _area_of(root, version)
    found = _read_json(root.fs, root.area_file(area, version, MANIFEST))
    if found is None:  # deleted since _require_known looked
        raise RegistryError(f"version {version!r} was just deleted from {root_uri}")
    return found


def list_versions(root_uri: str, *, candidates: bool = False) -> list[VersionInfo]:
    """Published versions, newest first; with ``candidates``, then the refused ones kept, newest first."""
    root = _root(root_uri)
    p = _pointers(root)
    out = []
    for area in (MODELS, CANDIDATES) if candidates else (MODELS,):
        for version, m in reversed(_manifests(root, area)):
            meta = m.get("metadata") or {}
            out.append(VersionInfo(
                version=version, published_at=meta.get("published_at") or meta.get("stored_at"),
                created_at=meta.get("created_at"), epochs=meta.get("epochs"),
                validation_error=meta.get("validation_error"), threshold=(m.get("thresholds") or {}).get("threshold"),
                current=version == p.current, pinned=version == p.pinned, candidate=area == CANDIDATES,
                gate=gate_summary(meta.get("gate")),
            ))
    return out


def gate_summary(gate: Any) -> dict[str, Any] | None:
    """The gate's verdict and its paired intervals, from a manifest's ``metadata.gate``."""
    if not isinstance(gate, dict):
        return None
    paired = gate.get("paired") if isinstance(gate.get("paired"), dict) else {}
    return {"decision": gate.get("decision"), "reason": gate.get("reason"),
            "champion": (gate.get("champion") or {}).get("version") if isinstance(gate.get("champion"), dict) else None,
            **{k: paired.get(k) for k in ("error_change", "alert_change", "error_allowed", "alert_allowed")}}


def _area_of(root: _Root, version: str) -> str:
    """Where a version lives: ``models`` (published) or ``candidates`` (refused, kept)."""
    for area in (MODELS, CANDIDATES):
        if storage.exists(root.fs, root.area_file(area, version, MANIFEST)):
            return area
    known = [v for v, _ in _manifests(root)]
    kept = [v for v, _ in _manifests(root, CANDIDATES)]
    raise RegistryError(f"unknown version {version!r} in {root.uri}; known: {', '.join(known) or 'none'}"
                        + (f"; candidates: {', '.join(kept)}" if kept else ""))


def is_candidate(root_uri: str, version: str) -> bool:
    """True for a refused model kept under candidates/, False for a published one; unknown raises."""
    return _area_of(_root(root_uri), version) == CANDIDATES


def load_any(root_uri: str, version: str) -> ModelBundle:
    """A published or candidate version, verified (for inspection; serving uses load_version)."""
    root = _root(root_uri)
    return _read_retrying(root, version, None, _area_of(root, version))


def read_report(root_uri: str, version: str) -> dict[str, Any] | None:
    """The training report (report.json) beside a published or candidate version, if it has one."""
    root = _root(root_uri)
    return _read_json(root.fs, root.area_file(_area_of(root, version), version, REPORT_JSON))


# ---------------------------------------------------------------- publishing


def publish(root_uri: str, bundle: ModelBundle, *, keep: int, make_current: bool = True,
            extra: dict[str, bytes] | None = None) -> str:
    """Publish a bundle as a new version (atomically, see the module docstring); returns the version.

    ``make_current=False`` stores it without serving it (a challenger to promote later).
    ``extra`` holds report files (:data:`~pipeline.bundle.REPORT_FILES`) written beside the
    bundle; they are not covered by its checksums and loading ignores them.
    Republishing identical content is a no-op for the files; the same version name with
    different content is refused.
    """
    root = _root(root_uri)
    version = check_version_name(bundle.version)
    stamped = dataclasses.replace(bundle, metadata={**bundle.metadata, "published_at": _now()})
    files = {**encode_bundle(stamped), **_extras(extra)}
    storage.retrying(f"publishing version {version}", root_uri, lambda: _store_version(root, version, files))
    if make_current:
        def point() -> Pointers:
            p = _pointers(root)
            _write_pointer(root, CURRENT, {"version": version, "published_at": _now(),
                                           "previous": p.current if p.current != version else None})
            return p

        p = storage.retrying(f"pointing CURRENT at version {version}", root_uri, point)
        if p.pinned is not None:
            log.warning("published while pinned: the pinned version is still served", version=version, pinned=p.pinned)
    try:
        _prune(root, keep, time.time())
    except OSError as exc:  # published all the same; the next publish or `prune` tries again
        log.warning("published, but pruning old versions failed", version=version, error=str(exc))
    return version


def _store_version(root: _Root, version: str, files: dict[str, bytes]) -> None:
    """One try at putting the bundle, verified, under ``models/<version>``. Whatever fails (a
    full disk, an object store error, a bundle that does not read back), the try removes its
    staging directory and anything it left under ``models/<version>`` before raising."""
    if _already_published(root, version, files):
        return
    final = root.version_dir(version)
    staged = root.staging(f"{version}-{secrets.token_hex(4)}")
    try:
        _write_files(root.fs, staged, files)
        decode_bundle(_read_files(root.fs, staged))  # what was written reads back intact
        _move_dir(root.fs, staged, final)
        for directory in (final, posixpath.dirname(final)):  # on a local disk: the move outlives a power loss
            storage.fsync(root.fs, directory)
        _read_bundle(root, version, None)  # complete in place before anything names it
    except BaseException as exc:
        _discard(root, staged, final, exc)
        raise


def _discard(root: _Root, staged: str, final: str, cause: BaseException) -> None:
    """Remove what a failed try wrote: its staging directory and an incomplete version (nothing
    names it: CURRENT is written only after it verifies)."""
    for path in (staged, final):
        try:
            if storage.exists(root.fs, path):
                root.fs.delete_dir(path)
        except OSError as exc:  # swept later by prune, once stale
            log.warning("could not remove what a failed publish left", path=path, error=str(exc),
                        cause=str(cause))


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
    """Each file written and, on a local disk, flushed: a rename alone does not persist the data."""
    for name, data in files.items():
        storage.write_bytes(fs, storage.join(path, name), data)
        storage.fsync(fs, storage.join(path, name))


def _read_files(fs: pafs.FileSystem, path: str) -> dict[str, bytes]:
    return {n: storage.read_bytes(fs, storage.join(path, n)) for n in (MANIFEST, WEIGHTS, SCALING)}


def _read_extras(fs: pafs.FileSystem, path: str) -> dict[str, bytes]:
    """The report files present beside a bundle."""
    return {n: storage.read_bytes(fs, storage.join(path, n)) for n in REPORT_FILES
            if storage.exists(fs, storage.join(path, n))}


def _extras(extra: dict[str, bytes] | None) -> dict[str, bytes]:
    unknown = sorted(set(extra or {}) - set(REPORT_FILES))
    if unknown:
        raise RegistryError(f"a bundle may carry only {', '.join(REPORT_FILES)} beside it, not {', '.join(unknown)}")
    return dict(extra or {})


def _move_dir(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """A rename where the filesystem has one; a copy where it cannot move directories, with the
    manifest copied last: a directory is a version once it has one, so a copy killed half-way leaves
    an incomplete directory (swept after an hour), not a version without its weights."""
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    try:
        fs.move(src, dest)
    except (NotImplementedError, OSError):
        files = {**_read_files(fs, src), **_read_extras(fs, src)}
        _write_files(fs, dest, {**{n: d for n, d in files.items() if n != MANIFEST}, MANIFEST: files[MANIFEST]})
        fs.delete_dir(src)


# ---------------------------------------------------------------- operator actions


def promote(root_uri: str, version: str, *, keep: int | None = None) -> None:
    """Make a version current and pin it (a later publish does not replace it until unpinned).

    A candidate (refused by the gate) is published first, report and all, and leaves
    candidates/; ``keep`` then prunes old published versions as a publish does.
    """
    root = _root(root_uri)
    if _area_of(root, version) == CANDIDATES:
        _publish_candidate(root_uri, root, version, keep)
    _require_known(root, version)
    _verified(root, version, "promote")
    previous = _pointers(root).current
    _pin(root, version, "promote")
    _write_pointer(root, CURRENT, {"version": version, "published_at": _now(),
                                   "previous": previous if previous != version else None})


def rollback(root_uri: str, to: str | None = None) -> str:
    """Pin ``to``, or the version published just before the one being served; returns it."""
    root = _root(root_uri)
    if to is None:
        to = _version_before(root, _pointers(root).serving)
    _require_known(root, to)
    _verified(root, to, "roll back to")
    _pin(root, to, "roll back to")
    return to


def _pin(root: _Root, version: str, action: str) -> None:
    """Write PINNED, then check the version is still there: a prune running meanwhile (a publish's)
    read the pointers before this one and may have deleted it, and it re-reads them before each
    deletion. If it is gone, the pin is undone and the action refused."""
    before = _read_json(root.fs, root.pointer(PINNED))
    _write_pointer(root, PINNED, {"version": version})
    if storage.exists(root.fs, root.bundle_file(version, MANIFEST)):
        return
    if before is None:
        root.fs.delete_file(root.pointer(PINNED))
    else:
        _write_pointer(root, PINNED, before)
    raise RegistryError(f"refusing to {action} {version}: a prune deleted it meanwhile")


def unpin(root_uri: str) -> str | None:
    """Serve CURRENT again; returns the version now served."""
    root = _root(root_uri)
    if storage.exists(root.fs, root.pointer(PINNED)):
        root.fs.delete_file(root.pointer(PINNED))
    return _pointers(root).current


def _verified(root: _Root, version: str, action: str) -> None:
    try:
        _read_retrying(root, version)
    except BundleError as exc:
        raise RegistryError(f"refusing to {action} {version}: {exc}") from None


def _version_before(root: _Root, serving: str | None) -> str:
    if serving is None:
        raise RegistryError(f"no model has been published to {root.uri}")
    ordered = [v for v, _ in _manifests(root)]
    if serving not in ordered:
        raise RegistryError(f"the served version {serving} is missing from {root.uri}")
    for candidate in reversed(ordered[:ordered.index(serving)]):
        try:  # (a store that does not answer stops the search: it must not skip a good version)
            _read_retrying(root, candidate)
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
    protected = _pointers(root).protected
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
    def doomed_still(version: str) -> bool:  # not pinned or published since the pointers were read
        return version not in _pointers(root).protected

    removed = []
    for version in doomed:
        if doomed_still(version) and _remove_version(root, version, unless_kept=doomed_still):
            removed.append(version)
    _clean_staging(root, now)
    return removed


def _remove_version(root: _Root, version: str, area: str = MODELS,
                    unless_kept: Callable[[str], bool] | None = None) -> bool:
    """Move out of ``models/`` first where possible, so a kill mid-delete leaves no half version.
    ``unless_kept``: asked once the version is out of ``models/``; False puts it back (an operator
    pinned it meanwhile) and nothing is deleted. Returns whether it was deleted."""
    src = root.area_dir(area, version)
    trash = root.staging(f"{version}-{secrets.token_hex(4)}.deleted")
    try:
        root.fs.create_dir(root.confined(storage.join(root.path, STAGING)), recursive=True)
        root.fs.move(src, trash)
    except (NotImplementedError, OSError):  # deleted in place: the manifest first, so it stops being a version
        trash = src
        manifest = storage.join(src, MANIFEST)
        if storage.exists(root.fs, manifest):
            root.fs.delete_file(manifest)
    if trash != src and unless_kept is not None and not unless_kept(version):
        try:
            root.fs.move(trash, src)
        except OSError as exc:
            log.error("a version pinned while it was pruned could not be put back: move it back by hand",
                      version=version, kept_at=trash, error=str(exc))
        return False
    root.fs.delete_dir(trash)
    return True


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


# ---------------------------------------------------------------- candidates


def store_candidate(root_uri: str, bundle: ModelBundle, *, keep: int, extra: dict[str, bytes] | None = None) -> str:
    """Keep a model the gate refused under ``candidates/<version>`` (staged, verified, moved, as a
    publish), with its report files; then delete all but the newest ``keep`` candidates. Nothing
    names a candidate, so it is never served until ``promote`` publishes it."""
    root = _root(root_uri)
    version = check_version_name(bundle.version)
    stamped = dataclasses.replace(bundle, metadata={**bundle.metadata, "stored_at": _now()})
    files = {**encode_bundle(stamped), **_extras(extra)}
    final = root.area_dir(CANDIDATES, version)
    staged = root.staging(f"{version}-{secrets.token_hex(4)}.candidate")
    _write_files(root.fs, staged, files)
    decode_bundle(_read_files(root.fs, staged))
    if storage.exists(root.fs, final):  # the same version stored again: the newer copy wins
        _remove_version(root, version, CANDIDATES)
    _move_dir(root.fs, staged, final)
    _read_bundle(root, version, None, CANDIDATES)
    prune_candidates(root_uri, keep=keep)
    return version


def prune_candidates(root_uri: str, *, keep: int, now: float | None = None) -> list[str]:
    """Delete all but the newest ``keep`` candidates (0: all), and incomplete candidate directories
    untouched for an hour; returns the deleted versions."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    root = _root(root_uri)
    now = time.time() if now is None else now
    complete = [v for v, _ in _manifests(root, CANDIDATES)]
    doomed = complete[:max(0, len(complete) - keep)]
    for d in storage.list_dirs(root.fs, storage.join(root.path, CANDIDATES)):
        if d in complete:
            continue
        try:
            path = root.area_dir(CANDIDATES, d)
        except RegistryError as exc:
            log.warning("registry entry left alone", entry=d, reason=str(exc))
            continue
        if _stale(root.fs, path, now):
            doomed.append(d)
    for version in doomed:
        _remove_version(root, version, CANDIDATES)
    return doomed


def _publish_candidate(root_uri: str, root: _Root, version: str, keep: int | None) -> None:
    """Publish a candidate deliberately (without making it current), report files included,
    then remove it from candidates/. A kill in between leaves it in both: harmless, the
    published copy wins and pruning removes the other."""
    try:
        bundle = _read_retrying(root, version, None, CANDIDATES)
    except BundleError as exc:
        raise RegistryError(f"refusing to promote {version}: {exc}") from None
    extras = _read_extras(root.fs, root.area_dir(CANDIDATES, version))
    meta = {k: v for k, v in bundle.metadata.items() if k != "stored_at"}
    meta["promoted"] = {"from": "candidate", "at": _now(), "stored_at": bundle.metadata.get("stored_at")}
    publish(root_uri, dataclasses.replace(bundle, metadata=meta), keep=keep if keep is not None else 1 << 30,
            make_current=False, extra=extras)
    _remove_version(root, version, CANDIDATES)
