"""A readings topic deleted and created again numbers its records from 0 again: the positions the
detector left in its state topic for the old topic must not hide the new topic's records."""

from __future__ import annotations

from typing import Any

from pipeline.simulate import PlantSimulator

from .plant import PERIOD_MS, PLANT, detector_settings, produce, recreate_readings_topic, running_detector, wait_until


def test_every_reading_of_a_topic_created_again_is_scored_and_may_alert(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    settings = detector_settings(settings_for, broker)
    sim = PlantSimulator(PLANT)
    start = fitted_plant.stream_start_ms
    first = produce(settings, sim, start, start + 400 * PERIOD_MS)
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.accepted >= first, 120, "the first topic's readings placed")
    # stopped gracefully: a final checkpoint left every asset's snapshot at its position in the old topic

    recreate_readings_topic(settings)
    later = start + 1000 * PERIOD_MS
    second = produce(settings, sim, later, later + 200 * PERIOD_MS)  # fewer records than the old positions
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.records >= second, 120, "the new topic's records polled")
        wait_until(lambda: det.stats.accepted >= second, 30, "the new topic's readings placed")
        assert (det.stats.accepted, det.stats.replayed) == (second, 0)  # none skipped, none replayed silently


def test_a_topic_created_again_under_a_running_detector_is_read_from_its_start(
        broker: Any, settings_for: Any, fitted_plant: Any) -> None:
    """The client finds its position past the new topic's end and starts again from the earliest
    record: those records are the new topic's, processed and published, and the positions the
    detector then checkpoints are the new topic's (a restart reads on from there)."""
    settings = detector_settings(settings_for, broker)
    sim = PlantSimulator(PLANT)
    start = fitted_plant.stream_start_ms
    first = produce(settings, sim, start, start + 400 * PERIOD_MS)
    later = start + 1000 * PERIOD_MS
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.accepted >= first, 120, "the first topic's readings placed")
        recreate_readings_topic(settings)
        second = produce(settings, sim, later, later + 200 * PERIOD_MS)  # fewer records than the old positions
        wait_until(lambda: det.stats.accepted >= first + second, 120, "the new topic's readings placed")
        assert (det.stats.accepted, det.stats.replayed) == (first + second, 0)  # none skipped, none silenced
    third = produce(settings, sim, later + 200 * PERIOD_MS, later + 300 * PERIOD_MS)
    with running_detector(settings, fitted_plant.bundle) as det:
        wait_until(lambda: det.stats.accepted >= third, 120, "the readings after the restart placed")
        assert (det.stats.accepted, det.stats.replayed) == (third, 0)  # read on from the new topic's positions
