"""Settings: precedence, type coercion, refusal of unknown keys and impossible values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings import SettingsError, load_settings, parse_assignments, reference_markdown


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[grid]\nperiod_s = 2.0\nallowed_lateness_s = 9\n[model]\nunits = [16, 8]\n')
    s = load_settings(f, env={"PLANTWATCH_GRID__PERIOD_S": "3"}, overrides={"grid.allowed_lateness_s": "1"})
    assert s.grid.period_s == 3.0 and s.grid.allowed_lateness_s == 1.0 and s.model.units == (16, 8)


@pytest.mark.parametrize("key,value,needle", [
    ("grid.period_s", "0", "grid.period_s"),
    ("grid.period_s", "soon", "must be a number"),
    ("model.timesteps", "1", "model.timesteps"),
    ("model.units", "32", "at least two LSTM layers"),
    ("kafka.security_protocol", "TLS", "must be one of"),
    ("kafka.heartbeat_interval_ms", "5000", "third of session_timeout_ms"),
    ("kafka.ssl_cafile", "/nonexistent/ca.pem", "file not found"),
    ("threshold.quantile", "1.5", "threshold.quantile"),
    ("grid.nonsense", "1", "unknown key"),
    ("nosuch.key", "1", "unknown section"),
    ("detector.http_port", "70000", "port"),
    ("trainer.interval_s", "inf", "finite"),
    ("trainer.interval_s", "1e12", "a year"),
    ("trainer.interval_s", "1e12", "a year"),
])
def test_bad_values_are_refused_naming_the_key(key: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={}, overrides={key: value})
    assert needle in str(err.value) and key.split(".")[0] in str(err.value)


def test_sasl_needs_mechanism_and_user() -> None:
    with pytest.raises(SettingsError, match="sasl_mechanism"):
        load_settings(env={}, overrides={"kafka.security_protocol": "SASL_SSL"})
    s = load_settings(env={"PLANTWATCH_KAFKA__SASL_PASSWORD": "pw"}, overrides={
        "kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-512", "kafka.sasl_username": "u"})
    assert s.kafka.sasl_password == "pw"


def test_toml_errors_are_clear(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[grid\nperiod_s = 1")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(f, env={})
    f.write_text("[grid]\nperiod_s = true\n")
    with pytest.raises(SettingsError, match="grid.period_s"):
        load_settings(f, env={})


def test_assignments_and_reference() -> None:
    assert parse_assignments(["grid.period_s=2"]) == {"grid.period_s": "2"}
    with pytest.raises(SettingsError):
        parse_assignments(["period_s"])
    ref = reference_markdown()
    assert "`grid.allowed_lateness_s`" in ref and "`kafka.sasl_mechanism`" in ref
