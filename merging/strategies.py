"""The merge methods: how each one chooses λ (and what it merges) around the one formula.

Each method is a function `(MergeInputs, MergeConfig) -> MergeOutcome`, registered
by name in `MERGE_METHODS` at the end of this file; the torch-free catalogue of
what each needs (merging/methods.py, docs/merging.md) uses the same names:

- `uniform`: the (λ-weighted) mean of the parameters;
- `greedy`: model-soup greedy (Wortsman et al., 2022): models in order of
  validation NDCG@10, each added to the soup when the soup's validation NDCG@10
  does not drop;
- `fisher`: Fisher-weighted averaging (Matena & Raffel, 2022), λ uniform by
  default, given, or searched on validation (a grid for 2 models, seeded
  Dirichlet samples for more);
- `fisher_grouped`: the Fisher merge with one λ per parameter group (item
  table, positions, each block, the rest; `parameter_group`), given or
  searched group by group;
- `regmean`: RegMean (merging/regmean.py) for the transformer's linear layers
  from the input Grams stored with the Fishers, the Fisher merge for the rest;
- `task_arithmetic`, `ties`: task-vector merges relative to the recipes'
  shared base (merging/task_vectors.py), the scale given or searched.

The averaging methods are the formula of merging/weighting.py with different λ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merging.methods import MergeConfig
from merging.regmean import regmean_state
from merging.task_vectors import task_arithmetic, task_vectors, ties
from merging.weighting import (
    FisherWeighting,
    StateDict,
    check_coefficients,
    check_states,
    default_parameter_names,
    kept_tensors,
)

log = logging.getLogger(__name__)

# Validation score of a merged state (higher is better): what greedy and the search maximise.
Scorer = Callable[[StateDict], float]


@dataclass
class MergeInputs:
    """What a merge method works on: states (and Fishers) in one order, with labels."""

    states: list[StateDict]
    labels: list[str]
    fishers: list[StateDict] | None = None
    scorer: Scorer | None = None  # validation NDCG@10 of a state; None: no data
    parameter_names: set[str] | None = None
    base: StateDict | None = None  # the shared base of task-vector merges
    grams: list[StateDict] | None = None  # per model, mean input Grams (regmean)


@dataclass
class MergeOutcome:
    """A method's result: the merged state, its λ, and what the method reports (searches, picks)."""

    state: StateDict
    coefficients: list[float]
    info: dict[str, Any] = field(default_factory=dict)


def _need_scorer(inputs: MergeInputs, why: str) -> Scorer:
    if inputs.scorer is None:
        raise ValueError(f"{why} needs validation data (pass --data)")
    return inputs.scorer


def search_coefficients(
    combine: Callable[[list[float]], StateDict],
    scorer: Scorer,
    count: int,
    config: MergeConfig,
) -> tuple[list[float], list[dict[str, Any]]]:
    """The λ with the best validation score: a grid for 2 models, Dirichlet draws for more.

    Returns (best λ, every trial as {"coefficients", "score"}); ties keep the earlier trial.
    """
    if count == 2:
        grid = np.linspace(0.0, 1.0, config.grid_points)
        candidates = [[float(t), float(1.0 - t)] for t in grid]
    else:
        rng = np.random.default_rng(config.seed)
        draws = rng.dirichlet(np.ones(count), size=config.dirichlet_samples)
        candidates = [[1.0 / count] * count] + [[float(x) for x in row] for row in draws]
    trials = []
    for lam in candidates:
        trials.append({"coefficients": lam, "score": scorer(combine(lam))})
        log.info("λ %s: validation %.4f", np.round(lam, 3).tolist(), trials[-1]["score"])
    best = max(range(len(trials)), key=lambda i: (trials[i]["score"], -i))
    return trials[best]["coefficients"], trials


def _weighting(
    inputs: MergeInputs, config: MergeConfig, fishers: list[StateDict] | None
) -> FisherWeighting:
    return FisherWeighting(
        inputs.states,
        fishers,
        config.fisher_floor,
        config.normalize_fishers,
        inputs.parameter_names,
    )


def _weighted(
    inputs: MergeInputs, config: MergeConfig, fishers: list[StateDict] | None
) -> MergeOutcome:
    return _searched(inputs, config, _weighting(inputs, config, fishers))


def merge_uniform(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """The mean of the parameters (λ-weighted when coefficients are given or searched)."""
    return _weighted(inputs, config, None)


def merge_fisher(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """Fisher-weighted averaging with floor, optional normalisation and λ."""
    if inputs.fishers is None:
        raise ValueError("the fisher method needs one Fisher per model (--fishers)")
    return _weighted(inputs, config, inputs.fishers)


def merge_greedy(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """Greedy soup: add models by validation rank while the soup's score does not drop."""
    scorer = _need_scorer(inputs, "greedy soup")
    weighting = FisherWeighting(inputs.states, parameter_names=inputs.parameter_names)
    count = len(inputs.states)
    alone = [scorer(state) for state in inputs.states]
    order = sorted(range(count), key=lambda i: -alone[i])
    chosen = [order[0]]
    best = alone[order[0]]
    trials = [{"models": [inputs.labels[order[0]]], "score": best, "kept": True}]
    for index in order[1:]:
        trying = [*chosen, index]
        score = scorer(weighting(_indicator(trying, count)))
        kept = score >= best
        trials.append({"models": [inputs.labels[i] for i in trying], "score": score, "kept": kept})
        if kept:
            chosen, best = trying, score
    coefficients = _indicator(chosen, count)
    info = {
        "individual_scores": dict(zip(inputs.labels, alone, strict=True)),
        "selected": [inputs.labels[i] for i in chosen],
        "trials": trials,
    }
    return MergeOutcome(weighting(coefficients), coefficients, info)


def _indicator(chosen: list[int], count: int) -> list[float]:
    return [1.0 / len(chosen) if i in chosen else 0.0 for i in range(count)]


def parameter_group(name: str) -> str:
    """The group of a parameter for `fisher_grouped`: items, positions, block<i> or other."""
    if name.startswith(("item_embedding.", "output_bias", "item_adaptor.", "mask_embedding")):
        return "items"
    if name.startswith("position_embedding."):
        return "positions"
    if name.startswith("blocks."):
        return "block" + name.split(".")[1]
    return "other"


def merge_fisher_grouped(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """Fisher merge with λ per parameter group: given, or searched one group at a time.

    The search starts from `coefficients` (uniform by default) and, for each group
    in turn, keeps the candidate λ (the `fisher` search's grid or draws) with the
    best validation score while the other groups stay fixed.
    """
    if inputs.fishers is None:
        raise ValueError("the fisher_grouped method needs one Fisher per model (--fishers)")
    weighting = _weighting(inputs, config, inputs.fishers)
    groups = sorted({parameter_group(n) for n in weighting.names})
    unknown = sorted(set(config.group_coefficients) - set(groups))
    if unknown:
        raise ValueError(f"group_coefficients names unknown groups {unknown}; groups: {groups}")
    count = len(inputs.states)
    default = check_coefficients(config.coefficients, count)
    chosen = {
        g: check_coefficients(config.group_coefficients.get(g, default), count) for g in groups
    }

    def combine(lams: dict[str, list[float]]) -> StateDict:
        return weighting(default, {n: lams[parameter_group(n)] for n in weighting.names})

    info: dict[str, Any] = {}
    if config.search:
        scorer = _need_scorer(inputs, "coefficient search")
        info["search"] = {}
        for group in groups:
            best, trials = search_coefficients(
                lambda lam, g=group: combine({**chosen, g: lam}), scorer, count, config
            )
            chosen[group] = best
            info["search"][group] = trials
    info["group_coefficients"] = chosen
    return MergeOutcome(combine(chosen), default, info)


def merge_regmean(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """RegMean for the linear layers (Grams from the Fisher files), Fisher merge elsewhere."""
    if inputs.fishers is None or not inputs.grams or not all(inputs.grams):
        raise ValueError(
            "the regmean method needs the Fisher files with Grams (computed with fisher.grams "
            "true, the default since 2026-12-04)"
        )
    weighting = _weighting(inputs, config, inputs.fishers)
    grams = inputs.grams

    def combine(lam: list[float]) -> StateDict:
        merged = weighting(lam)
        linear = regmean_state(inputs.states, grams, lam, config.regmean_alpha)
        merged.update({n: t.to(merged[n].dtype) for n, t in linear.items()})
        return merged

    return _searched(inputs, config, combine)


def _searched(
    inputs: MergeInputs, config: MergeConfig, combine: Callable[[list[float]], StateDict]
) -> MergeOutcome:
    """combine(λ) with λ given or searched on validation (as the fisher method does)."""
    info: dict[str, Any] = {}
    coefficients = check_coefficients(config.coefficients, len(inputs.states))
    if config.search:
        scorer = _need_scorer(inputs, "coefficient search")
        coefficients, trials = search_coefficients(combine, scorer, len(inputs.states), config)
        info["search"] = trials
    return MergeOutcome(combine(coefficients), coefficients, info)


def _task_vector_merge(
    inputs: MergeInputs,
    config: MergeConfig,
    combine: Callable[[StateDict, list[StateDict], list[float], float], StateDict],
) -> MergeOutcome:
    """θ_0 + s τ(λ) with s given (`task_scale`) or searched on validation over [0, M]."""
    if inputs.base is None:
        raise ValueError(
            f"the {config.method} method needs the recipes' shared base checkpoint (--base)"
        )
    base = inputs.base
    names = sorted(
        default_parameter_names(inputs.states[0])
        if inputs.parameter_names is None
        else inputs.parameter_names
    )
    check_states(inputs.states, set(names))
    vectors = task_vectors(base, inputs.states, names)
    kept = kept_tensors(inputs.states, set(names))
    count = len(inputs.states)
    coefficients = check_coefficients(config.coefficients, count)

    def state(scale: float) -> StateDict:
        merged = combine(base, vectors, coefficients, scale)
        out = {n: merged[n].to(inputs.states[0][n].dtype) for n in names} | kept
        return {n: out[n] for n in inputs.states[0]}

    info: dict[str, Any] = {"scale": config.task_scale}
    if config.search:
        scorer = _need_scorer(inputs, "scale search")
        trials = []
        for scale in np.linspace(0.0, float(count), config.grid_points):
            trials.append({"scale": float(scale), "score": scorer(state(float(scale)))})
            log.info("scale %.2f: validation %.4f", scale, trials[-1]["score"])
        best = max(range(len(trials)), key=lambda i: (trials[i]["score"], -i))
        info = {"scale": trials[best]["scale"], "search": trials}
    return MergeOutcome(state(info["scale"]), coefficients, info)


def merge_task_arithmetic(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """Task arithmetic: θ_0 + s Σ λ_m τ_m."""
    return _task_vector_merge(inputs, config, task_arithmetic)


def merge_ties(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """TIES: θ_0 + s τ_TIES (trim to `ties_density`, elect signs, disjoint mean)."""
    density = config.ties_density
    return _task_vector_merge(inputs, config, lambda b, v, lam, s: ties(b, v, lam, density, s))


MergeMethod = Callable[[MergeInputs, MergeConfig], MergeOutcome]

# The implementations, by the names of merging/methods.py (which says what each needs).
MERGE_METHODS: dict[str, MergeMethod] = {
    "uniform": merge_uniform,
    "greedy": merge_greedy,
    "fisher": merge_fisher,
    "fisher_grouped": merge_fisher_grouped,
    "regmean": merge_regmean,
    "task_arithmetic": merge_task_arithmetic,
    "ties": merge_ties,
}
