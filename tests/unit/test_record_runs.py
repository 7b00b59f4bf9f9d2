"""Asset codes computed per record are pandas' factorisation of every row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.record_runs import distinct_count, factorize_by_record, record_starts


def _rows(record_asset: list[int], sizes: list[int], order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of records taken in ``order`` (records may repeat, apart), each record ``sizes`` rows long."""
    rec = np.repeat(np.asarray(order, np.int64), [sizes[r] for r in order])
    asset = np.array([f"pump-{record_asset[r]}" for r in rec.tolist()], dtype=object)
    return asset, rec


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n_records=st.integers(1, 40))
def test_codes_names_and_first_rows_are_pandas_factorisation(data: st.DataObject, n_records: int) -> None:
    record_asset = data.draw(st.lists(st.integers(0, 6), min_size=n_records, max_size=n_records))
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=n_records, max_size=n_records))
    order = data.draw(st.lists(st.integers(0, n_records - 1), min_size=0, max_size=60))
    asset, rec = _rows(record_asset, sizes, order)
    codes, names, first = factorize_by_record(asset, rec)
    want_codes, want_names = pd.factorize(asset)
    assert codes.tolist() == want_codes.tolist()
    assert names.tolist() == want_names.tolist()
    assert first.tolist() == [int(np.flatnonzero(asset == n)[0]) for n in names.tolist()]
    assert distinct_count(rec) == len(np.unique(rec))


def test_record_starts_marks_each_run() -> None:
    assert record_starts(np.array([3, 3, 1, 1, 1, 3, 0])).tolist() == [0, 2, 5, 6]
    assert record_starts(np.array([], np.int64)).tolist() == []


@pytest.mark.parametrize("idx", [[5, 5, 7, 9, 7], [10**12, 3, 10**12], [0]])
def test_distinct_count_over_short_and_long_ranges(idx: list[int]) -> None:
    a = np.asarray(idx, np.int64)
    assert distinct_count(a) == len(set(idx))
    where = np.arange(len(a)) % 2 == 0
    assert distinct_count(a, where) == len(set(a[where].tolist()))
    assert distinct_count(a, np.zeros(len(a), bool)) == 0


def test_empty_rows() -> None:
    codes, names, first = factorize_by_record(np.empty(0, dtype=object), np.empty(0, np.int64))
    assert len(codes) == len(names) == len(first) == 0
