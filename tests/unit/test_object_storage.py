"""Object storage settings: the ``[storage]`` section builds the S3 filesystem of ``s3://``
URIs (endpoint, region, credentials), its secret never shows, the environment still works
without it, an unreachable store is one line naming the setting, and store writes are retried."""

from __future__ import annotations

import errno
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.settings import SettingsError, StorageSettings, load_settings, to_dict

REPO = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI-K7MDENG-very-secret"  # noqa: S105 - a test value


@pytest.fixture(autouse=True)
def _restore_storage_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    before = storage.config()
    yield
    storage.configure(before)


def options(fs: pafs.FileSystem) -> dict[str, Any]:
    assert isinstance(fs, pafs.S3FileSystem)
    return fs.__reduce__()[1][0]


def test_storage_settings_build_the_s3_filesystem(tmp_path: Path) -> None:
    key_file = tmp_path / "secret"
    key_file.write_text(SECRET + "\n")
    s = load_settings(env={}, overrides={"storage.endpoint_url": "http://minio.internal:9000",
                                         "storage.access_key_id": "plantwatch",
                                         "storage.secret_access_key_file": str(key_file)})
    storage.configure(s.storage)
    fs, path = storage.resolve("s3://plant-data/registry/")
    o = options(fs)
    assert path == "plant-data/registry"
    assert (o["endpoint_override"], o["scheme"], o["region"]) == ("minio.internal:9000", "http", "us-east-1")
    assert (o["access_key"], o["secret_key"]) == ("plantwatch", SECRET)

    storage.configure(StorageSettings(region="eu-central-1"))  # AWS with a region: no lookup, default credentials
    o = options(storage.resolve("s3://plant-data/archive")[0])
    assert (o["region"], o["endpoint_override"], o["access_key"] or "") == ("eu-central-1", "", "")


def test_without_storage_settings_the_environment_still_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    fs, path = storage.resolve("s3://plant-data/registry")  # pyarrow's own resolution, as before
    assert isinstance(fs, pafs.S3FileSystem) and path == "plant-data/registry" and fs.region == "us-west-2"
    storage.configure(StorageSettings(access_key_id="k", secret_access_key=SECRET))  # credentials only
    fs, _ = storage.resolve("s3://plant-data/registry")
    assert options(fs)["region"] == "us-west-2"  # the environment's region, not an AWS lookup


def test_the_secret_never_shows(tmp_path: Path) -> None:
    s = load_settings(env={"PLANTWATCH_STORAGE__SECRET_ACCESS_KEY": SECRET,
                           "PLANTWATCH_STORAGE__ACCESS_KEY_ID": "plantwatch"})
    assert s.storage.secret() == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert to_dict(s)["storage"]["secret_access_key"] == "***"
    done = subprocess.run([sys.executable, "-m", "cli", "config"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PLANTWATCH_STORAGE__SECRET_ACCESS_KEY": SECRET,
                               "PLANTWATCH_STORAGE__ACCESS_KEY_ID": "plantwatch"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr and '"secret_access_key": "***"' in done.stdout


@pytest.mark.parametrize("overrides, needle", [
    ({"storage.endpoint_url": "minio:9000"}, "storage.endpoint_url': must start with http:// or https://"),
    ({"storage.access_key_id": "k"}, "storage.access_key_id': access_key_id and a secret access key"),
    ({"storage.secret_access_key": SECRET}, "storage.access_key_id'"),
    ({"storage.access_key_id": "k", "storage.secret_access_key": SECRET, "storage.secret_access_key_file": "/x"},
     "set either secret_access_key or secret_access_key_file"),
    ({"storage.access_key_id": "k", "storage.secret_access_key_file": "/nonexistent/key"}, "cannot read /nonexistent/key"),
    ({"storage.retry_attempts": "0"}, "storage.retry_attempts': must be >= 1"),
])
def test_bad_storage_settings_are_refused_without_echoing_the_secret(overrides: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env={}, overrides=overrides)
    assert needle in str(caught.value) and SECRET not in str(caught.value)


_NO_REGION = OSError("When resolving region for bucket 'plant-data': AWS Error NETWORK_CONNECTION during HeadBucket "
                     "operation: curlCode: 6, Could not resolve hostname; Details: Could not resolve host: "
                     "plant-data.s3.us-east-1.amazonaws.com")


def test_an_unreachable_store_without_an_endpoint_is_one_line_naming_the_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(uri: str) -> Any:
        raise _NO_REGION

    monkeypatch.setattr(storage, "_from_uri", unreachable)
    with pytest.raises(storage.StorageError) as caught:
        storage.resolve("s3://plant-data/registry")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot reach the object store of s3://plant-data/registry: no storage.endpoint_url "
                              "and no storage.region is set, so AWS S3 was asked for the region of bucket 'plant-data'")
    assert message.endswith("set storage.endpoint_url for MinIO or another S3-compatible store, "
                            "or storage.region for AWS")


def test_the_cli_prints_it_as_one_line_and_exits_1(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    def unreachable(uri: str) -> Any:
        raise _NO_REGION

    monkeypatch.setattr(storage, "_from_uri", unreachable)
    assert main(["models", "list", "--registry", "s3://plant-data/registry"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("plantwatch models: cannot reach the object store of s3://plant-data/registry")


def test_retrying_logs_each_failure_with_its_duration_then_fails_in_one_line() -> None:
    from structlog.testing import capture_logs

    storage.configure(StorageSettings(retry_attempts=3, retry_backoff_s=0.5, retry_backoff_max_s=0.75,
                                      endpoint_url="http://minio.internal:9000"))
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return "done"

    with capture_logs() as logs:
        assert storage.retrying("publishing version v2", "s3://plant-data/registry", flaky, sleep=slept.append) == "done"
    assert slept == [0.5, 0.75]
    warned = [e for e in logs if e["event"] == "object store slow/failed, retrying"]
    assert [e["attempt"] for e in warned] == [1, 2] and all("duration_s" in e for e in warned)
    assert warned[0]["endpoint"] == "http://minio.internal:9000" and warned[0]["errno"] == errno.ETIMEDOUT

    def down() -> None:
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(storage.StorageError) as caught:
        storage.retrying("publishing version v2", "s3://plant-data/registry", down, sleep=slept.append)
    assert caught.value.errno == errno.ECONNREFUSED
    assert str(caught.value).startswith("publishing version v2 in s3://plant-data/registry failed after 3 attempts")
    assert str(caught.value).endswith("Connection refused (storage.endpoint_url is http://minio.internal:9000)")


def test_a_slow_store_call_is_logged_with_its_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    storage.configure(StorageSettings(slow_s=0.05))
    ticks = itertools.count(0.0, 0.1)  # each look at the clock: 0.1 s later
    monkeypatch.setattr(storage.time, "monotonic", lambda: next(ticks))
    with capture_logs() as logs:
        storage.retrying("archive write", "s3://plant-data/archive", lambda: None)
    slow = [e for e in logs if e["event"] == "object store slow"]
    assert len(slow) == 1 and slow[0]["duration_s"] == 0.1 and slow[0]["op"] == "archive write"


def test_config_shows_the_storage_section_for_a_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pw.toml"
    cfg.write_text('[storage]\nendpoint_url = "http://minio:9000"\naccess_key_id = "plantwatch"\n'
                   f'secret_access_key = "{SECRET}"\n')
    s = load_settings(cfg, env={})
    shown = json.dumps(to_dict(s))
    assert '"endpoint_url": "http://minio:9000"' in shown and SECRET not in shown
