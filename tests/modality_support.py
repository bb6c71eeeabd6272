"""Item text and features for the modality tests: deterministic, tiny, no sentence model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.item_features import ItemFeatures, build_item_features
from training.item_text import ItemTexts
from training.sequence_data import SequenceData
from training.text_encoders import HashingEncoder
from training.vocabulary import Vocabulary

FEATURE_DIM = 24


def item_text(external: str) -> str:
    """A text that shares words within a group of items, so their features correlate."""
    number = int("".join(ch for ch in external if ch.isdigit()) or 0)
    return f"item {external} of group g{number % 7} and shelf s{number % 3}"


def synthetic_texts(vocab: Vocabulary, without_text: int = 0) -> ItemTexts:
    """Texts for every item but the last `without_text` ones."""
    kept = vocab.items[: vocab.num_items - without_text]
    return ItemTexts({item: item_text(item) for item in kept}, "synthetic", "tsv")


def hashing_features(data: SequenceData, without_text: int = 0) -> ItemFeatures:
    return build_item_features(
        data.vocab,
        synthetic_texts(data.vocab, without_text),
        HashingEncoder(FEATURE_DIM),
        cache_dir=None,
        progress=False,
    )


def write_features(data: SequenceData, path: Path, without_text: int = 0) -> Path:
    hashing_features(data, without_text).save(path)
    return path


def random_features(num_items: int, dim: int = FEATURE_DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_items, dim)).astype(np.float32)
