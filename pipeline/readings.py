"""Reading schema and batch decoding of raw ``plant.readings`` record values.

Record formats (UTF-8 JSON objects; the Kafka key is the asset id)::

    wide    {"asset": "pump-7", "ts": 1583748873000, "values": {"Pressure": 1.2, "Current": 3.4}}
    narrow  {"asset": "pump-7", "sensor": "Pressure", "ts": "2020-03-09T10:14:33Z", "value": 1.2}

A wide record may carry any subset of the model's features. ``ts`` is either a number of
**milliseconds** since the Unix epoch or an ISO-8601 string (``2020-03-09T10:14:33Z``,
``2020-03-09 10:14:33.250``, ``2020-03-09T12:14:33+02:00``); a string without an offset is
UTC. Besides what :meth:`datetime.fromisoformat` reads (calendar and week dates, basic and
extended formats, reduced precision), ordinal dates (``2020-069``), the end of a day
(``T24:00``), a decimal fraction of the hour or minute (``T10:14,55`` is 10:14:33) and the
minus sign U+2212 in an offset are read as ISO 8601 defines them. Values are JSON numbers;
``true``/``false``, strings, ``null``, ``NaN`` and ``Infinity`` are refused.

A batch of plain readings (ASCII, no escapes, every field present and of its type) is parsed in
one call to pyarrow's JSON reader; a batch where any record could get another verdict from the
rules below is decoded record by record, so both give the same result. A wide record's rows come
in feature order.

A record with a ``"values"`` key is wide; one with ``"sensor"`` or ``"value"`` is narrow (so a
narrow record lacking one of the two is reported as ``missing_field``, which says more
than ``unknown_format``). Anything else is ``unknown_format``.

JSON nested deeper than ``DecodeLimits.max_depth`` (64) levels is ``malformed_json`` before it
is parsed, so no verdict depends on the recursion limit or the decoding thread's stack.

Decoding never raises on bad input and never drops a record silently: every record of a
batch either contributes rows to the result or appears exactly once in
:attr:`DecodedBatch.rejects` with one of :data:`REASONS`, so the consumer can route it
to the dead-letter topic and count it. A wide record is accepted or rejected whole, so a
grid step never receives half of a sensor snapshot.
"""

from __future__ import annotations

import calendar
import functools
import json
import math
import numbers
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

import numpy as np

from pipeline import fast_json

REASONS: tuple[str, ...] = (
    "empty",
    "oversize",
    "bad_encoding",
    "malformed_json",
    "not_object",
    "unknown_format",
    "missing_field",
    "bad_asset",
    "bad_timestamp",
    "absurd_timestamp",
    "bad_value",
    "non_finite",
    "unknown_feature",
    "empty_values",
)

_DETAIL_CHARS = 200
_SHOWN_CHARS = 60
_INT64_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_MISSING = object()
_WIDE_FIELDS = ("asset", "ts", "values")
_NARROW_FIELDS = ("asset", "ts", "sensor", "value")

Format = Literal["auto", "wide", "narrow"]
UnknownFeatures = Literal["reject", "ignore"]


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that produced no rows, and why (the DLQ header and metric label)."""

    index: int
    reason: str
    detail: str


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds beyond which a record is garbage rather than a reading."""

    max_record_bytes: int = 65536
    min_ts_ms: int = 946684800000  # 2000-01-01T00:00:00Z
    max_ts_ms: int = 7258118400000  # 2200-01-01T00:00:00Z
    max_asset_len: int = 256
    # JSON nesting (objects and arrays) beyond which a record is malformed_json: checked before
    # parsing, so no verdict depends on Python's recursion limit or the decoding thread's stack.
    max_depth: int = 64

    def __post_init__(self) -> None:
        if self.max_record_bytes <= 0 or self.max_asset_len <= 0:
            raise ValueError("max_record_bytes and max_asset_len must be > 0")
        if self.max_depth < 2:
            raise ValueError("max_depth must be >= 2 (a wide reading nests its values)")
        if not -_INT64_MAX <= self.min_ts_ms <= self.max_ts_ms <= _INT64_MAX:
            raise ValueError("need min_ts_ms <= max_ts_ms, both within int64")


@dataclass
class DecodedBatch:
    """Long format: one row per (record, feature) value."""

    record_index: np.ndarray  # int64 (n,), index of the source record in the input batch
    asset: np.ndarray  # object array of str (n,)
    ts_ms: np.ndarray  # int64 (n,)
    feature: np.ndarray  # int32 (n,), index into the `features` given to decode_batch
    value: np.ndarray  # float64 (n,)
    rejects: list[Reject]
    n_records: int  # number of input records

    def __len__(self) -> int:
        return len(self.value)

    def select(self, keep: np.ndarray, rejects: list[Reject] | None = None, n_records: int | None = None) -> DecodedBatch:
        """The rows where ``keep`` (bool, one per value) holds, with ``rejects`` and ``n_records``
        (default: the same; a caller that drops whole readings and counts them says how many remain)."""
        return DecodedBatch(self.record_index[keep], self.asset[keep], self.ts_ms[keep], self.feature[keep],
                            self.value[keep], self.rejects if rejects is None else rejects,
                            self.n_records if n_records is None else n_records)


class _Rejected(Exception):
    """Internal signal: the record being decoded is unusable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _clip(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: object) -> str:
    """A short repr of part of a payload, safe to put in a detail."""
    return _clip(repr(value), _SHOWN_CHARS)


# ---------------------------------------------------------------- timestamps


def parse_timestamp_ms(ts: object) -> int:
    """Epoch milliseconds from a number of ms, an ISO-8601 string or a datetime.

    Fractions of a millisecond are floored, so a string and its numeric twin agree.
    Naive strings and datetimes are UTC. Raises ValueError (never another error) for
    bools, non-finite numbers, unparsable strings and other types.
    """
    if isinstance(ts, (bool, np.bool_)):
        raise ValueError(f"timestamp is a boolean: {ts!r}")
    if isinstance(ts, numbers.Integral):
        return int(ts)
    if isinstance(ts, numbers.Real):
        as_float = float(ts)
        if not math.isfinite(as_float):
            raise ValueError(f"timestamp is not finite: {as_float!r}")
        return math.floor(as_float)
    if isinstance(ts, str):
        return _iso_ms(ts)
    if isinstance(ts, datetime):
        return _datetime_ms(ts)
    raise ValueError(f"timestamp must be a number of ms or an ISO-8601 string, not {type(ts).__name__}")


# A decimal fraction right after the hour or the minute: fromisoformat reads it as a fraction
# of a second (``22:13,5`` as 22:13:00.5, not 22:13:30), so such strings take the slow path.
_FRACTION_OF_HOUR_OR_MINUTE = re.compile(r"[T ]\d\d(?::?\d\d)?[.,]\d", re.ASCII)
_ORDINAL_DATE = re.compile(r"(?P<year>\d{4})-?(?P<day>\d{3})(?=[T ]|\Z)", re.ASCII)
# hh[:mm[:ss]] or hhmm[ss], then a decimal fraction of the last of them, then the offset.
_TIME_OF_DAY = re.compile(
    r"(?P<h>\d\d)(?:(?P<sep>:?)(?P<m>\d\d)(?:(?P=sep)(?P<s>\d\d))?)?"
    r"(?:[.,](?P<frac>\d+))?(?P<zone>\s*(?:Z|[+-]\d\d(?::?\d\d)?)?)\Z", re.ASCII)
_US_PER_DAY = 86_400_000_000


def _iso_ms(text: str) -> int:
    iso = text.strip().upper().replace("\u2212", "-")  # ISO 8601's minus sign in an offset
    error: ValueError | None = None
    if not _FRACTION_OF_HOUR_OR_MINUTE.search(iso):
        try:
            return _datetime_ms(datetime.fromisoformat(iso))
        except ValueError as err:
            error = err
    try:
        parsed = _iso_beyond_fromisoformat(iso)
    except (ValueError, OverflowError) as err:
        raise ValueError(f"unparsable ISO-8601 timestamp {_shown(text)}: {error or err}") from None
    return _datetime_ms(parsed)


def _iso_beyond_fromisoformat(iso: str) -> datetime:
    """The ISO 8601 forms fromisoformat misses or misreads: ordinal dates, ``24:00`` (the end of
    the day) and a decimal fraction of the hour or minute. Raises ValueError or OverflowError."""
    ordinal = _ORDINAL_DATE.match(iso)
    if ordinal is not None:
        year, day = int(ordinal["year"]), int(ordinal["day"])
        if not 1 <= day <= 365 + calendar.isleap(year):
            raise ValueError(f"day of the year {day} out of range")
        iso = (date(year, 1, 1) + timedelta(days=day - 1)).isoformat() + iso[ordinal.end():]
    cut = min((i for i in (iso.find("T"), iso.find(" ")) if i >= 0), default=-1)
    clock = _TIME_OF_DAY.match(iso, cut + 1) if cut >= 0 else None
    if clock is None:
        return datetime.fromisoformat(iso)
    hours, minutes, seconds = int(clock["h"]), int(clock["m"] or 0), int(clock["s"] or 0)
    if hours > 24 or minutes > 59 or seconds > 59:
        raise ValueError("hour, minute or second out of range")
    unit_us = 1_000_000 if clock["s"] else 60_000_000 if clock["m"] else 3_600_000_000
    frac = clock["frac"] or "0"
    us = ((hours * 60 + minutes) * 60 + seconds) * 1_000_000 + int(frac) * unit_us // 10 ** len(frac)
    if hours == 24 and us != _US_PER_DAY:
        raise ValueError("only 24:00 itself, the end of the day, may have hour 24")
    days, us = divmod(us, _US_PER_DAY)
    hh, us = divmod(us, 3_600_000_000)
    mm, us = divmod(us, 60_000_000)
    ss, us = divmod(us, 1_000_000)
    clock_text = f"{hh:02d}:{mm:02d}:{ss:02d}.{us:06d}{clock['zone']}"
    return datetime.fromisoformat(f"{iso[:cut]}T{clock_text}") + timedelta(days=days)


def _datetime_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MS


# ---------------------------------------------------------------- encoding


def encode_wide(asset: str, ts_ms: int, values: Mapping[str, float]) -> bytes:
    """Compact JSON of one wide record (numpy scalars accepted)."""
    payload = {"asset": asset, "ts": int(ts_ms), "values": {name: float(v) for name, v in values.items()}}
    return json.dumps(payload, separators=(",", ":")).encode()


def encode_narrow(asset: str, ts_ms: int, sensor: str, value: float) -> bytes:
    """Compact JSON of one narrow record (numpy scalars accepted)."""
    payload = {"asset": asset, "sensor": sensor, "ts": int(ts_ms), "value": float(value)}
    return json.dumps(payload, separators=(",", ":")).encode()


# ---------------------------------------------------------------- per-record steps


def _load(raw: bytes | str | None, limits: DecodeLimits) -> dict[str, object]:
    """Bytes to a JSON object; the cheap size checks come before any parsing."""
    if raw is None or len(raw) == 0:
        raise _Rejected("empty", "no value")
    if isinstance(raw, bytes):
        _check_size(len(raw), limits)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Rejected("bad_encoding", f"not UTF-8: {err.reason} at byte {err.start}") from None
    elif isinstance(raw, str):
        text = raw
        if len(text) * 4 > limits.max_record_bytes:  # only then can the UTF-8 form be too long
            _check_size(len(text.encode("utf-8", "surrogatepass")), limits)
    else:
        raise TypeError(f"record values must be bytes, str or None, not {type(raw).__name__}")
    # Nesting is bounded before json.loads recurses into it; only a record with more opening
    # brackets than the bound pays for measuring it.
    if text.count("{") + text.count("[") > limits.max_depth and _nesting_depth(text) > limits.max_depth:
        raise _Rejected("malformed_json", f"nested deeper than {limits.max_depth} levels")
    try:  # NaN, 1e400 and lone surrogates parse as before, and get their own reasons below
        obj = fast_json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError covers JSONDecodeError and int-digit limits
        raise _Rejected("malformed_json", _clip(str(err) or type(err).__name__)) from None
    if type(obj) is not dict:
        raise _Rejected("not_object", f"JSON {type(obj).__name__}, expected an object")
    return obj


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _nesting_depth(text: str) -> int:
    """Deepest nesting of objects and arrays in JSON text, brackets inside strings not counted
    (an unterminated string's brackets are: such text is malformed anyway)."""
    data = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8", "surrogatepass"), np.uint8)
    opens = (data == 0x5B) | (data == 0x7B)
    closes = (data == 0x5D) | (data == 0x7D)
    return int(np.cumsum(opens.astype(np.int32) - closes).max(initial=0))


def _check_size(n_bytes: int, limits: DecodeLimits) -> None:
    if n_bytes > limits.max_record_bytes:
        raise _Rejected("oversize", f"{n_bytes} bytes > {limits.max_record_bytes}")


def _fields(obj: dict[str, object], fmt: Format) -> tuple[str, tuple[object, ...]]:
    """The record's format and its payload fields, after format detection."""
    get = obj.get
    if fmt == "wide" or (fmt == "auto" and "values" in obj):
        kind, got = "wide", (get("asset", _MISSING), get("ts", _MISSING), get("values", _MISSING))
        names: tuple[str, ...] = _WIDE_FIELDS
    elif fmt == "narrow" or "sensor" in obj or "value" in obj:
        kind, got = "narrow", (get("asset", _MISSING), get("ts", _MISSING), get("sensor", _MISSING), get("value", _MISSING))
        names = _NARROW_FIELDS
    else:
        raise _Rejected("unknown_format", f"neither wide nor narrow; keys {_shown(sorted(obj)[:8])}")
    if any(field is _MISSING for field in got):
        missing = [name for name, field in zip(names, got) if field is _MISSING]
        raise _Rejected("missing_field", f"{kind} record without {', '.join(missing)}")
    return kind, got


def _asset(asset: object, limits: DecodeLimits) -> str:
    if type(asset) is not str or not asset:
        raise _Rejected("bad_asset", f"asset must be a non-empty string, got {_shown(asset)}")
    if len(asset) > limits.max_asset_len:
        raise _Rejected("bad_asset", f"asset longer than {limits.max_asset_len} chars")
    if not asset.isprintable() and any(unicodedata.category(ch) in ("Cc", "Cs") for ch in asset):
        raise _Rejected("bad_asset", f"asset with control or surrogate characters: {_shown(asset)}")
    return asset


def _ts_ms(ts: object, limits: DecodeLimits) -> int:
    if type(ts) is int:
        ms = ts
    else:
        try:
            ms = parse_timestamp_ms(ts)
        except ValueError as err:
            raise _Rejected("bad_timestamp", _clip(str(err))) from None
    if not limits.min_ts_ms <= ms <= limits.max_ts_ms:
        raise _Rejected("absurd_timestamp", f"ts {_clip(str(ms), _SHOWN_CHARS)} ms outside [{limits.min_ts_ms}, {limits.max_ts_ms}]")
    return ms


def _number(name: str, value: object) -> float:
    """A reading value as float; NaN/inf pass here and are caught vectorised later."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[return-value]
    if kind is int:
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise _Rejected("non_finite", f"{_shown(name)}: integer beyond float range") from None
    raise _Rejected("bad_value", f"{_shown(name)}: {kind.__name__} {_shown(value)} is not a number")


def _wide_values(
    values: object, index: Mapping[str, int], ignore_unknown: bool, features_out: list[int], values_out: list[float]
) -> int:
    """Append a wide record's (feature, value) pairs, all or nothing; returns how many."""
    if type(values) is not dict:
        raise _Rejected("bad_value", f"values must be an object, got {type(values).__name__}")
    if not values:
        raise _Rejected("empty_values", "values is an empty object")
    start = len(features_out)
    try:
        for name, value in values.items():
            feature = index.get(name)
            if feature is None:
                if ignore_unknown:
                    continue
                raise _Rejected("unknown_feature", f"unknown feature {_shown(name)}")
            features_out.append(feature)
            values_out.append(value if type(value) is float else _number(name, value))  # type: ignore[arg-type]
    except _Rejected:
        del features_out[start:], values_out[start:]
        raise
    if len(features_out) == start:
        raise _Rejected("unknown_feature", f"no known feature among {_shown(sorted(values)[:8])}")
    return len(features_out) - start


def _narrow_value(
    sensor: object, value: object, index: Mapping[str, int], features_out: list[int], values_out: list[float]
) -> int:
    feature = index.get(sensor) if type(sensor) is str else None
    if feature is None:
        raise _Rejected("unknown_feature", f"unknown sensor {_shown(sensor)}")
    number = _number(sensor, value)  # type: ignore[arg-type]
    features_out.append(feature)
    values_out.append(number)
    return 1


# ---------------------------------------------------------------- batch


@dataclass
class _Columns:
    """Per-record columns (index, asset, ts, row count) and per-row columns (feature, value)."""

    records: list[int]
    assets: list[str]
    ts: list[int]
    counts: list[int]
    features: list[int]
    values: list[float]


def decode_batch(
    records: Sequence[bytes | str | None],
    features: Sequence[str],
    *,
    fmt: Format = "auto",
    limits: DecodeLimits = DecodeLimits(),
    unknown_features: UnknownFeatures = "reject",
) -> DecodedBatch:
    """Decode raw record values in one pass into long-format columns plus rejects.

    ``features`` fixes the feature order: ``DecodedBatch.feature`` indexes into it.
    Rejects are sorted by record index.
    """
    index = _feature_index(features)
    if fmt not in ("auto", "wide", "narrow"):
        raise ValueError(f"fmt must be 'auto', 'wide' or 'narrow', not {fmt!r}")
    if unknown_features not in ("reject", "ignore"):
        raise ValueError(f"unknown_features must be 'reject' or 'ignore', not {unknown_features!r}")
    ignore_unknown = unknown_features == "ignore"
    # A feature outside ``features`` fails the columnar parse, so it decodes record by record in
    # either mode: the columnar result is the same whether unknown features are refused or ignored.
    columnar = _decode_columnar(records, features, index, fmt, limits)
    if columnar is not None:
        return columnar
    cols = _Columns([], [], [], [], [], [])
    rejects: list[Reject] = []
    n_records = 0
    for i, raw in enumerate(records):
        n_records += 1
        try:
            kind, got = _fields(_load(raw, limits), fmt)
            asset = _asset(got[0], limits)
            ts = _ts_ms(got[1], limits)
            if kind == "wide":
                count = _wide_values(got[2], index, ignore_unknown, cols.features, cols.values)
            else:
                count = _narrow_value(got[2], got[3], index, cols.features, cols.values)
        except _Rejected as rejected:
            rejects.append(Reject(i, rejected.reason, rejected.detail))
            continue
        cols.records.append(i)
        cols.assets.append(asset)
        cols.ts.append(ts)
        cols.counts.append(count)
    return _assemble(cols, rejects, features, n_records)


# ---------------------------------------------------------------- batch, columnar

# Below this many records the per-record path is as fast as one call into pyarrow.
COLUMNAR_MIN_RECORDS = 32
# The reader parses blocks of this size on pyarrow's thread pool, in order: a poll of 20,000 wide
# readings took 16 ms in 256 KB blocks on two cores against 25 ms in one block; 100 readings, 0.27 ms
# against 0.30.
JSON_BLOCK_BYTES = 1 << 18
_OPEN, _CLOSE = ord("{"), ord("}")
_NULL = re.compile(rb"null")  # a null value reads as an absent one in the reader: the per-record rules refuse it


def _decode_columnar(records: Sequence[bytes | str | None], features: Sequence[str], index: Mapping[str, int],
                     fmt: Format, limits: DecodeLimits) -> DecodedBatch | None:
    """The whole batch through pyarrow's JSON reader (C++, in blocks on its thread pool; in one block
    and one thread 2.6 µs a wide reading of 8 values against 4.1 parsed one by one), or None when any
    record might need the per-record rules: then nothing of this is used.

    Taken only when no verdict can differ. Every record is ASCII bytes within the size limit,
    without a backslash (an escape) or, wide, a ``null``, and starts with ``{`` and ends with
    ``}``: such a line is one object or several, or an error, and none continues into the next,
    so with as many rows as records each record is its own row. The reader refuses unknown
    fields, duplicate keys and values of the wrong JSON type; no field may be missing, no value
    non-finite or a negative zero, no timestamp or asset outside the limits. A wide record's rows
    come in feature order, as the per-record path gives them.
    """
    n = len(records)
    if n < COLUMNAR_MIN_RECORDS:
        return None
    try:
        lengths = np.fromiter(map(len, records), np.int64, n)  # type: ignore[arg-type]
        buf = b"\n".join(records)  # type: ignore[arg-type]
    except TypeError:  # a None or a str among them
        return None
    if lengths.min() == 0 or lengths.max() > limits.max_record_bytes or not buf.isascii() or b"\\" in buf:
        return None
    data = np.frombuffer(buf, np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths[:-1] + 1)))
    if not ((data[starts] == _OPEN).all() and (data[starts + lengths - 1] == _CLOSE).all()):
        return None
    wide = fmt == "wide" or (fmt == "auto" and b'"values"' in records[0])  # type: ignore[operator]
    if wide and _NULL.search(buf):
        return None
    import pyarrow as pa
    import pyarrow.json as pa_json

    try:
        block = max(JSON_BLOCK_BYTES, int(lengths.max()) + 2)  # a block holds at least one whole record
        table = pa_json.read_json(pa.BufferReader(buf), parse_options=_parse_options(tuple(features), wide),
                                  read_options=pa_json.ReadOptions(use_threads=True, block_size=block))
    except pa.ArrowException:
        return None
    if table.num_rows != n or any(table.column(c).null_count for c in table.column_names):
        return None
    ts = table.column("ts").to_numpy()
    if ts.min() < limits.min_ts_ms or ts.max() > limits.max_ts_ms:
        return None
    assets = table.column("asset").to_numpy(zero_copy_only=False)
    try:
        for asset in set(assets.tolist()):
            _asset(asset, limits)
    except _Rejected:
        return None
    if wide:
        values = table.column("values").combine_chunks()
        fields = [values.field(i) for i in range(len(features))]
        present = np.column_stack([f.is_valid().to_numpy(zero_copy_only=False) for f in fields])
        if not present.any(axis=1).all():
            return None
        record, feature = np.nonzero(present)  # record by record, each in feature order
        value = np.column_stack([f.to_numpy(zero_copy_only=False) for f in fields])[record, feature]
    else:
        sensors = table.column("sensor").combine_chunks().dictionary_encode()
        codes = [index.get(name) for name in sensors.dictionary.to_pylist()]
        if None in codes:
            return None
        record = np.arange(n)
        feature = np.asarray(codes, np.int64)[sensors.indices.to_numpy(zero_copy_only=False)]
        value = table.column("value").to_numpy()
    if not np.isfinite(value).all() or np.signbit(value[value == 0]).any():  # JSON's integer -0 is +0.0 in Python
        return None
    return DecodedBatch(record.astype(np.int64), assets[record], ts[record], feature.astype(np.int32),
                        value.astype(np.float64), [], n)


@functools.lru_cache(maxsize=16)
def _parse_options(features: tuple[str, ...], wide: bool) -> Any:
    """The reader's schema of a plain reading: fields of the wrong type, or unknown, fail it."""
    import pyarrow as pa
    import pyarrow.json as pa_json

    payload = ([("values", pa.struct([(f, pa.float64()) for f in features]))] if wide
               else [("sensor", pa.string()), ("value", pa.float64())])
    schema = pa.schema([("asset", pa.string()), ("ts", pa.int64()), *payload])
    return pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error", newlines_in_values=True)


def _feature_index(features: Iterable[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, name in enumerate(features):
        if name in index:
            raise ValueError(f"duplicate feature name {name!r}")
        index[name] = position
    if not index:
        raise ValueError("features must not be empty")
    return index


def _assemble(cols: _Columns, rejects: list[Reject], features: Sequence[str], n_records: int) -> DecodedBatch:
    """Lists to arrays; records holding a NaN/inf value are moved to the rejects whole."""
    counts = np.asarray(cols.counts, dtype=np.int64)
    record_index = np.asarray(cols.records, dtype=np.int64)
    assets = np.empty(len(cols.assets), dtype=object)
    assets[:] = cols.assets
    ts_ms = np.asarray(cols.ts, dtype=np.int64)
    feature = np.asarray(cols.features, dtype=np.int32)
    value = np.asarray(cols.values, dtype=np.float64)
    row_record = np.repeat(np.arange(len(counts)), counts)
    if len(feature) > 1 and ((np.diff(feature) < 0) & (np.diff(row_record) == 0)).any():
        order = np.lexsort((feature, row_record))  # each record's rows in feature order, not key order
        feature, value = feature[order], value[order]
    finite = np.isfinite(value)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite)
        bad_records, first = np.unique(row_record[bad_rows], return_index=True)
        for record, row in zip(bad_records.tolist(), bad_rows[first].tolist()):
            detail = f"{_shown(features[int(feature[row])])}: {float(value[row])!r}"
            rejects.append(Reject(int(record_index[record]), "non_finite", detail))
        rejects.sort(key=lambda reject: reject.index)
        keep_record = np.ones(len(counts), dtype=bool)
        keep_record[bad_records] = False
        keep_row = keep_record[row_record]
        record_index, assets, ts_ms, counts = record_index[keep_record], assets[keep_record], ts_ms[keep_record], counts[keep_record]
        feature, value = feature[keep_row], value[keep_row]
    return DecodedBatch(
        record_index=np.repeat(record_index, counts),
        asset=np.repeat(assets, counts),
        ts_ms=np.repeat(ts_ms, counts),
        feature=feature,
        value=value,
        rejects=rejects,
        n_records=n_records,
    )
