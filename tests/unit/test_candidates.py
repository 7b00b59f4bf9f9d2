"""Every gate decision kept: refused models under candidates/ (stored, listed, shown, promoted,
pruned), training reports beside every bundle, and registry changes announced by the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import registry, storage
from pipeline.bundle import MANIFEST, REPORT_JSON, REPORT_PNG, SCALING, WEIGHTS, BundleError, load_bundle, save_bundle
from pipeline.registry import RegistryError
from pipeline.settings import Settings, load_settings
from tests.unit.test_registry import FEATURES, make_bundle
from trainers.gate import Comparison, GateFigures, blocks_from_steps, decide
from trainers.report import report, report_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(params=["local", "mock"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "registry") if request.param == "local" else f"mock://cand-{uuid.uuid4().hex[:8]}"


def _tree(uri: str, sub: str) -> list[str]:
    fs, path = storage.resolve(uri)
    base = storage.join(path, sub)
    if not storage.exists(fs, base):
        return []
    return sorted(i.path[len(base) + 1:] for i in fs.get_file_info(storage.pafs.FileSelector(base)))


def gated(version: str, worse: float, champion: str = "v1", created: str = "2026-01-02T03:04:05+00:00"):  # type: ignore[no-untyped-def]
    """A bundle carrying the gate's decision on a challenger ``worse`` times the champion's error."""
    rng = np.random.default_rng(0)
    n = 2000
    asset = np.repeat(["p1", "p2"], n // 2).astype(object)
    step = np.tile(np.arange(n // 2), 2)
    error = rng.chisquare(2, size=n)
    blocks = blocks_from_steps(asset, step, np.column_stack([error, worse * error]), np.zeros((n, 2)))
    figures = (GateFigures(champion, n, 1.0, 0.0, 0), GateFigures(version, n, worse, 0.0, 0))
    decision = decide(Comparison(*figures, blocks), margin=0.05)
    b = make_bundle(version)
    return dataclasses.replace(b, metadata={**b.metadata, "created_at": created, "train_loss": [0.5, 0.3, 0.25],
                                            "val_loss": [0.4, 0.3, 0.31], "best_epoch": 2,
                                            "gate": decision.to_dict()}), decision


# ---------------------------------------------------------------- candidates in the registry


def test_a_refused_model_is_kept_as_a_candidate_never_served(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=5)
    bundle, decision = gated("c1", worse=1.5)
    assert not decision.publish
    assert registry.store_candidate(root, bundle, keep=10, extra=report_files(bundle)) == "c1"
    assert _tree(root, "candidates") == ["c1"]
    assert sorted(_tree(root, "candidates/c1")) == sorted([MANIFEST, WEIGHTS, SCALING, REPORT_JSON, REPORT_PNG])
    assert registry.current_version(root) == "v1" and [v.version for v in registry.list_versions(root)] == ["v1"]
    with pytest.raises(RegistryError, match="unknown version"):
        registry.load_version(root, "c1")  # serving paths never see it
    with pytest.raises(RegistryError, match="no loadable version older than v1"):
        registry.rollback(root)  # nor does rollback

    everything = registry.list_versions(root, candidates=True)
    assert [(v.version, v.candidate) for v in everything] == [("v1", False), ("c1", True)]
    gate = everything[1].gate
    assert gate is not None and gate["decision"] == "refuse" and gate["champion"] == "v1"
    assert gate["error_change"]["estimate"] == pytest.approx(0.5) and gate["error_change"]["low"] > 0.05
    assert registry.is_candidate(root, "c1") and not registry.is_candidate(root, "v1")
    assert registry.manifest(root, "c1")["metadata"]["gate"]["decision"] == "refuse"
    assert registry.manifest(root, "c1")["metadata"]["stored_at"]
    assert registry.load_any(root, "c1").version == "c1"
    kept = registry.read_report(root, "c1")
    assert kept is not None and kept["gate"]["paired"]["error_worse"] is True
    assert kept["training"]["val_loss"] == [0.4, 0.3, 0.31]
    with pytest.raises(RegistryError, match=r"unknown version 'c9'.*candidates: c1"):
        registry.manifest(root, "c9")


def test_candidates_are_pruned_by_count_oldest_first(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=5)
    for i in range(5):
        bundle, _ = gated(f"c{i}", worse=2.0, created=f"2026-01-0{i + 1}T00:00:00+00:00")
        registry.store_candidate(root, bundle, keep=3)
    assert _tree(root, "candidates") == ["c2", "c3", "c4"]
    assert [v.version for v in registry.list_versions(root, candidates=True)] == ["v1", "c4", "c3", "c2"]
    assert registry.prune_candidates(root, keep=0) == ["c2", "c3", "c4"]
    assert _tree(root, "candidates") == [] and _tree(root, ".staging") == []
    assert registry.current_version(root) == "v1"


def test_promoting_a_candidate_publishes_it_with_its_report(root: str) -> None:
    registry.publish(root, make_bundle("v1"), keep=5)
    bundle, _ = gated("c1", worse=1.5)
    registry.store_candidate(root, bundle, keep=10, extra=report_files(bundle))
    registry.promote(root, "c1", keep=5)
    p = registry.pointers(root)
    assert (p.current, p.pinned, p.previous) == ("c1", "c1", "v1")
    assert _tree(root, "candidates") == [] and _tree(root, "models") == ["c1", "v1"]
    assert REPORT_PNG in _tree(root, "models/c1") and REPORT_JSON in _tree(root, "models/c1")
    served = registry.load_current(root, expected_features=FEATURES)
    assert served.version == "c1"
    for got, want in zip(served.weights, bundle.weights):
        np.testing.assert_array_equal(got, want)
    meta = served.metadata
    assert meta["gate"]["decision"] == "refuse"  # the gate's verdict stays on record
    assert meta["promoted"]["from"] == "candidate" and meta["promoted"]["stored_at"] and "stored_at" not in meta
    assert meta["published_at"]
    assert registry.read_report(root, "c1")["gate"]["decision"] == "refuse"  # type: ignore[index]


def test_a_corrupted_candidate_is_not_promoted(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    registry.publish(root, make_bundle("v1"), keep=5)
    bundle, _ = gated("c1", worse=1.5)
    registry.store_candidate(root, bundle, keep=10)
    weights = tmp_path / "reg" / "candidates" / "c1" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(RegistryError, match="refusing to promote c1"):
        registry.promote(root, "c1")
    assert registry.pointers(root).serving == "v1" and _tree(root, "models") == ["v1"]


# ---------------------------------------------------------------- reports beside bundles


def test_report_files_hold_the_losses_and_the_gate_comparison() -> None:
    bundle, decision = gated("c1", worse=1.5)
    files = report_files(bundle)
    body = json.loads(files[REPORT_JSON])
    assert body == json.loads(json.dumps(report(bundle)))
    assert body["training"]["train_loss"] == [0.5, 0.3, 0.25] and body["training"]["best_epoch"] == 2
    assert body["gate"] == decision.to_dict()
    assert files[REPORT_PNG].startswith(PNG_MAGIC) and len(files[REPORT_PNG]) > 5000
    # A first model has no comparison: the figure says why instead.
    first = dataclasses.replace(bundle, metadata={**bundle.metadata, "gate": {"decision": "publish",
                                                                            "reason": "first model"}})
    assert report_files(first)[REPORT_PNG].startswith(PNG_MAGIC)
    assert report_files(make_bundle("bare"))[REPORT_PNG].startswith(PNG_MAGIC)


def test_report_files_are_outside_the_checksums_and_ignored_by_loading(root: str, tmp_path: Path) -> None:
    bundle, _ = gated("v1", worse=1.0)
    registry.publish(root, bundle, keep=5, extra=report_files(bundle))
    assert set(registry.manifest(root, "v1")["files"]) == {WEIGHTS, SCALING}
    assert registry.load_current(root).version == "v1"  # every checksum verifies
    fs, path = storage.resolve(root)
    storage.write_bytes(fs, storage.join(path, "models", "v1", REPORT_PNG), b"not a png")
    storage.write_bytes(fs, storage.join(path, "models", "v1", "notes.txt"), b"anything")
    assert registry.load_version(root, "v1").version == "v1"
    with pytest.raises(RegistryError, match="only report.json, report.png"):
        registry.publish(root, make_bundle("v2"), keep=5, extra={"run.sh": b"#!/bin/sh"})
    out = str(tmp_path / "bundle")
    save_bundle(bundle, out, extra=report_files(bundle))
    (tmp_path / "bundle" / "extra.bin").write_bytes(b"\0" * 10)
    assert load_bundle(out).version == "v1"
    with pytest.raises(BundleError, match="only report.json"):
        save_bundle(bundle, str(tmp_path / "other"), extra={"x.json": b"{}"})


def test_a_filesystem_without_directory_moves_copies_the_reports_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    from tests.unit.test_registry import _NoDirMoves

    fs = pafs.PyFileSystem(_NoDirMoves(pafs._MockFileSystem()))
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, uri.removeprefix("objstore://")))
    root = "objstore://bucket/registry"
    bundle, _ = gated("v1", worse=1.0)
    registry.publish(root, bundle, keep=5, extra=report_files(bundle))
    candidate, _ = gated("c1", worse=1.5)
    registry.store_candidate(root, candidate, keep=5, extra=report_files(candidate))
    assert REPORT_PNG in _tree(root, "models/v1") and REPORT_PNG in _tree(root, "candidates/c1")
    registry.promote(root, "c1", keep=5)
    assert REPORT_PNG in _tree(root, "models/c1") and _tree(root, "candidates") == []
    assert registry.load_current(root).version == "c1"


# ---------------------------------------------------------------- the CLI


def _cli(capsys: pytest.CaptureFixture[str], settings: Settings, *argv: str) -> tuple[int, str]:
    from cli import models_cmd

    parser = argparse.ArgumentParser()
    models_cmd.add_arguments(parser)
    code = models_cmd.run(parser.parse_args(argv), settings)
    return code, capsys.readouterr().out


def test_cli_lists_shows_and_promotes_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")
    settings = load_settings(env={}, overrides={"registry.uri": root})
    first, _ = gated("v1", worse=1.0)
    registry.publish(root, first, keep=5)
    bundle, _ = gated("c1", worse=1.5)
    registry.store_candidate(root, bundle, keep=10, extra=report_files(bundle))

    code, out = _cli(capsys, settings, "list")
    assert code == 0 and "c1" not in out and "GATE" not in out
    code, out = _cli(capsys, settings, "list", "--all")
    header, *rows = out.splitlines()
    assert header.split()[-2:] == ["STATUS", "GATE"]
    assert rows[0].split()[:2] == ["*", "v1"]
    assert rows[1].split()[0] == "c1" and "candidate" in rows[1]
    assert "refuse  error +50.0% [" in rows[1] and "(limit +5.0%)" in rows[1]
    code, out = _cli(capsys, settings, "list", "--all", "--json")
    assert [(v["version"], v["candidate"]) for v in json.loads(out)] == [("v1", False), ("c1", True)]

    code, out = _cli(capsys, settings, "show", "c1")
    lines = out.splitlines()
    assert code == 0
    assert any(line.startswith("status") and "candidate: refused by the gate" in line for line in lines)
    assert any(line.startswith("integrity") and "ok (checksums verified)" in line for line in lines)
    assert any(line.startswith("gate ") and "refuse  error +50.0%" in line for line in lines)
    assert any(line.startswith("gate reason") and "worse than the serving model" in line for line in lines)
    assert any(line.startswith("report") for line in lines)
    code, out = _cli(capsys, settings, "show", "c1", "--json")
    shown = json.loads(out)
    assert shown["candidate"] is True and shown["current"] is False and shown["report"]["gate"]["decision"] == "refuse"

    code, out = _cli(capsys, settings, "promote", "c1")
    assert out.strip() == "promoted c1: current and pinned (the candidate is now published)"
    assert registry.pointers(root).serving == "c1" and not registry.list_versions(root, candidates=True)[0].candidate


def test_cli_publish_puts_a_report_beside_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")
    settings = load_settings(env={}, overrides={"registry.uri": root})
    bundle, _ = gated("v1", worse=1.0)
    save_bundle(bundle, str(tmp_path / "b"))  # written without a report
    code, out = _cli(capsys, settings, "publish", str(tmp_path / "b"))
    assert code == 0 and out.strip() == "published v1: current"
    assert registry.read_report(root, "v1")["training"]["best_epoch"] == 2  # type: ignore[index]


def test_every_registry_change_is_announced_when_a_broker_is_configured(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from trainers import announce as announcing

    sent: list[dict[str, Any]] = []

    def fake(settings: Settings, version: str | None, *, uri: str | None = None, action: str | None = None) -> bool:
        sent.append({"version": version, "uri": uri, "action": action})
        return action != "unpin"  # the broker refuses one

    monkeypatch.setattr(announcing, "announce", fake)
    root = str(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(root, make_bundle(v), keep=5)
    bundle, _ = gated("c1", worse=1.5)
    registry.store_candidate(root, bundle, keep=10)
    save_bundle(make_bundle("v3"), str(tmp_path / "v3"))

    quiet = load_settings(env={}, overrides={"registry.uri": root})
    code, out = _cli(capsys, quiet, "rollback", "--json")
    assert json.loads(out) == {"serving": "v1", "current": "v2", "pinned": "v1"} and sent == []  # no broker

    brokered = load_settings(env={}, overrides={"registry.uri": root, "kafka.bootstrap_servers": "broker:9092"})
    code, out = _cli(capsys, brokered, "unpin", "--json")
    assert json.loads(out) == {"serving": "v2", "current": "v2", "pinned": None, "announced": False}
    code, out = _cli(capsys, brokered, "rollback")
    assert out.strip() == "rolled back: v1 pinned (announced on plant.models)"
    _cli(capsys, brokered, "promote", "c1")
    _cli(capsys, brokered, "publish", str(tmp_path / "v3"))
    code, out = _cli(capsys, brokered, "unpin")
    assert "not announced on plant.models" in out
    assert [(s["action"], s["version"], s["uri"]) for s in sent] == [
        ("unpin", "v2", root), ("rollback", "v1", root), ("promote", "c1", root), ("publish", "c1", root),
        ("unpin", "v3", root)]  # the version each change left serving (a pin outlives a publish)
