"""Calibration that holds out of sample: a wide, short history must not leave a fresh normal
recording of the same process under alert."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.fit as fit_module
from pipeline.evaluation import Series, labelled_file, run_lstm
from tests.unit.conftest import tiny_settings

N_FEATURES = 40


def _latent_process(n: int, rng: np.random.Generator, loadings: np.ndarray, start_ms: int) -> Series:
    """40 sensors driven by 4 slow common factors plus their own noise, one row per second."""
    t = np.arange(n)
    factors = np.column_stack([np.sin(2 * np.pi * t / p + k) for k, p in enumerate((50, 70, 90, 130))])
    values = factors @ loadings.T + 0.3 * rng.normal(size=(n, N_FEATURES))
    return Series("plant", start_ms + t * 1000, values)


def _normal_share_of_fresh_recording(alone_factor: str = "1") -> float:
    """Share of the fresh recording's rows under alert; by default each term alone is judged at
    its own level (``threshold.alone_factor`` 1), so the novelty term's calibration shows by itself."""
    rng = np.random.default_rng(7)
    loadings = rng.normal(size=(N_FEATURES, 4))
    history = _latent_process(400, rng, loadings, 0)
    fresh = _latent_process(1500, rng, loadings, 10_000_000)
    rows = np.vstack([history.values, fresh.values])
    ts = np.concatenate([history.ts_ms, fresh.ts_ms])
    f = labelled_file(Series("plant", ts, rows), np.zeros(len(ts)), None, 400)
    features = ",".join(f"s{k}" for k in range(N_FEATURES))
    settings = tiny_settings(**{"model.features": features, "model.epochs": "3", "model.per_asset_heads": "false",
                                 "threshold.alone_factor": alone_factor})
    run = run_lstm([f], settings, "per_file")
    return float(run.predicted["plant"][400:].mean())


def test_novelty_levels_from_blocked_cross_validation_keep_a_fresh_normal_recording_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_module, "EXCURSION_STRETCH", False)  # the cross-validation's effect alone
    calibrated_out_of_fold = _normal_share_of_fresh_recording()
    monkeypatch.setattr(fit_module, "NOVELTY_FOLDS", 1)  # one block: levels from the map's own training steps
    calibrated_in_sample = _normal_share_of_fresh_recording()
    assert calibrated_out_of_fold <= 0.05
    assert calibrated_in_sample > calibrated_out_of_fold + 0.1


def test_a_fresh_normal_recording_stays_quiet_with_the_default_settings() -> None:
    from pipeline.settings import ThresholdSettings

    assert _normal_share_of_fresh_recording(str(ThresholdSettings().alone_factor)) <= 0.05


def test_levels_stretch_only_where_the_history_holds_too_few_independent_excursions() -> None:
    from pipeline.thresholds import excursion_factor, feature_quantile

    q = feature_quantile(0.995, 8)  # 1 - 0.005 / 8: reached with about 1600 independent values
    # 400 steps of a slow EWMA (alpha 0.05) hold about 10 independent values
    assert excursion_factor(400, 0.05, q) == pytest.approx(np.sqrt(np.log(1600) / np.log1p(400 * 0.05 / 1.95)))
    assert excursion_factor(400, 0.05, q) > excursion_factor(4000, 0.05, q) > 1.0
    assert excursion_factor(400, 0.3, q) < excursion_factor(400, 0.05, q)  # a fast EWMA has more of them
    assert excursion_factor(1_000_000, 0.3, q) == 1.0  # the sample reaches the quantile: no stretch


def test_the_training_window_follows_the_length_of_the_history() -> None:
    from pipeline.fit import history_timesteps

    assert history_timesteps(32, np.array([320, 320, 0])) == 16  # a 400-row recording, 20 % held out
    assert history_timesteps(32, np.array([19_000])) == 32       # never longer than configured
    assert history_timesteps(32, np.array([60])) == 8            # never shorter than 8 steps


def _share_after_an_unseen_load_change(adapt_alpha: str | None = None) -> list[float]:
    """The simulated plant (3 pumps, seed 1) fitted on its first 75 minutes, then its next hour,
    in which each pump moves to a load the fit never saw, over a few minutes."""
    from pipeline.evaluation import concat_batches, replay, rows_in_alerts, series_batch, series_from_frame
    from pipeline.fit import fit_bundle
    from pipeline.simulate import PlantConfig, PlantSimulator

    minute, t0 = 60_000, 1_767_225_600_000
    plant = PlantConfig(n_assets=3, period_ms=1000, seed=1)
    frame = PlantSimulator(plant).frame(t0, t0 + 135 * minute)
    features = list(plant.features)

    def series(lo: int, hi: int) -> list[Series]:
        part = frame[(frame.ts_ms >= lo) & (frame.ts_ms < hi)]
        return [series_from_frame(g, a, features, "ts_ms") for a, g in part.groupby("asset")]

    overrides = {"model.features": ",".join(features), "model.per_asset_heads": "false"}
    settings = tiny_settings(**overrides, **({"threshold.adapt_alpha": adapt_alpha} if adapt_alpha else {}))
    bundle, _ = fit_bundle(concat_batches([series_batch(s, features) for s in series(t0, t0 + 75 * minute)]),
                           settings)
    test = series(t0 + 75 * minute, t0 + 135 * minute)
    traces = replay(bundle, settings.grid, test)
    return [float(rows_in_alerts(s.ts_ms, traces[s.name].spans, bundle.period_ms).mean()) for s in test]


def test_the_online_adaptation_learns_a_load_change_approached_over_minutes() -> None:
    """Why the adaptation forgets in steps (500 at the default weight), not hours: remembering
    8 hours at one reading a second (a weight of 1/28,800) found more slowly building SKAB faults,
    but left most of this normal hour under alert."""
    assert max(_share_after_an_unseen_load_change()) <= 0.05  # the default weight
    assert min(_share_after_an_unseen_load_change(str(1 / 28_800))) >= 0.3
