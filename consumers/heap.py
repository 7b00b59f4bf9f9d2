"""The cyclic garbage collector in a long-running consumer's poll loop.

A poll allocates and frees tens of thousands of small containers (records, readings, open grid
steps, alert events) that reference counting frees; only the *net* count of allocations over
frees triggers a young-generation collection. At CPython's threshold (700) a burst inside one poll
crosses it over and over: a detector poll of 5,000 wide readings over 1,000 assets ran 22 young
and 2 middle collections, 6.4 % of the poll (2.7 of 42.7 ms, `bench/poll_cost.py` with the
collector's callbacks timed). At 50,000 none ran in 40 such polls; a reference cycle that
becomes garbage still goes at the next collection, after at most that many net allocations.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Keep what is alive now (TensorFlow, the model, the fleet's state) out of the collector's
    full collections, and collect the young generation only after ``YOUNG_THRESHOLD`` net
    allocations. Walking the whole heap took 130-290 ms with TensorFlow loaded, a stall of the
    poll loop every 10-20 s that set the p99 latency; 6-8 ms once frozen. Frozen objects are still
    freed by reference counting when dropped. Call it again once a restore added long-lived state."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD)
