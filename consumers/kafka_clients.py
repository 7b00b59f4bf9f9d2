"""Kafka clients built from the settings, so every process connects (TLS, SASL, timeouts) the same way.

Every KafkaConsumer, KafkaProducer and KafkaAdminClient of plantwatch is built here (a unit
test checks that no other module constructs one), so the ``kafka.security_protocol``,
``kafka.sasl_*`` and ``kafka.ssl_*`` settings reach all of them. The SASL password is read
from ``kafka.sasl_password_file`` each time a client is built, and masked in plantwatch's
log output from then on.

Keys and values stay raw bytes: decoding is done in batches by the pipeline, not per record
by a client-side deserializer.
"""

from __future__ import annotations

from collections.abc import Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from pipeline.logs import mask_secret
from pipeline.settings import KafkaSettings, Settings, SettingsError

_SSL_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def _bootstrap_hosts(kafka: KafkaSettings) -> list[str]:
    hosts = [h.strip() for h in kafka.bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        # kafka-python would silently fall back to localhost:9092
        raise SettingsError(
            "kafka.bootstrap_servers",
            "empty: set it (PLANTWATCH_KAFKA__BOOTSTRAP_SERVERS or --set kafka.bootstrap_servers=host:port); "
            "only `plantwatch demo` starts a local broker by itself",
        )
    return hosts


def require_bootstrap(settings: Settings) -> str:
    """The bootstrap servers of a daemon, or a :class:`SettingsError` naming the key when empty."""
    return ",".join(_bootstrap_hosts(settings.kafka))


def client_options(kafka: KafkaSettings) -> dict[str, object]:
    """Connection options shared by consumers, producers and admin clients (kafka-python names)."""
    options: dict[str, object] = {
        "bootstrap_servers": _bootstrap_hosts(kafka),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.security_protocol in _SASL_PROTOCOLS:
        password = kafka.sasl_secret()
        mask_secret(password)
        # kafka-python takes the user name and password under these names for PLAIN and SCRAM alike
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = password
    if kafka.security_protocol in _SSL_PROTOCOLS:
        options["ssl_check_hostname"] = kafka.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(kafka, key):
                options[key] = getattr(kafka, key)
    return options


def _with_role(kafka: KafkaSettings, role: str) -> dict[str, object]:
    """Options with ``client_id`` = ``<prefix>-<role>`` so broker logs tell the clients apart."""
    return {**client_options(kafka), "client_id": f"{kafka.client_id}-{role}"}


def make_consumer(
    settings: Settings, *, group_id: str | None, topics: Sequence[str] = (), **overrides: object
) -> KafkaConsumer:
    """A manually committing consumer that starts at the earliest offset of a new group.

    Offsets are committed by the caller only after the results of a poll are acknowledged
    (at-least-once), hence no auto-commit.
    """
    k = settings.kafka
    config: dict[str, object] = {
        **_with_role(k, "consumer"),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "max_poll_records": k.max_poll_records,
        "fetch_max_bytes": k.fetch_max_bytes,
        "max_partition_fetch_bytes": k.max_partition_fetch_bytes,
        **overrides,
    }
    return KafkaConsumer(*topics, **config)


def make_producer(settings: Settings, **overrides: object) -> KafkaProducer:
    """An idempotent producer acknowledged by all in-sync replicas.

    ``retries`` stays at kafka-python's default (unbounded within ``delivery_timeout_ms``):
    with idempotence, retries cannot duplicate records, and an explicit 0 would be refused.
    """
    config: dict[str, object] = {
        **_with_role(settings.kafka, "producer"),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "compression_type": None,
        **overrides,
    }
    return KafkaProducer(**config)


def make_admin(settings: Settings, **overrides: object) -> KafkaAdminClient:
    """An admin client for topic set-up and cluster checks (it connects while being built)."""
    return KafkaAdminClient(**{**_with_role(settings.kafka, "admin"), **overrides})
