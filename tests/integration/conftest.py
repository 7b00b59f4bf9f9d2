"""Integration fixtures: one model fitted on the simulated plant, shared by the session."""

from __future__ import annotations

import pytest

from .plant import FittedPlant, fit_plant_model


@pytest.fixture(scope="session")
def fitted_plant(tmp_path_factory: pytest.TempPathFactory) -> FittedPlant:
    return fit_plant_model(str(tmp_path_factory.mktemp("plant-model") / "bundle"))
