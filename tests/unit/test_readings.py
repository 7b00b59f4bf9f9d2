"""Batch decoding of raw reading records: formats, timestamps, rejects and accounting."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.readings import (
    REASONS,
    DecodedBatch,
    DecodeLimits,
    Reject,
    decode_batch,
    encode_narrow,
    encode_wide,
    parse_timestamp_ms,
)
from tests import iso_variants

FEATURES = ("Pressure", "Current", "Temperature")
TS = 1583748873000  # 2020-03-09T10:14:33Z


def _one_reject(record: bytes | str | None, **kwargs: object) -> Reject:
    batch = decode_batch([record], FEATURES, **kwargs)  # type: ignore[arg-type]
    assert len(batch) == 0
    assert batch.n_records == 1
    assert len(batch.rejects) == 1
    assert batch.rejects[0].index == 0
    return batch.rejects[0]


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- formats


def test_wide_record_gives_one_row_per_value_in_feature_order() -> None:
    record = encode_wide("pump-7", TS, {"Temperature": 61.5, "Pressure": 1.25})
    batch = decode_batch([record], FEATURES)
    assert batch.rejects == []
    assert len(batch) == 2
    assert batch.record_index.tolist() == [0, 0]
    assert batch.asset.tolist() == ["pump-7", "pump-7"]
    assert batch.ts_ms.tolist() == [TS, TS]
    assert batch.feature.tolist() == [0, 2]  # feature order, whatever the record's key order
    assert batch.value.tolist() == [1.25, 61.5]


def test_narrow_record_gives_one_row() -> None:
    batch = decode_batch([encode_narrow("pump-7", TS, "Current", 3.5)], FEATURES)
    assert batch.rejects == []
    assert batch.record_index.tolist() == [0]
    assert batch.asset.tolist() == ["pump-7"]
    assert batch.ts_ms.tolist() == [TS]
    assert batch.feature.tolist() == [1]
    assert batch.value.tolist() == [3.5]


def test_column_dtypes() -> None:
    batch = decode_batch([encode_wide("a", TS, {"Pressure": 1.0})], FEATURES)
    assert batch.record_index.dtype == np.int64
    assert batch.asset.dtype == object
    assert batch.ts_ms.dtype == np.int64
    assert batch.feature.dtype == np.int32
    assert batch.value.dtype == np.float64


def test_empty_batch_has_typed_empty_columns() -> None:
    batch = decode_batch([], FEATURES)
    assert (len(batch), batch.n_records, batch.rejects) == (0, 0, [])
    assert batch.ts_ms.dtype == np.int64 and batch.feature.dtype == np.int32 and batch.asset.dtype == object


def test_mixed_formats_and_str_input_in_one_batch() -> None:
    records = [
        encode_narrow("b", TS + 1, "Pressure", 2.0),
        encode_wide("a", TS, {"Current": 1.0, "Pressure": 0.5}).decode(),
        None,
        '{"asset": "c", "ts": 1583748873002, "sensor": "Temperature", "value": 7}',
    ]
    batch = decode_batch(records, FEATURES)
    assert batch.record_index.tolist() == [0, 1, 1, 3]
    assert batch.asset.tolist() == ["b", "a", "a", "c"]
    assert batch.ts_ms.tolist() == [TS + 1, TS, TS, TS + 2]
    assert batch.feature.tolist() == [0, 0, 1, 2]  # a wide record's rows in feature order
    assert batch.value.tolist() == [2.0, 0.5, 1.0, 7.0]
    assert [(r.index, r.reason) for r in batch.rejects] == [(2, "empty")]


def test_ints_are_values_and_unicode_assets_are_fine() -> None:
    batch = decode_batch([_json({"asset": "Pumpe-Süd 3", "ts": TS, "values": {"Current": 4}})], FEATURES)
    assert batch.asset.tolist() == ["Pumpe-Süd 3"]
    assert batch.value.tolist() == [4.0]


def test_forced_format_overrides_detection() -> None:
    wide_looking = _json({"asset": "a", "ts": TS, "values": {"Pressure": 1.0}})
    assert _one_reject(wide_looking, fmt="narrow").detail == "narrow record without sensor, value"
    narrow = encode_narrow("a", TS, "Pressure", 1.0)
    assert _one_reject(narrow, fmt="wide").detail == "wide record without values"
    assert decode_batch([narrow], FEATURES, fmt="narrow").value.tolist() == [1.0]


def test_unknown_features_ignored_on_request() -> None:
    record = encode_wide("a", TS, {"Vibration": 9.0, "Pressure": 1.0, "Humidity": 0.4})
    batch = decode_batch([record], FEATURES, unknown_features="ignore")
    assert batch.rejects == []
    assert batch.feature.tolist() == [0]
    assert batch.value.tolist() == [1.0]


def test_ignoring_unknown_features_still_rejects_a_record_with_none_known() -> None:
    reject = _one_reject(encode_wide("a", TS, {"Vibration": 9.0}), unknown_features="ignore")
    assert reject.reason == "unknown_feature"
    narrow = _one_reject(encode_narrow("a", TS, "Vibration", 9.0), unknown_features="ignore")
    assert narrow.reason == "unknown_feature"


def test_a_wide_record_with_one_bad_value_is_rejected_whole() -> None:
    good = encode_wide("a", TS, {"Pressure": 1.0})
    bad = _json({"asset": "b", "ts": TS, "values": {"Pressure": 2.0, "Current": "3.0", "Temperature": 4.0}})
    batch = decode_batch([good, bad, good], FEATURES)
    assert batch.record_index.tolist() == [0, 2]
    assert batch.asset.tolist() == ["a", "a"]
    assert [(r.index, r.reason) for r in batch.rejects] == [(1, "bad_value")]


def test_a_non_finite_value_rejects_the_whole_record_and_keeps_neighbours() -> None:
    records = [
        encode_wide("a", TS, {"Pressure": 1.0, "Current": 2.0}),
        b'{"asset":"b","ts":1583748873000,"values":{"Pressure":5.0,"Current":NaN,"Temperature":Infinity}}',
        b'{"asset":"c","ts":"nope","values":{"Pressure":1.0}}',
        encode_wide("d", TS + 5, {"Temperature": 3.0, "Current": 4.0}),
        encode_narrow("e", TS, "Current", float("-inf")),
    ]
    batch = decode_batch(records, FEATURES)
    assert batch.record_index.tolist() == [0, 0, 3, 3]
    assert batch.asset.tolist() == ["a", "a", "d", "d"]
    assert batch.ts_ms.tolist() == [TS, TS, TS + 5, TS + 5]
    assert batch.feature.tolist() == [0, 1, 1, 2]
    assert batch.value.tolist() == [1.0, 2.0, 4.0, 3.0]
    assert [(r.index, r.reason, r.detail) for r in batch.rejects] == [
        (1, "non_finite", "'Current': nan"),
        (2, "bad_timestamp", batch.rejects[1].detail),
        (4, "non_finite", "'Current': -inf"),
    ]


def test_last_duplicate_json_key_wins() -> None:
    batch = decode_batch([b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1,"Pressure":2}}'], FEATURES)
    assert batch.value.tolist() == [2.0]


# ---------------------------------------------------------------- every reject reason

_WIDE_OK = {"asset": "a", "ts": TS, "values": {"Pressure": 1.0}}

REASON_EXAMPLES: list[tuple[str, bytes | str | None]] = [
    ("empty", None),
    ("empty", b""),
    ("empty", ""),
    ("oversize", _json({**_WIDE_OK, "pad": "x" * 70_000})),
    ("oversize", json.dumps({**_WIDE_OK, "pad": "é" * 40_000}, ensure_ascii=False)),  # 80 kB as UTF-8
    ("bad_encoding", b'{"asset":"\xff\xfe","ts":1583748873000,"values":{"Pressure":1.0}}'),
    ("bad_encoding", json.dumps(_WIDE_OK).encode("utf-16")),
    ("malformed_json", b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1.0}'),
    ("malformed_json", b"not json"),
    ("malformed_json", b"[" * 60_000 + b"]" * 5_000),  # nesting deep enough to exhaust recursion
    ("malformed_json", b'{"asset":"a","ts":' + b"9" * 5_000 + b',"values":{"Pressure":1.0}}'),  # int digit limit
    ("not_object", b"[1, 2]"),
    ("not_object", b'"pump-7"'),
    ("not_object", b"null"),
    ("unknown_format", _json({"asset": "a", "ts": TS, "Pressure": 1.0})),
    ("missing_field", _json({"ts": TS, "values": {"Pressure": 1.0}})),
    ("missing_field", _json({"asset": "a", "values": {"Pressure": 1.0}})),
    ("missing_field", _json({"asset": "a", "ts": TS, "sensor": "Pressure"})),
    ("missing_field", _json({"asset": "a", "ts": TS, "value": 1.0})),
    ("bad_asset", _json({**_WIDE_OK, "asset": ""})),
    ("bad_asset", _json({**_WIDE_OK, "asset": 7})),
    ("bad_asset", _json({**_WIDE_OK, "asset": None})),
    ("bad_asset", _json({**_WIDE_OK, "asset": "pump\n7"})),
    ("bad_asset", _json({**_WIDE_OK, "asset": "pump\u00857"})),  # C1 control character
    ("bad_asset", b'{"asset":"pump\\ud8007","ts":1583748873000,"values":{"Pressure":1.0}}'),  # lone surrogate
    ("bad_asset", _json({**_WIDE_OK, "asset": "p" * 257})),
    ("bad_timestamp", _json({**_WIDE_OK, "ts": True})),
    ("bad_timestamp", _json({**_WIDE_OK, "ts": None})),
    ("bad_timestamp", _json({**_WIDE_OK, "ts": "yesterday"})),
    ("bad_timestamp", _json({**_WIDE_OK, "ts": "2020-13-09T10:14:33Z"})),
    ("bad_timestamp", _json({**_WIDE_OK, "ts": [TS]})),
    ("bad_timestamp", b'{"asset":"a","ts":NaN,"values":{"Pressure":1.0}}'),
    ("absurd_timestamp", _json({**_WIDE_OK, "ts": 1583748873})),  # seconds, not ms: 1970
    ("absurd_timestamp", _json({**_WIDE_OK, "ts": -1})),
    ("absurd_timestamp", _json({**_WIDE_OK, "ts": 10**30})),
    ("absurd_timestamp", _json({**_WIDE_OK, "ts": "2250-01-01T00:00:00Z"})),
    ("absurd_timestamp", _json({**_WIDE_OK, "ts": 1e300})),
    ("bad_value", _json({**_WIDE_OK, "values": {"Pressure": "1.0"}})),
    ("bad_value", _json({**_WIDE_OK, "values": {"Pressure": True}})),
    ("bad_value", _json({**_WIDE_OK, "values": {"Pressure": None}})),
    ("bad_value", _json({**_WIDE_OK, "values": {"Pressure": [1.0]}})),
    ("bad_value", _json({**_WIDE_OK, "values": {"Pressure": {"v": 1.0}}})),
    ("bad_value", _json({**_WIDE_OK, "values": [1.0, 2.0]})),
    ("bad_value", _json({**_WIDE_OK, "values": None})),
    ("bad_value", _json({"asset": "a", "ts": TS, "sensor": "Pressure", "value": False})),
    ("bad_value", _json({"asset": "a", "ts": TS, "sensor": "Pressure", "value": None})),
    ("non_finite", b'{"asset":"a","ts":1583748873000,"values":{"Pressure":NaN}}'),
    ("non_finite", b'{"asset":"a","ts":1583748873000,"values":{"Pressure":-Infinity}}'),
    ("non_finite", b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1e400}}'),
    ("non_finite", b'{"asset":"a","ts":1583748873000,"values":{"Pressure":' + b"9" * 400 + b"}}"),
    ("non_finite", b'{"asset":"a","ts":1583748873000,"sensor":"Pressure","value":Infinity}'),
    ("unknown_feature", _json({**_WIDE_OK, "values": {"Pressure": 1.0, "Vibration": 2.0}})),
    ("unknown_feature", _json({**_WIDE_OK, "values": {"pressure": 1.0}})),  # names are case-sensitive
    ("unknown_feature", encode_narrow("a", TS, "Vibration", 1.0)),
    ("unknown_feature", _json({"asset": "a", "ts": TS, "sensor": 3, "value": 1.0})),
    ("empty_values", _json({**_WIDE_OK, "values": {}})),
]


@pytest.mark.parametrize(("reason", "record"), REASON_EXAMPLES)
def test_reject_reason(reason: str, record: bytes | str | None) -> None:
    reject = _one_reject(record)
    assert reject.reason == reason, reject.detail
    assert 0 < len(reject.detail) <= 200


def test_every_reason_has_an_example() -> None:
    assert sorted({reason for reason, _ in REASON_EXAMPLES}) == sorted(REASONS)
    assert len(set(REASONS)) == len(REASONS)


def test_reject_details_are_short_and_say_what_is_wrong() -> None:
    long_asset = _one_reject(_json({**_WIDE_OK, "asset": "p" * 5000}))
    assert long_asset.detail == "asset longer than 256 chars"
    padded = _json({**_WIDE_OK, "pad": "x" * 70_000})
    assert _one_reject(padded).detail == f"{len(padded)} bytes > 65536"
    huge_name = _one_reject(_json({**_WIDE_OK, "values": {"V" * 10_000: 1.0}}))
    assert huge_name.reason == "unknown_feature" and len(huge_name.detail) <= 200
    assert _one_reject(_json({**_WIDE_OK, "values": {"Pressure": "high"}})).detail == "'Pressure': str 'high' is not a number"
    assert _one_reject(_json({"ts": TS, "values": {}})).detail == "wide record without asset"
    assert _one_reject(b'{"asset":"a","ts":2}').detail.startswith("neither wide nor narrow; keys ['asset', 'ts']")
    absurd = _one_reject(_json({**_WIDE_OK, "ts": 1583748873}))
    assert absurd.detail == "ts 1583748873 ms outside [946684800000, 7258118400000]"


def test_custom_limits() -> None:
    limits = DecodeLimits(max_record_bytes=80, min_ts_ms=TS, max_ts_ms=TS + 1000, max_asset_len=3)
    records = [
        encode_wide("abc", TS + 1000, {"Pressure": 1.0}),
        encode_wide("abcd", TS, {"Pressure": 1.0}),
        encode_wide("abc", TS - 1, {"Pressure": 1.0}),
        encode_wide("abc", TS, {"Pressure": 1.0, "Current": 2.0, "Temperature": 3.0}),
    ]
    batch = decode_batch(records, FEATURES, limits=limits)
    assert batch.record_index.tolist() == [0]
    assert [(r.index, r.reason) for r in batch.rejects] == [(1, "bad_asset"), (2, "absurd_timestamp"), (3, "oversize")]


def test_impossible_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="min_ts_ms"):
        DecodeLimits(min_ts_ms=2, max_ts_ms=1)
    with pytest.raises(ValueError, match="max_record_bytes"):
        DecodeLimits(max_record_bytes=0)
    with pytest.raises(ValueError, match="max_depth"):
        DecodeLimits(max_depth=1)


def _nested(levels: int) -> bytes:
    """A wide record nesting ``levels`` objects in all (the record, its values, then ``{"k": …}``)."""
    return (f'{{"asset":"a","ts":{TS},"values":' + '{"k":' * (levels - 1) + "1" + "}" * levels).encode()


def test_nesting_beyond_the_limit_is_malformed_json_before_parsing() -> None:
    assert _one_reject(_nested(64)).reason == "unknown_feature"  # parsed: 'k' is not a feature
    for levels in (65, 900, 5_000):
        reject = _one_reject(_nested(levels))
        assert (reject.reason, reject.detail) == ("malformed_json", "nested deeper than 64 levels")
    assert _one_reject(_nested(4), limits=DecodeLimits(max_depth=3)).reason == "malformed_json"
    # Brackets inside strings are not nesting.
    asset = '[{"' * 80
    record = _json({"asset": asset, "ts": TS, "values": {"Pressure": 1.0}, "note": "]]}}" * 100})
    assert decode_batch([record], FEATURES).asset.tolist() == [asset]


def test_deep_nesting_in_a_thread_with_a_small_stack_is_rejected_not_a_crash() -> None:
    """Python's recursion limit does not bound the C stack: json.loads of a record nested 900 deep
    overflowed a 128 KiB thread stack (musl's default) and killed the process."""
    code = (
        "import threading\n"
        "from pipeline.readings import decode_batch\n"
        "threading.stack_size(128 * 1024)\n"
        "out = []\n"
        "record = b'{\"asset\":\"a\",\"ts\":1583748873000,\"values\":{\"Pressure\":' + b'[' * 900 + b'0' + b']' * 900 + b'}}'\n"
        "t = threading.Thread(target=lambda: out.append(decode_batch([record], ['Pressure']).rejects[0].reason))\n"
        "t.start(); t.join(); print(out[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert (done.returncode, done.stdout.strip()) == (0, "malformed_json"), done.stderr[-2000:]


def test_programming_errors_raise() -> None:
    with pytest.raises(ValueError, match="duplicate feature"):
        decode_batch([], ["Pressure", "Pressure"])
    with pytest.raises(ValueError, match="empty"):
        decode_batch([], [])
    with pytest.raises(ValueError, match="fmt"):
        decode_batch([], FEATURES, fmt="tall")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown_features"):
        decode_batch([], FEATURES, unknown_features="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict"):
        decode_batch([{"asset": "a"}], FEATURES)  # type: ignore[list-item]


# ---------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (TS, TS),
        (1583748873123.9, TS + 123),  # fractions of a ms are floored
        (1.583748873e12, TS),
        ("2020-03-09T10:14:33Z", TS),
        ("2020-03-09 10:14:33", TS),  # naive is UTC
        ("2020-03-09T10:14:33", TS),
        ("2020-03-09T12:14:33+02:00", TS),
        ("2020-03-09T05:44:33-04:30", TS),
        ("2020-03-09T10:14:33+00:00", TS),
        ("2020-03-09T10:14:33.5Z", TS + 500),
        ("2020-03-09T10:14:33.123Z", TS + 123),
        ("2020-03-09T10:14:33.123999+00:00", TS + 123),
        ("2020-03-09T12:14:33.250+02:00", TS + 250),
        ("2020-03-09t10:14:33.25z", TS + 250),  # RFC 3339 allows lower case
        (" 2020-03-09T10:14:33Z\n", TS),
        ("2020-03-09", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        (np.int64(TS), TS),
        (np.float64(TS + 0.5), TS),
        (datetime(2020, 3, 9, 10, 14, 33, 7000, tzinfo=timezone.utc), TS + 7),
        (datetime(2020, 3, 9, 11, 14, 33, tzinfo=timezone(timedelta(hours=1))), TS),
        (datetime(2020, 3, 9, 10, 14, 33), TS),
        ("1969-12-31T23:59:59.999Z", -1),
    ],
)
def test_parse_timestamp_ms(ts: object, expected: int) -> None:
    assert parse_timestamp_ms(ts) == expected


@pytest.mark.parametrize(
    ("ts", "message"),
    [
        (True, "boolean"),
        (np.bool_(False), "boolean"),
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        (None, "NoneType"),
        ([TS], "list"),
        ("", "unparsable"),
        ("10:14:33", "unparsable"),
        ("2020-03-09T25:14:33Z", "unparsable"),
        ("2020-03-09T10:14:33+25:00", "unparsable"),
        ("1583748873000", "unparsable"),  # epoch ms must be a number, not a string
    ],
)
def test_parse_timestamp_ms_refuses(ts: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_timestamp_ms(ts)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        # fromisoformat reads a fraction after the hour or minute as a fraction of a second
        ("2020-03-09T10:14,55Z", TS),
        ("2020-03-09T10:14.55Z", TS),
        ("2020-03-09T1014,55Z", TS),
        ("2020-03-09T12:14,55+02:00", TS),
        ("2020-03-09T10,5Z", TS - (14 * 60 + 33 - 30 * 60) * 1000),
        ("2020-03-09T10.2425Z", TS),
        ("2020-03-09T10:14,5500001Z", TS),  # floored to the millisecond, as a fraction of a second is
        # ordinal dates (2020 is a leap year: 9 March is day 69)
        ("2020-069T10:14:33Z", TS),
        ("2020069T101433Z", TS),
        ("2020-069", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        ("2020-366T00:00:00Z", 1609372800000),
        # the end of a day is the next day's midnight
        ("2020-03-08T24:00Z", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        ("2020-03-08T24:00:00.000+00:00", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        ("2020-03-08T240000Z", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        ("2020-068T24:00Z", TS - (10 * 3600 + 14 * 60 + 33) * 1000),
        # ISO 8601's own minus sign in an offset
        ("2020-03-09T08:14:33\u221202:00", TS),
    ],
)
def test_parse_timestamp_ms_reads_iso_8601_beyond_fromisoformat(ts: str, expected: int) -> None:
    assert parse_timestamp_ms(ts) == expected


@pytest.mark.parametrize(
    "ts",
    ["2021-366T00:00:00Z", "2020-000", "2020-367", "2020-03-09T24:00:01Z", "2020-03-09T24:30Z",
     "2020-03-09T24,5Z", "2020-03-09T10:60,5Z", "2020-03-09T25,5Z", "9999-12-31T24:00Z", "2020-03-09T10:1433Z",
     "2020-03-09T10:14,5+25:00", "2020-03-09T10:14,5UTC", "\u0662\u0660\u0662\u0660-\u0660\u0666\u0669",
     "2020-03-09T\u0661\u0660,5Z"],
)
def test_parse_timestamp_ms_refuses_impossible_iso_8601(ts: str) -> None:
    with pytest.raises(ValueError, match="unparsable"):
        parse_timestamp_ms(ts)


@settings(max_examples=400, deadline=None)
@given(moment=st.integers(946684800000, 7258118400000), variant=st.sampled_from(iso_variants.VARIANTS),
       offset=st.integers(-23 * 60 - 59, 23 * 60 + 59), whole=st.sampled_from([1, 1000, 60_000, 3_600_000, 86_400_000]))
def test_every_iso_8601_form_of_an_instant_decodes_to_it(moment: int, variant: str, offset: int, whole: int) -> None:
    moment -= moment % whole  # so the forms of reduced precision can write it too
    text = iso_variants.render(moment, variant, offset)
    if text is not None:
        assert parse_timestamp_ms(text) == moment, text
        record = _json({"asset": "a", "ts": text, "values": {"Pressure": 1.0}})
        assert decode_batch([record], FEATURES).ts_ms.tolist() == [moment]


def test_iso_and_numeric_timestamps_decode_alike() -> None:
    records = [
        _json({"asset": "a", "ts": "2020-03-09T12:14:33.250+02:00", "values": {"Pressure": 1.0}}),
        _json({"asset": "a", "ts": TS + 250, "sensor": "Current", "value": 2.0}),
        _json({"asset": "a", "ts": "2020-03-09 10:14:33.250", "sensor": "Temperature", "value": 3.0}),
    ]
    assert decode_batch(records, FEATURES).ts_ms.tolist() == [TS + 250] * 3


# ---------------------------------------------------------------- encoding


def test_encoders_write_compact_json_and_round_trip() -> None:
    wide = encode_wide("pump-7", np.int64(TS), {"Pressure": np.float32(1.5), "Current": 2})  # type: ignore[arg-type]
    assert wide == b'{"asset":"pump-7","ts":1583748873000,"values":{"Pressure":1.5,"Current":2.0}}'
    narrow = encode_narrow("pump-7", TS, "Pressure", np.float64(0.25))
    assert narrow == b'{"asset":"pump-7","sensor":"Pressure","ts":1583748873000,"value":0.25}'
    batch = decode_batch([wide, narrow], FEATURES)
    assert batch.value.tolist() == [1.5, 2.0, 0.25]


# ---------------------------------------------------------------- accounting


def _good(rng: random.Random, i: int) -> tuple[bytes, int]:
    """A valid record and the number of rows it must give."""
    ts = TS + i
    if rng.random() < 0.5:
        chosen = rng.sample(FEATURES, rng.randint(1, len(FEATURES)))
        return encode_wide(f"pump-{i % 7}", ts, {name: rng.uniform(-5, 5) for name in chosen}), len(chosen)
    return encode_narrow(f"pump-{i % 7}", ts, rng.choice(FEATURES), rng.uniform(-5, 5)), 1


BAD_RECORDS = [record for _, record in REASON_EXAMPLES if record is None or len(record) < 2000]

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json_values = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8
)
_near_miss = st.fixed_dictionaries(
    {},
    optional={
        "asset": st.sampled_from(["pump-1", "", 3]) | _json_scalars,
        "ts": st.sampled_from([TS, "2020-03-09T10:14:33Z", 12]) | _json_scalars,
        "values": st.dictionaries(st.sampled_from([*FEATURES, "Other"]), _json_scalars, max_size=4) | _json_values,
        "sensor": st.sampled_from([*FEATURES, "Other"]) | _json_scalars,
        "value": st.floats() | _json_scalars,
    },
).map(lambda obj: json.dumps(obj).encode())
_records = st.one_of(
    st.integers(0, 10**6).map(lambda seed: _good(random.Random(seed), seed)[0]),
    st.sampled_from(BAD_RECORDS),
    _near_miss,
    st.binary(max_size=40),
    st.text(max_size=40),
)


@settings(max_examples=150, deadline=None)
@given(records=st.lists(_records, max_size=30), ignore=st.booleans())
def test_every_record_is_decoded_or_rejected_exactly_once(records: list[bytes | str | None], ignore: bool) -> None:
    batch = decode_batch(records, FEATURES, unknown_features="ignore" if ignore else "reject")
    decoded = set(batch.record_index.tolist())
    rejected = [r.index for r in batch.rejects]
    assert len(rejected) == len(set(rejected))
    assert decoded.isdisjoint(rejected)
    assert decoded | set(rejected) == set(range(len(records)))
    assert batch.n_records == len(records)
    assert all(r.reason in REASONS and len(r.detail) <= 200 for r in batch.rejects)
    assert rejected == sorted(rejected)
    assert np.isfinite(batch.value).all()
    assert ((batch.feature >= 0) & (batch.feature < len(FEATURES))).all()
    assert len(batch.asset) == len(batch.ts_ms) == len(batch.record_index) == len(batch)


def test_ten_thousand_mixed_records() -> None:
    rng = random.Random(42)
    records: list[bytes | str | None] = []
    expected_rows: dict[int, int] = {}
    expected_reasons: dict[int, str] = {}
    for i in range(10_000):
        if rng.random() < 0.8:
            record, n_rows = _good(rng, i)
            expected_rows[i] = n_rows
        else:
            reason, record = rng.choice(REASON_EXAMPLES)
            expected_reasons[i] = reason
        records.append(record)
    batch = decode_batch(records, FEATURES)
    assert {r.index: r.reason for r in batch.rejects} == expected_reasons
    indices, counts = np.unique(batch.record_index, return_counts=True)
    assert dict(zip(indices.tolist(), counts.tolist())) == expected_rows
    assert (batch.ts_ms == TS + batch.record_index).all()
    assert (batch.asset == np.array([f"pump-{i % 7}" for i in batch.record_index.tolist()], dtype=object)).all()
    first = min(expected_rows)
    decoded = json.loads(records[first])  # type: ignore[arg-type]
    sent = decoded.get("values") or {decoded["sensor"]: decoded["value"]}
    rows = batch.record_index == first
    assert dict(zip((FEATURES[f] for f in batch.feature[rows]), batch.value[rows].tolist())) == sent


def test_hundred_thousand_wide_records_with_eight_features() -> None:
    features = [f"f{k}" for k in range(8)]
    records = [encode_wide(f"pump-{i % 100}", TS + i * 1000, {name: i + k / 8 for k, name in enumerate(features)}) for i in range(100_000)]
    started = time.perf_counter()
    batch = decode_batch(records, features)
    elapsed = time.perf_counter() - started
    assert isinstance(batch, DecodedBatch)
    assert batch.rejects == [] and len(batch) == 800_000
    assert batch.value[-8:].tolist() == [99_999 + k / 8 for k in range(8)]
    assert batch.feature[-8:].tolist() == list(range(8))
    assert batch.ts_ms[-1] == TS + 99_999_000 and batch.asset[-1] == "pump-99"
    assert elapsed < 15.0  # about 1 s on one core; far slower means per-record work has crept in
