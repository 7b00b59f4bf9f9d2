"""Row-wise operations on the fleet's (rows, features) arrays, for the hot path.

NumPy is slow exactly where a poll's arrays are shaped: thousands of rows of a few features. A
reduction over the short last axis pays its loop's overhead once a row (``max(axis=-1)`` over
1,000 × 8 floats: 30-43 µs), and ``np.take`` in its default mode checks bounds and buffers its
output. The same results, column by column (where the rows are many, see :data:`TALL`) or
unchecked, cost a fifth to a half. An elementwise operation against a per-feature row runs as
one loop a row too, and against that row repeated down the rows (:func:`repeated`) as one loop.
"""

from __future__ import annotations

import threading

import numpy as np


def take_rows(a: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a[rows]`` for row indices known to lie in ``a`` (rows of the fleet's own arrays).

    ``np.take`` with ``mode="clip"`` skips the bounds check and the buffered copy into ``out``
    that the default ``mode="raise"`` makes: half the time of either for 1,000 rows of 32-64
    floats, a fifth of fancy indexing's for 8. A row outside ``a`` would be clipped to its
    edge, not refused: never pass -1 for "none" here."""
    return np.take(a, rows, axis=0, out=out, mode="clip")


# Column by column pays one call a feature, NumPy's reduction one loop a row: the columns win
# once there are this many rows a feature (measured: the largest of each row of 128 × 8 floats
# 3.1 against 4.5 µs, of 1 × 8 4.7 against 0.6; of 256 × 38, 15 against 11).
TALL = {np.maximum: 16, np.fmax: 16, np.logical_and: 32}


def _by_column(op: np.ufunc, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    f = a.shape[-1]
    if a.size < TALL[op] * f * f:  # a short array (a poll of a few assets, a replay's step): one call
        return op.reduce(a, axis=-1)
    out = a[..., 0].copy()
    for j in range(1, a.shape[-1]):
        op(out, a[..., j], out=out)
    return out


def row_max(a: np.ndarray) -> np.ndarray:
    """``a.max(axis=-1)``, NaN where a row holds one."""
    return _by_column(np.maximum, a)


def row_fmax(a: np.ndarray) -> np.ndarray:
    """``np.fmax.reduce(a, axis=-1)``: the largest value of each row ignoring NaN, NaN only
    where the whole row is."""
    return _by_column(np.fmax, a)


def row_all(a: np.ndarray) -> np.ndarray:
    """``a.all(axis=-1)`` as booleans."""
    return _by_column(np.logical_and, np.asarray(a, bool))


TILE_BYTES = 1 << 19  # one repeated row's tile at most (8,192 rows of 8 float64 features)
_TILE_OWNERS = 32  # repeated rows kept (a bundle's vectors, a few bundles')
_TILES: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_TILES_LOCK = threading.Lock()  # a swap warms the next model on another thread


def repeated(row: np.ndarray, n: int) -> np.ndarray:
    """``row`` (F,) repeated down ``n`` rows, (n, F), as ``np.broadcast_to`` gives it, but
    contiguous and read-only; a table of rows (R, F) gives (R, n, F).

    NumPy runs an (n, F) array against a broadcast (F,) row as n loops of F elements, against a
    contiguous (n, F) one as one loop: dividing 1,000 × 8 floats by a feature's scale took
    7.6 µs, 4.2 against the repeated rows. The rows are slices of one tile kept per ``row``
    object (a bundle's vectors, which never change once built; the tile holds its row, so the
    identity is never reused); past :data:`TILE_BYTES` of tile, the broadcast view."""
    kept = _TILES.get(id(row))
    if kept is not None and kept[1].shape[-2] >= n:
        return kept[1][..., :n, :]
    grown = np.expand_dims(row, -2)
    if n * row.nbytes > TILE_BYTES:
        return np.broadcast_to(grown, (*row.shape[:-1], n, row.shape[-1]))
    tile = np.repeat(grown, max(64, 1 << (n - 1).bit_length()), axis=-2)
    tile.flags.writeable = False
    with _TILES_LOCK:
        if len(_TILES) >= _TILE_OWNERS:
            _TILES.pop(next(iter(_TILES)))
        _TILES[id(row)] = (row, tile)
    return tile[..., :n, :]
