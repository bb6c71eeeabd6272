"""The output ensemble of a merge pool: the quality a merge tries to reach at 1x cost.

Every item is scored by the mean of the members' log-probabilities,

    s(i | h) = 1/M Σ_m log softmax(z_m(h))_i

so serving it costs M forward passes and M item tables. A merged model costs one;
the share of the ensemble's gain over the best member that a merge keeps is how
the merge benchmark and the job's report judge it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from training.evaluate import Scorer
from training.model import SequenceRecommender


def ensemble_scorer(models: Sequence[SequenceRecommender]) -> Scorer:
    """A scorer (histories (B, L) -> (B, N)) of the mean log-probability of `models`."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    sizes = {model.config.num_items for model in models}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members score different catalogues: {sorted(sizes)} items")
    for model in models:
        model.eval()

    def score(histories: Tensor) -> Tensor:
        with torch.inference_mode():
            # Each member cuts the history to its own input length.
            total = sum(torch.log_softmax(m.logits(histories).float(), dim=-1) for m in models)
            return total / len(models)

    return score


def ensemble_max_len(models: Sequence[SequenceRecommender]) -> int:
    """The longest history any member reads: what the evaluator passes in."""
    return max(model.config.max_len for model in models)
