"""Similar items: the nearest items by cosine of the model's item representations.

The bundle carries the vectors the output layer scores against
(item_vectors.npy, one unit row per item), so "items like this one" come from
the same model as the recommendations, computed in numpy (no torch, no
second graph). The item itself, `exclude_items`, unavailable items and
anything outside `candidates` are never returned.
"""

from __future__ import annotations

import numpy as np

from serving.runtime import Ranked


def similar_items(
    vectors: np.ndarray,
    item: int,
    k: int,
    exclude: np.ndarray,
    candidates: np.ndarray | None,
    blocked: np.ndarray,
) -> Ranked:
    """Top-k internal ids by cosine with `item` (internal id), best first."""
    scores = vectors @ vectors[item - 1]  # (N,): cosine, rows are unit vectors
    banned = np.concatenate([[item], exclude, blocked]).astype(np.int64)
    scores[banned[banned > 0] - 1] = -np.inf
    if candidates is not None:
        allowed = np.full(len(scores), -np.inf, dtype=scores.dtype)
        allowed[candidates - 1] = 0.0
        scores = scores + allowed
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    keep = np.isfinite(scores[top])
    return Ranked(ids=top[keep] + 1, scores=scores[top][keep].astype(np.float32))
