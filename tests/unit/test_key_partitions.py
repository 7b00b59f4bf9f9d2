"""KeyPartitions places every key where kafka-python's default partitioner does."""

from __future__ import annotations

from typing import Any

from kafka.partitioner.default import DefaultPartitioner

from consumers.kafka_clients import KeyPartitions


class _Cluster:
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions

    def topics(self) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions


class _Producer:
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions
        self.asked = 0

    def partitions_for(self, topic: str) -> set[int]:
        self.asked += 1
        return self.partitions


def _default(key: bytes, partitions: set[int]) -> Any:
    return DefaultPartitioner().partition("t", key, key, None, None, _Cluster(partitions))


def test_same_partition_as_the_default_partitioner_for_every_key() -> None:
    keys = [f"pump-{i:04d}".encode() for i in range(500)] + [b"", b"a", "ünï".encode(), b"x" * 37]
    lookup = KeyPartitions(_Producer({0, 1, 2, 3, 4, 5})).of("t")
    placed = [lookup(k) for k in keys]
    assert placed == [_default(k, {0, 1, 2, 3, 4, 5}) for k in keys]
    assert len(set(placed)) == 6  # the keys spread: not a constant answer
    assert [lookup(k) for k in keys] == placed  # cached answers agree


def test_a_change_of_partitions_recomputes() -> None:
    producer = _Producer({0, 1})
    parts = KeyPartitions(producer)
    keys = [f"a{i}".encode() for i in range(200)]
    two = [parts.of("t")(k) for k in keys]
    producer.partitions = {0, 1, 2, 3, 4, 5, 6}
    seven = [parts.of("t")(k) for k in keys]
    assert seven == [_default(k, {0, 1, 2, 3, 4, 5, 6}) for k in keys]
    assert two != seven and set(two) == {0, 1}
