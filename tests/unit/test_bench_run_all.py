"""The benchmark runner's results: medians over rounds, mapped to the published metric names."""

from __future__ import annotations

from bench.run_all import _last_json, medians, table

BENCHES = {"b": (["-m", "x"], {"fig_a": "metric_a", "fig_b": "metric_b"})}


def test_each_metric_is_the_median_over_rounds_and_missing_figures_are_left_out() -> None:
    runs = {"b": [{"fig_a": 3.0, "other": 1}, {"fig_a": 1.0}, {"fig_a": 2.5, "fig_b": "n/a"}]}
    assert medians(runs, BENCHES) == {"metric_a": 2.5}


def test_the_last_json_object_is_taken_after_log_lines() -> None:
    assert _last_json('{"log": 1}\nsome line\n{"fig_a": 2}') == {"fig_a": 2}


def test_the_table_lists_every_metric_with_its_target() -> None:
    text = table({"score_us_per_reading_1000": 4.2}, 3)
    assert "| `score_us_per_reading_1000` | 4.2 | <= 5 |" in text
