"""The writing side of the model bundle (contract fishrec.bundle/1, docs/export.md, "The model bundle").

A bundle folder holds model.onnx, vocab.json, popular.json, item_vectors.npy,
manifest.json and optionally model.int8.onnx and checkpoint/ (the job adds report
files). `write_manifest`
writes manifest.json with the sha256 of every other file in the folder;
`verify_bundle` checks a written folder with serving's own reader
(`serving.bundle.load_bundle`, torch-free, so merging may import it), so that a
bundle the service would refuse is found before it is published.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import (
    MANIFEST,
    POPULAR_SCHEMA,
    SCHEMA,
    BundleError,
    load_bundle,
    sha256_file,
)
from serving.bundle import POPULAR as POPULAR_FILE
from serving.bundle import VOCAB as VOCAB_FILE
from serving.settings import check_run_id

__all__ = ["POPULAR_FILE", "VOCAB_FILE", "BundleError", "popular_json", "verify_bundle"]

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"

# The fields write_manifest needs besides schema and files ("created" defaults to now).
REQUIRED_FIELDS = (
    "run_id",
    "data_fingerprint",
    "model",
    "num_items",
    "max_history",
    "onnx",
    "quantized",
    "recipes",
    "merge",
    "metrics",
)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def popular_json(popularity: np.ndarray) -> dict[str, Any]:
    """popular.json from training counts indexed by item id (index 0 is padding).

    Most popular first; ties by id, the order training.evaluate uses for popular100.
    """
    counts = np.asarray(popularity, dtype=np.int64)[1:]
    order = np.lexsort((np.arange(1, len(counts) + 1), -counts))
    return {
        "schema": POPULAR_SCHEMA,
        "items": (order + 1).tolist(),
        "counts": counts[order].tolist(),
    }


def list_files(folder: Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `folder` but manifest.json."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    }


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write `folder`/manifest.json from `fields` plus schema, created and files; return it.

    Call it last, when every other file of the bundle is in place: "files" lists
    the sha256 of each one. The file is replaced in one rename.
    """
    folder = Path(folder)
    reserved = sorted({"schema", "files"} & set(fields))
    if reserved:
        raise BundleError(f"manifest fields {reserved} are computed by write_manifest, not passed")
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise BundleError(f"manifest fields missing: {missing}")
    try:
        check_run_id(fields["run_id"] if isinstance(fields["run_id"], str) else "")
    except ValueError as err:
        raise BundleError(str(err)) from None
    manifest = {"schema": SCHEMA, "created": utc_now(), **fields, "files": list_files(folder)}
    staging = folder / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(staging, folder / MANIFEST)
    return manifest


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check a written bundle as the service will and return its manifest; BundleError if not.

    The service's reader checks the schema, every listed file's sha256, the ONNX
    files the manifest names, and vocab.json and popular.json against num_items.
    The writer is stricter in one way: a file in the folder that the manifest does
    not list was written after it (or by something else), so it is an error here.
    """
    folder = Path(folder)
    manifest = load_bundle(folder).manifest
    unlisted = sorted(set(list_files(folder)) - set(manifest["files"]))
    if unlisted:
        raise BundleError(f"{folder}: present but unlisted in {MANIFEST}: {unlisted}")
    return manifest
