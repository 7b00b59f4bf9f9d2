"""The hot path's row-wise helpers give NumPy's own results, NaN handling included."""

import numpy as np
import pytest

from pipeline.rowwise import row_all, row_fmax, row_max, take_rows


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (7, 3), (1000, 8), (4, 5, 8)])
def test_row_reductions_equal_numpys(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    a = rng.normal(size=shape)
    a[rng.random(shape) < 0.2] = np.nan
    if a.size:
        a[0, ...] = np.nan  # a row (or block) that is NaN throughout
    np.testing.assert_array_equal(row_max(a), a.max(axis=-1))
    np.testing.assert_array_equal(row_fmax(a), np.fmax.reduce(a, axis=-1))
    flags = rng.random(shape) < 0.8
    assert row_all(flags).dtype == bool
    np.testing.assert_array_equal(row_all(flags), flags.all(axis=-1))
    np.testing.assert_array_equal(row_all(np.isfinite(a)), np.isfinite(a).all(axis=-1))


def test_row_max_leaves_its_input_alone() -> None:
    a = np.array([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]])
    before = a.copy()
    np.testing.assert_array_equal(row_max(a), [3.0, 6.0])
    np.testing.assert_array_equal(a, before)


def test_take_rows_gathers_like_indexing_and_fills_out() -> None:
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = np.array([9, 0, 3, 3])
    np.testing.assert_array_equal(take_rows(a, rows), a[rows])
    out = np.empty((4, 4), np.float32)
    assert take_rows(a, rows, out=out) is out
    np.testing.assert_array_equal(out, a[rows])
