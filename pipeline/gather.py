"""Gathering rows of the fleet's state arrays: the hot path's most frequent copy."""

from __future__ import annotations

import numpy as np


def take_rows(a: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a[rows]`` for row indices known to lie in ``a`` (rows of the fleet's own arrays).

    ``np.take`` with ``mode="clip"`` skips the bounds check and the buffered copy into ``out``
    that the default ``mode="raise"`` makes: half the time of either for 1,000 rows of 32-64
    floats, a fifth of fancy indexing's for 8. A row outside ``a`` would be clipped to its
    edge, not refused: never pass -1 for "none" here."""
    return np.take(a, rows, axis=0, out=out, mode="clip")
