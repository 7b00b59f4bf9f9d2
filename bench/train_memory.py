"""Training from a Parquet archive in bounded memory: wall time and peak RSS of ``fit_stream``
over a simulated plant's archive at two sizes (N readings and N/4), each fitted in a fresh
process so one size's peak cannot hide the other's.

    python -m bench.train_memory [--readings 5000000] [--assets 50] [--set model.epochs=2] ...
    python -m bench.train_memory --sources [--readings 1000000] [--repeats 2]

The archive is written by the archiver's own writer (long format, ``date=`` partitions),
from the plant simulator: one reading = one (asset, step) with every feature. The epoch
count is fixed (``model.epochs``, 2 unless set) so the run takes minutes; memory does not
depend on it. Prints one JSON object; on a shared machine trust the ratios, not the times.

``--sources`` compares where the readings come from instead: the same readings fitted from the
Parquet archive (scan, decode, fit) and from in-memory batches (fit only), each in a fresh
process, interleaved over ``--repeats`` rounds; ``train_archive_over_memory_ratio`` is the
median over rounds of (readings/s from the archive) ÷ (readings/s from memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import load_settings
from pipeline.simulate import PlantConfig, PlantSimulator

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PERIOD_MS = 1000
SLICE_STEPS = 2000  # steps of every asset per archive file
DEFAULT_SETS = ("model.epochs=2",)


def write_archive(root: str, n_assets: int, steps: int, features: tuple[str, ...]) -> dict[str, Any]:
    """A plant's normal history as the archiver writes it; returns what was written."""
    from consumers.archiver import ArchiveWriter, Rows

    sim = PlantSimulator(PlantConfig(n_assets=n_assets, features=features, period_ms=PERIOD_MS, seed=11))
    writer = ArchiveWriter(root, features)
    f = len(features)
    t0, offset, files = time.monotonic(), 0, 0
    for a in range(0, steps, SLICE_STEPS):
        frame = sim.history(START_MS + a * PERIOD_MS, min(SLICE_STEPS, steps - a))
        n = len(frame)
        rows = Rows(np.repeat(frame["asset"].to_numpy(object), f), np.repeat(frame["ts_ms"].to_numpy(np.int64), f),
                    np.tile(np.arange(f, dtype=np.int32), n), frame[list(features)].to_numpy(np.float64).ravel(),
                    np.repeat(offset + np.arange(n, dtype=np.int64), f))
        files += len(writer.write(0, rows))
        offset += n
    size = sum(p.stat().st_size for p in Path(root).rglob("*.parquet"))
    return {"readings": offset, "values": offset * f, "files": files, "archive_mb": round(size / 2**20, 1),
            "write_s": round(time.monotonic() - t0, 1)}


def train(root: str, steps: int, sets: list[str]) -> dict[str, Any]:
    """Fit from the archive in this process; peak RSS is this process's high-water mark."""
    settings = load_settings(env={}, overrides=dict(s.split("=", 1) for s in sets))
    from pipeline.fit import fit_stream
    from trainers.archive_scan import ScanStats, scan_archive

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Python + TensorFlow loaded
    stats = ScanStats()
    end_ms = START_MS + steps * PERIOD_MS
    t0 = time.monotonic()
    bundle, report = fit_stream(lambda: scan_archive(root, settings.model.features, start_ms=START_MS, end_ms=end_ms,
                                                     stats=stats), settings)
    wall = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = bundle.metadata
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(baseline, 1), "values_scanned": stats.rows, "readings": report.rows,
            "grid_steps": m["grid_steps"], "runs": report.runs, "epochs": report.epochs,
            "train_loss": m["train_loss"], "val_loss": m["val_loss"]}


def history_batches(n_assets: int, steps: int, features: tuple[str, ...]) -> list[Any]:
    """The readings :func:`write_archive` writes, as in-memory batches of the same slices."""
    from pipeline.tables import frame_to_batch

    sim = PlantSimulator(PlantConfig(n_assets=n_assets, features=features, period_ms=PERIOD_MS, seed=11))
    return [frame_to_batch(sim.history(START_MS + a * PERIOD_MS, min(SLICE_STEPS, steps - a)), features,
                           ts_col="ts_ms", asset_col="asset") for a in range(0, steps, SLICE_STEPS)]


def train_from_memory(n_assets: int, steps: int, sets: list[str]) -> dict[str, Any]:
    """Fit the archive's readings from memory in this process (building them is not timed)."""
    settings = load_settings(env={}, overrides=dict(s.split("=", 1) for s in sets))
    from pipeline.fit import fit_stream

    batches = history_batches(n_assets, steps, settings.model.features)
    t0 = time.monotonic()
    _, report = fit_stream(lambda: iter(batches), settings)
    return {"wall_s": round(time.monotonic() - t0, 2), "readings": report.rows, "epochs": report.epochs}


def compare_sources(readings: int, n_assets: int, sets: list[str], repeats: int, workdir: str) -> dict[str, Any]:
    """Readings/s of fitting from the archive against from memory, fresh processes, interleaved."""
    steps = readings // n_assets
    root = tempfile.mkdtemp(prefix=f"archive-{readings}-", dir=workdir)
    walls: dict[str, list[float]] = {"archive": [], "memory": []}
    ratios = []
    try:
        features = load_settings(env={}, overrides=dict(s.split("=", 1) for s in sets)).model.features
        written = write_archive(root, n_assets, steps, features)
        for r in range(repeats):
            got = {}
            for source in (("archive", "memory") if r % 2 == 0 else ("memory", "archive")):
                cmd = [sys.executable, "-m", "bench.train_memory", "--steps", str(steps), "--assets", str(n_assets)]
                cmd += ["--train", root] if source == "archive" else ["--train-memory"]
                cmd += [a for s in sets for a in ("--set", s)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                got[source] = json.loads(out.stdout.strip().splitlines()[-1])
                walls[source].append(got[source]["wall_s"])
            if got["archive"]["readings"] != got["memory"]["readings"]:
                raise RuntimeError(f"the sources differ: {got}")
            ratios.append(got["memory"]["wall_s"] / got["archive"]["wall_s"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"train_archive_over_memory_ratio": round(float(np.median(ratios)), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "archive_wall_s": walls["archive"], "memory_wall_s": walls["memory"],
            "readings": written["readings"], "assets": n_assets, "settings": sets}


def measure(readings: int, n_assets: int, sets: list[str], workdir: str) -> dict[str, Any]:
    """Write an archive of ``readings`` readings and fit it in a fresh interpreter."""
    steps = readings // n_assets
    root = tempfile.mkdtemp(prefix=f"archive-{readings}-", dir=workdir)
    try:
        features = load_settings(env={}, overrides=dict(s.split("=", 1) for s in sets)).model.features
        written = write_archive(root, n_assets, steps, features)
        cmd = [sys.executable, "-m", "bench.train_memory", "--train", root, "--steps", str(steps)]
        cmd += [a for s in sets for a in ("--set", s)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return {**written, **json.loads(out.stdout.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=5_000_000, help="readings of the large archive (small: 1/4)")
    ap.add_argument("--assets", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"settings override (repeatable; default {' '.join(DEFAULT_SETS)})")
    ap.add_argument("--workdir", default=None, help="where the archives are written (default: the temp dir)")
    ap.add_argument("--sources", action="store_true",
                    help="compare fitting from the archive with fitting the same readings from memory")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of --sources")
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--train-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sets = [*DEFAULT_SETS, *args.set]
    if any("=" not in s for s in sets):
        raise SystemExit("--set takes KEY=VALUE")
    if args.train:
        print(json.dumps(train(args.train, args.steps, sets)))
        return
    if args.train_memory:
        print(json.dumps(train_from_memory(args.assets, args.steps, sets)))
        return
    if args.sources:
        print(json.dumps(compare_sources(args.readings, args.assets, sets, args.repeats,
                                         args.workdir or tempfile.gettempdir())))
        return
    small, large = (measure(n, args.assets, sets, args.workdir or tempfile.gettempdir())
                    for n in (args.readings // 4, args.readings))
    print(json.dumps({
        "note": f"fit_stream over a Parquet archive, {args.assets} assets, settings {' '.join(sets)} "
                "(fixed epochs so the run takes minutes; memory does not depend on them); "
                "each size fitted in a fresh process; peak_rss = ru_maxrss",
        "small": small, "large": large,
        "readings_ratio": round(large["readings"] / small["readings"], 2),
        "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "peak_rss_above_imports_ratio": round((large["peak_rss_mb"] - large["rss_after_imports_mb"])
                                              / (small["peak_rss_mb"] - small["rss_after_imports_mb"]), 3),
        "wall_ratio": round(large["wall_s"] / small["wall_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
