"""JSON through orjson, with the standard library for what orjson refuses.

orjson is several times faster, but strict: it refuses NaN, numbers beyond float range and
lone surrogates, which the standard parser and encoder accept. Falling back keeps every result
what the standard library gives, so a reading keeps its verdict and a snapshot header its value.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: bytes | str) -> Any:
    """Parse ``raw``; raises as ``json.loads`` does (``ValueError``, ``RecursionError``), and
    ``UnicodeDecodeError`` for bytes that are not UTF-8 (lone surrogates pass)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (lone surrogates kept)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8", "surrogatepass")
