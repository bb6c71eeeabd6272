"""Small builders shared by the tests (fixtures that use them live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import ExperimentConfig, set_dotted
from training.synthetic import SyntheticConfig

# A small synthetic catalogue: big enough to have sequential signal, small enough
# that a model trains in seconds on 2 cores.
SMALL_DATA = SyntheticConfig(
    seed=1, num_users=600, num_items=200, num_topics=10, mean_length=20, max_length=40
)


def tiny_experiment(**overrides: Any) -> ExperimentConfig:
    """A 2-layer, 32-wide model with a short schedule; dotted keys override, e.g. train__epochs=3."""
    values: dict[str, Any] = {
        "model": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_len": 20,
            "dropout": 0.1,
            "attn_dropout": 0.1,
        },
        "train": {
            "epochs": 2,
            "batch_size": 64,
            "lr": 3e-3,
            "warmup_steps": 5,
            "progress": False,
            "patience": 50,
        },
    }
    for key, value in overrides.items():
        set_dotted(values, key.replace("__", "."), value)
    return ExperimentConfig.model_validate(values)


def tiny_pipeline(**overrides: Any):  # type: ignore[no-untyped-def]
    """A merge job that runs in well under a minute on 2 cores: 3 recipes, tiny model."""
    from merging.pipeline.config import PipelineConfig

    values: dict[str, Any] = {
        "experiment": {
            "data": {
                "path": "synthetic",
                "synthetic": {"seed": 1, "overrides": SMALL_DATA.model_dump(exclude={"seed"})},
            },
            "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "max_len": 20},
            "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5, "patience": 50},
        },
        "setting": "finetune",  # most job tests look at the shared base; test_job_pool the rest
        "recipe_epochs": 1,
        "recipes": [{"name": "plain"}, {"name": "cl4srec"}, {"name": "duorec"}],
        "fisher": {"num_sequences": 60, "shards": 2},
        "export": {"parity_sequences": 32},
    }
    for key, value in overrides.items():
        set_dotted(values, key.replace("__", "."), value)
    return PipelineConfig.model_validate(values)


def train_killed_and_resumed(config: ExperimentConfig, data: Any, run: Path) -> Any:
    """Train in `run`, the process dying right after epoch 2 was saved, then `--resume`."""
    import pytest

    from training.run import train

    def killed_after_two(entry: dict) -> None:
        if entry["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, data, run, on_epoch=killed_after_two)
    return train(config, data, run, resume=True)
