"""Small helpers over ``pyarrow.fs`` so the registry and the archive work on any filesystem
pyarrow reaches (local disk, S3, GCS, HDFS, or the in-memory ``mock://`` filesystem in tests)."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Callable

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; a plain path means the local disk."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("mock://"):
        return _MOCK, uri[len("mock://"):].rstrip("/") or "/"
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


_MOCK = pafs._MockFileSystem()  # process-wide in-memory filesystem for tests


class PathEscapeError(ValueError):
    """A path built from a setting, a manifest or a record would leave the root it belongs under."""


def check_component(name: str, what: str) -> str:
    """``name`` if it is one plain path component: not empty, ``.`` or ``..``, and without ``/``,
    ``\\`` or NUL (so not absolute either)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise PathEscapeError(f"{what} {name!r} is not a single file or directory name")
    return name


def confined(fs: pafs.FileSystem, root: str, path: str) -> str:
    """``path`` if it stays inside ``root``: as written (no ``..`` climbing out, no other
    absolute path) and, on a local disk, also once symbolic links are resolved, so a link in
    the tree pointing elsewhere is refused rather than followed."""
    base, target = posixpath.normpath(root), posixpath.normpath(path)
    if not _inside(base, target):
        raise PathEscapeError(f"{path} is outside {root}")
    if isinstance(fs, pafs.LocalFileSystem):
        real_base, real = os.path.realpath(base), os.path.realpath(target)
        if not _inside(real_base, real):
            raise PathEscapeError(f"{path} resolves to {real}, outside {root} (a symbolic link leads out)")
    return path


def _inside(base: str, path: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return bytes(fh.read())


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes | Callable[[str], object], *, tmp: str,
                 sync: bool = False) -> None:
    """Write the file completely at ``tmp``, then move it to ``path``: readers of ``path`` see
    the old file (or none) or the new one, never part of one. A failed write deletes ``tmp``;
    a killed process leaves it, so put it where readers do not look and its owner sweeps.

    ``data`` is the bytes, or a function writing the file at the path it is given. ``sync``
    flushes the file to a local disk before the move; the caller then fsyncs the directories
    (:func:`fsync`) once the moves that must survive a power loss are done.
    """
    for directory in dict.fromkeys([posixpath.dirname(tmp), posixpath.dirname(path)]):
        fs.create_dir(directory, recursive=True)
    try:
        if callable(data):
            data(tmp)
        else:
            with fs.open_output_stream(tmp) as fh:
                fh.write(data)
        if sync:
            fsync(fs, tmp)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if exists(fs, tmp):
                fs.delete_file(tmp)
        raise


def fsync(fs: pafs.FileSystem, path: str) -> None:
    """Flush a file or directory to a local disk (a no-op on other filesystems)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names of the directories directly under ``path`` (empty when it does not exist)."""
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
