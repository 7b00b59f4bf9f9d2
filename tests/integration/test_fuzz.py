"""Fuzz: more than 100,000 hostile records, interleaved with good readings, through the detector and
the archiver (in-process threads) on the real broker.

Each Hypothesis example is one 10 s slice of the simulated plant: 50 good readings (wide, or
eight narrow records for a few, with ``ts`` in epoch ms or in one of the ISO 8601 forms of
:mod:`tests.iso_variants`), 20 readings of two assets made of extreme finite numbers, and 250
hostile records at random places among them: random bytes, truncated and deeply nested JSON, huge
and tiny numbers, wrong types, unicode and empty asset ids, duplicate JSON keys, timestamps from
1970 to 9999 as numbers and ISO strings, duplicated readings (fresh, and late), wrong keys,
records of exactly ``detector.max_record_bytes`` and one byte more, above the producer's 1 MB,
and three of 10 MiB. Every hostile record carries the outcomes it may have (accepted, or DLQ
reasons), derived from how it was made; a decode of the record alone must agree.

Afterwards: neither daemon crashed or stalled; every record the detector refused is in the DLQ
once, with its reason, key, value (or a prefix, ``truncated``), size, hash and headers, and no
other record is; the detector's counts match; every decodable record is in the archive once, by
partition and offset (the good readings exactly as sent), and the trainer's scan returns the same
rows; every grid step of the good assets that a reference engine fed the good readings alone
scores is scored once, with the same score. The row ``fuzz`` goes to ``tests/faults-report.json``.

``PLANTWATCH_FUZZ_EXAMPLES=8 pytest -m faults tests/integration/test_fuzz.py`` runs a
2,000-record version (400 examples by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import traceback
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from consumers.archiver import Archiver
from consumers.detector import Detector
from consumers.kafka_clients import make_producer
from pipeline.dead_letters import HEADER_PREFIX, decode_dead_letter_headers
from pipeline.engine import DetectionEngine
from pipeline.readings import REASONS, DecodeLimits, decode_batch
from pipeline.simulate import PlantSimulator
from pipeline.tables import frame_to_batch
from tests import iso_variants
from trainers.archive_scan import ScanStats, scan_archive

from . import faults
from .plant import PERIOD_MS, PLANT, detector_settings, read_topic

pytestmark = [
    pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(900),
    # The daemons' threads (kafka-python's partitioner and backoffs) use the random module while
    # Hypothesis draws, which it takes for a strategy doing so.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

EXAMPLES = int(os.environ.get("PLANTWATCH_FUZZ_EXAMPLES", "400"))
HOSTILE_PER_EXAMPLE = 250
STEPS_PER_EXAMPLE = 10
NARROW_SHARE = 0.1  # of good (asset, step)s sent as eight narrow records
ISO_SHARE = 0.5     # of good records with an ISO 8601 ts
FEATURES = PLANT.features
GOOD_ASSETS = PLANT.asset_ids
EXTREME_ASSETS = ("fuzz-extreme-0", "fuzz-extreme-1")
POOL = 16  # assets per pool of fuzz assets that receive several readings
MAX_RECORD = 65536  # detector.max_record_bytes (default)
TEN_MB = 10 << 20
BIG_PRODUCER_BYTES = 900_000  # larger records go through a producer with a 16 MB request limit
MIN_TS, MAX_TS = 946684800000, 7258118400000  # the decoder's bounds: 2000-01-01, 2200-01-01
DAY = 86_400_000
STALL_S = 30.0

ACCEPTED = "accepted"
DLQ_REASONS = frozenset(REASONS) | {"key_mismatch", "late", "future"}
ANY_REJECT = DLQ_REASONS
LIMITS = DecodeLimits(max_record_bytes=MAX_RECORD)


# ---------------------------------------------------------------- records


@dataclass
class Rec:
    kind: str
    key: bytes | None
    value: bytes | None
    expect: frozenset[str]  # the detector outcomes allowed: ACCEPTED and/or DLQ reasons
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Ctx:
    """Where a hostile record lands: its slice's time (increasing in production order), a counter
    for unique asset ids, and the wall clock the detector's future rule is judged against."""

    ts: int
    uid: int
    now_ms: int


def j(value: Any, ascii_only: bool = True) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


def obj(*pairs: tuple[str, str]) -> str:
    """A JSON object from (name, raw JSON text) pairs, in order, duplicate names kept."""
    return "{" + ",".join(f"{j(k)}:{v}" for k, v in pairs) + "}"


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def one_value(feature: str = "Current", raw: str = "1.5") -> str:
    return "{" + f"{j(feature)}:{raw}" + "}"


def wide(asset_raw: str, ts_raw: str, values_raw: str) -> str:
    return obj(("asset", asset_raw), ("ts", ts_raw), ("values", values_raw))


def narrow(asset_raw: str, ts_raw: str, sensor_raw: str, value_raw: str) -> str:
    return obj(("asset", asset_raw), ("sensor", sensor_raw), ("ts", ts_raw), ("value", value_raw))


def one(*outcomes: str) -> frozenset[str]:
    return frozenset(outcomes)


def ts_outcome(ms: int, now_ms: int) -> frozenset[str]:
    """What the detector does with a decodable reading stamped ``ms`` of a fresh asset."""
    if not MIN_TS <= ms <= MAX_TS:
        return one("absurd_timestamp")
    if ms <= now_ms + 300_000:
        return one(ACCEPTED)
    if ms > now_ms + 900_000:  # the detector's clock is at most 10 min later
        return one("future")
    return one(ACCEPTED, "future")


def number_outcome(literal: str) -> str:
    """A JSON number (or NaN/Infinity) as a reading value, by Python's own JSON semantics."""
    if literal.lstrip("-") in ("NaN", "Infinity"):
        return "non_finite"
    if re.fullmatch(r"-?\d+", literal):
        if len(literal.lstrip("-")) > 4300:
            return "malformed_json"  # beyond Python's int string limit
        try:
            float(int(literal))
        except OverflowError:
            return "non_finite"
        return ACCEPTED
    return ACCEPTED if math.isfinite(float(literal)) else "non_finite"


# ---------------------------------------------------------------- strategies, one per kind
#
# Hypothesis caps what one example may draw (about 8,000 choices, a string or bytes counting its
# length), so an example is 250 records and strings are short. Each kind makes one rich draw
# (``main``: bytes, text, a number, a depth…) and takes its minor choices (which good asset, which
# feature, wide or narrow, the key…) from one integer (``bits``).


class Bits:
    """Minor choices taken one after the other from one drawn integer."""

    def __init__(self, n: int) -> None:
        self.n = n

    def pick(self, options: Any) -> Any:
        options = list(options)
        self.n, i = divmod(self.n, len(options))
        return options[i]

    def chance(self, one_in: int) -> bool:
        return self.pick(range(one_in)) == 0


_BITS = st.integers(0, 2 ** 62)
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_all_chars = st.characters() | st.characters(categories=["Cc", "Cs", "Cf", "Co", "Cn", "Zs", "Zl", "Zp", "Mn"])


def kind(name: str, main: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any, int]]:
    return st.tuples(st.just(name), main, _BITS)


def headers_from(b: Bits) -> list[tuple[str, bytes]]:
    """Headers on one record in eight (names and values a producer may well send)."""
    if not b.chance(8):
        return []
    return [(b.pick(["trace-id", "", "\u00e9t\u00e9", "content-type", "x" * 40]), b.pick([b"", b"\x00\xff", b"1" * 30]))
            for _ in range(b.pick([1, 2]))]


RANDOM = kind("random_bytes", st.one_of(st.binary(max_size=120), st.binary(max_size=8), st.text(_all_chars, max_size=60),
                                        _json_values, st.none()))
TRUNCATED = kind("truncated_json", st.none() | st.text(st.characters(), min_size=1, max_size=8))
DEEP = kind("deep_nesting", st.integers(1, 80) | st.integers(850, 1150) | st.integers(1150, 40_000))
NUMBER_LITERALS = [
    "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 400, "-" + "9" * 4300, "9" * 4301,
    "1e-400", "5e-324", "-5e-324", "-0.0", "-0", "0e0", "1.7976931348623157e308", "-1.7976931348623157e308",
    "1.7976931348623159e308", "2.2250738585072014e-308", "9007199254740993", "1E+2", "18446744073709551616",
]
NUMBERS = kind("numbers", st.one_of(st.sampled_from(NUMBER_LITERALS), st.floats(allow_nan=False, allow_infinity=False)
                                    .map(repr), st.integers(-(10 ** 320), 10 ** 320).map(str)))
WRONG = kind("wrong_types", st.sampled_from(["asset", "ts", "values", "value", "sensor", "nvalue", "missing",
                                             "unknown_format", "unknown_feature", "empty_values"]))
_specials = st.sampled_from(["", " ", "\u00a0", "pump-000\u200b", "PUMP-000", "pump-000 ", "\u2028", "e\u0301",
                             "\u00e9", "\ufeffpump", "\U0001f600" * 64, "\U0001f600" * 257, "a" * 256, "a" * 257,
                             "\x00", "\x7f", "\ud800", "\udfff", "\u0085", "\u200e", "\ue000", "\U0010ffff"])
UNICODE = kind("unicode_asset", (_specials | st.text(_all_chars, max_size=80)).filter(lambda a: a not in GOOD_ASSETS))
DUPLICATE_KEYS = kind("duplicate_keys", st.sampled_from(
    ["asset_good_then_fuzz", "asset_fuzz_then_good", "ts_valid_then_bad", "ts_bad_then_valid", "values_then_list",
     "list_then_values", "value_bad_last", "value_good_last", "sensor_bogus_first", "value_null_last"]))
TS_LITERALS: list[tuple[str, str]] = [
    ("0", "absurd_timestamp"), ("-1", "absurd_timestamp"), ("1234", "absurd_timestamp"),
    ("-9223372036854775808", "absurd_timestamp"), ("9223372036854775807", "absurd_timestamp"),
    ("9223372036854775808", "absurd_timestamp"), ("18446744073709551616", "absurd_timestamp"),
    ("1" + "0" * 30, "absurd_timestamp"), ("946684799999", "absurd_timestamp"), ("946684800000", ACCEPTED),
    ("7258118400000", "future"), ("7258118400001", "absurd_timestamp"), ("946684799999.9", "absurd_timestamp"),
    ("946684800000.5", ACCEPTED), ("1.5e12", ACCEPTED), ("1e400", "bad_timestamp"), ("-1e400", "bad_timestamp"),
    ("NaN", "bad_timestamp"), ("Infinity", "bad_timestamp"), ("-Infinity", "bad_timestamp"),
    ("1e-400", "absurd_timestamp"), ("5e-324", "absurd_timestamp"), ("-0.0", "absurd_timestamp"),
    ("true", "bad_timestamp"), ("false", "bad_timestamp"), ("null", "bad_timestamp"), ("9" * 4301, "malformed_json"),
    ('"1970-01-01T00:00:00Z"', "absurd_timestamp"), ('"1970-01-01"', "absurd_timestamp"),
    ('"2200-01-01T00:00:00Z"', "future"), ('"2200-01-01T00:00:00.001Z"', "absurd_timestamp"),
    ('"2199-12-31T23:59:59.999Z"', "future"), ('"2199-12-31T23:59:59-01:00"', "absurd_timestamp"),
    ('"2200-01-01T00:59:59+01:00"', "future"), ('"9999-12-31T23:59:59.999999Z"', "absurd_timestamp"),
    ('"0001-01-01T00:00:00Z"', "absurd_timestamp"), ('"0001-01-01T00:00:00+23:59"', "absurd_timestamp"),
    ('"9999-12-31T23:59:59-23:59"', "absurd_timestamp"), ('"9999-12-31T24:00:00Z"', "bad_timestamp"),
    ('"2000-01-01T00:00:00Z"', ACCEPTED), ('"1999-12-31T23:59:59.999Z"', "absurd_timestamp"),
    ('"2000-01-01T01:00:00+01:00"', ACCEPTED), ('"1999-365T24:00Z"', ACCEPTED), ('"1999-12-31T24:00:00Z"', ACCEPTED),
    ('"yesterday"', "bad_timestamp"), ('""', "bad_timestamp"), ('" "', "bad_timestamp"),
    ('"2023-02-30T00:00:00Z"', "bad_timestamp"), ('"2023-365T00:00Z"', ACCEPTED), ('"2023-366T00:00Z"', "bad_timestamp"),
    ('"2024-366T00:00Z"', ACCEPTED), ('"2023-11-14T22:13:20\\u221201:00"', ACCEPTED),
    ('"2023-11-14T22:13,5Z"', ACCEPTED), ('"2023-11-14T22,25Z"', ACCEPTED),
]
ANCHORS = [0, MIN_TS, MAX_TS, 2 ** 31 * 1000, 253402300799999, -1, "window", "window", "now", "now"]
TIMESTAMPS = kind("timestamps", st.one_of(
    st.tuples(st.just("literal"), st.sampled_from(TS_LITERALS)),
    st.tuples(st.just("moment"), st.just(0) | st.integers(-2 * DAY, 2 * DAY)),
    st.tuples(st.just("text"), st.text(_all_chars, max_size=30))))
KEY_MISMATCH = kind("key_mismatch", st.binary(max_size=12))
DUPLICATED = kind("duplicated", st.booleans())

# Weights per 100 hostile records.
HOSTILE = st.one_of([RANDOM] * 15 + [TRUNCATED] * 10 + [DEEP] * 6 + [NUMBERS] * 12 + [WRONG] * 15 + [UNICODE] * 10
                    + [DUPLICATE_KEYS] * 6 + [TIMESTAMPS] * 15 + [KEY_MISMATCH] * 5 + [DUPLICATED] * 6)

EXTREME_FLOATS = [1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -5e-324, 0.0, -0.0, 1e300, -1e-300,
                  2.2250738585072014e-308, 9007199254740993.0, 1e15, -1e15]


# ---------------------------------------------------------------- rendering


def render_random(value: bytes | str | None | Any, b: Bits, ctx: Ctx) -> Rec:
    if isinstance(value, str):
        value = utf8(value)
    elif not isinstance(value, (bytes, type(None))):
        value = j(value).encode()  # a random JSON document
    key = b.pick([None, b"", GOOD_ASSETS[0].encode(), b"\xff\xfe", str(b.n % 1000).encode()])
    if key is None and value is None:
        key = b""  # a record needs a key or a value
    return Rec("random_bytes", key, value, ANY_REJECT, headers=headers_from(b))


def render_truncated(asset: str | None, b: Bits, ctx: Ctx) -> Rec:
    asset = asset if asset is not None else b.pick(GOOD_ASSETS)
    full = utf8(narrow(j(asset, False), str(ctx.ts), j("Current"), "1.5") if b.chance(2)
                else wide(j(asset, False), str(ctx.ts), j({f: 1.5 for f in FEATURES})))
    cut = b.pick(range(len(full)))
    part = full[:cut]
    if cut == 0:
        expect = "empty"
    else:
        try:
            part.decode("utf-8")
            expect = "malformed_json"
        except UnicodeDecodeError:
            expect = "bad_encoding"
    return Rec("truncated_json", utf8(asset), part, one(expect))


def render_deep(depth: int, b: Bits, ctx: Ctx) -> Rec:
    bracket, closed = b.pick("[{"), b.chance(4) is False
    place = b.pick(["doc", "asset", "ts", "values", "value", "sensor", "nvalue"])
    asset = b.pick(GOOD_ASSETS)
    if bracket == "[":
        nested = "[" * depth + "0" + ("]" * depth if closed else "")
    else:
        nested = '{"k":' * depth + "0" + ("}" * depth if closed else "")
    a, ts = j(asset), str(ctx.ts)
    text = {
        "doc": nested,
        "asset": wide(nested, ts, one_value()),
        "ts": wide(a, nested, one_value()),
        "values": wide(a, ts, nested),
        "value": wide(a, ts, one_value("Current", nested)),
        "sensor": narrow(a, ts, nested, "1.5"),
        "nvalue": narrow(a, ts, j("Current"), nested),
    }[place]
    structural = {"doc": "not_object" if bracket == "[" else "unknown_format", "asset": "bad_asset",
                  "ts": "bad_timestamp", "values": "bad_value" if bracket == "[" else "unknown_feature",
                  "value": "bad_value", "sensor": "unknown_feature", "nvalue": "bad_value"}[place]
    value = text.encode()
    levels = depth + {"doc": 0, "value": 2}.get(place, 1)  # with the record's own object and its values
    if len(value) > MAX_RECORD:
        expect = one("oversize")
    elif not closed or levels > 64:  # decoder's max_depth
        expect = one("malformed_json")
    else:
        expect = one(structural)
    return Rec("deep_nesting", asset.encode(), value, expect)


def render_numbers(literal: str, b: Bits, ctx: Ctx) -> Rec:
    asset = f"fuzz-num-{b.pick(range(POOL))}"  # a few assets: their steps close and are scored
    feature = b.pick(FEATURES)
    if b.chance(3):
        text = narrow(j(asset), str(ctx.ts), j(feature), literal)
    elif feature == "Voltage":
        text = wide(j(asset), str(ctx.ts), one_value("Voltage", literal))
    else:
        text = wide(j(asset), str(ctx.ts), "{" + f'{j(feature)}:{literal},"Voltage":230.0' + "}")
    return Rec("numbers", asset.encode(), text.encode(), one(number_outcome(literal)))


WRONG_ASSET = ["null", "true", "false", "0", "1.5", "[]", "{}", '["pump-000"]', '{"id":"pump-000"}', '""']
WRONG_TS = ["null", "true", "false", "[]", "{}", "[1700000000000]", '{"ms":1700000000000}', '""', '"yesterday"',
            '"1700000000000"', '"2023-02-30T00:00:00Z"', '"2023-11-14T25:00:00Z"', '"2023-13-01"',
            '"Tue, 14 Nov 2023 22:13:20 GMT"', '"2023-11-14T22:13:20UTC"', '"2023-11-14T22:13:20+24:00"',
            '"2023-11-14T24:00:01Z"', '"2023-11-14T22:60,5Z"', '"2023-000"']
WRONG_VALUES = ["null", "true", "0", "1.5", '"x"', "[]", "[1.0]", '[{"Current":1.0}]']
WRONG_VALUE = ["null", "true", "false", '"1.0"', '""', "[]", "{}", "[1.0]", '{"v":1.0}']
WRONG_SENSOR = ["null", "1", "true", "[]", "{}", '"current"', '"Bogus"', '""', '"Current "']


def render_wrong(field_: str, b: Bits, ctx: Ctx) -> Rec:
    asset, f = b.pick(GOOD_ASSETS), b.pick(FEATURES)
    a, ts = j(asset), str(ctx.ts)
    if field_ == "asset":
        text, expect = wide(b.pick(WRONG_ASSET), ts, one_value(f)), "bad_asset"
    elif field_ == "ts":
        text, expect = wide(a, b.pick(WRONG_TS), one_value(f)), "bad_timestamp"
    elif field_ == "values":
        text, expect = wide(a, ts, b.pick(WRONG_VALUES)), "bad_value"
    elif field_ == "value":
        text, expect = wide(a, ts, "{" + f'"Voltage":230.0,{j(f)}:{b.pick(WRONG_VALUE)}' + "}"), "bad_value"
    elif field_ == "sensor":
        text, expect = narrow(a, ts, b.pick(WRONG_SENSOR), "1.5"), "unknown_feature"
    elif field_ == "nvalue":
        text, expect = narrow(a, ts, j(f), b.pick(WRONG_VALUE)), "bad_value"
    elif field_ == "missing":  # drop a field, never the one that tells the format
        if b.chance(2):
            pairs = [("asset", a), ("ts", ts), ("values", one_value(f))]
            del pairs[b.pick([0, 1])]
        else:
            pairs = [("asset", a), ("ts", ts), ("sensor", j(f)), ("value", "1.5")]
            del pairs[b.pick(range(4))]
        text, expect = obj(*pairs), "missing_field"
    elif field_ == "unknown_format":
        text, expect = obj(("asset", a), ("ts", ts), *([("data", one_value(f))] if b.chance(2) else [])), "unknown_format"
    elif field_ == "unknown_feature":
        extra = ',"Voltage":230.0' if b.chance(2) else ""
        name = j(b.pick(["Bogus", "current", "Current ", "", "Pressure2"]))
        text, expect = wide(a, ts, "{" + f"{name}:1.0{extra}" + "}"), "unknown_feature"
    else:
        text, expect = wide(a, ts, "{}"), "empty_values"
    return Rec("wrong_types", asset.encode(), text.encode(), one(expect), headers=headers_from(b))


def render_unicode(asset: str, b: Bits, ctx: Ctx) -> Rec:
    ascii_only = b.chance(2)
    a = j(asset, ascii_only)
    text = narrow(a, str(ctx.ts), j("Current"), "1.5") if b.chance(2) else wide(a, str(ctx.ts), one_value())
    key = b.pick([utf8(asset), utf8(asset), utf8(unicodedata.normalize("NFC", asset)),
                  utf8(unicodedata.normalize("NFD", asset)), None])
    if any(0xD800 <= ord(c) <= 0xDFFF for c in asset) and not ascii_only:
        expect = "bad_encoding"
    elif not asset or len(asset) > 256 or any(unicodedata.category(c) in ("Cc", "Cs") for c in asset):
        expect = "bad_asset"
    elif key is None or key.decode("utf-8", "replace") != asset:
        expect = "key_mismatch"
    else:
        expect = ACCEPTED
    return Rec("unicode_asset" if asset else "empty_asset", key, utf8(text), one(expect))


def render_duplicate_keys(template: str, b: Bits, ctx: Ctx) -> Rec:
    fuzz, good, ts = f"fuzz-dup-{b.pick(range(POOL))}", b.pick(GOOD_ASSETS), str(ctx.ts)
    f = j(b.pick(FEATURES))
    vals = "{" + f"{f}:1.5" + "}"
    templates: dict[str, tuple[list[tuple[str, str]], str]] = {
        "asset_good_then_fuzz": ([("asset", j(good)), ("ts", ts), ("values", vals), ("asset", j(fuzz))], ACCEPTED),
        "asset_fuzz_then_good": ([("asset", j(fuzz)), ("ts", ts), ("values", vals), ("asset", j(good))], "key_mismatch"),
        "ts_valid_then_bad": ([("asset", j(fuzz)), ("ts", ts), ("values", vals), ("ts", '"yesterday"')], "bad_timestamp"),
        "ts_bad_then_valid": ([("asset", j(fuzz)), ("ts", '"yesterday"'), ("values", vals), ("ts", ts)], ACCEPTED),
        "values_then_list": ([("asset", j(fuzz)), ("ts", ts), ("values", vals), ("values", "[]")], "bad_value"),
        "list_then_values": ([("asset", j(fuzz)), ("ts", ts), ("values", "[]"), ("values", vals)], ACCEPTED),
        "value_bad_last": ([("asset", j(fuzz)), ("ts", ts), ("values", "{" + f'{f}:1.0,{f}:"x"' + "}")], "bad_value"),
        "value_good_last": ([("asset", j(fuzz)), ("ts", ts), ("values", "{" + f'{f}:"x",{f}:2.0' + "}")], ACCEPTED),
        "sensor_bogus_first": ([("asset", j(fuzz)), ("sensor", '"Bogus"'), ("ts", ts), ("sensor", f), ("value", "1.0")],
                               ACCEPTED),
        "value_null_last": ([("asset", j(fuzz)), ("sensor", f), ("ts", ts), ("value", "1.0"), ("value", "null")],
                            "bad_value"),
    }
    pairs, expect = templates[template]
    return Rec("duplicate_keys", fuzz.encode(), obj(*pairs).encode(), one(expect))


def render_timestamps(main: tuple[str, Any], b: Bits, ctx: Ctx) -> Rec:
    asset = f"fuzz-ts-{ctx.uid}"  # a fresh asset: nothing it sends can be late
    form, drawn = main
    if form == "literal":
        raw, outcome = drawn
        expect = one(outcome)
    elif form == "text":
        raw, expect = j(drawn), one("bad_timestamp", "absurd_timestamp", ACCEPTED, "future")
    else:
        anchor = b.pick(ANCHORS)
        ms = {"window": ctx.ts, "now": ctx.now_ms}.get(anchor, anchor) + drawn  # type: ignore[operator]
        variant = b.pick(("int", "float") + iso_variants.VARIANTS)
        offset = b.pick(range(-23 * 60 - 59, 23 * 60 + 60))
        if variant == "int":
            raw = str(ms)
        elif variant == "float":
            raw = repr(ms + 0.25)
        else:
            try:
                text = iso_variants.render(ms, variant, offset) or iso_variants.render(ms, "z")
            except (OverflowError, ValueError):
                text = None  # beyond datetime's years 1 to 9999: as a number
            raw = j(text) if text is not None else str(ms)
        expect = ts_outcome(ms, ctx.now_ms)
    return Rec("timestamps", asset.encode(), wide(j(asset), raw, one_value()).encode(), expect)


def render_key_mismatch(random_key: bytes, b: Bits, ctx: Ctx) -> Rec:
    asset, other = b.pick(GOOD_ASSETS), b.pick(GOOD_ASSETS)
    how = b.pick(["other", "none", "empty", "upper", "space", "random", "invalid_utf8", "bom", "fuzz"])
    if how == "fuzz":
        asset, key = f"fuzz-key-{ctx.uid}", other.encode()
    else:
        key = {"other": (other if other != asset else GOOD_ASSETS[(GOOD_ASSETS.index(asset) + 1) % 5]).encode(),
               "none": None, "empty": b"", "upper": asset.upper().encode(), "space": (asset + " ").encode(),
               "random": random_key if random_key != asset.encode() else b"x",
               "invalid_utf8": asset.encode() + b"\xff", "bom": "\ufeff".encode() + asset.encode()}[how]
    text = narrow(j(asset), str(ctx.ts), j("Current"), "1.5") if b.chance(2) else wide(j(asset), str(ctx.ts), one_value())
    return Rec("key_mismatch", key, text.encode(), one("key_mismatch"))


RENDER: dict[str, Callable[[Any, Bits, Ctx], Rec]] = {
    "random_bytes": render_random, "truncated_json": render_truncated, "deep_nesting": render_deep,
    "numbers": render_numbers, "wrong_types": render_wrong, "unicode_asset": render_unicode,
    "duplicate_keys": render_duplicate_keys, "timestamps": render_timestamps, "key_mismatch": render_key_mismatch,
}


def sized(asset: str, ts: int, size: int, kind_: str, expect: frozenset[str]) -> Rec:
    """A wide reading padded to exactly ``size`` bytes."""
    base = obj(("asset", j(asset)), ("ts", str(ts)), ("values", one_value()), ("pad", '""'))
    pad = size - len(base)
    assert pad >= 0
    text = obj(("asset", j(asset)), ("ts", str(ts)), ("values", one_value()), ("pad", j("x" * pad)))
    assert len(text) == size
    return Rec(kind_, asset.encode(), text.encode(), expect)


# ---------------------------------------------------------------- good readings


class Plant:
    """The good stream: the simulated plant, its records, and what each example adds."""

    def __init__(self, start_ms: int, examples: int) -> None:
        self.start_ms = start_ms
        self.frame = PlantSimulator(PLANT).frame(start_ms, start_ms + examples * STEPS_PER_EXAMPLE * PERIOD_MS)
        self.rows = list(self.frame.itertuples(index=False))

    def records(self, e: int, rnd: random.Random) -> list[tuple[int, Rec]]:
        """This example's good records, (step, record) in time order."""
        lo = e * STEPS_PER_EXAMPLE * len(GOOD_ASSETS)
        out = []
        for r in self.rows[lo: lo + STEPS_PER_EXAMPLE * len(GOOD_ASSETS)]:
            step = (int(r.ts_ms) - self.start_ms) // PERIOD_MS - e * STEPS_PER_EXAMPLE
            values = {f: float(getattr(r, f)) for f in FEATURES}
            if rnd.random() < ISO_SHARE:
                variant = rnd.choice(iso_variants.VARIANTS)
                text = iso_variants.render(int(r.ts_ms), variant, rnd.choice([-720, -480, -210, 0, 60, 330, 345, 840]))
                ts_raw = j(text or iso_variants.render(int(r.ts_ms), "z"))
            else:
                ts_raw = str(int(r.ts_ms))
            if rnd.random() < NARROW_SHARE:
                for f in FEATURES:
                    text = narrow(j(r.asset), ts_raw, j(f), repr(values[f]))
                    out.append((step, Rec("good", r.asset.encode(), text.encode(), one(ACCEPTED))))
            else:
                out.append((step, Rec("good", r.asset.encode(), wide(j(r.asset), ts_raw, j(values)).encode(),
                                      one(ACCEPTED))))
        return out


# ---------------------------------------------------------------- daemons


class Daemon:
    """A daemon's ``run()`` in a thread: its exit code, or the exception that ended it."""

    def __init__(self, daemon: Any, stop: threading.Event) -> None:
        self.daemon, self.stop = daemon, stop
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=type(daemon).__name__)

    def _run(self) -> None:
        try:
            self.code = self.daemon.run()
        except BaseException as exc:  # a crash is what this test looks for
            self.error = exc

    def start(self) -> Daemon:
        self.thread.start()
        return self

    def finish(self, timeout_s: float = 120) -> None:
        self.stop.set()
        self.thread.join(timeout_s)

    @property
    def crashed(self) -> bool:
        return self.error is not None or (not self.thread.is_alive() and self.code not in (None, 0)) or (
            not self.thread.is_alive() and not self.stop.is_set())


class Monitor:
    """Samples the daemons' record counts; a stall is a daemon not yet through the produced records
    (:func:`read_through`) that consumed nothing for ``STALL_S``."""

    def __init__(self, daemons: dict[str, Daemon]) -> None:
        self.daemons = daemons
        self.produced = 0
        self.ends: dict[int, int] = {}  # partition → offset after its last produced record
        self.stalls: Counter[str] = Counter()
        self.longest_wait_s: dict[str, float] = {name: 0.0 for name in daemons}
        self.stalled: dict[str, dict[str, Any]] = {}  # a stalled daemon's thread and consumer when the stall was seen
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        last = {name: (-1, time.monotonic()) for name in self.daemons}
        stalled = set()
        while not self._done.wait(0.5):
            now = time.monotonic()
            for name, d in self.daemons.items():
                seen = d.daemon.stats.records
                if seen != last[name][0] or at_end(d.daemon, self.ends):
                    last[name] = (seen, now)
                    stalled.discard(name)
                    continue
                waited = now - last[name][1]
                self.longest_wait_s[name] = max(self.longest_wait_s[name], round(waited, 1))
                if waited > STALL_S and name not in stalled:
                    stalled.add(name)
                    self.stalls[name] += 1
                    try:
                        consumer = consumer_state(d.daemon.consumer)
                    except Exception as exc:  # noqa: BLE001 - the sample is for the report; the monitor goes on
                        consumer = {"error": repr(exc)}
                    self.stalled.setdefault(name, {"records": seen, "produced": self.produced, "consumer": consumer,
                                                   "stack": thread_stack(d.thread)})

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)


def read_through(daemon: Any) -> dict[int, int]:
    """Per owned partition, the offset below which the daemon has handled every record, after any
    rewind: a record count cannot tell, since a rewind re-reads (and counts) records again."""
    if isinstance(daemon, Detector):
        if daemon.to_restore or daemon.rewind:  # about to re-read from the committed offsets
            return {}
        return {p: c.position for p, c in list(daemon.checkpoints.cursors.items())}
    consumer = daemon.consumer  # the archiver adds what a poll returned before it polls again
    if consumer is None:
        return {}
    return {tp.partition: st.position.offset for tp, st in list(consumer._subscription.assignment.items())
            if st.position is not None}  # pinned kafka-python internals


def at_end(daemon: Any, ends: dict[int, int]) -> bool:
    """Whether the daemon has handled every record produced so far."""
    through = read_through(daemon)
    return bool(ends) and all(through.get(p, -1) >= end for p, end in list(ends.items()))


def consumer_state(consumer: Any) -> dict[str, Any]:
    """Per assigned partition: position, high watermark and what gates fetching (kafka-python's
    partition state), and the group membership."""
    if consumer is None:
        return {}
    parts = {}
    for tp, st in list(consumer._subscription.assignment.items()):  # pinned kafka-python internals
        parts[tp.partition] = {"highwater": consumer.highwater(tp), "fetchable": st.is_fetchable(),
                               **{k.lstrip("_"): repr(v) for k, v in vars(st).items()}}
    coordinator = consumer._coordinator
    return {"partitions": parts, "paused": sorted(tp.partition for tp in consumer.paused()),
            "coordinator": {"state": str(coordinator.state), "rejoin_needed": coordinator.rejoin_needed,
                            "unknown": coordinator.coordinator_unknown()}}


def thread_stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(thread ended)"


def wait_for(predicate: Callable[[], bool], timeout_s: float, daemons: dict[str, Daemon]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if any(d.crashed for d in daemons.values()):
            return False
        time.sleep(0.2)
    return predicate()


# ---------------------------------------------------------------- oracle


def decoded_outcome(rec: Rec) -> str | None:
    """The record alone through the decoder and the key rule: a DLQ reason, or None (the grid decides)."""
    batch = decode_batch([rec.value], FEATURES, limits=LIMITS)
    if batch.rejects:
        return batch.rejects[0].reason
    key = None if rec.key is None else rec.key.decode("utf-8", "replace")
    return "key_mismatch" if key != batch.asset[0] else None


def archived_rows(rec: Rec) -> list[tuple[str, int, str, float]]:
    """What the archiver must write for this record (it ignores unknown features)."""
    b = decode_batch([rec.value], FEATURES, limits=LIMITS, unknown_features="ignore")
    return [(a, int(t), FEATURES[f], float(v)) for a, t, f, v in zip(b.asset, b.ts_ms, b.feature, b.value)]


# ---------------------------------------------------------------- the test


def test_fuzz_detector_and_archiver(broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    started = time.monotonic()
    settings = detector_settings(settings_for, broker, {
        "kafka.max_poll_records": "5000", "archive.flush_seconds": "5", "archive.flush_rows": "1000000"}, scores=True)
    topic = settings.topics.readings
    plant = Plant(fitted_plant.stream_start_ms, EXAMPLES)

    stops = {"detector": threading.Event(), "archiver": threading.Event()}
    daemons = {
        "detector": Daemon(Detector(settings, fitted_plant.bundle, stop=stops["detector"]), stops["detector"]).start(),
        "archiver": Daemon(Archiver(settings, stop=stops["archiver"]), stops["archiver"]).start(),
    }
    monitor = Monitor(daemons).start()
    producer = make_producer(settings)
    big_producer = make_producer(settings, max_request_size=16 << 20)
    sent: dict[tuple[int, int], Rec] = {}
    broker_refused: list[tuple[int, str]] = []
    counter = {"uid": 0, "example": 0}
    previous_good: list[list[Rec]] = []  # the good records of the last two slices

    @hyp_settings(max_examples=EXAMPLES, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(hostile=st.lists(HOSTILE, min_size=HOSTILE_PER_EXAMPLE - 1, max_size=HOSTILE_PER_EXAMPLE - 1),
           oversize=st.integers(MAX_RECORD + 1, 120_000),
           above_producer=st.integers(1_000_001, 2_500_000), extremes=st.lists(
               st.floats(allow_nan=False, allow_infinity=False), min_size=8, max_size=8),
           seed=st.integers(0, 2 ** 32 - 1))
    def one_example(hostile: list[tuple[str, Any, int]], oversize: int, above_producer: int,
                    extremes: list[float], seed: int) -> None:
        e = counter["example"]
        counter["example"] += 1
        rnd = random.Random(seed)
        now_ms = int(time.time() * 1000)
        window = plant.start_ms + e * STEPS_PER_EXAMPLE * PERIOD_MS
        good = plant.records(e, rnd)
        # Readings of extreme finite numbers, on the good readings' grid.
        pool = extremes + EXTREME_FLOATS
        for k in range(STEPS_PER_EXAMPLE):
            for asset in EXTREME_ASSETS:
                text = wide(j(asset), str(window + k * PERIOD_MS), j({f: rnd.choice(pool) for f in FEATURES}))
                good.append((k, Rec("extreme_values", asset.encode(), text.encode(), one(ACCEPTED))))
        good.sort(key=lambda sr: sr[0])  # stable: each asset's records stay in time order
        stream = [r for _, r in good]

        # Hostile records at random places; the special ones (sizes, duplicates) are added here.
        specs: list[Any] = list(hostile)
        sized_specs = [(oversize, GOOD_ASSETS[e % 5], "oversize", "oversize")]
        if e % 10 == 0:  # the limit itself, and one byte more
            sized_specs += [(MAX_RECORD, f"fuzz-size-{e}", ACCEPTED, "max_record_bytes"),
                            (MAX_RECORD + 1, f"fuzz-size-{e}-over", "oversize", "oversize")]
        if e % 40 == 20 or EXAMPLES < 40 and e == EXAMPLES - 1:
            sized_specs.append((above_producer, GOOD_ASSETS[e % 5], "oversize", "above_producer_limit"))
        if e in {0, EXAMPLES // 2, EXAMPLES - 1}:
            sized_specs.append((TEN_MB + rnd.randrange(1 << 16), GOOD_ASSETS[e % 5], "oversize", "ten_mb"))
        specs += [("sized", s, 0) for s in sized_specs]
        fresh_dups: dict[int, list[Rec]] = defaultdict(list)
        placed: list[Any] = []
        for spec in specs:
            name, main, bits = spec
            if name != "duplicated":
                placed.append(spec)
            elif main and len(previous_good) == 2:  # late: a reading of the slice before the previous one
                candidates = previous_good[0]
                src = candidates[bits % len(candidates)]
                placed.append(Rec("duplicated_late", src.key, src.value, one("late")))
            else:  # fresh: sent again right after itself, averaged into the same step
                i = bits % len(stream)
                src = stream[i]
                fresh_dups[i].append(Rec("duplicated_fresh", src.key, src.value, one(ACCEPTED)))
        previous_good[:] = [*previous_good, [r for _, r in good if r.kind == "good"]][-2:]

        seq: list[Any] = []
        for i, r in enumerate(stream):
            seq.append(r)
            seq.extend(fresh_dups.get(i, []))
        total = len(seq) + len(placed)
        slots = set(rnd.sample(range(total), len(placed)))
        rnd.shuffle(placed)
        it_seq, it_placed = iter(seq), iter(placed)
        merged = [next(it_placed) if pos in slots else next(it_seq) for pos in range(total)]

        futures = []
        for pos, item in enumerate(merged):
            if not isinstance(item, Rec):
                name, main, bits = item
                ctx = Ctx(window + pos * STEPS_PER_EXAMPLE * PERIOD_MS // total, counter["uid"], now_ms)
                counter["uid"] += 1
                if name == "sized":
                    size, asset, outcome, kind_ = main
                    item = sized(asset, ctx.ts, size, kind_, one(outcome))
                else:
                    item = RENDER[name](main, Bits(bits), ctx)
            big = item.value is not None and len(item.value) > BIG_PRODUCER_BYTES
            p = big_producer if big else producer
            futures.append((item, p.send(topic, key=item.key, value=item.value, headers=item.headers or None)))
        producer.flush()
        big_producer.flush()
        for item, fut in futures:
            try:
                md = fut.get(timeout=60)
            except Exception as exc:  # noqa: BLE001 - a refusal by the broker is a finding, reported
                broker_refused.append((len(item.value or b""), f"{type(exc).__name__}: {exc}"))
                continue
            sent[(md.partition, md.offset)] = item
            monitor.ends[md.partition] = max(monitor.ends.get(md.partition, 0), md.offset + 1)
        monitor.produced = len(sent)

    try:
        one_example()
        producer.close()
        big_producer.close()
        produce_s = time.monotonic() - started
        total = len(sent)
        consumed = wait_for(lambda: all(at_end(d.daemon, monitor.ends) for d in daemons.values()), 300, daemons)
        crashed_before_stop = {name: d.crashed for name, d in daemons.items()}
        assets_held = len(daemons["detector"].daemon.engine.state)  # dropped when it stops
    finally:
        monitor.close()
        for d in daemons.values():
            d.finish()

    # ------------------------------------------------------------ what came out
    det, arch = daemons["detector"].daemon, daemons["archiver"].daemon
    dlq = read_topic(settings, settings.topics.dlq_topic, timeout_s=120)
    scores = read_topic(settings, settings.topics.scores, timeout_s=120)

    by_kind = Counter(r.kind for r in sent.values())
    letters: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for r in dlq:
        h = decode_dead_letter_headers(r.headers)
        letters[(int(h["source.partition"]), int(h["source.offset"]))].append((r, h))
    dlq_reasons = Counter(h["reason"] for recs in letters.values() for _, h in recs)
    problems: dict[str, list[Any]] = defaultdict(list)
    accepted_expected = 0
    truncated = 0
    for where, rec in sent.items():
        got = letters.get(where, [])
        oracle = decoded_outcome(rec)
        if len(got) > 1:
            problems["dlq_duplicates"].append((where, rec.kind))
        outcome = got[0][1]["reason"] if got else ACCEPTED
        if outcome not in rec.expect:
            problems["unexpected_outcome"].append((where, rec.kind, outcome, sorted(rec.expect), (rec.value or b"")[:160]))
        if oracle is not None and outcome != oracle:
            problems["differs_from_decoding_alone"].append((where, rec.kind, outcome, oracle, (rec.value or b"")[:160]))
        if not got:
            accepted_expected += 1
            continue
        letter, h = got[0]
        if h["source.topic"] != settings.topics.readings or not h.get("detail") or "source.timestamp_ms" not in h:
            problems["dlq_headers"].append((where, h))
        if rec.value is None:
            if letter.value is not None or "original.size" in h:
                problems["dlq_null_value"].append(where)
        else:
            if h.get("original.size") != str(len(rec.value)) or \
                    h.get("original.sha256") != hashlib.sha256(rec.value).hexdigest():
                problems["dlq_size_or_hash"].append(where)
            if h.get("truncated") == "true":
                truncated += 1
                if not rec.value.startswith(letter.value) or len(letter.value) >= len(rec.value):
                    problems["dlq_truncated_value"].append(where)
            elif letter.value != rec.value:
                problems["dlq_value"].append(where)
        if "original.key_size" not in h and letter.key != rec.key:
            problems["dlq_key"].append((where, rec.key, letter.key))
        kept = [(name[len(HEADER_PREFIX):], value) for name, value in letter.headers if name.startswith(HEADER_PREFIX)]
        if "original.headers_dropped" not in h and kept != [(n.encode("utf-8", "replace").decode(), v)
                                                              for n, v in rec.headers]:
            problems["dlq_original_headers"].append((where, rec.headers, kept))
    stray = [w for w in letters if w not in sent]
    if stray:
        problems["dlq_of_unknown_records"] = stray

    # The archive: the raw files by partition and offset, and the trainer's scan. A reading the
    # detector refused as stamped too far ahead of its record is kept out of the archive too.
    future = {w for w, got in letters.items() if any(h.get("reason") == "future" for _, h in got)}
    want_rows: dict[tuple[int, int], Counter[Any]] = {}
    for where, rec in sent.items():
        rows = [] if where in future else archived_rows(rec)
        if rows:
            want_rows[where] = Counter(rows)
    table = ds.dataset(settings.archive.uri, format="parquet", partitioning="hive",
                       exclude_invalid_files=False, ignore_prefixes=[".", "_"]).to_table()
    got_rows: dict[tuple[int, int], Counter[Any]] = defaultdict(Counter)
    for a, t, f, v, p, o in zip(*(table.column(c).to_pylist() for c in ("asset", "ts_ms", "feature", "value",
                                                                          "partition", "offset"))):
        got_rows[(p, o)][(a, t, f, v)] += 1
    archive_missing = [w for w in want_rows if got_rows.get(w) != want_rows[w]]
    archive_extra = [w for w in got_rows if w not in want_rows]
    good_where = [w for w, r in sent.items() if r.kind == "good"]
    good_archived_once = sum(1 for w in good_where if got_rows.get(w) == want_rows.get(w))
    all_ts = [t for c in want_rows.values() for (_, t, _, _) in c]
    scan_stats = ScanStats()
    scanned: Counter[Any] = Counter()
    for b in scan_archive(settings.archive.uri, FEATURES, start_ms=min(all_ts), end_ms=max(all_ts) + 1, stats=scan_stats):
        scanned.update(zip(b.asset.tolist(), b.ts_ms.tolist(), [FEATURES[f] for f in b.feature.tolist()],
                           b.value.tolist()))
    want_scan: Counter[Any] = Counter()
    for c in want_rows.values():
        want_scan.update(c)
    scan_matches = scanned == want_scan

    # Scores of the good assets against a reference engine fed the good readings alone.
    engine = DetectionEngine(fitted_plant.bundle, settings.grid)
    out = engine.process(frame_to_batch(plant.frame, FEATURES, ts_col="ts_ms", asset_col="asset"))
    reference = {(a, int(s) * PERIOD_MS): float(sc) for a, s, sc, ok in zip(out.asset, out.step, out.alert_score, out.forecast_error)
                 if ok == ok}
    got_scores = Counter()
    score_of: dict[tuple[str, int], float] = {}
    other_scored = Counter()
    for r in scores:
        body = json.loads(r.value)
        k = (body["asset"], body["step_ms"])
        if body["asset"] in GOOD_ASSETS:
            got_scores[k] += 1
            score_of[k] = body["score"]
        else:
            other_scored["extreme" if body["asset"] in EXTREME_ASSETS else body["asset"][:8] if
                         body["asset"].startswith("fuzz-") else "unicode"] += 1
    lost = set(reference) - set(got_scores)
    extra = set(got_scores) - set(reference)
    duplicated = {k: n for k, n in got_scores.items() if n > 1}
    diffs = [abs(score_of[k] - reference[k]) for k in reference if k in score_of]
    max_diff = max(diffs, default=0.0)
    # The assets of extreme finite numbers: what the same engine makes of their readings alone.
    ext = sorted((w, r) for w, r in sent.items() if r.kind in ("extreme_values", "duplicated_fresh")
                 and r.key is not None and r.key.decode("utf-8", "replace") in EXTREME_ASSETS)
    ext_out = DetectionEngine(fitted_plant.bundle, settings.grid).process(
        decode_batch([r.value for _, r in ext], FEATURES))
    extreme = {"readings": len(ext), "steps_closed": len(ext_out),
               "steps_scored_reference": int(np.isfinite(ext_out.forecast_error).sum()), "steps_scored": other_scored["extreme"]}

    hostile_sent = sum(n for k, n in by_kind.items() if k != "good")
    row = {
        "examples": counter["example"],
        "records_sent": total,
        "hostile_sent": hostile_sent,
        "sent_by_kind": dict(sorted(by_kind.items())),
        "largest_value_sent": max(len(r.value or b"") for r in sent.values()),
        "broker_refused": broker_refused[:5],
        "dlq_records": len(dlq),
        "dlq_by_reason": dict(sorted(dlq_reasons.items())),
        "dlq_truncated": truncated,
        "detector": {"records": det.stats.records, "accepted": det.stats.accepted, "scored_steps": det.stats.scored,
                     "alert_events": det.stats.alert_events, "rejects_match_dlq": det.stats.rejects == dict(dlq_reasons),
                     "restores": len(det.restore_s), "replayed": det.stats.replayed},
        "archiver": {"records": arch.stats.records, "readings": arch.stats.readings, "files": arch.stats.files,
                     "rejects": dict(sorted(arch.stats.rejects.items())), "write_retries": arch.stats.write_retries},
        "crashes": sum(1 for d in daemons.values() if d.crashed or d.code not in (0,)),
        "crash_errors": [repr(d.error) for d in daemons.values() if d.error is not None],
        "exit_codes": {name: d.code for name, d in daemons.items()},
        "stalls": sum(monitor.stalls.values()),
        "longest_wait_behind_s": monitor.longest_wait_s,
        "stalled": monitor.stalled,
        "all_consumed": consumed,
        "good_readings": len(good_where),
        "good_archived_once": good_archived_once,
        "archive_rows": int(table.num_rows),
        "archive_missing": len(archive_missing),
        "archive_extra": len(archive_extra),
        "scan_matches_archive": scan_matches,
        "scan_duplicates": scan_stats.duplicates,
        "good_steps_reference": len(reference),
        "good_steps_scored_once": sum(1 for k in reference if got_scores.get(k) == 1),
        "scores_lost": len(lost),
        "scores_extra": len(extra),
        "scores_duplicated": len(duplicated),
        "max_score_diff": round(max_diff, 7),
        "other_assets_scored_steps": dict(other_scored),
        "extreme_assets": extreme,
        "assets_held_by_detector": assets_held,
        "problems": {k: len(v) for k, v in problems.items()},
        "examples_of_problems": {k: [repr(x)[:400] for x in v[:3]] for k, v in problems.items()},
        "produce_s": round(produce_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    faults.record("fuzz", row)
    print("fuzz", json.dumps(row, indent=1))

    assert not broker_refused, broker_refused[:3]
    assert row["crashes"] == 0 and not any(crashed_before_stop.values()), row["crash_errors"]
    assert row["stalls"] == 0, (monitor.longest_wait_s, json.dumps(monitor.stalled, indent=1, default=repr))
    assert consumed, {name: d.daemon.stats.records for name, d in daemons.items()}
    assert hostile_sent >= HOSTILE_PER_EXAMPLE * EXAMPLES * 0.99
    assert not problems, row["examples_of_problems"]
    assert det.stats.records >= total and arch.stats.records >= total  # more after a rewind re-read some
    if det.stats.records == total:  # read once (no rebalance or rewind under load): the counters are exact
        assert det.stats.rejects == dict(dlq_reasons)
        assert det.stats.accepted == accepted_expected
    assert not archive_missing and not archive_extra, (archive_missing[:3], archive_extra[:3])
    assert good_archived_once == len(good_where)
    assert arch.stats.readings == len(want_rows)
    assert scan_matches and scan_stats.duplicates == 0
    assert not lost and not extra and not duplicated, (sorted(lost)[:3], sorted(extra)[:3], list(duplicated)[:3])
    assert max_diff < 1e-4
