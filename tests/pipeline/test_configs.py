"""Every shipped configuration file validates against the model that reads it.

A typo in a key of configs/*.yaml fails here (the models forbid unknown keys),
not at the start of a nightly run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merging.pipeline.config import PipelineConfig
from training.config import ExperimentConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_the_configs_folder_is_not_empty() -> None:
    assert any(p.name.startswith("pipeline-") for p in CONFIGS)
    assert any(not p.name.startswith("pipeline-") for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    model = PipelineConfig if path.name.startswith("pipeline-") else ExperimentConfig
    config = model.model_validate(raw)
    assert config.model_dump(exclude_unset=True), f"{path.name} sets nothing"


def test_a_misspelt_key_is_refused() -> None:
    raw = yaml.safe_load(CONFIGS[0].read_text()) | {"recipe_epoch": 3}
    model = PipelineConfig if CONFIGS[0].name.startswith("pipeline-") else ExperimentConfig
    with pytest.raises(ValueError, match="recipe_epoch"):
        model.model_validate(raw)
