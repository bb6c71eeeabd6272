"""Ranking metrics under the three candidate settings of docs/evaluation.md.

- `full`: every item is a candidate; the items of the user's whole history
  (other than the target itself) are excluded by default, as in the
  SASRec/ICLRec/RecBole/SASRec+ code. The model reads only the newest
  `max_len` items, but exclusion never depends on that: an item older than the
  model's input is still the user's, and MostPop excludes exactly the same set.
- `random100`: the target plus 100 items drawn uniformly (seeded) among the items
  the user never interacted with.
- `popular100`: the target plus the 100 most popular training items the user
  never interacted with.

Ties are scored by their expectation under a uniformly random order among the
tied candidates: a model that gives every item the same score gets the metrics of
a random ranking, not of a perfect one. (Counting only strictly greater scores,
as much research code does, rewards ties: MostPop's integer counts tie a lot.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from training.batching import pad_left
from training.model import SequenceRecommender
from training.splits import EvalSplit, Split

SETTINGS = ("full", "random100", "popular100")
CUTOFFS = (10, 20)
NUM_NEGATIVES = 100

# Scores every item for a batch of left-padded histories: (B, L) -> (B, N).
Scorer = Callable[[Tensor], Tensor]


def expected_rank_metrics(
    greater: Tensor, ties: Tensor, cutoffs: Sequence[int] = CUTOFFS
) -> dict[str, Tensor]:
    """Per-user NDCG@k, HR@k and MRR from rank statistics.

    `greater` (U,) counts candidates scored above the target, `ties` (U,) the other
    candidates scored equal to it. The target's 0-based rank is uniform on
    [greater, greater + ties], and every metric is its expectation over that range.
    """
    greater = greater.double()
    ties = ties.double()
    top = int((greater + ties).max().item()) + 2 if len(greater) else 2
    ranks = torch.arange(top, dtype=torch.float64)
    # cumulative[r] = sum of per-rank gains for ranks 0..r-1 (cumulative[0] = 0)
    ndcg_gain = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum(1.0 / torch.log2(ranks + 2), 0)]
    )
    rr_gain = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1.0 / (ranks + 1), 0)])
    first = greater.long()
    last = (greater + ties).long()
    width = ties + 1

    def mean_gain(cumulative: Tensor, cutoff: int | None) -> Tensor:
        end = last if cutoff is None else torch.clamp(last, max=cutoff - 1)
        total = cumulative[end + 1] - cumulative[first]
        return torch.where(end >= first, total, torch.zeros_like(total)) / width

    out: dict[str, Tensor] = {}
    for k in cutoffs:
        out[f"ndcg@{k}"] = mean_gain(ndcg_gain, k)
        covered = torch.clamp(last, max=k - 1) - first + 1
        out[f"hr@{k}"] = torch.clamp(covered, min=0).double() / width
    out["mrr"] = mean_gain(rr_gain, None)
    return out


def rank_statistics(
    scores: Tensor, target_scores: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(greater, ties) of each row's target among `scores` (U, C).

    `scores` includes the target itself once; `valid` (U, C) bool marks real
    candidates (False for excluded items and padding of candidate lists).
    """
    target = target_scores[:, None]
    above = scores > target
    equal = scores == target
    if valid is not None:
        above &= valid
        equal &= valid
    return above.sum(1), equal.sum(1) - 1


@dataclass(frozen=True)
class CandidateSets:
    """Sampled candidate lists: column 0 is the target, then NUM_NEGATIVES items."""

    random100: np.ndarray  # (U, 1 + n) int64
    popular100: np.ndarray  # (U, 1 + n) int64


def build_candidates(
    split: EvalSplit, popularity: np.ndarray, seed: int = 0, num_negatives: int = NUM_NEGATIVES
) -> CandidateSets:
    """Seeded random and popular negatives among the items each user never interacted with."""
    num_items = len(popularity) - 1
    rng = np.random.default_rng(seed)
    # Most popular first; ties by id so the order is deterministic.
    by_popularity = np.lexsort((np.arange(1, num_items + 1), -popularity[1:])) + 1
    random_rows, popular_rows = [], []
    for target, seen in zip(split.targets, split.seen, strict=True):
        seen_set = np.unique(np.append(seen, target))
        random_rows.append(
            _pad_row(target, _sample_unseen(rng, num_items, seen_set, num_negatives), num_negatives)
        )
        head = by_popularity[: num_negatives + len(seen_set)]
        unseen_popular = head[~np.isin(head, seen_set)]
        popular_rows.append(_pad_row(target, unseen_popular[:num_negatives], num_negatives))
    return CandidateSets(np.stack(random_rows), np.stack(popular_rows))


def _sample_unseen(
    rng: np.random.Generator, num_items: int, seen: np.ndarray, n: int
) -> np.ndarray:
    available = num_items - len(seen)
    if available <= n:  # small catalogues: take every unseen item
        return np.setdiff1d(np.arange(1, num_items + 1), seen)
    picked: np.ndarray = np.empty(0, dtype=np.int64)
    while len(picked) < n:
        draw = rng.integers(1, num_items + 1, size=2 * n)
        draw = draw[~np.isin(draw, seen)]
        picked = np.concatenate([picked, draw])
        picked = picked[np.sort(np.unique(picked, return_index=True)[1])]
    return picked[:n]


def _pad_row(target: int, negatives: np.ndarray, n: int) -> np.ndarray:
    # 0 pads lists shorter than n (tiny catalogues); it is never a valid candidate.
    row = np.zeros(1 + n, dtype=np.int64)
    row[0] = target
    row[1 : 1 + len(negatives)] = negatives[:n]
    return row


@dataclass(frozen=True)
class EvalResult:
    """Mean metrics and the per-user values behind them, by candidate setting."""

    metrics: dict[str, dict[str, float]]
    per_user: dict[str, dict[str, np.ndarray]]


def evaluate_scorer(
    scorer: Scorer,
    split: EvalSplit,
    candidates: CandidateSets,
    *,
    exclude_seen: bool = True,
    batch_size: int = 512,
    max_history: int | None = None,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Ranking metrics of `scorer` on `split` under every candidate setting."""
    stats: dict[str, list[tuple[Tensor, Tensor]]] = {s: [] for s in SETTINGS}
    # Similar lengths in a batch keep padding small; results are put back in user order.
    order = np.argsort([len(h) for h in split.histories], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        whole = [split.histories[i] for i in rows]
        # Truncation is for the model input only; exclusion uses the whole history.
        histories = pad_left(whole, max_history).to(device)
        targets = torch.as_tensor(split.targets[rows], device=device)
        scores = _with_padding_column(scorer(histories).float())  # (B, N + 1)
        target_scores = scores.gather(1, targets[:, None])[:, 0]
        full = scores.clone()
        if exclude_seen:
            full.scatter_(1, pad_left(whole).to(device), float("-inf"))
        full[:, 0] = float("-inf")
        full.scatter_(1, targets[:, None], target_scores[:, None])
        stats["full"].append(rank_statistics(full, target_scores, torch.isfinite(full)))
        for setting, table in (
            ("random100", candidates.random100),
            ("popular100", candidates.popular100),
        ):
            ids = torch.as_tensor(table[rows], device=device)
            stats[setting].append(rank_statistics(scores.gather(1, ids), target_scores, ids != 0))
    inverse = np.argsort(order, kind="stable")
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for setting, parts in stats.items():
        greater = torch.cat([g for g, _ in parts]).cpu()
        ties = torch.cat([t for _, t in parts]).cpu()
        values = expected_rank_metrics(greater, ties)
        per_user[setting] = {name: v.numpy()[inverse] for name, v in values.items()}
    metrics = {
        s: {m: float(v.mean()) if len(v) else 0.0 for m, v in ms.items()}
        for s, ms in per_user.items()
    }
    return EvalResult(metrics=metrics, per_user=per_user)


def _with_padding_column(scores: Tensor) -> Tensor:
    """(B, N) -> (B, N + 1) so that column i is item id i (column 0 is padding)."""
    return torch.cat([torch.full_like(scores[:, :1], float("-inf")), scores], dim=1)


def model_scorer(model: SequenceRecommender) -> Scorer:
    """Inference-mode scoring with the model's own prediction path."""

    def score(histories: Tensor) -> Tensor:
        with torch.inference_mode():
            return model.logits(histories)

    return score


def popularity_scorer(popularity: np.ndarray) -> Scorer:
    """MostPop: every user gets the training popularity of each item as its score."""
    counts = torch.as_tensor(popularity[1:], dtype=torch.float32)

    def score(histories: Tensor) -> Tensor:
        return counts.to(histories.device).expand(histories.shape[0], -1)

    return score


@dataclass
class Evaluator:
    """Evaluates models on one data split with fixed candidate sets (built once)."""

    split: Split
    seed: int = 0
    exclude_seen: bool = True
    batch_size: int = 512
    _candidates: dict[str, CandidateSets] = field(default_factory=dict, init=False, repr=False)

    def candidates(self, part: str) -> CandidateSets:
        if part not in self._candidates:
            self._candidates[part] = build_candidates(
                self._part(part), self.split.popularity, self.seed
            )
        return self._candidates[part]

    def _part(self, part: str) -> EvalSplit:
        if part not in ("valid", "test"):
            raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
        return getattr(self.split, part)

    def evaluate(
        self,
        scorer: Scorer,
        part: str,
        max_history: int | None = None,
        device: str | torch.device = "cpu",
    ) -> EvalResult:
        return evaluate_scorer(
            scorer,
            self._part(part),
            self.candidates(part),
            exclude_seen=self.exclude_seen,
            batch_size=self.batch_size,
            max_history=max_history,
            device=device,
        )

    def evaluate_model(self, model: SequenceRecommender, part: str) -> EvalResult:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            return self.evaluate(model_scorer(model), part, model.config.max_len, device)
        finally:
            model.train(was_training)

    def evaluate_mostpop(self, part: str) -> EvalResult:
        return self.evaluate(popularity_scorer(self.split.popularity), part)

    def metrics_document(self, model: SequenceRecommender | Scorer) -> dict:
        """The metrics.json structure of docs/architecture.md for a model (or any scorer) and MostPop."""
        document: dict = {
            "protocol": {
                "split": self.split.protocol,
                "exclude_seen": self.exclude_seen,
                "ties": "expected over random order",
                "negatives": NUM_NEGATIVES,
                "candidate_seed": self.seed,
            },
            "model": {},
            "mostpop": {},
        }
        for part in ("valid", "test"):
            if isinstance(model, SequenceRecommender):
                result = self.evaluate_model(model, part)
            else:
                result = self.evaluate(model, part)
            document["model"][part] = result.metrics
            document["mostpop"][part] = self.evaluate_mostpop(part).metrics
        return document


def format_table(
    rows: dict[str, dict[str, dict[str, float]]],
    metrics: Sequence[str] = ("ndcg@10", "ndcg@20", "hr@10"),
) -> str:
    """A markdown table: one row per model, columns setting/metric."""
    header = ["model"] + [f"{s} {m}" for s in SETTINGS for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, by_setting in rows.items():
        cells = [f"{by_setting[s][m]:.4f}" for s in SETTINGS for m in metrics]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
