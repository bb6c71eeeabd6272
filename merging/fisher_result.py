"""A computed Fisher as sums over sequences, so that shards add up to the whole.

`FisherResult` holds per-parameter sums of per-sequence Fisher diagonals plus the
count (and the linear layers' input Grams for RegMean): results of Ray tasks
over user shards add to the unsharded result, and the Fisher is their mean.
Parameters are matched by name everywhere (`check_same_keys`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from merging.regmean import GRAM_PREFIX


def check_same_keys(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """Parameters are matched by name: a mismatch is an error that names the keys."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"{what} have different parameter names: only in the first {only_a}, "
            f"only in the second {only_b}"
        )


@dataclass
class FisherResult:
    """Sums of per-sequence Fisher diagonals over `count` sequences.

    Shards add: `sum(results)` or `a + b` gives the result of the union.
    """

    sums: dict[str, Tensor]  # float64, keyed like model.named_parameters()
    count: int
    estimator: str
    batch_shortcut: bool = False
    dropped_mass: float = 0.0  # exact:r: Σ over sequences of the dropped eigenvalue share
    extra: dict[str, Any] = field(default_factory=dict)
    # Input Grams of the linear layers (merging/regmean.py), summed over `gram_rows` rows.
    grams: dict[str, Tensor] = field(default_factory=dict)
    gram_rows: int = 0

    def __add__(self, other: FisherResult) -> FisherResult:
        if (self.estimator, self.batch_shortcut) != (other.estimator, other.batch_shortcut):
            raise ValueError(
                f"cannot add Fishers of {self.estimator} (shortcut {self.batch_shortcut}) and "
                f"{other.estimator} (shortcut {other.batch_shortcut})"
            )
        check_same_keys(self.sums, other.sums, "the two Fishers")
        check_same_keys(self.grams, other.grams, "the two Fishers' Grams")
        return FisherResult(
            {name: self.sums[name] + other.sums[name] for name in self.sums},
            self.count + other.count,
            self.estimator,
            self.batch_shortcut,
            self.dropped_mass + other.dropped_mass,
            grams={name: self.grams[name] + other.grams[name] for name in self.grams},
            gram_rows=self.gram_rows + other.gram_rows,
        )

    def __radd__(self, other: object) -> FisherResult:
        if other == 0:  # lets sum(results) start from 0
            return self
        return NotImplemented

    def mean(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The Fisher: the average over sequences."""
        if self.count == 0:
            raise ValueError("no sequences: the Fisher of an empty set is undefined")
        return {name: (s / self.count).to(dtype) for name, s in self.sums.items()}

    def mean_grams(self) -> dict[str, Tensor]:
        """The Grams per input row (float64: the RegMean solve needs the precision)."""
        if not self.grams:
            return {}
        return {name: g / self.gram_rows for name, g in self.grams.items()}

    def file_tensors(self) -> dict[str, Tensor]:
        """What a Fisher file holds: the Fisher by parameter name, the Grams as "gram:" keys."""
        return {**self.mean(), **{GRAM_PREFIX + k: g for k, g in self.mean_grams().items()}}

    @property
    def mean_dropped_mass(self) -> float:
        return self.dropped_mass / self.count if self.count else 0.0


def relative_error(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """||estimate - reference|| / ||reference|| over all parameters together."""
    check_same_keys(estimate, reference, "the estimate and the reference")
    num = sum(
        float((estimate[k].double() - reference[k].double()).square().sum()) for k in reference
    )
    den = sum(float(reference[k].double().square().sum()) for k in reference)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
