"""Daemon start-up: the probes answer while a daemon waits for its broker or its first model, a
SIGTERM during the wait exits 0, and topic set-up sizes and compacts the state topic."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from kafka.admin import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from consumers.broker import LocalBroker
from consumers.kafka_clients import make_admin
from consumers.topics import ensure_topics, standard_topics

REPO = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: str, log: pathlib.Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cli", command, "--log-format=json", *args],
                                cwd=REPO, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, stdout=out,
                                stderr=subprocess.STDOUT)


def probe(port: int, path: str) -> tuple[int, str] | None:
    """(status, body), or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


def wait_for_probe(proc: subprocess.Popen[bytes], log: pathlib.Path, port: int, path: str,
                   timeout_s: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        answer = probe(port, path)
        if answer is not None:
            return answer
        time.sleep(0.1)
    raise AssertionError(f"no answer on {path} within {timeout_s}s; log:\n{log.read_text()[-3000:]}")


def stop_and_wait(proc: subprocess.Popen[bytes], log: pathlib.Path, timeout_s: float) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {timeout_s}s after SIGTERM; log:\n{log.read_text()[-3000:]}") from None
    return code, time.monotonic() - t0


def test_detector_waiting_for_a_first_model_is_alive_not_ready_and_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    http, registry, log = free_port(), tmp_path / "registry", tmp_path / "detect.log"
    registry.mkdir()
    proc = start("detect", log, f"--set=kafka.bootstrap_servers=127.0.0.1:{free_port()}",
                 f"--set=detector.http_port={http}", f"--set=registry.uri={registry}")
    try:
        assert wait_for_probe(proc, log, http, "/healthz", 10) == (200, "ok: waiting for first model\n")
        assert probe(http, "/readyz") == (503, "not ready: waiting for first model\n")
        code, took = stop_and_wait(proc, log, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert took < 10


def test_archiver_retries_until_its_broker_starts_then_serves(tmp_path: pathlib.Path) -> None:
    http, log = free_port(), tmp_path / "archive.log"
    broker = LocalBroker(port=free_port())  # not started yet: nothing listens on its port
    proc = start("archive", log, f"--set=kafka.bootstrap_servers={broker.bootstrap_servers}",
                 "--set=kafka.session_timeout_ms=3000", "--set=kafka.heartbeat_interval_ms=1000",
                 f"--set=archive.uri={tmp_path / 'archive'}", f"--http-port={http}")
    try:
        assert wait_for_probe(proc, log, http, "/healthz", 10) == (200, "ok: waiting for broker\n")
        assert probe(http, "/readyz") == (503, "not ready: waiting for broker\n")
        deadline = time.monotonic() + 15
        while "broker not reachable" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert probe(http, "/healthz") == (200, "ok: waiting for broker\n")
        with broker:  # starts it
            deadline = time.monotonic() + 30
            while probe(http, "/readyz") != (200, "ready\n") and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            assert probe(http, "/readyz") == (200, "ready\n"), log.read_text()[-3000:]
            code, took = stop_and_wait(proc, log, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0 and took < 5, text[-3000:]
    retries = [json.loads(line) for line in text.splitlines() if "broker not reachable" in line]
    assert [e["attempt"] for e in retries] == list(range(1, len(retries) + 1)) and retries, text[-3000:]
    assert "ERROR kafka" not in text  # the client's own connection errors are folded into the warnings


def test_archiver_stops_on_sigterm_while_waiting_for_the_broker(tmp_path: pathlib.Path) -> None:
    http, log = free_port(), tmp_path / "archive.log"
    proc = start("archive", log, f"--set=kafka.bootstrap_servers=127.0.0.1:{free_port()}",
                 f"--set=archive.uri={tmp_path / 'archive'}", f"--http-port={http}")
    try:
        assert wait_for_probe(proc, log, http, "/healthz", 10) == (200, "ok: waiting for broker\n")
        code, took = stop_and_wait(proc, log, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert took < 3  # the attempt in flight is not waited for


# ---------------------------------------------------------------------- topic set-up
def test_the_state_topic_takes_the_existing_readings_topics_partitions_and_is_compacted(
        broker: Any, settings_for: Any) -> None:
    s = settings_for(broker)  # topics.partitions = 4
    t = s.topics
    ensure_topics(s, {t.readings: 3})
    ensure_topics(s, standard_topics(s))
    admin = make_admin(s)
    try:
        parts = {i["name"]: len(i["partitions"]) for i in admin.describe_topics([t.readings, t.state_topic, t.alerts])}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.state_topic)],
                                         config_filter="all")["topic"][t.state_topic]
    finally:
        admin.close()
    assert parts == {t.readings: 3, t.state_topic: 3, t.alerts: 4}
    assert configs["cleanup.policy"]["value"] == "compact"


def test_an_existing_state_topic_that_is_not_compacted_is_reported(broker: Any, settings_for: Any) -> None:
    s = settings_for(broker)
    t = s.topics
    admin = make_admin(s)
    try:
        admin.create_topics({t.readings: {"num_partitions": 2, "replication_factor": 1},
                             t.state_topic: {"num_partitions": 2, "replication_factor": 1,
                                             "configs": {"cleanup.policy": "delete"}}})
        admin.wait_for_topics([t.readings, t.state_topic])
    finally:
        admin.close()
    with capture_logs() as logs:
        ensure_topics(s, standard_topics(s))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["topic"] for e in warnings if "not compacted" in e["event"]] == [t.state_topic]
    assert not [e for e in warnings if "different partition counts" in e["event"]]
