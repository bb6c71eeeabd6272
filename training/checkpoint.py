"""Checkpoints: safetensors weights + JSON, with the sha256 of every file. Never pickle.

A checkpoint folder (a run folder is one) holds:

    model.safetensors   the backbone's weights, keyed by parameter name
    checkpoint.json     schema, model config, provenance and {file: sha256}
    ...                 any other files the writer lists (optimizer.safetensors, ...)

Folders are written to a temporary sibling and renamed into place, so a reader
sees either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from training.files import atomic_directory, sha256_file
from training.model import ModelConfig, SequenceRecommender

SCHEMA = "fishrec.checkpoint/1"
MANIFEST = "checkpoint.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or of another schema."""


def write_json(path: Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    # safetensors refuses shared or non-contiguous storage: store plain copies.
    plain = {name: t.detach().contiguous().clone().cpu() for name, t in tensors.items()}
    save_file(plain, str(path), metadata=metadata)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model and what was recorded with it."""

    model: SequenceRecommender
    config: ModelConfig
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def write_checkpoint(
    directory: Path,
    model: nn.Module,
    config: ModelConfig,
    info: dict[str, Any] | None = None,
    extra_tensors: dict[str, dict[str, Tensor]] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint folder atomically.

    `extra_tensors` maps file names to tensor dicts (optimizer state, recipe
    state); `extra_json` maps file names to JSON values. All are checksummed.
    """
    with atomic_directory(directory) as staging:
        save_tensors(staging / WEIGHTS, model.state_dict(), {"format": "pt", "schema": SCHEMA})
        for name, tensors in (extra_tensors or {}).items():
            save_tensors(staging / name, tensors)
        for name, value in (extra_json or {}).items():
            write_json(staging / name, value)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        write_json(
            staging / MANIFEST,
            {
                "schema": SCHEMA,
                "model_config": config.to_dict(),
                "info": info or {},
                "files": files,
            },
        )


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint.json of `directory`, after checking every listed file's sha256."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from err
    if manifest.get("schema") != SCHEMA:
        raise CheckpointError(
            f"{manifest_path}: schema {manifest.get('schema')!r}, expected {SCHEMA!r}"
        )
    if verify:
        for name, expected in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: {name} is listed in {MANIFEST} but missing")
            if sha256_file(path) != expected:
                raise CheckpointError(f"{path}: sha256 mismatch (file corrupt or modified)")
    return manifest


def read_tensors(directory: Path, name: str, verify: bool = True) -> dict[str, Tensor]:
    """A tensor file of a checkpoint, after verifying it against the manifest."""
    manifest = read_manifest(directory, verify=verify)
    if name not in manifest.get("files", {}):
        raise CheckpointError(f"{directory}: no {name} in this checkpoint")
    return load_file(str(Path(directory) / name))


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load weights by name; a missing or unexpected key is an error that names it."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: parameter names differ: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in model.state_dict().items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder (or a run folder) after verifying every checksum."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = ModelConfig.from_dict(manifest["model_config"])
    model = SequenceRecommender(config)
    load_state_dict_strict(model, load_file(str(directory / WEIGHTS)), str(directory))
    model.to(device).eval()
    return Checkpoint(model=model, config=config, info=manifest.get("info", {}), path=directory)


# ---- optimizer state ---------------------------------------------------------------


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (safetensors) and JSON-able hyper-parameters."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
