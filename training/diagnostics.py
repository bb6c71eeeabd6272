"""Diagnostics the thesis reports: representation geometry and how differently two models err.

- alignment and uniformity (Wang & Isola, ICML 2020) of the sequence
  representations `model.hidden(history)`, L2-normalised. Alignment is the mean
  squared distance of positive pairs; the positives here are the users whose next
  item is the same (DuoRec's semantic positives), so the figure does not depend on
  any one recipe's augmentations. Uniformity is log E exp(-2 ||f(x) - f(y)||^2)
  over pairs of distinct users. Lower is better for both.
- error inconsistency between models A and B: the share of users for which
  exactly one of the two gets the held-out item right, i.e. NDCG@10 > 0.5 (the
  item ranked first or second). Merging helps most when this is high.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.batching import pad_left
from training.evaluate import Evaluator
from training.model import SequenceRecommender
from training.splits import EvalSplit

HIT_THRESHOLD = 0.5


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """E ||f(x) - f(y)||^alpha over positive pairs (z1[i], z2[i]) of normalised representations."""
    if z1.shape != z2.shape:
        raise ValueError(f"pairs need equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    distance = (F.normalize(z1, dim=-1) - F.normalize(z2, dim=-1)).norm(dim=-1)
    return distance.pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct rows of normalised z."""
    if z.shape[0] < 2:
        raise ValueError("uniformity needs at least two representations")
    squared = torch.pdist(F.normalize(z, dim=-1)).pow(2)
    return squared.mul(-t).exp().mean().log()


def sequence_representations(
    model: SequenceRecommender, histories: Sequence[np.ndarray], batch_size: int = 512
) -> Tensor:
    """`model.hidden` of each history in evaluation mode: (N, D) on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Similar lengths per batch keep padding small; rows are put back in order.
    order = np.argsort([len(h) for h in histories], kind="stable")
    states = torch.empty(len(histories), model.config.hidden_size)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = pad_left([histories[i] for i in rows], model.config.max_len).to(device)
                states[torch.as_tensor(rows)] = model.hidden(batch).float().cpu()
    finally:
        model.train(was_training)
    return states


def same_target_pairs(
    targets: np.ndarray, max_pairs: int = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of users with the same target; a seeded sample if there are more."""
    order = np.argsort(targets, kind="stable")
    boundaries = np.flatnonzero(np.diff(targets[order])) + 1
    left, right = [], []
    for group in np.split(order, boundaries):
        if len(group) > 1:
            i, j = np.triu_indices(len(group), k=1)
            left.append(group[i])
            right.append(group[j])
    if not left:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    first, second = np.concatenate(left), np.concatenate(right)
    if len(first) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(first), max_pairs, replace=False)
        first, second = first[keep], second[keep]
    return first, second


def representation_quality(
    model: SequenceRecommender, split: EvalSplit, max_users: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Alignment (same-target users) and uniformity of a model's representations on a split.

    At most `max_users` users (a seeded sample) keep the cost of the pairwise
    uniformity bounded. Alignment is NaN when no two sampled users share a target.
    """
    users = np.arange(len(split.targets))
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    states = sequence_representations(model, [split.histories[u] for u in users])
    first, second = same_target_pairs(np.asarray(split.targets)[users], seed=seed)
    align = float(alignment(states[first], states[second])) if len(first) else float("nan")
    return {"alignment": align, "uniformity": float(uniformity(states))}


def error_inconsistency(
    ndcg_a: np.ndarray, ndcg_b: np.ndarray, threshold: float = HIT_THRESHOLD
) -> float:
    """Share of users for which exactly one of two models has NDCG@10 > threshold."""
    ndcg_a, ndcg_b = np.asarray(ndcg_a), np.asarray(ndcg_b)
    if ndcg_a.shape != ndcg_b.shape or ndcg_a.ndim != 1:
        raise ValueError(
            f"per-user NDCG of the same users needed, got {ndcg_a.shape} and {ndcg_b.shape}"
        )
    if not len(ndcg_a):
        raise ValueError("no users to compare")
    return float(np.mean((ndcg_a > threshold) != (ndcg_b > threshold)))


@dataclass(frozen=True)
class Comparison:
    """Two models on the same users: both metric tables and how differently they err."""

    part: str
    setting: str
    inconsistency: float  # exactly one model right
    both_right: float
    only_a: float
    only_b: float
    metrics_a: dict[str, dict[str, float]]
    metrics_b: dict[str, dict[str, float]]


def compare_models(
    model_a: SequenceRecommender,
    model_b: SequenceRecommender,
    evaluator: Evaluator,
    part: str = "test",
    setting: str = "full",
) -> Comparison:
    """Evaluate both models on `part` and their error inconsistency under `setting`."""
    result_a = evaluator.evaluate_model(model_a, part)
    result_b = evaluator.evaluate_model(model_b, part)
    right_a = result_a.per_user[setting]["ndcg@10"] > HIT_THRESHOLD
    right_b = result_b.per_user[setting]["ndcg@10"] > HIT_THRESHOLD
    return Comparison(
        part=part,
        setting=setting,
        inconsistency=error_inconsistency(
            result_a.per_user[setting]["ndcg@10"], result_b.per_user[setting]["ndcg@10"]
        ),
        both_right=float(np.mean(right_a & right_b)),
        only_a=float(np.mean(right_a & ~right_b)),
        only_b=float(np.mean(~right_a & right_b)),
        metrics_a=result_a.metrics,
        metrics_b=result_b.metrics,
    )
