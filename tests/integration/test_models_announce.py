"""Registry changes made with ``plantwatch models`` are announced on the models topic, and a
detector's model watcher prepares the new version at once, long before its registry poll."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.model_watch import ModelWatcher, PreparedModel
from consumers.topics import ensure_topics
from pipeline import registry
from pipeline.settings import Settings
from tests.unit.test_registry import make_bundle

from .plant import read_topic

POLL_S = 120.0  # the registry poll is far away: only the announcement can explain a quick swap


def _cli(capsys: pytest.CaptureFixture[str], settings: Settings, *argv: str) -> dict[str, Any]:
    from cli import models_cmd

    parser = argparse.ArgumentParser()
    models_cmd.add_arguments(parser)
    assert models_cmd.run(parser.parse_args([*argv, "--json"]), settings) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])  # the command's JSON line (log lines may precede it here)


def _prepared(watcher: ModelWatcher, timeout_s: float = 30.0) -> tuple[PreparedModel, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        ready = watcher.ready()
        if ready is not None:
            return ready, time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"nothing prepared within {timeout_s} s")


def test_rollback_unpin_promote_and_publish_reach_a_watching_detector_within_a_poll(
        broker: Any, settings_for: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(broker, {"detector.registry_poll_s": str(POLL_S)})
    ensure_topics(settings, {settings.topics.models: 1})
    uri = settings.registry.uri
    for v in ("v1", "v2"):
        registry.publish(uri, make_bundle(v), keep=5)
    registry.store_candidate(uri, make_bundle("c1"), keep=5)

    watcher = ModelWatcher(settings, registry.load_current(uri)).start()
    try:
        time.sleep(3.0)  # the control-topic consumer has its position before anything is announced
        assert watcher.ready() is None
        assert _cli(capsys, settings, "rollback")["announced"] is True
        prepared, waited = _prepared(watcher)
        assert prepared.bundle.version == "v1" and waited < 15.0
        watcher.swapped(prepared, prepared.model)

        latency = {"rollback": waited}

        assert _cli(capsys, settings, "unpin")["announced"] is True
        prepared, waited = _prepared(watcher)
        assert prepared.bundle.version == "v2" and waited < 15.0  # the newest published version
        latency["unpin"] = waited
        watcher.swapped(prepared, prepared.model)

        from pipeline.bundle import save_bundle

        save_bundle(make_bundle("v3"), str(tmp_path / "v3"))
        assert _cli(capsys, settings, "publish", str(tmp_path / "v3"))["announced"] is True
        prepared, waited = _prepared(watcher)
        assert prepared.bundle.version == "v3" and waited < 15.0
        latency["publish"] = waited
        watcher.swapped(prepared, prepared.model)

        assert _cli(capsys, settings, "promote", "c1")["announced"] is True
        prepared, waited = _prepared(watcher)
        assert prepared.bundle.version == "c1" and waited < 15.0
        latency["promote"] = waited
    finally:
        watcher.stop()
    with capsys.disabled():
        print("\nannouncement → model prepared beside the serving one (s):",
              json.dumps({k: round(v, 2) for k, v in latency.items()}))

    bodies = [(r.key, json.loads(r.value)) for r in read_topic(settings, settings.topics.models, timeout_s=30)]
    assert [(key, b["action"], b["version"], b["uri"]) for key, b in bodies] == [
        (b"current", "rollback", "v1", uri), (b"current", "unpin", "v2", uri), (b"current", "publish", "v3", uri),
        (b"current", "promote", "c1", uri)]
