"""Dead letters stay publishable whatever the rejected record looks like.

Sizes are checked twice: with the module's own bound, and by encoding the record as a
one-record batch with kafka-python's record-batch builder, which is what the producer's
``max_request_size`` check and the broker see.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.dead_letters import (
    DETAIL_MAX_CHARS,
    HEADER_PREFIX,
    MIN_MAX_BYTES,
    DeadLetter,
    dead_letter,
    decode_dead_letter_headers,
    original_headers,
    record_size,
)

MiB = 1_048_576
SOURCE = {"topic": "plant.readings", "partition": 3, "offset": 41_234, "timestamp_ms": 1_700_000_000_123}


def make(**kw: object) -> DeadLetter:
    args: dict[str, object] = {"key": b"pump-7", "value": b'{"asset": "pump-7"}', "headers": [],
                               "reason": "bad_json", "detail": "Expecting value", "max_bytes": MiB, **SOURCE}
    args.update(kw)
    return dead_letter(**args)  # type: ignore[arg-type]


def encoded_size(dl: DeadLetter) -> int:
    """Bytes of ``dl`` encoded alone in an uncompressed v2 record batch."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    builder.append(0, timestamp=SOURCE["timestamp_ms"], key=dl.key, value=dl.value, headers=dl.headers)
    return len(builder.build())


def assert_fits(dl: DeadLetter, max_bytes: int) -> None:
    assert record_size(dl.key, dl.value, dl.headers) <= max_bytes
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(dl.key, dl.value, dl.headers) <= max_bytes
    assert encoded_size(dl) <= max_bytes
    assert all(isinstance(name, str) and isinstance(data, bytes) for name, data in dl.headers)


def test_small_record_is_kept_whole_with_its_headers_prefixed() -> None:
    value = b'{"asset": "pump-7", "ts": "yesterday"}'
    dl = make(value=value, headers=[("trace-id", b"abc123"), ("schema", b"wide")], reason="bad_timestamp",
              detail="ts is not a timestamp")
    assert (dl.key, dl.value) == (b"pump-7", value)
    h = decode_dead_letter_headers(dl.headers)
    assert h == {
        "reason": "bad_timestamp", "detail": "ts is not a timestamp", "source.topic": "plant.readings",
        "source.partition": "3", "source.offset": "41234", "source.timestamp_ms": "1700000000123",
        "original.size": str(len(value)), "original.sha256": hashlib.sha256(value).hexdigest(),
        "original.header.trace-id": "abc123", "original.header.schema": "wide",
    }
    assert original_headers(h) == {"trace-id": "abc123", "schema": "wide"}
    assert "truncated" not in h


def test_null_value_and_null_key_stay_null() -> None:
    dl = make(key=None, value=None, reason="empty", detail="null value")
    assert dl.key is None and dl.value is None
    h = decode_dead_letter_headers(dl.headers)
    assert "original.size" not in h and "original.sha256" not in h and "truncated" not in h
    assert make(value=b"").value == b""  # empty is not null


def test_null_original_header_value_becomes_empty_bytes() -> None:
    dl = make(headers=[("flag", None)])
    assert (HEADER_PREFIX + "flag", b"") in dl.headers


def test_oversize_value_is_cut_to_fit_with_size_and_digest_of_the_original() -> None:
    value = bytes(range(256)) * (2_000_000 // 256) + b"x" * (2_000_000 % 256)
    assert len(value) == 2_000_000
    dl = make(value=value, headers=[("trace-id", b"abc123")], reason="oversize", detail="2000000 bytes")
    assert_fits(dl, MiB)
    assert dl.key == b"pump-7"
    assert dl.value is not None and value.startswith(dl.value)
    assert len(dl.value) > MiB - 8_192  # nearly all the room goes to the value
    h = decode_dead_letter_headers(dl.headers)
    assert h["truncated"] == "true"
    assert h["original.size"] == "2000000"
    assert h["original.sha256"] == hashlib.sha256(value).hexdigest()
    assert h["original.header.trace-id"] == "abc123"
    assert "original.headers_dropped" not in h and "original.key_size" not in h


def test_original_headers_cannot_collide_with_added_ones() -> None:
    dl = make(headers=[("reason", b"spoofed"), ("source.offset", b"-1"), ("truncated", b"true")], reason="bad_json")
    h = decode_dead_letter_headers(dl.headers)
    assert h["reason"] == "bad_json" and h["source.offset"] == "41234" and "truncated" not in h
    assert original_headers(h) == {"reason": "spoofed", "source.offset": "-1", "truncated": "true"}
    assert [name for name, _ in dl.headers].count("reason") == 1


def test_huge_original_headers_are_dropped_and_counted() -> None:
    headers = [(f"h{i}", b"z" * 100_000) for i in range(15)]  # 1.5 MB of headers
    dl = make(headers=headers, value=b"v" * 5_000)
    assert_fits(dl, MiB)
    assert dl.value == b"v" * 5_000 and dl.key == b"pump-7"
    h = decode_dead_letter_headers(dl.headers)
    assert h["truncated"] == "true" and h["original.headers_dropped"] == "15"
    assert original_headers(h) == {}


def test_headers_within_a_quarter_of_the_room_are_kept_when_the_value_is_cut() -> None:
    headers = [(f"h{i}", b"z" * 100_000) for i in range(2)]
    dl = make(headers=headers, value=b"v" * 2_000_000)
    assert_fits(dl, MiB)
    h = decode_dead_letter_headers(dl.headers)
    assert "original.headers_dropped" not in h and len(original_headers(h)) == 2
    assert dl.value is not None and MiB - 220_000 < len(dl.value) < MiB - 200_000


def test_oversize_key_is_cut_and_its_size_recorded() -> None:
    dl = make(key=b"k" * 2 * MiB, value=b"v" * 10)
    assert_fits(dl, MiB)
    assert dl.key is not None and 0 < len(dl.key) <= MiB // 4 and dl.value == b"v" * 10
    h = decode_dead_letter_headers(dl.headers)
    assert h["original.key_size"] == str(2 * MiB) and h["truncated"] == "true"


def test_detail_is_bounded() -> None:
    h = decode_dead_letter_headers(make(detail="x" * 50_000).headers)
    assert len(h["detail"]) == DETAIL_MAX_CHARS and h["detail"].endswith("…")
    assert decode_dead_letter_headers(make(detail="x" * DETAIL_MAX_CHARS).headers)["detail"] == "x" * DETAIL_MAX_CHARS


def test_unicode_detail_is_utf8_and_lone_surrogates_do_not_raise() -> None:
    dl = make(detail="température > 80 °C — 泵 🔥")
    assert dict(dl.headers)["detail"] == "température > 80 °C — 泵 🔥".encode()
    dl = make(detail="bad \udc80 byte", headers=[("n\ud800", b"1")])
    h = decode_dead_letter_headers(dl.headers)
    assert h["detail"] == "bad ? byte" and h[HEADER_PREFIX + "n?"] == "1"
    encoded_size(dl)  # kafka-python can encode it


def test_smallest_guaranteed_budget_fits_the_worst_added_headers() -> None:
    dl = make(value=b"v" * 100_000, key=b"k" * 100_000, headers=[("h", b"z" * 100_000)], reason="🔥" * 5_000,
              detail="🔥" * 5_000, topic="🔥" * 5_000, partition=-(2**31), offset=-(2**63), timestamp_ms=-(2**63),
              max_bytes=MIN_MAX_BYTES)
    assert_fits(dl, MIN_MAX_BYTES)


def test_too_small_a_budget_does_not_raise() -> None:
    dl = make(value=b"v" * 10_000, key=b"k" * 100, headers=[("h", b"z")], max_bytes=100)
    assert dl.value == b"" and dl.key == b""
    assert decode_dead_letter_headers(dl.headers)["original.headers_dropped"] == "1"


@settings(max_examples=60, deadline=None)
@given(key_len=st.one_of(st.none(), st.integers(0, 3_000_000)),
       value_len=st.one_of(st.none(), st.integers(0, 3_000_000)),
       header_lens=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 400_000)), max_size=12),
       max_bytes=st.integers(MIN_MAX_BYTES, 2 * MiB),
       detail=st.text(max_size=3_000),
       seed=st.integers(0, 2**32))
def test_any_record_fits_and_keeps_the_digest_of_its_value(key_len: int | None, value_len: int | None,
                                                           header_lens: list[tuple[int, int]], max_bytes: int,
                                                           detail: str, seed: int) -> None:
    key = None if key_len is None else b"k" * key_len
    value = None if value_len is None else random.Random(seed).randbytes(value_len)
    headers = [("n" * n, b"h" * v) for n, v in header_lens]
    dl = make(key=key, value=value, headers=headers, detail=detail, max_bytes=max_bytes)
    assert record_size(dl.key, dl.value, dl.headers) <= max_bytes
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(dl.key, dl.value, dl.headers) <= max_bytes
    h = decode_dead_letter_headers(dl.headers)
    if value is None:
        assert dl.value is None and "original.sha256" not in h
    else:
        assert h["original.sha256"] == hashlib.sha256(value).hexdigest()
        assert h["original.size"] == str(len(value))
        assert dl.value is not None and value.startswith(dl.value)
    if record_size(key, value, headers) + 7_000 <= max_bytes:  # fits with room for the added headers
        assert (dl.key, dl.value) == (key, value) and "truncated" not in h
    if "truncated" not in h:
        assert (dl.key, dl.value) == (key, value) and len(original_headers(h)) == len(set(n for n, _ in headers))
