"""The plant simulator: determinism, exact slicing, plausible physics, labelled anomalies."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.simulate import (
    _THERMAL_TAU_MS,
    ANOMALY_KINDS,
    DEFAULT_FEATURES,
    Anomaly,
    PlantConfig,
    PlantSimulator,
    _daily,
    _keys,
    _regime,
    _wander,
    plan_anomalies,
)

T0 = 1_700_000_000_000          # on the 1 s grid
HOUR = 3_600_000
COLUMNS = ["asset", "ts_ms", *DEFAULT_FEATURES, "label"]


def hourly_plant(**overrides: object) -> PlantConfig:
    """A plant whose day lasts an hour with a regime change every 150 s, so short frames
    hold every kind of normal behaviour."""
    kw: dict[str, object] = {"n_assets": 4, "day_ms": HOUR, "regime_change_per_day": 24}
    kw.update(overrides)
    return PlantConfig(**kw)  # type: ignore[arg-type]


def rows(df: pd.DataFrame, asset: str) -> pd.DataFrame:
    return df[df["asset"] == asset].reset_index(drop=True)


def noise_sd(x: np.ndarray) -> float:
    """Measurement-noise sd estimated from first differences (slow latents cancel)."""
    return float(np.std(np.diff(x)) / math.sqrt(2.0))


# --- shape -------------------------------------------------------------------------------


def test_frame_has_one_row_per_asset_per_period_in_ts_then_asset_order() -> None:
    df = PlantSimulator(hourly_plant(n_assets=3)).frame(T0, T0 + 5_000)

    assert list(df.columns) == COLUMNS
    assert str(df["asset"].dtype) == "str"
    assert df["ts_ms"].dtype == np.int64 and df["label"].dtype == np.int8
    assert all(df[f].dtype == np.float64 for f in DEFAULT_FEATURES)
    assert df["ts_ms"].tolist() == [T0 + 1000 * k for k in range(5) for _ in range(3)]
    assert df["asset"].tolist() == ["pump-000", "pump-001", "pump-002"] * 5
    assert df["label"].sum() == 0
    assert df.index.equals(pd.RangeIndex(15))


def test_assets_sort_by_name_even_past_999() -> None:
    df = PlantSimulator(PlantConfig(n_assets=1001, asset_prefix="p")).frame(T0, T0 + 2_000)

    assert len(df) == 2002
    first_step = df["asset"].tolist()[:1001]
    assert first_step == sorted(first_step)
    assert first_step.index("p1000") == first_step.index("p100") + 1
    assert df.equals(df.sort_values(["ts_ms", "asset"], ignore_index=True))


def test_range_off_the_grid_takes_the_grid_steps_inside_it() -> None:
    df = PlantSimulator(hourly_plant(n_assets=1)).frame(T0 + 1, T0 + 3_001)
    assert df["ts_ms"].tolist() == [T0 + 1000, T0 + 2000, T0 + 3000]


def test_empty_range_gives_empty_frame_with_the_columns() -> None:
    df = PlantSimulator(hourly_plant()).frame(T0, T0)
    assert len(df) == 0 and list(df.columns) == COLUMNS
    assert df["ts_ms"].dtype == np.int64 and df["Current"].dtype == np.float64


# --- determinism and slicing -----------------------------------------------------------------


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a = PlantSimulator(hourly_plant(seed=7)).frame(T0, T0 + 300_000)
    b = PlantSimulator(hourly_plant(seed=7)).frame(T0, T0 + 300_000)
    c = PlantSimulator(hourly_plant(seed=8)).frame(T0, T0 + 300_000)

    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for f in DEFAULT_FEATURES:
        assert (a[f] != c[f]).mean() > 0.99


SLICE_PLANT = hourly_plant(n_assets=3, jitter_ms=300)
SLICE_SIM = PlantSimulator(
    SLICE_PLANT, plan_anomalies(SLICE_PLANT, T0, T0 + 900_000, per_asset=3, min_gap_steps=60))
SLICE_WHOLE = SLICE_SIM.frame(T0, T0 + 900_000)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=899_999), max_size=6))
def test_slices_concatenate_to_the_whole(cuts: list[int]) -> None:
    """Any cut points (on the grid or not, jitter on, anomalies on) give the same rows."""
    edges = [T0, *sorted(T0 + c for c in cuts), T0 + 900_000]
    parts = pd.concat([SLICE_SIM.frame(a, b) for a, b in zip(edges, edges[1:])], ignore_index=True)
    pd.testing.assert_frame_equal(parts, SLICE_WHOLE, check_exact=True)


def test_single_step_slices_equal_one_long_slice() -> None:
    assert SLICE_WHOLE["label"].sum() > 0  # the slices cross anomalies
    start = T0 + 400_000
    steps = [SLICE_SIM.frame(start + 1000 * k, start + 1000 * (k + 1)) for k in range(120)]
    whole = SLICE_SIM.frame(start, start + 120_000)
    pd.testing.assert_frame_equal(pd.concat(steps, ignore_index=True), whole, check_exact=True)


def test_an_asset_does_not_depend_on_how_many_assets_the_plant_has() -> None:
    small = PlantSimulator(hourly_plant(n_assets=3)).frame(T0, T0 + 60_000)
    large = PlantSimulator(hourly_plant(n_assets=7)).frame(T0, T0 + 60_000)
    pd.testing.assert_frame_equal(small, large[large["asset"] < "pump-003"].reset_index(drop=True))


def test_a_feature_subset_reads_the_same_sensors() -> None:
    subset = ("VolumeFlowRateRMS", "Current")
    full = PlantSimulator(hourly_plant()).frame(T0, T0 + 60_000)
    part = PlantSimulator(hourly_plant(features=subset)).frame(T0, T0 + 60_000)
    assert list(part.columns) == ["asset", "ts_ms", *subset, "label"]
    pd.testing.assert_frame_equal(part, full[list(part.columns)])


# --- normal behaviour -------------------------------------------------------------------------


NORMAL = PlantSimulator(hourly_plant()).history(T0, 3_600)


def test_load_driven_sensors_correlate() -> None:
    for asset in hourly_plant().asset_ids:
        corr = rows(NORMAL, asset)[list(DEFAULT_FEATURES)].corr()
        assert corr.loc["Current", "VolumeFlowRateRMS"] > 0.9
        assert corr.loc["Current", "Pressure"] > 0.9
        assert corr.loc["Current", "Accelerometer1RMS"] > 0.5


def test_temperature_follows_load_with_a_lag() -> None:
    for asset in hourly_plant().asset_ids:
        g = rows(NORMAL, asset)
        cur = g["Current"].to_numpy()
        temp = g["Temperature"].to_numpy()
        lags = np.arange(0, 601, 5)
        corr = [np.corrcoef(temp[lag:], cur[: len(cur) - lag])[0, 1] for lag in lags]
        best = int(lags[int(np.argmax(corr))])
        assert 30 <= best <= 300, best
        assert max(corr) > corr[0] + 0.1


def test_noise_sd_scales_with_noise_scale() -> None:
    """Doubling noise_scale adds exactly one more copy of the noise: Current's is 0.025 A."""
    one = PlantSimulator(hourly_plant(n_assets=10)).history(T0, 2_000)
    two = PlantSimulator(hourly_plant(n_assets=10, noise_scale=2.0)).history(T0, 2_000)
    noise = (two["Current"] - one["Current"]).to_numpy()
    assert abs(noise.std() - 0.025) < 0.0015
    assert abs(noise.mean()) < 0.001


def test_regime_changes_move_the_load_between_setpoints() -> None:
    """Each block holds one ramp to a different setpoint, flat outside the ramp."""
    block, ramp = 150_000, 30_000
    base = np.array([[0.8, 0.75]])
    t = np.arange(T0, T0 + 20 * block, 1000, dtype=np.int64)
    level, _ = _regime(_keys(0, 3, np.arange(2)), t, block, ramp, _THERMAL_TAU_MS, base)

    ends = level[(t % block) == block - 1000]            # last step of each block
    jumps = np.abs(np.diff(ends, axis=0))
    assert np.allclose(np.minimum(np.abs(jumps - 0.1), np.abs(jumps - 0.3)), 0.0, atol=1e-12)
    moving = (np.abs(np.diff(level, axis=0)) > 0).sum(axis=0)   # steps spent ramping
    assert ((moving >= 19 * 30) & (moving <= 21 * 31)).all()   # 20-21 ramps of 30 s, else flat


def test_regime_changes_are_normal_and_visible_in_current() -> None:
    calm = PlantSimulator(PlantConfig(n_assets=4, regime_change_per_day=0)).history(T0, 3_600)
    busy = PlantSimulator(PlantConfig(n_assets=4, regime_change_per_day=240)).history(T0, 3_600)
    assert calm["label"].sum() == 0 and busy["label"].sum() == 0
    for asset in PlantConfig(n_assets=4).asset_ids:
        spread = [rows(df, asset)["Current"].to_numpy().reshape(120, 30).mean(axis=1).std()
                  for df in (calm, busy)]
        assert spread[1] > 2 * spread[0]


# --- the thermal lag is the exact solution of tau * y' = u - y -----------------------------


def exact_step(u: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
    """y one step ahead for an input linear over each step of length h."""
    s = (u[1:] - u[:-1]) / h
    tau = _THERMAL_TAU_MS
    return u[:-1] + s * h - tau * s + (y[:-1] - u[:-1] + tau * s) * math.exp(-h / tau)


@pytest.mark.parametrize(("spacing", "sd"), [(600_000, 0.035), (90_000, 0.02)])
def test_wander_lag_solves_the_filter(spacing: int, sd: float) -> None:
    t = np.arange(T0, T0 + 2 * HOUR, 1000, dtype=np.int64)
    u, y = _wander(_keys(3, 4, np.arange(3)), t, spacing, sd, _THERMAL_TAU_MS)
    assert np.abs(exact_step(u, y, 1000.0) - y[1:]).max() < 1e-12
    assert np.abs(y - u).max() > 0.2 * sd      # it really lags


def test_regime_lag_solves_the_filter_through_ramps() -> None:
    t = np.arange(T0, T0 + 600_000, dtype=np.int64)   # 1 ms steps: every ramp kink on the grid
    u, y = _regime(_keys(3, 3, np.arange(3)), t, 75_000, 18_750, _THERMAL_TAU_MS,
                   np.array([[0.8, 0.7, 0.75]]))
    assert np.abs(exact_step(u, y, 1.0) - y[1:]).max() < 1e-12
    assert np.abs(y - u).max() > 0.05


def test_daily_lag_solves_the_filter() -> None:
    t = np.arange(T0, T0 + HOUR, 1000, dtype=np.int64)
    u, y = _daily(t, HOUR, np.array([[0.06]]), np.array([[0.3]]), _THERMAL_TAU_MS)
    assert np.abs(exact_step(u, y, 1000.0) - y[1:]).max() < 1e-9
    assert np.abs(y - u).max() > 0.01


# --- anomalies --------------------------------------------------------------------------------


W0, W1 = T0 + 300_000, T0 + 420_000     # a 120-step window
INJECTED = (
    Anomaly("pump-000", "spike", W0, W0 + 4_000, ("Pressure",)),
    Anomaly("pump-001", "drift", W0, W1, ("Temperature",)),
    Anomaly("pump-002", "stuck", W0, W1, ("Accelerometer1RMS",)),
    Anomaly("pump-003", "correlation_break", W0, W1, ("Current",)),
    Anomaly("pump-004", "noise_burst", W0, W1, ("VolumeFlowRateRMS",)),
)
ANOMALY_PLANT = hourly_plant(n_assets=6)
CLEAN = PlantSimulator(ANOMALY_PLANT).frame(T0, T0 + 600_000)
BROKEN = PlantSimulator(ANOMALY_PLANT, INJECTED).frame(T0, T0 + 600_000)


def window(df: pd.DataFrame, an: Anomaly) -> pd.DataFrame:
    g = rows(df, an.asset)
    return g[(g["ts_ms"] >= an.start_ms) & (g["ts_ms"] < an.end_ms)]


def test_anomalies_change_only_their_sensor_inside_their_window() -> None:
    affected = np.zeros((len(CLEAN), len(DEFAULT_FEATURES)), dtype=bool)
    for an in INJECTED:
        in_window = ((CLEAN["asset"] == an.asset) & (CLEAN["ts_ms"] >= an.start_ms)
                     & (CLEAN["ts_ms"] < an.end_ms)).to_numpy()
        affected[in_window, DEFAULT_FEATURES.index(an.sensors[0])] = True
    clean = CLEAN[list(DEFAULT_FEATURES)].to_numpy()
    broken = BROKEN[list(DEFAULT_FEATURES)].to_numpy()

    assert np.array_equal(clean[~affected], broken[~affected])
    assert (clean[affected] != broken[affected]).mean() > 0.99
    assert BROKEN[["asset", "ts_ms"]].equals(CLEAN[["asset", "ts_ms"]])


def test_labels_cover_exactly_the_anomaly_windows() -> None:
    expected = np.zeros(len(BROKEN), dtype=np.int8)
    for an in INJECTED:
        expected |= ((BROKEN["asset"] == an.asset) & (BROKEN["ts_ms"] >= an.start_ms)
                     & (BROKEN["ts_ms"] < an.end_ms)).to_numpy().astype(np.int8)
    assert expected.sum() == 4 + 4 * 120
    assert np.array_equal(BROKEN["label"].to_numpy(), expected)
    assert CLEAN["label"].sum() == 0


def kind_holds(an: Anomaly, clean: pd.DataFrame, broken: pd.DataFrame) -> bool:
    """The statistical signature each kind must leave on its sensor."""
    sensor = an.sensors[0]
    sigma = noise_sd(rows(clean, an.asset)[sensor].to_numpy())
    before = window(clean, an)[sensor].to_numpy()
    after = window(broken, an)[sensor].to_numpy()
    match an.kind:
        case "spike":
            return bool((np.abs(after - before) / sigma > 10).all())
        case "drift":
            end_offset = abs(after[-5:].mean() - before[-5:].mean()) / sigma
            start_offset = abs(after[:5].mean() - before[:5].mean()) / sigma
            return end_offset > 4 and start_offset < 2
        case "stuck":
            g = rows(clean, an.asset)
            last = g.loc[g["ts_ms"] < an.start_ms, sensor].iloc[-1]
            return bool((after == last).all())
        case "noise_burst":
            return bool(np.std(np.diff(after)) > 3 * np.std(np.diff(before)))
        case _:
            partner = "VolumeFlowRateRMS" if sensor == "Current" else "Current"
            was = np.corrcoef(before, window(clean, an)[partner])[0, 1]
            now = np.corrcoef(after, window(broken, an)[partner])[0, 1]
            whole = rows(clean, an.asset)[sensor]
            plausible = abs(after.mean() - whole.mean()) < 3 * whole.std()
            steady = 0.5 < np.std(np.diff(after)) / np.std(np.diff(before)) < 2
            return bool(was > 0.5 and now < was - 0.3 and plausible and steady)


@pytest.mark.parametrize("an", INJECTED, ids=[a.kind for a in INJECTED])
def test_each_kind_leaves_its_signature(an: Anomaly) -> None:
    assert kind_holds(an, CLEAN, BROKEN)


def test_every_planned_anomaly_leaves_its_signature() -> None:
    cfg = hourly_plant(n_assets=15, seed=5)
    plan = plan_anomalies(cfg, T0, T0 + 1_200_000, per_asset=2, min_gap_steps=300)
    clean = PlantSimulator(cfg).frame(T0, T0 + 1_200_000)
    broken = PlantSimulator(cfg, plan).frame(T0, T0 + 1_200_000)
    assert {an.kind for an in plan} == set(ANOMALY_KINDS)
    assert [an for an in plan if not kind_holds(an, clean, broken)] == []


def test_stuck_value_comes_from_the_step_before_even_in_another_slice() -> None:
    stuck = INJECTED[2]
    sim = PlantSimulator(ANOMALY_PLANT, INJECTED)
    inside = rows(sim.frame(W0 + 50_000, W0 + 51_000), stuck.asset)["Accelerometer1RMS"].iloc[0]
    before = rows(CLEAN, stuck.asset)
    assert inside == before.loc[before["ts_ms"] == W0 - 1000, "Accelerometer1RMS"].iloc[0]


def test_history_ignores_anomalies() -> None:
    sim = PlantSimulator(ANOMALY_PLANT, INJECTED)
    pd.testing.assert_frame_equal(sim.history(T0, 600), CLEAN, check_exact=True)


def test_simulator_rejects_anomalies_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="unknown asset"):
        PlantSimulator(ANOMALY_PLANT, [Anomaly("pump-999", "spike", W0, W1, ("Current",))])
    with pytest.raises(ValueError, match="not in features"):
        PlantSimulator(hourly_plant(features=("Current",)),
                       [Anomaly("pump-000", "spike", W0, W1, ("Pressure",))])


# --- jitter -------------------------------------------------------------------------------------


def test_jitter_stays_inside_the_reading_period() -> None:
    cfg = hourly_plant(n_assets=5, jitter_ms=400)
    df = PlantSimulator(cfg).frame(T0, T0 + 200_000)
    offset = df["ts_ms"].to_numpy() % 1000

    assert offset.min() == 0 and offset.max() == 400
    assert len(np.unique(offset)) > 300
    per_step = df.groupby([df["asset"], df["ts_ms"] // 1000]).size()
    assert len(per_step) == 5 * 200 and (per_step == 1).all()
    assert df.equals(df.sort_values(["ts_ms", "asset"], ignore_index=True))
    plain = PlantSimulator(hourly_plant(n_assets=5)).frame(T0, T0 + 200_000)
    by_step = df.assign(step=df["ts_ms"] // 1000).sort_values(["step", "asset"], ignore_index=True)
    assert np.array_equal(by_step[list(DEFAULT_FEATURES)].to_numpy(),
                          plain[list(DEFAULT_FEATURES)].to_numpy())


def test_config_rejects_jitter_of_half_a_period_or_more() -> None:
    with pytest.raises(ValueError, match="jitter_ms"):
        PlantConfig(jitter_ms=500)
    with pytest.raises(ValueError, match="jitter_ms"):
        PlantConfig(jitter_ms=-1)


def test_config_rejects_unknown_or_repeated_features() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        PlantConfig(features=("Current", "Humidity"))
    with pytest.raises(ValueError, match="unique"):
        PlantConfig(features=("Current", "Current"))


# --- the anomaly schedule ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n_assets=st.integers(1, 6), per_asset=st.integers(1, 4), gap=st.integers(0, 300),
       offset=st.integers(0, 5_000), slack=st.integers(0, 2_000), seed=st.integers(0, 2**40))
def test_plan_keeps_gaps_and_stays_in_range(n_assets: int, per_asset: int, gap: int,
                                            offset: int, slack: int, seed: int) -> None:
    cfg = PlantConfig(n_assets=n_assets, seed=seed)
    start = T0 + offset
    end = start + 1000 * (per_asset * (gap + 120) + slack)
    plan = plan_anomalies(cfg, start, end, per_asset=per_asset, min_gap_steps=gap)

    assert len(plan) == n_assets * per_asset
    assert plan == sorted(plan, key=lambda a: (a.start_ms, a.asset))
    first_step = -(-start // 1000)
    for asset in cfg.asset_ids:
        mine = [a for a in plan if a.asset == asset]
        assert len(mine) == per_asset
        assert mine[0].start_ms >= (first_step + gap) * 1000
        assert mine[-1].end_ms <= end
        for prev, nxt in zip(mine, mine[1:]):
            assert nxt.start_ms - prev.end_ms >= gap * 1000
    for an in plan:
        steps = (an.end_ms - an.start_ms) // 1000
        assert an.start_ms % 1000 == 0 and an.end_ms % 1000 == 0
        assert 3 <= steps <= 5 if an.kind == "spike" else 30 <= steps <= 120
        assert len(an.sensors) == 1 and an.sensors[0] in DEFAULT_FEATURES
        if an.kind == "correlation_break":
            assert an.sensors[0] in ("Current", "VolumeFlowRateRMS")


def test_plan_is_deterministic_and_seeded() -> None:
    cfg = PlantConfig(n_assets=5)
    a = plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=2)
    assert a == plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=2)
    assert a == plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=2, seed=0)
    assert a != plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=2, seed=1)
    assert sorted(an.kind for an in a) == sorted(ANOMALY_KINDS * 2)


def test_plan_honours_kinds_and_durations() -> None:
    cfg = PlantConfig(n_assets=4)
    plan = plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=3, kinds=("drift", "spike"),
                          duration_steps=(10, 12), spike_steps=(7, 7))
    assert {an.kind for an in plan} == {"drift", "spike"}
    for an in plan:
        steps = (an.end_ms - an.start_ms) // 1000
        assert steps == 7 if an.kind == "spike" else 10 <= steps <= 12
    assert plan_anomalies(cfg, T0, T0 + 3_600_000, per_asset=0) == []


def test_plan_refuses_what_it_cannot_schedule() -> None:
    cfg = PlantConfig(n_assets=2)
    with pytest.raises(ValueError, match="too short"):
        plan_anomalies(cfg, T0, T0 + 300_000, per_asset=1, min_gap_steps=200,
                       duration_steps=(120, 120))
    with pytest.raises(ValueError, match="kinds"):
        plan_anomalies(cfg, T0, T0 + 3_600_000, kinds=("flood",))
    with pytest.raises(ValueError, match="correlation_break"):
        plan_anomalies(PlantConfig(features=("Current", "Temperature")), T0, T0 + 3_600_000)
    two = plan_anomalies(PlantConfig(features=("Current", "Pressure")), T0, T0 + 3_600_000,
                         kinds=("correlation_break",))
    assert {an.sensors[0] for an in two} <= {"Current", "Pressure"}


# --- anomaly records --------------------------------------------------------------------------


def test_anomaly_round_trips_through_json() -> None:
    an = Anomaly("pump-003", "correlation_break", W0, W1, ("Current", "Pressure"))
    d = json.loads(json.dumps(an.to_dict()))
    assert d == {"asset": "pump-003", "kind": "correlation_break", "start_ms": W0,
                 "end_ms": W1, "sensors": ["Current", "Pressure"]}
    assert Anomaly.from_dict(d) == an


@pytest.mark.parametrize("bad", [
    {"kind": "flood"},
    {"end_ms": W0},
    {"sensors": []},
    {"sensors": "Current"},
    {"start_ms": "1"},
    {"start_ms": True},
])
def test_anomaly_rejects_malformed_records(bad: dict[str, object]) -> None:
    d: dict[str, object] = {"asset": "pump-000", "kind": "spike", "start_ms": W0,
                            "end_ms": W0 + 3000, "sensors": ["Current"], **bad}
    with pytest.raises(ValueError):
        Anomaly.from_dict(d)


# --- cost ---------------------------------------------------------------------------------------


def test_large_slices_are_cheap() -> None:
    """100 assets x 10,000 steps and 10,000 assets x 1 step: vectorised, not per row."""
    wide = PlantSimulator(PlantConfig(n_assets=10_000))
    wide.frame(T0, T0 + 1000)
    began = time.process_time()
    assert len(PlantSimulator(PlantConfig(n_assets=100)).frame(T0, T0 + 10_000_000)) == 1_000_000
    assert time.process_time() - began < 2.0
    began = time.process_time()
    assert len(wide.frame(T0 + 1000, T0 + 2000)) == 10_000
    assert time.process_time() - began < 0.2
