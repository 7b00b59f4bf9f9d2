"""Small helpers over ``pyarrow.fs`` so the registry and the archive work on any filesystem
pyarrow reaches (local disk, S3, GCS, HDFS, or the in-memory ``mock://`` filesystem in tests).

Object stores: :func:`configure` takes the ``[storage]`` settings of the process (endpoint,
region, credentials, retries; the CLI calls it once, the archiver and the trainer with their
settings). ``s3://`` URIs are then opened with them; without any, pyarrow's own sources apply
as before (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``…, options in the URI's
query string, instance or workload identity). Writes that must survive a slow or failing store
go through :func:`retrying` (or, in a daemon that must keep polling, :func:`backoff_s` and
:func:`log_retry`): each failure and each slow call is logged with its duration, and a
failure that outlasts the retries is one :class:`StorageError` line."""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyarrow.fs as pafs

from pipeline.logs import get_logger, mask_secret
from pipeline.settings import StorageSettings

T = TypeVar("T")
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")

log = get_logger(__name__)
_config = StorageSettings()


class StorageError(OSError):
    """The store cannot be reached, or kept failing through the retries. The message is one
    line naming the URI, what was tried and the setting to look at; ``errno`` is the cause's."""


def configure(settings: StorageSettings) -> None:
    """The object store settings of this process (endpoint, region, credentials, retries)."""
    global _config
    _config = settings


def config() -> StorageSettings:
    return _config


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; a plain path means the local disk."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("mock://"):
        return _MOCK, uri[len("mock://"):].rstrip("/") or "/"
    if uri.startswith("s3://"):
        return _s3(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


_MOCK = pafs._MockFileSystem()  # process-wide in-memory filesystem for tests


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    """An S3 filesystem built from the storage settings, or pyarrow's own resolution of the URI
    (the environment, options in its query string) when no storage setting is given."""
    c = _config
    parts = urllib.parse.urlsplit(uri)
    bucket, path = parts.netloc, (parts.netloc + parts.path).rstrip("/")
    if parts.query or not (c.endpoint_url or c.region or c.access_key_id):
        try:
            fs, found = _from_uri(uri)
        except OSError as exc:
            raise StorageError(_unreachable(uri, bucket, exc)) from None
        return fs, found.rstrip("/")
    options: dict[str, object] = {}
    if c.endpoint_url:
        endpoint = urllib.parse.urlsplit(c.endpoint_url)
        options["endpoint_override"] = endpoint.netloc + endpoint.path.rstrip("/")
        options["scheme"] = endpoint.scheme
    region = c.region or _env(_REGION_ENV)
    if not region and (c.endpoint_url or _env(_ENDPOINT_ENV)):
        region = "us-east-1"  # what S3-compatible stores answer to, whatever their own region
    if not region:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError as exc:
            raise StorageError(_unreachable(uri, bucket, exc)) from None
    options["region"] = region
    if c.access_key_id:
        secret = c.secret()
        mask_secret(secret)
        options.update(access_key=c.access_key_id, secret_key=secret)
    return pafs.S3FileSystem(**options), path


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def _env(names: tuple[str, ...]) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n, "").strip()), "")


def _unreachable(uri: str, bucket: str, exc: OSError) -> str:
    cause = _one_line(exc)
    if "resolving region" in cause:
        return (f"cannot reach the object store of {uri}: no storage.endpoint_url and no storage.region is set, "
                f"so AWS S3 was asked for the region of bucket {bucket!r} and did not answer ({cause}); "
                f"set storage.endpoint_url for MinIO or another S3-compatible store, or storage.region for AWS")
    return f"cannot open {uri}: {cause}"


def _endpoint_note(uri: str) -> str:
    """Which S3 endpoint an s3:// URI went to, and the setting that chooses it."""
    if not uri.startswith("s3://"):
        return ""
    if _config.endpoint_url:
        return f" (storage.endpoint_url is {_config.endpoint_url})"
    env = next((n for n in _ENDPOINT_ENV if os.environ.get(n, "").strip()), None)
    if env:
        return f" (endpoint {os.environ[env]} from {env}; storage.endpoint_url overrides it)"
    return " (AWS S3: storage.endpoint_url is not set)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- retries


def backoff_s(attempt: int) -> float:
    """The wait after failed try number ``attempt`` (1, 2, …): storage.retry_backoff_s doubled
    each time, at most storage.retry_backoff_max_s."""
    c = _config
    return min(c.retry_backoff_s * 2.0 ** min(attempt - 1, 30), c.retry_backoff_max_s)


def log_retry(what: str, uri: str, attempt: int, seconds: float, exc: BaseException, retry_in_s: float,
              **extra: object) -> None:
    """The one warning of a failed (or stalled, then failed) store call that will be retried."""
    log.warning("object store slow/failed, retrying", op=what, uri=uri, attempt=attempt,
                duration_s=round(seconds, 3), retry_in_s=round(retry_in_s, 3), error=_one_line(exc),
                errno=getattr(exc, "errno", None), endpoint=_config.endpoint_url or _env(_ENDPOINT_ENV) or None,
                **extra)


@contextlib.contextmanager
def timed(what: str, uri: str) -> Iterator[None]:
    """Log a call that took longer than storage.slow_s (and succeeded) with its duration."""
    t0 = time.monotonic()
    yield
    took = time.monotonic() - t0
    if took >= _config.slow_s:
        log.warning("object store slow", op=what, uri=uri, duration_s=round(took, 3), slow_s=_config.slow_s)


def retrying(what: str, uri: str, fn: Callable[[], T], *, attempts: int | None = None,
             cleanup: Callable[[], None] | None = None, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried up to ``attempts`` times (default storage.retry_attempts) while it raises
    ``OSError``, waiting :func:`backoff_s` between tries. ``cleanup`` runs after each failed try
    (its own errors are logged, not raised). The last failure raises :class:`StorageError`:
    "<what> in <uri> failed after N attempts over S s: <cause>"."""
    tries = attempts or _config.retry_attempts
    started = time.monotonic()
    for attempt in range(1, tries + 1):
        t0 = time.monotonic()
        try:
            with timed(what, uri):
                return fn()
        except OSError as exc:
            took = time.monotonic() - t0
            if cleanup is not None:
                try:
                    cleanup()
                except OSError as cleanup_exc:
                    log.warning("cleanup after a failed store call failed", op=what, uri=uri,
                                error=_one_line(cleanup_exc))
            if attempt == tries:
                total = time.monotonic() - started
                log.error("object store failed; giving up", op=what, uri=uri, attempts=attempt,
                          duration_s=round(total, 3), error=_one_line(exc))
                error = StorageError(f"{what} in {uri} failed after {attempt} attempt{'s' * (attempt > 1)} "
                                     f"over {total:.1f} s: {_one_line(exc)}{_endpoint_note(uri)}")
                error.errno = exc.errno
                raise error from exc
            delay = backoff_s(attempt)
            log_retry(what, uri, attempt, took, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


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
