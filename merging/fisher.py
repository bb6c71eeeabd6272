"""Diagonal Fisher information of the next-item distribution (docs/merging.md).

For a model θ and training sequences s = (history, v*), the Fisher of the
next-item distribution p(v | history) = softmax(model.logits(history)) is

    F = E_s Σ_j p(v_j | s) (∇θ log p(v_j | s))²        (elementwise)

It is computed in eval mode (no dropout) on this one objective whatever recipe
trained the model, so the Fishers of all recipes are comparable. Estimators
differ in which items j they sum over (merging/fisher_estimators.py, the
registry `ESTIMATORS`); this module runs them: `compute_fisher` on sequences,
`checkpoint_fisher` on a checkpoint and its training data.

Per-sequence gradients are exact (never the square of a batch sum) unless
`batch_shortcut` is set: the thesis's cheaper approximation that squares the
gradient of the batch-summed, weighted log-probabilities (cross-sequence terms
included). The exact identity and the per-sequence engines live in
merging/fisher_exact.py.

Results are sums over sequences plus a count (merging/fisher_result.py), so shards
computed separately (Ray tasks over user shards) add up to the unsharded result;
random draws are seeded per sequence id, so sharding does not change them either.
The file they are written to is merging/fisher_file.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from torch import Tensor

from merging.fisher_accumulator import FisherAccumulator
from merging.fisher_estimators import EstimatorSpec, parse_estimator
from merging.fisher_exact import (
    ItemSelector,
    autograd_items,
    batch_shortcut_items,
    exact_identity,
    structured_items,
)
from merging.fisher_file import fisher_metadata, model_sha256
from merging.fisher_result import FisherResult
from merging.regmean import compute_grams
from training.batching import pad_left
from training.model import SequenceRecommender
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.trainer import epoch_seed

log = logging.getLogger(__name__)


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

    # The spec is parsed once, when the config is validated; the string stays the
    # field so that YAML, CLI and Ray payloads carry the plain spec text.
    _spec: EstimatorSpec = PrivateAttr()

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        return str(parse_estimator(value))

    def model_post_init(self, context: Any, /) -> None:
        self._spec = parse_estimator(self.estimator)

    @property
    def spec(self) -> EstimatorSpec:
        if str(self._spec) != self.estimator:  # model_copy(update=...) skips validation
            self._spec = parse_estimator(self.estimator)
        return self._spec


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
        generator = sequence_generator(config.seed, sequence_id)
        if engine == "exact":
            rank, items = (None, spec.n) if spec.name == "truncated" else (spec.n, None)
            exact_identity(model, history, rank, accumulator, items, generator)
        else:
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
