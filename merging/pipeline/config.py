"""Configuration of the merge job (`fishrec pipeline --config configs/pipeline-*.yaml`).

The same file drives a laptop run and a run on a Ray cluster (KubeRay's RayJob
mounts it unchanged); only where Ray runs (`--address`) and where artifacts
live (`--artifacts`) differ.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from merging.fisher import FisherConfig
from merging.methods import METHODS, NEEDS_BASE, MergeConfig
from merging.pipeline.tracking import TrackingSpec
from serving.bundle import RETRIEVAL_MIN_ITEMS
from serving.settings import check_run_id
from training.config import ExperimentConfig, StrictModel
from training.pool import POOL_STRATEGIES, PoolConfig, PoolSettings, PoolStrategy


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
    lr: float | None = Field(
        None, gt=0, description="learning rate for this recipe (default: recipe_lr)"
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


class JobFisherConfig(FisherConfig):
    """How the job estimates each recipe's Fisher: the `fishrec fisher` settings plus sharding."""

    num_sequences: int | None = Field(
        2000, ge=1, description="seeded subset of training sequences per recipe (None: all)"
    )
    shards: int = Field(2, ge=1, description="Ray tasks per recipe, each over a slice of the users")

    def operation(self) -> FisherConfig:
        """The settings of one Fisher computation (what `fishrec fisher` takes)."""
        return FisherConfig(**self.model_dump(exclude={"shards"}))


class JobMergeConfig(MergeConfig):
    """Which merges the job builds and publishes, and the `fishrec merge` settings they share."""

    # Set per merge by `operation`; not written back when the config is saved.
    method: str = Field("fisher", exclude=True, description="not a job field: see `methods`")
    methods: list[str] = Field(
        default_factory=lambda: ["uniform", "greedy", "fisher"],
        description="merged models to build (keys of METHODS)",
    )
    finetune_epochs: int = Field(
        1,
        ge=0,
        description="epochs of the plain objective after each merge, as the thesis (0: none); "
        "the merged start is validated first and kept unless an epoch beats it",
    )
    publish: str = Field(
        "fisher",
        description="which model is exported: one of `methods`, or best (the best on validation "
        "NDCG@10 of all models, recipes included)",
    )

    @model_validator(mode="after")
    def _methods(self) -> JobMergeConfig:
        if "method" in self.model_fields_set:
            raise ValueError("the job builds every merge in `methods`; `method` is not a job field")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown merge methods {unknown}; known: {', '.join(METHODS)}")
        if self.publish != "best" and self.publish not in self.methods:
            raise ValueError(
                f"publish {self.publish!r} is neither 'best' nor one of {self.methods}"
            )
        return self

    def operation(self, method: str) -> MergeConfig:
        """The settings of one merge (what `fishrec merge` takes)."""
        return MergeConfig(
            **self.model_dump(exclude={"method", "methods", "publish"}), method=method
        )


class ExportSpec(StrictModel):
    quantize: bool = Field(
        False, description="also write an int8 graph (reported, never served by default)"
    )
    full_scores: bool = Field(False, description="add the all_scores output to the graph")
    parity_sequences: int = Field(256, ge=8, description="sequences of the parity check at export")
    retrieval_min_items: int | None = Field(
        RETRIEVAL_MIN_ITEMS,
        ge=1,
        description="catalogues of at least this many items also get an ANN index and a user "
        "encoder (retrieval/): the service then scores a shortlist, not every item (None: never)",
    )
    checkpoint_copy: bool = Field(
        True,
        description="also put the model's safetensors and config into the bundle's checkpoint/ "
        "(what base.init_from warm-starts from; the service never reads it)",
    )


CONTROL = "control"  # the equal-compute plain model's name in the run


class GateSpec(StrictModel):
    """Champion/challenger before publishing (docs/pipeline.md)."""

    enabled: bool = Field(
        True, description="compare with the bundle LATEST names before publishing"
    )
    metric: Literal["ndcg@10", "hr@10"] = Field(
        "ndcg@10", description="test metric of both bundles on this run's test users"
    )
    tolerance: float = Field(
        0.002,
        ge=0.0,
        description="publish when challenger >= champion - tolerance (absolute, metric units)",
    )


class BaseSpec(StrictModel):
    """Where the shared base starts (finetune setting; docs/pipeline.md)."""

    init_from: str | None = Field(
        None,
        description="warm start: 'latest' (the run LATEST names; a cold start when nothing is "
        "published yet) or a published run id; None trains the base from scratch",
    )
    warm_epochs: int | None = Field(
        None,
        ge=0,
        description="epochs of a warm-started base (None: the experiment's train.epochs)",
    )

    @model_validator(mode="after")
    def _run_id(self) -> BaseSpec:
        if self.init_from not in (None, "latest"):
            check_run_id(self.init_from)
        return self


class RetentionSpec(StrictModel):
    """What a successful publish cleans up (docs/pipeline.md)."""

    keep_runs: int = Field(
        0,
        ge=0,
        description="published runs to keep, newest first (0: all); LATEST and the run "
        "before it are always kept, and the work folders of removed or unpublished runs go",
    )


class ReportSpec(StrictModel):
    """What the run report evaluates besides the metric table (docs/pipeline.md)."""

    landscape_users: int = Field(
        500,
        ge=0,
        description="validation users scored on the weight-plane grid and the line from the "
        "best recipe to the best merge (0: points only, no contours or line)",
    )
    grid_points: int = Field(7, ge=2, description="grid of the weight plane: N x N models")
    line_points: int = Field(
        15, ge=2, description="models along the line (t from -0.2 to 1.2; 15: steps of 0.1)"
    )


class PipelineConfig(StrictModel):
    experiment: ExperimentConfig = Field(
        default_factory=ExperimentConfig, description="data, backbone and the base model's training"
    )
    # population: the measured default (docs/results/pool-strategies.md).
    setting: PoolStrategy = Field(
        "population",
        description="how the pool trains (training/pool.py): "
        + "; ".join(f"{k}: {v}" for k, v in POOL_STRATEGIES.items()),
    )
    pool: PoolSettings = Field(
        default_factory=PoolSettings, description="settings of the spawn and population strategies"
    )
    recipes: list[RecipeEntry] = Field(
        default_factory=lambda: [
            RecipeEntry(name=n) for n in ("plain", "cl4srec", "duorec", "ehrec")
        ],
        description="the merge pool; 'plain' means the backbone's own objective",
    )
    recipe_epochs: int = Field(
        10,
        ge=0,
        description="epochs of each recipe (after the base in finetune, after the shared "
        "spawn_epoch epochs in spawn)",
    )
    # A fine-tune that restarts at the base's rate (1e-3) leaves the base's basin, and
    # models merged from different basins lose (docs/results/merge.md).
    recipe_lr: float | None = Field(
        3e-4,
        gt=0,
        description="learning rate of the recipe fine-tunes (finetune setting; None: the "
        "experiment's lr); every other setting trains at the experiment's lr",
    )
    control: bool = Field(
        False,
        description="also train the plain objective for every epoch the pool spent (from the "
        "base in finetune, from scratch otherwise): the equal-compute control a merge must "
        "beat; costs the pool's training again",
    )
    base: BaseSpec = Field(default_factory=BaseSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    max_retries: int = Field(2, ge=0, description="Ray retries of a task after a crash or an error")
    fisher: JobFisherConfig = Field(default_factory=JobFisherConfig)
    merge: JobMergeConfig = Field(default_factory=JobMergeConfig)
    export: ExportSpec = Field(default_factory=ExportSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    retention: RetentionSpec = Field(default_factory=RetentionSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="MLflow tracking of every run (off by default)"
    )
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
        if self.base.init_from and self.setting != "finetune":
            raise ValueError(
                "base.init_from warm-starts the shared base: it needs setting: finetune"
            )
        if CONTROL in names:
            raise ValueError(f"{CONTROL!r} names the equal-compute control, not a recipe")
        based = sorted(set(self.merge.methods) & NEEDS_BASE)
        if based and not self.pool_config.shared_base:
            raise ValueError(
                f"merge methods {based} add task vectors to the recipes' shared base; the "
                f"{self.setting} setting has none (use setting: finetune or spawn)"
            )
        return self

    @property
    def pool_config(self) -> PoolConfig:
        return PoolConfig(strategy=self.setting, **self.pool.model_dump())

    def recipe_lr_of(self, entry: RecipeEntry) -> float:
        """The learning rate an entry trains with (only a fine-tune lowers it)."""
        if self.setting != "finetune":
            return self.experiment.train.lr
        return entry.lr or self.recipe_lr or self.experiment.train.lr

    def recipe_of(self, entry: RecipeEntry) -> str:
        """The registry key of an entry ('plain' is the backbone's own objective)."""
        return self.experiment.model.backbone if entry.recipe_name == "plain" else entry.recipe_name
