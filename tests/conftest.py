"""Shared fixtures: one local broker per test session, unique topic names per test.

Set ``PLANTWATCH_TEST_BOOTSTRAP=host:port`` to run the integration tests against a real
cluster instead of the local broker.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from consumers.broker import LocalBroker
from pipeline.settings import Settings, load_settings

INTEGRATION_DIR = pathlib.Path(__file__).parent / "integration"
INTEGRATION_TIMEOUT_S = 300  # a loaded 2-core machine runs these 2–3 times slower than an idle one


@dataclass(frozen=True)
class ExternalCluster:
    """A cluster the tests use but do not own (nothing to start or stop)."""

    bootstrap_servers: str


Broker = LocalBroker | ExternalCluster
SettingsFactory = Callable[..., Settings]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs a broker, and must not hang the run."""
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.broker)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT_S))


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    external = os.environ.get("PLANTWATCH_TEST_BOOTSTRAP", "").strip()
    if external:
        yield ExternalCluster(external)
        return
    with LocalBroker() as local:
        yield local


@pytest.fixture
def topic_prefix() -> str:
    return f"pwtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings_for(topic_prefix: str, tmp_path: pathlib.Path) -> SettingsFactory:
    """``settings_for(broker, {"section.key": value})``: settings on that broker with this test's
    own topics, consumer groups, registry and archive."""

    def build(broker: Broker, overrides: Mapping[str, Any] | None = None) -> Settings:
        base = {
            "kafka.bootstrap_servers": broker.bootstrap_servers,
            "topics.readings": f"{topic_prefix}.readings",
            "topics.alerts": f"{topic_prefix}.alerts",
            "topics.models": f"{topic_prefix}.models",
            "detector.group_id": f"{topic_prefix}-detector",
            "archive.group_id": f"{topic_prefix}-archiver",
            "registry.uri": str(tmp_path / "registry"),
            "archive.uri": str(tmp_path / "archive"),
        }
        return load_settings(env={}, overrides={**base, **(overrides or {})})

    return build


@pytest.fixture
def settings(broker: Broker, settings_for: SettingsFactory) -> Settings:
    return settings_for(broker)
