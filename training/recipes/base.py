"""What every recipe is: an objective on the shared backbone.

A recipe computes the training loss of a batch. It may own small extra modules
(a threshold network, a classifier) and running state (EHRec's k_stat); those
are trained and checkpointed with the run but are never part of the backbone, so
the checkpoints of all recipes share one architecture and can be merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from training.batching import Batch
from training.losses import cloze_loss, next_item_loss
from training.model import ModelConfig, SequenceRecommender


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
        0, ge=0, description="0: softmax over all items; n: n sampled negatives (large catalogues)"
    )


@dataclass
class RecipeOutput:
    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Recipe(nn.Module):
    """Base class: the plain objective of the backbone (Cloze or next-item)."""

    name: ClassVar[str] = "plain"
    Params: ClassVar[type[RecipeParams]] = RecipeParams
    backbone: ClassVar[str | None] = None  # the backbone the recipe requires, if any

    def __init__(
        self, params: RecipeParams, model_config: ModelConfig, train: Sequence[np.ndarray]
    ) -> None:
        super().__init__()
        if self.backbone is not None and model_config.backbone != self.backbone:
            raise ValueError(
                f"recipe {self.name!r} needs backbone {self.backbone!r}, "
                f"the model is {model_config.backbone!r}"
            )
        self.params = params
        self.model_config = model_config
        self.train_sequences = train

    def window_length(self) -> int:
        """How many items of a training sequence one sample holds."""
        # SASRec's inputs are items[:-1], so it needs one item more than max_len.
        return self.model_config.max_len + int(self.model_config.causal)

    def base_loss(self, model: SequenceRecommender, items: Tensor) -> Tensor:
        if model.config.causal:
            return next_item_loss(model, items, self.params.negatives)
        return cloze_loss(
            model, items, self.params.mask_prob, self.params.mask_last_prob, self.params.negatives
        )

    def loss(self, model: SequenceRecommender, batch: Batch) -> RecipeOutput:
        return RecipeOutput(self.base_loss(model, batch.items))

    def epoch_end(self) -> dict[str, float]:
        """Called after every epoch; returns values to log (e.g. EHRec thresholds)."""
        return {}


class BERT4Rec(Recipe):
    """Plain Cloze objective (Sun et al., 2019)."""

    name = "bert4rec"
    backbone = "bert4rec"


class SASRec(Recipe):
    """Plain next-item cross-entropy at every position (Kang & McAuley, 2018)."""

    name = "sasrec"
    backbone = "sasrec"
