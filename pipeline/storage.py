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
