"""Every Kafka client plantwatch builds carries the TLS and SASL settings.

The clients are built for real (kafka-python objects) without a broker: consumers and
producers get an explicit ``api_version`` so they do not probe one, and the admin client's
bootstrap (it connects while being built) is stubbed. Assertions are on each client's
``.config``, what kafka-python connects with.
"""

from __future__ import annotations

import ast
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.net.manager import KafkaConnectionManager
from kafka.net.sasl import get_sasl_mechanism

from consumers import broker, topics
from consumers.kafka_clients import client_options, make_admin, make_consumer, make_producer
from pipeline import logs
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Pa55word!"  # noqa: S105 - a test value
NO_PROBE = {"api_version": (2, 8, 0)}
CLIENT_CLASSES = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
PEM = "-----BEGIN {0}-----\nTUlJQmdUQ0NBU2VnQXdJQkFnSVVkdW1teQ==\n-----END {0}-----\n"


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    """Dummy CA bundle, client certificate and key (nothing connects, so their content is not parsed)."""
    out = {}
    for key, kind in (("ssl_cafile", "CERTIFICATE"), ("ssl_certfile", "CERTIFICATE"), ("ssl_keyfile", "PRIVATE KEY")):
        path = tmp_path / f"{key}.pem"
        path.write_text(PEM.format(kind))
        out[key] = str(path)
    return out


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "sasl-password"
    path.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` often leaves it
    return path


@pytest.fixture(autouse=True)
def no_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin client bootstraps in its constructor: make that a no-op (no broker here)."""
    monkeypatch.setattr(KafkaConnectionManager, "bootstrap", lambda self, timeout_ms=None, refresh=True: None)
    monkeypatch.setattr(logs, "_secrets", set())  # what these tests mask stays theirs


def secure_settings(pem_files: dict[str, str], *, mechanism: str = "SCRAM-SHA-512", protocol: str = "SASL_SSL",
                    **extra: str) -> Settings:
    overrides = {"kafka.bootstrap_servers": "broker-1:9093,broker-2:9093", "kafka.client_id": "pw",
                 "kafka.security_protocol": protocol, "kafka.ssl_check_hostname": "true"}
    if protocol.startswith("SASL"):
        overrides.update({"kafka.sasl_mechanism": mechanism, "kafka.sasl_username": "plantwatch"})
    if protocol.endswith("SSL"):
        overrides.update({f"kafka.{k}": v for k, v in pem_files.items()})
    overrides.update(extra)
    return load_settings(env={}, overrides=overrides)


@pytest.fixture
def built() -> Iterator[list[KafkaConsumer | KafkaProducer | KafkaAdminClient]]:
    """Clients made by a test, closed after it."""
    clients: list[KafkaConsumer | KafkaProducer | KafkaAdminClient] = []
    yield clients
    for c in clients:
        if isinstance(c, KafkaProducer):
            c.close(timeout=1)
        else:
            c.close()


def build_all(settings: Settings, built: list) -> dict[str, KafkaConsumer | KafkaProducer | KafkaAdminClient]:
    clients = {
        "consumer": make_consumer(settings, group_id="g", topics=["t"], **NO_PROBE),
        "producer": make_producer(settings, **NO_PROBE),
        "admin": make_admin(settings),
    }
    built.extend(clients.values())
    return clients


def assert_secure(config: dict, pem_files: dict[str, str], mechanism: str = "SCRAM-SHA-512") -> None:
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == mechanism
    assert config["sasl_plain_username"] == "plantwatch"
    assert config["sasl_plain_password"] == PASSWORD
    for key, path in pem_files.items():
        assert config[key] == path
    assert config["ssl_check_hostname"] is True
    assert config["bootstrap_servers"] == ["broker-1:9093", "broker-2:9093"]


@pytest.mark.parametrize("source", ["direct", "file"])
def test_consumer_producer_and_admin_all_carry_sasl_ssl_scram_512_and_the_tls_files(
        source: str, pem_files: dict[str, str], password_file: Path, built: list) -> None:
    secret = {"kafka.sasl_password": PASSWORD} if source == "direct" else \
        {"kafka.sasl_password_file": str(password_file)}
    clients = build_all(secure_settings(pem_files, **secret), built)
    assert isinstance(clients["consumer"], KafkaConsumer) and isinstance(clients["producer"], KafkaProducer)
    assert isinstance(clients["admin"], KafkaAdminClient)
    for role, client in clients.items():
        assert_secure(client.config, pem_files)
        assert client.config["client_id"] == f"pw-{role}"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_kafka_python_authenticates_with_what_each_client_was_given(
        mechanism: str, pem_files: dict[str, str], password_file: Path, built: list) -> None:
    settings = secure_settings(pem_files, mechanism=mechanism, **{"kafka.sasl_password_file": str(password_file)})
    for client in build_all(settings, built).values():
        assert_secure(client.config, pem_files, mechanism)
        sasl = get_sasl_mechanism(client.config["sasl_mechanism"])(**client.config)
        if mechanism == "PLAIN":
            assert sasl.auth_bytes() == f"plantwatch\0plantwatch\0{PASSWORD}".encode()
        else:
            assert sasl.mechanism == mechanism and b"n=plantwatch" in sasl.auth_bytes()


def test_ssl_without_sasl_and_sasl_without_ssl(pem_files: dict[str, str], built: list) -> None:
    tls = client_options(secure_settings(pem_files, protocol="SSL").kafka)
    assert tls["security_protocol"] == "SSL" and tls["ssl_cafile"] == pem_files["ssl_cafile"]
    assert not any(k.startswith("sasl") for k in tls)
    sasl = secure_settings(pem_files, protocol="SASL_PLAINTEXT", **{"kafka.sasl_password": PASSWORD})
    opts = client_options(sasl.kafka)
    assert opts["sasl_plain_password"] == PASSWORD and not any(k.startswith("ssl") for k in opts)
    for client in build_all(sasl, built).values():
        assert client.config["security_protocol"] == "SASL_PLAINTEXT"


def test_a_rotated_password_file_reaches_the_next_client(pem_files: dict[str, str], password_file: Path,
                                                         built: list) -> None:
    settings = secure_settings(pem_files, **{"kafka.sasl_password_file": str(password_file)})
    first = make_producer(settings, **NO_PROBE)
    password_file.write_text("rotated-password")
    second = make_producer(settings, **NO_PROBE)
    built += [first, second]
    assert first.config["sasl_plain_password"] == PASSWORD
    assert second.config["sasl_plain_password"] == "rotated-password"


def test_topic_set_up_admin_carries_the_security_settings(pem_files: dict[str, str], built: list) -> None:
    settings = secure_settings(pem_files, **{"kafka.sasl_password": PASSWORD})
    admin = topics._admin(settings, 1234)
    built.append(admin)
    assert_secure(admin.config, pem_files)
    assert admin.config["bootstrap_timeout_ms"] == 1234


def test_the_local_broker_probe_is_built_by_the_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    def fake_admin(settings: Settings, **overrides: object) -> object:
        seen.append(settings)
        raise ConnectionError("no broker")

    monkeypatch.setattr(broker, "make_admin", fake_admin)
    assert broker._answers_metadata("127.0.0.1:1", 100) is False
    assert seen and seen[0].kafka.bootstrap_servers == "127.0.0.1:1"


def _source_files() -> list[Path]:
    return sorted(p for d in ("pipeline", "consumers", "trainers", "cli", "bench") for p in (REPO / d).rglob("*.py"))


def _constructions(tree: ast.AST) -> list[int]:
    """Lines calling KafkaConsumer/KafkaProducer/KafkaAdminClient, under any import alias."""
    names = set(CLIENT_CLASSES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kafka"):
            names |= {a.asname for a in node.names if a.name in CLIENT_CLASSES and a.asname}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if called in names:
                lines.append(node.lineno)
    return lines


def test_no_module_but_kafka_clients_constructs_a_kafka_client() -> None:
    allowed = REPO / "consumers" / "kafka_clients.py"
    assert _constructions(ast.parse(allowed.read_text())), "the checker no longer sees the helpers' constructions"
    offenders = {str(p.relative_to(REPO)): lines for p in _source_files() if p != allowed
                 for lines in [_constructions(ast.parse(p.read_text()))] if lines}
    assert offenders == {}, "build Kafka clients with consumers.kafka_clients (make_consumer/make_producer/make_admin)"


def test_the_checker_sees_aliased_and_dotted_constructions() -> None:
    code = "from kafka import KafkaConsumer as KC\nimport kafka\nKC()\nkafka.KafkaProducer()\n"
    assert _constructions(ast.parse(code)) == [3, 4]


def test_the_password_is_masked_in_every_log_line_once_a_client_has_it(
        pem_files: dict[str, str], password_file: Path, built: list) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("kafka").level, structlog.get_config())
    try:
        logs.configure_logging("debug", "json", stream=stream)
        logging.getLogger("kafka").setLevel(logging.DEBUG)  # kafka-python logs the admin client's whole config
        settings = secure_settings(pem_files, **{"kafka.sasl_password_file": str(password_file)})
        built.append(make_admin(settings))
        logs.get_logger("test").warning("connection failed", detail=f"auth as plantwatch:{PASSWORD}")
        logging.getLogger("kafka.test").error("password was %s", PASSWORD)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("kafka").setLevel(saved[2])
        structlog.configure(**saved[3])
    out = stream.getvalue()
    assert "Starting KafkaAdminClient" in out and "sasl_plain_password" in out
    assert PASSWORD not in out
    event = json.loads(next(line for line in out.splitlines() if "connection failed" in line))
    assert event["detail"] == "auth as plantwatch:***"
    assert "password was ***" in out
