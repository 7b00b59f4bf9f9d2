"""A client asks for fresh metadata the moment a partition's offsets went back: the refresh completes
beside the client's own I/O thread and names the id of a topic created again (real broker, real
client)."""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition

from consumers.kafka_clients import make_consumer, refreshed_topic_id, topic_id
from consumers.topics import ensure_topics, standard_topics

from .plant import recreate_readings_topic


def test_a_refresh_asked_for_names_the_id_of_a_topic_created_again(broker: Any, settings_for: Any) -> None:
    settings = settings_for(broker)
    ensure_topics(settings, standard_topics(settings))
    topic = settings.topics.readings
    consumer = make_consumer(settings, group_id=None)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.poll(timeout_ms=1_000)
        first = refreshed_topic_id(consumer, topic)
        assert first and first == topic_id(consumer, topic)
        recreate_readings_topic(settings)
        again = refreshed_topic_id(consumer, topic)
        assert again and again != first and topic_id(consumer, topic) == again
    finally:
        consumer.close()
