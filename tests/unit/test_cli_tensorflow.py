"""The command line keeps TensorFlow's own log lines out of what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli.main import TF_ENVIRONMENT, quiet_tensorflow
from tests.unit.conftest import sine_frame

ROOT = Path(__file__).resolve().parents[2]
TF_NATIVE_PREFIXES = ("I0000", "W0000", "E0000", "F0000")  # absl's severity letter, then the date


def test_the_defaults_fill_only_what_the_environment_leaves_unset() -> None:
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0", "PATH": "/bin"}
    quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0", "PATH": "/bin", "TF_ENABLE_ONEDNN_OPTS": "0"}
    empty: dict[str, str] = {}
    quiet_tensorflow(empty)
    assert empty == TF_ENVIRONMENT


def test_a_fit_through_the_command_prints_no_tensorflow_line(tmp_path: Path) -> None:
    """The TF_CPP_MIN_LOG_LEVEL=2 of the Makefile alone let an oneDNN ERROR line through at the first fit."""
    data = tmp_path / "normal.csv"
    sine_frame(300, assets=("p1",)).to_csv(data, index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # what `make demo` and `make test` set
    settings = ["--set", "model.units=4,4", "--set", "model.timesteps=8", "--set", "model.epochs=1",
                "--set", "model.streams=4", "--set", "grid.period_s=1", "--log-level", "warning"]
    done = subprocess.run([sys.executable, "-m", "cli", "fit", str(data), "--asset-col", "asset", "--features", "a,b,c",
                           "--out", str(tmp_path / "bundle"), *settings],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["epochs"] == 1
    native = [line for line in done.stderr.splitlines() if line.startswith(TF_NATIVE_PREFIXES) or "oneDNN" in line]
    assert native == []


def test_the_litert_step_prints_nothing_on_stderr() -> None:
    """LiteRT announces its XNNPACK delegate on native stderr at a process's first interpreter; a
    daemon's log stream on stderr is JSON lines only, so the notice must not reach it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    script = ("import numpy as np\n"
              "from pipeline.model import StepFunction, build_inference_model\n"
              "w = [np.full(a.shape, 0.1, np.float32) for a in build_inference_model(3, (4,)).get_weights()]\n"
              "m = StepFunction(3, (4,), w)\n"
              "m(np.ones((2, 1, 3), np.float32), np.ones((2, 1), bool), m.zero_states(2))\n"
              "print(m.step_runtime)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["litert"]
    assert done.stderr == ""
