"""SKAB benchmark: the product's detector on the Skoltech Anomaly Benchmark, two protocols.

* **leaderboard**: one model per recording, fitted on its first 400 rows, scoring the whole
  recording (SKAB's leaderboard protocol; its notebooks score training rows too), 34 files.
* **fleet**: one model for all 34 recordings, fitted on the union of their first 400 rows,
  each recording its own asset with its own scaling.

The model and threshold settings come from ``bench/skab.toml`` (through the product's
settings loader, so ``PLANTWATCH_*`` variables still apply); thresholds are calibrated on the
held-out tail of the training rows by the fit itself. The data (GPL) is read in place from
``../shared/data/skab`` relative to the repository, or ``PLANTWATCH_SKAB_DIR``.

Writes ``bench/skab.json``: headline figures (F1 as a fraction, FAR/MAR in percent, whole
file unless ``_test``, NAB in SKAB's convention) as the mean over seeds, their standard
deviation and per-seed values, the baselines, compact per-file figures and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SKAB_GROUPS = ("valve1", "valve2", "other")
TRAIN_ROWS = 400
CORE_FILES = ("fit.py", "scoring.py", "thresholds.py", "alerts.py", "engine.py", "model.py", "grid.py", "bundle.py")


def skab_dir() -> Path:
    return Path(os.environ.get("PLANTWATCH_SKAB_DIR") or REPO.parent / "shared" / "data" / "skab")


def load_skab(root: Path) -> list[Any]:
    """The 34 labelled recordings, named ``valve1/0.csv`` … (anomaly-free/ is another operating point)."""
    from cli.evaluate_cmd import LoadOptions, discover, load_files

    _, paths = discover([str(root / g) for g in SKAB_GROUPS], str(root))
    settings = _settings()
    opts = LoadOptions(time_col="datetime", sep=";", label_col="anomaly", changepoint_col="changepoint",
                       train_rows=TRAIN_ROWS)
    files, skipped = load_files(paths, root, settings.model.features, opts)
    if skipped:
        raise SystemExit(f"unlabelled SKAB files: {skipped}")
    return files


def _settings() -> Any:
    from pipeline.settings import load_settings

    return load_settings(REPO / "bench" / "skab.toml")


def headline(run: dict[str, Any]) -> dict[str, float | None]:
    """The figures SKAB's leaderboard shows, from one seed's pooled LSTM and equal-FAR T² results."""
    lstm, eq = run["lstm"]["pooled"], run["t2_equal_far"]["pooled"]
    w, t = lstm["point"]["whole"], lstm["point"]["test"]
    nab = (lstm.get("nab") or {}).get("skab") or {}
    ev = lstm["event"]["whole"]
    return {
        "f1": w["f1"], "far": 100 * w["far"], "mar": 100 * w["mar"],
        "f1_test": t["f1"], "far_test": 100 * t["far"], "mar_test": 100 * t["mar"],
        "nab_standard": nab.get("standard"), "nab_low_fp": nab.get("low_fp"), "nab_low_fn": nab.get("low_fn"),
        "event_precision": ev["precision"], "event_recall": ev["recall"], "event_f1": ev["f1"],
        "delay_mean_s": lstm["delay"]["mean_s"],
        "t2_f1": eq["point"]["whole"]["f1"], "t2_far": 100 * eq["point"]["whole"]["far"],
        "t2_mar": 100 * eq["point"]["whole"]["mar"],
        "duration_s": run["duration_s"],
    }


def baseline_headline(res: dict[str, Any]) -> dict[str, float | None]:
    p = res["pooled"]
    w, t = p["point"]["whole"], p["point"]["test"]
    nab = (p.get("nab") or {}).get("skab") or {}
    return {"f1": w["f1"], "far": 100 * w["far"], "mar": 100 * w["mar"], "f1_test": t["f1"],
            "far_test": 100 * t["far"], "mar_test": 100 * t["mar"], "nab_standard": nab.get("standard"),
            "event_f1": p["event"]["whole"]["f1"]}


def per_file(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, r in run["lstm"]["files"].items():
        w, ev = r["point"]["whole"], r["event"]["whole"]
        out[name] = {"f1": round(w["f1"], 4), "far": round(100 * w["far"], 2), "mar": round(100 * w["mar"], 2),
                     "events_found": f"{ev['tp']}/{ev['tp'] + ev['fn']}", "false_alert_runs": ev["fp"]}
    return out


def protocol(files: list[Any], plan: str, seeds: list[int]) -> dict[str, Any]:
    from pipeline.evaluation import evaluate, mean_std, plan_settings
    from pipeline.settings import to_dict

    settings = plan_settings(_settings(), plan)  # type: ignore[arg-type]
    t0 = time.monotonic()
    result = evaluate(files, settings, plan, seeds=seeds,  # type: ignore[arg-type]
                      progress=lambda p: print(f"  {plan} seed={p['seed']} fitted {p['files'][0]}"
                                               f"{'…' if len(p['files']) > 1 else ''} in {p['duration_s']} s "
                                               f"(epochs {p['epochs']}, best {p['best_epoch']})", file=sys.stderr))
    report = result.report
    heads = [headline(r) for r in report["runs"]]
    mean, std = mean_std(heads) or ({}, {})
    return {
        **mean, "std": std, "per_seed": {str(r["seed"]): h for r, h in zip(report["runs"], heads)},
        "baselines": {k: baseline_headline(v) for k, v in report["baselines"].items()},
        "per_file_seed0": per_file(report["runs"][0]),
        "fits_seed0": report["runs"][0]["fits"] if plan == "fleet" else len(report["runs"][0]["fits"]),
        "settings": to_dict(settings),
        "wall_time_s": time.monotonic() - t0,
        "conventions": report["conventions"],
    }


def code_state() -> dict[str, Any]:
    """Which code produced the figures: commit, uncommitted files and a digest of the core."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    digest = hashlib.sha256(b"".join((REPO / "pipeline" / f).read_bytes() for f in CORE_FILES)).hexdigest()[:16]
    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain").splitlines(),
            "core_digest": digest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.skab", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (default: 0,1,2)")
    p.add_argument("--protocols", default="leaderboard,fleet", help="leaderboard, fleet or both (default: both)")
    p.add_argument("--out", default=str(REPO / "bench" / "skab.json"), help="result file (default: bench/skab.json)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = [s.strip() for s in args.protocols.split(",") if s.strip()]
    plans = {"leaderboard": "per_file", "fleet": "fleet"}
    unknown = set(wanted) - set(plans)
    if unknown:
        p.error(f"unknown protocols {sorted(unknown)}")
    root = skab_dir()
    if not root.is_dir():
        p.error(f"SKAB data not found at {root} (set PLANTWATCH_SKAB_DIR)")
    t0 = time.monotonic()
    files = load_skab(root)
    out: dict[str, Any] = {"dataset": {"root": str(root), "files": len(files), "train_rows": TRAIN_ROWS},
                           "seeds": seeds, "code": code_state()}
    for name in wanted:
        print(f"{name}: {len(files)} files, seeds {seeds}", file=sys.stderr)
        out[name] = protocol(files, plans[name], seeds)
        keys = ("f1", "far", "mar", "f1_test", "far_test", "mar_test", "nab_standard", "t2_f1", "t2_far", "t2_mar")
        print(f"{name}: " + " ".join(f"{k}={out[name][k]:.3f}" for k in keys if out[name].get(k) is not None)
              + f" wall={out[name]['wall_time_s']:.0f}s", file=sys.stderr)
    out["wall_time_s"] = time.monotonic() - t0
    from cli.evaluate_cmd import json_safe

    Path(args.out).write_text(json.dumps(json_safe(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
