"""Repeatable training, fine-tuning from the serving model, and the training job's side of the
gate: a refused model is kept as a candidate with its report, a published one carries it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import registry
from pipeline.bundle import REPORT_JSON, REPORT_PNG, ModelBundle
from pipeline.fit import FitError, fit_bundle
from pipeline.readings import DecodedBatch
from pipeline.settings import load_settings
from pipeline.tables import frame_to_batch
from tests.unit.conftest import FEATURES, sine_frame, tiny_settings


def history() -> DecodedBatch:
    return frame_to_batch(sine_frame(600, assets=("p1", "p2"), seed=3), FEATURES, ts_col="ts", asset_col="asset")


def test_the_same_data_and_seed_train_the_same_weights_bit_for_bit(tiny_bundle: ModelBundle) -> None:
    """No randomness is left unseeded: initialisation (keras.utils.set_random_seed) and the
    order of training runs (model.seed); the CPU kernels are deterministic for a fixed input."""
    settings = tiny_settings(**{"model.epochs": "2"})
    (a, ra), (b, rb) = fit_bundle(history(), settings), fit_bundle(history(), settings)
    assert ra.train_loss == rb.train_loss and ra.val_loss == rb.val_loss
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x, y)
    assert a.version.split("-")[1] == b.version.split("-")[1]  # the weights' digest
    (c, _) = fit_bundle(history(), tiny_settings(**{"model.epochs": "2", "model.seed": "1"}))
    assert not np.array_equal(a.weights[0], c.weights[0])


def test_fine_tuning_starts_from_the_given_weights_and_keeps_them_unless_an_epoch_improves(
        tiny_bundle: ModelBundle) -> None:
    # A learning rate that wrecks the network on its first step: no epoch beats the starting point.
    wrecking = tiny_settings(**{"model.learning_rate": "50", "model.epochs": "2", "model.patience": "2"})
    bundle, report = fit_bundle(history(), wrecking, initial_weights=tiny_bundle.weights,
                                metadata={"fine_tuned_from": tiny_bundle.version})
    assert report.best_epoch == 0 and report.initial_val_loss is not None
    assert all(v > report.initial_val_loss for v in report.val_loss)
    for x, y in zip(bundle.weights, tiny_bundle.weights):
        np.testing.assert_array_equal(x, y)
    assert bundle.metadata["initial_val_loss"] == round(report.initial_val_loss, 6)
    assert bundle.metadata["validation_error"] == round(report.initial_val_loss, 6)
    assert bundle.metadata["fine_tuned_from"] == tiny_bundle.version

    # An ordinary fine-tune ends no worse than where it started, on the validation tail.
    tuned, report = fit_bundle(history(), tiny_settings(), initial_weights=tiny_bundle.weights)
    assert report.initial_val_loss is not None
    assert tuned.metadata["validation_error"] <= round(report.initial_val_loss, 6)


def test_weights_of_another_network_are_refused(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(FitError, match="initial weights do not fit 3 features and layers"):
        fit_bundle(history(), tiny_settings(**{"model.units": "6,4"}), initial_weights=tiny_bundle.weights)


# ---------------------------------------------------------------- the training job


T0 = 1_767_225_600_000
MINUTE = 60_000


def write_archive(uri: str, start_ms: int, end_ms: int) -> None:
    from consumers.archiver import ArchiveWriter, Rows
    from pipeline.simulate import PlantConfig, PlantSimulator

    plant = PlantConfig(n_assets=2, features=FEATURES_SIM, period_ms=1000, seed=5, regime_change_per_day=0.0)
    frame = PlantSimulator(plant).frame(start_ms, end_ms)
    n, f = len(frame), len(FEATURES_SIM)
    ArchiveWriter(uri, FEATURES_SIM).write(0, Rows(
        asset=np.repeat(frame["asset"].to_numpy(object), f), ts_ms=np.repeat(frame["ts_ms"].to_numpy(), f),
        feature=np.tile(np.arange(f, dtype=np.int32), n), value=frame[list(FEATURES_SIM)].to_numpy().ravel(),
        offset=np.arange(n * f, dtype=np.int64) // f))


FEATURES_SIM = ("Current", "Pressure", "Temperature")


def test_the_job_fine_tunes_from_the_champion_and_keeps_a_refused_model_as_a_candidate(tmp_path: Path) -> None:
    from trainers.train import run_training

    base = {"model.features": ",".join(FEATURES_SIM), "model.units": "8,4", "model.timesteps": "8",
            "model.epochs": "2", "model.streams": "8", "trainer.lookback_hours": "0.75",
            "trainer.holdout_hours": "0.15", "trainer.min_rows": "500", "registry.uri": str(tmp_path / "reg"),
            "archive.uri": str(tmp_path / "archive"), "registry.keep_candidates": "2"}
    write_archive(base["archive.uri"], T0, T0 + 60 * MINUTE)
    first = run_training(load_settings(env={}, overrides=base), T0 + 45 * MINUTE)
    assert first.published and "fine_tuned_from" not in first.metadata  # nothing to start from
    assert registry.read_report(base["registry.uri"], first.version)["gate"]["reason"].startswith("first model")  # type: ignore[index]

    second = run_training(load_settings(env={}, overrides=base), T0 + 55 * MINUTE)
    assert second.metadata["fine_tuned_from"] == first.version
    assert second.metadata["initial_val_loss"] >= second.metadata["validation_error"]
    paired = second.metadata["gate"]["paired"]
    assert paired["blocks"] > 0 and paired["resamples"] == 1000

    # Thresholds inside normal variation: it alerts all along the held-out data and is refused.
    jumpy = load_settings(env={}, overrides={**base, "threshold.quantile": "0.5", "threshold.margin": "0.5",
                                             "threshold.adapt_z": "0.01", "trainer.fine_tune": "false"})
    serving = registry.current_version(base["registry.uri"])
    third = run_training(jumpy, T0 + 55 * MINUTE)
    assert not third.published and third.candidate and third.exit_code == 3
    assert "alert fraction" in third.gate.reason and "fine_tuned_from" not in third.metadata
    assert third.summary()["candidate"] is True
    assert registry.current_version(base["registry.uri"]) == serving
    kept = registry.list_versions(base["registry.uri"], candidates=True)
    assert [(v.version, v.candidate) for v in kept if v.candidate] == [(third.version, True)]
    assert kept[-1].gate is not None and kept[-1].gate["decision"] == "refuse"
    files = {p.name for p in (tmp_path / "reg" / "candidates" / third.version).iterdir()}
    assert {REPORT_JSON, REPORT_PNG} <= files
    assert {REPORT_JSON, REPORT_PNG} <= {p.name for p in (tmp_path / "reg" / "models" / first.version).iterdir()}
