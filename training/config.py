"""Typed, validated configuration: YAML files under configs/, overridable on the command line.

One `ExperimentConfig` describes a training run: where the data comes from, the
backbone, the recipe (objective) and the optimisation. Every field has a default
and a description, so `fishrec train --data DIR --out RUN` works with no file.
Overrides use dotted paths: `--set train.lr=3e-4 --set recipe.params.weight=0.2`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.interactions import parse_time


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """Backbone hyper-parameters; the catalogue size comes from the data."""

    # SASRec is the default: on CPU it reaches a useful model in tens of epochs,
    # while BERT4Rec's Cloze needs ~30 epochs just to leave the popularity plateau
    # on the synthetic set (it gets there; see docs/models.md).
    backbone: Literal["bert4rec", "sasrec"] = Field(
        "sasrec", description="sasrec: causal next-item; bert4rec: bidirectional Cloze"
    )
    hidden_size: int = Field(64, ge=8, description="width D of embeddings and states")
    num_layers: int = Field(2, ge=1, description="transformer blocks")
    num_heads: int = Field(1, ge=1, description="attention heads")
    max_len: int = Field(50, ge=2, description="longest model input ([MASK] included)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on embeddings and residuals")
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on attention weights")
    ffn_mult: int = Field(1, ge=1, description="feed-forward width as a multiple of D")
    # The three below were measured one by one in benchmarks/convergence.py (docs/models.md,
    # "Training defaults"); the defaults are SASRec's choices.
    embedding_input: Literal["scaled", "layernorm"] = Field(
        "scaled",
        description="scaled: sqrt(D) * item + position (SASRec); "
        "layernorm: LayerNorm(item + position) (BERT4Rec)",
    )
    prediction_head: bool = Field(
        False, description="BERT4Rec's Linear-GELU-LayerNorm head before the output layer"
    )
    activation: Literal["relu", "gelu"] = Field("relu", description="feed-forward activation")
    block: Literal["prenorm", "sasrec"] = Field(
        "sasrec",
        description="prenorm: x + attn(LN x), x + ffn(LN x); sasrec: SASRec's code (queries and "
        "residual from LN x, keys/values from x, feed-forward residual after its norm)",
    )
    attention_init: Literal["normal", "xavier"] = Field(
        "xavier", description="query/key/value init: normal(init_std) or Xavier-uniform (SASRec)"
    )
    positions: Literal["end", "start"] = Field(
        "start",
        description="start: the oldest item of the input has position 0 (SASRec); end: the "
        "newest has position max_len - 1",
    )
    init_std: float = Field(0.02, gt=0.0, description="std of the normal initialisation")
    item_representation: Literal["id", "id+text", "text"] = Field(
        "id",
        description="id: ID embedding (plain); id+text: ID embedding + adaptor(text features); "
        "text: adaptor(text features) only, transferable to another catalogue (needs data.features)",
    )
    adaptor_experts: int = Field(
        4, ge=1, description="whitening experts of the text adaptor (id+text, text)"
    )
    feature_dim: int | None = Field(
        None, ge=1, description="width of the item features (None: the feature file's; checked)"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads")
        return self


class SyntheticSpec(StrictModel):
    """Parameters of the embedded synthetic data set (see training/synthetic.py)."""

    seed: int = Field(0, description="generator seed")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="SyntheticConfig fields to change, e.g. num_users"
    )


class SplitSpec(StrictModel):
    """The evaluation protocol (training/splits.py, docs/evaluation.md)."""

    protocol: Literal["leave_one_out", "temporal"] = Field(
        "leave_one_out",
        description="leave_one_out: each user's last item is the test; temporal: a global "
        "cut-off time, tested on each user's first interaction after it",
    )
    cutoff: float | str | None = Field(
        None, description="temporal: the cut-off as epoch seconds or ISO 8601 (naive = UTC)"
    )
    last_days: float | None = Field(
        None, gt=0, description="temporal: the cut-off this many days before the newest interaction"
    )

    @model_validator(mode="after")
    def _one_cutoff(self) -> SplitSpec:
        given = [name for name in ("cutoff", "last_days") if getattr(self, name) is not None]
        if self.protocol == "temporal" and len(given) != 1:
            raise ValueError("the temporal split needs exactly one of cutoff and last_days")
        if self.protocol == "leave_one_out" and given:
            raise ValueError(f"{given[0]} belongs to the temporal split (protocol: temporal)")
        if isinstance(self.cutoff, str):
            try:
                parse_time(self.cutoff)
            except ValueError:
                raise ValueError(
                    f"cutoff {self.cutoff!r} is neither epoch seconds nor ISO 8601"
                ) from None
        return self


class DataSpec(StrictModel):
    path: str = Field(
        "synthetic",
        description="'synthetic' for the embedded data set, a prepared data folder, or a raw file",
    )
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    split: SplitSpec = Field(default_factory=SplitSpec, description="evaluation protocol")
    features: str | None = Field(
        None,
        description="item feature file of `fishrec data features` (None: features.safetensors "
        "in the data folder); read when the model has text or the recipe needs it",
    )


class RecipeSpec(StrictModel):
    """Which objective trains the model; `params` are validated by the recipe's own model."""

    name: str = Field(
        "sasrec",
        description="a key of training.recipes.RECIPES (default: the backbone's plain one)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="recipe parameters")

    @model_validator(mode="after")
    def _known_recipe(self) -> RecipeSpec:
        from training.recipe_params import RECIPE_PARAMS

        if self.name not in RECIPE_PARAMS:
            raise ValueError(f"unknown recipe {self.name!r}; known: {sorted(RECIPE_PARAMS)}")
        RECIPE_PARAMS[self.name].model_validate(self.params)
        return self


class TrainConfig(StrictModel):
    epochs: int = Field(50, ge=0, description="maximum number of epochs")
    batch_size: int = Field(128, ge=1, description="sequences per optimiser step")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="decay after warm-up, to 10% of lr at the last epoch"
    )
    length_grouping: int = Field(
        0,
        ge=0,
        description="0: uniformly shuffled batches (each padded to its longest); N: sort chunks "
        "of N batches by length first (less padding, but batches become length strata)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast matmuls to bfloat16 in training (CPUs with AVX512_BF16 or "
        "AMX, recent GPUs); evaluation stays float32",
    )
    compile: bool = Field(
        False,
        description="torch.compile the transformer blocks (needs a C++ compiler on CPU; the "
        "first batches of each new length are slow)",
    )
    clip_grad_norm: float | None = Field(5.0, description="clip the global gradient norm")
    sparse_items: bool = Field(
        False,
        description="under sampled softmax (recipe negatives), update only the item-table rows "
        "a step touches (its items, targets and negatives) with lazy Adam, so a step's cost "
        "stops growing with the catalogue and data-parallel workers send only those rows; "
        "ID-only models",
    )
    user_bootstrap: bool = Field(
        False,
        description="train on a bootstrap sample of the training users (as many, drawn with "
        "replacement, from seed): each pool member its own data view (bagging); validation "
        "and test are unchanged",
    )
    patience: int = Field(5, ge=1, description="epochs without validation gain before stopping")
    eval_every: int = Field(1, ge=1, description="validate every N epochs")
    validate_initial: bool = Field(
        False,
        description="validate the starting model as epoch 0, so it stays the result unless "
        "training improves on it (fine-tunes of a merged model)",
    )
    eval_batch_size: int = Field(512, ge=1, description="histories per evaluation batch")
    window: Literal["last", "random"] = Field(
        "last", description="which max_len window of a long training sequence to use"
    )
    seed: int = Field(0, description="seeds initialisation, batching, masking and dropout")
    init_seed: int | None = Field(
        None,
        description="seeds the new model's initialisation instead of seed (pool members that "
        "share it start from one initialisation and still differ in data order and dropout)",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (None: torch default)"
    )
    workers: int = Field(
        1,
        ge=1,
        description="data-parallel workers on Ray Train (DDP: gloo on CPU, nccl on GPU); each "
        "takes batch_size / workers rows of every batch and num_threads CPUs (default 1)",
    )
    max_failures: int = Field(
        0, ge=0, description="workers > 1: restarts of the worker group from its last checkpoint"
    )
    progress: bool = Field(True, description="show a progress bar")
    eval_seed: int = Field(0, description="seed of the random100 candidate sets")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}")
        return value


class ExperimentConfig(StrictModel):
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    recipe: RecipeSpec = Field(default_factory=RecipeSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _plain_recipe_follows_backbone(cls, values: Any) -> Any:
        # With no recipe named, train the backbone's own plain objective.
        if not isinstance(values, dict):
            return values
        recipe = values.get("recipe") or {}
        if isinstance(recipe, dict) and not recipe.get("name"):
            model = values.get("model") or {}
            default = ModelSpec.model_fields["backbone"].default
            backbone = model.get("backbone", default) if isinstance(model, dict) else model.backbone
            values = {**values, "recipe": {**recipe, "name": backbone}}
        return values


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set values['a']['b'] = value for dotted = 'a.b', creating inner dicts."""
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), yaml.safe_load(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return loaded


T = TypeVar("T", bound=BaseModel)


def load_config(
    model: type[T], path: Path | None = None, overrides: dict[str, Any] | None = None
) -> T:
    """Defaults <- YAML file <- overrides (dotted keys), validated by `model`."""
    values = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(values, key, value)
    return model.model_validate(values)
