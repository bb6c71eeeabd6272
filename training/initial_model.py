"""The model a training run starts from: new, the weights of --init, or a transfer.

Also which item features the run reads: a recipe may need them (KDSR), and so
does a new model that represents items by text. The trainer (training/trainer.py)
calls these once, before its loop; they hold no state of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from training.config import ExperimentConfig
from training.item_features import ItemFeatures, load_item_features
from training.model import ModelConfig, SequenceRecommender, build_model
from training.recipes import needs_features
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.transfer import Transfer, frozen_parameters, load_features_into, transfer_model

log = logging.getLogger(__name__)


def item_features_for(
    config: ExperimentConfig,
    data: SequenceData,
    init: Path | None,
    transfer: Transfer | None,
) -> ItemFeatures | None:
    """The data's item features, read when the recipe or a new model with text needs them."""
    new_text_model = init is None and (
        transfer is not None or config.model.item_representation != "id"
    )
    if not (new_text_model or needs_features(config.recipe.name)):
        return None
    return load_item_features(config.data.path, config.data.features, data)


def new_model(
    config: ExperimentConfig, data: SequenceData, features: ItemFeatures | None
) -> SequenceRecommender:
    """A freshly initialised model of `data`'s items (text rows loaded when it reads text)."""
    spec = config.model.model_dump()
    seed = config.train.seed if config.train.init_seed is None else config.train.init_seed
    if spec["item_representation"] == "id":
        spec.update(feature_dim=0)
        return build_model(ModelConfig(num_items=data.num_items, **spec), seed=seed)
    assert features is not None
    if spec["feature_dim"] not in (None, features.dim):
        raise ValueError(
            f"model.feature_dim is {spec['feature_dim']}, the features have {features.dim}"
        )
    spec.update(feature_dim=features.dim)
    model = build_model(ModelConfig(num_items=data.num_items, **spec), seed=seed)
    load_features_into(model, features)
    return model


def initial_model(
    config: ExperimentConfig,
    data: SequenceData,
    features: ItemFeatures | None,
    init: Path | None,
    transfer: Transfer | None,
) -> SequenceRecommender:
    """The starting model: transferred, new, or --init's weights (checked against the data)."""
    if transfer is not None:
        return transferred_model(config, features, transfer)
    if init is None:
        return new_model(config, data, features)
    checkpoint = load_run_checkpoint(init)
    fingerprint = checkpoint.info.get("data_fingerprint")
    if fingerprint and fingerprint != data.fingerprint:
        raise ValueError(
            f"--init {init} was trained on data {fingerprint}, this run uses {data.fingerprint}: "
            "item ids would not mean the same items"
        )
    log.info("starting from the weights of %s", checkpoint.path)
    return checkpoint.model.train()


def transferred_model(
    config: ExperimentConfig, features: ItemFeatures | None, transfer: Transfer
) -> SequenceRecommender:
    """A model of another catalogue carried over to this data's items by their text."""
    assert features is not None
    source = load_run_checkpoint(transfer.source)
    log.info("transferring %s (%s)", source.path, transfer.adaptation)
    model = transfer_model(source.model, features, transfer.adaptation, config.train.seed)
    if frozen_parameters(model):
        log.info("frozen: %s", ", ".join(frozen_parameters(model)))
    return model.train()
