"""The parameters of every recipe, by recipe name: pydantic only, no torch.

Configuration validates a recipe's `params` against these models without
importing the recipes (which need torch and the data layer); each recipe in
training/recipes/ declares its own here as `Params`, and
training/recipes/__init__.py refuses to import when the two registries differ.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RecipeParams(BaseModel):
    """Parameters of the plain objective, shared by every recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_prob: float = Field(
        0.2, gt=0.0, lt=1.0, description="Cloze: share of items replaced by [MASK]"
    )
    mask_last_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="Cloze: share of rows that mask only their newest item"
    )
    negatives: int = Field(
        0,
        ge=0,
        description="0: exact softmax over all items (chunked); n: a sampled softmax with n "
        "negatives per batch, logQ-corrected (catalogues of 10^5+ items)",
    )
    sampler: Literal["uniform", "popularity"] = Field(
        "uniform",
        description="what the n negatives are drawn from: uniform, or popularity "
        "(count + 1)^0.75 over the training items; unused when negatives is 0",
    )
    in_batch_negatives: bool = Field(
        False,
        description="also use the batch's other targets as negatives, corrected by their "
        "training frequency (a sampled softmax even when negatives is 0)",
    )


class ContrastiveParams(RecipeParams):
    weight: float = Field(
        0.1, ge=0.0, description="lambda: weight of the contrastive term added to the plain loss"
    )
    temperature: float = Field(1.0, gt=0.0, description="tau: InfoNCE temperature")
    similarity: Literal["dot", "cos"] = Field(
        "dot", description="similarity of two representations (dot: as the official code)"
    )


class CL4SRecParams(ContrastiveParams):
    crop_keep: float = Field(0.6, gt=0.0, le=1.0, description="eta: share of items a crop keeps")
    mask_rate: float = Field(
        0.3, ge=0.0, le=1.0, description="gamma: share of items replaced by [MASK]"
    )
    reorder_rate: float = Field(
        0.6, ge=0.0, le=1.0, description="beta: share of items in the shuffled span"
    )


class DuoRecParams(ContrastiveParams):
    mode: Literal["unsup", "sup", "both"] = Field(
        "sup",
        description="unsup: two dropout views; sup: a same-target sequence (official default); both",
    )
    exclude_same_target_negatives: bool = Field(
        True, description="never use a batch sample with the same target as a negative"
    )


class EHRecParams(DuoRecParams):
    percentile: float = Field(
        0.9, gt=0.0, lt=1.0, description="k_stat: percentile of in-batch negative similarities"
    )
    threshold_temperature: float = Field(
        0.05, gt=0.0, description="t of the soft threshold sigmoid((k - cos) / t)"
    )
    threshold_weight: float = Field(
        1.0, ge=0.0, description="weight of the regulariser ((k_learn - k_stat) / t)^2"
    )
    threshold_hidden: int = Field(32, ge=1, description="width of the threshold MLP g")
    threshold_signal: Literal["false-negatives", "term"] = Field(
        "false-negatives",
        description="what trains g: false-negatives (same-target pairs, both ways) or term "
        "(the InfoNCE gradient, downwards only); see the module docstring",
    )


class KDSRParams(RecipeParams):
    holistic_weight: float = Field(1.0, ge=0.0, description="weight of the holistic KL term")
    dissected_weight: float = Field(
        0.1, ge=0.0, description="weight of the correlation-code cross-entropy"
    )
    temperature: float = Field(0.1, gt=0.0, description="τ of the holistic cosine softmaxes")
    subspaces: int = Field(8, ge=1, description="slices of the teacher feature (dissected)")
    codes: int = Field(50, ge=2, description="correlation codes: k of the k-means")
    max_items: int = Field(
        128, ge=2, description="items of a batch the correlation terms look at (random subset)"
    )
    kmeans_pairs: int = Field(20000, ge=2, description="random item pairs the k-means is fitted on")
    kmeans_iterations: int = Field(30, ge=1, description="Lloyd iterations of the k-means")
    classifier_hidden: int = Field(64, ge=1, description="width of the code classifier")
    modality_lr_scale: float = Field(
        0.1, gt=0.0, le=1.0, description="asynchronous learning: lr factor of the modality adaptor"
    )
    seed: int = Field(0, description="seeds the k-means pairs and the classifier initialisation")


# name -> the parameters of that recipe (the keys of training.recipes.RECIPES)
RECIPE_PARAMS: dict[str, type[RecipeParams]] = {
    "bert4rec": RecipeParams,
    "sasrec": RecipeParams,
    "cl4srec": CL4SRecParams,
    "duorec": DuoRecParams,
    "ehrec": EHRecParams,
    "kdsr": KDSRParams,
}
