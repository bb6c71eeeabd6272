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
from torch import Tensor, nn

from training.batching import Batch
from training.losses import (
    Sampling,
    cloze_loss,
    item_counts,
    log_frequency,
    log_proposal,
    next_item_loss,
)
from training.model import ModelConfig, SequenceRecommender
from training.recipe_params import RecipeParams


@dataclass
class RecipeOutput:
    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Recipe(nn.Module):
    """Base class: the plain objective of the backbone (Cloze or next-item)."""

    name: ClassVar[str] = "plain"
    Params: ClassVar[type[RecipeParams]] = RecipeParams
    backbone: ClassVar[str | None] = None  # the backbone the recipe requires, if any
    log_proposal: Tensor | None  # (N,) log q of the sampled negatives; None: full softmax
    log_frequency: Tensor | None  # (N,) log p of the in-batch negatives; None: none

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
        # The sampled softmax's distributions, counted once here. Non-persistent: they
        # follow from the data, so checkpoints are the same whatever the loss.
        proposal = frequency = None
        if params.negatives > 0 or params.in_batch_negatives:
            counts = item_counts(train, model_config.num_items)
            proposal = log_proposal(counts, params.sampler)
            frequency = log_frequency(counts) if params.in_batch_negatives else None
        self.register_buffer("log_proposal", proposal, persistent=False)
        self.register_buffer("log_frequency", frequency, persistent=False)

    def window_length(self) -> int:
        """How many items of a training sequence one sample holds."""
        # SASRec's inputs are items[:-1], so it needs one item more than max_len.
        return self.model_config.max_len + int(self.model_config.causal)

    def sampling(self) -> Sampling | None:
        """The sampled softmax of the plain loss; None: the exact full softmax."""
        if self.log_proposal is None:
            return None
        return Sampling(self.params.negatives, self.log_proposal, self.log_frequency)

    def base_loss(self, model: SequenceRecommender, items: Tensor) -> Tensor:
        if model.config.causal:
            return next_item_loss(model, items, self.sampling())
        return cloze_loss(
            model, items, self.params.mask_prob, self.params.mask_last_prob, self.sampling()
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
