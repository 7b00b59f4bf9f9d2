"""The model watcher against a real registry directory (its threads not started: each registry
check is called by hand, as a wake-up calls it)."""

from __future__ import annotations

import threading
from pathlib import Path

from consumers import model_watch
from consumers.model_watch import ModelWatcher
from pipeline import registry
from pipeline.settings import load_settings

from .test_registry import make_bundle


def _serving_v1_with_v2_published(tmp_path: Path) -> tuple[str, ModelWatcher]:
    uri = str(tmp_path / "registry")
    v1 = make_bundle("v1")
    registry.publish(uri, v1, keep=5)
    watcher = ModelWatcher(load_settings(env={}, overrides={"registry.uri": uri}), v1)
    registry.publish(uri, make_bundle("v2"), keep=5)
    return uri, watcher


def test_a_version_rolled_back_before_its_swap_is_withdrawn_not_swapped_in(tmp_path: Path) -> None:
    uri, watcher = _serving_v1_with_v2_published(tmp_path)
    watcher.check()
    prepared = watcher.ready()  # the detector takes v2 and warms it
    assert prepared is not None and prepared.bundle.version == "v2" and not watcher.superseded(prepared)

    registry.rollback(uri)  # the operator rolls back while v2 is being warmed
    watcher.check()
    assert watcher.current == "v1" and watcher.superseded(prepared)
    watcher.withdraw(prepared)  # what the detector does instead of the swap
    assert watcher.taken is None and watcher.ready() is None

    registry.promote(uri, "v2")  # promoted again: prepared again, on the spare network
    watcher.check()
    again = watcher.ready()
    assert again is not None and again.bundle.version == "v2" and again.model is prepared.model


def test_a_prepared_version_waiting_when_the_registry_moves_on_is_not_offered(tmp_path: Path) -> None:
    uri, watcher = _serving_v1_with_v2_published(tmp_path)
    watcher.check()  # v2 prepared and waiting
    registry.rollback(uri)
    watcher.check()  # the registry names v1 again before the detector took v2
    assert watcher.ready() is None and watcher.taken is None


def test_a_version_the_registry_cannot_find_yet_is_tried_again(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """CURRENT read before the version's directory is visible (or a pin that raced a prune) is not
    a broken bundle: the next check prepares it."""
    uri, watcher = _serving_v1_with_v2_published(tmp_path)
    load = model_watch.load_version
    monkeypatch.setattr(model_watch, "load_version", lambda *a, **k: (_ for _ in ()).throw(
        registry.RegistryError("unknown version 'v2'")))
    watcher.check()
    assert watcher.ready() is None and "v2" not in watcher.refused
    monkeypatch.setattr(model_watch, "load_version", load)
    watcher.check()
    prepared = watcher.ready()
    assert prepared is not None and prepared.bundle.version == "v2"


def test_a_bundle_that_fails_in_an_unforeseen_way_is_refused(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A crafted manifest with a field of the wrong type raised a TypeError out of the watch thread."""
    uri, watcher = _serving_v1_with_v2_published(tmp_path)
    monkeypatch.setattr(model_watch, "load_version", lambda *a, **k: (_ for _ in ()).throw(
        TypeError("unsupported operand type(s) for /: 'str' and 'float'")))
    watcher.check()
    assert watcher.ready() is None and "v2" in watcher.refused


def test_the_watch_thread_outlives_a_check_that_raises(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    uri, watcher = _serving_v1_with_v2_published(tmp_path)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("a field of the wrong type")
        watcher._stop.set()

    monkeypatch.setattr(watcher, "check", check)
    monkeypatch.setattr(watcher, "_wake", threading.Event())
    watcher._wake.set()
    thread = threading.Thread(target=watcher._run)
    thread.start()
    watcher._wake.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and len(calls) == 2
