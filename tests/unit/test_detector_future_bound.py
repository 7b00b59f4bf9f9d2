"""How far ahead a reading may be stamped is judged against its Kafka record, so a replay judges alike."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from consumers.detector import _stamped_now


def test_each_reading_is_bounded_by_its_record_timestamp_or_the_wall_clock_where_that_is_earlier() -> None:
    records = [SimpleNamespace(timestamp=t) for t in (1_000, -1, 9_000, 4_000)]
    # The second record has no timestamp (an old message format); the third was stamped by a
    # producer whose clock runs ahead of this member's.
    got = _stamped_now(records, np.array([0, 1, 2, 3]), wall_ms=5_000)
    assert got.tolist() == [1_000, 5_000, 5_000, 4_000]
    assert _stamped_now(records, np.array([3, 0]), wall_ms=5_000).tolist() == [4_000, 1_000]


def test_a_replay_later_by_the_wall_clock_gives_the_same_bounds() -> None:
    records = [SimpleNamespace(timestamp=t) for t in (1_000, 2_000)]
    first = _stamped_now(records, np.array([0, 1]), wall_ms=3_000)
    assert (_stamped_now(records, np.array([0, 1]), wall_ms=3_000 + 3_600_000) == first).all()
