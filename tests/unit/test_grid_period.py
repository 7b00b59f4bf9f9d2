"""The grid period from the data's own spacing: ``fit`` and ``train`` take it when the user has
not set ``grid.period_s``, keep the user's when set (with a warning when it is far off the
data's spacing), and a fit that fails on the spacing names ``grid.period_s`` and the spacing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli.main import main
from pipeline.bundle import load_bundle
from pipeline.evaluation import Series, data_period_s
from pipeline.settings import load_settings
from pipeline.spacing import StampSample, choose_period, median_period_s, spacing_hint, stamps_by_asset
from tests.unit.conftest import sine_frame

T0 = 1_700_000_000_000
TINY = ["--set", "model.units=4,4", "--set", "model.timesteps=8", "--set", "model.epochs=1",
        "--set", "model.streams=4", "--features", "a,b,c", "--asset-col", "asset"]


@pytest.fixture(autouse=True)
def _no_period_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANTWATCH_GRID__PERIOD_S", raising=False)


def spaced_table(path: Path, rows: int, spacing_s: float, assets: tuple[str, ...] = ("p1",)) -> Path:
    """sine_frame's readings, each asset's rows ``spacing_s`` apart (assets interleaved in time)."""
    frame = sine_frame(rows, assets=assets)
    step = frame.groupby("asset").cumcount().to_numpy()
    frame["ts"] = T0 + np.round(step * spacing_s * 1000).astype(np.int64)
    frame.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- the spacing (pure)


def test_the_spacing_is_per_asset_even_when_assets_interleave() -> None:
    # two assets 60 s apart each, stamped 1 s apart from each other: pooled row order would say 1 s / 59 s
    ts = np.array([0, 1000, 60_000, 61_000, 120_000, 121_000, 120_000])
    asset = np.array(["a", "b", "a", "b", "a", "b", "a"], dtype=object)  # a repeated stamp (long format)
    stamps = stamps_by_asset(asset, ts)
    assert [s.tolist() for s in stamps] == [[0, 60_000, 120_000], [1000, 61_000, 121_000]]
    assert median_period_s(stamps) == 60.0
    assert median_period_s([]) is None and median_period_s([np.array([5, 5])]) is None


def test_evaluate_reads_the_same_spacing() -> None:
    series = [Series("x", np.array([0, 300_000, 600_000, 1_500_000]), np.zeros((4, 1))),
              Series("y", np.array([0, 60_000]), np.zeros((2, 1)))]
    assert data_period_s(series) == median_period_s(s.ts_ms for s in series) == 300.0


def test_the_sample_keeps_each_asset_s_first_stamps_and_notices_new_assets() -> None:
    sample = StampSample(per_asset=3)
    assert sample.add(np.array(["a"] * 4, dtype=object), np.array([0, 0, 10, 20])) is True
    assert sample.full  # 'a' has its 3 distinct stamps
    assert sample.add(np.array(["a", "b"], dtype=object), np.array([30, 5])) is True
    assert not sample.full  # 'b' has one; 'a' takes no more
    assert sample.add(np.array(["b", "b", "a"], dtype=object), np.array([9, 13, 40])) is False
    assert sample.full
    assert [s.tolist() for s in sample.stamps()] == [[0, 10, 20], [5, 9, 13]]


@pytest.mark.parametrize("configured, data, explicit, serving, period, source, warns", [
    (1.0, 300.0, False, None, 300.0, "data", False),
    (1.0, None, False, None, 1.0, "settings", False),
    (120.0, 60.0, True, None, 120.0, "settings", False),       # within 2x: the user's, quietly
    (1.0, 60.0, True, None, 1.0, "settings", True),            # far off: the user's, with a warning
    (1.0, 1.004, False, 1.0, 1.0, "serving model", False),     # jitter does not change a serving period
    (1.0, 60.0, False, 1.0, 1.0, "serving model", True),
    (30.0, 60.0, True, 1.0, 30.0, "settings", False),          # set beats serving
])
def test_which_period_is_chosen(configured: float, data: float | None, explicit: bool, serving: float | None,
                                period: float, source: str, warns: bool) -> None:
    choice = choose_period(configured, data, explicit=explicit, serving_s=serving)
    assert (choice.period_s, choice.source, choice.data_period_s) == (period, source, data)
    assert (choice.warning is not None) == warns
    if warns:
        assert f"grid.period_s={data:g}" in choice.warning  # type: ignore[operator]


def test_the_hint_names_the_setting_only_when_the_spacing_is_far_off() -> None:
    assert spacing_hint(1.0, 300.0) == ("the readings are 300 s apart (median) and the grid period is 1 s: "
                                        "set grid.period_s=300")
    assert spacing_hint(60.0, 61.0) is None and spacing_hint(1.0, None) is None


# ---------------------------------------------------------------- plantwatch fit


@pytest.mark.parametrize("spacing_s, assets", [(300.0, ("p1",)), (60.0, ("p1", "p2"))])
def test_fit_takes_the_data_s_spacing_when_grid_period_is_not_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], spacing_s: float, assets: tuple[str, ...]) -> None:
    data = spaced_table(tmp_path / "data.csv", 240, spacing_s, assets)
    assert main(["fit", str(data), "--out", str(tmp_path / "bundle"), *TINY]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert (printed["period_s"], printed["period_from"]) == (spacing_s, "data")
    bundle = load_bundle(str(tmp_path / "bundle"))
    assert bundle.period_ms == spacing_s * 1000
    assert bundle.metadata["grid_period"]["source"] == "data"
    assert "grid period" in out.err and "warning" not in out.err


def test_fit_keeps_a_period_the_user_set_and_warns_when_it_is_far_off(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = spaced_table(tmp_path / "data.csv", 240, 60.0)
    assert main(["fit", str(data), "--out", str(tmp_path / "b1"), *TINY, "--set", "grid.period_s=150"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["period_from"] == "settings"
    assert load_bundle(str(tmp_path / "b1")).period_ms == 150_000
    assert "set grid.period_s=60 to fit the data's spacing" in out.err

    config = tmp_path / "pw.toml"
    config.write_text("[grid]\nperiod_s = 90\n", encoding="utf-8")
    assert main(["fit", str(data), "--out", str(tmp_path / "b2"), *TINY, "--config", str(config)]) == 0
    assert load_bundle(str(tmp_path / "b2")).period_ms == 90_000
    assert "fit the data's spacing" not in capsys.readouterr().err  # 1.5x: no warning


def test_a_fit_failing_on_the_spacing_names_grid_period_and_the_spacing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = spaced_table(tmp_path / "data.csv", 240, 300.0)
    monkeypatch.setenv("PLANTWATCH_GRID__PERIOD_S", "1")  # set in the environment: the user's choice
    assert main(["fit", str(data), "--out", str(tmp_path / "bundle"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "consecutive normal steps" in err
    assert "the readings are 300 s apart (median) and the grid period is 1 s: set grid.period_s=300" in err
    assert not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------- the training job


def wide_archive(root: Path, rows: int, spacing_s: float, end_ms: int) -> None:
    """A wide Parquet archive (asset, ts_ms, a, b, c) of two assets, rows ``spacing_s`` apart, ending at ``end_ms``."""
    frame = sine_frame(rows, assets=("p1", "p2"))
    step = frame.groupby("asset").cumcount().to_numpy()
    frame["ts_ms"] = end_ms - rows * round(spacing_s * 1000) + step * round(spacing_s * 1000)
    root.mkdir(parents=True)
    frame.drop(columns="ts").to_parquet(root / "part-0.parquet", index=False)


def train_settings(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"model.features": "a,b,c", "model.units": "4,4", "model.timesteps": "8", "model.epochs": "1",
            "model.streams": "4", "trainer.lookback_hours": "48", "trainer.holdout_hours": "0",
            "trainer.min_rows": "100", "registry.uri": str(tmp_path / "reg"), "archive.uri": str(tmp_path / "archive"),
            **extra}


def test_train_takes_the_archive_s_spacing_for_a_first_model(tmp_path: Path) -> None:
    from pipeline.registry import load_version
    from trainers.train import run_training

    now = T0 + 10 * 86_400_000
    wide_archive(tmp_path / "archive", 300, 300.0, now)  # 25 h of 5-minute readings
    outcome = run_training(load_settings(env={}, overrides=train_settings(tmp_path)), now, period_from_data=True)
    assert outcome.published
    bundle = load_version(str(tmp_path / "reg"), outcome.version)
    assert bundle.period_ms == 300_000
    assert bundle.metadata["grid_period"] == {"period_s": 300.0, "source": "data", "data_period_s": 300.0,
                                              "reason": "grid.period_s is not set: the median spacing of each "
                                                        "asset's readings"}


def test_train_with_a_period_far_off_the_spacing_fails_naming_grid_period(tmp_path: Path) -> None:
    from pipeline.fit import FitError
    from pipeline.registry import current_version
    from trainers.train import run_training

    now = T0 + 10 * 86_400_000
    wide_archive(tmp_path / "archive", 300, 300.0, now)
    settings = load_settings(env={}, overrides=train_settings(tmp_path, **{"grid.period_s": "1"}))
    with pytest.raises(FitError, match=r"consecutive normal steps.*300 s apart .* set grid\.period_s=300"):
        run_training(settings, now)
    assert current_version(str(tmp_path / "reg")) is None


def test_the_sample_of_a_long_archive_stops_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainers.train as train_module
    from trainers.train import Exclusions, Span, sample_data_period_s

    now = T0 + 30 * 86_400_000
    wide_archive(tmp_path / "archive", 5000, 60.0, now)  # 2 assets x 5000 readings x 3 features
    settings = load_settings(env={}, overrides=train_settings(tmp_path))
    span = Span(now - 5000 * 60_000, now)
    assert sample_data_period_s(settings, span, Exclusions([])) == 60.0

    read: list[int] = []
    scan = train_module.scan_archive

    def small_batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in scan(*args, batch_rows=300, **kwargs):
            read.append(len(batch))
            yield batch

    monkeypatch.setattr(train_module, "scan_archive", small_batches)
    assert sample_data_period_s(settings, span, Exclusions([]), per_asset=16) == 60.0
    assert 0 < sum(read) <= 3 * 300  # full after the first batches, not the 30,000 values of the archive

    # excluded periods are left out of the sample: here, all of it
    everything = Exclusions([(a, span.start_ms, span.end_ms) for a in ("p1", "p2")])
    assert sample_data_period_s(settings, span, everything) is None
