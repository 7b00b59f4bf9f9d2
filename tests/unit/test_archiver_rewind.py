"""Partitions whose committed offsets could not be read at their assignment wait, paused, and the
archiver tries again with a backoff; an authorisation refusal is not waited out (stand-in client)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import GroupAuthorizationFailedError, KafkaTimeoutError

from consumers.archiver import Archiver
from pipeline.settings import load_settings

TP = TopicPartition("readings", 0)


def _archiver(tmp_path: Path, error: Exception) -> Archiver:
    def fetch_committed_offsets(tps: Any, timeout_ms: int) -> Any:
        raise error

    archiver = Archiver(load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")}))
    archiver.consumer = SimpleNamespace(  # type: ignore[assignment]
        assignment=lambda: {TP}, pause=lambda *tps: None,
        _coordinator=SimpleNamespace(fetch_committed_offsets=fetch_committed_offsets))
    archiver.pause_for_rewind({TP}, error)
    return archiver


def test_a_failed_read_of_committed_offsets_is_tried_again_later(tmp_path: Path) -> None:
    archiver = _archiver(tmp_path, KafkaTimeoutError("no answer"))
    archiver._rewind()
    assert archiver.rewind == {TP} and archiver.rewind_failures == 1


def test_an_authorisation_refusal_stops_the_archiver(tmp_path: Path) -> None:
    archiver = _archiver(tmp_path, GroupAuthorizationFailedError("not authorised"))
    with pytest.raises(GroupAuthorizationFailedError):
        archiver._rewind()
