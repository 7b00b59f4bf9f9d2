"""How far ahead a reading may be stamped is judged against its Kafka record, so a replay judges
alike, and the archiver keeps out exactly the readings the detector sends to its dead letters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from kafka import TopicPartition

from consumers.archiver import Archiver
from consumers.kafka_clients import record_clock
from pipeline.readings import encode_wide
from pipeline.settings import PUMP_FEATURES, load_settings

EARLIEST = 946_684_800_000  # the readings' own lower bound (2000-01-01)


def test_each_reading_is_bounded_by_its_record_timestamp_or_the_wall_clock_where_that_is_earlier() -> None:
    t = 1_767_225_600_000
    records = [SimpleNamespace(timestamp=s) for s in (t + 1_000, -1, t + 9_000, t + 4_000, 0)]
    # The second record has no timestamp (an old message format); the third was stamped by a
    # producer whose clock runs ahead of this member's; the last holds no clock reading at all.
    got = record_clock(records, t + 5_000, EARLIEST)
    assert (got - t).tolist() == [1_000, 5_000, 5_000, 4_000, 5_000]


def test_a_replay_later_by_the_wall_clock_gives_the_same_bounds() -> None:
    t = 1_767_225_600_000
    records = [SimpleNamespace(timestamp=s) for s in (t, t + 2_000)]
    first = record_clock(records, t + 3_000, EARLIEST)
    assert (record_clock(records, t + 3_600_000, EARLIEST) == first).all()


def test_the_archiver_keeps_out_a_reading_stamped_too_far_ahead_of_its_record(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"archive.uri": str(tmp_path / "archive")})
    t = 1_767_225_600_000
    values = {f: 1.0 for f in PUMP_FEATURES}

    def record(offset: int, ts: int, written: int) -> SimpleNamespace:
        return SimpleNamespace(topic="r", partition=0, offset=offset, key=b"p1", timestamp=written,
                               value=encode_wide("p1", ts, values))

    polled = {TopicPartition("r", 0): [record(0, t, t + 50), record(1, t + 3_600_000, t + 1_000),
                                       record(2, t + 2_000, t + 2_050)]}
    archiver = Archiver(settings)
    archiver.add(polled)
    assert archiver.stats.rejects == {"future": 1}
    pending = archiver.pending[TopicPartition("r", 0)]
    assert pending.readings == 2 and pending.records == 3
    assert sorted(np.unique(np.concatenate([c.offset for _, c in pending.chunks])).tolist()) == [0, 2]
