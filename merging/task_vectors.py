"""Merges of task vectors relative to a shared base: task arithmetic and TIES.

When every recipe is fine-tuned from one base θ_0, model m is the base plus a
task vector τ_m = θ_m - θ_0, and merges can work on the τ:

- task arithmetic (Ilharco et al., ICLR 2023): θ = θ_0 + s Σ_m λ_m τ_m. With λ
  summing to 1 and s = 1 this is the plain average; s > 1 extrapolates along
  the average task vector (s = M, λ = 1/M adds the task vectors).
- TIES (Yadav et al., NeurIPS 2023): per parameter tensor, keep the `density`
  share of each τ_m with the largest magnitude (trim), choose each
  coordinate's sign by the sign of the sum of the trimmed values (elect), and
  average only the trimmed values of that sign (disjoint mean); then
  θ = θ_0 + s τ_TIES. Trimming per tensor, not over the whole flattened model,
  keeps small tensors (norms, biases) from being trimmed away entirely by the
  item embedding's larger values.

Both take λ (TIES weights the disjoint mean by it) and s from MergeConfig.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def task_vectors(
    base: StateDict, states: Sequence[StateDict], names: Sequence[str]
) -> list[StateDict]:
    """τ_m = θ_m - θ_0 (float64) for the named parameters."""
    missing = sorted(set(names) - set(base))
    if missing:
        raise ValueError(f"the base has no {missing}: it is not the models' base")
    for name in names:
        if base[name].shape != states[0][name].shape:
            raise ValueError(
                f"{name}: base shape {tuple(base[name].shape)} is not the models' "
                f"{tuple(states[0][name].shape)}"
            )
    return [{n: s[n].double() - base[n].double() for n in names} for s in states]


def task_arithmetic(
    base: StateDict, vectors: Sequence[StateDict], coefficients: Sequence[float], scale: float
) -> StateDict:
    """θ_0 + scale Σ_m λ_m τ_m, per named parameter (the names of the task vectors)."""
    return {
        name: base[name].double()
        + scale * sum(lam * v[name] for lam, v in zip(coefficients, vectors, strict=True))
        for name in vectors[0]
    }


def trimmed(vector: Tensor, density: float) -> Tensor:
    """The vector with all but its ceil(density * size) largest-magnitude entries zeroed."""
    keep = max(1, int(torch.ceil(torch.tensor(density * vector.numel())).item()))
    if keep >= vector.numel():
        return vector.clone()
    threshold = vector.abs().flatten().kthvalue(vector.numel() - keep + 1).values
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def ties_vector(values: Sequence[Tensor], coefficients: Sequence[float], density: float) -> Tensor:
    """TIES of one tensor's task vectors: trim, elect the sign, λ-weighted disjoint mean."""
    kept = torch.stack([trimmed(v, density) for v in values])  # (M, ...)
    lam = torch.tensor(list(coefficients), dtype=kept.dtype).reshape(-1, *[1] * (kept.dim() - 1))
    sign = torch.sign((lam * kept).sum(0))
    agree = (torch.sign(kept) == sign) & (kept != 0)
    weight = lam * agree
    total = weight.sum(0)
    merged = (weight * kept).sum(0) / total.clamp(min=torch.finfo(kept.dtype).tiny)
    return torch.where(total > 0, merged, torch.zeros_like(merged))


def ties(
    base: StateDict,
    vectors: Sequence[StateDict],
    coefficients: Sequence[float],
    density: float,
    scale: float,
) -> StateDict:
    """θ_0 + scale τ_TIES, per named parameter."""
    return {
        name: base[name].double()
        + scale * ties_vector([v[name] for v in vectors], coefficients, density)
        for name in vectors[0]
    }
