"""The Fisher estimators by name: which items j of a sequence they sum over, with what weight.

An estimator is selected by a spec, `name` or `name:n`; `ESTIMATORS` is the one
registry of names (docs/merging.md):

| spec        | items j and weights                                        |
|-------------|------------------------------------------------------------|
| `exact[:r]` | all items, exactly, in D VJPs (top r eigenpairs if r given) |
| `truncated:K` | as exact, C from the K most probable items and K draws   |
| `full`      | all items by brute force: |V| VJPs (the reference)          |
| `random:n`  | n items uniformly without replacement, weight p_j |V| / n    |
| `topk:n`    | the n most probable items, weight p_j                       |
| `sample:n`  | n draws from p, weight 1/n (Monte Carlo)                    |
| `target`    | the true next item, weight p(v*) (thesis Eq. 3.13)          |
| `empirical` | the true next item, weight 1                                |

Each item-list estimator is a `Selector`; merging/fisher.py runs them through
the per-sequence engines of merging/fisher_exact.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

# Picks the items j of one sequence and their weights: (p (N,), target column, n, generator)
# -> (columns (K,) int64, weights (K,)); the estimate is Σ_k weight_k g(j_k)².
Selector = Callable[[Tensor, int, int | None, torch.Generator], tuple[Tensor, Tensor]]


def _all_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.arange(len(p)), p


def _random_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    # Without replacement each item is included with probability k/N, so the
    # weight p_j N/k makes the estimate unbiased (and exact when k = N).
    k = min(int(n or 0), len(p))
    items = torch.randperm(len(p), generator=gen)[:k]
    return items, p[items] * (len(p) / k)


def _topk_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    weights, items = p.topk(min(int(n or 0), len(p)))
    return items, weights


def _sampled_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    items = torch.multinomial(p, int(n or 0), replacement=True, generator=gen)
    return items, torch.full((len(items),), 1.0 / len(items), dtype=p.dtype)


def _target_item(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.tensor([target]), p[target : target + 1]


def _empirical_item(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.tensor([target]), torch.ones(1, dtype=p.dtype)


@dataclass(frozen=True)
class EstimatorKind:
    """One registered estimator: how it picks items, and whether it takes `:n`."""

    select: Selector | None  # None: the exact identity (no item list)
    takes_n: Literal["required", "optional", "never"]
    engine: Literal["exact", "structured", "autograd"]  # default per-sequence engine
    description: str


ESTIMATORS: dict[str, EstimatorKind] = {
    "exact": EstimatorKind(
        None, "optional", "exact", "all items exactly in D VJPs; exact:r keeps the top r eigenpairs"
    ),
    "truncated": EstimatorKind(
        None,
        "required",
        "exact",
        "exact, with the output covariance from the n most probable items and n draws "
        "from the rest (unbiased): O(n D²) instead of O(|V| D²) at large catalogues",
    ),
    "full": EstimatorKind(
        _all_items, "never", "autograd", "all items by brute force (|V| VJPs): the reference"
    ),
    "random": EstimatorKind(
        _random_items, "required", "structured", "n uniform items, importance-weighted"
    ),
    "topk": EstimatorKind(_topk_items, "required", "structured", "the n most probable items"),
    "sample": EstimatorKind(_sampled_items, "required", "structured", "n items drawn from p"),
    "target": EstimatorKind(_target_item, "never", "structured", "the true next item, p(v*) g²"),
    "empirical": EstimatorKind(_empirical_item, "never", "structured", "the true next item, g²"),
}


@dataclass(frozen=True)
class EstimatorSpec:
    """A parsed estimator: `name` or `name:n`."""

    name: str
    n: int | None = None

    @property
    def kind(self) -> EstimatorKind:
        return ESTIMATORS[self.name]

    def __str__(self) -> str:
        return self.name if self.n is None else f"{self.name}:{self.n}"


def parse_estimator(text: str) -> EstimatorSpec:
    """'sample:50' -> EstimatorSpec('sample', 50); a clear error for anything else."""
    name, sep, count = str(text).strip().partition(":")
    if name not in ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {text!r}; known: {', '.join(ESTIMATORS)}")
    kind = ESTIMATORS[name]
    if not sep:
        if kind.takes_n == "required":
            raise ValueError(f"estimator {name!r} needs a count, e.g. {name}:50")
        return EstimatorSpec(name)
    if kind.takes_n == "never":
        raise ValueError(f"estimator {name!r} takes no count, got {text!r}")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"estimator {text!r}: the count must be a positive integer")
    return EstimatorSpec(name, int(count))
