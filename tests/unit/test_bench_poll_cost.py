"""The poll benchmark drives a real Detector through stand-ins for the Kafka clients: the stand-ins
must keep up with what the detector asks of its clients, or ``make bench`` fails."""

from __future__ import annotations

from bench.poll_cost import poll_costs


def test_the_poll_benchmark_runs_wide_and_narrow_polls_through_the_detector() -> None:
    for fmt in ("wide", "narrow"):
        times = poll_costs(20, 160, 2, fmt)
        assert len(times) == 2 and all(t > 0 for t in times)
