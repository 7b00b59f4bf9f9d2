"""The univariate protocol of the quality benchmark: which metric each machine keeps, and its labels."""

from __future__ import annotations

import numpy as np

from bench.quality import SMD_FEATURES, univariate_files
from pipeline.evaluation import LabelledFile, Series


def _machine(rows: int = 12) -> LabelledFile:
    rng = np.random.default_rng(0)
    ts = np.arange(rows, dtype=np.int64) * 60_000
    values = rng.normal(size=(rows, len(SMD_FEATURES)))
    train_values = rng.normal(size=(rows, len(SMD_FEATURES)))
    train_values[:, 3] = 0.5  # m03 never varies in training
    labels = np.zeros(rows, np.int8)
    labels[2:4] = labels[6:9] = 1
    return LabelledFile(Series("machine-9-9.parquet", ts, values), labels, None, 0,
                        Series("machine-9-9.parquet", ts - rows * 60_000, train_values))


def test_the_most_often_labelled_metric_that_varies_in_training_is_kept_with_only_its_segments() -> None:
    f = _machine()
    interpretation = {"machine-9-9": [
        {"start_row": 2, "end_row_exclusive": 4, "metrics": ["m03", "m01"]},
        {"start_row": 6, "end_row_exclusive": 9, "metrics": ["m03", "m05"]},
        {"start_row": 6, "end_row_exclusive": 7, "metrics": ["m05", "m03"]},
    ]}
    [u] = univariate_files([f], interpretation)
    # m03 is named three times but is constant in training; m05 (twice) beats m01 (once).
    assert u.name == "machine-9-9:m05"
    assert u.series.values.shape == (12, 1) and u.train is not None and u.train.values.shape == (12, 1)
    np.testing.assert_array_equal(u.series.values[:, 0], f.series.values[:, 5])
    np.testing.assert_array_equal(u.train.values[:, 0], f.train.values[:, 5])
    assert np.flatnonzero(u.labels).tolist() == [6, 7, 8]  # the first segment does not name it


def test_a_machine_whose_labelled_metrics_never_vary_in_training_is_left_out() -> None:
    f = _machine()
    interpretation = {"machine-9-9": [{"start_row": 2, "end_row_exclusive": 4, "metrics": ["m03"]}]}
    assert univariate_files([f], interpretation) == []
