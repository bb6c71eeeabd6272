"""What the contrastive recipes share: the plain objective plus a weighted InfoNCE term.

The sequence representation is the backbone's inference state, `model.hidden(history)`,
where the history is the training window without its newest item and the target is
that newest item (whole windows are trained at once; no prefix expansion). Recipes
differ only in how they build the views, positives and negatives of that term.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from training.augment import stack_views
from training.batching import Batch
from training.model import ModelConfig, SequenceRecommender
from training.recipe_params import ContrastiveParams
from training.recipes.base import Recipe, RecipeOutput, RecipeParams


def split_window(items: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) training windows -> histories (B, L-1) and targets (B,), the newest items.

    Left padding puts every row's newest item in the last column; windows hold at
    least two items, so every history is non-empty.
    """
    return items[:, :-1], items[:, -1]


def representations(model: SequenceRecommender, views: list[Tensor]) -> list[Tensor]:
    """`model.hidden` of several batches of histories in one forward pass (own dropout per row)."""
    states = model.hidden(stack_views(views))  # (sum B_i, D)
    return list(states.split([view.shape[0] for view in views]))


class EpochMeans:
    """Per-epoch means of logged values; sums stay tensors so a step costs no device sync."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, Tensor) else float(value)
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def mean(self, name: str) -> Tensor | None:
        if name not in self._sums:
            return None
        return torch.as_tensor(self._sums[name]) / self._counts[name]

    def pop(self) -> dict[str, float]:
        """The means since the last pop, then start over."""
        means = {name: float(self.mean(name)) for name in self._sums}  # type: ignore[arg-type]
        self._sums, self._counts = {}, {}
        return means


class ContrastiveRecipe(Recipe):
    """The backbone's plain loss + `contrastive_loss`; works on both backbones."""

    Params = ContrastiveParams
    params: ContrastiveParams

    def __init__(
        self, params: RecipeParams, model_config: ModelConfig, train: Sequence[np.ndarray]
    ) -> None:
        super().__init__(params, model_config, train)
        self.logs = EpochMeans()

    def contrastive_loss(self, model: SequenceRecommender, batch: Batch) -> Tensor:
        """The term added to the plain loss, already weighted (lambda and any regulariser)."""
        raise NotImplementedError

    def loss(self, model: SequenceRecommender, batch: Batch) -> RecipeOutput:
        base = self.base_loss(model, batch.items)
        extra = self.contrastive_loss(model, batch)
        total = base + extra
        self.logs.add("contrastive_share", extra.detach() / total.detach())
        return RecipeOutput(total)

    def epoch_end(self) -> dict[str, float]:
        return {f"recipe/{name}": value for name, value in self.logs.pop().items()}
