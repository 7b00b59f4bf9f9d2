"""Metrics against hand-computed cases and SKAB's conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.quality_metrics import (
    NAB_PROFILES,
    Coverage,
    EventMetrics,
    PointMetrics,
    alert_coverage,
    blanket_runs,
    changepoints_from_alerts,
    event_metrics,
    nab_scores,
    numenta_nab_scores,
    point_metrics,
    pooled_event_metrics,
    pooled_point_metrics,
    ranges_from_labels,
    runs_as_spans,
)

# --------------------------------------------------------------------------- point-wise


def test_point_metrics_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 1])
    predicted = np.array([0, 1, 1, 1, 0, 0, 0, 0])
    # TP rows 2,3 -> 2; FP row 1 -> 1; FN rows 4,7 -> 2; TN rows 0,5,6 -> 3
    # precision 2/3, recall 2/4, F1 = 2 / (2 + (1 + 2) / 2) = 4/7, FAR = 1/4, MAR = 2/4
    m = point_metrics(labels, predicted)
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 2, 3)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(0.5)
    assert m.f1 == pytest.approx(4 / 7)
    assert m.far == pytest.approx(0.25)
    assert m.mar == pytest.approx(0.5)


def test_pooled_point_metrics_equals_concatenation() -> None:
    a = (np.array([1, 0]), np.array([1, 1]))  # TP 1, FP 1
    b = (np.array([1, 1, 0]), np.array([0, 1, 0]))  # TP 1, FN 1, TN 1
    pooled = pooled_point_metrics([a, b])
    # TP 2, FP 1, FN 1, TN 1: precision 2/3, recall 2/3, F1 2/(2+1) = 2/3, FAR 1/2, MAR 1/3
    assert (pooled.tp, pooled.fp, pooled.fn, pooled.tn) == (2, 1, 1, 1)
    assert pooled.f1 == pytest.approx(2 / 3)
    assert pooled.far == pytest.approx(0.5)
    assert pooled.mar == pytest.approx(1 / 3)
    concatenated = point_metrics(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    assert pooled == concatenated


def test_point_metrics_zero_denominators_are_zero() -> None:
    m = point_metrics(np.zeros(5, dtype=int), np.zeros(5, dtype=int))
    assert m == PointMetrics(tp=0, fp=0, fn=0, tn=5, precision=0.0, recall=0.0, f1=0.0, far=0.0, mar=0.0)


def test_point_metrics_accepts_float_labels_as_in_skab_files() -> None:
    m = point_metrics(np.array([0.0, 1.0, 1.0]), np.array([1, 1, 0], dtype=np.int8))
    assert (m.tp, m.fp, m.fn, m.tn) == (1, 1, 1, 0)


@pytest.mark.parametrize(
    ("labels", "predicted"),
    [(np.array([0, 2]), np.array([0, 1])), (np.array([0, 1]), np.array([0, 1, 0])), (np.zeros((2, 2)), np.zeros((2, 2)))],
)
def test_point_metrics_rejects_bad_input(labels: np.ndarray, predicted: np.ndarray) -> None:
    with pytest.raises(ValueError):
        point_metrics(labels, predicted)


# --------------------------------------------------------------------------- event-level


def test_ranges_from_labels() -> None:
    assert ranges_from_labels(np.array([1, 1, 0, 1])) == [(0, 2), (3, 4)]
    assert ranges_from_labels(np.array([0, 0, 0])) == []
    assert ranges_from_labels(np.array([], dtype=int)) == []


@given(st.lists(st.integers(0, 1), max_size=60))
def test_ranges_from_labels_round_trip(bits: list[int]) -> None:
    labels = np.array(bits, dtype=int)
    rebuilt = np.zeros_like(labels)
    for start, end in ranges_from_labels(labels):
        assert rebuilt[start:end].sum() == 0 and labels[start:end].all()
        rebuilt[start:end] = 1
    np.testing.assert_array_equal(rebuilt, labels)


# labelled ranges (1,4) (7,9) (12,14); predicted ranges (3,5) (6,8) (10,11)
EVENT_LABELS = np.array([0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0])
EVENT_PREDICTED = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0])


def test_event_metrics_hand_computed() -> None:
    # (1,4) hit by (3,5): TP, delay 3 - 1 = 2; (7,9) hit by (6,8), which starts earlier: TP, delay 0;
    # (12,14) missed: FN; (10,11) overlaps nothing: FP.  precision 2/3, recall 2/3, F1 2/3
    m = event_metrics(EVENT_LABELS, EVENT_PREDICTED)
    assert m == EventMetrics(tp=2, fp=1, fn=1, precision=2 / 3, recall=2 / 3, f1=pytest.approx(2 / 3), delays=(2, 0))


def test_event_metrics_accepts_ranges_and_mixed_inputs() -> None:
    expected = event_metrics(EVENT_LABELS, EVENT_PREDICTED)
    labels_ranges = [(1, 4), (7, 9), (12, 14)]
    predicted_ranges = [(10, 11), (3, 5), (6, 8)]  # unsorted on purpose
    assert event_metrics(labels_ranges, predicted_ranges) == expected
    assert event_metrics(EVENT_LABELS, predicted_ranges) == expected
    assert event_metrics(labels_ranges, EVENT_PREDICTED) == expected


def test_event_overlap_rules() -> None:
    # two predicted ranges in one labelled range: one TP, no FP, delay from the first (5 - 2 = 3)
    m = event_metrics([(2, 10)], [(5, 6), (8, 9)])
    assert (m.tp, m.fp, m.fn, m.delays) == (1, 0, 0, (3,))
    # one predicted range spanning two labelled ranges: both TP
    m = event_metrics([(2, 4), (6, 8)], [(0, 20)])
    assert (m.tp, m.fp, m.fn, m.delays) == (2, 0, 0, (0, 0))
    # end is exclusive: (2,4) and (4,6) only touch -> FN and FP
    m = event_metrics([(2, 4)], [(4, 6)])
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


def test_event_metrics_empty_inputs() -> None:
    m = event_metrics([], [])
    assert (m.tp, m.fp, m.fn, m.f1, m.delays) == (0, 0, 0, 0.0, ())
    m = event_metrics([(0, 3)], np.zeros(5, dtype=int))
    assert (m.tp, m.fn, m.recall) == (0, 1, 0.0)


@pytest.mark.parametrize("ranges", [[(3, 3)], [(5, 2)], [(0, 4), (3, 6)]])
def test_event_metrics_rejects_bad_ranges(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        event_metrics(ranges, [])


def test_pooled_event_metrics_sums_per_file() -> None:
    # concatenated, the runs at the file boundary would merge into one detected event;
    # per file: A has a missed range (FN), B a detected one (TP, delay 0) -> recall 1/2
    a = (np.array([0, 1]), np.array([0, 0]))
    b = (np.array([1, 0]), np.array([1, 0]))
    c = (EVENT_LABELS, EVENT_PREDICTED)
    m = pooled_event_metrics([a, b, c])
    # totals: TP 0+1+2, FP 0+0+1, FN 1+0+1 -> precision 3/4, recall 3/5, F1 = 2*0.45/1.35 = 2/3
    assert (m.tp, m.fp, m.fn) == (3, 1, 2)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.6)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.delays == (0, 2, 0)


def test_changepoints_from_alerts() -> None:
    alerts = np.array([1, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(changepoints_from_alerts(alerts), [1, 0, 0, 0, 1, 0, 0, 0])
    # SKAB's notebooks: abs(diff) with the first row kept -> run starts and the step after each run
    np.testing.assert_array_equal(changepoints_from_alerts(alerts, include_run_ends=True), [1, 0, 1, 0, 1, 0, 0, 1])
    assert changepoints_from_alerts(alerts).dtype == np.int8


# --------------------------------------------------------------------------- NAB
#
# Unit curve of SKAB's scale: u(e) = (1 - tanh(-pi/2 + e*pi/999) / tanh(pi/2)) / 2 on the
# grid index e = int(1000 * (t - window_start) / window_width); a TP scores
# A_fp + (A_tp - A_fp) * u(e). Hand values (tanh(pi/2) = 0.9171523):
#   e = 0:   u = 1
#   e = 500: x = pi/1998 = 0.0015724, tanh(x)/tanh(pi/2) = 0.0017144 -> u = 0.4991428
#   e = 666: x = pi/6 (666/999 = 2/3), tanh(pi/6) = 0.4804728 -> ratio 0.5238744 -> u = 0.2380628
# Normalised score = 100 * (raw - n*A_fn) / (n*A_tp - n*A_fn).

N = 100
CP = 50  # window 30 centred: [35, 65]


def _one_file(*predicted_at: int) -> list[tuple[np.ndarray, np.ndarray]]:
    true = np.zeros(N, dtype=int)
    true[CP] = 1
    predicted = np.zeros(N, dtype=int)
    predicted[list(predicted_at)] = 1
    return [(true, predicted)]


def test_nab_null_detector_scores_zero() -> None:
    assert nab_scores(_one_file()) == {"standard": 0.0, "low_fp": 0.0, "low_fn": 0.0}


def test_nab_detection_at_window_start_is_perfect() -> None:
    scores = nab_scores(_one_file(35))
    assert scores == pytest.approx({"standard": 100.0, "low_fp": 100.0, "low_fn": 100.0})


def test_nab_detection_at_the_changepoint_hand_computed() -> None:
    # e = 500, u = 0.4991428
    # standard: raw -0.11 + 1.11*u = 0.4440485 -> (0.4440485 + 1) / 2 = 72.2024
    # low_fp:   raw -0.22 + 1.22*u = 0.3889542 -> (0.3889542 + 1) / 2 = 69.4477
    # low_fn:   raw 0.4440485 -> (0.4440485 + 2) / 3 = 81.4683
    scores = nab_scores(_one_file(CP))
    assert scores == pytest.approx({"standard": 72.2024, "low_fp": 69.4477, "low_fn": 81.4683}, abs=1e-3)


def test_nab_late_detection_scores_less_than_early() -> None:
    early, late = nab_scores(_one_file(40)), nab_scores(_one_file(60))
    for profile in NAB_PROFILES:
        assert early[profile] > late[profile]


def test_nab_false_positive_lowers_score() -> None:
    # FP at 10 plus perfect TP at 35: standard raw 1 - 0.11 = 0.89 -> 94.5;
    # low_fp 1 - 0.22 = 0.78 -> 89.0; low_fn 0.89 -> (0.89 + 2) / 3 = 96.3333
    scores = nab_scores(_one_file(10, 35))
    assert scores == pytest.approx({"standard": 94.5, "low_fp": 89.0, "low_fn": 96.3333}, abs=1e-4)


def test_nab_only_first_detection_in_window_counts() -> None:
    assert nab_scores(_one_file(35, 40, 64)) == nab_scores(_one_file(35))


def test_nab_missed_changepoint_with_false_positive_is_negative() -> None:
    # raw = A_fn + A_fp: standard (-1.11 + 1) / 2 = -5.5; low_fp (-1.22 + 1) / 2 = -11.0;
    # low_fn (-2.11 + 2) / 3 = -3.6667
    scores = nab_scores(_one_file(90))
    assert scores == pytest.approx({"standard": -5.5, "low_fp": -11.0, "low_fn": -3.6667}, abs=1e-4)


def test_nab_sums_over_files_before_normalising() -> None:
    # perfect file + null file: standard (1 - 1 - (-2)) / (2 - (-2)) = 50; low_fn (1 - 2 + 4) / 6 = 50
    scores = nab_scores(_one_file(35) + _one_file())
    assert scores == pytest.approx({"standard": 50.0, "low_fp": 50.0, "low_fn": 50.0})
    # a file without changepoints only contributes its predictions as FPs: standard 1 - 0.11 * 2
    no_cp = (np.zeros(N, dtype=int), np.eye(1, N, 5, dtype=int)[0] + np.eye(1, N, 70, dtype=int)[0])
    scores = nab_scores(_one_file(35) + [no_cp])
    assert scores["standard"] == pytest.approx(100 * (1 - 0.22 + 1) / 2)


def test_nab_overlapping_windows_cut_the_later_one() -> None:
    # CPs 50 and 60: windows [35,65] and [45,75] -> the second starts at 65: [65,75].
    # prediction 55 is first in window 1 at 20/30 -> e = 666 (u = 0.2380628) and is NOT in window 2;
    # prediction 70 is first in window 2 at 5/10 -> e = 500 (u = 0.4991428).
    # standard raw = (-0.11 + 1.11*0.2380628) + (-0.11 + 1.11*0.4991428) = 0.5982982 -> (0.5982982 + 2) / 4
    true = np.zeros(N, dtype=int)
    true[[50, 60]] = 1
    predicted = np.zeros(N, dtype=int)
    predicted[[55, 70]] = 1
    assert nab_scores([(true, predicted)])["standard"] == pytest.approx(64.9575, abs=1e-3)


def test_nab_window_positions() -> None:
    assert nab_scores(_one_file(20), position="left")["standard"] == pytest.approx(100.0)  # [20, 50]
    assert nab_scores(_one_file(50), position="right")["standard"] == pytest.approx(100.0)  # [50, 80]
    assert nab_scores(_one_file(19), position="left")["standard"] == pytest.approx(-5.5)


def test_nab_uses_timestamps_for_windows() -> None:
    # rows every 2 s: the CP at row 50 is t = 100 s, 30 s window [85 s, 115 s];
    # row 40 (80 s) lies outside it (FN + FP = -5.5) although it is inside in row units
    start = np.datetime64("2020-03-09T10:00:00", "ns")
    stamps = start + np.arange(N) * np.timedelta64(2, "s")
    files = _one_file(40)
    assert nab_scores(files, timestamps=[stamps])["standard"] == pytest.approx(-5.5)
    assert nab_scores(files)["standard"] > 0
    # row 43 (86 s) is inside: 1/30 of the window -> e = 33; numeric seconds give the same result
    files = _one_file(43)
    by_datetime = nab_scores(files, timestamps=[stamps])
    assert by_datetime == nab_scores(files, timestamps=[np.arange(N) * 2.0])
    assert by_datetime["standard"] > 95.0


def test_nab_portion_window_when_no_width_given() -> None:
    # 101 rows, one CP at 50: width = (100 - 0) / (1 + 1) * 0.1 = 5 -> window [47.5, 52.5]
    true = np.zeros(101, dtype=int)
    true[50] = 1
    outside, inside = np.zeros(101, dtype=int), np.zeros(101, dtype=int)
    outside[47] = 1
    inside[48] = 1  # 0.5 / 5 of the window -> e = 100
    assert nab_scores([(true, outside)], window=None)["standard"] == pytest.approx(-5.5)
    u = (1 - math.tanh(-math.pi / 2 + 100 * math.pi / 999) / math.tanh(math.pi / 2)) / 2
    expected = 100 * (-0.11 + 1.11 * u + 1) / 2
    assert nab_scores([(true, inside)], window=None)["standard"] == pytest.approx(expected)


def test_nab_ignores_empty_files() -> None:
    empty = (np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    stamps = [np.zeros(0, dtype="datetime64[ns]"), np.datetime64("2020-01-01", "ns") + np.arange(N) * np.timedelta64(1, "s")]
    assert nab_scores([empty, *_one_file(35)], timestamps=stamps)["standard"] == pytest.approx(100.0)


def test_nab_without_any_changepoint_is_undefined() -> None:
    with pytest.raises(ValueError, match="changepoint"):
        nab_scores([(np.zeros(10, dtype=int), np.ones(10, dtype=int))])


def test_nab_rejects_mismatched_timestamps() -> None:
    with pytest.raises(ValueError):
        nab_scores(_one_file(35), timestamps=[np.arange(N - 1)])
    with pytest.raises(ValueError):
        nab_scores(_one_file(35), timestamps=[np.arange(N)[::-1]])


# --------------------------------------------------------------------------- Numenta's NAB, blanket alerts, coverage


def _det(n: int, *rows: int) -> np.ndarray:
    flags = np.zeros(n, np.int8)
    flags[list(rows)] = 1
    return flags


def _sig(x: float) -> float:
    return 2 / (1 + math.exp(5 * x)) - 1


def test_numenta_nab_perfect_null_and_a_late_detection() -> None:
    window = [(40, 49)]  # 100 rows: the first 15 are probationary
    assert numenta_nab_scores([(window, _det(100, 40))])["standard"] == pytest.approx(100.0)
    assert numenta_nab_scores([(window, _det(100))])["standard"] == pytest.approx(0.0)
    # halfway: relative position -(49 - 45 + 1) / 10 = -0.5, scaled by the window's first row
    tp = _sig(-0.5) / _sig(-1.0)
    assert numenta_nab_scores([(window, _det(100, 45))])["standard"] == pytest.approx(100 * (tp + 1) / 2)


def test_numenta_nab_counts_only_the_first_detection_in_a_window_and_ignores_probation() -> None:
    window = [(40, 49)]
    first_only = numenta_nab_scores([(window, _det(100, 40, 41, 42, 49))])
    assert first_only["standard"] == pytest.approx(100.0)
    assert numenta_nab_scores([(window, _det(100, 3, 40))])["standard"] == pytest.approx(100.0)  # row 3: probation


def test_numenta_nab_false_positives_weighted_by_distance_from_the_preceding_window() -> None:
    window = [(40, 49)]
    before = numenta_nab_scores([(window, _det(100, 30, 40))])  # no window before row 30: full A_FP
    assert before["standard"] == pytest.approx(100 * (1 - 0.11 + 1) / 2)
    assert before["reward_low_fp_rate"] == pytest.approx(100 * (1 - 0.22 + 1) / 2)
    just_after = numenta_nab_scores([(window, _det(100, 40, 50))])  # |49 - 50| / (10 - 1) past the window
    assert just_after["standard"] == pytest.approx(100 * (1 + 0.11 * _sig(1 / 9) + 1) / 2)
    far_after = numenta_nab_scores([(window, _det(100, 40, 90))])  # more than 3 window widths: -A_FP
    assert far_after["standard"] == pytest.approx(before["standard"])


def test_numenta_nab_low_fn_profile_and_files_pooled() -> None:
    files = [([(40, 49)], _det(100, 40)), ([(20, 29)], _det(100))]
    got = numenta_nab_scores(files)
    assert got["standard"] == pytest.approx(100 * (1 - 1 + 2) / 4)
    assert got["reward_low_fn_rate"] == pytest.approx(100 * (1 - 2 + 4) / 6)
    assert got["windows"] == 2
    assert numenta_nab_scores([([], _det(100, 50))]) is None  # no window, no score


def test_an_alert_over_most_of_the_normal_rows_finds_nothing() -> None:
    labels = np.zeros(100, np.int8)
    labels[60:70] = 1
    blanket = np.zeros(100, np.int8)
    blanket[5:] = 1  # opens early and never ends: 85 of 90 normal rows under alert
    assert event_metrics(labels, blanket).tp == 1  # the overlap convention alone calls it found
    m = event_metrics(labels, blanket, blanket_share=0.5)
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    specific = np.zeros(100, np.int8)
    specific[62:75] = 1
    m = event_metrics(labels, specific, blanket_share=0.5)
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert blanket_runs(labels, blanket) == [(5, 100)]
    pooled = pooled_event_metrics([(labels, blanket), (labels, specific)], blanket_share=0.5)
    assert (pooled.tp, pooled.fp, pooled.fn) == (1, 1, 1)


def test_alert_coverage_of_a_normal_recording() -> None:
    labels = np.zeros(10, np.int8)
    pred = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 0], np.int8)
    cov = alert_coverage(labels, pred, np.arange(10) * 2000)
    assert cov == Coverage(normal_share=0.6, longest_rows=4, longest_s=6.0, longest_share=0.4, alerts=2)
    assert runs_as_spans(pred, np.arange(10) * 2000) == [(2000, 4000), (8000, 14000)]
    none = alert_coverage(labels, np.zeros(10, np.int8), np.arange(10))
    assert (none.normal_share, none.longest_rows, none.alerts) == (0.0, 0, 0)
