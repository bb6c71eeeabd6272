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

What trains g (`threshold_signal`; the paper leaves it open):
- "false-negatives" (default): a classification signal that can move k both
  ways. Two sequences with the same next item are known false negatives of each
  other (DuoRec's semantic positives); every other in-batch pair is taken as a
  true negative. sigmoid((k_learn - cos) / t) is read as P(true negative) and g
  minimises its class-balanced binary cross-entropy: k rises above the
  similarity of hard true negatives (keeping them) and falls below that of
  same-target pairs (dropping them). The InfoNCE term sees k_learn detached.
- "term": the gradient of the InfoNCE term itself. Dropping a negative always
  lowers that term, so it can only push k down; the regulariser alone holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.batching import Batch
from training.losses import (
    distinct_target_pairs,
    info_nce_from_similarity,
    negative_pairs,
    similarity_matrix,
)
from training.model import ModelConfig, SequenceRecommender
from training.recipe_params import EHRecParams
from training.recipes.base import RecipeParams
from training.recipes.contrastive import split_window
from training.recipes.duorec import DuoRec


def percentile(values: Tensor, q: float) -> Tensor:
    """Nearest-rank q-th percentile of a 1-D tensor (no size limit, unlike torch.quantile)."""
    rank = max(1, math.ceil(q * values.numel()))
    return values.float().kthvalue(rank).values


def soft_threshold(threshold: Tensor, similarity: Tensor, temperature: float) -> Tensor:
    """Weight of each negative: ~1 well below the anchor's threshold, ~0 well above it."""
    return torch.sigmoid(threshold_logits(threshold, similarity, temperature))


def threshold_logits(threshold: Tensor, similarity: Tensor, temperature: float) -> Tensor:
    return (threshold[:, None] - similarity) / temperature


def false_negative_loss(logits: Tensor, negatives: Tensor, false_negatives: Tensor) -> Tensor:
    """Class-balanced BCE of P(true negative) = sigmoid(logits) over the in-batch pairs.

    negatives: (2B, 2B) bool, the pairs that count; false_negatives: those of them
    that share the anchor's target. Each class weighs half, however rare it is.
    """
    true_negatives = negatives & ~false_negatives
    false_negatives = negatives & false_negatives
    loss = logits.new_zeros(())
    for members, label in ((true_negatives, 1.0), (false_negatives, 0.0)):
        if members.any():
            chosen = logits[members]
            target = torch.full_like(chosen, label)
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(chosen, target)
    return loss


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
        self.batch_same_target: Tensor | None = None  # (2B, 2B) of the batch being scored

    def contrastive_loss(self, model: SequenceRecommender, batch: Batch) -> Tensor:
        _, targets = split_window(batch.items)
        self.batch_same_target = ~distinct_target_pairs(targets)
        return super().contrastive_loss(model, batch)

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
        t = self.params.threshold_temperature
        by_term = self.params.threshold_signal == "term"
        weights = soft_threshold(k_learn if by_term else k_learn.detach(), cosine, t)
        weights = weights * negatives
        term = info_nce_from_similarity(similarity, self.params.temperature, weights)
        # Measured in widths t of the soft threshold, so the weight need not change with t.
        regulariser = (((k_learn - k_stat) / t) ** 2).mean()
        threshold_loss = self.params.threshold_weight * regulariser
        if not by_term:
            # Same-target pairs are the known false negatives (whether or not DuoRec
            # already excludes them from the term).
            every_negative = negative_pairs(z1.shape[0], z1.device)
            assert self.batch_same_target is not None, "pair_loss runs inside contrastive_loss"
            signal = false_negative_loss(
                threshold_logits(k_learn, cosine, t), every_negative, self.batch_same_target
            )
            self.logs.add("false_negative_loss", signal)
            threshold_loss = threshold_loss + signal
        self.logs.add("contrastive_loss", term)
        self.logs.add("threshold_loss", regulariser)
        self.logs.add("k_learn", k_learn.mean())
        if negatives.any():
            self.logs.add("negatives_kept", weights[negatives].mean())
        return self.params.weight * term + threshold_loss

    def epoch_end(self) -> dict[str, float]:
        logs = super().epoch_end()
        carried = logs.pop("recipe/similarity_percentile", None)
        if carried is not None:
            self.k_stat.fill_(carried)
        logs["recipe/k_stat"] = float(self.k_stat)
        return logs
