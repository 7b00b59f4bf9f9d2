"""Mistakes an operator makes in the first weeks: each is one line naming what to fix and exit 2
(or 1 for a broker that does not answer), never a traceback, never a silent default."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from cli import main as cli_main
from cli import train_cmd
from cli.main import EXIT_FAILED, EXIT_USAGE, main
from consumers.http_server import serve
from pipeline.settings import SettingsError, load_settings
from pipeline.tables import TableError, read_table


@pytest.mark.parametrize(("overrides", "env", "needle"), [
    ({"grid.max_future_s": "inf"}, {}, "'grid.max_future_s': must be a finite number"),
    ({"kafka.bootstrap_servers": "kafka:abc"}, {}, "'kafka:abc' is not host:port"),
    ({"kafka.bootstrap_servers": "kafka:70000"}, {}, "'kafka:70000' is not host:port"),
    ({"kafka.bootstrap_servers": ":9092"}, {}, "':9092' is not host:port"),
    ({"archive.uri": "local://relative/dir"}, {}, "a local:// URI takes an absolute path"),
    ({"kafka.request_timeout_ms": "400"}, {}, "'kafka.request_timeout_ms': must be above fetch_max_wait_ms"),
    ({"kafka.fetch_max_bytes": "0"}, {}, "'kafka.fetch_max_bytes': must be >= 1"),
    ({"registry.uri": "S3://bucket/models"}, {}, "unknown scheme 'S3'"),
    ({"archive.uri": "file://relative/dir"}, {}, "a file:// URI takes an absolute path"),
    ({"topics.state": "plant.readings"}, {}, "'topics.state': 'plant.readings' is already topics.readings"),
    ({"topics.dlq": "plant.readings"}, {}, "is already topics.readings"),
    ({"archive.group_id": "plantwatch-detector"}, {}, "must differ from detector.group_id"),
    ({}, {"PLANTWATCH_DETECTOR_HTTP_PORT": "9400"}, "PLANTWATCH_DETECTOR__HTTP_PORT"),
])
def test_a_setting_that_cannot_work_is_refused_by_name(overrides: dict[str, str], env: dict[str, str],
                                                       needle: str) -> None:
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_settings(env=env, overrides=overrides)


def test_every_bootstrap_entry_and_store_uri_the_clients_read_is_accepted() -> None:
    """As kafka-python reads them: a host alone (port 9092), a protocol prefix, IPv6 bracketed or bare."""
    servers = "kafka,[::1]:9093,10.0.0.1:9092,PLAINTEXT://broker,SASL_SSL://host:9093,2001:db8::abcd,broker_1:9092"
    s = load_settings(env={}, overrides={"kafka.bootstrap_servers": servers, "archive.uri": "local:///srv/archive"})
    assert s.kafka.bootstrap_servers == servers and s.archive.uri == "local:///srv/archive"


@pytest.mark.parametrize("kind", ["directory", "binary", "empty"])
def test_a_config_file_that_cannot_be_read_is_a_usage_error(tmp_path: Path, kind: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plantwatch.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe[kafka]\n" if kind == "binary" else b"")
    code = main(["config", "--config", str(path)])
    err = capsys.readouterr().err
    assert (code, "Traceback" in err) == ((EXIT_USAGE, False) if kind != "empty" else (0, False)), err
    if kind != "empty":
        assert "setting 'config'" in err


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("empty.csv", b"", "is empty"),
    ("binary.csv", b"\xff\xfe\x00\x01garbage", "is not UTF-8 text"),
    ("fake.parquet", b"not parquet", "is not a readable Parquet file"),
    ("dir.csv", None, "is a directory"),
])
def test_a_table_that_cannot_be_read_is_a_table_error(tmp_path: Path, name: str, content: bytes | None,
                                                      needle: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(TableError, match=needle):
        read_table(path)


def test_replay_of_a_file_without_the_model_columns_fails_before_scoring_nothing(
        tmp_path: Path, tiny_bundle: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.bundle import save_bundle

    save_bundle(tiny_bundle, str(tmp_path / "model"))
    (tmp_path / "header.csv").write_text("ts,x\n")
    assert main(["replay", str(tmp_path / "header.csv"), "--model", str(tmp_path / "model")]) == EXIT_USAGE
    assert "missing columns" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["replay", "x.csv", "--model", "m", "--chunk-rows", "0"],
                                  ["replay", "x.csv", "--model", "m", "--features", "a"],  # the model's own
                                  ["simulate", "--assets", "0"], ["alerts", "list", "--limit", "-1"]])
def test_counts_out_of_range_and_flags_a_command_does_not_read_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_USAGE


def test_fit_refuses_an_out_path_it_cannot_write_before_fitting(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("a file")
    assert main(["fit", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "taken")]) == EXIT_USAGE
    assert "exists and is not a directory" in capsys.readouterr().err  # said before the table is even read


def test_a_health_port_in_use_is_a_settings_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with pytest.raises(SettingsError, match="'detector.http_port': cannot serve the health endpoints"):
            serve(taken.getsockname()[1], alive=lambda: True, ready=lambda: True)


def test_a_kafka_error_out_of_a_command_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kafka.errors import KafkaTimeoutError

    def run(args: Any, settings: Any) -> int:
        raise KafkaTimeoutError("Failed to update metadata after 30.0 secs.")

    monkeypatch.setattr(cli_main.importlib.import_module(cli_main.COMMANDS["alerts"][0]), "run", run)
    assert main(["alerts", "list", "--set", "kafka.bootstrap_servers=127.0.0.1:1"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KafkaTimeoutError" in err and "127.0.0.1:1" in err


def test_sigterm_stops_a_training_run_with_its_outcome_line() -> None:
    assert threading.current_thread() is threading.main_thread()
    previous = train_cmd._stop_on_sigterm()
    try:
        with pytest.raises(train_cmd.Stopped, match="SIGTERM"):
            try:  # as a fallback inside the run would catch what went wrong
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode boundary
                    pass
            except Exception:
                pass
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second one leaves the clean-up alone
    finally:
        signal.signal(signal.SIGTERM, previous)
