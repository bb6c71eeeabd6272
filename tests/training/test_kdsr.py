"""KDSR: the correlation losses by hand, deterministic codes, asynchronous learning, merging."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merging.merge import MergeConfig, merge_checkpoints
from tests.modality_support import hashing_features, write_features
from tests.support import tiny_experiment
from training.batching import Batch
from training.model import ModelConfig, build_model
from training.recipes import build_recipe
from training.recipes.kdsr import (
    KDSR,
    assign_codes,
    dissected_loss,
    fit_codes,
    holistic_loss,
    subspace_cosines,
)
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.trainer import Trainer


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_holistic_loss_by_hand() -> None:
    torch.manual_seed(0)
    student, teacher, tau = torch.randn(4, 3), torch.randn(4, 5), 0.5
    expected = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        s = torch.tensor([cos(student[i], student[j]) / tau for j in others])
        t = torch.tensor([cos(teacher[i], teacher[j]) / tau for j in others])
        p, log_q = torch.softmax(t, 0), torch.log_softmax(s, 0)
        expected += float((p * (p.log() - log_q)).sum()) / 4
    assert math.isclose(float(holistic_loss(student, teacher, tau)), expected, rel_tol=1e-5)
    # Identical geometry: nothing to learn.
    assert float(holistic_loss(teacher, teacher, tau)) == pytest.approx(0.0, abs=1e-6)


def test_subspace_cosines_and_codes_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 3.0]])
    got = subspace_cosines(a, b, 2)[0]  # slices [0:3] and [3:6]
    assert torch.allclose(got, torch.tensor([cos(a[0, :3], b[0, :3]), cos(a[0, 3:], b[0, 3:])]))
    centroids = torch.tensor([[0.0, 0.0], [0.3, 0.7], [1.0, 1.0]])
    assert assign_codes(
        torch.tensor([[0.2, 0.8], [0.9, 0.9], [-0.1, 0.1]]), centroids
    ).tolist() == [
        1,
        2,
        0,
    ]


def test_dissected_loss_by_hand() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4), torch.randn(3, 6)
    centroids = torch.tensor([[0.0, 0.0], [0.5, -0.5], [-0.5, 0.5]])
    classifier = nn.Linear(4, 3)
    expected = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        vector = torch.tensor(
            [cos(teacher[i, :3], teacher[j, :3]), cos(teacher[i, 3:], teacher[j, 3:])]
        )
        code = int(((centroids - vector) ** 2).sum(1).argmin())
        logits = classifier((student[i] - student[j]).abs())
        expected += -float(torch.log_softmax(logits, 0)[code].detach()) / 3
    got = dissected_loss(classifier, student, teacher, centroids, 2)
    assert math.isclose(float(got.detach()), expected, rel_tol=1e-5)


def test_codes_are_deterministic_for_a_seed() -> None:
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(40)
    mask[:5] = 0
    fit = lambda seed: fit_codes(features, mask, 4, 6, 500, 10, seed)  # noqa: E731
    first, again, other = fit(0), fit(0), fit(1)
    assert first.shape == (6, 4) and torch.equal(first, again)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="at least 2 items with text"):
        fit_codes(features, torch.zeros(40), 4, 6, 500, 10, 0)


def test_the_recipe_loss_is_the_sum_of_its_terms(small_data: SequenceData) -> None:
    features = hashing_features(small_data, without_text=20)
    config = ModelConfig(
        num_items=small_data.num_items, backbone="sasrec", hidden_size=16, num_heads=2, max_len=10
    )
    model = build_model(config, seed=0).eval()  # SASRec, no dropout: a deterministic base loss
    params = {"max_items": 500, "codes": 8, "kmeans_pairs": 2000, "holistic_weight": 0.3}
    recipe = build_recipe("kdsr", params, config, small_data.split().train, features)
    assert isinstance(recipe, KDSR)
    items = torch.tensor([[0, 0, 3, 5, 7, 9], [1, 2, 3, 4, small_data.num_items, 11]])
    total = recipe.loss(model, Batch(items, torch.tensor([0, 1]))).loss
    ids = torch.tensor([1, 2, 3, 4, 5, 7, 9, 11])  # the batch's items; the last 20 have no text
    student = model.item_representations()[ids]
    teacher = torch.from_numpy(features.vectors)[ids - 1]
    expected = (
        recipe.base_loss(model, items)
        + 0.3 * holistic_loss(student, teacher, recipe.params.temperature)
        + 0.1 * dissected_loss(recipe.classifier, student, teacher, recipe.centroids, 8)
    )
    assert torch.allclose(total, expected, atol=1e-6)
    assert torch.equal(recipe.batch_items(items), ids)


def test_kdsr_needs_features(small_data: SequenceData) -> None:
    config = ModelConfig(num_items=small_data.num_items, hidden_size=16, num_heads=2)
    with pytest.raises(ValueError, match="learns from item features"):
        build_recipe("kdsr", {}, config, small_data.split().train)


@pytest.fixture(scope="module")
def features_file(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    return write_features(small_data, tmp_path_factory.mktemp("kdsr") / "features.safetensors")


def kdsr_experiment(features: Path, **overrides):  # type: ignore[no-untyped-def]
    return tiny_experiment(
        recipe__name="kdsr",
        recipe__params={"codes": 8, "kmeans_pairs": 2000},
        data__features=str(features),
        **overrides,
    )


def test_the_adaptor_learns_slower(
    small_data: SequenceData, features_file: Path, tmp_path: Path
) -> None:
    config = kdsr_experiment(features_file, model__item_representation="id+text")
    trainer = Trainer(config, small_data, tmp_path / "run")
    adaptor = {id(p) for p in trainer.model.item_adaptor.parameters()}
    scaled = [g for g in trainer.optimizer.param_groups if "lr_scale" in g]
    assert {id(p) for g in scaled for p in g["params"]} == adaptor
    assert all(g["lr_scale"] == 0.1 for g in scaled)
    batch = Batch(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([0, 1]))
    trainer.train_step(batch)
    plain = trainer.optimizer.param_groups[0]["lr"]
    assert plain > 0 and all(g["lr"] == pytest.approx(0.1 * plain) for g in scaled)
    # A plain model has no modality parameters: no slowed group.
    plain_trainer = Trainer(kdsr_experiment(features_file), small_data, tmp_path / "plain")
    assert all("lr_scale" not in g for g in plain_trainer.optimizer.param_groups)


def test_kdsr_checkpoints_merge_with_plain_ones(
    small_data: SequenceData, features_file: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "kdsr"
    result = train(kdsr_experiment(features_file, train__epochs=1), small_data, run)
    assert "recipe/holistic_loss" in result.history[0]
    kdsr, plain = load_run_checkpoint(run), load_run_checkpoint(trained_run)
    assert list(kdsr.model.state_dict()) == list(plain.model.state_dict())
    assert kdsr.info["recipe"] == "kdsr" and kdsr.info["features"]["dim"] > 0
    merged = merge_checkpoints(
        [trained_run, run], tmp_path / "merged", MergeConfig(method="uniform")
    )
    state = load_run_checkpoint(merged.path).model.state_dict()
    name = "blocks.0.attn.qkv.weight"
    expected = (kdsr.model.state_dict()[name] + plain.model.state_dict()[name]) / 2
    assert torch.allclose(state[name], expected, atol=1e-7)
    assert np.isfinite(float(F.normalize(state["item_embedding.weight"][1:], dim=-1).sum()))
