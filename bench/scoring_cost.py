"""Scoring cost per reading: carried LSTM state (one step per asset per call) against
recomputing each asset's whole window from a zero state, both batched over the fleet; the whole
engine (grid, score, thresholds, alerts); and a naive peer that calls Keras ``predict`` on a
64-step window for every reading (``naive_over_engine``: its cost over the engine's). The
recompute runs the product's own multi-step call (LiteRT, step by step) and, beside it,
TensorFlow's masked sequence model (``recompute_tensorflow_over_carried``).

    python -m bench.scoring_cost [--assets 1000] [--repeats 30]

Prints one JSON object; compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from pipeline.settings import DetectorSettings
from pipeline.tf_threads import limit_tf_threads

# The benchmarks that import this module measure the detector's engine in their own process:
# TensorFlow gets the detector's threads, as `plantwatch detect` sets them, before it starts.
limit_tf_threads(DetectorSettings().tf_threads)

from pipeline.bundle import ModelBundle, Scaler, ThresholdParams  # noqa: E402
from pipeline.engine import DetectionEngine  # noqa: E402
from pipeline.grid import GridConfig, GridSteps  # noqa: E402
from pipeline.model import StepFunction, build_inference_model  # noqa: E402
from pipeline.readings import DecodedBatch  # noqa: E402
from pipeline.scoring import score_steps  # noqa: E402
from pipeline.settings import GridSettings, PUMP_FEATURES, ThresholdSettings  # noqa: E402
from pipeline.state import FleetState  # noqa: E402

UNITS = (64, 32)
TIMESTEPS = 32


def random_bundle(n_features: int, seed: int = 0) -> ModelBundle:
    """A bundle with random weights of the production shape (cost does not depend on training)."""
    model = build_inference_model(n_features, UNITS)
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()]
    f = n_features
    one = np.ones(f)
    p = ThresholdParams.from_settings(ThresholdSettings(), normal_mean=0.5, normal_std=0.1)
    return ModelBundle("bench", PUMP_FEATURES[:f], 1000, TIMESTEPS, UNITS, TIMESTEPS, Scaler(np.zeros(f), one),
                       one, np.zeros((2 * f, f)), one, one * 100, one * 3, one * 3, p, weights)


NAIVE_WINDOW = 64


def _naive_peer(n_features: int) -> Any:
    """The peer a first implementation would write: a 64-step window per asset and the Keras
    model's ``predict`` on it for every reading (same layers; cost does not depend on weights)."""
    import keras

    return keras.Sequential([keras.Input((NAIVE_WINDOW, n_features)), keras.layers.LSTM(UNITS[0], return_sequences=True),
                             keras.layers.LSTM(UNITS[1]), keras.layers.Dense(n_features)])


def _best(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(n_assets: int, repeats: int) -> dict[str, Any]:
    f = len(PUMP_FEATURES)
    bundle = random_bundle(f)
    rng = np.random.default_rng(1)
    names = np.array([f"a{i:06d}" for i in range(n_assets)], dtype=object)

    state = FleetState(GridConfig(1000, 0, 10**9, 5, 30, f), UNITS, f, history=TIMESTEPS)
    model = StepFunction(f, UNITS, bundle.weights)
    step = [0]
    # Readings drawn before timing (drawing 8,000 normals costs about 5 % of a step), in turn.
    readings = rng.normal(size=(16, n_assets, f))

    def carried() -> None:
        step[0] += 1
        steps = GridSteps(names, np.full(n_assets, step[0]), readings[step[0] % len(readings)],
                          np.zeros(n_assets, bool), np.ones(n_assets, np.int32), np.arange(n_assets))
        score_steps(state, model, bundle, steps)

    window = rng.normal(size=(n_assets, TIMESTEPS, f)).astype(np.float32)
    mask = np.ones((n_assets, TIMESTEPS), bool)
    zeros = model.zero_states(n_assets)

    def recompute() -> None:  # the product's own multi-step call: LiteRT step by step (converted above)
        model(window, mask, zeros)

    on_tensorflow = StepFunction(f, UNITS, bundle.weights)  # never stepped, so never converted

    def recompute_on_tensorflow() -> None:  # TensorFlow's masked sequence model (the call before LiteRT took it)
        on_tensorflow(window, mask, zeros)

    engine = DetectionEngine(bundle, GridSettings(allowed_lateness_s=0))
    t0 = [1_700_000_000_000]

    def full_path() -> None:
        t0[0] += 1000
        n = n_assets * f
        engine.process(DecodedBatch(np.repeat(np.arange(n_assets), f), np.repeat(names, f), np.full(n, t0[0]),
                                    np.tile(np.arange(f, dtype=np.int32), n_assets),
                                    readings[t0[0] // 1000 % len(readings)].ravel(), [], n_assets))

    naive = _naive_peer(f)
    one = rng.normal(size=(1, NAIVE_WINDOW, f)).astype(np.float32)

    def naive_reading() -> None:
        naive.predict(one, verbose=0)

    # The fleet's steps are timed once scored: its first ``warmup_steps`` only advance the state.
    scored = bundle.warmup_steps + 1
    carried_s = _best(carried, repeats, scored)
    recompute_s = _best(recompute, repeats)
    recompute_tf_s = _best(recompute_on_tensorflow, repeats)
    full_s = _best(full_path, repeats, scored)
    naive_s = _best(naive_reading, max(5, repeats // 3))
    return {
        "assets": n_assets, "features": f, "units": list(UNITS), "window": TIMESTEPS,
        "carried_state_us_per_reading": round(carried_s / n_assets * 1e6, 2),
        "window_recompute_us_per_reading": round(recompute_s / n_assets * 1e6, 2),
        "recompute_over_carried": round(recompute_s / carried_s, 2),
        "window_recompute_tensorflow_us_per_reading": round(recompute_tf_s / n_assets * 1e6, 2),
        "recompute_tensorflow_over_carried": round(recompute_tf_s / carried_s, 2),
        "full_engine_us_per_reading": round(full_s / n_assets * 1e6, 2),
        "naive_us_per_reading": round(naive_s * 1e6, 1),
        "naive_over_engine": round(naive_s / (full_s / n_assets), 1),
        "traces": model.tracing_count + on_tensorflow.tracing_count,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assets", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(json.dumps(measure(args.assets, args.repeats), indent=2))


if __name__ == "__main__":
    main()
