"""Transfer to another catalogue through item text, ANT-style (Peng, Parthasarathy, Ning,
"Multi-modality Meets Re-learning: Mitigating Negative Transfer in Sequential Recommendation").

    fishrec train --data target/ --transfer-from source_run/ --adaptation relearn --out run/

A model whose items are represented through their text (item_representation
"text" or "id+text") reads any catalogue whose items have text: only its
catalogue-specific parts stay behind. The target model takes the source's
architecture and copies every weight except

- the ID embedding rows of the items ("id+text": fresh, the target's items
  are other items; the [MASK] row is copied) and the output bias (fresh zeros);
- the item features: the target's own, which must come from the same encoder.

Adaptations:

- `finetune`: everything continues from the source and trains on the target;
- `relearn`: the transformer blocks are frozen (they stay exactly as the source
  learnt them) while the position embeddings and the modality adaptor are
  re-initialised and learnt again on the target, with the rest; ANT's remedy
  against negative transfer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from training.item_features import ItemFeatures
from training.model import SequenceRecommender, build_model

Adaptation = Literal["finetune", "relearn"]
ADAPTATIONS: tuple[str, ...] = ("finetune", "relearn")
# Never copied: they belong to the source's catalogue.
CATALOGUE_TENSORS = ("output_bias", "item_features", "feature_mask")
FROZEN_BY_RELEARN = "blocks."


@dataclass(frozen=True)
class Transfer:
    """Where a transferred run starts: a source checkpoint (or run folder) and how to adapt."""

    source: Path
    adaptation: Adaptation = "relearn"

    def __post_init__(self) -> None:
        if self.adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation must be one of {ADAPTATIONS}, got {self.adaptation!r}")

    def to_json(self) -> dict[str, str]:
        return {"source": str(self.source), "adaptation": self.adaptation}


def transfer_model(
    source: SequenceRecommender,
    features: ItemFeatures,
    adaptation: Adaptation,
    seed: int = 0,
) -> SequenceRecommender:
    """A model of the features' catalogue that starts from `source` (see the module header)."""
    config = source.config
    if not config.modality:
        raise ValueError(
            "transfer needs a source model whose items have text (item_representation "
            "'id+text' or 'text'); an ID-only model's item ids mean nothing in another catalogue"
        )
    if features.dim != config.feature_dim:
        raise ValueError(
            f"the target features are {features.dim}-dimensional ({features.encoder}), the source "
            f"model reads {config.feature_dim}: encode both catalogues with the same encoder"
        )
    target = build_model(dataclasses.replace(config, num_items=features.num_items), seed=seed)
    load_features_into(target, features)
    state = target.state_dict()
    for name, tensor in source.state_dict().items():
        if name in CATALOGUE_TENSORS:
            continue
        if name == "item_embedding.weight":
            state[name][-1] = tensor[-1]  # [MASK]; the item rows stay fresh
        else:
            state[name] = tensor.detach().clone()
    target.load_state_dict(state)
    if adaptation == "relearn":
        relearn(target, seed)
    return target


def relearn(model: SequenceRecommender, seed: int = 0) -> None:
    """Freeze the transformer blocks; re-initialise the position embeddings and the adaptor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(model.position_embedding.weight, std=model.config.init_std)
        model.item_adaptor.reset_parameters()
    for name, param in model.named_parameters():
        if name.startswith(FROZEN_BY_RELEARN):
            param.requires_grad_(False)


def frozen_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that do not train (relearn's transformer blocks)."""
    return [name for name, param in model.named_parameters() if not param.requires_grad]


def load_features_into(model: nn.Module, features: ItemFeatures) -> None:
    """Copy a feature file's matrix and mask into a model with text (`set_item_features`)."""
    model.set_item_features(  # type: ignore[operator]
        torch.from_numpy(features.vectors).float(), torch.from_numpy(features.mask).float()
    )
