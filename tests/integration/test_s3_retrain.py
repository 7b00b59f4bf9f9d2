"""Archive → train → publish → detector swap with the archive and the registry on an S3
emulator (moto), reached through the ``[storage]`` settings (endpoint, region, credentials):
the flow of ``test_retrain_e2e.py`` with ``s3://`` URIs instead of local paths."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.archiver import Archiver
from pipeline import registry, storage
from pipeline.simulate import PlantSimulator
from trainers.train import run_training

from . import faults
from .plant import PERIOD_MS, PLANT, detector_settings, produce, running_detector, wait_until
from .s3_emulator import MotoS3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HISTORY = 1200  # steps per asset before the first run
MORE = 300      # steps per asset archived before the second run
BUCKET = "plantwatch-data"


def test_archive_train_publish_and_swap_on_s3(broker: Any, settings_for: Any, tmp_path: Path) -> None:
    t0 = time.monotonic()
    s3 = MotoS3(BUCKET, tmp_path / "moto.log")
    before = storage.config()
    stop = threading.Event()
    try:
        settings = detector_settings(settings_for, broker, {
            "archive.uri": f"s3://{BUCKET}/archive", "registry.uri": f"s3://{BUCKET}/registry",
            "storage.endpoint_url": s3.endpoint, "storage.region": "us-east-1",
            "storage.access_key_id": "test", "storage.secret_access_key": "test",
            "storage.retry_backoff_s": "0.2",
            "archive.flush_seconds": "1", "detector.registry_poll_s": "0.5",
            "model.units": "8,4", "model.timesteps": "8", "model.epochs": "2", "trainer.min_rows": "1000",
            "trainer.lookback_hours": str((HISTORY + MORE + 60) / 3600), "trainer.holdout_hours": "0",
            "trainer.lock_path": str(tmp_path / "trainer.lock")})
        storage.configure(settings.storage)
        start = PLANT_START
        first_end = start + HISTORY * PERIOD_MS
        second_end = first_end + MORE * PERIOD_MS
        sim = PlantSimulator(PLANT)
        produce(settings, sim, start, first_end)

        archiver = Archiver(settings, stop=stop)
        arch_thread = threading.Thread(target=archiver.run, daemon=True)
        arch_thread.start()
        wait_until(lambda: archiver.stats.readings >= PLANT.n_assets * HISTORY, 90, "the history to be archived")
        archived_at = time.monotonic()

        first = run_training(settings, first_end)
        assert first.published, first.summary()
        assert registry.current_version(settings.registry.uri) == first.version
        trained_at = time.monotonic()

        serving = registry.load_current(settings.registry.uri, settings.model.features)
        with running_detector(settings, serving, follow_registry=True) as det:
            assert det.engine.model_version == first.version
            produce(settings, sim, first_end, second_end)
            wait_until(lambda: archiver.stats.readings >= PLANT.n_assets * (HISTORY + MORE), 60,
                       "the newer readings to be archived")
            second = run_training(settings, second_end)
            assert second.published and second.version != first.version, second.summary()
            published_at = time.monotonic()
            wait_until(lambda: det.engine.model_version == second.version, 30, "the detector to swap")
            swapped_at = time.monotonic()
            assert det.stats.records > 0

        stop.set()
        arch_thread.join(30)
        keys = [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])]
        parquet = [k for k in keys if k.startswith("archive/date=") and k.endswith(".parquet")]
        assert parquet and not [k for k in keys if k.startswith("archive/.archiver-tmp/") and k.endswith(".tmp")]
        assert f"registry/models/{second.version}/manifest.json" in keys and "registry/CURRENT" in keys
        assert [k for k in keys if k.startswith("registry/.staging/")] == ["registry/.staging/"]  # its marker only
        assert registry.pointers(settings.registry.uri).previous == first.version
        training = registry.manifest(settings.registry.uri, second.version)["metadata"]["training"]
        assert training["archive"] == f"s3://{BUCKET}/archive"
        assert training["readings"] == PLANT.n_assets * (HISTORY + MORE)
        wall = time.monotonic() - t0
        row = {"wall_s": round(wall, 1), "archive_s": round(archived_at - t0, 1),
               "first_training_s": round(trained_at - archived_at, 1),
               "second_training_s": round(published_at - trained_at, 1),
               "swap_after_publish_s": round(swapped_at - published_at, 2),
               "archive_files": len(parquet), "readings": training["readings"],
               "versions": [first.version, second.version]}
        faults.record("s3_archive_train_publish_swap", row)
        print(f"archive → train → publish → swap on S3 (moto): {row}")
    finally:
        stop.set()
        storage.configure(before)
        s3.close()


PLANT_START = 1_700_000_000_000
