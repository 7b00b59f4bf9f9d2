"""The ``plantwatch`` command line: settings options in any position, --version, exit codes, closed pipes."""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main as cli_main
from cli import schedule_cmd, train_cmd
from cli.main import EXIT_CLOSED_PIPE, main, parse_args
from pipeline.bundle import ModelBundle, save_bundle
from pipeline.registry import current_version
from trainers.schedule import RunLock, RunResult

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRACEBACK = ("Traceback", "Exception ignored", "Error in sys.excepthook")


def _env(unbuffered: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cli", *argv]


# ---------------------------------------------------------------- closed pipes


def test_a_reader_that_closes_after_one_line_ends_plantwatch_config_quietly() -> None:
    read_fd, write_fd = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # a one-page pipe: the reference (10 kB) cannot fit before the reader leaves
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(_cli("config", "--reference"), stdout=write_fd, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env())
    os.close(write_fd)
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        first = bytearray()
        while not first.endswith(b"\n"):
            first += reader.read(1)
    _, stderr = proc.communicate(timeout=60)
    assert first.startswith(b"| key |")
    assert not any(marker in stderr for marker in TRACEBACK), stderr
    assert proc.returncode == (EXIT_CLOSED_PIPE if hasattr(fcntl, "F_SETPIPE_SZ") else proc.returncode)


def _into_closed_pipe(argv: list[str], *, unbuffered: bool = False, timeout: float = 60,
                      sigint_ignored: bool = False) -> subprocess.CompletedProcess:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader is gone before the first write
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    try:
        return subprocess.run(argv, stdout=write_fd, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=_env(unbuffered), timeout=timeout, check=False, preexec_fn=ignore)
    finally:
        os.close(write_fd)


@pytest.mark.parametrize(("argv", "unbuffered"), [
    (["config"], False), (["config"], True),  # the error comes from the flush at the end, or from print()
    (["models", "list", "--registry", "{tmp}"], False),
    (["--help"], False), (["train", "--help"], True),  # argparse drops an unbuffered write's error itself
    (["--version"], False),
], ids=lambda v: " ".join(v) if isinstance(v, list) else ("unbuffered" if v else "buffered"))
def test_every_output_path_ends_quietly_with_141_on_a_closed_stdout(argv: list[str], unbuffered: bool,
                                                                       tmp_path: Path) -> None:
    done = _into_closed_pipe(_cli(*(a.replace("{tmp}", str(tmp_path / "registry")) for a in argv)),
                             unbuffered=unbuffered)
    assert not any(marker in done.stderr for marker in TRACEBACK), done.stderr
    assert done.returncode == EXIT_CLOSED_PIPE


# A command whose output comes from a thread, as the demo's alerts do; {wait} is how its main thread waits.
_THREADED = """
import sys, threading, time
import cli.config_cmd
from cli.main import main

def run(args, settings):
    stop = None
    if "{wait}" == "stop handler":
        from consumers.signals import stop_on_signals
        stop = stop_on_signals()
    def printer():
        while True:
            print("x" * 100, flush=True)
    threading.Thread(target=printer, name="printer", daemon=True).start()
    if stop is not None:
        stop.wait(60)
        print("stopped", file=sys.stderr)
        print("summary")
    else:
        time.sleep(60)
    return 0

cli.config_cmd.run = run
sys.exit(main(["config"]))
"""


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["", "started with SIGINT ignored"])
@pytest.mark.parametrize("wait", ["stop handler", "sleep"])
def test_a_thread_writing_to_a_closed_stdout_stops_the_command_quietly(wait: str, sigint_ignored: bool) -> None:
    done = _into_closed_pipe([sys.executable, "-c", _THREADED.replace("{wait}", wait)], timeout=30,
                             sigint_ignored=sigint_ignored)
    assert not any(marker in done.stderr for marker in TRACEBACK), done.stderr
    assert done.returncode == EXIT_CLOSED_PIPE
    if wait == "stop handler":
        assert "stopped" in done.stderr  # stopped through the daemon's own SIGINT handling


def test_a_broken_pipe_elsewhere_is_still_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket's EPIPE (a broker connection) is not a closed stdout: it must not vanish silently."""
    def run(args: argparse.Namespace, settings: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("cli.config_cmd.run", run)
    with pytest.raises(BrokenPipeError):
        main(["config"])


# ---------------------------------------------------------------- settings options in any position


@pytest.mark.parametrize("argv", [
    ["--config", "pw.toml", "models", "publish", "DIR"],
    ["models", "--config", "pw.toml", "publish", "DIR"],
    ["models", "publish", "DIR", "--config", "pw.toml"],
    ["models", "publish", "--config", "pw.toml", "DIR"],
])
def test_config_works_before_between_and_after_nested_subcommands(argv: list[str]) -> None:
    args = parse_args(argv)
    assert (args.command, args.action, args.bundle, args.config) == ("models", "publish", "DIR", "pw.toml")


@pytest.mark.parametrize("command", [["config"], ["train"], ["schedule", "--now"], ["detect"], ["archive"],
                                     ["fit", "data.csv", "--out", "o"], ["replay", "data.csv", "--model", "m"],
                                     ["models", "list"], ["models", "rollback", "--to", "v1"]], ids=" ".join)
def test_settings_options_before_or_after_any_command(command: list[str]) -> None:
    options = ["--config", "pw.toml", "--set", "a.b=1", "--set", "c.d=2", "--log-level", "debug",
               "--log-format", "json"]
    before, after = parse_args([*options, *command]), parse_args([*command, *options])
    for args in (before, after):
        assert (args.config, args.assignments, args.log_level, args.log_format) == \
            ("pw.toml", ["a.b=1", "c.d=2"], "debug", "json")
    assert vars(before) == vars(after)


# the least each command needs to parse; a command added to COMMANDS without an entry here fails below
MINIMAL_ARGV: dict[str, list[list[str]]] = {
    "config": [[]], "fit": [["data.csv", "--out", "o"]], "replay": [["data.csv", "--model", "m"]], "broker": [[]],
    "detect": [[], ["--live"]], "evaluate": [["a.csv"]], "archive": [[]], "demo": [["--seconds", "5"]],
    "models": [["list"], ["show", "v1"], ["promote", "v1"], ["rollback"], ["unpin"], ["publish", "DIR"]],
    "train": [[]], "schedule": [[]], "simulate": [[]],
    "report": [["--asset", "p1", "--from", "0", "--to", "1", "--out", "o"], ["--alert", "abc123", "--out", "o"]],
    "alerts": [["list"], ["list", "--open", "--asset", "p1"], ["accept", "abc123", "--note", "new valve"]],
}


def test_every_command_takes_the_settings_options_before_and_after_it() -> None:
    assert set(MINIMAL_ARGV) == set(cli_main.COMMANDS)
    options = ["--config", "pw.toml", "--log-level", "error", "--set", "a.b=1"]
    for name, variants in MINIMAL_ARGV.items():
        for rest in variants:
            before, after = parse_args([*options, name, *rest]), parse_args([name, *rest, *options])
            assert (after.config, after.log_level, after.assignments) == ("pw.toml", "error", ["a.b=1"]), name
            assert vars(before) == vars(after), (name, rest)


def test_models_publish_with_the_config_after_it_publishes_to_that_registry(
        tmp_path: Path, tiny_bundle: ModelBundle, capsys: pytest.CaptureFixture[str]) -> None:
    """``plantwatch models publish DIR --config pw.toml``: once "unrecognized arguments"."""
    bundle_dir = tmp_path / "bundle"
    save_bundle(tiny_bundle, str(bundle_dir))
    registry = tmp_path / "registry"
    config = tmp_path / "pw.toml"
    config.write_text(f'[registry]\nuri = "{registry}"\n', encoding="utf-8")
    assert main(["models", "publish", str(bundle_dir), "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"published {tiny_bundle.version}")
    assert current_version(str(registry)) == tiny_bundle.version


def test_detect_live_needs_a_terminal_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["detect"]).live is False and parse_args(["detect", "--live"]).live is True
    # stdout is captured here, so not a terminal: refused before any broker or model is waited for
    assert main(["detect", "--live", "--set", "kafka.bootstrap_servers=127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == "plantwatch detect: --live needs a terminal on stdout\n"


def test_without_settings_options_the_defaults_are_there() -> None:
    args = parse_args(["models", "list"])
    assert (args.config, args.assignments, args.log_level, args.log_format) == (None, [], None, None)
    assert not [k for k in vars(args) if k.startswith("_assignments_")]


def test_set_gathers_every_position_in_order_and_the_innermost_config_wins() -> None:
    args = parse_args(["--set", "a.b=1", "--config", "outer.toml", "models", "--set", "a.b=2", "list",
                       "--set", "a.b=3", "--config", "inner.toml"])
    assert args.assignments == ["a.b=1", "a.b=2", "a.b=3"] and args.config == "inner.toml"


def test_config_file_given_after_the_command_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pw.toml"
    config.write_text("[registry]\nkeep = 4\n", encoding="utf-8")
    for argv in (["config", "--config", str(config)], ["--config", str(config), "config"]):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["registry"]["keep"] == 4
    assert main(["--config", str(config), "config", "--set", "registry.keep=7"]) == 0
    assert json.loads(capsys.readouterr().out)["registry"]["keep"] == 7


def test_the_scheduler_forwards_settings_options_given_anywhere() -> None:
    args = parse_args(["--config", "pw.toml", "--set", "a.b=1", "schedule", "--set", "c.d=2", "--log-level", "info"])
    assert schedule_cmd._forwarded(args) == ["--config", "pw.toml", "--set", "a.b=1", "--set", "c.d=2",
                                             "--log-level", "info"]


def test_help_of_a_nested_command_lists_the_settings_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["models", "publish", "--help"])
    assert exit_.value.code == 0
    assert "--config FILE" in capsys.readouterr().out


# ---------------------------------------------------------------- --version


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"plantwatch {importlib.metadata.version('plantwatch')}\n"


def test_version_from_the_installed_command() -> None:
    done = subprocess.run(_cli("--version"), capture_output=True, text=True, cwd=ROOT, env=_env(), check=False)
    assert (done.returncode, done.stdout.split()) == (0, ["plantwatch", importlib.metadata.version("plantwatch")])


# ---------------------------------------------------------------- exit codes


def test_train_exit_codes_are_distinct_and_in_its_help() -> None:
    codes = train_cmd.EXIT_CODES
    assert sorted(codes) == sorted({0, 1, 2, 3, train_cmd.EXIT_BUSY})
    assert {status for status, _ in codes.values()} == {"published", "refused", "busy", "failed", "usage"}
    assert len({cli_main.EXIT_USAGE, cli_main.EXIT_INTERRUPTED, cli_main.EXIT_CLOSED_PIPE, *codes}) == len(codes) + 2
    help_text = _subcommand_help("train")
    for code, (status, _) in codes.items():
        assert f"  {code:<5}  {status} " in help_text


def test_schedule_help_states_its_own_and_each_runs_exit_codes() -> None:
    help_text = _subcommand_help("schedule")
    assert "0 stopped by SIGTERM or SIGINT, 2 bad arguments or settings" in help_text
    for code, outcome in ((0, "published"), (3, "refused"), (train_cmd.EXIT_BUSY, "skipped"), (1, "failed")):
        assert f"  {code:<5}  {outcome} " in help_text


def _subcommand_help(name: str) -> str:
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name].format_help()


def test_train_exits_busy_when_another_run_holds_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = RunLock(str(tmp_path / "train.lock"), 3600)
    lock.acquire()  # held by this (living) process
    try:
        code = main(["train", "--set", f"trainer.lock_path={lock.path}", "--set", f"archive.uri={tmp_path / 'a'}",
                     "--set", f"registry.uri={tmp_path / 'r'}"])
    finally:
        lock.release()
    assert code == train_cmd.EXIT_BUSY == 75
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "busy"


@pytest.mark.parametrize(("code", "stdout", "expected"), [
    (75, '{"status": "busy", "error": "held by pid 1"}', RunResult("skipped", {"reason": "held by pid 1"})),
    (75, "", RunResult("skipped", {"reason": "another training run holds the lock"})),
    (3, '{"status": "refused", "version": "v2", "reason": "worse"}',
     RunResult("refused", {"version": "v2", "reason": "worse"})),
    (1, '{"status": "failed", "error": "boom"}', RunResult("failed", {"error": "boom"})),
    (1, "", RunResult("failed", {"error": "exit status 1"})),
])
def test_the_scheduler_reads_a_runs_exit_status(code: int, stdout: str, expected: RunResult) -> None:
    child = [sys.executable, "-c", f"import sys; print({stdout!r}); sys.exit({code})"]
    assert schedule_cmd.run_child(child) == expected


def test_readme_exit_status_table_matches_the_code() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split("### Exit status", 1)[1].split("\n#", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    for code, (status, _) in train_cmd.EXIT_CODES.items():
        assert str(code) in rows and status in rows[str(code)], (code, status)
    for code in (cli_main.EXIT_INTERRUPTED, cli_main.EXIT_CLOSED_PIPE):
        assert str(code) in rows
