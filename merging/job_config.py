"""Configuration of the merge job (`fishrec pipeline --config configs/pipeline-*.yaml`).

The same file drives a laptop run and a run on a Ray cluster (KubeRay's RayJob
mounts it unchanged); only where Ray runs (`--address`) and where artifacts
live (`--artifacts`) differ.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from training.config import ExperimentConfig, StrictModel


class RecipeEntry(StrictModel):
    """One model of the merge pool."""

    name: str = Field(
        description="label of the model (folder name, report row); unique",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    recipe: str | None = Field(None, description="key of training.recipes.RECIPES (default: name)")
    params: dict[str, Any] = Field(default_factory=dict, description="recipe parameters")
    epochs: int | None = Field(
        None, ge=0, description="epochs for this recipe (default: recipe_epochs)"
    )
    seed: int | None = Field(
        None, description="training seed (default: the experiment's seed + position)"
    )

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.name


class ResourceSpec(StrictModel):
    """Ray resources of one task (a recipe training, a Fisher shard, an evaluation)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per task; also its torch threads")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task (0 on CPU clusters)")


class FisherSpec(StrictModel):
    estimator: str = Field(
        "exact",
        description="a Fisher estimator: exact, full, random:n, topk:n, sample:n, target, empirical",
    )
    num_sequences: int | None = Field(
        2000, ge=1, description="training sequences per recipe (None: all)"
    )
    shards: int = Field(2, ge=1, description="Ray tasks per recipe, each over a slice of the users")
    batch_size: int = Field(32, ge=1, description="sequences per vectorised gradient batch")
    seed: int = Field(0, description="seeds the subset of sequences and sampling estimators")


class MergeSpec(StrictModel):
    methods: list[Literal["uniform", "greedy", "fisher"]] = Field(
        default_factory=lambda: ["uniform", "greedy", "fisher"],
        description="merged models to build",
    )
    publish: Literal["uniform", "greedy", "fisher", "best"] = Field(
        "fisher",
        description="which model is exported; best: the best on validation NDCG@10 of all models",
    )
    fisher_floor: float = Field(
        1e-6, ge=0, description="Fisher floor: uninformed coordinates fall back to the mean"
    )
    normalize_fishers: bool = Field(
        False, description="scale each model's Fisher to unit mean first"
    )
    search_coefficients: bool = Field(False, description="choose per-model λ on validation NDCG@10")
    search_samples: int = Field(
        8, ge=1, description="grid points (2 models) or Dirichlet samples (more)"
    )
    finetune_epochs: int = Field(
        0, ge=0, description="epochs of the plain objective after merging (0: none)"
    )


class ExportSpec(StrictModel):
    quantize: bool = Field(
        False, description="also write an int8 graph (reported, never served by default)"
    )
    full_scores: bool = Field(False, description="add the all_scores output to the graph")
    parity_sequences: int = Field(256, ge=8, description="sequences of the parity check at export")


class PipelineConfig(StrictModel):
    experiment: ExperimentConfig = Field(
        default_factory=ExperimentConfig, description="data, backbone and the base model's training"
    )
    setting: Literal["finetune", "scratch"] = Field(
        "finetune",
        description="finetune: recipes continue from one shared base; scratch: each from its own init",
    )
    recipes: list[RecipeEntry] = Field(
        default_factory=lambda: [
            RecipeEntry(name=n) for n in ("plain", "cl4srec", "duorec", "ehrec")
        ],
        description="the merge pool; 'plain' means the backbone's own objective",
    )
    recipe_epochs: int = Field(
        10, ge=0, description="epochs of each recipe (fine-tune length in finetune)"
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    max_retries: int = Field(2, ge=0, description="Ray retries of a task after a crash or an error")
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    num_cpus: int | None = Field(
        None, ge=1, description="size of a local Ray instance (None: the machine's CPU quota)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        names = [entry.name for entry in self.recipes]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"recipe names must be unique; repeated: {duplicated}")
        if not names:
            raise ValueError("the merge pool needs at least one recipe")
        return self

    def recipe_of(self, entry: RecipeEntry) -> str:
        """The registry key of an entry ('plain' is the backbone's own objective)."""
        return self.experiment.model.backbone if entry.recipe_name == "plain" else entry.recipe_name
