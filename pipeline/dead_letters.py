"""Build the record that goes to the dead-letter topic for a rejected input record.

A dead letter must always be publishable: a record the producer refuses (kafka-python
raises ``MessageSizeTooLargeError`` above ``max_request_size``, 1 MiB by default) would
take the detector down with the very input it meant to set aside. So :func:`dead_letter`
returns a record whose size is bounded by ``max_bytes`` and never raises on bad input.

When the whole record fits, key and value are kept byte for byte (a null value stays
null) and the original headers are kept under ``original.header.<name>``, so they can
never collide with the headers added here. When it does not fit, in this order:

* the key is kept if it takes at most a quarter of the room left after the headers added
  here, else a prefix of that size is kept (``original.key_size`` says how long it was);
* the original headers are kept if together they take at most a quarter of that room,
  else all are dropped (``original.headers_dropped`` = how many): all or none, so a
  reader never takes a subset for the whole;
* the value keeps the longest prefix that still fits.

Such a record carries ``truncated`` = ``true``. ``original.size`` (decimal bytes) and
``original.sha256`` (hex) of the whole original value are added to *every* dead letter
with a non-null value, truncated or not: hashing a rejected record is cheap next to
producing it, and one rule lets a tool check integrity or find the original record on
the source topic without first asking whether it was cut. Both are absent exactly when
the original value was null (the dead letter's value is then null too).

Headers always added: ``reason``, ``detail`` (at most :data:`DETAIL_MAX_CHARS`
characters), ``source.topic``, ``source.partition``, ``source.offset``,
``source.timestamp_ms``. Text is UTF-8; unencodable characters (lone surrogates) become
``?``. A null original header value becomes ``b""``, because kafka-python's producer
calls ``len()`` on header values in one of its paths.

Sizes are counted with an upper bound of Kafka's record-batch encoding (every length
varint taken at its 5-byte maximum, plus :data:`OVERHEAD_BYTES` for batch and record
framing, well above the 82 bytes kafka-python adds), so a record that fits here fits the
producer's own check. Callers should pass the smallest of the producer's
``max_request_size``, the broker's ``message.max.bytes`` and the dead-letter topic's
``max.message.bytes``. The guarantee holds for ``max_bytes >= MIN_MAX_BYTES``; below
that the result is the smallest record this function can make and may not fit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OVERHEAD_BYTES = 512
"""Allowance for batch header and record framing (kafka-python itself adds 61 + 21)."""

DETAIL_MAX_CHARS = 1_000
REASON_MAX_CHARS = 200
TOPIC_MAX_CHARS = 255  # Kafka topic names have at most 249
MIN_MAX_BYTES = 8_192
"""Smallest ``max_bytes`` for which the result is guaranteed to fit: the headers added
here and the framing allowance take at most about 7 kB (reason, detail and topic at their
character bounds, 4 UTF-8 bytes per character)."""

HEADER_PREFIX = "original.header."
_VARINT_MAX = 5  # a length below 2**31 takes at most 5 bytes as a zigzag varint
_ELLIPSIS = "…"

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class DeadLetter:
    """What to send to the dead-letter topic: ``producer.send(topic, key=..., value=..., headers=...)``."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """Upper bound of the bytes the producer counts for one record sent alone in a batch."""
    size = OVERHEAD_BYTES + _VARINT_MAX * 3 + len(key or b"") + len(value or b"")
    for name, data in headers:
        size += 2 * _VARINT_MAX + len(name.encode("utf-8", "replace")) + len(data or b"")
    return size


def dead_letter(*, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None,
                reason: str, detail: str, topic: str, partition: int, offset: int, timestamp_ms: int,
                max_bytes: int) -> DeadLetter:
    """The dead letter of one source record, at most ``max_bytes`` large (see the module docstring)."""
    added: Headers = [
        ("reason", _text(reason, REASON_MAX_CHARS)),
        ("detail", _text(detail, DETAIL_MAX_CHARS)),
        ("source.topic", _text(topic, TOPIC_MAX_CHARS)),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
        ("source.timestamp_ms", str(timestamp_ms).encode()),
    ]
    if value is not None:
        added += [("original.size", str(len(value)).encode()),
                  ("original.sha256", hashlib.sha256(value).hexdigest().encode())]
    kept: Headers = [(HEADER_PREFIX + _clean(name), data if data is not None else b"")
                     for name, data in (headers or ())]

    if record_size(key, value, added + kept) <= max_bytes:
        return DeadLetter(key=key, value=value, headers=added + kept)

    # Does not fit: reserve the truncation headers at their largest, then share the rest.
    key_len = len(key or b"")
    marks: Headers = [("truncated", b"true"),
                      ("original.headers_dropped", str(len(kept)).encode()),
                      ("original.key_size", str(key_len).encode())]
    room = max(0, max_bytes - record_size(None, None, added + marks))
    quarter = room // 4

    key_cut = key is not None and key_len > quarter
    new_key = key[:quarter] if key is not None and key_cut else key
    kept_size = record_size(None, None, kept) - record_size(None, None, [])
    dropped = len(kept) if kept_size > quarter else 0
    if dropped:
        kept = []
    new_value = value
    if value is not None:
        used = len(new_key or b"") + (0 if dropped else kept_size)
        new_value = value[:max(0, room - used)]

    out = added + [("truncated", b"true")]
    if dropped:
        out.append(("original.headers_dropped", str(dropped).encode()))
    if key_cut:
        out.append(("original.key_size", str(key_len).encode()))
    return DeadLetter(key=new_key, value=new_value, headers=out + kept)


def decode_dead_letter_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """Headers as text, for tests and tools; a later duplicate name wins, as in a dict."""
    return {name: (data or b"").decode("utf-8", "replace") for name, data in headers}


def original_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The source record's headers from :func:`decode_dead_letter_headers`, unprefixed."""
    return {name[len(HEADER_PREFIX):]: data for name, data in headers.items() if name.startswith(HEADER_PREFIX)}


def _clean(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) replaced by ``?``."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _text(text: str, max_chars: int) -> bytes:
    """``text`` cut to ``max_chars`` characters (an ellipsis marks the cut), as UTF-8."""
    if len(text) > max_chars:
        text = text[:max_chars - 1] + _ELLIPSIS
    return text.encode("utf-8", "replace")
