"""A model bundle: everything the detector needs to score, in one versioned directory.

Files::

    manifest.json   features, grid period, window length, layer sizes, threshold parameters,
                    training metadata, the sha256 of every other file, and its own checksum
    weights.npz     the network weights as plain arrays, and per-asset output layers
    scaling.npz     global and per-asset feature scaling, per-feature error scales
    report.json     optional: the training report (loss curves, the gate's comparison)
    report.png      optional: the same as a figure

Loading reads JSON and ``np.load(allow_pickle=False)`` only, and rebuilds the network from
code: no bytes from a bundle are ever executed. Every file is verified against the
manifest, and the manifest against its own checksum, before anything is used. The files
are read under fixed names only: a manifest naming any other file (``../x``, ``/etc/x``) is
refused, so a bundle cannot point a reader outside its directory. The report files are for
people: the manifest does not list them, loading never reads them, and a bundle without them
(or with others beside it) loads and verifies the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.rowwise import repeated
from pipeline.settings import ThresholdSettings

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"
SCALING = "scaling.npz"
DATA_FILES = (WEIGHTS, SCALING)  # the files the manifest lists, with their checksums
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
REPORT_FILES = (REPORT_JSON, REPORT_PNG)  # beside a bundle, outside its checksums, never read by loading


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or inconsistent."""


class FeatureMismatch(BundleError):
    """A sound bundle fitted on other features than the configured ones: the configuration or the
    model is wrong, which waiting does not change."""


def asset_rows(index: dict[str, int], assets: np.ndarray) -> np.ndarray:
    """Each asset's row in a per-asset table, -1 where the table has none."""
    if not index:
        return np.full(len(assets), -1, np.int64)
    return np.fromiter(map(index.get, assets, repeat(-1)), np.int64, len(assets))


def per_asset_rows(index: dict[str, int], assets: np.ndarray,
                   *tables: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """For each ``(per_asset (A, F), fleet (F,))`` table, one row per asset in ``assets``: the
    asset's own row where ``index`` knows it, else the fleet row."""
    n = len(assets)
    if not index:
        return tuple(repeated(fleet, n) for _, fleet in tables)
    idx = asset_rows(index, assets)
    return tuple(np.vstack([own, fleet])[idx] for own, fleet in tables)


MIN_SCALE = 1e-6
# The scale of a feature that never moved in training, per unit of its level: wide enough that
# any reading standardises to about 0, the only value the network saw of it.
UNREAD_SCALE = 1e12


def _unread_scale(mean: np.ndarray) -> np.ndarray:
    """:data:`UNREAD_SCALE` times the level (at least 1), finite at any level."""
    return np.minimum(np.maximum(np.abs(mean), 1.0), np.finfo(np.float64).max / (2 * UNREAD_SCALE)) * UNREAD_SCALE


def unread_mask(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Where a scaling does not read its feature (:func:`scale_from`). A cold start's spread is
    shrunk towards the model's by at most a few times, so a tenth of the mark still finds it."""
    return scale >= 0.1 * _unread_scale(mean)


def scale_from(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Standard deviation with a floor; a feature that never moved is not read.

    A feature constant over the training history (a flag that never fired, a spare channel)
    taught the network nothing: its input weights never left their random start, and no
    normal level of its movement was seen. Its scale is :data:`UNREAD_SCALE` times its level,
    so whatever it reads later standardises to about 0, as in training: it neither drives the
    other features' forecasts with untrained weights nor opens alerts of its own (on SMD, such
    metrics moved on normal test days, and a fleet-wide PCA drops them as well).
    """
    flat = sd <= 1e-9 * np.maximum(np.abs(mean), 1.0)
    return np.where(flat, _unread_scale(mean), np.maximum(sd, MIN_SCALE))


@dataclass
class Scaler:
    """Feature standardisation, global and optionally per asset (one network serves a fleet)."""

    mean: np.ndarray   # (F,)
    scale: np.ndarray  # (F,)
    asset_names: tuple[str, ...] = ()
    asset_mean: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))   # (A, F)
    asset_scale: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # (A, F)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.asset_names)}
        self.any_unread = bool(unread_mask(self.mean, self.scale).any()
                               or (len(self.asset_names) and unread_mask(self.asset_mean, self.asset_scale).any()))

    def rows_for(self, assets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and scale rows for each asset; unknown assets get the global scaling."""
        mean, scale = per_asset_rows(self._index, assets, (self.asset_mean, self.mean), (self.asset_scale, self.scale))
        return mean, scale

    def knows(self, assets: np.ndarray) -> np.ndarray:
        """Which assets have a scaling of their own; with no per-asset scaling the fleet's serves every asset."""
        if not self.asset_names:
            return np.ones(len(assets), bool)
        return asset_rows(self._index, assets) >= 0

    def unread(self, features: Sequence[str]) -> dict[str, list[str]]:
        """The features not read (they never moved in training: :func:`scale_from`): under
        ``"fleet"`` for the fleet's scaling, and under an asset's name where only its history
        held them still."""
        def still(mean: np.ndarray, scale: np.ndarray) -> list[str]:
            return [f for f, u in zip(features, unread_mask(mean, scale)) if u]

        fleet = still(self.mean, self.scale)
        out = {"fleet": fleet} if fleet else {}
        for name, mean, scale in zip(self.asset_names, self.asset_mean, self.asset_scale):
            own = [f for f in still(mean, scale) if f not in fleet]
            if own:
                out[name] = own
        return out

    def transform(self, assets: np.ndarray, values: np.ndarray) -> np.ndarray:
        mean, scale = self.rows_for(assets)
        return (values - mean) / scale

    def inverse(self, assets: np.ndarray, scaled: np.ndarray) -> np.ndarray:
        mean, scale = self.rows_for(assets)
        return scaled * scale + mean


@dataclass
class AssetLevels:
    """Score-term levels calibrated on each asset's own history (one network, many assets of
    different noise); assets not listed use the fleet's levels."""

    names: tuple[str, ...] = ()
    forecast: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # (A, F)
    novelty: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))   # (A, F)
    agree: np.ndarray = field(default_factory=lambda: np.empty(0))  # (A,); empty where the bundle has no agreement term

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}

    def rows_for(self, assets: np.ndarray, forecast: np.ndarray, novelty: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Forecast and novelty level rows (k, F) for each asset, from the fleet levels given where unknown."""
        fc, nv = per_asset_rows(self._index, assets, (self.forecast, forecast), (self.novelty, novelty))
        return fc, nv

    def agree_rows(self, assets: np.ndarray, fleet: float) -> np.ndarray:
        """The agreement level (k, 1) of each asset, the fleet's where the asset has none (also where
        the levels were listed without agreement levels)."""
        if len(self.agree) != len(self.names):
            return repeated(np.array([fleet]), len(assets))
        return per_asset_rows(self._index, assets, (self.agree.reshape(-1, 1), np.array([fleet])))[0]


@dataclass
class AssetHeads:
    """Output layers refitted per asset on the shared network's last LSTM outputs: one
    network learns the fleet's dynamics, each asset keeps how its own signals move.
    Assets not listed use the network's own output layer."""

    names: tuple[str, ...] = ()
    kernel: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0)))  # (A, U, F)
    bias: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))       # (A, F)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}
        # The network's outputs are float32: one float32 matrix product a step is a fifth of the
        # time of a float64 einsum (1,000 assets, 32 units: 94 against 490 µs).
        self.kernel32 = np.ascontiguousarray(self.kernel, np.float32)
        self.bias32 = np.ascontiguousarray(self.bias, np.float32)

    def rows(self, assets: np.ndarray) -> np.ndarray:
        """Index of each asset's head, -1 where it has none."""
        return asset_rows(self._index, assets)


@dataclass(frozen=True)
class ThresholdParams:
    """Threshold behaviour frozen into the bundle: settings plus what calibration learned.

    The alert score is the largest per-feature term, each in units of its own calibrated
    level (arrays in the bundle), so ``threshold`` (the alert level of that score) is 1.
    """

    threshold: float            # alert level of the combined score (1 = the calibrated levels)
    normal_mean: float          # mean of the combined score on held-out normal data (seeds adaptation)
    normal_std: float
    smoothing_alpha: float
    novelty_alpha: float
    adapt_alpha: float
    adapt_z: float
    open_after: int
    close_after: int
    close_ratio: float
    update_every: int
    top_features: int
    novelty_cap: float = math.inf  # bundles written before the cap existed ran without one
    cold_start_steps: int = 0      # bundles written before cold start had none
    quantile: float = 0.995        # how the levels were calibrated, for assets that calibrate their own online
    margin: float = 1.25
    novelty_margin: float = 1.25
    flat_factor: float = 2.0
    rebaseline_after_s: float = 0.0  # an alert open this long re-baselines its asset (0 = never)
    alone_factor: float = 1.0  # bundles written before the agreement term: each term alone at its level
    adapt_clip_sd: float = 0.0  # bundles written before it: the adaptation unclipped

    @classmethod
    def from_settings(cls, s: ThresholdSettings, *, normal_mean: float, normal_std: float) -> ThresholdParams:
        return cls(1.0, normal_mean, normal_std, s.smoothing_alpha, s.novelty_alpha,
                   s.adapt_alpha, s.adapt_z, s.open_after, s.close_after, s.close_ratio, s.update_every,
                   s.top_features, s.novelty_cap, s.cold_start_steps, s.quantile, s.margin, s.novelty_margin,
                   s.flat_factor, s.rebaseline_after_s, s.alone_factor, s.adapt_clip_sd)


@dataclass
class ModelBundle:
    version: str
    features: tuple[str, ...]
    period_ms: int
    timesteps: int
    units: tuple[int, ...]
    warmup_steps: int               # steps after a state reset that are not scored
    scaler: Scaler
    error_scale: np.ndarray         # (F,) RMS of scaled next-step errors at training time
    novelty_coef: np.ndarray        # (2F, F) each feature from the others and their squares, scaled units
    novelty_scale: np.ndarray       # (F,) RMS of those cross-sectional residuals at training time
    flat_limit: np.ndarray          # (F,) steps a value may repeat unchanged before it counts as stuck
    forecast_level: np.ndarray      # (F,) calibrated level of sqrt(EWMA(e_f²)), the LSTM term
    novelty_level: np.ndarray       # (F,) calibrated level of sqrt(EWMA(r_f²)), the cross-sectional term
    thresholds: ThresholdParams
    weights: list[np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    asset_levels: AssetLevels = field(default_factory=AssetLevels)
    heads: AssetHeads = field(default_factory=AssetHeads)
    novelty_range: np.ndarray | None = None  # (2, F) scaled bounds of the novelty map's inputs; None: not held
    novelty_memory: np.ndarray | None = None  # (F,) steps per independent value of each novelty residual in the fit; None: not held
    agree_level: float | None = None  # level of the agreement term (thresholds.combine); None: no such term

    @property
    def n_features(self) -> int:
        return len(self.features)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def encode_bundle(bundle: ModelBundle) -> dict[str, bytes]:
    """The bundle's files as bytes (manifest last, since it holds the others' checksums)."""
    files = {
        WEIGHTS: _npz_bytes({**{f"w{i:03d}": w for i, w in enumerate(bundle.weights)},
                             "head_assets": np.array(bundle.heads.names, dtype=np.str_),
                             "head_kernel": bundle.heads.kernel, "head_bias": bundle.heads.bias}),
        SCALING: _npz_bytes({
            "mean": bundle.scaler.mean, "scale": bundle.scaler.scale,
            "asset_names": np.array(bundle.scaler.asset_names, dtype=np.str_),
            "asset_mean": bundle.scaler.asset_mean, "asset_scale": bundle.scaler.asset_scale,
            "error_scale": bundle.error_scale, "novelty_coef": bundle.novelty_coef,
            "novelty_scale": bundle.novelty_scale, "flat_limit": bundle.flat_limit,
            "forecast_level": bundle.forecast_level, "novelty_level": bundle.novelty_level,
            "level_assets": np.array(bundle.asset_levels.names, dtype=np.str_),
            "asset_forecast_level": bundle.asset_levels.forecast, "asset_novelty_level": bundle.asset_levels.novelty,
            "asset_agree_level": bundle.asset_levels.agree,
            **({} if bundle.novelty_range is None else {"novelty_range": bundle.novelty_range}),
            **({} if bundle.novelty_memory is None else {"novelty_memory": bundle.novelty_memory}),
            **({} if bundle.agree_level is None else {"agree_level": np.array(bundle.agree_level)}),
        }),
    }
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "version": bundle.version,
        "features": list(bundle.features),
        "period_ms": bundle.period_ms,
        "timesteps": bundle.timesteps,
        "units": list(bundle.units),
        "warmup_steps": bundle.warmup_steps,
        "n_weights": len(bundle.weights),
        "thresholds": asdict(bundle.thresholds),
        "metadata": bundle.metadata,
        "files": {name: _sha256(data) for name, data in files.items()},
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return files


def decode_bundle(files: dict[str, bytes]) -> ModelBundle:
    """Verify and rebuild a bundle from its files' bytes; raises BundleError on any defect."""
    if MANIFEST not in files:
        raise BundleError("manifest.json is missing")
    try:
        manifest = json.loads(files[MANIFEST])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(manifest):
        raise BundleError("manifest checksum mismatch")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle format {manifest.get('format_version')!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BundleError("manifest.json has no file list")
    for name in listed:
        try:
            storage.check_component(name, "file name")
        except storage.PathEscapeError as exc:
            raise BundleError(f"manifest.json refused: {exc}") from None
        if name not in DATA_FILES:
            raise BundleError(f"manifest.json lists {name!r}; a bundle holds {', '.join(DATA_FILES)}")
    for name in DATA_FILES:
        if name not in listed:
            raise BundleError(f"manifest.json does not list {name}")
    for name, digest in listed.items():
        if name not in files:
            raise BundleError(f"{name} is missing")
        if _sha256(files[name]) != digest:
            raise BundleError(f"{name} checksum mismatch (corrupted or truncated)")
    stored = _arrays(WEIGHTS, files[WEIGHTS])
    scaling = _arrays(SCALING, files[SCALING])
    try:
        weights = [stored[f"w{i:03d}"] for i in range(int(manifest["n_weights"]))]
        heads = (AssetHeads(tuple(str(a) for a in stored["head_assets"]), stored["head_kernel"], stored["head_bias"])
                 if "head_assets" in stored else AssetHeads())  # bundles written before heads existed
        features = tuple(manifest["features"])
        units = tuple(int(u) for u in manifest["units"])
        scaler = Scaler(scaling["mean"], scaling["scale"], tuple(str(a) for a in scaling["asset_names"]),
                        scaling["asset_mean"], scaling["asset_scale"])
        bundle = ModelBundle(
            version=str(manifest["version"]), features=features, period_ms=int(manifest["period_ms"]),
            timesteps=int(manifest["timesteps"]), units=units, warmup_steps=int(manifest["warmup_steps"]),
            scaler=scaler, error_scale=scaling["error_scale"], novelty_coef=scaling["novelty_coef"],
            novelty_scale=scaling["novelty_scale"], flat_limit=scaling["flat_limit"],
            forecast_level=scaling["forecast_level"], novelty_level=scaling["novelty_level"],
            thresholds=ThresholdParams(**manifest["thresholds"]), weights=weights,
            metadata=dict(manifest.get("metadata", {})),
            asset_levels=_asset_levels(scaling), heads=heads,
            novelty_range=scaling.get("novelty_range"),  # absent from bundles written before it existed
            novelty_memory=scaling.get("novelty_memory"),  # likewise
            agree_level=float(scaling["agree_level"]) if "agree_level" in scaling else None,  # likewise
        )
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise BundleError(f"bundle content is inconsistent: {exc}") from None
    try:
        _check_shapes(bundle)
    except BundleError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. an array of strings where numbers belong
        raise BundleError(f"bundle content is inconsistent: {exc}") from None
    return bundle


def _arrays(name: str, data: bytes) -> dict[str, np.ndarray]:
    """Every array of one .npz file. ``allow_pickle=False`` makes numpy refuse object arrays, the
    only kind whose loading unpickles (and so could run code from the file)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise BundleError(f"{name} refused: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{name} is not a readable .npz file: {exc}") from None


def _asset_levels(scaling: dict[str, np.ndarray]) -> AssetLevels:
    """Per-asset levels, absent from bundles written before they existed (the fleet's then apply)."""
    if "level_assets" not in scaling:
        return AssetLevels()
    return AssetLevels(tuple(str(a) for a in scaling["level_assets"]), scaling["asset_forecast_level"],
                       scaling["asset_novelty_level"], scaling.get("asset_agree_level", np.empty(0)))


def _check_shapes(b: ModelBundle) -> None:
    """Refuse a bundle whose arrays do not fit its declared features and layers."""
    f = b.n_features
    expected: list[tuple[int, ...]] = []
    prev = f
    for u in b.units:
        expected += [(prev, 4 * u), (u, 4 * u), (4 * u,)]
        prev = u
    expected += [(prev, f), (f,)]
    got = [tuple(w.shape) for w in b.weights]
    if got != expected:
        raise BundleError(f"weights do not match {f} features and layers {b.units}: {got} != {expected}")
    if not all(np.all(np.isfinite(w)) for w in b.weights):
        raise BundleError("weights must be finite numbers")
    if b.period_ms <= 0:
        raise BundleError(f"period_ms must be positive, not {b.period_ms}")
    _check_thresholds(b.thresholds)
    for name, arr in (("mean", b.scaler.mean), ("scale", b.scaler.scale), ("error_scale", b.error_scale),
                      ("novelty_scale", b.novelty_scale), ("flat_limit", b.flat_limit),
                      ("forecast_level", b.forecast_level), ("novelty_level", b.novelty_level)):
        if arr.shape != (f,) or not np.all(np.isfinite(arr)):
            raise BundleError(f"{name} must be {f} finite numbers")
    if b.novelty_coef.shape != (2 * f, f) or not np.all(np.isfinite(b.novelty_coef)):
        raise BundleError(f"novelty_coef must be a finite {2 * f}x{f} matrix")
    nr = b.novelty_range
    if nr is not None and (nr.shape != (2, f) or not np.all(np.isfinite(nr)) or np.any(nr[0] > nr[1])):
        raise BundleError(f"novelty_range must be {f} finite (min, max) pairs")
    nm = b.novelty_memory
    if nm is not None and (nm.shape != (f,) or not np.all(np.isfinite(nm)) or np.any(nm < 1)):
        raise BundleError(f"novelty_memory must be {f} finite numbers >= 1 (steps per independent value)")
    if b.agree_level is not None and not (math.isfinite(b.agree_level) and b.agree_level > 0):
        raise BundleError("agree_level must be a positive finite number")
    if min(b.scaler.scale.min(), b.error_scale.min(), b.novelty_scale.min(), b.forecast_level.min(),
           b.novelty_level.min(), b.flat_limit.min()) <= 0:
        raise BundleError("scales must be positive")
    sc = b.scaler
    if sc.asset_names and (sc.asset_mean.shape != (len(sc.asset_names), f) or sc.asset_scale.shape != sc.asset_mean.shape
                           or not (np.all(np.isfinite(sc.asset_mean)) and np.all(np.isfinite(sc.asset_scale)))
                           or sc.asset_scale.min() <= 0):
        raise BundleError(f"per-asset scaling must be finite, one mean and one positive scale of {f} per listed asset")
    hd = b.heads
    if hd.names and (hd.kernel.shape != (len(hd.names), b.units[-1], f) or hd.bias.shape != (len(hd.names), f)
                     or not (np.all(np.isfinite(hd.kernel)) and np.all(np.isfinite(hd.bias)))):
        raise BundleError(f"per-asset heads must be finite, {b.units[-1]}x{f} plus {f} per listed asset")
    lv = b.asset_levels
    if lv.names:
        for name, arr in (("asset_forecast_level", lv.forecast), ("asset_novelty_level", lv.novelty)):
            if arr.shape != (len(lv.names), f) or not np.all(np.isfinite(arr)) or arr.min() <= 0:
                raise BundleError(f"{name} must be positive finite numbers, one row of {f} per listed asset")
        ag = lv.agree
        if b.agree_level is not None and (ag.shape != (len(lv.names),) or not np.all(np.isfinite(ag)) or np.any(ag <= 0)):
            raise BundleError("asset_agree_level must be one positive finite number per listed asset")


def _check_thresholds(p: ThresholdParams) -> None:
    """Refuse threshold parameters that would silence or break scoring (a crafted manifest: numbers
    of the wrong type, NaN, a smoothing weight outside its range), as the settings refuse them."""
    for name, value in asdict(p).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise BundleError(f"thresholds.{name} must be a number, not {value!r}")
    if not (0 < p.threshold < math.inf and math.isfinite(p.normal_mean) and 0 <= p.normal_std < math.inf):
        raise BundleError("thresholds: threshold must be positive and finite, normal_mean and normal_std finite")
    for name in ("smoothing_alpha", "novelty_alpha"):
        if not 0 < getattr(p, name) <= 1:
            raise BundleError(f"thresholds.{name} must be in (0, 1]")
    if not 0 <= p.adapt_alpha < 1:
        raise BundleError("thresholds.adapt_alpha must be in [0, 1)")
    if not 0 < p.quantile < 1:
        raise BundleError("thresholds.quantile must be in (0, 1)")


def save_bundle(bundle: ModelBundle, uri: str, extra: dict[str, bytes] | None = None) -> None:
    """Write a bundle directory, with report files (``extra``) beside it (not atomic by itself:
    the registry publishes atomically)."""
    fs, path = storage.resolve(uri)
    for name in extra or {}:
        if name not in REPORT_FILES:
            raise BundleError(f"a bundle may carry only {', '.join(REPORT_FILES)} beside it, not {name!r}")
    for name, data in {**encode_bundle(bundle), **(extra or {})}.items():
        storage.write_bytes(fs, storage.join(path, name), data)


def load_bundle(uri: str, expected_features: tuple[str, ...] | None = None) -> ModelBundle:
    """Read and verify a bundle directory; with ``expected_features`` also refuse a feature mismatch."""
    fs, path = storage.resolve(uri)
    try:
        files = {name: storage.read_bytes(fs, storage.join(path, name)) for name in (MANIFEST, WEIGHTS, SCALING)}
    except (FileNotFoundError, OSError) as exc:
        raise BundleError(f"cannot read bundle at {uri}: {exc}") from None
    bundle = decode_bundle(files)
    if expected_features is not None:
        check_features(bundle, expected_features)
    return bundle


def check_features(bundle: ModelBundle, expected: Sequence[str]) -> None:
    """Refuse a bundle fitted on other features than the configured ones (a configuration error)."""
    if bundle.features != tuple(expected):
        raise FeatureMismatch(f"bundle features {list(bundle.features)} differ from the configured {list(expected)}")


def read_report_files(uri: str) -> dict[str, bytes]:
    """The report files present in a bundle directory (none is an empty dict)."""
    fs, path = storage.resolve(uri)
    return {name: storage.read_bytes(fs, storage.join(path, name)) for name in REPORT_FILES
            if storage.exists(fs, storage.join(path, name))}
