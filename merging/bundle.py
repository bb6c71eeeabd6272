"""The writing side of the model bundle (contract fishrec.bundle/1, /work/notes/bundle.md).

A bundle folder holds model.onnx, vocab.json, popular.json, manifest.json and
optionally model.int8.onnx (the job may add report files). `write_manifest`
writes manifest.json with the sha256 of every other file in the folder;
`verify_bundle` checks a written folder the way a reader will, so that the
writer finds a bad bundle before it is published. serving/bundle.py is the
reading side and shares no code with this module (serving imports no training
or merging code).
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.data import DataError, Vocabulary
from training.files import sha256_file

SCHEMA = "fishrec.bundle/1"
POPULAR_SCHEMA = "fishrec.popular/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
VOCAB_FILE = "vocab.json"
POPULAR_FILE = "popular.json"

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
# The same rule serving applies to run ids: a plain folder name.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BundleError(ValueError):
    """A bundle folder that a reader would refuse: says which file and why."""


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
    run_id = fields["run_id"]
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise BundleError(
            f"run id {run_id!r} is not a plain folder name (letters, digits, '.', '_', '-')"
        )
    manifest = {"schema": SCHEMA, "created": utc_now(), **fields, "files": list_files(folder)}
    staging = folder / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(staging, folder / MANIFEST)
    return manifest


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check a written bundle as a reader would and return its manifest; BundleError if not.

    Checks: the schema, that every file of the folder is listed with its sha256
    (and nothing listed is missing), that the ONNX files the manifest names are
    listed, and that vocab.json and popular.json agree with num_items.
    """
    folder = Path(folder)
    manifest = _read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{folder / MANIFEST}: schema {got!r}, expected {SCHEMA!r}")
    _check_files(folder, manifest.get("files"))
    num_items = manifest.get("num_items")
    if not isinstance(num_items, int) or num_items < 1:
        raise BundleError(f"{folder / MANIFEST}: num_items must be a positive integer")
    graphs = [manifest.get("onnx")]
    if manifest.get("quantized") is not None:
        graphs.append(manifest["quantized"])
    names = [graph.get("file") if isinstance(graph, dict) else None for graph in graphs]
    unlisted = [
        name for name in [VOCAB_FILE, POPULAR_FILE, *names] if name not in manifest["files"]
    ]
    if unlisted:
        raise BundleError(
            f"{folder / MANIFEST}: 'files' does not list {unlisted} (onnx.file, quantized.file, "
            "vocab.json and popular.json must all be there)"
        )
    _check_vocab(folder / VOCAB_FILE, num_items)
    _check_popular(folder / POPULAR_FILE, num_items)
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err})") from err


def _check_files(folder: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{folder / MANIFEST}: 'files' must map file names to sha256")
    present = list_files(folder)
    missing = sorted(set(files) - set(present))
    extra = sorted(set(present) - set(files))
    if missing or extra:
        raise BundleError(
            f"{folder}: files listed but missing {missing}, present but unlisted {extra}"
        )
    changed = [name for name, digest in files.items() if present[name] != digest]
    if changed:
        raise BundleError(f"{folder}: sha256 mismatch for {changed} (corrupt or modified)")


def _check_vocab(path: Path, num_items: int) -> None:
    try:
        vocab = Vocabulary.from_json(_read_json(path))
    except DataError as err:
        raise BundleError(f"{path}: {err}") from None
    if vocab.num_items != num_items:
        raise BundleError(f"{path}: {vocab.num_items} items, the manifest says {num_items}")


def _check_popular(path: Path, num_items: int) -> None:
    document = _read_json(path)
    if not isinstance(document, dict) or document.get("schema") != POPULAR_SCHEMA:
        raise BundleError(f"{path}: expected schema {POPULAR_SCHEMA!r}")
    items, counts = document.get("items"), document.get("counts")
    if not isinstance(items, list) or not all(isinstance(item, int) for item in items):
        raise BundleError(f"{path}: 'items' must be a list of internal ids")
    if sorted(items) != list(range(1, num_items + 1)):
        raise BundleError(f"{path}: 'items' must list every internal id 1..{num_items} once")
    if not isinstance(counts, list) or len(counts) != num_items:
        raise BundleError(f"{path}: 'counts' must hold {num_items} counts")
