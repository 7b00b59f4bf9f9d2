"""Topic set-up: create what is missing, leave what exists alone."""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from kafka.admin import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError, for_code

from consumers.kafka_clients import make_admin
from pipeline.settings import Settings

log = structlog.get_logger(__name__)

_TOPIC_READY_TIMEOUT_MS = 10_000


def standard_topics(settings: Settings) -> dict[str, int]:
    """The plantwatch topics and their partition counts.

    The model announcements go through one partition so every detector sees them in order.
    """
    t = settings.topics
    topics = {t.readings: t.partitions, t.alerts: t.partitions, t.dlq_topic: t.partitions, t.models: 1,
              t.state_topic: t.partitions}
    if t.scores:
        topics[t.scores] = t.partitions
    return topics


def replication_factor(broker_count: int) -> int:
    """1 on a single broker, else up to 3 replicas."""
    return 1 if broker_count <= 1 else min(3, broker_count)


def ensure_topics(settings: Settings, topics: Mapping[str, int]) -> None:
    """Create the missing topics with the given partition counts and wait until they have leaders.

    A topic created concurrently by another process counts as success. Existing topics are not
    changed (partitions cannot be removed, and not every broker can add them): a smaller
    partition count than asked for is logged, because it caps the number of useful consumers.
    """
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        _warn_on_fewer_partitions(admin, {n: p for n, p in topics.items() if n in existing})
        missing = {name: parts for name, parts in topics.items() if name not in existing}
        if missing:
            _create(admin, missing)
            admin.wait_for_topics(list(missing), timeout_ms=_TOPIC_READY_TIMEOUT_MS)
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, topics: Mapping[str, int]) -> None:
    rf = replication_factor(len(admin.describe_cluster()["brokers"]))
    request = {name: {"num_partitions": parts, "replication_factor": rf} for name, parts in topics.items()}
    response = admin.create_topics(request, raise_errors=False)
    for result in response["topics"]:
        code = result["error_code"]
        if code == 0:
            log.info("topic created", topic=result["name"], partitions=topics[result["name"]], replication=rf)
        elif code != TopicAlreadyExistsError.errno:  # another process won the race: fine
            error = for_code(code)
            raise error(f"cannot create topic {result['name']!r}: {result.get('error_message') or error.__name__}")


def _warn_on_fewer_partitions(admin: KafkaAdminClient, wanted: Mapping[str, int]) -> None:
    if not wanted:
        return
    for info in admin.describe_topics(list(wanted)):
        have = len(info.get("partitions") or [])
        if have < wanted[info["name"]]:
            log.warning("topic has fewer partitions than configured",
                        topic=info["name"], partitions=have, configured=wanted[info["name"]])
