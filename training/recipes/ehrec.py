"""EHRec: DuoRec with hard negatives filtered by a learned similarity threshold.

DuoRec's positives; among the in-batch negatives, those more similar to the
anchor than a threshold k are likely false negatives (the same intent as the
anchor) and are dropped. Two thresholds:

- k_stat: the 90th percentile of the in-batch negative similarities, averaged
  over an epoch and carried as a running value (a buffer, so it survives
  resume) into the next epoch; during the first epoch, the running mean so far.
- k_learn: a small MLP g on each anchor's representation, regularised by
  (k_learn - k_stat)^2, measured in units of t (below) so that its weight does
  not depend on t. The hard cut would give g no gradient, so negatives are
  weighted by the soft threshold sigmoid((k_learn - sim) / t).

Thresholds live on cosine similarity whatever `similarity` the InfoNCE uses:
cosines are scale-free, so k and t mean the same on every data set and at every
point of training, while dot products grow as the model trains. g predicts the
offset of k_learn from k_stat (k_learn = k_stat + g(z)): the same regulariser,
but g need not first learn the level of k_stat. The threshold path sees
detached representations and similarities, so the encoder cannot lower its loss
by pushing negatives over the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from training.losses import info_nce_from_similarity, negative_pairs, similarity_matrix
from training.model import ModelConfig
from training.recipes.base import RecipeParams
from training.recipes.duorec import DuoRec, DuoRecParams


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


def percentile(values: Tensor, q: float) -> Tensor:
    """Nearest-rank q-th percentile of a 1-D tensor (no size limit, unlike torch.quantile)."""
    rank = max(1, math.ceil(q * values.numel()))
    return values.float().kthvalue(rank).values


def soft_threshold(threshold: Tensor, similarity: Tensor, temperature: float) -> Tensor:
    """Weight of each negative: ~1 well below the anchor's threshold, ~0 well above it."""
    return torch.sigmoid((threshold[:, None] - similarity) / temperature)


class EHRec(DuoRec):
    name = "ehrec"
    Params = EHRecParams
    params: EHRecParams
    k_stat: Tensor

    def __init__(
        self, params: RecipeParams, model_config: ModelConfig, train: Sequence[np.ndarray]
    ) -> None:
        super().__init__(params, model_config, train)
        self.threshold = self._threshold_network(model_config.hidden_size)
        self.register_buffer("k_stat", torch.tensor(float("nan")))

    def _threshold_network(self, width: int) -> nn.Sequential:
        hidden = self.params.threshold_hidden
        # A fixed seed: the recipe is built after the model, from whatever state the
        # global RNG is in, and a run must start the same way every time (resume, tests).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            # Small output weights: k_learn starts near k_stat, yet every layer gets gradient.
            nn.init.normal_(network[2].weight, std=1e-2)
        nn.init.zeros_(network[2].bias)
        return network

    def observe(self, cosine: Tensor, negatives: Tensor) -> Tensor | None:
        """Record this batch's percentile; return the k_stat that regularises k_learn now."""
        if negatives.any():
            self.logs.add(
                "similarity_percentile", percentile(cosine[negatives], self.params.percentile)
            )
        if not math.isnan(float(self.k_stat)):
            return self.k_stat
        return self.logs.mean("similarity_percentile")  # first epoch: the running mean so far

    def pair_loss(self, z1: Tensor, z2: Tensor, allowed: Tensor | None) -> Tensor:
        similarity = similarity_matrix(z1, z2, self.params.similarity)
        cosine = similarity_matrix(z1.detach(), z2.detach(), "cos")
        negatives = negative_pairs(z1.shape[0], z1.device)
        if allowed is not None:
            negatives &= allowed > 0
        k_stat = self.observe(cosine, negatives)
        if k_stat is None:  # no negative seen yet: nothing to threshold
            return super().pair_loss(z1, z2, allowed)
        anchors = torch.cat([z1, z2]).detach()  # (2B, D)
        k_learn = k_stat + self.threshold(anchors).squeeze(-1)  # (2B,)
        weights = soft_threshold(k_learn, cosine, self.params.threshold_temperature)
        weights = weights * negatives
        term = info_nce_from_similarity(similarity, self.params.temperature, weights)
        # Measured in widths t of the soft threshold, so the weight need not change with t.
        regulariser = (((k_learn - k_stat) / self.params.threshold_temperature) ** 2).mean()
        self.logs.add("contrastive_loss", term)
        self.logs.add("threshold_loss", regulariser)
        self.logs.add("k_learn", k_learn.mean())
        if negatives.any():
            self.logs.add("negatives_kept", weights[negatives].mean())
        return self.params.weight * term + self.params.threshold_weight * regulariser

    def epoch_end(self) -> dict[str, float]:
        logs = super().epoch_end()
        carried = logs.pop("recipe/similarity_percentile", None)
        if carried is not None:
            self.k_stat.fill_(carried)
        logs["recipe/k_stat"] = float(self.k_stat)
        return logs
