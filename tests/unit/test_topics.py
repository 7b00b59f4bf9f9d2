"""Topic set-up without a broker: the create request, the fallback without configs, the start-up retries."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka.errors import (
    InvalidConfigurationError,
    KafkaTimeoutError,
    NotControllerError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from structlog.testing import capture_logs

from consumers import topics
from consumers.health import Health
from consumers.topics import STATE_TOPIC_CONFIGS, ensure_topics_retrying, standard_topics, topic_requests
from pipeline.settings import Settings, load_settings


def settings(**overrides: object) -> Settings:
    return load_settings(env={}, overrides={"kafka.bootstrap_servers": "127.0.0.1:9", "topics.readings": "r",
                                            "topics.partitions": 6, **overrides})


def test_the_state_topic_is_compacted_and_sized_like_the_readings_topic_being_created() -> None:
    s = settings()
    request = topic_requests(s, standard_topics(s), existing={}, replication=3)
    assert request["r.state"] == {"num_partitions": 6, "replication_factor": 3, "configs": {"cleanup.policy": "compact"}}
    assert request["r"] == {"num_partitions": 6, "replication_factor": 3}
    assert request[s.topics.models] == {"num_partitions": 1, "replication_factor": 3}
    assert [n for n, spec in request.items() if "configs" in spec] == ["r.state"]
    assert set(request) == set(standard_topics(s))


def test_the_state_topic_takes_the_existing_readings_topics_partition_count() -> None:
    s = settings()
    request = topic_requests(s, standard_topics(s), existing={"r": 12, s.topics.alerts: 2}, replication=1)
    assert request["r.state"]["num_partitions"] == 12
    assert "r" not in request and s.topics.alerts not in request
    assert request["r.dlq"]["num_partitions"] == 6  # the other topics keep the configured count


def test_a_state_topic_asked_for_alone_uses_the_configured_partitions() -> None:
    s = settings(**{"topics.state": "snapshots"})
    request = topic_requests(s, {"snapshots": 1}, existing={}, replication=1)
    assert request == {"snapshots": {"num_partitions": 6, "replication_factor": 1, "configs": dict(STATE_TOPIC_CONFIGS)}}
    assert topic_requests(s, {"snapshots": 1}, existing={"snapshots": 3}, replication=1) == {}


def test_the_request_does_not_share_the_module_constant() -> None:
    s = settings()
    request = topic_requests(s, standard_topics(s), existing={}, replication=1)
    request["r.state"]["configs"]["cleanup.policy"] = "delete"
    assert STATE_TOPIC_CONFIGS["cleanup.policy"] == "compact"


class FakeAdmin:
    """Answers create_topics like a broker that refuses topic configs."""

    def __init__(self, refuse: type = InvalidConfigurationError, exists: frozenset[str] = frozenset()) -> None:
        self.refuse, self.exists, self.requests = refuse, exists, []  # type: ignore[var-annotated]

    def create_topics(self, request: dict[str, dict[str, Any]], raise_errors: bool = True) -> dict[str, Any]:
        self.requests.append(request)
        results = []
        for name, spec in request.items():
            code = (TopicAlreadyExistsError.errno if name in self.exists
                    else self.refuse.errno if spec.get("configs") else 0)
            results.append({"name": name, "error_code": code, "error_message": None})
        return {"topics": results}


def test_a_broker_refusing_configs_gets_the_topic_without_them() -> None:
    admin = FakeAdmin()
    request = {"r": {"num_partitions": 2, "replication_factor": 1},
               "r.state": {"num_partitions": 2, "replication_factor": 1, "configs": {"cleanup.policy": "compact"}}}
    topics._create(admin, request)  # type: ignore[arg-type]
    assert admin.requests == [request, {"r.state": {"num_partitions": 2, "replication_factor": 1}}]


def test_a_topic_created_meanwhile_counts_as_created() -> None:
    admin = FakeAdmin(exists=frozenset({"r.state"}))
    topics._create(admin, {"r.state": {"num_partitions": 2, "replication_factor": 1, "configs": {"x": "y"}}})  # type: ignore[arg-type]
    assert len(admin.requests) == 1


def test_other_create_errors_are_raised() -> None:
    admin = FakeAdmin(refuse=TopicAuthorizationFailedError)
    with pytest.raises(TopicAuthorizationFailedError):
        topics._create(admin, {"r": {"num_partitions": 2, "replication_factor": 1, "configs": {"x": "y"}}})  # type: ignore[arg-type]
    assert len(admin.requests) == 1  # no second try without the configs
    # a retriable error is left to the caller's retries, never answered by dropping the configs
    admin = FakeAdmin(refuse=NotControllerError)
    with pytest.raises(NotControllerError):
        topics._create(admin, {"r.state": {"num_partitions": 2, "replication_factor": 1, "configs": {"x": "y"}}})  # type: ignore[arg-type]
    assert len(admin.requests) == 1


# ---------------------------------------------------------------------- start-up retries
def flaky(failures: int, error: Exception | None = None) -> Any:
    """An attempt that fails ``failures`` times, then succeeds; ``.calls`` has the times it ran."""
    calls: list[float] = []

    def attempt() -> None:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error or KafkaTimeoutError("Unable to bootstrap")

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


def test_retries_with_doubling_delays_until_the_broker_answers() -> None:
    stop, health = threading.Event(), Health()
    attempt = flaky(3)
    seen: list[str | None] = []

    def watching() -> None:
        seen.append(health.waiting_for)
        attempt()

    assert ensure_topics_retrying(settings(), {}, stop=stop, health=health, first_delay_s=0.02, max_delay_s=0.05,
                                  attempt=watching)
    gaps = [b - a for a, b in zip(attempt.calls, attempt.calls[1:])]
    assert len(attempt.calls) == 4
    assert 0.02 <= gaps[0] < gaps[1] and gaps[1] >= 0.04 and gaps[2] >= 0.05
    assert seen == ["broker"] * 4
    assert health.waiting_for is None and health.broker_ok


def test_a_stop_during_the_retries_returns_promptly() -> None:
    stop, health = threading.Event(), Health()
    attempt = flaky(10)
    threading.Timer(0.2, stop.set).start()  # SIGTERM while waiting 30 s for the next attempt
    t0 = time.monotonic()
    assert not ensure_topics_retrying(settings(), {}, stop=stop, health=health, first_delay_s=30, attempt=attempt)
    assert time.monotonic() - t0 < 1.5
    assert len(attempt.calls) == 1
    assert health.waiting_for is None and not health.broker_ok


def test_a_stop_during_a_hanging_attempt_returns_promptly() -> None:
    stop, release = threading.Event(), threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    try:
        assert not ensure_topics_retrying(settings(), {}, stop=stop, attempt=lambda: release.wait(30) and None)
        assert time.monotonic() - t0 < 1.5
    finally:
        release.set()


def test_the_clients_own_log_lines_are_cited_not_printed(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    def attempt() -> None:
        logging.getLogger("kafka.net.manager").error("Connection failed: 111 ECONNREFUSED")
        raise KafkaTimeoutError("Unable to bootstrap")

    for t in threading.enumerate():  # an attempt an earlier test left to end on its own
        if t.name == "topic-setup":
            t.join(30)
    kafka_log = logging.getLogger("kafka")
    handlers = list(kafka_log.handlers)
    calls = iter([attempt, lambda: None])
    with capture_logs() as logs:
        ensure_topics_retrying(settings(), {}, stop=threading.Event(), first_delay_s=0.01,
                               attempt=lambda: next(calls)())
    assert [e.get("cause") for e in logs if e["log_level"] == "warning"] == ["Connection failed: 111 ECONNREFUSED"]
    assert not [r for r in caplog.records if r.name.startswith("kafka")]
    assert kafka_log.propagate and kafka_log.handlers == handlers  # restored after each attempt


def test_a_stop_set_before_the_first_attempt_makes_none() -> None:
    stop = threading.Event()
    stop.set()
    attempt = flaky(0)
    assert not ensure_topics_retrying(settings(), {}, stop=stop, attempt=attempt)
    assert attempt.calls == []


def test_errors_other_than_an_unreachable_broker_are_raised() -> None:
    stop, health = threading.Event(), Health()
    with pytest.raises(TopicAuthorizationFailedError):
        ensure_topics_retrying(settings(), {}, stop=stop, health=health,
                               attempt=flaky(1, error=TopicAuthorizationFailedError()))
    assert health.waiting_for is None


def test_each_failure_is_logged_once_with_its_attempt_number() -> None:
    with capture_logs() as logs:
        ensure_topics_retrying(settings(), {}, stop=threading.Event(), first_delay_s=0.01, attempt=flaky(2))
    retries = [e for e in logs if e["log_level"] == "warning"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert [e["retry_in_s"] for e in retries] == [0.01, 0.02]
