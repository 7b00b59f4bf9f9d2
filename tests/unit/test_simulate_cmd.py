"""plantwatch simulate writes a labelled recording with its injected anomalies to a file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cli.main import main


def test_recording_out_holds_the_injected_anomalies_labelled_and_the_truth_file_names_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec, truth = tmp_path / "rec.parquet", tmp_path / "truth.jsonl"
    assert main(["simulate", "--recording-out", str(rec), "--truth", str(truth), "--assets", "2", "--steps", "1500",
                 "--start-ms", "1700000000000"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frame = pd.read_parquet(rec)
    anomalies = [json.loads(line) for line in truth.read_text().splitlines()]
    assert summary["rows"] == len(frame) == 3000 and summary["anomalies"] == len(anomalies) == 2
    for a in anomalies:
        rows = frame[(frame.asset == a["asset"]) & (frame.ts_ms >= a["start_ms"]) & (frame.ts_ms < a["end_ms"])]
        assert len(rows) > 0 and rows.label.eq(1).all()
    assert frame.label.sum() == sum((a["end_ms"] - a["start_ms"]) // 1000 for a in anomalies)


def test_history_out_and_recording_out_together_are_a_usage_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--recording-out", str(tmp_path / "a.csv"), "--history-out", str(tmp_path / "b.csv")]) == 2
    assert "alternatives" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
