"""The unseen-asset count of the quality benchmark: alerts at a labelled anomaly's onset are counted apart."""

from __future__ import annotations

import numpy as np

from bench.quality import baseline_new_asset_alerts
from pipeline.evaluation import Series


def _asset(name: str, spikes: list[int], rows: int = 60, cold: int = 40) -> Series:
    rng = np.random.default_rng(0)
    values = np.zeros((rows, 2))
    values[:cold] = rng.normal(size=(cold, 2))
    for row in spikes:
        values[row:row + 4] = 50.0  # four rows: the baselines take a trailing median of five
    return Series(name, np.arange(rows, dtype=np.int64) * 1000, values)


def test_a_baseline_alert_in_the_last_rows_before_a_label_is_an_onset_alert_not_a_false_one() -> None:
    newcomers = [_asset("a", [44, 55]), _asset("b", [55])]
    out = baseline_new_asset_alerts(newcomers, 40, {"a": 5, "b": None})
    for name in ("t2", "t2_q"):
        # a: the run at rows 44-47 is a false alert, the one at 55-58 opens in its last 5 rows;
        # b has no labelled anomaly, so its run is a false alert.
        assert out[name]["false_alerts"] == 2 and out[name]["onset_alerts"] == 1
        assert out[name]["per_asset"] == {"a": 1, "b": 1}
