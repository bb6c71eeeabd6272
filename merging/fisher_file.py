"""The Fisher file: safetensors with JSON metadata and a content checksum (docs/formats.md).

A Fisher file holds one model's diagonal Fisher keyed by parameter name, the
linear layers' input Grams under "gram:" keys (merging/regmean.py), and what it
was computed from: the estimator, the sequences and the sha256 of the
checkpoint's weights (`model_sha256`), which the merge checks so that a Fisher
is never applied to another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from merging.fisher_estimators import parse_estimator
from merging.fisher_result import FisherResult
from merging.regmean import GRAM_PREFIX
from training.checkpoint import WEIGHTS, Checkpoint, read_manifest, save_tensors

SCHEMA = "fishrec.fisher/1"


def content_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256(SCHEMA.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class FisherFile:
    """A loaded Fisher: tensors keyed by parameter name, the Grams (if any), the metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    path: Path | None = None
    grams: dict[str, Tensor] = field(default_factory=dict)  # keyed like merging/regmean.py


def save_fisher(path: Path, fisher: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write a Fisher as safetensors; metadata values are stored as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    meta["schema"] = json.dumps(SCHEMA)
    meta["content_sha256"] = json.dumps(content_digest(fisher))
    staging = path.with_name(f".{path.name}.tmp")
    save_tensors(staging, fisher, meta)
    staging.replace(path)  # readers never see a half-written file


def load_fisher(path: Path) -> FisherFile:
    """Read a Fisher file, checking its schema and content checksum."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Fisher file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({err})") from err
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata is not fishrec's JSON ({err})") from err
    if metadata.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {metadata.get('schema')!r}, expected {SCHEMA!r}")
    if content_digest(tensors) != metadata.get("content_sha256"):
        raise ValueError(f"{path}: content checksum mismatch (file corrupt or modified)")
    grams = {
        k.removeprefix(GRAM_PREFIX): t for k, t in tensors.items() if k.startswith(GRAM_PREFIX)
    }
    tensors = {k: t for k, t in tensors.items() if not k.startswith(GRAM_PREFIX)}
    bad = [
        name
        for name, t in tensors.items()
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any())
    ]
    if bad:
        raise ValueError(f"{path}: Fisher values must be finite and >= 0; not so in {bad}")
    return FisherFile(tensors, metadata, path, grams)


def fisher_metadata(result: FisherResult, **provenance: Any) -> dict[str, Any]:
    """What a Fisher file records: estimator, sizes, and where it came from."""
    spec = parse_estimator(result.estimator)
    meta: dict[str, Any] = {
        "estimator": result.estimator,
        "estimator_name": spec.name,
        "n": spec.n,
        "sequences": result.count,
        "per_sequence": "batch-shortcut (approximate)" if result.batch_shortcut else "exact",
        "dropped_eigenvalue_mass": result.mean_dropped_mass,
        "gram_rows": result.gram_rows,
    }
    meta.update(provenance)
    return meta


def model_sha256(checkpoint: Checkpoint) -> str:
    """sha256 of a loaded checkpoint's model.safetensors (from its verified manifest)."""
    if checkpoint.path is None:
        raise ValueError("the checkpoint was not loaded from a folder")
    return read_manifest(checkpoint.path, verify=False)["files"][WEIGHTS]
