"""Small, fast models shared by the unit tests of the TensorFlow parts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.bundle import ModelBundle
from pipeline.settings import Settings, load_settings

FEATURES = ("a", "b", "c")


def tiny_settings(**overrides: str) -> Settings:
    base = {"model.features": ",".join(FEATURES), "model.units": "8,4", "model.timesteps": "8",
            "model.chunks_per_run": "4", "model.streams": "8", "model.epochs": "4", "model.patience": "2",
            "grid.period_s": "1", "model.per_asset_heads": "true"}  # the unit tests cover the heads' path
    base.update(overrides)
    return load_settings(env={}, overrides=base)


def sine_frame(n: int, assets: tuple[str, ...] = ("p1",), seed: int = 0, start_ms: int = 1_700_000_000_000) -> pd.DataFrame:
    """Correlated periodic signals with noise, one row per asset per second."""
    rng = np.random.default_rng(seed)
    parts = []
    for k, asset in enumerate(assets):
        t = np.arange(n)
        base = np.sin(2 * np.pi * t / 40 + k)
        parts.append(pd.DataFrame({
            "asset": asset, "ts": start_ms + t * 1000,
            "a": 10 + k + base + 0.05 * rng.normal(size=n),
            "b": 2 * base + 0.05 * rng.normal(size=n),
            "c": 100 + 5 * np.cos(2 * np.pi * t / 40 + k) + 0.2 * rng.normal(size=n),
        }))
    return pd.concat(parts).sort_values(["ts", "asset"]).reset_index(drop=True)


@pytest.fixture(scope="session")
def tiny_bundle() -> ModelBundle:
    from pipeline.fit import fit_bundle
    from pipeline.tables import frame_to_batch

    settings = tiny_settings()
    frame = sine_frame(600, assets=("p1", "p2"))
    bundle, _ = fit_bundle(frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset"), settings)
    return bundle
