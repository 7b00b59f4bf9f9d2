"""What a detector started on the registry does before it has a model to serve (no broker needed)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cli.detect_cmd import _wait_for_current
from consumers.health import Health
from pipeline import registry
from pipeline.bundle import WEIGHTS, FeatureMismatch
from pipeline.settings import load_settings

from .test_registry import FEATURES, make_bundle


def _settings(uri: str, features: tuple[str, ...] = FEATURES):  # type: ignore[no-untyped-def]
    return load_settings(env={}, overrides={"registry.uri": uri, "model.features": ",".join(features),
                                            "detector.registry_poll_s": "0.05"})


def test_a_damaged_serving_version_is_waited_out_until_a_new_one_is_published(tmp_path: Path) -> None:
    uri = str(tmp_path / "registry")
    registry.publish(uri, make_bundle("v1"), keep=5)
    weights = tmp_path / "registry" / "models" / "v1" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on the store
    health, stop, got = Health(), threading.Event(), []
    waiter = threading.Thread(target=lambda: got.append(_wait_for_current(_settings(uri), stop, health)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and health.waiting_for == "a loadable model"  # not an exit
    registry.publish(uri, make_bundle("v2"), keep=5)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and got[0].version == "v2" and health.waiting_for is None


def test_a_sound_model_of_other_features_is_a_configuration_error(tmp_path: Path) -> None:
    uri = str(tmp_path / "registry")
    registry.publish(uri, make_bundle("v1"), keep=5)
    with pytest.raises(FeatureMismatch, match="differ from the configured"):
        _wait_for_current(_settings(uri, tuple(reversed(FEATURES))), threading.Event(), Health())
