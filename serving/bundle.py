"""Read and verify a model bundle (contract fishrec.bundle/1, docs/export.md, "The model bundle").

This module is the one implementation of the contract's checks: merging/bundle.py
(the writer) verifies what it wrote with `load_bundle` before anything is published.

A bundle folder holds model.onnx, vocab.json, popular.json, manifest.json and
optionally model.int8.onnx; manifest.json lists the sha256 of every other file.
A bundle is accepted only when its schema major version is 1, every listed file
is present with its checksum, and vocabulary, popularity list and manifest agree.
Anything else raises `BundleError` with the reason; nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from serving.settings import check_run_id

log = logging.getLogger(__name__)

BUNDLE_SCHEMA = re.compile(r"^fishrec\.bundle/(\d+)(?:\.\d+)*$")
SUPPORTED_MAJOR = 1
SCHEMA = f"fishrec.bundle/{SUPPORTED_MAJOR}"  # what writers write
VOCAB_SCHEMA = "fishrec.vocab/1"
POPULAR_SCHEMA = "fishrec.popular/1"
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
POPULAR = "popular.json"
ITEM_VECTORS = "item_vectors.npy"  # (N, D) float32 item representations: similar items
# Large catalogues: retrieval from an ANN index, then exact re-ranking (merging/retrieval_export.py)
RETRIEVAL_DIR = "retrieval"
USER_ENCODER = "user_encoder.onnx"  # item_ids (B, L) -> user (B, D)
ITEM_BIAS = "item_bias.npy"  # (N,) float32 output bias
ITEM_INDEX = "item_index.faiss"  # HNSW (L2) over [W_j, b_j, lift]: query [h, 1, 0]
INDEX_KIND = "faiss-hnsw-l2-mips"  # the manifest's retrieval.index
# Catalogues from this size get retrieval/ at export (below it exact serving is as fast:
# docs/results/retrieval.md).
RETRIEVAL_MIN_ITEMS = 100_000
LATEST = "LATEST"
RUNS = "runs"


class BundleError(ValueError):
    """A bundle that is missing, corrupt, incomplete or of an unsupported version."""


@dataclass(frozen=True)
class Vocab:
    """External item id <-> internal id (1..num_items); 0 pads."""

    items: tuple[str, ...]  # items[i] is the external id of internal id i + 1
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {external: internal for internal, external in enumerate(self.items, start=1)}
        if len(index) != len(self.items):
            raise BundleError("the vocabulary lists an item id more than once")
        object.__setattr__(self, "index", index)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def encode(self, externals: list[str]) -> tuple[list[int], list[str]]:
        """(internal ids of the known items in order, the unknown external ids in order)."""
        known: list[int] = []
        unknown: list[str] = []
        for external in externals:
            internal = self.index.get(external)
            if internal is None:
                unknown.append(external)
            else:
                known.append(internal)
        return known, unknown

    def external(self, internal: int) -> str:
        return self.items[internal - 1]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: where it is, what it says, and what serving needs from it."""

    folder: Path
    run_id: str
    manifest: dict[str, Any]
    vocab: Vocab
    popular: np.ndarray  # (N,) int64 internal ids, most popular first
    popular_scores: np.ndarray  # (N,) float32 share of training interactions, same order
    # (N, D) float32 unit rows (row i - 1 is item i); None for bundles exported without them
    item_vectors: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return self.vocab.num_items

    @property
    def max_history(self) -> int:
        """How many of the newest history items the model reads."""
        return int(self.manifest["max_history"])

    @property
    def supports_filters(self) -> bool:
        """Whether the graph applies exclude_items, candidates and availability itself
        (bundles exported before them do not)."""
        inputs = self.manifest.get("onnx", {}).get("inputs", [])
        return any(entry.get("name") == "exclude_ids" for entry in inputs)

    @property
    def has_retrieval(self) -> bool:
        """Whether the bundle carries retrieval/ (user encoder, output bias, ANN index)."""
        retrieval = self.manifest.get("retrieval")
        return isinstance(retrieval, dict) and retrieval.get("index") == INDEX_KIND

    def model_file(self, quantized: bool) -> Path:
        """model.int8.onnx when asked for and present, else model.onnx."""
        if quantized and isinstance(self.manifest.get("quantized"), dict):
            return self.folder / self.manifest["quantized"]["file"]
        return self.folder / self.manifest["onnx"]["file"]

    def summary(self) -> dict[str, Any]:
        """What GET /v1/model reports: provenance and quality, no file paths."""
        keys = ("schema", "run_id", "created", "data_fingerprint", "model", "num_items")
        out = {key: self.manifest.get(key) for key in keys}
        out["max_history"] = self.max_history
        onnx = self.manifest.get("onnx", {})
        out["onnx"] = {key: onnx.get(key) for key in ("opset", "onnxruntime_version", "parity")}
        quantized = self.manifest.get("quantized")
        out["quantized_available"] = isinstance(quantized, dict)
        for key in ("recipes", "merge", "metrics"):
            out[key] = self.manifest.get(key)
        return out


# ---- locating bundles ------------------------------------------------------------------


def run_path(run_id: str) -> str:
    """runs/<run_id>: where a published run lives under an artifact root (any store)."""
    return f"{RUNS}/{check_run_id(run_id)}"


def bundle_folder(root: Path, run_id: str) -> Path:
    return Path(root) / run_path(run_id)


def read_latest(root: Path) -> str | None:
    """The run id named by <root>/LATEST, or None when nothing is published yet."""
    path = Path(root) / LATEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return parse_latest(text, str(path))


def parse_latest(text: str, where: str) -> str | None:
    """The run id on LATEST's first line (None when empty); BundleError when not a run id."""
    text = text.strip()
    if not text:
        return None
    try:
        return check_run_id(text.splitlines()[0].strip())
    except ValueError as err:
        raise BundleError(f"{where}: {err}") from err


# ---- loading and verifying ---------------------------------------------------------------


def sha256_file(path: Path) -> str:
    # training.files has the same helper for checkpoints; serving may not import training.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err})") from err


def load_bundle(folder: Path) -> Bundle:
    """Read and verify the bundle in `folder`; raise BundleError saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise BundleError(f"{folder / MANIFEST}: expected a JSON object")
    check_schema(folder, manifest)
    verify_files(folder, manifest)
    num_items = positive_int(manifest, "num_items", folder)
    positive_int(manifest, "max_history", folder)
    vocab = read_vocab(folder / VOCAB, num_items)
    popular, shares = read_popular(folder / POPULAR, num_items)
    run_id = manifest.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise BundleError(f"{folder / MANIFEST}: 'run_id' must be a non-empty string")
    vectors = read_item_vectors(folder / ITEM_VECTORS, num_items)
    return Bundle(folder, run_id, manifest, vocab, popular, shares, vectors)


def read_item_vectors(path: Path, num_items: int) -> np.ndarray | None:
    """The item representations as unit rows (cosine = dot product), if the bundle has them."""
    if not path.exists():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)  # never pickle
    except (ValueError, OSError) as err:
        raise BundleError(f"{path}: not a numpy array file ({err})") from err
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != num_items:
        raise BundleError(
            f"{path}: expected float32 ({num_items}, D), got {vectors.dtype} {vectors.shape}"
        )
    if not np.isfinite(vectors).all():
        raise BundleError(f"{path}: item vectors must be finite")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def check_schema(folder: Path, manifest: dict[str, Any]) -> None:
    schema = manifest.get("schema")
    match = BUNDLE_SCHEMA.match(schema) if isinstance(schema, str) else None
    if match is None:
        raise BundleError(f"{folder}: manifest schema {schema!r} is not a fishrec bundle")
    if int(match.group(1)) != SUPPORTED_MAJOR:
        raise BundleError(
            f"{folder}: bundle schema {schema!r} has major version {match.group(1)}; "
            f"this server reads version {SUPPORTED_MAJOR} only"
        )


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists inside the folder with its sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{folder / MANIFEST}: 'files' must map file names to sha256")
    required = {VOCAB, POPULAR, onnx_file(manifest, "onnx", folder)}
    if isinstance(manifest.get("quantized"), dict):
        required.add(onnx_file(manifest, "quantized", folder))
    missing = sorted(required - set(files))
    if missing:
        raise BundleError(f"{folder / MANIFEST}: 'files' does not list {missing}")
    for name, expected in files.items():
        path = inside(folder, name)
        if not path.is_file():
            raise BundleError(f"{folder}: {name} is listed in {MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise BundleError(f"{path}: sha256 mismatch (file corrupt or modified)")


def onnx_file(manifest: dict[str, Any], key: str, folder: Path) -> str:
    section = manifest.get(key)
    name = section.get("file") if isinstance(section, dict) else None
    if not isinstance(name, str) or not name:
        raise BundleError(f"{folder / MANIFEST}: '{key}.file' must name the ONNX file")
    return name


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, refusing names that would leave the folder."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BundleError(f"{folder / MANIFEST}: file name {name!r} points outside the bundle")
    return folder.joinpath(*relative.parts)


def positive_int(manifest: dict[str, Any], key: str, folder: Path) -> int:
    value = manifest.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BundleError(f"{folder / MANIFEST}: {key!r} must be a positive integer, got {value!r}")
    return value


def read_vocab(path: Path, num_items: int) -> Vocab:
    document = read_json(path)
    if not isinstance(document, dict) or document.get("schema") != VOCAB_SCHEMA:
        raise BundleError(f"{path}: expected schema {VOCAB_SCHEMA!r}")
    items = document.get("items")
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise BundleError(f"{path}: 'items' must be a list of strings")
    if len(items) != num_items or document.get("num_items") != num_items:
        raise BundleError(
            f"{path}: {len(items)} items (num_items {document.get('num_items')!r}) but the "
            f"manifest says {num_items}"
        )
    if document.get("pad_id") != 0 or document.get("mask_id") != num_items + 1:
        raise BundleError(f"{path}: pad_id must be 0 and mask_id num_items + 1")
    return Vocab(tuple(items))


def read_popular(path: Path, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(internal ids most popular first, their share of training interactions)."""
    document = read_json(path)
    if not isinstance(document, dict) or document.get("schema") != POPULAR_SCHEMA:
        raise BundleError(f"{path}: expected schema {POPULAR_SCHEMA!r}")
    try:
        items = np.asarray(document.get("items"), dtype=np.int64)
        counts = np.asarray(document.get("counts"), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{path}: 'items' and 'counts' must be lists of numbers") from err
    if items.shape != (num_items,) or counts.shape != (num_items,):
        raise BundleError(f"{path}: 'items' and 'counts' must both list all {num_items} items")
    if not np.array_equal(np.sort(items), np.arange(1, num_items + 1)):
        raise BundleError(f"{path}: 'items' must hold every internal id 1..{num_items} once")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise BundleError(f"{path}: 'counts' must be finite and non-negative")
    total = counts.sum()
    shares = counts / total if total > 0 else np.zeros_like(counts)
    return items, shares.astype(np.float32)
