"""Announcing registry changes on the control topic (``topics.models``, key ``current``).

Kept apart from the training job so the ``plantwatch models`` commands can announce without
loading TensorFlow. Detectors treat any message there as "check the registry now"; they poll
the registry as well, so an announcement that is lost only delays a swap to the next poll.
"""

from __future__ import annotations

import json

from pipeline.logs import get_logger
from pipeline.registry import pointers
from pipeline.settings import Settings

log = get_logger(__name__)


def has_broker(settings: Settings) -> bool:
    """A broker is configured (an empty kafka.bootstrap_servers means none to announce on)."""
    return bool(settings.kafka.bootstrap_servers.strip())


def announce(settings: Settings, version: str | None, *, uri: str | None = None, action: str | None = None) -> bool:
    """Tell running detectors on the control topic that the registry changed; False (logged) if
    the broker did not take it. ``version`` is the one now served; ``action`` (publish, promote,
    rollback, unpin) is added for changes made by hand; ``uri`` is the registry (default the
    registry.uri setting).

    Any message makes detectors check the registry at once; they also poll it, so a lost
    announcement only delays the swap.
    """
    from kafka.errors import KafkaError

    from consumers.kafka_clients import make_producer
    from consumers.topics import ensure_topics

    topic = settings.topics.models
    registry = uri or settings.registry.uri
    body = {"version": version, "published_at": pointers(registry).published_at, "uri": registry}
    if action is not None:
        body["action"] = action
    try:
        ensure_topics(settings, {topic: 1})
        producer = make_producer(settings)
        try:
            producer.send(topic, key=b"current", value=json.dumps(body).encode()).get(
                timeout=settings.kafka.request_timeout_ms / 1000)
        finally:
            producer.close()
    except KafkaError as exc:
        log.warning("registry changed but not announced; detectors find it at their next registry poll",
                    version=version, action=action or "publish", topic=topic, error=str(exc))
        return False
    return True
