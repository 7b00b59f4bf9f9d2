"""Bundles: round trip, verification, refusal of corrupted or mismatched bundles, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.bundle import MANIFEST, SCALING, WEIGHTS, BundleError, load_bundle, save_bundle

from .conftest import FEATURES


def test_round_trip_preserves_everything(tiny_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_bundle(tiny_bundle, str(tmp_path / "b"))
    loaded = load_bundle(str(tmp_path / "b"), expected_features=FEATURES)
    assert loaded.version == tiny_bundle.version and loaded.features == FEATURES
    assert loaded.thresholds == tiny_bundle.thresholds
    for a, b in zip(loaded.weights, tiny_bundle.weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.scaler.asset_mean, tiny_bundle.scaler.asset_mean)
    assert loaded.scaler.asset_names == ("p1", "p2")
    assert loaded.metadata["epochs"] >= 1 and "versions" in loaded.metadata


def test_works_on_a_pyarrow_filesystem_uri(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    save_bundle(tiny_bundle, "mock://registry/v1")
    assert load_bundle("mock://registry/v1").version == tiny_bundle.version


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_scaling_byte", "edit_manifest", "drop_file"])
def test_corrupted_bundles_are_refused(tiny_bundle, tmp_path: Path, damage: str) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "b"
    save_bundle(tiny_bundle, str(d))
    if damage == "truncate_weights":
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif damage == "flip_scaling_byte":
        data = bytearray((d / SCALING).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / SCALING).write_bytes(bytes(data))
    elif damage == "edit_manifest":
        m = json.loads((d / MANIFEST).read_text())
        m["thresholds"]["threshold"] = 1e9
        (d / MANIFEST).write_text(json.dumps(m))
    else:
        (d / WEIGHTS).unlink()
    with pytest.raises(BundleError):
        load_bundle(str(d))


def test_a_bundle_for_other_features_is_refused(tiny_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_bundle(tiny_bundle, str(tmp_path / "b"))
    with pytest.raises(BundleError, match="differ"):
        load_bundle(str(tmp_path / "b"), expected_features=("a", "b", "x"))


def test_weights_inconsistent_with_the_manifest_are_refused(tiny_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    wrong = dataclasses.replace(tiny_bundle, units=(16, 4))  # weights are for (8, 4)
    save_bundle(wrong, str(tmp_path / "b"))
    with pytest.raises(BundleError, match="weights do not match"):
        load_bundle(str(tmp_path / "b"))


def test_pickled_arrays_are_never_loaded(tiny_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An object array in the weights (a pickle payload) fails instead of executing."""
    import hashlib
    import io

    d = tmp_path / "b"
    save_bundle(tiny_bundle, str(d))
    buf = io.BytesIO()
    np.savez(buf, **{f"w{i:03d}": w for i, w in enumerate(tiny_bundle.weights[:-1])},
             **{f"w{len(tiny_bundle.weights) - 1:03d}": np.array([object()], dtype=object)})
    (d / WEIGHTS).write_bytes(buf.getvalue())
    m = json.loads((d / MANIFEST).read_text())
    m["files"][WEIGHTS] = hashlib.sha256(buf.getvalue()).hexdigest()
    from pipeline.bundle import _manifest_checksum

    m["checksum"] = _manifest_checksum(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError):
        load_bundle(str(d))
