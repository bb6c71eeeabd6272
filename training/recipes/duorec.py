"""DuoRec (Qiu et al., "Contrastive Learning for Representation Degeneration Problem
in Sequential Recommendation", WSDM 2022).

Views of a history, contrasted by InfoNCE against the other views of the batch:

- `unsup`: the same history twice; the two dropout masks make the views differ;
- `sup`: the history and another training sequence with the same target item,
  drawn uniformly (the history itself when no other sequence has that target);
  this is the official code's default (`us_x`), whose anchor is a dropout view;
- `both`: the sum of the two terms, with the history's view as their shared anchor.

Two sequences of a batch with the same target are semantic positives of each
other; the official code still uses them as negatives. Here they are excluded
from the negatives unless `exclude_same_target_negatives` is off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from training.batching import Batch, pad_left
from training.losses import distinct_target_pairs, info_nce_from_similarity, similarity_matrix
from training.model import PAD_ID, ModelConfig, SequenceRecommender
from training.recipe_params import DuoRecParams
from training.recipes.base import RecipeParams
from training.recipes.contrastive import (
    ContrastiveRecipe,
    representations,
    split_window,
)


class SameTargetIndex:
    """Training rows grouped by their target: the last item of their newest window."""

    def __init__(self, train: Sequence[np.ndarray]) -> None:
        self.targets = np.fromiter((seq[-1] for seq in train), dtype=np.int64, count=len(train))
        # Rows grouped by target, ascending row ids within a group (stable sort).
        self.order = np.argsort(self.targets, kind="stable")
        self.sorted_targets = self.targets[self.order]
        self.position = np.empty_like(self.order)
        self.position[self.order] = np.arange(len(self.order))

    def draw(self, targets: np.ndarray, own: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """Per row: a row other than `own` with target `targets`, picked by `uniform` in [0, 1).

        -1 where no other training row has that target.
        """
        start = np.searchsorted(self.sorted_targets, targets, side="left")
        end = np.searchsorted(self.sorted_targets, targets, side="right")
        own_in_group = self.targets[own] == targets  # False for a "random" window's inner target
        count = end - start - own_in_group
        pick = np.minimum(np.floor(uniform * count).astype(np.int64), np.maximum(count - 1, 0))
        # Skip over the row itself: pick among the group with its position removed.
        pick += own_in_group & (pick >= self.position[own] - start)
        found = count > 0
        partner = np.full(len(targets), -1, dtype=np.int64)
        partner[found] = self.order[(start + pick)[found]]
        return partner


class DuoRec(ContrastiveRecipe):
    name = "duorec"
    Params = DuoRecParams
    params: DuoRecParams

    def __init__(
        self, params: RecipeParams, model_config: ModelConfig, train: Sequence[np.ndarray]
    ) -> None:
        super().__init__(params, model_config, train)
        self.same_target = SameTargetIndex(train)

    def partners(self, batch: Batch) -> np.ndarray:
        """A same-target training row for each row of the batch (-1: none), drawn with torch's RNG."""
        targets = batch.items[:, -1].cpu().numpy()
        uniform = torch.rand(len(targets)).numpy()
        return self.same_target.draw(targets, batch.index.cpu().numpy(), uniform)

    def partner_histories(self, batch: Batch) -> Tensor:
        """The partners' histories, built like the batch's: their newest window minus its target."""
        length = self.window_length()
        own_windows = batch.items.cpu().numpy()
        partners = self.partners(batch)
        windows = [
            self.train_sequences[p][-length:] if p >= 0 else row[row != PAD_ID]
            for p, row in zip(partners, own_windows, strict=True)
        ]
        self.logs.add("partner_share", float(np.mean(partners >= 0)))
        return pad_left(windows)[:, :-1].to(batch.items.device)

    def allowed_negatives(self, targets: Tensor) -> Tensor | None:
        """(2B, 2B) weights of in-batch negatives: 0 for same-target pairs when excluded."""
        if not self.params.exclude_same_target_negatives:
            return None
        return distinct_target_pairs(targets).float()

    def contrastive_loss(self, model: SequenceRecommender, batch: Batch) -> Tensor:
        history, targets = split_window(batch.items)
        views = [history]
        if self.params.mode in ("unsup", "both"):
            views.append(history)
        if self.params.mode in ("sup", "both"):
            views.append(self.partner_histories(batch))
        anchor, *others = representations(model, views)
        allowed = self.allowed_negatives(targets)
        return sum(self.pair_loss(anchor, other, allowed) for other in others)  # type: ignore[return-value]

    def pair_loss(self, z1: Tensor, z2: Tensor, allowed: Tensor | None) -> Tensor:
        """The weighted term of one positive pairing (z1[i], z2[i])."""
        similarity = similarity_matrix(z1, z2, self.params.similarity)
        term = info_nce_from_similarity(similarity, self.params.temperature, allowed)
        self.logs.add("contrastive_loss", term)
        return self.params.weight * term
