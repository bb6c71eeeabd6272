"""Ranking metrics against hand computations, in every candidate setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.evaluate import (
    CandidateSets,
    build_candidates,
    evaluate_scorer,
    expected_rank_metrics,
    popularity_scorer,
)
from training.splits import EvalSplit


def metrics(greater: list[int], ties: list[int]) -> dict[str, list[float]]:
    out = expected_rank_metrics(torch.tensor(greater), torch.tensor(ties))
    return {k: v.tolist() for k, v in out.items()}


def test_rank_metrics_without_ties() -> None:
    m = metrics([0, 2, 9, 10, 15], [0, 0, 0, 0, 0])
    assert m["ndcg@10"] == pytest.approx([1.0, 1 / math.log2(4), 1 / math.log2(11), 0.0, 0.0])
    assert m["hr@10"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert m["ndcg@20"][4] == pytest.approx(1 / math.log2(17))
    assert m["mrr"] == pytest.approx([1.0, 1 / 3, 1 / 10, 1 / 11, 1 / 16])


def test_ties_count_as_a_random_order() -> None:
    # target tied with one other item at the top: rank 0 or 1 with equal chance
    m = metrics([0], [1])
    assert m["ndcg@10"][0] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert m["mrr"][0] == pytest.approx((1 + 1 / 2) / 2)
    # tied with 19 others right at the cut-off 10: half of the ranks make the top 10
    m = metrics([0], [19])
    assert m["hr@10"][0] == pytest.approx(10 / 20)
    # a constant model over 100 candidates is a random ranking, not a perfect one
    m = metrics([0], [99])
    assert m["hr@10"][0] == pytest.approx(0.1)


def split_of(
    histories: list[list[int]], targets: list[int], seen: list[list[int]] | None = None
) -> EvalSplit:
    return EvalSplit(
        users=np.arange(len(targets)),
        histories=[np.array(h, dtype=np.int64) for h in histories],
        targets=np.array(targets, dtype=np.int64),
        seen=[
            np.array(s, dtype=np.int64)
            for s in (seen or [[*h, t] for h, t in zip(histories, targets, strict=False)])
        ],
    )


def fixed_scorer(scores: list[float]):
    table = torch.tensor(scores, dtype=torch.float32)

    def score(histories: torch.Tensor) -> torch.Tensor:
        return table.expand(histories.shape[0], -1)

    return score


def no_candidates(n: int) -> CandidateSets:
    empty = np.zeros((n, 101), dtype=np.int64)
    return CandidateSets(empty, empty)


def test_full_setting_excludes_history_but_not_the_target() -> None:
    # items 1..6; scores give item 6 the top, then 5, 4, ...
    scorer = fixed_scorer([1, 2, 3, 4, 5, 6])
    split = split_of([[6, 5], [6, 3]], [3, 3])
    excluded = evaluate_scorer(scorer, split, no_candidates(2), exclude_seen=True).per_user["full"]
    # user 0: 6 and 5 are history -> item 4 is the only one above target 3
    assert excluded["ndcg@10"][0] == pytest.approx(1 / math.log2(3))
    # user 1: the target 3 is also in the history and stays rankable; 6 excluded -> 5, 4 above
    assert excluded["ndcg@10"][1] == pytest.approx(1 / math.log2(4))
    ranked = evaluate_scorer(scorer, split, no_candidates(2), exclude_seen=False).per_user["full"]
    assert ranked["ndcg@10"][0] == pytest.approx(1 / math.log2(5))


def test_items_older_than_the_model_input_stay_excluded() -> None:
    # History 9, 8, 7, 6 (oldest first) with a model input of 2 items: the model sees
    # 7, 6 only, but 9 and 8 are still the user's and must never be ranked above 3.
    inputs: list[list[int]] = []

    def scorer(histories: torch.Tensor) -> torch.Tensor:
        inputs.extend(histories.tolist())
        return torch.arange(1, 11, dtype=torch.float32).expand(histories.shape[0], -1)

    split = split_of([[9, 8, 7, 6]], [3])
    result = evaluate_scorer(scorer, split, no_candidates(1), max_history=2).per_user["full"]
    assert inputs == [[7, 6]]  # truncation applies to the model input
    # above 3: only 10, 5 and 4 (9, 8, 7, 6 excluded)
    assert result["ndcg@10"][0] == pytest.approx(1 / math.log2(5))


def test_mostpop_and_model_exclude_the_same_items() -> None:
    # A model scoring exactly like MostPop, but reading a truncated input, gets
    # MostPop's metrics: both exclude the whole history.
    rng = np.random.default_rng(0)
    popularity = np.array([0, *rng.integers(1, 1000, size=50)])
    histories = [list(rng.choice(np.arange(1, 51), size=30, replace=False)) for _ in range(20)]
    targets = [int(rng.integers(1, 51)) for _ in histories]
    split = split_of(histories, targets)
    mostpop = popularity_scorer(popularity)
    reference = evaluate_scorer(mostpop, split, no_candidates(20)).per_user["full"]
    truncated = evaluate_scorer(mostpop, split, no_candidates(20), max_history=5).per_user["full"]
    np.testing.assert_allclose(truncated["ndcg@10"], reference["ndcg@10"])


def test_sampled_settings_rank_only_their_candidates() -> None:
    scorer = fixed_scorer([float(i) for i in range(1, 201)])  # item i scores i
    split = split_of([[1]], [150], seen=[[1, 150]])
    candidates = CandidateSets(
        random100=np.array([[150, 2, 3, 160, 170] + [0] * 96]),  # 0 = padding of short lists
        popular100=np.array([[150] + list(range(151, 251 - 50)) + [0] * 50]),
    )
    result = evaluate_scorer(scorer, split, candidates).per_user
    assert result["random100"]["ndcg@10"][0] == pytest.approx(1 / math.log2(4))  # 160, 170 above
    assert result["popular100"]["hr@10"][0] == 0.0  # 50 items above
    assert result["popular100"]["hr@20"][0] == 0.0


def test_k_larger_than_the_candidate_set() -> None:
    scorer = fixed_scorer([5.0, 4.0, 3.0])
    split = split_of([[]], [3])
    result = evaluate_scorer(scorer, split, no_candidates(1)).per_user["full"]
    assert result["hr@20"][0] == 1.0
    assert result["ndcg@20"][0] == pytest.approx(1 / math.log2(4))


def test_candidates_avoid_seen_items_and_are_seeded() -> None:
    popularity = np.array([0, *list(range(300, 0, -1))])  # item 1 most popular
    split = split_of([[1, 2, 3], [4]], [5, 9], seen=[[1, 2, 3, 5, 7], [4, 9]])
    a = build_candidates(split, popularity, seed=3)
    b = build_candidates(split, popularity, seed=3)
    c = build_candidates(split, popularity, seed=4)
    assert np.array_equal(a.random100, b.random100)
    assert not np.array_equal(a.random100, c.random100)
    for row, seen in zip(a.random100, split.seen, strict=False):
        assert row[0] in seen
        negatives = row[1:]
        assert len(set(negatives.tolist())) == 100
        assert not set(negatives.tolist()) & set(seen.tolist())
    assert a.popular100[0, 1:6].tolist() == [4, 6, 8, 9, 10]
    assert a.popular100[1, 1:4].tolist() == [1, 2, 3]


def test_mostpop_scores_by_training_counts() -> None:
    popularity = np.array([0, 10, 30, 20])
    split = split_of([[]], [3])
    result = evaluate_scorer(popularity_scorer(popularity), split, no_candidates(1)).per_user[
        "full"
    ]
    assert result["ndcg@10"][0] == pytest.approx(1 / math.log2(3))
