"""Small builders shared by the tests (fixtures that use them live in conftest.py)."""

from __future__ import annotations

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
