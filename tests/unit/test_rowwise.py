"""The hot path's row-wise helpers give NumPy's own results, NaN handling included."""

import numpy as np
import pytest

from pipeline.rowwise import TILE_BYTES, repeated, row_all, row_fmax, row_max, take_rows


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (7, 3), (1000, 8), (4, 5, 8), (60, 5, 8), (300, 38)])
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


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 4096, 4097, 100_000])
def test_repeated_rows_equal_the_broadcast(n: int) -> None:
    row, table = np.arange(8.0), np.arange(16.0).reshape(2, 8)
    for source in (row, table):
        got = repeated(source, n)
        np.testing.assert_array_equal(got, np.broadcast_to(source[..., None, :], (*source.shape[:-1], n, 8)))
        assert not got.flags.writeable  # a caller writing into it would change every later poll's rows
        if 0 < n and n * source.nbytes <= TILE_BYTES:
            assert all(r.flags.c_contiguous for r in got.reshape(-1, n, 8))


def test_repeated_follows_its_row_not_a_row_at_the_same_address() -> None:
    a = np.full(3, 1.0)
    np.testing.assert_array_equal(repeated(a, 5), np.ones((5, 3)))
    b = np.full(3, 2.0)  # another array: never served a's tile, whatever its address
    np.testing.assert_array_equal(repeated(b, 200), np.full((200, 3), 2.0))
    np.testing.assert_array_equal(repeated(a, 200), np.ones((200, 3)))  # grown past the first tile


def test_repeated_keeps_a_bounded_number_of_tiles() -> None:
    from pipeline import rowwise

    rows = [np.full(4, float(i)) for i in range(3 * rowwise._TILE_OWNERS)]  # e.g. many refits' vectors
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(repeated(row, 10), np.full((10, 4), float(i)))
    assert len(rowwise._TILES) <= rowwise._TILE_OWNERS
