"""Merging checkpoints of one architecture: the registry of methods and the checkpoint-level merge.

docs/merging.md describes the methods. Their implementations are in
merging/strategies.py (on top of the one formula, merging/weighting.py); here
is `run_merge` over `MERGE_METHODS` (merging/strategies.py, named as the catalogue merging/methods.py names them),
and `merge_checkpoints`, which reads checkpoints and Fisher files, checks that
they belong together (architecture, training data, which model each Fisher is
of), merges, optionally fine-tunes the merged model (1 epoch of the plain
objective by default), and writes a checkpoint folder whose info records the
merge.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.fisher_file import FisherFile, load_fisher, model_sha256
from merging.methods import METHODS, NEEDS_BASE, MergeConfig
from merging.strategies import MERGE_METHODS, MergeInputs, MergeOutcome, Scorer
from merging.weighting import StateDict
from training.checkpoint import Checkpoint, write_checkpoint
from training.config import ExperimentConfig, set_dotted
from training.evaluate import Evaluator
from training.model import SequenceRecommender
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.trainer import SELECTION_METRIC

if set(MERGE_METHODS) != set(METHODS):  # the catalogue and the implementations must agree
    raise ImportError(f"merge methods {sorted(MERGE_METHODS)} vs catalogue {sorted(METHODS)}")


def run_merge(inputs: MergeInputs, config: MergeConfig) -> MergeOutcome:
    """Merge `inputs` with the method `config.method` names."""
    return MERGE_METHODS[config.method](inputs, config)


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
