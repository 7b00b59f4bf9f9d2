"""Bundles: round trip, verification, refusal of corrupted or mismatched bundles, no pickle."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.bundle import (
    MANIFEST,
    SCALING,
    WEIGHTS,
    AssetHeads,
    AssetLevels,
    BundleError,
    _manifest_checksum,
    decode_bundle,
    encode_bundle,
    load_bundle,
    save_bundle,
)

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
    assert loaded.asset_levels.names == tiny_bundle.asset_levels.names == ("p1", "p2")
    np.testing.assert_array_equal(loaded.asset_levels.forecast, tiny_bundle.asset_levels.forecast)
    np.testing.assert_array_equal(loaded.asset_levels.novelty, tiny_bundle.asset_levels.novelty)


def _resealed(files: dict[str, bytes], name: str, data: bytes) -> dict[str, bytes]:
    """The bundle's files with one file replaced and the manifest's checksums made consistent again."""
    manifest = json.loads(files[MANIFEST])
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    manifest["checksum"] = _manifest_checksum(manifest)
    return {**files, name: data, MANIFEST: json.dumps(manifest).encode()}


def _rewrite_scaling(files: dict[str, bytes], change) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The bundle's files with scaling.npz edited by ``change`` (arrays in, arrays out)."""
    with np.load(io.BytesIO(files[SCALING]), allow_pickle=False) as z:
        arrays = change({k: z[k] for k in z.files})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _resealed(files, SCALING, buf.getvalue())


def test_a_bundle_without_per_asset_levels_loads_with_the_fleet_levels(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    legacy = {"level_assets", "asset_forecast_level", "asset_novelty_level"}
    files = _rewrite_scaling(encode_bundle(tiny_bundle), lambda a: {k: v for k, v in a.items() if k not in legacy})
    loaded = decode_bundle(files)
    assert loaded.asset_levels.names == ()
    fc, nv = loaded.asset_levels.rows_for(np.array(["p1", "p9"], dtype=object), loaded.forecast_level,
                                          loaded.novelty_level)
    np.testing.assert_array_equal(fc, [tiny_bundle.forecast_level] * 2)
    np.testing.assert_array_equal(nv, [tiny_bundle.novelty_level] * 2)


@pytest.mark.parametrize("bad", ["wrong_rows", "zero", "nan"])
def test_inconsistent_per_asset_levels_are_refused(tiny_bundle, bad: str) -> None:  # type: ignore[no-untyped-def]
    def change(a):  # type: ignore[no-untyped-def]
        lv = a["asset_novelty_level"].copy()
        if bad == "wrong_rows":
            lv = lv[:1]
        else:
            lv[0, 0] = 0.0 if bad == "zero" else np.nan
        return {**a, "asset_novelty_level": lv}

    with pytest.raises(BundleError, match="asset_novelty_level"):
        decode_bundle(_rewrite_scaling(encode_bundle(tiny_bundle), change))


def test_unknown_assets_get_the_fleet_levels_and_known_ones_their_own(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    own = AssetLevels(("p1",), np.full((1, len(FEATURES)), 7.0), np.full((1, len(FEATURES)), 9.0))
    b = dataclasses.replace(tiny_bundle, asset_levels=own)
    fc, nv = b.asset_levels.rows_for(np.array(["p2", "p1", "new"], dtype=object), b.forecast_level, b.novelty_level)
    np.testing.assert_array_equal(fc, [b.forecast_level, np.full(len(FEATURES), 7.0), b.forecast_level])
    np.testing.assert_array_equal(nv, [b.novelty_level, np.full(len(FEATURES), 9.0), b.novelty_level])


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


class _Payload:
    """Pickles as a call to ``Path.touch(marker)``: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def _with_payload(arrays: dict[str, np.ndarray], key: str, marker: Path) -> bytes:
    """An .npz of ``arrays`` where ``key`` holds an object array, which numpy stores pickled."""
    buf = io.BytesIO()
    np.savez(buf, **{**arrays, key: np.array([_Payload(marker)], dtype=object)})
    return buf.getvalue()


@pytest.mark.parametrize("name", [WEIGHTS, SCALING])
def test_a_pickled_array_is_refused_and_never_unpickled(tiny_bundle, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """An object array whose unpickling would create a file, under a key the loader reads and with
    every checksum consistent: loading refuses the bundle before anything is unpickled."""
    marker = tmp_path / "unpickled"
    files = encode_bundle(tiny_bundle)
    with np.load(io.BytesIO(files[name]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = f"w{len(tiny_bundle.weights) - 1:03d}" if name == WEIGHTS else "mean"
    assert key in arrays
    evil = _resealed(files, name, _with_payload(arrays, key, marker))
    assert not marker.exists()  # saving pickles the payload without running it
    with pytest.raises(BundleError) as refused:
        decode_bundle(evil)
    assert not marker.exists(), "loading a bundle unpickled an array"
    assert re.match(rf"{re.escape(name)} refused: .*allow_pickle=False", str(refused.value)), refused.value
    save_bundle(tiny_bundle, str(tmp_path / "b"))
    (tmp_path / "b" / name).write_bytes(evil[name])
    (tmp_path / "b" / MANIFEST).write_bytes(evil[MANIFEST])
    with pytest.raises(BundleError, match=f"{re.escape(name)} refused"):
        load_bundle(str(tmp_path / "b"))
    assert not marker.exists(), "loading a bundle unpickled an array"


def test_a_bundle_written_before_the_novelty_cap_runs_uncapped(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    files = encode_bundle(tiny_bundle)
    manifest = json.loads(files[MANIFEST])
    del manifest["thresholds"]["novelty_cap"]
    manifest["checksum"] = _manifest_checksum(manifest)
    loaded = decode_bundle({**files, MANIFEST: json.dumps(manifest).encode()})
    assert loaded.thresholds.novelty_cap == float("inf")
    assert tiny_bundle.thresholds.novelty_cap == 3.0


def test_per_asset_heads_round_trip_and_old_bundles_use_the_network_head(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assert tiny_bundle.heads.names == ("p1", "p2")
    loaded = decode_bundle(encode_bundle(tiny_bundle))
    assert loaded.heads.names == ("p1", "p2")
    np.testing.assert_array_equal(loaded.heads.kernel, tiny_bundle.heads.kernel)
    np.testing.assert_array_equal(loaded.heads.bias, tiny_bundle.heads.bias)
    buf = io.BytesIO()
    np.savez(buf, **{f"w{i:03d}": w for i, w in enumerate(tiny_bundle.weights)})
    legacy = decode_bundle(_resealed(encode_bundle(tiny_bundle), WEIGHTS, buf.getvalue()))
    assert legacy.heads.names == () and legacy.heads.rows(np.array(["p1"], dtype=object)).tolist() == [-1]


def test_per_asset_heads_of_the_wrong_shape_are_refused(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    bad = dataclasses.replace(tiny_bundle, heads=AssetHeads(tiny_bundle.heads.names, tiny_bundle.heads.kernel[:, :-1],
                                                            tiny_bundle.heads.bias))
    with pytest.raises(BundleError, match="heads"):
        decode_bundle(encode_bundle(bad))


def test_the_novelty_range_round_trips_and_old_bundles_leave_the_maps_inputs_unheld(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assert tiny_bundle.novelty_range is not None and tiny_bundle.novelty_range.shape == (2, len(FEATURES))
    np.testing.assert_array_equal(decode_bundle(encode_bundle(tiny_bundle)).novelty_range, tiny_bundle.novelty_range)
    legacy = _rewrite_scaling(encode_bundle(tiny_bundle), lambda a: {k: v for k, v in a.items() if k != "novelty_range"})
    assert decode_bundle(legacy).novelty_range is None
    upside_down = dataclasses.replace(tiny_bundle, novelty_range=tiny_bundle.novelty_range[::-1] + [[-1.0], [1.0]])
    with pytest.raises(BundleError, match="novelty_range"):
        decode_bundle(encode_bundle(upside_down))


def test_the_novelty_memory_round_trips_and_old_bundles_hold_none(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assert tiny_bundle.novelty_memory is not None and tiny_bundle.novelty_memory.shape == (len(FEATURES),)
    assert (tiny_bundle.novelty_memory >= 1).all()
    np.testing.assert_array_equal(decode_bundle(encode_bundle(tiny_bundle)).novelty_memory, tiny_bundle.novelty_memory)
    legacy = _rewrite_scaling(encode_bundle(tiny_bundle), lambda a: {k: v for k, v in a.items() if k != "novelty_memory"})
    assert decode_bundle(legacy).novelty_memory is None
    below_one = dataclasses.replace(tiny_bundle, novelty_memory=np.zeros(len(FEATURES)))
    with pytest.raises(BundleError, match="novelty_memory"):
        decode_bundle(encode_bundle(below_one))


def test_the_agreement_levels_round_trip_and_old_bundles_have_no_agreement_term(tiny_bundle) -> None:  # type: ignore[no-untyped-def]
    assert tiny_bundle.agree_level is not None and tiny_bundle.agree_level > 0
    assert tiny_bundle.asset_levels.agree.shape == (len(tiny_bundle.asset_levels.names),)
    back = decode_bundle(encode_bundle(tiny_bundle))
    assert back.agree_level == tiny_bundle.agree_level
    np.testing.assert_array_equal(back.asset_levels.agree, tiny_bundle.asset_levels.agree)
    legacy = _rewrite_scaling(encode_bundle(tiny_bundle), lambda a: {k: v for k, v in a.items()
                                                                    if k not in ("agree_level", "asset_agree_level")})
    assert decode_bundle(legacy).agree_level is None
    zero = dataclasses.replace(tiny_bundle, agree_level=0.0)
    with pytest.raises(BundleError, match="agree_level"):
        decode_bundle(encode_bundle(zero))


def _nan_weight(b):  # type: ignore[no-untyped-def]
    weights = [w.copy() for w in b.weights]
    weights[0][0, 0] = np.nan
    return dataclasses.replace(b, weights=weights)


@pytest.mark.parametrize("change, says", [
    (_nan_weight, "weights must be finite"),
    (lambda b: dataclasses.replace(b, period_ms=0), "period_ms"),
    (lambda b: dataclasses.replace(b, thresholds=dataclasses.replace(b.thresholds, threshold=float("nan"))),
     "thresholds.threshold"),
    (lambda b: dataclasses.replace(b, thresholds=dataclasses.replace(b.thresholds, open_after="3")),
     "thresholds.open_after"),
    (lambda b: dataclasses.replace(b, thresholds=dataclasses.replace(b.thresholds, smoothing_alpha=2.0)),
     "smoothing_alpha"),
    (lambda b: dataclasses.replace(b, scaler=dataclasses.replace(
        b.scaler, asset_names=("p1",), asset_mean=np.zeros((1, len(FEATURES))),
        asset_scale=np.zeros((1, len(FEATURES))))), "per-asset scaling"),
    (lambda b: dataclasses.replace(b, error_scale=np.array(["1.0"] * len(FEATURES))), "inconsistent"),
])
def test_a_bundle_that_would_silence_or_break_scoring_is_refused(tiny_bundle, change, says) -> None:  # type: ignore[no-untyped-def]
    """Checksums prove the files are the ones written, not that their content can serve: a crafted or
    broken manifest or array is refused with a BundleError, never another exception."""
    with pytest.raises(BundleError, match=says):
        decode_bundle(encode_bundle(change(tiny_bundle)))
