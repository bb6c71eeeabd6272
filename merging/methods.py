"""The merge methods by name, what each needs, and the settings of a merge.

Torch-free on purpose: the CLI builds its choices, defaults and help from here,
and the job's configuration validates against it, without loading a model
library. The implementations are `MERGE_METHODS` in merging/strategies.py (the
same names; merging/merge.py refuses to import when the two differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method is and reads besides the models."""

    summary: str
    needs_fishers: bool = False  # one Fisher file per model (with its Grams)
    needs_base: bool = False  # the checkpoint the models were fine-tuned from


METHODS: dict[str, MethodSpec] = {
    "uniform": MethodSpec("the (λ-weighted) mean of the parameters"),
    "greedy": MethodSpec("greedy soup: models by validation NDCG@10, each kept if it helps"),
    "fisher": MethodSpec("Fisher-weighted averaging, λ given or searched", needs_fishers=True),
    "fisher_grouped": MethodSpec("Fisher merge with one λ per parameter group", needs_fishers=True),
    "regmean": MethodSpec("RegMean for linear layers, Fisher for the rest", needs_fishers=True),
    "task_arithmetic": MethodSpec("base + s Σ λ τ over task vectors", needs_base=True),
    "ties": MethodSpec("TIES: trimmed, sign-elected task vectors", needs_base=True),
}
NEEDS_FISHERS = frozenset(name for name, spec in METHODS.items() if spec.needs_fishers)
NEEDS_BASE = frozenset(name for name, spec in METHODS.items() if spec.needs_base)


class MergeConfig(BaseModel):
    """How checkpoints are merged; the CLI and the Ray job build one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(
        "fisher",
        description="a merge method: " + ", ".join(METHODS),
    )
    coefficients: list[float] | None = Field(
        None, description="λ per model, in input order (None: uniform)"
    )
    fisher_floor: float = Field(
        1e-6,
        ge=0.0,
        description="lower bound on F: uninformed coordinates fall back to the average",
    )
    normalize_fishers: bool = Field(
        False, description="divide each model's Fisher by its mean before merging"
    )
    search: bool = Field(False, description="choose λ by validation NDCG@10 (needs data)")
    grid_points: int = Field(11, ge=2, description="search, 2 models: λ_1 on this many grid points")
    dirichlet_samples: int = Field(
        20, ge=1, description="search, 3+ models: Dirichlet(1) draws tried besides uniform"
    )
    seed: int = Field(0, description="seed of the Dirichlet draws")
    group_coefficients: dict[str, list[float]] = Field(
        default_factory=dict,
        description="fisher_grouped: λ per parameter group (items, positions, block0, ..., "
        "other); groups not named use `coefficients`",
    )
    task_scale: float = Field(
        1.0, ge=0.0, description="task_arithmetic, ties: s in θ_0 + s τ (searched with `search`)"
    )
    ties_density: float = Field(
        0.2, gt=0.0, le=1.0, description="ties: share of each task vector kept per tensor"
    )
    regmean_alpha: float = Field(
        0.9, ge=0.0, le=1.0, description="regmean: scale of the Grams' off-diagonal entries"
    )
    align: bool = Field(
        False,
        description="first permute every model's hidden units onto the first model's (weight "
        "matching, merging/alignment.py): for members trained from their own initialisations",
    )
    finetune_epochs: int = Field(
        0, ge=0, description="epochs of the plain objective after merging (0: no fine-tune)"
    )
    finetune_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted ExperimentConfig overrides for the fine-tune, e.g. {'train.lr': 1e-4}",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; known: {', '.join(METHODS)}")
        return value
