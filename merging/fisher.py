"""Diagonal Fisher information of the next-item distribution (docs/merging.md).

For a model θ and training sequences s = (history, v*), the Fisher of the
next-item distribution p(v | history) = softmax(model.logits(history)) is

    F = E_s Σ_j p(v_j | s) (∇θ log p(v_j | s))²        (elementwise)

It is computed in eval mode (no dropout) on this one objective whatever recipe
trained the model, so the Fishers of all recipes are comparable. Estimators
differ in which items j they sum over (the registry `ESTIMATORS`):

| spec        | items j and weights                                        |
|-------------|------------------------------------------------------------|
| `exact[:r]` | all items, exactly, in D VJPs (top r eigenpairs if r given) |
| `full`      | all items by brute force: |V| VJPs (the reference)          |
| `random:n`  | n items uniformly without replacement, weight p_j |V| / n    |
| `topk:n`    | the n most probable items, weight p_j                       |
| `sample:n`  | n draws from p, weight 1/n (Monte Carlo)                    |
| `target`    | the true next item, weight p(v*) (thesis Eq. 3.13)          |
| `empirical` | the true next item, weight 1                                |

Per-sequence gradients are exact (never the square of a batch sum) unless
`batch_shortcut` is set: the thesis's cheaper approximation that squares the
gradient of the batch-summed, weighted log-probabilities (cross-sequence terms
included). The exact identity and the per-sequence engines live in
merging/fisher_exact.py.

Results are sums over sequences plus a count (`FisherResult`), so shards computed
separately (Ray tasks over user shards) add up to the unsharded result; random
draws are seeded per sequence id, so sharding does not change them either.
Files are safetensors with JSON metadata and a content checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import safe_open
from torch import Tensor

from merging.fisher_accumulator import FisherAccumulator
from merging.fisher_exact import (
    ItemSelector,
    autograd_items,
    batch_shortcut_items,
    exact_identity,
    structured_items,
)
from merging.regmean import GRAM_PREFIX, compute_grams
from training.batching import pad_left
from training.checkpoint import WEIGHTS, Checkpoint, read_manifest, save_tensors
from training.data import SequenceData
from training.model import SequenceRecommender
from training.trainer import epoch_seed, load_run_checkpoint

log = logging.getLogger(__name__)

SCHEMA = "fishrec.fisher/1"

# Picks the items j of one sequence and their weights: (p (N,), target column, n, generator)
# -> (columns (K,) int64, weights (K,)); the estimate is Σ_k weight_k g(j_k)².
Selector = Callable[[Tensor, int, int | None, torch.Generator], tuple[Tensor, Tensor]]


def _all_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.arange(len(p)), p


def _random_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    # Without replacement each item is included with probability k/N, so the
    # weight p_j N/k makes the estimate unbiased (and exact when k = N).
    k = min(int(n or 0), len(p))
    items = torch.randperm(len(p), generator=gen)[:k]
    return items, p[items] * (len(p) / k)


def _topk_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    weights, items = p.topk(min(int(n or 0), len(p)))
    return items, weights


def _sampled_items(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    items = torch.multinomial(p, int(n or 0), replacement=True, generator=gen)
    return items, torch.full((len(items),), 1.0 / len(items), dtype=p.dtype)


def _target_item(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.tensor([target]), p[target : target + 1]


def _empirical_item(
    p: Tensor, target: int, n: int | None, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    return torch.tensor([target]), torch.ones(1, dtype=p.dtype)


@dataclass(frozen=True)
class EstimatorKind:
    """One registered estimator: how it picks items, and whether it takes `:n`."""

    select: Selector | None  # None: the exact identity (no item list)
    takes_n: Literal["required", "optional", "never"]
    engine: Literal["exact", "structured", "autograd"]  # default per-sequence engine
    description: str


ESTIMATORS: dict[str, EstimatorKind] = {
    "exact": EstimatorKind(
        None, "optional", "exact", "all items exactly in D VJPs; exact:r keeps the top r eigenpairs"
    ),
    "full": EstimatorKind(
        _all_items, "never", "autograd", "all items by brute force (|V| VJPs): the reference"
    ),
    "random": EstimatorKind(
        _random_items, "required", "structured", "n uniform items, importance-weighted"
    ),
    "topk": EstimatorKind(_topk_items, "required", "structured", "the n most probable items"),
    "sample": EstimatorKind(_sampled_items, "required", "structured", "n items drawn from p"),
    "target": EstimatorKind(_target_item, "never", "structured", "the true next item, p(v*) g²"),
    "empirical": EstimatorKind(_empirical_item, "never", "structured", "the true next item, g²"),
}


@dataclass(frozen=True)
class EstimatorSpec:
    """A parsed estimator: `name` or `name:n`."""

    name: str
    n: int | None = None

    @property
    def kind(self) -> EstimatorKind:
        return ESTIMATORS[self.name]

    def __str__(self) -> str:
        return self.name if self.n is None else f"{self.name}:{self.n}"


def parse_estimator(text: str) -> EstimatorSpec:
    """'sample:50' -> EstimatorSpec('sample', 50); a clear error for anything else."""
    name, sep, count = str(text).strip().partition(":")
    if name not in ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {text!r}; known: {', '.join(ESTIMATORS)}")
    kind = ESTIMATORS[name]
    if not sep:
        if kind.takes_n == "required":
            raise ValueError(f"estimator {name!r} needs a count, e.g. {name}:50")
        return EstimatorSpec(name)
    if kind.takes_n == "never":
        raise ValueError(f"estimator {name!r} takes no count, got {text!r}")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"estimator {text!r}: the count must be a positive integer")
    return EstimatorSpec(name, int(count))


class FisherConfig(BaseModel):
    """How a Fisher is estimated; the CLI and the Ray job build one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    estimator: str = Field("exact", description="estimator spec: name or name:n (see ESTIMATORS)")
    num_sequences: int | None = Field(
        None, ge=1, description="seeded subset of training sequences (None: all)"
    )
    seed: int = Field(0, description="seeds the sequence subset and the estimators' item draws")
    batch_shortcut: bool = Field(
        False,
        description="APPROXIMATE: square the gradient of the batch-summed log-probabilities "
        "instead of summing per-sequence squares (the thesis's cheap variant)",
    )
    batch_size: int = Field(64, ge=1, description="sequences per batch for the batch shortcut")
    engine: Literal["auto", "structured", "autograd"] = Field(
        "auto",
        description="per-sequence gradients: structured (output layer in closed form, VJPs "
        "through the hidden state) or autograd (brute force); auto: the estimator's default",
    )
    max_gradients: int = Field(
        128, ge=1, description="per-sequence gradients held in memory at once (chunking)"
    )
    grams: bool = Field(
        True,
        description="also sum the linear layers' input Grams over the same sequences (RegMean; "
        "one forward pass, stored in the Fisher file)",
    )

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        return str(parse_estimator(value))

    @property
    def spec(self) -> EstimatorSpec:
        return parse_estimator(self.estimator)


@dataclass
class FisherResult:
    """Sums of per-sequence Fisher diagonals over `count` sequences.

    Shards add: `sum(results)` or `a + b` gives the result of the union.
    """

    sums: dict[str, Tensor]  # float64, keyed like model.named_parameters()
    count: int
    estimator: str
    batch_shortcut: bool = False
    dropped_mass: float = 0.0  # exact:r: Σ over sequences of the dropped eigenvalue share
    extra: dict[str, Any] = field(default_factory=dict)
    # Input Grams of the linear layers (merging/regmean.py), summed over `gram_rows` rows.
    grams: dict[str, Tensor] = field(default_factory=dict)
    gram_rows: int = 0

    def __add__(self, other: FisherResult) -> FisherResult:
        if (self.estimator, self.batch_shortcut) != (other.estimator, other.batch_shortcut):
            raise ValueError(
                f"cannot add Fishers of {self.estimator} (shortcut {self.batch_shortcut}) and "
                f"{other.estimator} (shortcut {other.batch_shortcut})"
            )
        check_same_keys(self.sums, other.sums, "the two Fishers")
        check_same_keys(self.grams, other.grams, "the two Fishers' Grams")
        return FisherResult(
            {name: self.sums[name] + other.sums[name] for name in self.sums},
            self.count + other.count,
            self.estimator,
            self.batch_shortcut,
            self.dropped_mass + other.dropped_mass,
            grams={name: self.grams[name] + other.grams[name] for name in self.grams},
            gram_rows=self.gram_rows + other.gram_rows,
        )

    def __radd__(self, other: object) -> FisherResult:
        if other == 0:  # lets sum(results) start from 0
            return self
        return NotImplemented

    def mean(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The Fisher: the average over sequences."""
        if self.count == 0:
            raise ValueError("no sequences: the Fisher of an empty set is undefined")
        return {name: (s / self.count).to(dtype) for name, s in self.sums.items()}

    def mean_grams(self) -> dict[str, Tensor]:
        """The Grams per input row (float64: the RegMean solve needs the precision)."""
        if not self.grams:
            return {}
        return {name: g / self.gram_rows for name, g in self.grams.items()}

    def file_tensors(self) -> dict[str, Tensor]:
        """What a Fisher file holds: the Fisher by parameter name, the Grams as "gram:" keys."""
        return {**self.mean(), **{GRAM_PREFIX + k: g for k, g in self.mean_grams().items()}}

    @property
    def mean_dropped_mass(self) -> float:
        return self.dropped_mass / self.count if self.count else 0.0


def check_same_keys(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """Parameters are matched by name: a mismatch is an error that names the keys."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"{what} have different parameter names: only in the first {only_a}, "
            f"only in the second {only_b}"
        )


def select_sequences(
    train: Sequence[np.ndarray], num_sequences: int | None, seed: int = 0
) -> tuple[list[int], list[np.ndarray]]:
    """(ids, sequences): the training sequences with a next item to predict, or a seeded subset."""
    ids = [i for i, seq in enumerate(train) if len(seq) >= 2]
    if not ids:
        raise ValueError("no training sequence has two or more items")
    if num_sequences is not None and num_sequences < len(ids):
        picked = np.random.default_rng(seed).choice(len(ids), num_sequences, replace=False)
        ids = [ids[i] for i in sorted(picked)]
    return ids, [train[i] for i in ids]


def sequence_generator(seed: int, sequence_id: int) -> torch.Generator:
    """The random draws of one sequence depend on (seed, its id) only: shards agree."""
    return torch.Generator().manual_seed(epoch_seed(seed, sequence_id))


def compute_fisher(
    model: SequenceRecommender,
    sequences: Sequence[np.ndarray],
    config: FisherConfig | None = None,
    ids: Sequence[int] | None = None,
) -> FisherResult:
    """Fisher sums over `sequences` (each: history items then the next item).

    `ids` (default 0..len-1) name the sequences for the per-sequence random
    draws; pass global indices when computing a shard.
    """
    config = config or FisherConfig()
    spec = config.spec
    ids = list(range(len(sequences))) if ids is None else list(ids)
    if len(ids) != len(sequences):
        raise ValueError(f"{len(ids)} ids for {len(sequences)} sequences")
    short = [i for i, seq in zip(ids, sequences, strict=True) if len(seq) < 2]
    if short:
        raise ValueError(f"sequences {short[:5]} have fewer than 2 items: nothing to predict")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            accumulator = FisherAccumulator(model)
        if config.batch_shortcut:
            _run_shortcut(model, sequences, ids, spec, config, accumulator)
        else:
            _run_per_sequence(model, sequences, ids, spec, config, accumulator)
    finally:
        model.train(was_training)
    grams, rows = compute_grams(model, sequences) if config.grams else ({}, 0)
    return FisherResult(
        accumulator.sums,
        len(sequences),
        str(spec),
        config.batch_shortcut,
        accumulator.dropped_mass,
        grams=grams,
        gram_rows=rows,
    )


def _engine(spec: EstimatorSpec, config: FisherConfig, model: SequenceRecommender) -> str:
    if model.config.modality:
        return _text_model_engine(spec, config, model)
    if spec.kind.engine == "exact":
        if config.engine == "autograd":
            raise ValueError("the exact estimator has its own engine; use engine=auto")
        return "exact"
    return spec.kind.engine if config.engine == "auto" else config.engine


def _text_model_engine(
    spec: EstimatorSpec, config: FisherConfig, model: SequenceRecommender
) -> str:
    """Models with text run on the autograd engine; `exact` and `structured` refuse them.

    Both treat the output matrix W as free parameters whose rows are also the input
    embeddings (docs/merging.md, "The exact Fisher identity"). With text, W = E + adaptor(features): the adaptor's
    gradient through W is outside that identity. Brute force is exact for any model.
    """
    if spec.kind.engine == "exact" or config.engine == "structured":
        raise ValueError(
            f"Fisher estimator {spec} (engine {config.engine}) assumes ID-only items; this model "
            f"represents items through text (item_representation "
            f"{model.config.item_representation!r}): use full, random:n, topk:n, sample:n, "
            "target or empirical (autograd engine), or the batch shortcut"
        )
    return "autograd"


def _selector(spec: EstimatorSpec, target: int, generator: torch.Generator) -> ItemSelector:
    """The item picker of one sequence: binds its target column and random generator."""
    select = spec.kind.select
    if select is None:
        raise ValueError(f"estimator {spec} does not pick items")

    def pick(p: Tensor) -> tuple[Tensor, Tensor]:
        return select(p, target, spec.n, generator)

    return pick


def _deduped(select: ItemSelector) -> ItemSelector:
    """Repeated draws share one gradient: unique items with summed weights."""

    def pick(p: Tensor) -> tuple[Tensor, Tensor]:
        items, weights = select(p)
        unique, inverse = torch.unique(items, return_inverse=True)
        summed = torch.zeros(len(unique), dtype=weights.dtype).index_add_(0, inverse, weights)
        return unique, summed

    return pick


def _run_per_sequence(
    model: SequenceRecommender,
    sequences: Sequence[np.ndarray],
    ids: list[int],
    spec: EstimatorSpec,
    config: FisherConfig,
    accumulator: FisherAccumulator,
) -> None:
    engine = _engine(spec, config, model)
    run = structured_items if engine == "structured" else autograd_items
    device = next(model.parameters()).device
    step = max(1, len(sequences) // 10)
    for done, (sequence_id, seq) in enumerate(zip(ids, sequences, strict=True), start=1):
        history = torch.as_tensor(seq[:-1], dtype=torch.long, device=device)[None]  # (1, L)
        if engine == "exact":
            exact_identity(model, history, spec.n, accumulator)
        else:
            generator = sequence_generator(config.seed, sequence_id)
            select = _deduped(_selector(spec, int(seq[-1]) - 1, generator))
            run(model, history, select, accumulator, config.max_gradients)
        if done % step == 0:
            log.info("Fisher %s: %d/%d sequences", spec, done, len(sequences))


def _run_shortcut(
    model: SequenceRecommender,
    sequences: Sequence[np.ndarray],
    ids: list[int],
    spec: EstimatorSpec,
    config: FisherConfig,
    accumulator: FisherAccumulator,
) -> None:
    if spec.kind.select is None:
        raise ValueError("the batch shortcut applies to item-list estimators, not to exact")
    device = next(model.parameters()).device
    # Similar lengths in a batch keep padding small.
    order = np.argsort([len(s) for s in sequences], kind="stable")
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        histories = pad_left([sequences[r][:-1] for r in rows], model.config.max_len).to(device)
        selectors = [
            _selector(spec, int(sequences[r][-1]) - 1, sequence_generator(config.seed, ids[r]))
            for r in rows
        ]
        batch_shortcut_items(model, histories, selectors, accumulator)


# ---- files ------------------------------------------------------------------------


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


def checkpoint_fisher(
    checkpoint: Path,
    data: SequenceData,
    config: FisherConfig | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FisherResult, dict[str, Any]]:
    """The Fisher of a checkpoint (or run folder) on its training data, with file metadata."""
    config = config or FisherConfig()
    loaded = load_run_checkpoint(Path(checkpoint), device)
    trained_on = loaded.info.get("data_fingerprint")
    if trained_on and trained_on != data.fingerprint:
        raise ValueError(
            f"{checkpoint} was trained on data {trained_on}, the given data is {data.fingerprint}"
        )
    if loaded.config.num_items != data.num_items:
        raise ValueError(
            f"{checkpoint} scores {loaded.config.num_items} items, the data has {data.num_items}"
        )
    ids, sequences = select_sequences(data.split().train, config.num_sequences, config.seed)
    result = compute_fisher(loaded.model, sequences, config, ids)
    metadata = fisher_metadata(
        result,
        checkpoint=str(loaded.path),
        checkpoint_sha256=model_sha256(loaded),
        recipe=loaded.info.get("recipe"),
        data_fingerprint=data.fingerprint,
        seed=config.seed,
        config=config.model_dump(mode="json"),
    )
    return result, metadata


def relative_error(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """||estimate - reference|| / ||reference|| over all parameters together."""
    check_same_keys(estimate, reference, "the estimate and the reference")
    num = sum(
        float((estimate[k].double() - reference[k].double()).square().sum()) for k in reference
    )
    den = sum(float(reference[k].double().square().sum()) for k in reference)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
