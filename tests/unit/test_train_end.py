"""``plantwatch train --end``: epoch milliseconds or ISO-8601, as its help says."""

from __future__ import annotations

import pytest

from cli.main import main
from cli.train_cmd import end_ms


def test_end_takes_epoch_milliseconds_and_iso_8601() -> None:
    assert end_ms("1700864000000") == 1_700_864_000_000  # once read as an ISO date: "month must be in 1..12"
    assert end_ms("2023-11-24T22:13:20Z") == 1_700_864_000_000
    assert end_ms("2023-11-24T23:13:20+01:00") == 1_700_864_000_000


def test_a_bad_end_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--end", "yesterday"]) == 2
    assert "plantwatch train: --end: " in capsys.readouterr().err


def test_an_end_outside_the_readings_bounds_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--end", "99999999999999999"]) == 2
    assert "outside the years 2000-2199" in capsys.readouterr().err
