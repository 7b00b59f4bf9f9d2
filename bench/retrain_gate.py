"""Does the gate let ordinary retrains through and stop bad models? Consecutive retrains of a
stationary simulated plant, each gated against the model serving at the time, then
deliberately bad challengers gated against the last one.

    python -m bench.retrain_gate [--retrains 10] [--assets 4] [--fine-tune on|off] [--set key=value …]

The plant (pipeline/simulate.py) has no regime changes and a 30-minute "day", so every hour
of it is drawn from the same process. Its readings are written to a Parquet archive with
the archiver's own writer and each run is the production job, :func:`trainers.train.run_training`
(scan → fit → gate → publish or keep as a candidate), on a small model. The first run
publishes without a gate; retrain k ends ``--step-minutes`` later than retrain k-1, so the
data slides forward as it would between daily runs.

The bad challengers, each expected to be refused, end at the last retrain's time and are
gated on the same held-out hour, each against the last retrain's champion (in a copy of the
registry, so one that passes is not served to the next):

* ``fewer_units``: layers 2, 2 (trained from scratch: the serving network's shape differs);
* ``one_epoch``: one epoch from scratch (``trainer.fine_tune=false``: a one-epoch
  fine-tune of the serving model is not a bad model);
* ``feature_shuffled``: one sensor's readings permuted in time over the training range
  (its dynamics are gone; the held-out minutes are the real ones);
* ``faulty_data``: trained on a range full of unlabelled faults (drifts, stuck sensors,
  noise bursts, broken correlations on every asset), nothing excluded.

Prints one JSON object: per run the decision, the gate's intervals and the training figures,
and a summary (publishes among the retrains, bad challengers refused). No broker is needed.
Runtime on 2 shared cores with the defaults: about 7 minutes (4 retrains and the 4 bad
challengers took 247 s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.simulate import DEFAULT_FEATURES, PlantConfig, PlantSimulator, plan_anomalies

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
PERIOD_MS = 1000
SHUFFLED = "Pressure"  # the sensor whose readings the feature_shuffled challenger sees out of order

# A small model and a short history (48 minutes), so 15 fits take minutes on 2 cores; a held-out
# hour, so the gate has about as many blocks (225) as on one day of a few pumps. A short history
# wants the wider novelty margin (see threshold.novelty_margin).
SETTINGS = {
    "model.units": "16,8", "model.timesteps": "16", "model.chunks_per_run": "4", "model.streams": "16",
    "model.epochs": "30", "model.patience": "5", "threshold.novelty_margin": "3.75",
    "trainer.lookback_hours": "1.8", "trainer.holdout_hours": "1.0", "trainer.min_rows": "1000",
    "registry.keep": "20", "registry.keep_candidates": "20", "kafka.bootstrap_servers": "",
}
BAD: dict[str, dict[str, str]] = {
    "fewer_units": {"model.units": "2,2"},
    "one_epoch": {"model.epochs": "1", "trainer.fine_tune": "false"},
    "feature_shuffled": {},
    "faulty_data": {},
}


def plant(n_assets: int) -> PlantConfig:
    return PlantConfig(n_assets=n_assets, period_ms=PERIOD_MS, seed=17, regime_change_per_day=0.0,
                       day_ms=30 * MINUTE)


def write_archive(uri: str, frame: pd.DataFrame) -> None:
    """Readings as the archiver writes them (long format, one partition)."""
    from consumers.archiver import ArchiveWriter, Rows

    features = DEFAULT_FEATURES
    n, f = len(frame), len(features)
    ArchiveWriter(uri, features).write(0, Rows(
        asset=np.repeat(frame["asset"].to_numpy(object), f), ts_ms=np.repeat(frame["ts_ms"].to_numpy(np.int64), f),
        feature=np.tile(np.arange(f, dtype=np.int32), n), value=frame[list(features)].to_numpy(np.float64).ravel(),
        offset=np.repeat(np.arange(n, dtype=np.int64), f)))


def shuffled(frame: pd.DataFrame, start_ms: int, end_ms: int, seed: int = 3) -> pd.DataFrame:
    """``SHUFFLED`` permuted in time within each asset over ``[start_ms, end_ms)``."""
    out = frame.copy()
    rng = np.random.default_rng(seed)
    inside = (out["ts_ms"] >= start_ms) & (out["ts_ms"] < end_ms)
    for _, rows in out[inside].groupby("asset").groups.items():
        values = out.loc[rows, SHUFFLED].to_numpy()
        out.loc[rows, SHUFFLED] = rng.permutation(values)
    return out


def faulty(config: PlantConfig, start_ms: int, end_ms: int, train_ms: int, holdout_ms: int) -> pd.DataFrame:
    """The plant with unlabelled faults over about 60 % of the training range, none in the held-out one."""
    faults = plan_anomalies(config, train_ms, holdout_ms, per_asset=10, min_gap_steps=30,
                            kinds=("drift", "stuck", "noise_burst", "correlation_break"),
                            duration_steps=(120, 240), seed=5)
    return PlantSimulator(config, faults).frame(start_ms, end_ms)


def point_rule(gate: dict[str, Any]) -> str | None:
    """What the gate decided before the paired test: each point figure at most ``margin`` above
    the champion's (the alert fraction with 0.001 of absolute slack)."""
    champion, challenger, margin = gate.get("champion"), gate.get("challenger"), gate.get("margin")
    if not champion or not challenger or margin is None:
        return None
    fe, af = challenger.get("forecast_error"), challenger.get("alert_fraction")
    if fe is None or af is None or champion.get("forecast_error") is None:
        return "refuse"
    ok = fe <= champion["forecast_error"] * (1 + margin) and af <= champion["alert_fraction"] * (1 + margin) + 0.001
    return "publish" if ok else "refuse"


def gate_row(name: str, outcome: Any, seconds: float) -> dict[str, Any]:
    meta = outcome.metadata
    gate = meta.get("gate") or {}
    paired = gate.get("paired") or {}
    champion, challenger = gate.get("champion") or {}, gate.get("challenger") or {}
    return {
        "run": name, "version": outcome.version, "decision": gate.get("decision"),
        "point_rule_decision": point_rule(gate),
        "published": outcome.published, "kept_as_candidate": outcome.candidate,
        "error_change": paired.get("error_change"), "alert_change": paired.get("alert_change"),
        "error_allowed": paired.get("error_allowed"), "alert_allowed": paired.get("alert_allowed"),
        "blocks": paired.get("blocks"),
        "forecast_error": {"champion": champion.get("forecast_error"), "challenger": challenger.get("forecast_error")},
        "alert_fraction": {"champion": champion.get("alert_fraction"), "challenger": challenger.get("alert_fraction")},
        "epochs": meta.get("epochs"), "best_epoch": meta.get("best_epoch"),
        "fine_tuned_from": meta.get("fine_tuned_from"), "validation_error": meta.get("validation_error"),
        "initial_val_loss": meta.get("initial_val_loss"), "seconds": round(seconds, 1),
        "reason": gate.get("reason"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.registry import current_version
    from pipeline.settings import load_settings
    from trainers.train import run_training

    config = plant(args.assets)
    lookback = float(SETTINGS["trainer.lookback_hours"]) * 60 * MINUTE
    holdout = float(SETTINGS["trainer.holdout_hours"]) * 60 * MINUTE
    first_end = T0 + int(lookback)
    last_end = first_end + args.retrains * args.step_minutes * MINUTE
    work = Path(args.workdir or tempfile.mkdtemp(prefix="plantwatch-retrain-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    normal = PlantSimulator(config).frame(T0, last_end)
    write_archive(str(work / "archive"), normal)
    base = {**SETTINGS, "registry.uri": str(work / "registry"), "archive.uri": str(work / "archive")}
    if args.fine_tune is not None:
        base["trainer.fine_tune"] = "true" if args.fine_tune == "on" else "false"
    base.update(dict(s.split("=", 1) for s in args.set))

    def train(name: str, end_ms: int, overrides: dict[str, str] | None = None) -> dict[str, Any]:
        settings = load_settings(env={}, overrides={**base, **(overrides or {})})
        started = time.monotonic()
        outcome = run_training(settings, end_ms)
        row = gate_row(name, outcome, time.monotonic() - started)
        print(json.dumps({k: row[k] for k in ("run", "decision", "point_rule_decision", "error_change",
                                              "alert_change", "epochs", "best_epoch", "seconds")}),
              file=sys.stderr, flush=True)
        return row

    t0 = time.monotonic()
    first = train("first", first_end)
    retrains = [train(f"retrain_{k}", first_end + k * args.step_minutes * MINUTE) for k in range(1, args.retrains + 1)]
    serving = current_version(base["registry.uri"])

    train_start, holdout_start = last_end - int(lookback), last_end - int(holdout)
    variants = {
        "feature_shuffled": shuffled(normal, train_start, holdout_start),
        "faulty_data": faulty(config, T0, last_end, train_start, holdout_start),
    }
    bad = []
    for name, overrides in BAD.items() if args.bad else ():
        if name in variants:
            uri = str(work / f"archive-{name}")
            write_archive(uri, variants[name])
            overrides = {**overrides, "archive.uri": uri}
        # Each against the same champion: a copy of the registry, so one that passes is not served to the next.
        own = work / f"registry-{name}"
        shutil.copytree(work / "registry", own)
        overrides = {**overrides, "registry.uri": str(own)}
        row = train(name, last_end, overrides)
        row["expected"] = "refuse"
        row["champion"] = serving
        bad.append(row)

    changes = [r["error_change"]["estimate"] for r in retrains if r.get("error_change")
               and r["error_change"].get("estimate") is not None]
    summary = {
        "retrains": len(retrains), "published": sum(r["published"] for r in retrains),
        "refused": sum(not r["published"] for r in retrains),
        "refused_by_the_point_rule": sum(r["point_rule_decision"] == "refuse" for r in retrains),
        "error_change_of_retrains": {"mean": _r(statistics.fmean(changes)) if changes else None,
                                     "sd": _r(statistics.stdev(changes)) if len(changes) > 1 else None,
                                     "min": _r(min(changes)) if changes else None,
                                     "max": _r(max(changes)) if changes else None},
        "epochs_of_retrains": [r["epochs"] for r in retrains],
        "bad_refused": {r["run"]: not r["published"] for r in bad},
        "all_bad_refused": all(not r["published"] for r in bad) if bad else None,
        "duration_s": round(time.monotonic() - t0, 1),
    }
    result = {"summary": summary,
              "config": {"assets": args.assets, "features": len(DEFAULT_FEATURES), "period_ms": PERIOD_MS,
                         "step_minutes": args.step_minutes, "settings": {k: v for k, v in base.items()
                                                                          if not k.endswith(".uri")}},
              "first": first, "retrains": retrains, "bad": bad}
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _r(x: float) -> float:
    return round(x, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retrain_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--retrains", type=int, default=10, help="ordinary retrains after the first model (default 10)")
    p.add_argument("--assets", type=int, default=4, help="pumps in the simulated plant (default 4)")
    p.add_argument("--step-minutes", type=int, default=5, help="minutes of new data between retrains (default 5)")
    p.add_argument("--fine-tune", choices=("on", "off"), help="trainer.fine_tune for every run (default: the setting)")
    p.add_argument("--no-bad", dest="bad", action="store_false", help="skip the bad challengers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings for every run")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--workdir", help="keep the archive and registry here (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    from pipeline.logs import configure_logging

    configure_logging(args.log_level)  # to stderr: stdout is the JSON result
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
