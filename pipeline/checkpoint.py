"""Exact recovery bookkeeping of one detector: which polled records to process, which of their
outputs were already published, and what a checkpoint writes and commits.

Pure (no Kafka client): the detector does the I/O and asks this module what to do, so unit
tests drive the whole poll → produce → checkpoint → commit sequence without a broker.

How a detector recovers exactly (after ``kill -9``, a lost membership or a rebalance):

* **Checkpoint.** Every ``interval_ms`` (and on a graceful stop) the detector writes the
  snapshot of every asset whose state changed since the last checkpoint to the state topic,
  tagged with the partition position the snapshot reflects, waits for the acknowledgements,
  and only then commits that position. The committed offset ``C`` is where a successor
  starts reading.
* **Progress.** After a poll whose outputs (alert events, dead letters, scores) were
  acknowledged, a small progress record says "outputs of records below ``E`` are published".
* **Restore.** A new owner restores each asset's snapshot with the highest position ``P_a``,
  reads from ``C``, drops every record of asset ``a`` below ``P_a`` (already in its state),
  processes records below ``E`` silently (their outputs exist) and everything after as usual.
  Processing is deterministic (event-time grid, fixed weights), so the published alerts —
  ids, events, scores — are those of an uninterrupted run, at the cost of replaying at most
  one checkpoint interval of readings.

Only the window between an output's acknowledgement and its progress record (milliseconds)
can repeat an output after a crash; a repeated alert event carries the same id and content.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Cursor:
    """Where one owned partition stands."""

    checkpoint: int  # committed offset: every asset's state at or after it is in the state topic
    emitted: int     # outputs of records below this offset are acknowledged
    position: int    # next offset to process


@dataclass
class Restored:
    """What the state topic says about one partition when its ownership starts."""

    snapshots: dict[str, int] = field(default_factory=dict)  # asset → position its snapshot reflects
    emitted: int = -1  # highest published-outputs position recorded, -1 if none


@dataclass
class PollPlan:
    """How to treat the records of one poll (masks over the poll's records)."""

    process: np.ndarray  # bool: not yet in any asset's state
    silent: np.ndarray   # bool: processed, but their outputs were already published


class Checkpoints:
    """Per-partition cursors, the assets each partition holds, and the assets changed since the
    last checkpoint."""

    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self.cursors: dict[int, Cursor] = {}
        self.assets_of: dict[int, set[str]] = {}
        self.dirty: dict[int, set[str]] = {}
        self._applied: dict[int, dict[str, int]] = {}  # restored assets: records below this are in state
        self._applied_top: dict[int, int] = {}  # highest of a partition's _applied positions
        self._last_ms: float | None = None

    # ------------------------------------------------------------ ownership
    def assign(self, partition: int, committed: int, restored: Restored) -> None:
        """Start owning ``partition`` whose committed offset is ``committed`` (the first offset
        the consumer will deliver), with the snapshots restored for it."""
        top = max(restored.snapshots.values(), default=committed)
        emitted = max(committed, restored.emitted, top)
        self.cursors[partition] = Cursor(committed, emitted, committed)
        self.assets_of[partition] = set(restored.snapshots)
        self.dirty[partition] = set()
        self._applied[partition] = {a: p for a, p in restored.snapshots.items() if p > committed}
        self._applied_top[partition] = max(self._applied[partition].values(), default=-1)

    def revoke(self, partitions: Iterable[int]) -> list[str]:
        """Stop owning these partitions; returns their assets, whose state the caller forgets."""
        dropped: list[str] = []
        for p in partitions:
            self.cursors.pop(p, None)
            self.dirty.pop(p, None)
            self._applied.pop(p, None)
            self._applied_top.pop(p, None)
            dropped += sorted(self.assets_of.pop(p, set()))
        return dropped

    def revoke_all(self) -> list[str]:
        return self.revoke(list(self.cursors))

    @property
    def owned(self) -> list[int]:
        return sorted(self.cursors)

    def restarted(self, partitions: np.ndarray, offsets: np.ndarray) -> dict[int, int]:
        """Owned partitions whose poll begins below their position: {partition: first offset polled}.

        Only the detector's own seeks (at an assignment or a rewind, which start a new cursor)
        move a partition back, so records below its position mean the log began again under the
        client: a topic deleted and created again, a broker started on fresh storage, or a
        truncation, after which the client reads from the earliest record. Those records are
        new: see :meth:`restart`."""
        out: dict[int, int] = {}
        for p in np.unique(partitions).tolist():
            cur = self.cursors.get(p)
            first = int(offsets[partitions == p].min())
            if cur is not None and first < cur.position:
                out[p] = first
        return out

    def restart(self, partition: int, offset: int) -> None:
        """Read ``partition`` on from ``offset`` as a new log: its positions, the restored snapshots'
        included, belonged to the log before, so every asset it holds is snapshotted again at the
        next checkpoint with the new position. A checkpoint in flight does not commit it (a new
        cursor)."""
        self.cursors[partition] = Cursor(offset, offset, offset)
        self._applied.pop(partition, None)
        self._applied_top.pop(partition, None)
        self.dirty[partition] |= self.assets_of[partition]

    # ------------------------------------------------------------------ poll
    def plan(self, partitions: np.ndarray, offsets: np.ndarray, keys: np.ndarray) -> PollPlan:
        """Masks over a poll's records (their partition, offset and key = asset id)."""
        n = len(offsets)
        process = np.ones(n, bool)
        emitted = np.full(n, -1, np.int64)
        for p in np.unique(partitions).tolist():
            sel = partitions == p
            cur = self.cursors.get(p)
            if cur is None:  # not ours (any more): never process
                process[sel] = False
                continue
            emitted[sel] = cur.emitted
            applied = self._applied.get(p)
            if applied:
                idx = np.flatnonzero(sel)
                below = np.fromiter((applied.get(k, -1) for k in keys[idx]), np.int64, len(idx))
                process[idx[offsets[idx] < below]] = False
        return PollPlan(process, process & (offsets < emitted))

    def processed(self, partition: int, end: int, assets: Iterable[str]) -> None:
        """Records of ``partition`` below ``end`` are processed; ``assets`` changed state."""
        cur = self.cursors[partition]
        cur.position = max(cur.position, end)
        touched = set(assets)
        self.assets_of[partition] |= touched
        self.dirty[partition] |= touched
        applied = self._applied.get(partition)
        if applied and cur.position >= self._applied_top[partition]:
            applied.clear()  # past every restored snapshot: nothing more to drop

    def published(self, partitions: Iterable[int]) -> dict[int, int]:
        """Outputs of these partitions' processed records are acknowledged: the progress to record."""
        out = {}
        for p in partitions:
            cur = self.cursors.get(p)
            if cur is not None and cur.position > cur.emitted:
                cur.emitted = cur.position
                out[p] = cur.emitted
        return out

    # ----------------------------------------------------------- checkpoint
    def due(self, now_ms: float) -> bool:
        if self._last_ms is None:
            self._last_ms = now_ms
        return now_ms - self._last_ms >= self.interval_ms

    def pending(self) -> dict[int, tuple[int, list[str]]]:
        """Per partition with progress since its checkpoint: (position to commit, assets to snapshot)."""
        return {p: (c.position, sorted(self.dirty[p])) for p, c in self.cursors.items()
                if c.position > c.checkpoint or self.dirty[p]}

    def has_pending(self) -> bool:
        """Whether a checkpoint would write anything (without listing it: a large fleet's list costs)."""
        return any(c.position > c.checkpoint or self.dirty[p] for p, c in self.cursors.items())

    def begin(self) -> dict[int, tuple[int, list[str]]]:
        """Take the pending checkpoint: its assets stop being dirty now, so a change while its
        snapshots are on their way makes an asset dirty again for the next checkpoint. Should the
        checkpoint fail, the caller rewinds to the last committed one (and so forgets this)."""
        out = self.pending()
        for p in out:
            self.dirty[p].clear()
        return out

    def checkpointed(self, done: Mapping[int, int], now_ms: float) -> None:
        """The snapshots of ``done`` (partition → position) are acknowledged and the positions committed."""
        for p, position in done.items():
            cur = self.cursors.get(p)
            if cur is not None:
                cur.checkpoint = max(cur.checkpoint, position)
        self._last_ms = now_ms
