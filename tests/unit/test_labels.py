"""Label files: times, row indices and Numenta's windows JSON through one reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.labels import LabelError, LabelRange, parse_label_ranges, ranges_by_name, read_label_ranges, row_labels


def test_time_ranges_from_csv_with_file_or_asset_column() -> None:
    got = parse_label_ranges(b"file,start,end\nvalve1/0.csv,2020-03-09T10:14:33Z,2020-03-09T10:14:35Z\n", "l.csv")
    assert got == [LabelRange("valve1/0.csv", 1_583_748_873_000, 1_583_748_875_000, "ms")]
    got = parse_label_ranges(b"asset;start_ms;end_ms\npump;1000;5000\n", "l.csv")  # ';' sniffed
    assert got == [LabelRange("pump", 1000, 5000, "ms")]


def test_row_index_ranges() -> None:
    got = parse_label_ranges(b"file,start_row,end_row\nm1.parquet,10,12\nm1.parquet,40,40\n", "rows.csv")
    assert [(r.start, r.end, r.unit) for r in got] == [(10, 12, "row"), (40, 40, "row")]
    flags = row_labels(np.arange(50) * 60_000, got)
    assert np.flatnonzero(flags).tolist() == [10, 11, 12, 40]


def test_numenta_windows_json(tmp_path: Path) -> None:
    windows = {"realKnownCause/machine_temperature_system_failure.csv": [
        ["2013-12-10 06:25:00.000000", "2013-12-12 05:35:00.000000"]],
        "artificialNoAnomaly/flat.csv": []}
    path = tmp_path / "combined_windows.json"
    path.write_text(json.dumps(windows))
    got = ranges_by_name(read_label_ranges(str(path)))
    assert list(got) == ["realKnownCause/machine_temperature_system_failure.csv"]
    (r,) = got["realKnownCause/machine_temperature_system_failure.csv"]
    assert (r.start, r.end, r.unit) == (1_386_656_700_000, 1_386_826_500_000, "ms")


def test_json_records_and_parquet(tmp_path: Path) -> None:
    got = parse_label_ranges(json.dumps([{"file": "a", "start": 1000, "end": 2000}]).encode(), "l.json")
    assert got == [LabelRange("a", 1000, 2000, "ms")]
    path = tmp_path / "l.parquet"
    pd.DataFrame({"asset": ["b"], "start_row": [3], "end_row": [9]}).to_parquet(path)
    assert read_label_ranges(str(path)) == [LabelRange("b", 3, 9, "row")]


def test_time_labels_follow_each_rows_own_stamp_when_an_hour_repeats() -> None:
    hour = 3_600_000
    ts = np.array([0, hour // 2, hour, hour // 2 + 1000, hour + 1000, 2 * hour])  # the second half hour repeats
    flags = row_labels(ts, [LabelRange("f", hour // 2, hour // 2 + 1000, "ms")])
    assert flags.tolist() == [0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("content, source, problem", [
    (b"asset,start\np,1\n", "l.csv", "no column start_ms, end_ms"),
    (b"start,end\n1,2\n", "l.csv", "no column asset"),
    (b"asset,start_ms,end_ms\np,5000,1000\n", "l.csv", "row 0 ends before it starts"),
    (b"asset,start_ms,end_ms\np,soon,1000\n", "l.csv", "unparsable timestamps"),
    (b"file,start_row,end_row\np,1.5,3\n", "l.csv", "row indices"),
    (b'{"a.csv": [["2020-01-01"]]}', "w.json", "list of \\[start, end\\] pairs"),
    (b"{not json", "w.json", "not a readable label file"),
])
def test_bad_label_files_name_the_problem(content: bytes, source: str, problem: str) -> None:
    with pytest.raises(LabelError, match=problem):
        parse_label_ranges(content, source)


def test_missing_file() -> None:
    with pytest.raises(LabelError, match="cannot read the labels"):
        read_label_ranges("/nonexistent/labels.csv")
