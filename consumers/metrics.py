"""Prometheus metrics of the daemons, defined once per process and counted where things happen."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

RECORDS = Counter("plantwatch_records_total", "Records read from the readings topic")
REJECTS = Counter("plantwatch_rejects_total", "Records sent to the dead-letter topic", ["reason"])
STEPS_SCORED = Counter("plantwatch_steps_scored_total", "Grid steps scored by the model")
ALERT_EVENTS = Counter("plantwatch_alert_events_total", "Alert events published", ["state"])
POLL_SECONDS = Histogram("plantwatch_poll_seconds", "Processing time of one poll (decode to commit)",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SCORE_SECONDS = Histogram("plantwatch_score_seconds", "Time of the grid+model+threshold part of one poll",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LAG = Gauge("plantwatch_consumer_lag", "Records behind the partition's high watermark", ["partition"])
ASSETS = Gauge("plantwatch_assets", "Assets with state in this detector")
MODEL = Info("plantwatch_model", "Model version being served and the runtime of its one-step call (litert, tensorflow)")
MODEL_SWAPS = Counter("plantwatch_model_swaps_total", "Model hot swaps", ["outcome"])
PRODUCERS_RENEWED = Counter("plantwatch_producers_renewed_total",
                            "Producers replaced after the broker lost their producer id")
ARCHIVED = Counter("plantwatch_archived_rows_total", "Rows written to the Parquet archive")
CHECKPOINT_SECONDS = Histogram("plantwatch_checkpoint_seconds", "Time to write changed asset state and commit",
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CHECKPOINT_ASSETS = Counter("plantwatch_checkpoint_assets_total", "Asset snapshots written to the state topic")
