"""The one formula every merge method builds on: the (Fisher-)weighted average.

Per coordinate, with λ one coefficient per model,

    θ* = Σ_m λ_m F_m θ_m / Σ_m λ_m F_m

with F_m the model's diagonal Fisher (floored, optionally normalised) or, when
no Fishers are given, F_m = 1: the λ-weighted average. `FisherWeighting`
precomputes the λ-free parts so that the λ searches of merging/strategies.py
are cheap; `merge_state_dicts` is the formula in one call. Parameters are
matched by name, never by position; tensors that are not merged (buffers,
integers) must be equal in every model and are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merging.fisher_result import check_same_keys

StateDict = dict[str, Tensor]


def check_coefficients(coefficients: Sequence[float] | None, count: int) -> list[float]:
    """λ: one non-negative finite value per model, not all zero (default: uniform)."""
    if coefficients is None:
        return [1.0 / count] * count
    values = [float(c) for c in coefficients]
    if len(values) != count:
        raise ValueError(f"{len(values)} coefficients for {count} models")
    if any(not np.isfinite(c) or c < 0 for c in values) or sum(values) <= 0:
        raise ValueError(f"coefficients must be >= 0, finite and not all 0, got {values}")
    return values


def check_states(states: Sequence[StateDict], parameter_names: set[str]) -> None:
    """The models have the same names and shapes, and hold every parameter to merge."""
    if not states:
        raise ValueError("nothing to merge: no models given")
    for index, state in enumerate(states[1:], start=1):
        check_same_keys(states[0], state, f"model 0 and model {index}")
        for name, tensor in state.items():
            if tensor.shape != states[0][name].shape:
                raise ValueError(
                    f"{name}: model {index} has shape {tuple(tensor.shape)}, "
                    f"model 0 has {tuple(states[0][name].shape)}"
                )
    unknown = sorted(parameter_names - set(states[0]))
    if unknown:
        raise ValueError(f"parameters {unknown} are not in the models' state dicts")


def kept_tensors(states: Sequence[StateDict], parameter_names: set[str]) -> StateDict:
    """Tensors that are not merged (buffers, integer tensors): equal in all models, kept."""
    kept = {}
    for name in sorted(set(states[0]) - parameter_names):
        first = states[0][name]
        differing = [i for i, s in enumerate(states) if not torch.equal(s[name], first)]
        if differing:
            raise ValueError(
                f"{name} is not a mergeable parameter and differs in models {differing}"
            )
        kept[name] = first.clone()
    return kept


def default_parameter_names(state: StateDict) -> set[str]:
    """What is merged unless the caller names the parameters: every floating tensor."""
    return {name for name, tensor in state.items() if tensor.is_floating_point()}


class FisherWeighting:
    """Precomputed λ-free parts of the merge, so that many λ are cheap to try.

    Holds F'_m θ_m and F'_m per model (float64), F' = max(F_m / norm_m, floor)
    with norm_m the model's mean Fisher when normalising (1 otherwise). Without
    Fishers F' = 1 and the merge is the λ-weighted average.
    """

    def __init__(
        self,
        states: Sequence[StateDict],
        fishers: Sequence[StateDict] | None = None,
        fisher_floor: float = 1e-6,
        normalize_fishers: bool = False,
        parameter_names: set[str] | None = None,
    ) -> None:
        names = default_parameter_names(states[0]) if parameter_names is None else parameter_names
        check_states(states, names)
        self.names = sorted(names)
        self.template = {name: states[0][name] for name in self.names}
        self.kept = kept_tensors(states, names)
        self.order = list(states[0])
        self.count = len(states)
        self.weighted: list[StateDict] = []
        self.weights: list[StateDict] | None = None
        if fishers is None:
            self.weighted = [{n: s[n].double() for n in self.names} for s in states]
            return
        if len(fishers) != len(states):
            raise ValueError(f"{len(fishers)} Fishers for {len(states)} models")
        self.weights = []
        for index, fisher in enumerate(fishers):
            check_same_keys(
                {n: None for n in self.names}, fisher, f"the parameters and Fisher {index}"
            )
            weights = _floored(fisher, self.names, fisher_floor, normalize_fishers, index)
            self.weights.append(weights)
            self.weighted.append({n: weights[n] * states[index][n].double() for n in self.names})

    def __call__(
        self,
        coefficients: Sequence[float] | None = None,
        per_name: dict[str, Sequence[float]] | None = None,
    ) -> StateDict:
        """The merge with λ = `coefficients`, or `per_name[name]` for the names it lists."""
        default = check_coefficients(coefficients, self.count)
        per_name = {n: check_coefficients(c, self.count) for n, c in (per_name or {}).items()}
        merged: StateDict = {}
        for name in self.names:
            lam = per_name.get(name, default)
            numerator = sum(c * w[name] for c, w in zip(lam, self.weighted, strict=True))
            if self.weights is None:
                denominator: Any = sum(lam)
            else:
                denominator = sum(c * w[name] for c, w in zip(lam, self.weights, strict=True))
            merged[name] = (numerator / denominator).to(self.template[name].dtype)
        merged.update(self.kept)
        return {name: merged[name] for name in self.order}


def _floored(
    fisher: StateDict, names: list[str], floor: float, normalize: bool, index: int
) -> StateDict:
    values = {n: fisher[n].double() for n in names}
    bad = [n for n, v in values.items() if not bool(torch.isfinite(v).all()) or bool((v < 0).any())]
    if bad:
        raise ValueError(f"Fisher {index} has negative or non-finite values in {bad}")
    scale = 1.0
    if normalize:
        total = sum(float(v.sum()) for v in values.values())
        size = sum(v.numel() for v in values.values())
        scale = total / size if total > 0 else 1.0
    return {n: torch.clamp(v / scale, min=floor) for n, v in values.items()}


def merge_state_dicts(
    states: Sequence[StateDict],
    coefficients: Sequence[float] | None = None,
    fishers: Sequence[StateDict] | None = None,
    fisher_floor: float = 1e-6,
    normalize_fishers: bool = False,
    parameter_names: set[str] | None = None,
) -> StateDict:
    """Σ λ F θ / Σ λ F per coordinate; `fishers=None` is the λ-weighted average.

    `parameter_names` (default: every floating tensor) are merged; other entries
    must be equal in every model and are kept.
    """
    weighting = FisherWeighting(states, fishers, fisher_floor, normalize_fishers, parameter_names)
    return weighting(coefficients)
