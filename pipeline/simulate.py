"""A seeded, deterministic simulator of a plant of pumps, with labelled injected anomalies.

Every value is a pure function of (config, asset, time): random components come from a
counter-based hash of (seed, stream, asset, counter), never from a stateful generator, so
any slice of time is produced on its own and consecutive slices concatenate exactly — a
producer can emit a live plant in small real-time slices and a trainer can ask for a year
of history without either one simulating from an origin.

Physics, per asset, driven by a few latents so the sensors are correlated:

* load = regime setpoint + daily demand cycle + slow and medium wander + fast process
  fluctuation. The setpoint moves (with a 30 s ramp) to another level about
  ``regime_change_per_day`` times a day; that is normal operation, never labelled.
* Current, flow, pressure and vibration follow the load (affinity laws: flow ~ speed,
  pressure and vibration ~ speed²); the shared fast fluctuation keeps them correlated
  even over a minute.
* Temperature follows the load without its fast fluctuation (the thermal mass filters
  it) through a first-order thermal lag.
* Thermocouple reads the plant's ambient temperature (daily cycle + wander); Voltage is the
  plant's mains voltage minus a drop proportional to the asset's current.
* Each asset draws its own operating point (base load, gains, offsets) from the seed.

Anomalies are applied on top of the normal readings, only to their sensors and steps:
``spike``/``drift`` add an offset, ``stuck`` repeats the reading of the step before,
``noise_burst`` adds independent noise, ``correlation_break`` swaps the sensor's signal
for one driven by independent load wander with the setpoint held, keeping its own noise.
Magnitudes are in units of the sensor's short-term sd (noise and fast fluctuation), so
they stand out from what the sensor does step to step.

Wander components are piecewise-linear interpolations of hashed random knots; the
setpoint is piecewise linear too. The thermal lag is therefore computed in *closed form*:
for a piecewise-linear input u, the RC filter ``tau * y' = u - y`` has the exact solution
``y = u - tau * u' + tau * sum_k dslope_k * exp(-(t - t_k) / tau)`` over past kinks t_k.
Kinks older than 30 time constants (weight below e^-30) are dropped, so the lag is exact to
~1e-13 and still a pure function of time: continuous across any slice boundary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa


from pipeline.settings import PUMP_FEATURES

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
HashArray = npt.NDArray[np.uint64]

DEFAULT_FEATURES: tuple[str, ...] = PUMP_FEATURES  # the water-pump rig's 8 sensors (as in SKAB)
ANOMALY_KINDS: tuple[str, ...] = ("spike", "drift", "stuck", "correlation_break", "noise_burst")

# Measurement noise sd per sensor (units of the sensor), in DEFAULT_FEATURES order.
_NOISE_SD: Final[tuple[float, ...]] = (0.004, 0.005, 0.025, 0.008, 0.08, 0.05, 0.35, 0.35)
# Sensors driven by the instantaneous load: one can decouple from the others.
_LOAD_DRIVEN: Final[tuple[str, ...]] = (
    "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "VolumeFlowRateRMS")
_BREAK_PAIR: Final[tuple[str, str]] = ("Current", "VolumeFlowRateRMS")

_THERMAL_TAU_MS: Final = 180_000.0   # thermal time constant of a pump body
_RAMP_MS: Final = 30_000             # how long a setpoint change takes
_LEVEL_SPREAD: Final = 0.1           # distance between neighbouring load setpoints
_LAG_HORIZON: Final = 30.0           # kinks older than this many time constants are dropped
# (knot spacing ms, sd) of the load's wander: slow and medium are thermally lagged, fast is not
_LOAD_SLOW: Final = (600_000, 0.035)
_LOAD_MID: Final = (90_000, 0.02)
_LOAD_FAST: Final = (2_000, 0.025)
# Sensitivity of each sensor to the load at the nominal operating point (DEFAULT_FEATURES order)
_LOAD_GAIN: Final[tuple[float, ...]] = (0.22, 0.27, 2.0, 0.78, 0.0, 0.0, 1.6, 40.0)
_AMBIENT_WANDER: Final = (1_800_000, 0.4)
_MAINS_WANDER: Final = (300_000, 1.0)

# Anomaly magnitudes, uniform in (low, high), in units of a sensor's short-term sd: its
# measurement noise and the fast load fluctuation it sees, so an anomaly stands out from
# what the sensor does step to step, not just from its noise.
_SPIKE_SD: Final = (15.0, 20.0)      # excursion: an order of magnitude above the short-term spread
_DRIFT_SD: Final = (6.0, 9.0)        # offset reached at the end of the window
_BURST_FACTOR: Final = (5.0, 8.0)    # short-term sd multiplier

# Per-asset operating point: name -> uniform range.
_PARAM_RANGES: Final[dict[str, tuple[float, float]]] = {
    "load_base": (0.72, 0.84),
    "daily_amp": (0.04, 0.08),
    "daily_phase": (-0.3, 0.3),
    "vib1_0": (0.10, 0.14),
    "vib1_g": (0.12, 0.16),
    "vib2_0": (0.14, 0.18),
    "vib2_g": (0.15, 0.19),
    "cur_0": (0.4, 0.6),
    "cur_g": (1.8, 2.2),
    "pres_0": (0.04, 0.08),
    "pres_g": (0.45, 0.55),
    "temp_0": (58.0, 64.0),
    "temp_g": (30.0, 36.0),
    "amb_off": (-1.5, 1.5),
    "volt_r": (0.6, 1.0),
    "flow_g": (36.0, 44.0),
}

_MASK64: Final = (1 << 64) - 1
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)
_PLANT: Final = -1                    # asset id of plant-wide latents (ambient, mains)
_ALT_SALT: Final = 1000               # stream offset of the independent trajectory of a break


class _Stream(IntEnum):
    """Independent random streams; each is hashed with (seed, asset, counter)."""

    PARAMS = 1
    NOISE = 2
    REGIME = 3
    LOAD_SLOW = 4
    LOAD_MID = 5
    LOAD_FAST = 6
    AMBIENT = 7
    MAINS = 8
    JITTER = 9
    ANOMALY = 10
    PLAN = 11
    BURST = 12


@dataclass(frozen=True)
class PlantConfig:
    """Shape of the simulated plant; with a seed it fixes every value the plant produces."""

    n_assets: int = 10
    features: tuple[str, ...] = DEFAULT_FEATURES
    period_ms: int = 1000
    seed: int = 0
    day_ms: int = 86_400_000
    regime_change_per_day: float = 2.0
    noise_scale: float = 1.0
    asset_prefix: str = "pump-"
    jitter_ms: int = 0

    def __post_init__(self) -> None:
        if self.n_assets < 1:
            raise ValueError(f"n_assets must be >= 1, got {self.n_assets}")
        if self.period_ms < 1 or self.day_ms < 1:
            raise ValueError("period_ms and day_ms must be >= 1")
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be non-empty and unique, got {self.features}")
        unknown = [f for f in self.features if f not in DEFAULT_FEATURES]
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {DEFAULT_FEATURES}")
        if self.regime_change_per_day < 0 or self.noise_scale < 0:
            raise ValueError("regime_change_per_day and noise_scale must be >= 0")
        if not 0 <= 2 * self.jitter_ms < self.period_ms:
            raise ValueError(f"jitter_ms must be in [0, period_ms/2), got {self.jitter_ms}")

    @property
    def asset_ids(self) -> tuple[str, ...]:
        """Asset ids in index order."""
        return tuple(f"{self.asset_prefix}{i:03d}" for i in range(self.n_assets))


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly: ``sensors`` of ``asset`` misbehave on [start_ms, end_ms)."""

    asset: str
    kind: str
    start_ms: int
    end_ms: int
    sensors: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {self.kind!r}; known: {ANOMALY_KINDS}")
        if self.end_ms <= self.start_ms:
            raise ValueError(f"anomaly window is empty: [{self.start_ms}, {self.end_ms})")
        if not isinstance(self.sensors, tuple) or not self.sensors:
            raise ValueError("sensors must be a non-empty tuple")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (sensors as a list)."""
        return {"asset": self.asset, "kind": self.kind, "start_ms": self.start_ms,
                "end_ms": self.end_ms, "sensors": list(self.sensors)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Anomaly:
        """Inverse of :meth:`to_dict`; rejects wrongly typed fields instead of coercing them."""
        sensors = d["sensors"]
        if not isinstance(sensors, (list, tuple)) or not all(isinstance(s, str) for s in sensors):
            raise ValueError(f"sensors must be a list of str, got {sensors!r}")
        return cls(asset=_as_str(d["asset"]), kind=_as_str(d["kind"]),
                   start_ms=_as_int(d["start_ms"]), end_ms=_as_int(d["end_ms"]),
                   sensors=tuple(sensors))


def _as_str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a str, got {v!r}")
    return v


def _as_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an int, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# Counter-based randomness: splitmix64 finaliser over (key, counter), vectorised.


def _mix(z: HashArray) -> HashArray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _keys(seed: int, stream: int, ids: IntArray) -> HashArray:
    """One key per id, shape (1, n), so draws broadcast against an (S, 1) counter column."""
    head = _mix(np.array([seed & _MASK64], dtype=np.uint64) + _GOLDEN)
    head = _mix(head ^ np.uint64(stream))
    ids64 = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
    return _mix(head + ids64 * _GOLDEN)[None, :]


def _hash(key: HashArray, counter: IntArray) -> HashArray:
    c = np.ascontiguousarray(counter, dtype=np.int64).view(np.uint64)
    return _mix(key + c * _GOLDEN)


def _unit(h: HashArray) -> FloatArray:
    """Uniform in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _normals(h: HashArray) -> tuple[FloatArray, FloatArray]:
    """Two independent standard normals per hash (Box-Muller on its 32-bit halves).

    The angle's sine and cosine are taken in float32: ten times faster than float64 here,
    and a 1e-7 relative error is irrelevant for noise.
    """
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    angle = (h & np.uint64(0xFFFFFFFF)).astype(np.float32) * np.float32(2.0 * np.pi * 2.0**-32)
    r = np.sqrt(-2.0 * np.log(u1))
    return r * np.cos(angle), r * np.sin(angle)


# ---------------------------------------------------------------------------------------
# Latent processes, time-major. ``key`` is (1, A), ``t`` is an ascending (S,) int64 array
# of ms; each returns (value, thermally lagged value), both (S, A).


def _wander(key: HashArray, t: IntArray, spacing: int, sd: float,
            tau: float = 0.0) -> tuple[FloatArray, FloatArray]:
    """Piecewise-linear interpolation of N(0, sd²) knots every ``spacing`` ms, and its lag.

    ``tau == 0`` means no lag (the lagged value is the value itself).
    """
    j = t // spacing
    j_lo, j_hi = int(j[0]), int(j[-1])
    history = math.ceil(_LAG_HORIZON * tau / spacing) + 1 if tau > 0 else 0
    first = j_lo - history
    knots = sd * _normals(_hash(key, np.arange(first, j_hi + 2, dtype=np.int64)[:, None]))[0]
    slope = np.diff(knots, axis=0) / spacing          # segment m starts at knot first + m
    seg = j - first
    since = (t - j * spacing).astype(np.float64)[:, None]   # ms since the segment began
    s = slope[seg]
    value = knots[seg] + s * since
    if tau <= 0:
        return value, value
    kink = slope[1:] - slope[:-1]                     # slope change at knot first + 1 + m
    w = math.exp(-spacing / tau)
    n_seg = j_hi - j_lo + 1
    carried = np.zeros((n_seg, knots.shape[1]))       # transient sum at each knot j_lo..j_hi
    for i in range(history):
        carried += kink[history - 1 - i: history - 1 - i + n_seg] * w**i
    lagged = value - tau * s + tau * np.exp(-since / tau) * carried[j - j_lo]
    return value, lagged


def _regime(key: HashArray, t: IntArray, block: int, ramp: int, tau: float,
            base: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Load setpoint: one ramped change per block of ``block`` ms, and its lag.

    The level index alternates parity between blocks (0/2 then 1/3), so each change moves
    to a *different* setpoint without any state carried from earlier blocks.
    """
    b = t // block
    b_lo, b_hi = int(b[0]), int(b[-1])
    history = math.ceil(_LAG_HORIZON * tau / block) + 1
    first = b_lo - history - 1                        # one more block: the level before
    blocks = np.arange(first, b_hi + 1, dtype=np.int64)[:, None]
    h = _hash(key, blocks)
    index = 2 * (h & np.uint64(1)).astype(np.float64) + (blocks % 2)
    level = base + _LEVEL_SPREAD * (index - 1.5)
    change = blocks * block + np.floor(_unit(h) * (block - ramp)).astype(np.int64)
    rate = np.zeros_like(level)                       # slope of each block's ramp
    rate[1:] = np.diff(level, axis=0) / ramp
    n_blk = b_hi - b_lo + 1
    starts = np.arange(b_lo, b_hi + 1, dtype=np.int64)[:, None] * block
    carried = np.zeros((n_blk, level.shape[1]))       # ramp transients at each block start
    for i in range(1, history + 1):
        m = slice(b_lo - i - first, b_lo - i - first + n_blk)
        since = (starts - change[m]).astype(np.float64)
        carried += tau * rate[m] * (np.exp(-since / tau) - np.exp(-(since - ramp) / tau))
    col = b - first
    d = t[:, None] - change[col]                      # ms since this block's change began
    ramping = ((d >= 0) & (d < ramp)).astype(np.float64)
    # transient of the ramp's kinks: tau*r*e^(-d/tau) while ramping, times (1 - e^(ramp/tau)) after
    shape = np.where(d >= ramp, 1.0 - math.exp(ramp / tau), ramping)
    r = rate[col]
    value = level[col - 1] + r * np.clip(d, 0, ramp).astype(np.float64)
    decay = np.exp(-(t - b * block).astype(np.float64) / tau)[:, None]
    transient = np.exp(-np.maximum(d, 0).astype(np.float64) / tau) * shape - ramping
    return value, value + tau * r * transient + decay * carried[b - b_lo]


def _daily(t: IntArray, day_ms: int, amp: FloatArray | float, phase: FloatArray | float,
           tau: float) -> tuple[FloatArray, FloatArray]:
    """A daily sinusoid and its steady-state first-order lag (attenuated, phase-shifted).

    sin(a + phase) is expanded so the trigonometry runs on the (S, 1) time column only.
    """
    angle = 2.0 * np.pi * (t % day_ms).astype(np.float64)[:, None] / day_ms
    sin_a, cos_a = np.sin(angle), np.cos(angle)
    wt = 2.0 * np.pi * tau / day_ms
    shifted = phase - math.atan(wt)
    value = amp * (sin_a * np.cos(phase) + cos_a * np.sin(phase))
    lagged = amp / math.sqrt(1.0 + wt * wt) * (sin_a * np.cos(shifted) + cos_a * np.sin(shifted))
    return value, lagged


@dataclass(frozen=True)
class _Drivers:
    """The latents the sensors read, on an (S, A) grid."""

    load: FloatArray
    lagged_load: FloatArray
    ambient: FloatArray      # plant ambient temperature, (S, 1)
    mains: FloatArray        # plant mains voltage, (S, 1)


def _sensor(name: str, drv: _Drivers, p: Mapping[str, FloatArray]) -> FloatArray:
    """The physics of one sensor, given its asset's latents and operating point."""
    load = drv.load
    match name:
        case "Accelerometer1RMS":
            return p["vib1_0"] + p["vib1_g"] * load**2
        case "Accelerometer2RMS":
            return p["vib2_0"] + p["vib2_g"] * load**2
        case "Current":
            return p["cur_0"] + p["cur_g"] * load
        case "Pressure":
            return p["pres_0"] + p["pres_g"] * load**2
        case "Temperature":
            return p["temp_0"] + p["temp_g"] * drv.lagged_load + 0.5 * (drv.ambient - 24.0)
        case "Thermocouple":
            return drv.ambient + p["amb_off"]
        case "Voltage":
            return drv.mains - p["volt_r"] * (p["cur_0"] + p["cur_g"] * load)
        case "VolumeFlowRateRMS":
            return p["flow_g"] * load
    raise ValueError(f"unknown sensor {name!r}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# Anomaly schedule.


def _break_candidates(features: Sequence[str]) -> tuple[str, ...]:
    """Sensors a correlation break may decouple: one of a correlated pair that is present."""
    if all(f in features for f in _BREAK_PAIR):
        return _BREAK_PAIR
    driven = tuple(f for f in _LOAD_DRIVEN if f in features)
    return driven if len(driven) >= 2 else ()


def plan_anomalies(config: PlantConfig, start_ms: int, end_ms: int, *, per_asset: int = 1,
                   kinds: Sequence[str] = ANOMALY_KINDS, min_gap_steps: int = 200,
                   seed: int | None = None, duration_steps: tuple[int, int] = (30, 120),
                   spike_steps: tuple[int, int] = (3, 5)) -> list[Anomaly]:
    """Deterministic anomaly schedule; anomalies of one asset never overlap and are
    min_gap_steps apart, none starts in the first min_gap_steps of the range.

    Kinds cycle over assets (every kind appears once ``n_assets * per_asset >= len(kinds)``);
    durations are uniform in ``duration_steps`` (``spike_steps`` for spikes), both inclusive;
    positions are uniformly random in the slack the gap rules leave. Sorted by (start, asset).
    """
    if not kinds or any(k not in ANOMALY_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {ANOMALY_KINDS}, got {kinds!r}")
    if per_asset < 0 or min_gap_steps < 0:
        raise ValueError("per_asset and min_gap_steps must be >= 0")
    for lo, hi in (duration_steps, spike_steps):
        if not 1 <= lo <= hi:
            raise ValueError(f"duration range must satisfy 1 <= low <= high, got {(lo, hi)}")
    candidates = {k: config.features for k in ANOMALY_KINDS}
    candidates["correlation_break"] = _break_candidates(config.features)
    if "correlation_break" in kinds and not candidates["correlation_break"]:
        raise ValueError(f"correlation_break needs two load-driven sensors, got {config.features}")
    if per_asset == 0:
        return []
    s = config.seed if seed is None else seed
    period = config.period_ms
    first_step, end_step = _ceil_div(start_ms, period), _ceil_div(end_ms, period)
    n = per_asset
    plant_key = _keys(s, _Stream.PLAN, np.array([_PLANT]))
    rotation = int(_unit(_hash(plant_key, np.zeros((1, 1), np.int64)))[0, 0] * len(kinds))
    assets = np.arange(config.n_assets, dtype=np.int64)
    counters = np.arange(3 * n + 1, dtype=np.int64)[:, None]
    u = _unit(_hash(_keys(s, _Stream.PLAN, assets), counters)).T    # (asset, draw)
    kind_ix = (rotation + assets[:, None] * n + np.arange(n)[None, :]) % len(kinds)
    is_spike = np.array([k == "spike" for k in kinds])[kind_ix]
    lo = np.where(is_spike, spike_steps[0], duration_steps[0])
    hi = np.where(is_spike, spike_steps[1], duration_steps[1])
    dur = lo + np.floor(u[:, :n] * (hi - lo + 1)).astype(np.int64)
    slack = (end_step - first_step) - n * min_gap_steps - dur.sum(axis=1)
    if (slack < 0).any():
        raise ValueError(f"[{start_ms}, {end_ms}) is too short for {n} anomalies per asset "
                         f"{min_gap_steps} steps apart")
    weight = -np.log1p(-u[:, 2 * n:])                 # exponential: uniform random spacings
    extra = np.floor(slack[:, None] * weight / np.maximum(weight.sum(axis=1, keepdims=True),
                                                          1e-300)).astype(np.int64)
    begin = first_step + np.cumsum(min_gap_steps + extra[:, :n], axis=1)
    begin[:, 1:] += np.cumsum(dur, axis=1)[:, :-1]
    out: list[Anomaly] = []
    for a, asset in enumerate(config.asset_ids):
        for m in range(n):
            kind = kinds[int(kind_ix[a, m])]
            pool = candidates[kind]
            sensor = pool[int(u[a, n + m] * len(pool))]
            out.append(Anomaly(asset=asset, kind=kind, start_ms=int(begin[a, m]) * period,
                               end_ms=int(begin[a, m] + dur[a, m]) * period, sensors=(sensor,)))
    out.sort(key=lambda x: (x.start_ms, x.asset))
    return out


# ---------------------------------------------------------------------------------------
# The simulator.


class PlantSimulator:
    """Produces readings of every asset of a plant for any time range, anomalies included.

    Internally arrays are time-major, (step, asset) with assets in name order, so a frame's
    rows are a plain ravel and its float columns one block without a copy.
    """

    def __init__(self, config: PlantConfig, anomalies: Sequence[Anomaly] = ()) -> None:
        self.config = config
        ids = config.asset_ids
        index = {a: i for i, a in enumerate(ids)}
        for an in anomalies:
            if an.asset not in index:
                raise ValueError(f"anomaly on unknown asset {an.asset!r}")
            missing = [s for s in an.sensors if s not in config.features]
            if missing:
                raise ValueError(f"anomaly on sensors {missing} not in features {config.features}")
        self.anomalies: tuple[Anomaly, ...] = tuple(
            sorted(anomalies, key=lambda x: (x.start_ms, x.asset, x.kind, x.sensors)))
        self._order = np.array(sorted(range(len(ids)), key=lambda i: ids[i]), dtype=np.int64)
        self._column = np.argsort(self._order)        # asset index -> column in name order
        self._names = pa.array([ids[i] for i in self._order], type=pa.large_string())
        self._dims = [DEFAULT_FEATURES.index(f) for f in config.features]
        scale = config.noise_scale
        self._noise_sd = np.array(_NOISE_SD) * scale
        process = np.array(_LOAD_GAIN) * _LOAD_FAST[1]
        short_term = np.hypot(self._noise_sd, process)
        self._ref_sd = np.where(short_term > 0, short_term, np.array(_NOISE_SD))
        self._params = self._draw_params()
        p = config.period_ms
        self._an_asset = np.array([index[a.asset] for a in self.anomalies], dtype=np.int64)
        self._an_first = np.array([_ceil_div(a.start_ms, p) for a in self.anomalies], np.int64)
        self._an_end = np.array([_ceil_div(a.end_ms, p) for a in self.anomalies], np.int64)
        rate = config.regime_change_per_day
        self._block = max(4, round(config.day_ms / rate)) if rate > 0 else 0
        self._ramp = max(1, min(_RAMP_MS, self._block // 4))

    def frame(self, start_ms: int, end_ms: int) -> pd.DataFrame:
        """Columns: asset (str), ts_ms (int64), one float64 column per feature, label (int8,
        1 inside an anomaly of that asset). One row per asset per period in [start_ms, end_ms),
        sorted by (ts_ms, asset).

        A reading of grid step k is stamped ``k * period_ms + jitter`` with jitter in
        [0, jitter_ms] (so it stays in its step whether steps are floored or rounded); a
        row belongs to the slice holding its stamp, so slices concatenate exactly.
        """
        return self._frame(start_ms, end_ms, with_anomalies=True)

    def history(self, start_ms: int, n_steps: int) -> pd.DataFrame:
        """Normal history: same as frame, anomalies not applied (labels all 0)."""
        return self._frame(start_ms, start_ms + n_steps * self.config.period_ms,
                           with_anomalies=False)

    # -- construction of a frame ---------------------------------------------------------

    def _frame(self, start_ms: int, end_ms: int, *, with_anomalies: bool) -> pd.DataFrame:
        period = self.config.period_ms
        steps = np.arange(_ceil_div(start_ms - self.config.jitter_ms, period),
                          _ceil_div(end_ms, period), dtype=np.int64)
        shape = (steps.size, len(self._order))
        if steps.size == 0:
            return self._to_frame(np.empty((len(self._dims), *shape)), np.zeros(shape, np.int8),
                                  np.empty(shape, np.int64), start_ms, end_ms)
        values = self._signals(self._order, steps)
        self._add_noise(values, self._order, steps)
        labels = np.zeros(shape, dtype=np.int8)
        if with_anomalies:
            self._inject(values, labels, steps)
        ts = steps[:, None] * period + self._jitter(steps)
        return self._to_frame(values, labels, ts, start_ms, end_ms)

    def _to_frame(self, values: FloatArray, labels: npt.NDArray[np.int8], ts: IntArray,
                  start_ms: int, end_ms: int) -> pd.DataFrame:
        """Ravel (feature, step, asset) arrays into rows in (ts, asset) order."""
        n_steps, n_assets = ts.shape
        df = pd.DataFrame(values.reshape(len(self._dims), -1).T, columns=list(self.config.features),
                          copy=False)
        column = np.tile(np.arange(n_assets, dtype=np.int32), n_steps)
        names = pa.DictionaryArray.from_arrays(pa.array(column), self._names)
        df.insert(0, "asset", pd.array(names.cast(pa.large_string()), dtype="str"))
        df.insert(1, "ts_ms", ts.ravel())
        df["label"] = labels.ravel()
        if self.config.jitter_ms == 0:
            return df
        stamps = df["ts_ms"].to_numpy()
        keep = np.nonzero((stamps >= start_ms) & (stamps < end_ms))[0]
        order = keep[np.lexsort((column[keep], stamps[keep]))]
        return df.take(order).reset_index(drop=True)

    def _jitter(self, steps: IntArray) -> IntArray:
        j = self.config.jitter_ms
        if j == 0:
            return np.zeros((steps.size, len(self._order)), dtype=np.int64)
        u = _unit(_hash(self._key(_Stream.JITTER, self._order), steps[:, None]))
        return np.floor(u * (j + 1)).astype(np.int64)

    # -- physics ---------------------------------------------------------------------------

    def _key(self, stream: int, assets: IntArray, salt: int = 0) -> HashArray:
        return _keys(self.config.seed, int(stream) + salt, assets)

    def _draw_params(self) -> dict[str, FloatArray]:
        ids = np.arange(self.config.n_assets, dtype=np.int64)
        counters = np.arange(len(_PARAM_RANGES), dtype=np.int64)[:, None]
        u = _unit(_hash(self._key(_Stream.PARAMS, ids), counters))
        return {name: lo + (hi - lo) * u[i]
                for i, (name, (lo, hi)) in enumerate(_PARAM_RANGES.items())}

    def _drivers(self, assets: IntArray, t: IntArray, p: Mapping[str, FloatArray],
                 alt_from: int | None) -> _Drivers:
        """Latents of ``assets`` at times ``t``.

        With ``alt_from`` (ms) they are the decoupled trajectory of a correlation break:
        the setpoint held at its value at ``alt_from`` and independent load wander (and plant
        ambient/mains wander), so the broken sensor starts near its level but stops following
        the moves the other sensors share.
        """
        cfg = self.config
        tau = _THERMAL_TAU_MS
        salt = 0 if alt_from is None else _ALT_SALT
        if not self._block:
            regime = regime_lag = p["load_base"]
        elif alt_from is None:
            regime, regime_lag = _regime(self._key(_Stream.REGIME, assets), t, self._block,
                                         self._ramp, tau, p["load_base"])
        else:
            regime = regime_lag = _regime(self._key(_Stream.REGIME, assets), np.array([alt_from]),
                                          self._block, self._ramp, tau, p["load_base"])[0]
        daily, daily_lag = _daily(t, cfg.day_ms, p["daily_amp"], p["daily_phase"] - np.pi / 2, tau)
        slow, slow_lag = _wander(self._key(_Stream.LOAD_SLOW, assets, salt), t, *_LOAD_SLOW, tau)
        mid, mid_lag = _wander(self._key(_Stream.LOAD_MID, assets, salt), t, *_LOAD_MID, tau)
        fast, _ = _wander(self._key(_Stream.LOAD_FAST, assets, salt), t, *_LOAD_FAST)
        plant = np.array([_PLANT], dtype=np.int64)
        amb_cycle, _ = _daily(t, cfg.day_ms, 3.0, -0.75 * np.pi, 0.0)   # warmest mid-afternoon
        amb_wander, _ = _wander(self._key(_Stream.AMBIENT, plant, salt), t, *_AMBIENT_WANDER)
        mains, _ = _wander(self._key(_Stream.MAINS, plant, salt), t, *_MAINS_WANDER)
        return _Drivers(load=regime + daily + slow + mid + fast,
                        lagged_load=regime_lag + daily_lag + slow_lag + mid_lag,
                        ambient=24.0 + amb_cycle + amb_wander, mains=231.0 + mains)

    def _signals(self, assets: IntArray, steps: IntArray,
                 alt_from: int | None = None) -> FloatArray:
        """Noise-free sensor values, (F, S, A); ``alt_from`` as in :meth:`_drivers`."""
        p = {k: v[assets][None, :] for k, v in self._params.items()}
        drv = self._drivers(assets, steps * self.config.period_ms, p, alt_from)
        out = np.empty((len(self._dims), steps.size, assets.size))
        for f, name in enumerate(self.config.features):
            out[f] = _sensor(name, drv, p)
        return out

    def _add_noise(self, values: FloatArray, assets: IntArray, steps: IntArray) -> None:
        """Add measurement noise to (F, S, A) values in place. One hash gives the noise of a
        pair of sensors; a sensor's noise depends on its place in DEFAULT_FEATURES, so a
        feature subset sees the same noise as the full set."""
        key = self._key(_Stream.NOISE, assets)
        pairs: dict[int, tuple[FloatArray, FloatArray]] = {}
        for f, d in enumerate(self._dims):
            if d // 2 not in pairs:
                pairs[d // 2] = _normals(_hash(key, steps[:, None] * 4 + d // 2))
            values[f] += pairs[d // 2][d % 2] * self._noise_sd[d]

    def _noise(self, asset: int, steps: IntArray, f: int) -> FloatArray:
        """The measurement noise of feature ``f`` of one asset, (S,)."""
        out = np.zeros((len(self._dims), steps.size, 1))
        self._add_noise(out, np.array([asset], dtype=np.int64), steps)
        return out[f, :, 0]

    # -- anomalies -------------------------------------------------------------------------

    def _inject(self, values: FloatArray, labels: npt.NDArray[np.int8], steps: IntArray) -> None:
        """Apply, in schedule order, every anomaly overlapping ``steps``."""
        k0, k1 = int(steps[0]), int(steps[-1]) + 1
        for i in np.nonzero((self._an_end > k0) & (self._an_first < k1))[0]:
            an = self.anomalies[i]
            asset = int(self._an_asset[i])
            col = int(self._column[asset])
            first, end = int(self._an_first[i]), int(self._an_end[i])
            c0, c1 = max(first, k0) - k0, min(end, k1) - k0
            if c0 >= c1:  # a window narrower than a period holds no grid step
                continue
            labels[c0:c1, col] = 1
            for sensor in an.sensors:
                f = self.config.features.index(sensor)
                values[f, c0:c1, col] = self._effect(an, asset, f, (first, end), steps[c0:c1],
                                                     values[f, c0:c1, col])

    def _effect(self, an: Anomaly, asset: int, f: int, window: tuple[int, int], win: IntArray,
                current: FloatArray) -> FloatArray:
        """Sensor ``f`` on steps ``win`` of anomaly ``an`` (whose steps are ``window``); a pure
        function of the anomaly and the step, so a window cut across slices is the same as whole."""
        d = self._dims[f]
        first, end = window
        one = np.array([asset], dtype=np.int64)
        counter = (first * len(ANOMALY_KINDS) + ANOMALY_KINDS.index(an.kind)) * 8 + d
        h = int(_hash(self._key(_Stream.ANOMALY, one), np.array([[counter]]))[0, 0])
        u = (h >> 11) * 2.0**-53
        sign = 1.0 if h & 1 else -1.0
        match an.kind:
            case "spike":
                return current + sign * _between(_SPIKE_SD, u) * self._ref_sd[d]
            case "drift":
                frac = (win - first + 1) / (end - first)
                return current + sign * _between(_DRIFT_SD, u) * self._ref_sd[d] * frac
            case "stuck":
                last = np.array([first - 1], dtype=np.int64)
                reading = self._signals(one, last)[f, 0, 0] + self._noise(asset, last, f)[0]
                return np.full(win.size, reading)
            case "noise_burst":
                extra = math.sqrt(_between(_BURST_FACTOR, u) ** 2 - 1.0) * self._ref_sd[d]
                z = _normals(_hash(self._key(_Stream.BURST, one), win[:, None] * 8 + d))[0]
                return current + extra * z[:, 0]
            case _:  # correlation_break: same noise, signal from decoupled latents
                alt = self._signals(one, win, alt_from=first * self.config.period_ms)
                return alt[f, :, 0] + self._noise(asset, win, f)


def _between(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u
