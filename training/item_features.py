"""Item features: a feature matrix aligned with the internal item ids, and its file.

    fishrec data features --data data/ml-1m --input movies.dat

reads the text of every item (training/item_text.py), encodes it with a local
sentence encoder (training/text_encoders.py) and writes `features.safetensors`
next to the prepared data (DataSpec.features points elsewhere when needed).
The file holds

    features   float32 (N, F)  row i = internal item id i + 1; zeros where an item has no text
    mask       uint8   (N,)    1 where the item has text
    metadata   schema, encoder name and dimension, the sha256 of the vocabulary it is
               aligned with, coverage counts and a checksum of the content

Features built for another catalogue are refused on load: their rows would
describe other items. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data_error import DataError
from training.item_text import ItemTexts, read_id_map, read_item_texts
from training.sequence_data import SequenceData
from training.text_encoders import (
    DEFAULT_CACHE,
    DEFAULT_ENCODER,
    Encoder,
    encode_texts,
    get_encoder,
)
from training.vocabulary import Vocabulary

log = logging.getLogger(__name__)

SCHEMA = "fishrec.features/1"
FEATURES_FILE = "features.safetensors"


def vocabulary_digest(vocab: Vocabulary) -> str:
    """sha256 of the ordered external ids: what a feature matrix is aligned with."""
    blob = json.dumps(list(vocab.items), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _content_digest(vectors: np.ndarray, mask: np.ndarray) -> str:
    digest = hashlib.sha256(SCHEMA.encode())
    for array in (vectors.astype("<f4"), mask.astype(np.uint8)):
        digest.update(str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """A feature matrix aligned with a vocabulary: row i is internal item id i + 1."""

    vectors: np.ndarray  # (N, F) float32, zero rows where mask is False
    mask: np.ndarray  # (N,) bool: the item has text
    encoder: str
    vocab_sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.mask.shape != (self.vectors.shape[0],):
            raise DataError(
                f"features {self.vectors.shape} and mask {self.mask.shape} do not match"
            )
        if not np.isfinite(self.vectors).all():
            raise DataError("features must be finite")

    @property
    def num_items(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def coverage(self) -> float:
        return float(self.mask.mean()) if self.num_items else 0.0

    def check_vocabulary(self, vocab: Vocabulary, source: str = "features") -> None:
        """Refuse features built for another catalogue (the rows would mean other items)."""
        if self.num_items != vocab.num_items or self.vocab_sha256 != vocabulary_digest(vocab):
            raise DataError(
                f"{source}: built for another vocabulary ({self.num_items} items, vocabulary "
                f"{self.vocab_sha256[:12]}...), the data has {vocab.num_items} items "
                f"({vocabulary_digest(vocab)[:12]}...): run `fishrec data features` for this data"
            )

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        path = Path(path)
        metadata = {
            "schema": SCHEMA,
            "encoder": self.encoder,
            "dim": str(self.dim),
            "num_items": str(self.num_items),
            "vocab_sha256": self.vocab_sha256,
            "content_sha256": _content_digest(self.vectors, self.mask),
            "info": json.dumps(self.info, sort_keys=True),
        }
        tensors = {"features": self.vectors.astype(np.float32), "mask": self.mask.astype(np.uint8)}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(staging), metadata=metadata)
        staging.replace(path)  # readers never see half a file

    @classmethod
    def load(cls, path: Path, vocab: Vocabulary | None = None) -> ItemFeatures:
        """Read a feature file, verify its checksum and (given `vocab`) its alignment."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no feature file (write one with `fishrec data features`)")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise DataError(f"{path}: not a safetensors file ({err})") from None
        required = {"schema", "encoder", "vocab_sha256", "content_sha256", "info"}
        if (
            meta.get("schema") != SCHEMA
            or set(tensors) != {"features", "mask"}
            or required - set(meta)
        ):
            raise DataError(f"{path}: not a fishrec feature file (schema {meta.get('schema')!r})")
        vectors, mask = tensors["features"].astype(np.float32), tensors["mask"].astype(bool)
        if _content_digest(vectors, mask) != meta.get("content_sha256"):
            raise DataError(f"{path}: content checksum mismatch (file corrupt or modified)")
        features = cls(
            vectors, mask, meta["encoder"], meta["vocab_sha256"], json.loads(meta["info"])
        )
        if vocab is not None:
            features.check_vocabulary(vocab, str(path))
        return features


def build_item_features(
    vocab: Vocabulary,
    texts: ItemTexts,
    encoder: Encoder,
    id_map: dict[str, str] | None = None,
    cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True,
) -> ItemFeatures:
    """Encode the text of every vocabulary item; items without text get zeros and mask 0.

    `id_map` translates the data's external ids to the text file's ids.
    """
    keys = [id_map.get(item, "") if id_map is not None else item for item in vocab.items]
    present = np.array([key in texts.texts for key in keys], dtype=bool)
    if not present.any():
        raise DataError(
            f"{texts.source}: no item of the data has a text (ids like {vocab.items[:3]} vs "
            f"{list(texts.texts)[:3]}); wrong file, or pass an id map"
        )
    wanted = [texts.texts[key] for key, has in zip(keys, present, strict=True) if has]
    encoded = encode_texts(wanted, encoder, cache_dir, progress=progress)
    vectors = np.zeros((vocab.num_items, encoder.dim), dtype=np.float32)
    vectors[present] = encoded
    unused = len(set(texts.texts) - set(keys))
    info = {
        "source": texts.source,
        "format": texts.format,
        "items_with_text": int(present.sum()),
        "items_without_text": int((~present).sum()),
        "texts_not_in_data": unused,
        "repeated_lines": texts.repeated,
        "empty_texts": texts.empty,
    }
    log.info(
        "%d of %d items have text (%d texts are of items not in the data)",
        info["items_with_text"],
        vocab.num_items,
        unused,
    )
    return ItemFeatures(vectors, present, encoder.name, vocabulary_digest(vocab), info)


def write_item_features(
    data: SequenceData,
    text_file: Path,
    out: Path,
    *,
    fmt: str = "auto",
    encoding: str | None = None,
    encoder: str = DEFAULT_ENCODER,
    id_map: Path | None = None,
    cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True,
) -> ItemFeatures:
    """Read, encode and save the features of `data`'s items (what `fishrec data features` runs)."""
    texts = read_item_texts(Path(text_file), fmt, encoding)
    mapping = read_id_map(id_map) if id_map is not None else None
    features = build_item_features(
        data.vocab, texts, get_encoder(encoder), mapping, cache_dir, progress
    )
    features.save(Path(out))
    return features


def features_path(data_path: str, features: str | None) -> Path:
    """Where a run's features are: `features` if given, else features.safetensors in the data folder."""
    if features:
        return Path(features)
    folder = Path(data_path)
    if not folder.is_dir():
        raise DataError(
            f"data.path {data_path!r} is not a prepared data folder: set data.features to the "
            "feature file (fishrec data features --out FILE)"
        )
    return folder / FEATURES_FILE


def load_item_features(data_path: str, features: str | None, data: SequenceData) -> ItemFeatures:
    """The feature file of a run's data (see `features_path`), checked against its vocabulary."""
    return ItemFeatures.load(features_path(data_path, features), data.vocab)
