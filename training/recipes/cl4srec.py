"""CL4SRec (Xie et al., "Contrastive Learning for Sequential Recommendation", ICDE 2022).

Two views of each history, each made by a different one of crop / mask / reorder
(drawn per sequence, as in the official code), are pulled together by InfoNCE
with the other views of the batch as negatives; the term is added to the
backbone's plain objective with weight lambda.
"""

from __future__ import annotations

from torch import Tensor

from training.augment import AugmentRates, two_views
from training.batching import Batch
from training.losses import info_nce
from training.model import SequenceRecommender
from training.recipe_params import CL4SRecParams
from training.recipes.contrastive import (
    ContrastiveRecipe,
    representations,
    split_window,
)


class CL4SRec(ContrastiveRecipe):
    name = "cl4srec"
    Params = CL4SRecParams
    params: CL4SRecParams

    def rates(self) -> AugmentRates:
        return AugmentRates(self.params.crop_keep, self.params.mask_rate, self.params.reorder_rate)

    def contrastive_loss(self, model: SequenceRecommender, batch: Batch) -> Tensor:
        history, _ = split_window(batch.items)
        view1, view2 = two_views(history, self.rates(), model.config.mask_id)
        z1, z2 = representations(model, [view1, view2])
        term = info_nce(z1, z2, self.params.temperature, self.params.similarity)
        self.logs.add("contrastive_loss", term)
        return self.params.weight * term
