"""The evaluator on ordinary data that used to break it: no detection, constant columns, a repeated
hour, a 5-minute series, a univariate series, a file without anomalies, row and Numenta labels,
training files paired by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cli.evaluate_cmd import LoadOptions, format_report, json_safe, load_files, read_label_ranges
from pipeline.evaluation import (
    EQUAL_FAR_BASELINES,
    EvaluationError,
    Series,
    baseline_scores,
    data_period_s,
    in_row_order,
    labelled_file,
    mean_std,
    score_predictions,
    series_from_frame,
)
from pipeline.fit import FitError, fit_bundle
from pipeline.tables import frame_to_batch
from tests.unit.conftest import tiny_settings

HOUR = 3_600_000


def _series(values: np.ndarray, name: str = "f", step_ms: int = 1000) -> Series:
    values = values.reshape(len(values), -1).astype(np.float64)
    return Series(name, np.arange(len(values), dtype=np.int64) * step_ms, values)


def test_a_detector_that_finds_nothing_reports_and_serialises() -> None:
    # used to raise KeyError: 'mean_s' (the mean delay was None, dropped from the seed summary)
    labels = np.zeros(60, np.int8)
    labels[30:40] = 1
    f = labelled_file(_series(np.zeros(60)), labels, None, 20)
    nothing = score_predictions([f], {"f": np.zeros(60, np.int8)})
    assert nothing["pooled"]["delay"] == {"events": 1, "found": 0, "mean_s": None, "median_s": None, "max_s": None}
    mean, std = mean_std([{"lstm": nothing["pooled"], **{f"{b}_equal_far": nothing["pooled"] for b in EQUAL_FAR_BASELINES}}])
    report = {"protocol": {"plan": "per_file", "files": ["f"], "seeds": [0]}, "summary": {"mean": mean, "std": std},
              "baselines": {"t2_q": {**nothing, "not_fitted": {}}}, "runs": [{"lstm": nothing}]}
    text = format_report(report, per_file=True)
    assert "lstm" in text and "t2_q @ lstm FAR" in text
    json.dumps(json_safe(report))


def test_a_file_without_anomalies_scores_without_nab_or_events() -> None:
    f = labelled_file(_series(np.zeros(60)), np.zeros(60), None, 20)
    pred = np.zeros(60, np.int8)
    pred[45:50] = 1
    res = score_predictions([f], {"f": pred})
    assert res["pooled"]["nab"] is None and res["pooled"]["nab_numenta"] is None
    ev = res["files"]["f"]["event"]["whole"]
    assert (ev["tp"], ev["fp"], ev["fn"]) == (0, 1, 0)
    assert res["files"]["f"]["coverage"]["normal_share"] == pytest.approx(5 / 60)
    assert res["files"]["f"]["alerts"] == [[45_000, 49_000]]
    mean, std = mean_std([{"lstm": res["pooled"], **{f"{b}_equal_far": res["pooled"] for b in EQUAL_FAR_BASELINES}}])
    report = {"protocol": {"plan": "per_file", "files": ["f"], "seeds": [0]}, "summary": {"mean": mean, "std": std},
              "baselines": {"t2_q": {**res, "not_fitted": {}}}, "runs": [{"lstm": res}]}
    line = format_report(report, per_file=True).splitlines()[-1].split()
    assert line[:5] == ["f", "60", "-", "8.33", "-"]  # no F1 or MAR without an anomaly: "-", not 0


def test_baselines_fit_on_files_with_constant_training_columns() -> None:
    # 14 of 82 telemetry channels are constant over their training file: used to raise
    # "every training column is constant" and lose the LSTM's result with it
    rng = np.random.default_rng(0)
    flat = labelled_file(_series(np.r_[np.ones(100), np.full(20, 3.0)], "flat"), np.r_[np.zeros(100), np.ones(20)],
                         None, 50)
    mixed_values = np.column_stack([np.ones(120), rng.normal(size=120)])
    mixed = labelled_file(_series(mixed_values, "mixed"), np.zeros(120), None, 50)
    for name in ("t2", "t2_q"):
        scores, preds, failed = baseline_scores([flat, mixed], "per_file", None, name)
        assert failed == {}
        assert preds["flat"].sum() == 0 and np.all(scores["flat"] == 0)
        assert len(preds["mixed"]) == 120


def test_a_repeated_hour_is_shifted_forward_with_a_note() -> None:
    # local time at a clock change: 01:00-01:59 twice; used to be refused ("timestamps are not in order")
    first = np.arange(0, HOUR, 600_000)
    ts = np.r_[first, first, HOUR + np.arange(0, HOUR, 600_000)]
    frame = pd.DataFrame({"ts": ts, "x": np.arange(len(ts), dtype=float)})
    s = series_from_frame(frame, "dst.csv", ["x"], "ts")
    assert np.all(np.diff(s.ts_ms) > 0)
    assert s.ts_ms[6] == first[-1] + 600_000 and s.ts_ms[-1] - s.ts_ms[6] == ts[-1] - ts[6]
    assert s.values[:, 0].tolist() == list(range(len(ts)))  # recorded order kept
    assert len(s.notes) == 1 and "go back 1 time" in s.notes[0]


def test_repeated_stamps_are_kept_with_a_note() -> None:
    ts, notes = in_row_order(np.array([0, 1000, 1000, 2000]))
    assert ts.tolist() == [0, 1000, 1000, 2000] and "1 row(s) repeat" in notes[0]
    assert in_row_order(np.array([0, 1000]))[1] == []


def test_the_data_period_is_the_median_positive_spacing() -> None:
    five_min = np.r_[np.arange(0, 300_000 * 50, 300_000), [300_000 * 49], 300_000 * 60 + np.arange(3) * 300_000]
    s = Series("m", five_min, np.zeros((len(five_min), 1)))
    assert data_period_s([s]) == 300.0
    assert data_period_s([Series("one", np.array([5]), np.zeros((1, 1)))]) is None


def test_a_five_minute_series_on_a_one_second_grid_names_the_setting() -> None:
    frame = pd.DataFrame({"ts": np.arange(200) * 300_000, "a": np.sin(np.arange(200) / 5),
                          "b": np.cos(np.arange(200) / 5), "c": np.arange(200) % 7})
    with pytest.raises(FitError, match="set grid.period_s"):
        fit_bundle(frame_to_batch(frame, ["a", "b", "c"], ts_col="ts"), tiny_settings())


def test_row_index_labels_and_numenta_windows_label_files(tmp_path: Path) -> None:
    frame = pd.DataFrame({"timestamp": pd.date_range("2014-02-19 10:00", periods=30, freq="5min").astype(str),
                          "value": np.arange(30.0)})
    (tmp_path / "data" / "realKnownCause").mkdir(parents=True)
    frame.to_csv(tmp_path / "data" / "realKnownCause" / "a.csv", index=False)
    frame.to_csv(tmp_path / "data" / "b.csv", index=False)
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"realKnownCause/a.csv": [["2014-02-19 10:50:00.000000", "2014-02-19 11:00:00"]]}))
    rows = tmp_path / "rows.csv"
    rows.write_text("file,start_row,end_row\nb.csv,3,4\nrealKnownCause/a.csv,0,0\n")
    paths = [tmp_path / "data" / "realKnownCause" / "a.csv", tmp_path / "data" / "b.csv"]
    opts = LoadOptions("timestamp", None, "anomaly", "changepoint", 10)
    files, skipped = load_files(paths, tmp_path / "data", ["value"], opts, read_label_ranges(str(windows)))
    assert skipped == [] and files[0].series.values.shape == (30, 1)  # univariate
    assert np.flatnonzero(files[0].labels).tolist() == [10, 11, 12] and files[1].labels.sum() == 0
    files, _ = load_files(paths, tmp_path / "data", ["value"], opts, read_label_ranges(str(rows)))
    assert np.flatnonzero(files[0].labels).tolist() == [0] and np.flatnonzero(files[1].labels).tolist() == [3, 4]


def test_cli_pairs_training_files_by_name_on_a_univariate_five_minute_series(tmp_path: Path) -> None:
    from cli.main import main

    rng = np.random.default_rng(4)
    for split, n in (("train", 400), ("test", 300)):
        (tmp_path / split).mkdir()
        for k, name in enumerate(("m-1.csv", "m-2.csv")):
            t = np.arange(n)
            ts = pd.Timestamp("2020-01-01", tz="UTC") + pd.to_timedelta((t + (n if split == "test" else 0)) * 5, "min")
            value = np.sin(2 * np.pi * t / 24 + k) + 0.05 * rng.normal(size=n)
            frame = pd.DataFrame({"ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": value})
            if split == "test" and k == 0:
                frame.loc[200:220, "value"] += 6.0
            frame.to_csv(tmp_path / split / name, index=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,start_row,end_row\nm-1.csv,200,220\n")  # m-2.csv: no anomaly
    out = tmp_path / "out.json"
    overrides = {"model.units": "8,4", "model.timesteps": "8", "model.chunks_per_run": "2", "model.streams": "4",
                 "model.epochs": "1", "model.patience": "1"}
    argv = ["evaluate", str(tmp_path / "test"), "--train-dir", str(tmp_path / "train"), "--features", "value",
            "--labels", str(labels), "--out", str(out), "--per-file"]
    argv += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["protocol"]["plan"] == "paired" and report["protocol"]["grid_period_s"] == 300.0
    assert report["conventions"]["nab_window_s"] == 30 * 300.0  # 30 rows, as SKAB's 30 s at 1 s
    assert report["protocol"]["train_files"] == {"m-1.csv": "m-1.csv (train)", "m-2.csv": "m-2.csv (train)"}
    assert report["protocol"]["train_rows"] == [0, 0]
    lstm = report["runs"][0]["lstm"]
    assert set(lstm["files"]) == {"m-1.csv", "m-2.csv"}
    assert all("alert_spans" in r and "coverage" in r for r in lstm["files"].values())
    assert "nab_numenta" in lstm["pooled"] and "t2_q_equal_far" in report["runs"][0]


@pytest.mark.parametrize(("column", "cell", "needle"), [
    ("value", "ERR", "column 'value', row 7: 'ERR' is not a number"),
    ("value", "50,828", "column 'value', row 7: '50,828' is not a number"),
    ("anomaly", "Attack", "column 'anomaly', row 7: 'Attack' is not a number"),
])
def test_a_cell_that_is_not_a_number_is_a_clear_error_naming_file_column_and_row(
        tmp_path: Path, column: str, cell: str, needle: str) -> None:
    frame = pd.DataFrame({"timestamp": pd.date_range("2014-02-19 10:00", periods=30, freq="5min").astype(str),
                          "value": np.arange(30.0).astype(object), "anomaly": np.zeros(30, object)})
    frame.loc[7, column] = cell
    frame.to_csv(tmp_path / "a.csv", index=False)
    opts = LoadOptions("timestamp", None, "anomaly", "changepoint", 10)
    with pytest.raises(EvaluationError, match=f"a.csv: {needle}"):
        load_files([tmp_path / "a.csv"], tmp_path, ["value"], opts)


def test_labels_other_than_0_and_1_name_the_file_and_the_row(tmp_path: Path) -> None:
    frame = pd.DataFrame({"timestamp": pd.date_range("2014-02-19 10:00", periods=30, freq="5min").astype(str),
                          "value": np.arange(30.0), "anomaly": np.zeros(30)})
    frame.loc[20, "anomaly"] = 3  # a fault number where a flag was expected
    frame.to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(EvaluationError, match=r"a.csv: labels must be 0 or 1 \(row 20 holds 3\)"):
        load_files([tmp_path / "a.csv"], tmp_path, ["value"], LoadOptions("timestamp", None, "anomaly", "cp", 10))


def test_all_features_names_the_columns_it_leaves_out_for_holding_text(tmp_path: Path) -> None:
    import argparse

    from structlog.testing import capture_logs

    from cli.tables_args import features_for
    from pipeline.settings import load_settings

    frame = pd.DataFrame({"ts": [1, 2, 3], "value": ["1.0", "ERR", "2.0"], "other": [1.0, 2.0, 3.0]})
    args = argparse.Namespace(features="all", time_col="ts", asset_col=None, label_col="anomaly", ignore_cols="")
    with capture_logs() as logs:
        assert features_for(args, frame, load_settings(env={})) == ("other",)
    assert [e["columns"] for e in logs if e["log_level"] == "warning"] == [["value"]]


def test_a_labelled_range_that_covers_no_row_is_pointed_out(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    frame = pd.DataFrame({"timestamp": np.arange(30) * 300 + 1_392_800_400, "value": np.arange(30.0)})  # epoch s
    frame.to_csv(tmp_path / "a.csv", index=False)
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"a.csv": [["2014-02-19 09:01:00", "2014-02-19 09:04:00"]]}))  # between rows
    with capture_logs() as logs:
        files, _ = load_files([tmp_path / "a.csv"], tmp_path, ["value"],
                              LoadOptions("timestamp", None, "anomaly", "cp", 10), read_label_ranges(str(windows)))
    assert files[0].labels.sum() == 0
    assert [e["file"] for e in logs if e["log_level"] == "warning"] == ["a.csv"]


def test_a_feature_without_any_value_in_training_is_named_when_no_step_can_form() -> None:
    n = 600
    ts = np.arange(n, dtype=np.int64) * 1000 + 1_700_000_000_000
    values = np.column_stack([np.sin(np.arange(n) / 5), np.cos(np.arange(n) / 5), np.full(n, np.nan)])
    series = Series("dead", ts, values)
    from pipeline.evaluation import series_batch

    with pytest.raises(FitError, match=r"no value at all of \['c'\]"):
        fit_bundle(series_batch(series, ("a", "b", "c")), tiny_settings())


def test_files_without_a_time_column_are_read_one_row_a_second(tmp_path: Path) -> None:
    """Telemetry exported from arrays has no time column: --time-col @row numbers the rows."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        pd.DataFrame({"value": np.sin(np.arange(120) / 5), "cmd": np.zeros(120)}).to_csv(
            tmp_path / split / "A-1.csv", index=False)
    rows = tmp_path / "labels.csv"
    rows.write_text("file,start_row,end_row\nA-1.csv,50,59\n")
    opts = LoadOptions("@row", None, "anomaly", "changepoint", 0)
    files, _ = load_files([tmp_path / "test" / "A-1.csv"], tmp_path / "test", ["value", "cmd"], opts,
                          read_label_ranges(str(rows)), tmp_path / "train")
    f = files[0]
    assert np.diff(f.series.ts_ms).tolist() == [1000] * 119 and f.train is not None and len(f.train) == 120
    assert np.flatnonzero(f.labels).tolist() == list(range(50, 60))
    with pytest.raises(EvaluationError, match="--time-col @row"):
        load_files([tmp_path / "test" / "A-1.csv"], tmp_path / "test", ["value"],
                   LoadOptions("ts", None, "anomaly", "changepoint", 0), read_label_ranges(str(rows)))


def test_the_share_of_scored_rows_counts_the_test_rows_whose_step_has_a_score() -> None:
    from pipeline.evaluation import EngineTrace, scored_share

    f = labelled_file(_series(np.zeros(100)), np.zeros(100), None, 20)  # 80 test rows, one a second
    steps = np.arange(100, dtype=np.int64) * 1000
    score = np.where(np.arange(100) < 60, 0.5, np.nan)  # a sensor went silent at row 60
    trace = EngineTrace(steps, score, score, np.ones(100), [])
    assert scored_share(f, trace, 1000) == pytest.approx(40 / 80)


START_S = 1392156000  # 2014-02-11T22:00:00Z: 30 rows 5 min apart cross midnight
ROWS = pd.date_range("2014-02-11 22:00", periods=30, freq="300s")


@pytest.mark.parametrize(("stamps", "how"), [
    (np.arange(30) * 300 + START_S, "epoch seconds"),
    ((np.arange(30) * 300 + START_S) * 1000, None),
    ((np.arange(30) * 300 + START_S) * 1_000_000, "epoch microseconds"),
    (ROWS.strftime("%d/%m/%Y %H:%M"), "dates read day first"),
    (ROWS.strftime("%m/%d/%Y %H:%M"), "dates read month first"),
    (ROWS.strftime("%Y-%m-%d %H:%M:%S"), None),
])
def test_timestamps_in_seconds_or_day_first_are_read_as_such_and_said(tmp_path: Path, stamps: Any,
                                                                      how: str | None) -> None:
    """Epoch seconds read as milliseconds fell in January 1970 at a thousandth of their spacing, and
    "11/02/2014" read month first jumped a month at midnight: the labels then missed their rows."""
    frame = pd.DataFrame({"timestamp": stamps, "value": np.arange(30.0)})
    frame.to_csv(tmp_path / "a.csv", index=False)
    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"a.csv": [["2014-02-11 23:50:00", "2014-02-12 00:00:00"]]}))
    files, _ = load_files([tmp_path / "a.csv"], tmp_path, ["value"],
                          LoadOptions("timestamp", None, "anomaly", "cp", 10), read_label_ranges(str(windows)))
    series = files[0].series
    assert np.diff(series.ts_ms).tolist() == [300_000] * 29
    assert np.flatnonzero(files[0].labels).tolist() == [22, 23, 24]
    notes = " ".join(series.notes)
    assert (how in notes) if how else not notes


def test_a_unit_named_by_the_column_or_given_beats_the_magnitude_and_labels_read_their_dates_alike(
        tmp_path: Path) -> None:
    """Milliseconds since a start (1.2e9 is two weeks) are not epoch seconds when the column's name or
    --time-unit says ms; a label's start and end share one date format (day first here)."""
    from pipeline.labels import parse_label_ranges
    from pipeline.tables import parse_timestamps

    relative = pd.Series(1_200_000_000 + 60_000 * np.arange(5), name="time_ms")
    ms, note = parse_timestamps(relative)
    assert ms.tolist() == relative.tolist() and note is None
    assert parse_timestamps(relative.rename("t"), "ms")[0].tolist() == relative.tolist()
    assert "epoch seconds" in (parse_timestamps(relative.rename("t"))[1] or "")
    ranges = parse_label_ranges(b"file,start,end\na.csv,05/02/2020 10:00,13/02/2020 10:00\n", "l.csv")
    assert [(r.start, r.end) for r in ranges] == [(1_580_896_800_000, 1_581_588_000_000)]  # 5 and 13 February
    one_row = parse_timestamps(pd.Series(["05/02/2020 10:00"]))
    assert "ambiguous" in (one_row[1] or "")


def test_one_reading_of_a_file_s_times_serves_its_chunks_and_its_labels(tmp_path: Path) -> None:
    """A chunk of a day-first file within one day cannot tell day from month, nor can a label file of
    one range: both are read the way the whole file is (before, chunks of one file came out as 3 May,
    then 5 March, then 3 June, and the labels missed every row). Numeric labels take the unit the
    data's column names (``time_s``)."""
    import argparse

    from cli.evaluate_cmd import data_time_reading
    from pipeline.labels import parse_label_ranges
    from pipeline.tables import time_reading_of, timestamps_ms

    stamps = pd.date_range("2020-03-05 22:00:00", periods=15_000, freq="s")
    column = pd.Series(stamps.strftime("%d/%m/%Y %H:%M:%S"), name="datetime")
    reading = time_reading_of(column)
    assert reading.date_format == "%d/%m/%Y %H:%M:%S" and "day first" in (reading.note or "")
    whole = stamps.as_unit("ms").asi8
    for a in range(0, len(column), 5000):
        chunk = column.iloc[a:a + 5000]
        assert timestamps_ms(chunk, reading.unit, reading.date_format).tolist() == whole[a:a + 5000].tolist()
    assert timestamps_ms(column.iloc[:5000]).tolist() != whole[:5000].tolist()  # alone, within a day: month first

    pd.DataFrame({"datetime": column, "x": 1.0}).to_csv(tmp_path / "a.csv", index=False)
    args = argparse.Namespace(sep=None, time_col="datetime", time_unit="auto")
    unit, date_format, _ = data_time_reading(tmp_path / "a.csv", args)
    label = b"file,start,end\na.csv,05/03/2020 22:10:00,05/03/2020 22:20:00\n"
    (r,) = parse_label_ranges(label, "l.csv", unit, date_format)
    assert (r.start, r.end) == (whole[600], whole[1200])
    assert parse_label_ranges(label, "l.csv")[0].start != whole[600]  # alone: 3 May

    named = time_reading_of(pd.Series([0, 60, 120], name="time_s"))
    (r,) = parse_label_ranges(b"file,start,end\na.csv,60,120\n", "l.csv", named.unit, named.date_format)
    assert (r.start, r.end) == (60_000, 120_000)
    assert parse_label_ranges(b"file,start,end\na.csv,60,120\n", "l.csv")[0].start == 60  # by magnitude: ms
    iso = parse_label_ranges(b"file,start,end\na.csv,2020-03-05T22:10:00,2020-03-05T22:20:00\n", "l.csv",
                             unit, date_format)  # labels in another format than the data: read on their own
    assert (iso[0].start, iso[0].end) == (whole[600], whole[1200])
