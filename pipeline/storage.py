"""Small helpers over ``pyarrow.fs`` so the registry and the archive work on any filesystem
pyarrow reaches (local disk, S3, GCS, HDFS, or the in-memory ``mock://`` filesystem in tests)."""

from __future__ import annotations

import os
import posixpath

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


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes, tmp_suffix: str) -> None:
    """Write beside the target, then rename over it: readers see the old or the new file, never half."""
    tmp = f"{path}.{tmp_suffix}.tmp"
    write_bytes(fs, tmp, data)
    fs.move(tmp, path)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names of the directories directly under ``path`` (empty when it does not exist)."""
    if not exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
