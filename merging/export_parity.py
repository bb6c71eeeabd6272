"""Parity of an exported graph with torch: the check every export must pass.

Every export is checked on real histories of the data against the torch model
(`measure_parity`, histories from `parity_histories`): the export fails when the
scores differ by more than `PARITY_MAX_ABS_DIFF` or the top-k lists disagree
beyond near-ties. Half of the batches also carry random filters (exclusions,
candidates, blocked items), and the first rows run one at a time. `ndcg_at_10`
measures what a graph ranks, for the int8 graph's quality check
(merging/quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merging.onnx_graph import FULL_SCORES_OUTPUT, ExportError, OnnxRecommender, torch_scores
from serving.runtime import NO_IDS, Filters
from training.batching import pad_left
from training.evaluate import Evaluator
from training.model import SequenceRecommender
from training.splits import Split

# Parity of the float graph with torch; the export fails outside these.
PARITY_MAX_ABS_DIFF = 1e-4  # on every finite score, and excluded (-inf) entries must match
PARITY_MIN_TOPK_AGREEMENT = 1.0  # share of rows whose top-k agrees up to near-ties
# Two torch scores closer than this are a tie: either order is a correct top-k.
TIE_TOLERANCE = PARITY_MAX_ABS_DIFF
PARITY_K = 10  # k of the top-k agreement check (capped at num_items)
PARITY_BATCH = 64
PARITY_SINGLE_ROWS = 4  # the first parity rows also run one at a time (batch 1)


@dataclass(frozen=True)
class Parity:
    """How an ONNX graph's outputs compare with torch on the same histories."""

    max_abs_diff: float  # over finite scores; inf when excluded (-inf) entries differ
    topk_agreement: float  # share of rows whose top-k is a correct top-k of torch's scores
    sequences: int

    def passes(self) -> bool:
        return (
            self.max_abs_diff <= PARITY_MAX_ABS_DIFF
            and self.topk_agreement >= PARITY_MIN_TOPK_AGREEMENT
        )

    def to_json(self, passed: bool) -> dict[str, Any]:
        return {
            "max_abs_diff": float(self.max_abs_diff),
            "topk_agreement": float(self.topk_agreement),
            "sequences": self.sequences,
            "passed": passed,
        }


def parity_histories(split: Split, history: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` real histories of varied length, for the parity check.

    The first rows are the edge cases (length 1, exactly `history`, a row of
    padding only, the longest history of the data uncut, which the graph must
    truncate itself); then random cuts of random users, with more padding rows.
    """
    if count < 2 * PARITY_SINGLE_ROWS:
        raise ValueError(f"parity needs at least {2 * PARITY_SINGLE_ROWS} sequences, got {count}")
    pool = [h for h in split.test.histories if len(h)]
    if not pool:
        raise ExportError("the data has no non-empty test history to check parity on")
    rng = np.random.default_rng(seed)
    longest = max(pool, key=len)
    empty = np.zeros(0, dtype=np.int64)
    rows = [pool[int(rng.integers(len(pool)))][-1:], longest[-history:], empty, longest]
    rest = []
    for _ in range(count - len(rows)):
        if rng.random() < 1 / 16:
            rest.append(empty)
            continue
        source = pool[int(rng.integers(len(pool)))]
        rest.append(source[-int(rng.integers(1, history + 1)) :])
    return rows + rest


def parity_batches(histories: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The first rows one at a time (batch 1), the rest in batches of mixed lengths."""
    singles = [[h] for h in histories[:PARITY_SINGLE_ROWS]]
    rest = histories[PARITY_SINGLE_ROWS:]
    return singles + [rest[i : i + PARITY_BATCH] for i in range(0, len(rest), PARITY_BATCH)]


def measure_parity(
    model: SequenceRecommender,
    graph: OnnxRecommender,
    histories: list[np.ndarray],
    k: int = PARITY_K,
    seed: int = 0,
) -> Parity:
    """Compare `graph` with torch on `histories`, half of the rows with exclusion.

    Scores: every item's score (a top-k over all items, scattered back), plus the
    top-k scores and, when the graph has it, its all_scores output. Top-k: a row
    agrees when the graph's items are distinct and their torch scores equal the
    torch top-k scores within TIE_TOLERANCE (so near-ties may come in any order).
    """
    k = min(k, graph.num_items)
    rng = np.random.default_rng(seed)
    worst, agreeing = 0.0, 0
    for number, rows in enumerate(parity_batches(histories)):
        item_ids = pad_left(rows)
        exclude = torch.from_numpy(rng.random(len(rows)) < 0.5)
        filters = random_filters(rng, len(rows), graph.num_items) if number % 2 else None
        expected = torch_scores(model, item_ids, exclude, filters).numpy()  # (B, N)
        ids, flags = item_ids.numpy(), exclude.numpy()
        worst = max(worst, score_diff(graph.all_scores(ids, flags, filters), expected))
        out = graph.run(ids, k, flags, filters)
        reference = -np.sort(-expected, axis=1)[:, :k]
        worst = max(worst, score_diff(out["scores"], reference))
        if FULL_SCORES_OUTPUT in out:
            worst = max(worst, score_diff(out[FULL_SCORES_OUTPUT], expected))
        agreeing += int(topk_agrees(out["indices"], expected, reference).sum())
    return Parity(worst, agreeing / len(histories), len(histories))


def random_filters(rng: np.random.Generator, batch: int, num_items: int) -> Filters:
    """Exclusions on every row, candidates on half of them, a few blocked items."""
    excluded = [rng.integers(0, num_items + 1, size=int(rng.integers(0, 8))) for _ in range(batch)]
    candidates = [
        rng.integers(1, num_items + 1, size=int(rng.integers(1, 4 * PARITY_K)))
        if rng.random() < 0.5
        else NO_IDS
        for _ in range(batch)
    ]
    blocked = rng.integers(1, num_items + 1, size=int(rng.integers(0, 4)))
    return Filters.of_rows(excluded, candidates, blocked)


def score_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference over finite entries; inf when the non-finite entries differ."""
    finite = np.isfinite(expected)
    if not np.array_equal(np.isfinite(actual), finite) or not np.array_equal(
        actual[~finite], expected[~finite]
    ):
        return float("inf")
    return float(np.abs(actual[finite] - expected[finite]).max(initial=0.0))


def topk_agrees(indices: np.ndarray, expected: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(B,) bool: the graph's top-k ids are a correct top-k of the torch scores, ties allowed."""
    num_items = expected.shape[1]
    valid = ((indices >= 1) & (indices <= num_items)).all(1)
    distinct = np.array([len(set(row)) == len(row) for row in indices.tolist()])
    picked = np.take_along_axis(expected, np.clip(indices - 1, 0, num_items - 1), axis=1)
    picked = -np.sort(-picked, axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf: both excluded, equal by the first test
        close = (picked == reference) | (np.abs(picked - reference) <= TIE_TOLERANCE)
    return valid & distinct & close.all(1)


def ndcg_at_10(graph: OnnxRecommender, evaluator: Evaluator) -> float:
    """NDCG@10 of the graph on the test split, full ranking with history excluded."""

    def score(histories: Tensor) -> Tensor:
        keep = np.zeros(histories.shape[0], dtype=np.bool_)  # the evaluator excludes itself
        return torch.from_numpy(graph.all_scores(histories.numpy(), keep))

    return evaluator.evaluate(score, "test").metrics["full"]["ndcg@10"]
