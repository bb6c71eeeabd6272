"""Shared fixtures: one small synthetic data set and one trained tiny model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import SMALL_DATA, tiny_experiment
from training.data import SequenceData
from training.synthetic import generate


@pytest.fixture(scope="session")
def small_data() -> SequenceData:
    return generate(SMALL_DATA)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    folder = tmp_path_factory.mktemp("data") / "small"
    small_data.save(folder)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    """A tiny SASRec trained for a few epochs: the checkpoint most tests start from."""
    from training.trainer import train

    run = tmp_path_factory.mktemp("runs") / "sasrec"
    train(tiny_experiment(train__epochs=4), small_data, run)
    return run
