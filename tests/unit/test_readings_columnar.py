"""The columnar decoding of a batch (pyarrow's JSON reader) gives exactly what the per-record
rules give, and is taken for the plain readings a live feed sends."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import readings
from pipeline.readings import DecodedBatch, DecodeLimits, decode_batch, encode_narrow, encode_wide

FEATURES = ("Pressure", "Current", "Temperature")
TS = 1583748873000
N = readings.COLUMNAR_MIN_RECORDS


def _per_record(records: list[bytes | str | None], **kwargs: object) -> DecodedBatch:
    saved = readings.COLUMNAR_MIN_RECORDS
    readings.COLUMNAR_MIN_RECORDS = 10**9
    try:
        return decode_batch(records, FEATURES, **kwargs)  # type: ignore[arg-type]
    finally:
        readings.COLUMNAR_MIN_RECORDS = saved


def _columnar_taken(records: list[bytes | str | None], **kwargs: object) -> bool:
    index = {f: i for i, f in enumerate(FEATURES)}
    return readings._decode_columnar(records, FEATURES, index, kwargs.get("fmt", "auto"),  # type: ignore[arg-type]
                                     kwargs.get("limits", DecodeLimits())) is not None  # type: ignore[arg-type]


def assert_same(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.n_records == b.n_records
    assert a.rejects == b.rejects
    np.testing.assert_array_equal(a.record_index, b.record_index)
    assert a.asset.tolist() == b.asset.tolist()
    np.testing.assert_array_equal(a.ts_ms, b.ts_ms)
    np.testing.assert_array_equal(a.feature, b.feature)
    assert a.value.tobytes() == b.value.tobytes()  # bit for bit, -0.0 and all
    for x, y in zip((a.record_index, a.ts_ms, a.feature, a.value), (b.record_index, b.ts_ms, b.feature, b.value)):
        assert x.dtype == y.dtype


def _plain(rng: random.Random, i: int, narrow: bool) -> bytes:
    if narrow:
        return encode_narrow(f"pump-{i % 7}", TS + i, rng.choice(FEATURES), rng.uniform(-5, 5))
    chosen = rng.sample(FEATURES, rng.randint(1, len(FEATURES)))
    return encode_wide(f"pump-{i % 7}", TS + i, {name: rng.uniform(-5, 5) for name in chosen})


# Records built to slip past the batch's guards: each alone is a reject or a reading whose
# verdict depends on the per-record rules.
TRAPS: list[bytes | str | None] = [
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}} {"asset":"b","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}}{"asset":"b","ts":1}',
    b'   ', b'{}', b'{"asset":"a"}', b'{"asset":"a","ts":1583748873000}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":null}}',
    b'{"asset":"a","ts":1583748873000,"values":{}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":NaN}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":Infinity}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1e400}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":' + b"9" * 400 + b"}}",
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":true}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":"1"}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1,"Pressure":2}}',
    b'{"asset":"a","asset":"b","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Other":1}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1},"extra":1}',
    b'{"asset":"a","ts":1583748873000,"sensor":"Pressure","value":1,"values":{"Current":2}}',
    b'{"asset":"a","ts":1583748873000.0,"values":{"Pressure":1}}',
    b'{"asset":"a","ts":1,"values":{"Pressure":1}}',
    b'{"asset":"a","ts":"2020-03-09T10:14:33Z","values":{"Pressure":1}}',
    b'{"asset":"","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"' + b"a" * 300 + b'","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":5,"ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a}{","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a\\u0000","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a\\ud800","ts":1583748873000,"values":{"Pressure":1}}',
    '{"asset":"pümpe","ts":1583748873000,"values":{"Pressure":1}}'.encode(),
    b'{"asset":"\xff","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"a","ts":1583748873000,"sensor":"Other","value":1}',
    b'{"asset":"a","ts":1583748873000,"sensor":"Pressure","value":null}',
    b'{"asset":"a","ts":1583748873000,"sensor":"Pressure"}',
    b'{"asset":"a","ts":1583748873000,"sensor":"Pressure","value":[1]}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1},\r"x":1}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":-0}}',
    b'{ "asset" : "a" , "ts" : 1583748873000 , "values" : { "Pressure" : 1 , "Current" : 2 } }',
    b'{"values":{"Temperature":3,"Pressure":1},"ts":1583748873000,"asset":"a"}',
    b'[{"asset":"a","ts":1583748873000,"values":{"Pressure":1}}]',
    b'{"asset":"a","ts":1583748873000,\n"values":{"Pressure":1}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}}\n{"asset":"b","ts":1583748873000,"values":{"Pressure":2}}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}}\n\n',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1}} ',
    b'{"asset":"a\n","ts":1583748873000,"values":{"Pressure":1}}',
    b'{"asset":"values","ts":1583748873000,"sensor":"Pressure","value":1}',
    b'{"sensor":"Pressure","value":1,"asset":"a","ts":1583748873000}',
    b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1},"asset":"b","ts":1583748873001}',
    "a str, not bytes", None, b"",
]

_records = st.one_of(
    st.integers(0, 10**6).map(lambda seed: _plain(random.Random(seed), seed, narrow=False)),
    st.integers(0, 10**6).map(lambda seed: _plain(random.Random(seed), seed, narrow=True)),
    st.sampled_from(TRAPS),
)


@settings(max_examples=300, deadline=None)
@given(records=st.lists(_records, min_size=N, max_size=3 * N), fmt=st.sampled_from(["auto", "wide", "narrow"]),
       ignore=st.booleans())
def test_any_batch_decodes_as_the_per_record_rules_decode_it(records: list[bytes | str | None], fmt: str,
                                                             ignore: bool) -> None:
    kwargs = {"fmt": fmt, "unknown_features": "ignore" if ignore else "reject"}
    assert_same(decode_batch(records, FEATURES, **kwargs), _per_record(records, **kwargs))  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), narrow=st.booleans(), trap=st.sampled_from(TRAPS), at=st.integers(0, N))
def test_one_trap_among_plain_readings_decodes_as_the_per_record_rules_do(seed: int, narrow: bool, trap: bytes,
                                                                          at: int) -> None:
    rng = random.Random(seed)
    records: list[bytes | str | None] = [_plain(rng, i, narrow) for i in range(N)]
    records.insert(at, trap)
    assert_same(decode_batch(records, FEATURES), _per_record(records))


@pytest.mark.parametrize("unknown", ["reject", "ignore"])
@pytest.mark.parametrize("narrow", [False, True])
def test_a_live_feeds_plain_readings_take_the_columnar_path(narrow: bool, unknown: str) -> None:
    rng = random.Random(1)
    records: list[bytes | str | None] = [_plain(rng, i, narrow) for i in range(500)]
    assert _columnar_taken(records)
    batch = decode_batch(records, FEATURES, unknown_features=unknown)  # type: ignore[arg-type]
    assert_same(batch, _per_record(records, unknown_features=unknown))
    assert batch.rejects == [] and set(batch.record_index.tolist()) == set(range(500))


def test_an_unknown_feature_is_ignored_or_refused_as_the_per_record_rules_say() -> None:
    rng = random.Random(2)
    records: list[bytes | str | None] = [_plain(rng, i, narrow=False) for i in range(N)]
    records[5] = b'{"asset":"a","ts":1583748873000,"values":{"Pressure":1,"Other":2}}'
    ignored = decode_batch(records, FEATURES, unknown_features="ignore")
    assert_same(ignored, _per_record(records, unknown_features="ignore"))
    assert ignored.rejects == [] and ignored.value[ignored.record_index == 5].tolist() == [1.0]
    refused = decode_batch(records, FEATURES)
    assert [(r.index, r.reason) for r in refused.rejects] == [(5, "unknown_feature")]


def test_values_parse_to_the_same_doubles_as_pythons_json() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal(2000) * 10.0 ** rng.integers(-300, 300, 2000)
    texts = [repr(float(v)) for v in values] + [f"{v:.25e}" for v in values[:500]] + ["1e-400", "0.0", "123456789012345678901"]
    records: list[bytes | str | None] = [
        f'{{"asset":"a","ts":{TS + i},"values":{{"Pressure":{t}}}}}'.encode() for i, t in enumerate(texts)]
    assert _columnar_taken(records)
    batch = decode_batch(records, FEATURES)
    assert batch.value.tobytes() == np.array([json.loads(t) for t in texts], np.float64).tobytes()


def _reading(rng: random.Random, i: int, narrow: bool) -> bytes:
    """A valid reading as any producer might write it: keys in any order, any spacing, ints or floats."""
    value = lambda: rng.choice([rng.uniform(-1e6, 1e6), rng.randint(-10**6, 10**6), 0, 1e-300, 12345678901234567890])
    if narrow:
        obj = {"asset": f"m-{i % 11}", "ts": TS + rng.randint(0, 10**9), "sensor": rng.choice(FEATURES), "value": value()}
    else:
        chosen = rng.sample(FEATURES, rng.randint(1, len(FEATURES)))
        obj = {"asset": f"m-{i % 11}", "ts": TS + rng.randint(0, 10**9), "values": {f: value() for f in chosen}}
    keys = list(obj)
    rng.shuffle(keys)
    seps = rng.choice([(",", ":"), (", ", ": "), (" ,\t", " : ")])
    return json.dumps({k: obj[k] for k in keys}, separators=seps).encode()


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.integers(N, 4 * N), narrow=st.booleans())
def test_valid_readings_in_any_spelling_take_the_columnar_path_and_decode_the_same(seed: int, size: int,
                                                                                  narrow: bool) -> None:
    rng = random.Random(seed)
    records: list[bytes | str | None] = [_reading(rng, i, narrow) for i in range(size)]
    assert _columnar_taken(records)
    assert_same(decode_batch(records, FEATURES), _per_record(records))


def _in_blocks(block: int, decode: object, *args: object, **kwargs: object) -> object:
    """Call ``decode`` with pyarrow's reader cutting the batch into ``block``-byte blocks."""
    saved = readings.JSON_BLOCK_BYTES
    readings.JSON_BLOCK_BYTES = block
    try:
        return decode(*args, **kwargs)  # type: ignore[operator]
    finally:
        readings.JSON_BLOCK_BYTES = saved


@settings(max_examples=150, deadline=None)
@given(records=st.lists(_records, min_size=N, max_size=3 * N), fmt=st.sampled_from(["auto", "wide", "narrow"]),
       block=st.integers(1, 600))
def test_a_batch_read_in_many_blocks_decodes_as_the_per_record_rules_decode_it(records: list[bytes | str | None],
                                                                               fmt: str, block: int) -> None:
    got = _in_blocks(block, decode_batch, records, FEATURES, fmt=fmt)
    assert_same(got, _per_record(records, fmt=fmt))  # type: ignore[arg-type]


@pytest.mark.parametrize("block", [1, 97, 1000])
@pytest.mark.parametrize("narrow", [False, True])
def test_plain_readings_take_the_columnar_path_in_blocks_smaller_than_a_record(narrow: bool, block: int) -> None:
    rng = random.Random(4)
    records: list[bytes | str | None] = [_plain(rng, i, narrow) for i in range(300)]
    assert _in_blocks(block, _columnar_taken, records)
    assert_same(_in_blocks(block, decode_batch, records, FEATURES), _per_record(records))  # type: ignore[arg-type]
