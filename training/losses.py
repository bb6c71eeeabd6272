"""Losses as pure functions of a model and tensors.

The plain objectives (Cloze for BERT4Rec, next-item for SASRec) live here, and
every contrastive recipe adds its own term to them (training/recipes/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.model import PAD_ID, SequenceRecommender


def cloze_mask(
    items: Tensor, mask_prob: float, mask_id: int, last_prob: float = 0.0
) -> tuple[Tensor, Tensor]:
    """BERT4Rec masking: replace a random `mask_prob` share of real items by [MASK].

    Returns (inputs, labels) with labels = the original id where masked, else 0.
    Every non-empty row gets at least one mask (its newest item when the draw
    picked none). With probability `last_prob` a row masks only its newest item,
    which is exactly the inference task (history + [MASK]).
    """
    real = items != PAD_ID  # (B, L)
    masked = (torch.rand(items.shape, device=items.device) < mask_prob) & real
    # Left padding: the newest item is always in the last column.
    only_last = torch.rand(items.shape[0], device=items.device) < last_prob
    none_picked = ~masked.any(dim=1)
    last = torch.zeros_like(masked)
    last[:, -1] = real[:, -1]
    masked = torch.where((only_last | none_picked)[:, None], last, masked)
    inputs = torch.where(masked, torch.full_like(items, mask_id), items)
    labels = torch.where(masked, items, torch.zeros_like(items))
    return inputs, labels


def item_cross_entropy(
    model: SequenceRecommender, states: Tensor, targets: Tensor, negatives: int = 0
) -> Tensor:
    """Mean cross-entropy of `targets` (M,) item ids given `states` (M, D).

    negatives = 0: softmax over the whole catalogue. negatives = n > 0: softmax
    over the target and n uniformly drawn items shared by the batch (for
    catalogues too large for a full softmax); draws equal to a row's target are
    masked out.
    """
    if negatives <= 0:
        return F.cross_entropy(model.score(states), targets - 1)
    num_items = model.config.num_items
    sampled = torch.randint(1, num_items + 1, (negatives,), device=states.device)  # (n,)
    weight = model.output_weight()
    bias = model.output_bias
    positive = (states * weight[targets - 1]).sum(-1) + bias[targets - 1]  # (M,)
    negative = states @ weight[sampled - 1].T + bias[sampled - 1]  # (M, n)
    negative = negative.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def cloze_loss(
    model: SequenceRecommender,
    items: Tensor,
    mask_prob: float = 0.2,
    last_prob: float = 0.0,
    negatives: int = 0,
) -> Tensor:
    """BERT4Rec's objective: predict masked items from both sides."""
    inputs, labels = cloze_mask(items, mask_prob, model.config.mask_id, last_prob)
    states = model.encode(inputs)  # (B, L, D)
    picked = labels != PAD_ID
    return item_cross_entropy(model, states[picked], labels[picked], negatives)


def next_item_loss(model: SequenceRecommender, items: Tensor, negatives: int = 0) -> Tensor:
    """SASRec's objective: at every position predict the following item."""
    inputs, targets = items[:, :-1], items[:, 1:]
    states = model.encode(inputs)  # (B, L-1, D)
    # A position predicts only when both it and its target are real items.
    picked = (targets != PAD_ID) & (inputs != PAD_ID)
    return item_cross_entropy(model, states[picked], targets[picked], negatives)
