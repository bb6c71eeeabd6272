"""Merging checkpoints of one architecture: uniform soup, greedy soup, Fisher merge.

docs/merging.md describes the methods.

One formula serves every method (`merge_state_dicts`): per coordinate,

    θ* = Σ_m λ_m F_m θ_m / Σ_m λ_m F_m

with F_m the model's diagonal Fisher (floored, optionally normalised) or, when
no Fishers are given, F_m = 1: the λ-weighted average. Methods are strategies in
`MERGE_METHODS`:

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

Parameters are matched by name, never by position. `merge_checkpoints` reads
checkpoints and Fisher files, merges, optionally fine-tunes the merged model
(1 epoch of the plain objective by default), and writes a checkpoint folder.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from merging.fisher import FisherFile, check_same_keys, load_fisher, model_sha256
from merging.methods import METHODS, NEEDS_BASE, MergeConfig
from merging.regmean import regmean_state
from merging.task_vectors import task_arithmetic, task_vectors, ties
from training.checkpoint import Checkpoint, write_checkpoint
from training.config import ExperimentConfig, set_dotted
from training.data import SequenceData
from training.evaluate import Evaluator
from training.model import SequenceRecommender
from training.run import train
from training.trainer import SELECTION_METRIC, load_run_checkpoint

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
# Validation score of a merged state (higher is better): what greedy and the search maximise.
Scorer = Callable[[StateDict], float]


# ---- the one formula ------------------------------------------------------------------


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


def _check_states(states: Sequence[StateDict], parameter_names: set[str]) -> None:
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


def _buffers(states: Sequence[StateDict], parameter_names: set[str]) -> StateDict:
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
        _check_states(states, names)
        self.names = sorted(names)
        self.template = {name: states[0][name] for name in self.names}
        self.kept = _buffers(states, names)
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


# ---- methods --------------------------------------------------------------------------


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
    _check_states(inputs.states, set(names))
    vectors = task_vectors(base, inputs.states, names)
    kept = _buffers(inputs.states, set(names))
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


if set(MERGE_METHODS) != set(METHODS):  # the catalogue and the implementations must agree
    raise ImportError(f"merge methods {sorted(MERGE_METHODS)} vs catalogue {sorted(METHODS)}")


def run_merge(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    return MERGE_METHODS[config.method](inputs, config)


# ---- checkpoints ----------------------------------------------------------------------

# Fields that must agree for parameters to mean the same thing (dropout may differ).
_ARCHITECTURE = (
    "num_items",
    "backbone",
    "hidden_size",
    "num_layers",
    "num_heads",
    "max_len",
    "ffn_mult",
    "embedding_input",
    "prediction_head",
    "activation",
    "block",
    "positions",
    "item_representation",
)


def check_architectures(checkpoints: Sequence[Checkpoint]) -> None:
    first = checkpoints[0].config.to_dict()
    for ckpt in checkpoints[1:]:
        other = ckpt.config.to_dict()
        differ = {
            k: (first.get(k), other.get(k)) for k in _ARCHITECTURE if first.get(k) != other.get(k)
        }
        if differ:
            raise ValueError(
                f"{ckpt.path} and {checkpoints[0].path} have different architectures: {differ}"
            )


def _data_fingerprint(checkpoints: Sequence[Checkpoint], data: SequenceData | None) -> str | None:
    prints = {str(c.path): c.info.get("data_fingerprint") for c in checkpoints}
    known = {p for p in prints.values() if p}
    if data is not None:
        known.add(data.fingerprint)
    if len(known) > 1:
        given = f"; --data is {data.fingerprint}" if data is not None else ""
        raise ValueError(f"the inputs were trained on different data: {prints}{given}")
    return known.pop() if known else None


def _load_fishers(paths: Sequence[Path], checkpoints: Sequence[Checkpoint]) -> list[FisherFile]:
    if len(paths) != len(checkpoints):
        raise ValueError(f"{len(paths)} Fisher files for {len(checkpoints)} checkpoints")
    files = []
    for path, ckpt in zip(paths, checkpoints, strict=True):
        fisher = load_fisher(Path(path))
        recorded = fisher.metadata.get("checkpoint_sha256")
        if recorded and recorded != model_sha256(ckpt):
            raise ValueError(
                f"{path} is the Fisher of another checkpoint (model sha256 {recorded[:12]}...), "
                f"not of {ckpt.path}: give --fishers in the order of --checkpoints"
            )
        files.append(fisher)
    return files


def validation_scorer(evaluator: Evaluator, template: SequenceRecommender) -> Scorer:
    """Validation NDCG@10 (full setting) of a state loaded into a copy of `template`."""
    model = copy.deepcopy(template)
    setting, metric = SELECTION_METRIC

    def score(state: StateDict) -> float:
        model.load_state_dict(state)
        return evaluator.evaluate_model(model, "valid").metrics[setting][metric]

    return score


@dataclass
class MergeResult:
    path: Path  # the checkpoint (or, after a fine-tune, the run folder) written
    info: dict[str, Any]
    metrics: dict[str, Any] | None  # metrics.json document of the result, when data was given


def merge_checkpoints(
    checkpoints: Sequence[Path],
    out: Path,
    config: MergeConfig | None = None,
    fishers: Sequence[Path] | None = None,
    data: SequenceData | None = None,
    base: Path | None = None,
) -> MergeResult:
    """Merge checkpoint (or run) folders into `out`, a checkpoint folder.

    `base`: the checkpoint the inputs were fine-tuned from (task-vector methods).

    With `config.finetune_epochs > 0`, `out` becomes a run folder: the merged
    model in out/merged/, fine-tuned into out/best/ by the trainer.
    """
    config = config or MergeConfig()
    if not checkpoints:
        raise ValueError("nothing to merge: no checkpoints given")
    loaded = [load_run_checkpoint(Path(p)) for p in checkpoints]
    check_architectures(loaded)
    fingerprint = _data_fingerprint(loaded, data)
    fisher_files = _load_fishers(fishers, loaded) if fishers else None
    template = loaded[0].model
    base_checkpoint = _load_base(base, loaded) if base is not None else None
    evaluator = Evaluator(data.split()) if data is not None else None
    inputs = MergeInputs(
        states=[c.model.state_dict() for c in loaded],
        labels=[_label(c, i) for i, c in enumerate(loaded)],
        fishers=[f.tensors for f in fisher_files] if fisher_files else None,
        scorer=validation_scorer(evaluator, template) if evaluator else None,
        parameter_names={name for name, _ in template.named_parameters()},
        base=base_checkpoint.model.state_dict() if base_checkpoint else None,
        grams=[f.grams for f in fisher_files] if fisher_files else None,
    )
    if config.align:
        inputs = _aligned(inputs, loaded[0].config.num_heads, config)
    outcome = run_merge(inputs, config)
    merged = copy.deepcopy(template)
    merged.load_state_dict(outcome.state)
    info = _merge_info(loaded, fisher_files, config, outcome, fingerprint, inputs.labels)
    if base_checkpoint is not None:
        info["merge"]["base"] = {
            "path": str(base_checkpoint.path),
            "sha256": model_sha256(base_checkpoint),
        }
    metrics = evaluator.metrics_document(merged) if evaluator else None
    extra = {"metrics.json": metrics} if metrics else None
    if config.finetune_epochs == 0:
        write_checkpoint(Path(out), merged, loaded[0].config, info, extra_json=extra)
        return MergeResult(Path(out), info, metrics)
    if data is None:
        raise ValueError("a post-merge fine-tune needs the training data (pass --data)")
    return _finetune(Path(out), merged, loaded[0], info, extra, data, config)


def _aligned(inputs: MergeInputs, num_heads: int, config: MergeConfig) -> MergeInputs:
    """Every model's units (and its Fisher) permuted onto the first model's."""
    from merging.alignment import apply_permutations, match_weights

    if config.method in NEEDS_BASE or config.method == "regmean":
        raise ValueError(
            f"align works on models from separate starts; {config.method} needs a shared base "
            "or input Grams, which alignment does not permute"
        )
    states, fishers = [inputs.states[0]], [inputs.fishers[0]] if inputs.fishers else None
    for index in range(1, len(inputs.states)):
        state, perms = match_weights(inputs.states[0], inputs.states[index], num_heads)
        states.append({**inputs.states[index], **state})
        if fishers is not None and inputs.fishers is not None:
            fisher = inputs.fishers[index]
            fishers.append({**fisher, **apply_permutations(fisher, perms, num_heads)})
    return dataclasses.replace(inputs, states=states, fishers=fishers)


def _load_base(path: Path, loaded: Sequence[Checkpoint]) -> Checkpoint:
    """The base checkpoint, refused unless it has the inputs' architecture."""
    base = load_run_checkpoint(Path(path))
    check_architectures([*loaded[:1], base])
    return base


def _label(checkpoint: Checkpoint, index: int) -> str:
    return f"{index}:{checkpoint.info.get('recipe', 'model')}"


def _merge_info(
    loaded: Sequence[Checkpoint],
    fishers: Sequence[FisherFile] | None,
    config: MergeConfig,
    outcome: MergeOutcome,
    fingerprint: str | None,
    labels: list[str],
) -> dict[str, Any]:
    inputs = [
        {
            "path": str(c.path),
            "sha256": model_sha256(c),
            "recipe": c.info.get("recipe"),
            "label": label,
        }
        for c, label in zip(loaded, labels, strict=True)
    ]
    estimators = sorted({str(f.metadata.get("estimator")) for f in fishers}) if fishers else []
    return {
        "recipe": "merged",
        "data_fingerprint": fingerprint,
        "merge": {
            "method": config.method,
            "inputs": inputs,
            "coefficients": outcome.coefficients,
            "estimator": estimators[0] if len(estimators) == 1 else estimators or None,
            "fishers": [
                {"path": str(f.path), "content_sha256": f.metadata.get("content_sha256")}
                for f in fishers
            ]
            if fishers
            else None,
            "config": config.model_dump(mode="json"),
            **outcome.info,
        },
    }


def finetune_config(source: Checkpoint, config: MergeConfig) -> ExperimentConfig:
    """The plain objective of the backbone for `finetune_epochs`, with the inputs' training settings.

    Training settings come from the config.yaml of the first input's run folder
    when there is one (so the fine-tune uses the recipes' optimiser settings).
    """
    values: dict[str, Any] = {}
    assert source.path is not None
    for folder in (source.path, source.path.parent):
        if (folder / "config.yaml").is_file():
            loaded = yaml.safe_load((folder / "config.yaml").read_text()) or {}
            values = {"data": loaded.get("data", {}), "train": loaded.get("train", {})}
            break
    model = source.config.to_dict()
    model.pop("num_items")
    values["model"] = model
    values["recipe"] = {"name": source.config.backbone}
    values.setdefault("train", {})["epochs"] = config.finetune_epochs
    # The merged model is a candidate too: kept when fine-tuning does not improve validation.
    values["train"]["validate_initial"] = True
    for key, value in config.finetune_overrides.items():
        set_dotted(values, key, value)
    return ExperimentConfig.model_validate(values)


def _finetune(
    out: Path,
    merged: SequenceRecommender,
    source: Checkpoint,
    info: dict[str, Any],
    extra: dict[str, Any] | None,
    data: SequenceData,
    config: MergeConfig,
) -> MergeResult:
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"{out} exists and is not empty: a fine-tuned merge needs a new run folder"
        )
    merged_dir = out / "merged"
    write_checkpoint(merged_dir, merged, source.config, info, extra_json=extra)
    result = train(finetune_config(source, config), data, out, init=merged_dir)
    info = {**info, "finetune": {"epochs": config.finetune_epochs, "best_epoch": result.best_epoch}}
    return MergeResult(out, info, result.metrics)
