"""Evaluation harness: alert-to-row mapping, metric wiring, equal-FAR cut, fleet naming, engine parity."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest

from pipeline.alerts import AlertEvent
from pipeline.bundle import ModelBundle
from pipeline.evaluation import (
    EvaluationError,
    Series,
    alert_spans,
    asset_name,
    concat_batches,
    equal_far_predictions,
    labelled_file,
    labels_from_ranges,
    mean_std,
    replay,
    rows_in_alerts,
    run_lstm,
    score_predictions,
    series_batch,
    training_groups,
)
from tests.unit.conftest import FEATURES, sine_frame, tiny_settings


def _event(asset: str, state: str, start_ms: int, end_ms: int | None = None, aid: str | None = None) -> AlertEvent:
    return AlertEvent(alert_id=aid or f"{asset}-{start_ms}", asset=asset, state=state, start_ms=start_ms,  # type: ignore[arg-type]
                      end_ms=end_ms, step_ms=start_ms, score=2.0, peak_score=2.0, threshold=1.0, top_features=(),
                      model_version="v")


def _file(labels: list[int], train_rows: int, name: str = "f", cps: list[int] | None = None) -> object:
    n = len(labels)
    series = Series(name, np.arange(n, dtype=np.int64) * 1000, np.zeros((n, 1)))
    return labelled_file(series, np.array(labels), None if cps is None else np.array(cps), train_rows)


# --------------------------------------------------------------------------- alerts → rows


def test_alert_spans_pair_open_with_close_and_leave_unclosed_alerts_open() -> None:
    events = [
        _event("a", "open", 2000), _event("a", "update", 2000), _event("b", "open", 1000),
        _event("a", "close", 2000, end_ms=5000), _event("a", "open", 7000),
    ]
    assert alert_spans(events, "a") == [(2000, 5000.0), (7000, math.inf)]
    assert alert_spans(events, "b") == [(1000, math.inf)]
    assert alert_spans(events, "c") == []


def test_rows_in_alerts_end_exclusive_and_open_alert_runs_to_file_end() -> None:
    ts = np.arange(10, dtype=np.int64) * 1000
    got = rows_in_alerts(ts, [(2000, 5000.0), (7000, math.inf)], period_ms=1000)
    assert got.tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]


def test_rows_in_alerts_maps_several_rows_per_grid_step() -> None:
    # period 2 s: rows at 0.5 s and 1.999 s share step 0; 3.5 s lies in the step starting at 2 s
    ts = np.array([0, 500, 1999, 2000, 3500, 4000, 5999, 6000], dtype=np.int64)
    got = rows_in_alerts(ts, [(2000, 6000.0)], period_ms=2000)
    assert got.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]


def test_rows_in_alerts_spans_outside_the_file() -> None:
    ts = np.arange(5, dtype=np.int64) * 1000 + 10_000
    assert rows_in_alerts(ts, [(0, math.inf)], 1000).tolist() == [1, 1, 1, 1, 1]     # began before, never closed
    assert rows_in_alerts(ts, [(0, 11_000.0)], 1000).tolist() == [1, 0, 0, 0, 0]
    assert rows_in_alerts(ts, [(20_000, math.inf)], 1000).tolist() == [0, 0, 0, 0, 0]
    assert rows_in_alerts(ts, [], 1000).tolist() == [0, 0, 0, 0, 0]


def test_labels_from_ranges_include_both_ends() -> None:
    ts = np.arange(8, dtype=np.int64) * 1000
    assert labels_from_ranges(ts, [(1000, 2000), (4500, 6000)]).tolist() == [0, 1, 1, 0, 0, 1, 1, 0]


# --------------------------------------------------------------------------- metric wiring


def test_point_and_event_metrics_on_both_bases() -> None:
    f = _file([0, 0, 1, 1, 1, 0, 0, 0, 0, 0], train_rows=2)
    pred = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    res = score_predictions([f], {"f": pred})  # type: ignore[list-item]
    whole, test = res["pooled"]["point"]["whole"], res["pooled"]["point"]["test"]
    assert (whole["tp"], whole["fp"], whole["fn"], whole["tn"]) == (2, 2, 1, 5)
    assert whole["f1"] == pytest.approx(2 / 3.5) and whole["far"] == pytest.approx(2 / 7)
    assert whole["mar"] == pytest.approx(1 / 3)
    assert (test["tp"], test["fp"], test["fn"], test["tn"]) == (2, 1, 1, 4)
    ev = res["pooled"]["event"]["whole"]
    assert (ev["tp"], ev["fp"], ev["fn"]) == (1, 1, 0)
    assert res["files"]["f"]["events"] == [{"start_ms": 2000, "end_ms": 4000, "rows": 3, "detected": True,
                                           "delay_rows": 1, "delay_s": 1.0}]
    assert res["pooled"]["delay"] == {"events": 1, "found": 1, "mean_s": 1.0, "median_s": 1.0, "max_s": 1.0}
    assert res["pooled"]["nab"] is None


def test_pooled_counts_sum_over_files_and_missed_events_have_no_delay() -> None:
    f1, f2 = _file([0, 1, 1, 0], 1, "x"), _file([0, 0, 1, 1], 1, "y")
    res = score_predictions([f1, f2], {"x": np.array([0, 1, 1, 0]), "y": np.array([1, 0, 0, 0])})  # type: ignore[list-item]
    whole = res["pooled"]["point"]["whole"]
    assert (whole["tp"], whole["fp"], whole["fn"], whole["tn"]) == (2, 1, 2, 3)
    assert res["files"]["y"]["events"][0]["detected"] is False
    assert res["files"]["y"]["events"][0]["delay_s"] is None
    assert res["pooled"]["delay"]["found"] == 1


def test_nab_skab_convention_counts_the_alert_end_as_a_changepoint() -> None:
    # one changepoint at 50 s, 30 s centred window [35 s, 65 s]
    cps = [0] * 200
    cps[50] = 1
    labels = [0] * 50 + [1] * 50 + [0] * 100
    ends_outside = np.array([0] * 35 + [1] * 65 + [0] * 100)     # starts on the window's left edge, ends at 100 s
    never_ends = np.array([0] * 35 + [1] * 165)
    f = _file(labels, 10, "f", cps)
    nab = score_predictions([f], {"f": ends_outside})["pooled"]["nab"]  # type: ignore[list-item]
    assert nab["run_starts_only"]["standard"] == pytest.approx(100.0)
    assert nab["skab"]["standard"] == pytest.approx(100 * (1 - 0.11 + 1) / 2)   # the end is a false positive
    assert nab["skab"]["low_fp"] == pytest.approx(100 * (1 - 0.22 + 1) / 2)
    nab = score_predictions([f], {"f": never_ends})["pooled"]["nab"]  # type: ignore[list-item]
    assert nab["skab"]["standard"] == pytest.approx(100.0)


def test_equal_far_cut_never_exceeds_the_target() -> None:
    f = _file([0, 0, 0, 0, 1, 1], 1)
    scores = {"f": np.array([0.1, 0.5, 0.3, 0.9, 0.8, 0.2])}
    cut, pred = equal_far_predictions([f], scores, 0.25)  # type: ignore[list-item]
    assert cut == 0.5 and pred["f"].tolist() == [0, 0, 0, 1, 1, 0]
    cut, pred = equal_far_predictions([f], scores, 0.2)  # type: ignore[list-item]
    assert cut == 0.9 and pred["f"].tolist() == [0, 0, 0, 0, 0, 0]
    cut, pred = equal_far_predictions([f], scores, 1.0)  # type: ignore[list-item]
    assert cut == -math.inf and pred["f"].tolist() == [1] * 6


def test_mean_std_over_seeds_keeps_shared_numeric_leaves() -> None:
    mean, std = mean_std([{"a": {"x": 1.0, "n": None, "d": None}, "b": 2, "flag": True},
                          {"a": {"x": 3.0, "n": None, "d": 5.0}, "b": 4, "flag": False}])  # type: ignore[misc]
    # a leaf None in every seed (no event found, so no mean delay) stays, as None; one None in some
    # seeds is averaged over the others
    assert mean == {"a": {"x": 2.0, "n": None, "d": 5.0}, "b": 3.0}
    assert std == {"a": {"x": pytest.approx(math.sqrt(2)), "n": None, "d": 0.0}, "b": pytest.approx(math.sqrt(2))}


def test_labelled_file_refuses_a_split_without_test_rows_and_bad_labels() -> None:
    s = Series("f", np.arange(4, dtype=np.int64), np.zeros((4, 1)))
    with pytest.raises(EvaluationError, match="no test rows"):
        labelled_file(s, np.zeros(4), None, 4)
    with pytest.raises(EvaluationError, match="0 or 1"):
        labelled_file(s, np.array([0, 2, 0, 0]), None, 1)


# --------------------------------------------------------------------------- fleet naming and plans


def test_asset_name_is_the_posix_path_below_the_root() -> None:
    assert asset_name(PurePosixPath("/d/skab/valve1/0.csv"), PurePosixPath("/d/skab")) == "valve1/0.csv"


def test_discover_names_files_relative_to_the_common_root(tmp_path: Path) -> None:
    from cli.evaluate_cmd import discover

    for rel in ("valve1/10.csv", "valve1/2.csv", "other/1.csv", "other/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("ts,a\n")
    root, paths = discover([str(tmp_path / "valve1"), str(tmp_path / "other" / "*.csv")])
    assert root == tmp_path
    assert [asset_name(p, root) for p in paths] == ["other/1.csv", "valve1/2.csv", "valve1/10.csv"]


def test_fleet_plan_trains_one_model_on_every_files_head_as_separate_assets() -> None:
    files = [_file([0] * 6, 3, "valve1/0.csv"), _file([0] * 8, 3, "other/1.csv")]
    groups = training_groups(files, "fleet")  # type: ignore[arg-type]
    assert len(groups) == 1
    heads, scored = groups[0]
    assert [(h.name, len(h)) for h in heads] == [("valve1/0.csv", 3), ("other/1.csv", 3)]
    assert [f.name for f in scored] == ["valve1/0.csv", "other/1.csv"]  # type: ignore[attr-defined]
    batch = concat_batches([series_batch(h, ("x",)) for h in heads])
    assert batch.asset.tolist() == ["valve1/0.csv"] * 3 + ["other/1.csv"] * 3
    assert batch.record_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert len(training_groups(files, "per_file")) == 2  # type: ignore[arg-type]


def test_load_files_with_a_label_range_file(tmp_path: Path) -> None:
    from cli.evaluate_cmd import LoadOptions, load_files, read_label_ranges

    pd.DataFrame({"ts": np.arange(6) * 1000, "a": np.arange(6.0)}).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "labels.json").write_text(json.dumps([{"file": "p.csv", "start": 2000, "end": 3000}]))
    opts = LoadOptions(time_col="ts", sep=None, label_col="anomaly", changepoint_col="changepoint", train_rows=2)
    files, skipped = load_files([tmp_path / "p.csv"], tmp_path, ("a",), opts,
                                read_label_ranges(str(tmp_path / "labels.json")))
    assert skipped == [] and files[0].labels.tolist() == [0, 0, 1, 1, 0, 0]
    assert files[0].changepoints is None and files[0].test.tolist() == [False, False, True, True, True, True]


# --------------------------------------------------------------------------- engine parity


def _anomalous_frame() -> pd.DataFrame:
    frame = sine_frame(500, assets=("p1", "p2"), seed=3)
    hit = (frame["asset"] == "p1") & frame.index.isin(range(600, 700))
    frame.loc[hit, "a"] += 6.0
    return frame


def test_evaluation_replay_gives_the_engine_alerts(tiny_bundle: ModelBundle) -> None:
    from pipeline.engine import DetectionEngine
    from pipeline.tables import frame_to_batch

    frame = _anomalous_frame()
    settings = tiny_settings()
    engine = DetectionEngine(tiny_bundle, settings.grid)
    out = [engine.process(frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset")), engine.flush()]
    events = [e for o in out for e in o.events]
    series = [Series(a, g["ts"].to_numpy(np.int64), g[list(FEATURES)].to_numpy(np.float64))
              for a, g in frame.groupby("asset", sort=True)]
    traces = replay(tiny_bundle, settings.grid, series, chunk_rows=97)
    for s in series:
        expected = alert_spans(events, s.name)
        assert traces[s.name].spans == expected
    assert traces["p1"].spans, "the injected shift must raise an alert"
    p1 = series[0]
    start, end = traces["p1"].spans[0]
    pred = rows_in_alerts(p1.ts_ms, traces["p1"].spans, tiny_bundle.period_ms)
    assert pred[(p1.ts_ms >= start) & (p1.ts_ms < end)].all()
    assert pred.sum() == sum(int(((p1.ts_ms >= s) & (p1.ts_ms < e)).sum()) for s, e in traces["p1"].spans)


def test_fleet_run_fits_once_and_scores_each_file_as_its_own_asset() -> None:
    settings = tiny_settings(**{"model.epochs": "1", "model.per_asset_scaling": "true"})
    frame = sine_frame(260, assets=("x", "y"), seed=5)
    files = []
    for i, (_, g) in enumerate(frame.groupby("asset", sort=True)):
        values = g[list(FEATURES)].to_numpy(np.float64, copy=True)
        if i == 1:
            values[:, 2] = 100.0  # this recording's "c" never moves: not read for its asset, read for the other
        s = Series(f"dir/{i}.csv", g["ts"].to_numpy(np.int64), values)
        files.append(labelled_file(s, np.zeros(len(s)), None, 200))
    run = run_lstm(files, settings, "fleet", seed=1)
    assert run.seed == 1 and len(run.fits) == 1
    assert run.fits[0]["files"] == ["dir/0.csv", "dir/1.csv"]
    assert run.fits[0]["unread_features"] == {"dir/1.csv": ["c"]}
    assert sorted(run.traces) == ["dir/0.csv", "dir/1.csv"]
    assert all(len(run.predicted[f.name]) == len(f.series) for f in files)
    assert all(len(run.traces[f.name].step_ms) == len(f.series) for f in files)
