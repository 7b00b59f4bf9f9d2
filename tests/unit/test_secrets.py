"""Secrets: ``*_file`` settings read the secret from a file, and no secret value ever shows in
repr/str, ``to_dict``, ``plantwatch config`` or a settings error, however it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import Settings, SettingsError, load_settings, to_dict

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Zq9-very-secret-pw"  # noqa: S105 - a test value
SASL = {"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-512",
        "kafka.sasl_username": "plantwatch"}


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "sasl-password"
    path.write_text(PASSWORD + "\n")
    return path


def shown(settings: Settings) -> list[str]:
    """Every way the settings get printed or logged."""
    return [repr(settings), str(settings), repr(settings.kafka), str(settings.kafka), f"{settings}",
            json.dumps(to_dict(settings))]


def given(how: str, tmp_path: Path, password_file: Path) -> Settings:
    if how == "override":
        return load_settings(env={}, overrides={**SASL, "kafka.sasl_password": PASSWORD})
    if how == "env":
        return load_settings(env={"PLANTWATCH_KAFKA__SASL_PASSWORD": PASSWORD}, overrides=SASL)
    if how == "toml":
        f = tmp_path / "p.toml"
        f.write_text(f'[kafka]\nsasl_password = "{PASSWORD}"\n')
        return load_settings(f, env={}, overrides=SASL)
    return load_settings(env={"PLANTWATCH_KAFKA__SASL_PASSWORD_FILE": str(password_file)}, overrides=SASL)


@pytest.mark.parametrize("how", ["override", "env", "toml", "file"])
def test_the_password_never_shows_however_it_is_given(how: str, tmp_path: Path, password_file: Path) -> None:
    s = given(how, tmp_path, password_file)
    assert s.kafka.sasl_secret() == PASSWORD
    for text in shown(s):
        assert PASSWORD not in text
    kafka = to_dict(s)["kafka"]
    if how == "file":
        assert kafka["sasl_password"] == "" and kafka["sasl_password_file"] == str(password_file)
    else:
        assert kafka["sasl_password"] == "***"
    assert to_dict(s, redact=False)["kafka"]["sasl_password"] == ("" if how == "file" else PASSWORD)


def test_the_file_loses_its_trailing_line_break_only(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    for content, expected in (("pw\n", "pw"), ("pw\r\n", "pw"), ("p w ", "p w "), ("pw", "pw")):
        f.write_text(content, newline="")
        assert load_settings(env={}, overrides={"kafka.sasl_password_file": str(f)}).kafka.sasl_secret() == expected


def test_file_problems_are_refused_at_load_naming_the_key_not_the_content(tmp_path: Path, password_file: Path) -> None:
    with pytest.raises(SettingsError, match="kafka.sasl_password_file.*cannot read"):
        load_settings(env={}, overrides={"kafka.sasl_password_file": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        load_settings(env={}, overrides={"kafka.sasl_password_file": str(empty)})
    with pytest.raises(SettingsError, match="not both") as err:
        load_settings(env={}, overrides={"kafka.sasl_password_file": str(password_file),
                                         "kafka.sasl_password": PASSWORD})
    assert PASSWORD not in str(err.value)


def test_a_wrongly_typed_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[kafka]\nsasl_password = 918273645\n")
    with pytest.raises(SettingsError, match="kafka.sasl_password.*value not shown") as err:
        load_settings(f, env={})
    assert "918273645" not in str(err.value)


def plantwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["set", "env", "toml", "file"])
def test_plantwatch_config_never_prints_the_password(how: str, tmp_path: Path, password_file: Path) -> None:
    args = [f"--set={k}={v}" for k, v in SASL.items()]
    env: dict[str, str] = {}
    if how == "set":
        args.append(f"--set=kafka.sasl_password={PASSWORD}")
    elif how == "env":
        env["PLANTWATCH_KAFKA__SASL_PASSWORD"] = PASSWORD
    elif how == "toml":
        f = tmp_path / "p.toml"
        f.write_text(f'[kafka]\nsasl_password = "{PASSWORD}"\n')
        args += ["--config", str(f)]
    else:
        env["PLANTWATCH_KAFKA__SASL_PASSWORD_FILE"] = str(password_file)
    done = plantwatch("config", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout and PASSWORD not in done.stderr
    kafka = json.loads(done.stdout)["kafka"]
    assert kafka["sasl_password"] == ("" if how == "file" else "***")
    assert kafka["sasl_username"] == "plantwatch"


def test_plantwatch_config_errors_do_not_print_the_password(tmp_path: Path, password_file: Path) -> None:
    done = plantwatch("config", f"--set=kafka.sasl_password={PASSWORD}",
                      f"--set=kafka.sasl_password_file={password_file}")
    assert done.returncode == 2 and "not both" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
