"""`plantwatch schedule` owns its training run: killed with SIGKILL, it takes the run with it
(Linux PR_SET_PDEATHSIG), and the next run takes the lock over at once.

The run is a real ``plantwatch train`` child. Its labels file (``trainer.labels_uri``) is a
named pipe nobody writes, so once it holds the lock it waits in that read for as long as the
test needs: a training run that is still going, without the cost of training a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainers.schedule import RunLock, _alive

REPO = Path(__file__).resolve().parents[2]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_scheduler_killed_with_sigkill_takes_its_training_run_with_it(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    os.mkfifo(labels)
    lock_path = tmp_path / "trainer.lock"
    settings = {"trainer.lock_path": lock_path, "trainer.labels_uri": labels, "archive.uri": tmp_path / "archive",
                "registry.uri": tmp_path / "registry", "kafka.bootstrap_servers": ""}
    cmd = [sys.executable, "-m", "cli", "schedule", "--now", "--log-format", "json",
           *[x for k, v in settings.items() for x in ("--set", f"{k}={v}")]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    log = (tmp_path / "schedule.log").open("wb")
    scheduler = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    child: int | None = None
    try:
        deadline = time.monotonic() + 90  # the child imports TensorFlow before it takes the lock
        while child is None:
            assert scheduler.poll() is None, (tmp_path / "schedule.log").read_text()
            assert time.monotonic() < deadline, "the training run never took the lock"
            try:
                holder = json.loads(lock_path.read_text())
            except (OSError, ValueError):
                time.sleep(0.1)
                continue
            if _ppid(holder["pid"]) == scheduler.pid:
                child = int(holder["pid"])
        assert child != scheduler.pid and holder["heartbeat_at"] and holder["token"]
        time.sleep(0.5)
        assert _alive(child)  # waiting in its read: a run in progress

        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait(10)
        killed = time.monotonic()
        while _alive(child):
            assert time.monotonic() - killed < 5, "the training run outlived its scheduler"
            time.sleep(0.02)
        gone_s = time.monotonic() - killed
        print(f"training run gone {gone_s * 1000:.0f} ms after the scheduler's SIGKILL")

        # The lock names a process that is gone from this host: the next run takes it at once.
        successor = RunLock(str(lock_path), 43200.0, lease_s=120.0, heartbeat_s=0)
        successor.acquire()
        assert json.loads(lock_path.read_text())["token"] == successor.token
        successor.release()
    finally:
        log.close()
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait(10)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
