"""One typed settings object for every plantwatch process.

Values come from, in increasing order of precedence: the defaults below, a TOML file,
``PLANTWATCH_<SECTION>__<KEY>`` environment variables and ``--set section.key=value`` CLI
flags. Unknown keys, wrong types and impossible values are refused with a
:class:`SettingsError` that names the key, so a typo in a deployment fails at start-up
instead of silently running with a default.

Each field carries a ``doc`` in its metadata: the configuration reference in the README
is generated from it (``plantwatch config --reference``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "PLANTWATCH_"
MAX_INTERVAL_S = 366 * 86400.0  # trainer.interval_s: longer is a typo (and past the calendar the schedule can name)

PUMP_FEATURES: tuple[str, ...] = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "VolumeFlowRateRMS",
)


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or impossible; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"setting '{key}': {message}")
        self.key = key


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation (immutable defaults only)."""
    return field(default=default, metadata={"doc": doc})


def _secret(doc: str) -> Any:
    """A secret string field: left out of repr(), shown as "***" by :func:`to_dict`."""
    return field(default="", repr=False, metadata={"doc": doc, "secret": True})


def read_secret_file(key: str, path: str) -> str:
    """The secret held by a ``*_file`` setting (e.g. a mounted Kubernetes Secret), without its
    trailing line break; errors name the key and the path, never the content."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(key, f"{path} is not UTF-8 text") from None
    _check(key, value != "", f"{path} is empty")
    return value


def _check(key: str, ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(key, message)


STORE_SCHEMES = ("file", "local", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")  # what pyarrow resolves


def _check_store_uri(key: str, uri: str) -> None:
    """A local path or a URI whose scheme pyarrow resolves (written as it spells it: ``s3://``)."""
    _check(key, bool(uri), "must not be empty")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return
    _check(key, scheme in STORE_SCHEMES, f"unknown scheme {scheme!r} in {uri!r}; one of {', '.join(STORE_SCHEMES)}"
           " (lower case), or a local path")
    _check(key, scheme not in ("file", "local") or rest.startswith("/"),
           f"{uri!r}: a {scheme}:// URI takes an absolute path")


def _host_port(entry: str) -> bool:
    """Whether the Kafka client reads ``entry`` as a host and a port it can connect to (its own
    parser: ``PROTOCOL://`` prefixes, bracketed or bare IPv6 addresses, port 9092 when none)."""
    from kafka.cluster import collect_hosts

    try:
        ((host, port, _),) = collect_hosts(entry, randomize=False)
    except ValueError:
        return False
    return bool(host) and 0 < port < 65536


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = _f("", "host:port[,host:port…] of the Kafka cluster; empty starts the embedded local broker (demo, tests)")
    client_id: str = _f("plantwatch", "Kafka client id prefix")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = _f("PLAINTEXT", "transport security")
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = _f("", "SASL mechanism when security_protocol is SASL_*")
    sasl_username: str = _f("", "SASL user name")
    sasl_password: str = _secret("SASL password (prefer sasl_password_file, or the PLANTWATCH_KAFKA__SASL_PASSWORD environment variable); never shown")
    sasl_password_file: str = _f("", "file holding the SASL password (a mounted Kubernetes Secret), read whenever a client is built; excludes sasl_password")
    ssl_cafile: str = _f("", "CA bundle (PEM) to verify the brokers")
    ssl_certfile: str = _f("", "client certificate (PEM) for mutual TLS")
    ssl_keyfile: str = _f("", "client private key (PEM) for mutual TLS")
    ssl_check_hostname: bool = _f(True, "verify the broker host name against its certificate")
    session_timeout_ms: int = _f(6000, "consumer group session timeout; group joins take about half of it on some brokers")
    heartbeat_interval_ms: int = _f(1000, "consumer heartbeat interval (must be below session_timeout_ms / 3)")
    max_poll_interval_ms: int = _f(300000, "longest time between polls before the member is expelled")
    max_poll_records: int = _f(20000, "records per poll: one decode pass and one scoring call per poll (a backlog goes faster in larger polls; a live feed's polls are smaller)")
    fetch_max_bytes: int = _f(52428800, "largest fetch response")
    max_partition_fetch_bytes: int = _f(4194304, "largest fetch per partition")
    fetch_max_wait_ms: int = _f(500, "longest time the broker holds a fetch waiting for data; the embedded broker holds an idle fetch this long even when records arrive meanwhile (50 cut its produce-to-poll delay from 20-90 ms to 4-11 ms), but on object storage it served almost nothing to 50 ms fetches after a restart")
    request_timeout_ms: int = _f(30000, "client request timeout")

    def __post_init__(self) -> None:
        p = "kafka."
        _check(p + "session_timeout_ms", self.session_timeout_ms > 0, "must be > 0")
        _check(p + "heartbeat_interval_ms", 0 < self.heartbeat_interval_ms * 3 <= self.session_timeout_ms,
               "must be > 0 and at most a third of session_timeout_ms")
        _check(p + "max_poll_records", self.max_poll_records >= 1, "must be >= 1")
        _check(p + "fetch_max_wait_ms", self.fetch_max_wait_ms >= 0, "must be >= 0")
        # kafka-python refuses a consumer whose requests time out before a fetch may end, or after
        # an idle connection is closed (9 minutes)
        _check(p + "request_timeout_ms", self.fetch_max_wait_ms < self.request_timeout_ms < 540_000,
               "must be above fetch_max_wait_ms and below 540000")
        _check(p + "fetch_max_bytes", self.fetch_max_bytes >= 1, "must be >= 1")
        _check(p + "max_partition_fetch_bytes", self.max_partition_fetch_bytes >= 1, "must be >= 1")
        for host in (h.strip() for h in self.bootstrap_servers.split(",") if h.strip()):
            _check(p + "bootstrap_servers", _host_port(host), f"{host!r} is not host:port")
        _check(p + "max_poll_interval_ms", self.max_poll_interval_ms >= self.session_timeout_ms,
               "must be >= session_timeout_ms")
        if self.security_protocol.startswith("SASL"):
            _check(p + "sasl_mechanism", self.sasl_mechanism != "", f"required with {self.security_protocol}")
            _check(p + "sasl_username", self.sasl_username != "", f"required with {self.security_protocol}")
        _check(p + "sasl_password_file", not (self.sasl_password and self.sasl_password_file),
               "set either sasl_password or sasl_password_file, not both")
        if self.sasl_password_file:
            read_secret_file(p + "sasl_password_file", self.sasl_password_file)  # fail at start-up, not at connect
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            _check(p + name, path == "" or Path(path).is_file(), f"file not found: {path}")

    def sasl_secret(self) -> str:
        """The SASL password: read from sasl_password_file on each call (a client built after
        the Secret is rotated gets the new one), else sasl_password."""
        if self.sasl_password_file:
            return read_secret_file("kafka.sasl_password_file", self.sasl_password_file)
        return self.sasl_password


@dataclass(frozen=True)
class TopicSettings:
    readings: str = _f("plant.readings", "input topic, key = asset id")
    alerts: str = _f("plant.alerts", "alert events (open/update/close), key = asset id")
    dlq: str = _f("", "dead-letter topic for rejected readings; empty means '<readings>.dlq'")
    models: str = _f("plant.models", "control topic announcing published model versions")
    scores: str = _f("", "optional topic of every scored step (asset, step, score, threshold, model version, learning = in a cold start), key = asset; empty = off")
    state: str = _f("", "detector state hand-over topic (per-asset snapshots, key = asset; compact it); empty means '<readings>.state'")
    partitions: int = _f(4, "partitions used when plantwatch creates the topics")

    def __post_init__(self) -> None:
        for name in ("readings", "alerts", "models"):
            _check("topics." + name, bool(getattr(self, name)), "must not be empty")
        _check("topics.partitions", self.partitions >= 1, "must be >= 1")
        # one topic for two jobs: e.g. dead letters read again as readings, or readings compacted as state
        named = {"readings": self.readings, "alerts": self.alerts, "models": self.models, "dlq": self.dlq_topic,
                 "state": self.state_topic, **({"scores": self.scores} if self.scores else {})}
        seen: dict[str, str] = {}
        for name, topic in named.items():
            _check("topics." + name, topic not in seen, f"{topic!r} is already topics.{seen.get(topic)}")
            seen[topic] = name

    @property
    def dlq_topic(self) -> str:
        return self.dlq or f"{self.readings}.dlq"

    @property
    def state_topic(self) -> str:
        return self.state or f"{self.readings}.state"


@dataclass(frozen=True)
class GridSettings:
    period_s: float = _f(1.0, "grid period: readings are aggregated (mean) into steps of this length")
    allowed_lateness_s: float = _f(5.0, "readings up to this much older than the asset's newest are still placed on the grid")
    max_future_s: float = _f(300.0, "readings stamped further than this ahead of the time their record was written (its Kafka timestamp, or the wall clock if earlier: a replay judges them alike) are rejected, so they cannot drag the watermark")
    carry_forward_steps: int = _f(5, "a missing feature keeps its last value for at most this many steps")
    gap_reset_steps: int = _f(30, "a gap of more empty steps than this resets the asset instead of inventing data")

    def __post_init__(self) -> None:
        _check("grid.period_s", self.period_s > 0, "must be > 0")
        _check("grid.allowed_lateness_s", self.allowed_lateness_s >= 0, "must be >= 0")
        _check("grid.max_future_s", self.max_future_s > 0, "must be > 0")
        _check("grid.carry_forward_steps", self.carry_forward_steps >= 0, "must be >= 0")
        _check("grid.gap_reset_steps", self.gap_reset_steps >= 1, "must be >= 1")

    @property
    def period_ms(self) -> int:
        return max(1, round(self.period_s * 1000))

    @property
    def lateness_ms(self) -> int:
        return round(self.allowed_lateness_s * 1000)

    @property
    def max_future_ms(self) -> int:
        return round(self.max_future_s * 1000)


@dataclass(frozen=True)
class ModelSettings:
    features: tuple[str, ...] = _f(PUMP_FEATURES, "feature (sensor) names, in model order")
    timesteps: int = _f(32, "training window length in grid steps (truncated-BPTT chunk)")
    chunks_per_run: int = _f(8, "consecutive windows whose LSTM state is carried during training")
    units: tuple[int, ...] = _f((64, 32), "LSTM layer sizes, first to last (at least two layers)")
    epochs: int = _f(40, "maximum training epochs (early stopping on a time-ordered validation split)")
    patience: int = _f(5, "epochs without validation improvement before stopping")
    streams: int = _f(32, "parallel streams per training batch (the stateful batch size)")
    learning_rate: float = _f(2e-3, "Adam learning rate")
    validation_fraction: float = _f(0.2, "time-ordered tail of each asset's history held out for early stopping and calibration")
    per_asset_scaling: bool = _f(True, "learn feature scaling per asset from its own history (one network serves a fleet)")
    per_asset_heads: bool = _f(True, "refit the network's output layer per asset on its own training steps (closed-form ridge) when the history holds two or more assets: the fleet's dynamics, each asset's own response (one network alone learns that levels persist, and a fault's level shift barely shows); an asset's layer learns the levels its history saw")
    head_ridge: float = _f(3e-4, "ridge penalty of the per-asset output layers, per training step")
    seed: int = _f(0, "random seed for weight initialisation and batching")

    def __post_init__(self) -> None:
        _check("model.features", len(self.features) >= 1, "at least one feature")
        _check("model.features", len(set(self.features)) == len(self.features), "duplicate feature names")
        _check("model.timesteps", self.timesteps >= 2, "must be >= 2")
        _check("model.chunks_per_run", self.chunks_per_run >= 1, "must be >= 1")
        _check("model.units", len(self.units) >= 2 and all(u >= 1 for u in self.units),
               "at least two LSTM layers, each >= 1 unit")
        _check("model.epochs", self.epochs >= 1, "must be >= 1")
        _check("model.patience", self.patience >= 1, "must be >= 1")
        _check("model.streams", self.streams >= 1, "must be >= 1")
        _check("model.learning_rate", self.learning_rate > 0, "must be > 0")
        _check("model.validation_fraction", 0 < self.validation_fraction < 1, "must be in (0, 1)")
        _check("model.head_ridge", self.head_ridge > 0, "must be > 0")


@dataclass(frozen=True)
class ThresholdSettings:
    smoothing_alpha: float = _f(0.3, "EWMA weight of the newest squared forecast error per feature (1 = no smoothing)")
    novelty_alpha: float = _f(0.05, "EWMA weight of the newest squared cross-sectional residual per feature (slow: sustained shifts)")
    quantile: float = _f(0.995, "quantile of each smoothed score term on held-out normal data its threshold starts from")
    margin: float = _f(1.25, "the forecast term's calibrated threshold is that quantile times this margin")
    novelty_margin: float = _f(1.25, "… and the novelty term's; a short history needs no larger margin: each term's level is already stretched where its calibration steps hold too few independent EWMA excursions to reach the quantile")
    alone_factor: float = _f(2.0, "a step's forecast and novelty terms of one feature, both moderately high, are judged together (their geometric mean, against a level calibrated on held-out steps); each term on its own must reach this many times its level")
    novelty_cap: float = _f(3.0, "each squared cross-sectional residual enters the novelty EWMA capped at (this × the feature's level)²: a sustained fault's evidence saturates, so the term falls back soon after the fault ends")
    per_asset_levels: bool = _f(True, "calibrate each asset's term thresholds on its own history when it has enough held-out steps (else the fleet's)")
    flat_factor: float = _f(2.0, "a value repeated unchanged for more than this times the longest run seen in training is stuck")
    flat_min_steps: int = _f(10, "… and never fewer steps than this")
    flat_repeat_share: float = _f(0.01, "only a feature whose raw value stayed the same three steps in a row on at most this share of training steps can be judged stuck: quantised, discrete or idle signals repeat as a matter of course")
    adapt_alpha: float = _f(0.002, "EWMA weight with which each asset's normal score level adapts online (0 = off)")
    adapt_z: float = _f(4.0, "the online threshold is the adapted mean plus this many adapted standard deviations")
    adapt_clip_sd: float = _f(3.0, "each step moves the adapted mean and variance by at most this many adapted standard deviations (Huber's clipping): a fault that outlasts its alert lifts the threshold over many more steps; 0 = unclipped")
    open_after: int = _f(2, "consecutive steps above the threshold before an alert opens")
    close_after: int = _f(5, "consecutive steps below close_ratio × threshold before an alert closes")
    close_ratio: float = _f(0.8, "hysteresis: an alert closes below this fraction of the threshold")
    update_every: int = _f(30, "an open alert emits an update at most every this many steps (and when its peak grows)")
    top_features: int = _f(3, "features named in an alert, by contribution")
    rebaseline_after_s: float = _f(86400.0, "an alert open this long (seconds of event time) closes with reason rebaselined and its asset learns its current behaviour as normal, like a new asset (threshold.cold_start_steps): a lasting move to a new operating point stops alerting and enters the next retraining; 0 = never")
    cold_start_steps: int = _f(360, "an asset the model was not fitted on spends this many steps learning its own scaling (all of them) and, after the first third, its own term levels before it can alert; 0 = off")

    def __post_init__(self) -> None:
        p = "threshold."
        _check(p + "smoothing_alpha", 0 < self.smoothing_alpha <= 1, "must be in (0, 1]")
        _check(p + "novelty_alpha", 0 < self.novelty_alpha <= 1, "must be in (0, 1]")
        _check(p + "quantile", 0 < self.quantile < 1, "must be in (0, 1)")
        _check(p + "margin", self.margin > 0, "must be > 0")
        _check(p + "novelty_margin", self.novelty_margin > 0, "must be > 0")
        _check(p + "alone_factor", self.alone_factor >= 1, "must be >= 1")
        _check(p + "novelty_cap", self.novelty_cap > 1, "must be > 1 (the cap is in units of the alert level)")
        _check(p + "flat_factor", self.flat_factor >= 1, "must be >= 1")
        _check(p + "flat_min_steps", self.flat_min_steps >= 2, "must be >= 2")
        _check(p + "flat_repeat_share", 0 <= self.flat_repeat_share <= 1, "must be in [0, 1]")
        _check(p + "adapt_alpha", 0 <= self.adapt_alpha < 1, "must be in [0, 1)")
        _check(p + "adapt_z", self.adapt_z > 0, "must be > 0")
        _check(p + "adapt_clip_sd", self.adapt_clip_sd == 0 or self.adapt_clip_sd >= 1, "must be 0 (off) or >= 1")
        _check(p + "open_after", self.open_after >= 1, "must be >= 1")
        _check(p + "close_after", self.close_after >= 1, "must be >= 1")
        _check(p + "close_ratio", 0 < self.close_ratio <= 1, "must be in (0, 1]")
        _check(p + "update_every", self.update_every >= 1, "must be >= 1")
        _check(p + "top_features", self.top_features >= 1, "must be >= 1")
        _check(p + "rebaseline_after_s", self.rebaseline_after_s >= 0, "must be >= 0 (0 = never)")
        _check(p + "cold_start_steps", self.cold_start_steps == 0 or self.cold_start_steps >= 4,
               "must be 0 (off) or >= 4")


@dataclass(frozen=True)
class DetectorSettings:
    group_id: str = _f("plantwatch-detector", "consumer group of the detectors")
    input_format: Literal["auto", "wide", "narrow"] = _f("auto", "reading format on the readings topic")
    unknown_features: Literal["reject", "ignore"] = _f("reject", "what a reading naming a feature outside the model does")
    max_record_bytes: int = _f(65536, "larger records go to the DLQ")
    poll_timeout_ms: int = _f(500, "longest wait for records in one poll")
    registry_poll_s: float = _f(30.0, "how often the registry is checked for a new current model (the control topic is faster)")
    http_port: int = _f(0, "port of the /metrics, /healthz and /readyz endpoints (0 = off)")
    tf_threads: int = _f(1, "threads inside each TensorFlow call that scores a poll (0 = one per core): one spent 30-45 % less CPU per step of 1,000 assets and was as fast up to about 2,000 steps per poll")
    checkpoint_interval_ms: int = _f(2000, "how often the state of changed assets is written to the state topic (in 10 ms slices between polls) and, once acknowledged, offsets committed: a successor replays at most about two intervals (silently)")

    def __post_init__(self) -> None:
        _check("detector.group_id", bool(self.group_id), "must not be empty")
        _check("detector.max_record_bytes", self.max_record_bytes >= 64, "must be >= 64")
        _check("detector.poll_timeout_ms", self.poll_timeout_ms >= 1, "must be >= 1")
        _check("detector.registry_poll_s", self.registry_poll_s > 0, "must be > 0")
        _check("detector.http_port", 0 <= self.http_port <= 65535, "must be a port number or 0")
        _check("detector.checkpoint_interval_ms", self.checkpoint_interval_ms >= 0, "must be >= 0 (0 = every poll)")
        _check("detector.tf_threads", self.tf_threads >= 0, "must be >= 0 (0 = one per core)")


@dataclass(frozen=True)
class RegistrySettings:
    uri: str = _f("var/registry", "model registry: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://)")
    keep: int = _f(5, "published versions kept (older ones are deleted, pinned ones never)")
    keep_candidates: int = _f(10, "models refused by the gate kept under candidates/ with their gate report, for plantwatch models show and promote (older ones are deleted; 0 keeps none)")

    def __post_init__(self) -> None:
        _check_store_uri("registry.uri", self.uri)
        _check("registry.keep", self.keep >= 1, "must be >= 1")
        _check("registry.keep_candidates", self.keep_candidates >= 0, "must be >= 0")


@dataclass(frozen=True)
class ArchiveSettings:
    uri: str = _f("var/archive", "Parquet archive root: a local path or any pyarrow filesystem URI")
    group_id: str = _f("plantwatch-archiver", "consumer group of the archivers")
    flush_rows: int = _f(200000, "a Parquet file is closed after this many readings")
    flush_seconds: float = _f(60.0, "… or after this many seconds")

    def __post_init__(self) -> None:
        _check_store_uri("archive.uri", self.uri)
        _check("archive.flush_rows", self.flush_rows >= 1, "must be >= 1")
        _check("archive.flush_seconds", self.flush_seconds > 0, "must be > 0")


@dataclass(frozen=True)
class StorageSettings:
    endpoint_url: str = _f("", "S3-compatible endpoint for s3:// registry and archive URIs (MinIO, Ceph, …), e.g. http://minio:9000; empty = AWS S3, or the AWS_ENDPOINT_URL environment variable")
    region: str = _f("", "region of the bucket; empty = AWS_REGION/AWS_DEFAULT_REGION, else us-east-1 with an endpoint_url, else looked up on AWS S3")
    access_key_id: str = _f("", "access key id; empty = pyarrow's usual sources (AWS_ACCESS_KEY_ID, profile, instance or workload identity)")
    secret_access_key: str = _secret("secret access key (prefer secret_access_key_file, or the PLANTWATCH_STORAGE__SECRET_ACCESS_KEY environment variable); never shown")
    secret_access_key_file: str = _f("", "file holding the secret access key (a mounted Kubernetes Secret), read whenever a filesystem is built; excludes secret_access_key")
    retry_attempts: int = _f(4, "tries of a registry publish (and of each registry write in it) before it fails; the archiver retries its writes until they succeed")
    retry_backoff_s: float = _f(1.0, "first wait before retrying a failed object store or disk write, doubled each time")
    retry_backoff_max_s: float = _f(30.0, "longest wait between retries")
    slow_s: float = _f(10.0, "a store write taking longer than this is logged as slow, with its duration")

    def __post_init__(self) -> None:
        p = "storage."
        if self.endpoint_url:
            _check(p + "endpoint_url", self.endpoint_url.split("://", 1)[0] in ("http", "https")
                   and "://" in self.endpoint_url, "must start with http:// or https://")
        _check(p + "secret_access_key_file", not (self.secret_access_key and self.secret_access_key_file),
               "set either secret_access_key or secret_access_key_file, not both")
        has_secret = bool(self.secret_access_key or self.secret_access_key_file)
        _check(p + "access_key_id", bool(self.access_key_id) == has_secret,
               "access_key_id and a secret access key (secret_access_key or secret_access_key_file) go together")
        if self.secret_access_key_file:
            read_secret_file(p + "secret_access_key_file", self.secret_access_key_file)  # fail at start-up
        _check(p + "retry_attempts", self.retry_attempts >= 1, "must be >= 1")
        _check(p + "retry_backoff_s", self.retry_backoff_s >= 0, "must be >= 0")
        _check(p + "retry_backoff_max_s", self.retry_backoff_max_s >= self.retry_backoff_s, "must be >= retry_backoff_s")
        _check(p + "slow_s", self.slow_s > 0, "must be > 0")

    def secret(self) -> str:
        """The secret access key: read from secret_access_key_file on each call, else secret_access_key."""
        if self.secret_access_key_file:
            return read_secret_file("storage.secret_access_key_file", self.secret_access_key_file)
        return self.secret_access_key


@dataclass(frozen=True)
class TrainerSettings:
    lookback_hours: float = _f(168.0, "training range: it ends at the start of the run and begins this many hours earlier")
    holdout_hours: float = _f(24.0, "newest hours of that range, kept out of training, on which the gate compares the new model with the serving one (0 = no gate)")
    gate_margin: float = _f(0.05, "the new model is refused only if a paired test over the held-out steps (95 % block bootstrap) shows it worse than the serving one by more than this fraction: its forecast error, or its alert fraction (plus gate_alert_tolerance)")
    gate_alert_tolerance: float = _f(0.002, "absolute room on the alert fraction (steps above threshold per held-out step) beyond gate_margin, so a serving model that never alerted does not veto one short excursion")
    fine_tune: bool = _f(True, "start training from the serving model's weights when its features and layers match; early stopping keeps those weights unless an epoch improves on them (false: from scratch)")
    interval_s: float = _f(86400.0, "plantwatch schedule: seconds between training runs when cron is empty")
    cron: str = _f("", "plantwatch schedule: 5-field cron expression in UTC (minute hour day-of-month month day-of-week); empty = every interval_s")
    lock_path: str = _f("var/trainer.lock", "lock file naming the running training job (host, pid, start, token) and its heartbeat: one run at a time, also across hosts sharing the file")
    lock_lease_s: float = _f(120.0, "the running job renews the lock's heartbeat every quarter of this; a lock whose heartbeat is older is taken over (a killed run, on any host)")
    lock_max_age_s: float = _f(43200.0, "a lock older than this is broken even if its heartbeat is fresh (a hung run)")
    exclude_alerts: bool = _f(True, "drop the periods covered by alerts on the alerts topic from the training and gate data (when a broker is configured)")
    labels_uri: str = _f("", "optional CSV/Parquet file of labelled abnormal periods (columns asset, start_ms, end_ms) to drop likewise")
    min_rows: int = _f(10000, "fewest readings, after exclusions, a training run accepts")

    def __post_init__(self) -> None:
        p = "trainer."
        _check(p + "lookback_hours", self.lookback_hours > 0, "must be > 0")
        _check(p + "holdout_hours", 0 <= self.holdout_hours < self.lookback_hours, "must be >= 0 and below lookback_hours")
        _check(p + "gate_margin", self.gate_margin >= 0, "must be >= 0")
        _check(p + "gate_alert_tolerance", 0 <= self.gate_alert_tolerance < 1, "must be in [0, 1)")
        _check(p + "interval_s", 0 < self.interval_s <= MAX_INTERVAL_S, f"must be > 0 and <= {MAX_INTERVAL_S:.0f} (a year)")
        _check(p + "cron", len(self.cron.split()) in (0, 5), "must have 5 fields: minute hour day-of-month month day-of-week")
        _check(p + "lock_path", bool(self.lock_path), "must not be empty")
        _check(p + "lock_lease_s", self.lock_lease_s >= 1, "must be >= 1")
        _check(p + "lock_max_age_s", self.lock_max_age_s > self.lock_lease_s, "must be > lock_lease_s")
        _check(p + "min_rows", self.min_rows >= 1, "must be >= 1")


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = _f("info", "log level")
    format: Literal["auto", "json", "console"] = _f("auto", "json lines, console, or auto (console on a terminal)")


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    grid: GridSettings = field(default_factory=GridSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    threshold: ThresholdSettings = field(default_factory=ThresholdSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        _check("archive.group_id", self.archive.group_id != self.detector.group_id,
               "must differ from detector.group_id: one group would split the partitions between archivers and "
               "detectors")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings)}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML value or a string (env/CLI) to the field's type, or refuse it."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        _check(key, value in allowed, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        _check(key, isinstance(items, (list, tuple)), f"must be a list, got {type(value).__name__}")
        return tuple(_coerce(key, item, v) for v in items)
    if hint is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            _check(key, low in {"true", "false", "1", "0", "yes", "no"}, f"must be true or false, got {value!r}")
            return low in {"true", "1", "yes"}
        _check(key, isinstance(value, bool), f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise SettingsError(key, f"must be an integer, got {value!r}") from None
        _check(key, isinstance(value, int) and not isinstance(value, bool), f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise SettingsError(key, f"must be a number, got {value!r}") from None
        else:
            _check(key, isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"must be a number, got {value!r}")
            number = float(value)
        _check(key, math.isfinite(number), f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        _check(key, isinstance(value, str), f"must be a string, got {value!r}")
        return value
    raise SettingsError(key, f"unsupported type {hint}")  # pragma: no cover - a programming error


def _merge(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    sections = _section_types()
    if section not in sections or not name:
        raise SettingsError(key, f"unknown section; expected one of {', '.join(sections)}")
    hints = typing.get_type_hints(sections[section])
    if name not in hints:
        raise SettingsError(key, f"unknown key; {section} has {', '.join(hints)}")
    secret = any(f.name == name and f.metadata.get("secret") for f in fields(sections[section]))
    try:
        tree.setdefault(section, {})[name] = _coerce(key, hints[name], value)
    except SettingsError:
        if not secret:
            raise
        raise SettingsError(key, "must be a string (value not shown)") from None


def _env_items(env: Mapping[str, str]) -> list[tuple[str, str]]:
    items = []
    sections = _section_types()
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" in name:
            section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
            items.append((f"{section}.{key}", value))
            continue
        # PLANTWATCH_DETECTOR_HTTP_PORT: a setting meant, with one underscore where two belong
        section = next((sec for sec in sections if name[len(ENV_PREFIX):].lower().startswith(sec + "_")), None)
        if section is not None:
            key = name[len(ENV_PREFIX) + len(section) + 1:]
            raise SettingsError(name, f"not read: a setting's variable has two underscores after the section, "
                                      f"e.g. {ENV_PREFIX}{section.upper()}__{key}")
    return sorted(items)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < TOML file < environment < overrides (CLI)."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise SettingsError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError("config", f"{path} is not UTF-8 text: {exc}") from None
        except OSError as exc:  # a directory, no permission, an I/O error
            raise SettingsError("config", f"cannot read {path}: {exc.strerror or exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise SettingsError(section, "must be a [section] table")
            for name, value in values.items():
                _merge(tree, f"{section}.{name}", value)
    for key, value in _env_items(os.environ if env is None else env):
        _merge(tree, key, value)
    for key, value in (overrides or {}).items():
        _merge(tree, key, value)
    sections = _section_types()
    return Settings(**{name: cls(**tree.get(name, {})) for name, cls in sections.items()})


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse CLI ``--set section.key=value`` pairs."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SettingsError(pair, "expected section.key=value")
        out[key.strip()] = value
    return out


def to_dict(settings: Settings, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """Settings as plain data (for logs and `plantwatch config`); set secrets show as "***"."""
    out = dataclasses.asdict(settings)
    for section in fields(settings) if redact else ():
        for f in fields(getattr(settings, section.name)):
            if f.metadata.get("secret") and out[section.name][f.name]:
                out[section.name][f.name] = "***"
    return out


def reference_markdown() -> str:
    """The configuration reference, generated from the fields above."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            type_name = _type_name(hints[f.name])
            lines.append(f"| `{section}.{f.name}` | {type_name} | `{shown}` | {f.metadata.get('doc', '')} |")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " \\| ".join(repr(a) if a else "''" for a in typing.get_args(hint))
    if origin is tuple:
        return f"list of {typing.get_args(hint)[0].__name__}"
    if isinstance(hint, types.GenericAlias):  # pragma: no cover
        return str(hint)
    return getattr(hint, "__name__", str(hint))
