"""Warm start across catalogue changes: yesterday's model, today's items.

A nightly retrain should not throw away what the published model learnt, but
its item ids are yesterday's: new items appeared, old ones vanished, and the
internal numbering of the new data is its own. `warm_start_model` builds a
model for the new catalogue with the source's architecture and copies

- every weight that does not belong to an item (transformer blocks, positions,
  norms, the [MASK] row) unchanged;
- each kept item's embedding row and output bias, matched by *external* id;

while new items keep a fresh initialisation (rows drawn like any new model's,
output bias 0) and items no longer in the data are dropped. The result is an
ordinary checkpoint of the new data (its fingerprint), so the trainer continues
it like any `--init`.

    fishrec warm-start --from runs/<run_id> --data data/today --out runs/warm

Models with item text are not warm-started here: their item features belong
to the features file of the day; train them with `--transfer-from`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import Checkpoint, write_checkpoint
from training.model import ModelConfig, SequenceRecommender, build_model
from training.sequence_data import SequenceData
from training.vocabulary import Vocabulary

# The item-indexed tensors of an ID model: the embedding table (row i is item i, row 0
# padding, row N + 1 [MASK]) and the output bias (entry i - 1 is item i).
EMBEDDING = "item_embedding.weight"
OUTPUT_BIAS = "output_bias"


@dataclass(frozen=True)
class CatalogueChange:
    """How the catalogue moved between the source model and the new data."""

    kept: int  # items in both: rows copied
    new: int  # items only in the new data: fresh rows
    dropped: int  # items only in the source: rows discarded

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return f"{self.kept} items kept, {self.new} new, {self.dropped} dropped"


def source_rows(source: Vocabulary, target: Vocabulary) -> np.ndarray:
    """For each target item id 1..N, its id in `source` (0: the item is new)."""
    index = {external: internal for internal, external in enumerate(source.items, start=1)}
    return np.array([index.get(external, 0) for external in target.items], dtype=np.int64)


def warm_start_model(
    source: SequenceRecommender, source_vocab: Vocabulary, target_vocab: Vocabulary, seed: int = 0
) -> tuple[SequenceRecommender, CatalogueChange]:
    """A model for `target_vocab` carrying `source`'s weights over by external item id."""
    if source.config.modality:
        raise ValueError(
            "warm start copies ID rows; a model with item text reads the features of its day: "
            "train it with --transfer-from instead"
        )
    if source.config.num_items != source_vocab.num_items:
        raise ValueError(
            f"the source model scores {source.config.num_items} items, its vocabulary has "
            f"{source_vocab.num_items}: they do not belong together"
        )
    config: ModelConfig = dataclasses.replace(source.config, num_items=target_vocab.num_items)
    model = build_model(config, seed=seed)
    rows = source_rows(source_vocab, target_vocab)
    kept = np.flatnonzero(rows)  # target positions 0..N-1 of kept items
    state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    fresh = model.state_dict()
    targets, sources = torch.as_tensor(kept + 1), torch.as_tensor(rows[kept])
    embedding = fresh[EMBEDDING].clone()
    embedding[targets] = state[EMBEDDING][sources]
    embedding[-1] = state[EMBEDDING][-1]  # [MASK]
    bias = fresh[OUTPUT_BIAS].clone()
    bias[targets - 1] = state[OUTPUT_BIAS][sources - 1]
    state[EMBEDDING], state[OUTPUT_BIAS] = embedding, bias
    model.load_state_dict(state, strict=True)
    change = CatalogueChange(
        kept=len(kept),
        new=target_vocab.num_items - len(kept),
        dropped=source_vocab.num_items - len(kept),
    )
    return model, change


def write_warm_start(
    source: Checkpoint,
    source_vocab: Vocabulary,
    data: SequenceData,
    out: Path,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> CatalogueChange:
    """Write the warm-started checkpoint of `data` into `out`; returns the catalogue change."""
    model, change = warm_start_model(source.model, source_vocab, data.vocab, seed)
    info = {
        "recipe": source.info.get("recipe"),
        "recipe_params": source.info.get("recipe_params", {}),
        "epoch": 0,
        "seed": seed,
        "data_fingerprint": data.fingerprint,
        "init": None,
        "warm_start": {
            "source": str(source.path) if source.path else None,
            "source_data_fingerprint": source.info.get("data_fingerprint"),
            **change.to_json(),
            **(provenance or {}),
        },
    }
    write_checkpoint(out, model, model.config, info)
    return change


# A bundle exported with its checkpoint (merging/export.py) carries it here, beside
# vocab.json: everything a next run needs to continue the published model.
BUNDLE_CHECKPOINT = "checkpoint"


def load_bundle_source(bundle: Path) -> tuple[Checkpoint, Vocabulary]:
    """The checkpoint and vocabulary a published bundle carries (checksums verified)."""
    from training.checkpoint import load_checkpoint
    from training.sequence_data import VOCAB_FILE

    bundle = Path(bundle)
    folder = bundle / BUNDLE_CHECKPOINT
    if not folder.is_dir():
        raise ValueError(
            f"{bundle}: the bundle carries no {BUNDLE_CHECKPOINT}/ folder to warm-start from "
            "(export it with --with-checkpoint; the merge job's export.checkpoint does)"
        )
    return load_checkpoint(folder), Vocabulary.load(bundle / VOCAB_FILE)
