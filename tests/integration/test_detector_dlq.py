"""Bad input never stops the stream: every bad record reaches the DLQ with its reason and source."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

from consumers.kafka_clients import make_producer
from pipeline.readings import encode_wide
from pipeline.simulate import PlantSimulator

from .plant import PERIOD_MS, PLANT, detector_settings, read_topic, running_detector, wait_until

FEATURES = PLANT.features


def bad_records(ts: int) -> list[tuple[str, bytes | None, bytes, str]]:
    """(reason, key, value, note): one record per kind of bad input."""
    a = "pump-000"
    good_values = {f: 1.0 for f in FEATURES}

    def wide(**kw: Any) -> bytes:
        return json.dumps({"asset": a, "ts": ts, "values": good_values, **kw}).encode()

    return [
        ("empty", a.encode(), b"", "empty value"),
        ("oversize", a.encode(), wide(pad="x" * 70_000), "bigger than detector.max_record_bytes"),
        ("bad_encoding", a.encode(), b"\xff\xfe\x00{", "not UTF-8"),
        ("malformed_json", a.encode(), b'{"asset": "pump-000", "ts": ', "truncated JSON"),
        ("not_object", a.encode(), b"[1, 2, 3]", "a JSON array"),
        ("unknown_format", a.encode(), json.dumps({"asset": a, "ts": ts}).encode(), "neither wide nor narrow"),
        ("missing_field", a.encode(), json.dumps({"asset": a, "values": good_values}).encode(), "no ts"),
        ("bad_asset", a.encode(), json.dumps({"asset": 42, "ts": ts, "values": good_values}).encode(), "asset not a string"),
        ("bad_timestamp", a.encode(), wide(ts="yesterday"), "unparsable ts"),
        ("absurd_timestamp", a.encode(), wide(ts=1234), "1970"),
        ("bad_value", a.encode(), wide(values={**good_values, "Current": "high"}), "string value"),
        ("non_finite", a.encode(), wide(values={**good_values, "Current": math.nan}), "NaN"),
        ("unknown_feature", a.encode(), wide(values={**good_values, "Bogus": 1.0}), "feature outside the model"),
        ("empty_values", a.encode(), wide(values={}), "no values"),
        ("key_mismatch", b"pump-001", wide(), "key names another asset"),
        ("key_mismatch", None, wide(), NO_KEY),
        ("late", a.encode(), wide(ts=ts - 3_600_000), "an hour behind the watermark"),
        ("future", a.encode(), wide(ts=int(time.time() * 1000) + 86_400_000), "a day ahead of the wall clock"),
        # Judged against its record's timestamp, which a replay reads again, not against the clock
        # of whichever member happens to process it: now, but 10 minutes ahead of its record.
        ("future", b"pump-999", wide(asset="pump-999", ts=int(time.time() * 1000)), RECORD_WRITTEN_EARLIER),
    ]


RECORD_WRITTEN_EARLIER = "stamped now, its record 10 minutes earlier"
NO_KEY = "no key at all (a producer that sends none)"


def test_every_bad_record_goes_to_the_dlq_with_its_reason_and_every_good_one_is_scored(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker)
    start = fitted_plant.stream_start_ms
    frame = PlantSimulator(PLANT).frame(start, start + 600 * PERIOD_MS)
    bad = bad_records(start + 300 * PERIOD_MS)
    producer = make_producer(settings)
    sent_bad: dict[tuple[int, int], str] = {}
    keyless: list[tuple[int, int]] = []
    good = 0
    bad_iter = iter(bad)
    for i, row in enumerate(frame.itertuples(index=False)):
        values = {f: float(getattr(row, f)) for f in FEATURES}
        producer.send(settings.topics.readings, key=row.asset.encode(), value=encode_wide(row.asset, row.ts_ms, values))
        good += 1
        if i >= 1600 and i % 50 == 0:  # interleave, after pump-000's watermark passed the "late" reading's step
            reason, key, value, note = next(bad_iter, (None, None, b"", ""))
            if reason is not None:
                stamp = int(time.time() * 1000) - 600_000 if note == RECORD_WRITTEN_EARLIER else None
                meta = producer.send(settings.topics.readings, key=key, value=value, timestamp_ms=stamp).get(timeout=10)
                sent_bad[(meta.partition, meta.offset)] = reason
                if note == NO_KEY:
                    keyless.append((meta.partition, meta.offset))
    producer.flush()
    producer.close()
    assert len(sent_bad) == len(bad) >= 16

    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= good + len(bad), 120, "every record to be read")
        dlq = read_topic(settings, settings.topics.dlq_topic, until=lambda r: len(r) >= len(bad), timeout_s=30)
        assert det.stats.accepted == good  # every good reading placed on the grid (and its steps scored)
        assert det.stats.rejects == Counter(reason for reason, *_ in bad)
    got, details = {}, {}
    for r in dlq:
        h = {k: v.decode() for k, v in r.headers}
        assert h["source.topic"] == settings.topics.readings
        got[(int(h["source.partition"]), int(h["source.offset"]))] = h["reason"]
        details[(int(h["source.partition"]), int(h["source.offset"]))] = h["detail"]
        assert h["detail"]
    assert got == sent_bad
    assert "has no key" in details[keyless[0]]
