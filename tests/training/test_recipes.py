"""The contrastive recipes: views, positives, negatives, thresholds, and both settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tests.support import tiny_experiment, train_killed_and_resumed
from training.batching import Batch, iterate_batches
from training.config import ExperimentConfig
from training.losses import info_nce
from training.model import ModelConfig, build_model
from training.recipes import RECIPES, build_recipe
from training.recipes.duorec import DuoRec
from training.recipes.ehrec import EHRec, false_negative_loss, soft_threshold, threshold_logits
from training.run import train
from training.run_folder import load_run_checkpoint
from training.trainer import Trainer

CONTRASTIVE = ("cl4srec", "duorec", "ehrec")
TINY = ModelConfig(num_items=30, hidden_size=16, num_layers=1, num_heads=2, max_len=8)


def sequences(*lasts: int) -> list[np.ndarray]:
    """Training sequences whose last items are `lasts` (earlier items: row-specific)."""
    return [np.array([20 + row, 10 + row % 5, last]) for row, last in enumerate(lasts)]


def test_registry_names_and_defaults() -> None:
    assert {"cl4srec", "duorec", "ehrec"} <= set(RECIPES)
    duorec = RECIPES["duorec"].Params()
    assert duorec.exclude_same_target_negatives is True
    assert (duorec.weight, duorec.temperature) == (0.1, 1.0)
    cl4srec = RECIPES["cl4srec"].Params()
    assert (cl4srec.crop_keep, cl4srec.mask_rate, cl4srec.reorder_rate) == (0.6, 0.3, 0.6)
    for mode in ("unsup", "sup", "both"):
        ExperimentConfig.model_validate({"recipe": {"name": "duorec", "params": {"mode": mode}}})
    with pytest.raises(ValidationError, match="mode"):
        ExperimentConfig.model_validate({"recipe": {"name": "duorec", "params": {"mode": "x"}}})


# ---- DuoRec ---------------------------------------------------------------------------


def test_duorec_sup_picks_a_same_target_partner_when_one_exists() -> None:
    train = sequences(5, 5, 7, 5, 9)
    recipe = DuoRec(DuoRec.Params(mode="sup"), TINY, train)
    # Rows 0, 1, 3 share target 5; row 2 is alone with 7; the last row is row 0's
    # window under "random" windows, ending at an inner 10 no training row ends with.
    items = torch.tensor([[20, 10, 5], [21, 11, 5], [22, 12, 7], [23, 13, 5], [0, 20, 10]])
    batch = Batch(items, torch.tensor([0, 1, 2, 3, 0]))
    picked: list[set[int]] = [set() for _ in range(5)]
    torch.manual_seed(0)
    for _ in range(200):
        for row, partner in enumerate(recipe.partners(batch)):
            picked[row].add(int(partner))
    assert picked[0] == {1, 3} and picked[1] == {0, 3} and picked[3] == {0, 1}
    assert picked[2] == {-1} and picked[4] == {-1}


def test_duorec_partner_histories_are_built_like_the_batch() -> None:
    train = [np.arange(1, 13), np.array([3, 4, 12]), np.array([5, 6])]
    recipe = DuoRec(DuoRec.Params(mode="sup"), TINY, train)  # windows of max_len + 0 = 8
    batch = Batch(
        torch.tensor([[0, 0, 0, 0, 0, 3, 4, 12], [0, 0, 0, 0, 0, 0, 5, 6]]), torch.tensor([1, 2])
    )
    histories = recipe.partner_histories(batch)
    assert histories[0].tolist() == list(range(5, 12))  # row 0's newest window minus 12
    assert histories[1].tolist() == [0] * 6 + [5]  # no partner: its own history


def test_same_target_samples_are_not_negatives() -> None:
    train = sequences(5, 5, 7)
    targets = torch.tensor([5, 5, 7])
    z1, z2 = torch.randn(3, 16), torch.randn(3, 16)
    weights = torch.ones(6, 6)
    for i in (0, 1, 3, 4):
        for j in (0, 1, 3, 4):
            if i % 3 != j % 3:
                weights[i, j] = 0.0
    on = DuoRec(DuoRec.Params(), TINY, train)
    off = DuoRec(DuoRec.Params(exclude_same_target_negatives=False), TINY, train)
    expected = 0.1 * info_nce(z1, z2, negative_weights=weights)
    assert torch.allclose(on.pair_loss(z1, z2, on.allowed_negatives(targets)), expected)
    assert off.allowed_negatives(targets) is None
    assert not torch.allclose(off.pair_loss(z1, z2, off.allowed_negatives(targets)), expected)


# ---- EHRec ----------------------------------------------------------------------------


def test_ehrec_drops_negatives_above_the_threshold() -> None:
    similarity = torch.tensor([[0.9, 0.1, 0.55, 0.45]])
    weights = soft_threshold(torch.tensor([0.5]), similarity, 0.01)[0]
    assert weights[0] < 1e-6 and weights[2] < 1e-2
    assert weights[1] > 1 - 1e-6 and weights[3] > 1 - 1e-2


def test_ehrec_threshold_mlp_receives_gradient(small_data) -> None:
    config = ModelConfig(num_items=small_data.num_items, hidden_size=16, num_layers=1, max_len=10)
    train = [s for s in small_data.split().train if len(s) >= 2]
    recipe = EHRec(EHRec.Params(mode="both"), config, train)
    model = build_model(config, seed=0)
    batch = next(
        iterate_batches(train, 32, recipe.window_length(), "last", np.random.default_rng(0))
    )
    recipe.loss(model, batch).loss.backward()
    for name, param in recipe.threshold.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ehrec_false_negative_signal_moves_the_threshold_both_ways() -> None:
    negatives = torch.tensor([[False, True, True]])
    cosine = torch.tensor([[0.0, 0.6, 0.6]])  # both negatives above the threshold 0.5
    for same_target, direction in (([[False, False, False]], -1), ([[False, True, True]], 1)):
        threshold = torch.tensor([0.5], requires_grad=True)
        logits = threshold_logits(threshold, cosine, 0.05)
        false_negative_loss(logits, negatives, torch.tensor(same_target)).backward()
        # A hard true negative pulls k up (keep it); a same-target pair pushes k down.
        assert torch.sign(threshold.grad)[0] == direction


def test_ehrec_term_signal_only_lowers_the_threshold(small_data) -> None:
    config = ModelConfig(num_items=small_data.num_items, hidden_size=16, num_layers=1, max_len=10)
    train = [s for s in small_data.split().train if len(s) >= 2]
    batch = next(iterate_batches(train, 32, 9, "last", np.random.default_rng(0)))
    model = build_model(config, seed=0)
    for signal in ("term", "false-negatives"):
        recipe = EHRec(EHRec.Params(threshold_signal=signal, threshold_weight=0.0), config, train)
        recipe.k_stat.fill_(0.0)
        recipe.loss(model, batch).loss.backward()
        bias = recipe.threshold[2].bias.grad
        if signal == "term":
            assert bias > 0  # gradient descent lowers k: dropping negatives lowers InfoNCE
        assert "recipe/false_negative_loss" in recipe.epoch_end() or signal == "term"
        model.zero_grad()


def test_ehrec_k_stat_tracks_the_percentile() -> None:
    recipe = EHRec(EHRec.Params(), TINY, sequences(1, 2))
    generator = torch.Generator().manual_seed(0)
    negatives = torch.ones(200, 200, dtype=torch.bool)
    for step in range(20):
        # Similarities uniform on [-1, 1]: the 90th percentile is 0.8.
        cosine = torch.rand(200, 200, generator=generator) * 2 - 1
        target = recipe.observe(cosine, negatives)
        if step == 0:  # first epoch: the running mean of the percentiles so far
            assert float(target) == pytest.approx(0.8, abs=0.02)
    logs = recipe.epoch_end()
    assert float(recipe.k_stat) == pytest.approx(0.8, abs=0.01)
    assert logs["recipe/k_stat"] == pytest.approx(float(recipe.k_stat))
    # The next epoch is regularised towards the carried value, not its own batches.
    assert float(recipe.observe(torch.full((4, 4), 0.1), torch.ones(4, 4, dtype=torch.bool))) == (
        pytest.approx(float(recipe.k_stat))
    )


# ---- both settings and both backbones -------------------------------------------------


def loss_drops(model, recipe, batch: Batch, steps: int = 5) -> tuple[float, float]:
    """The loss with fixed randomness before and after a few steps on it."""
    optimizer = torch.optim.AdamW([*model.parameters(), *recipe.parameters()], lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # same masks, dropout, views and partners every time
        return recipe.loss(model, batch).loss

    before = loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return before, loss().item()


@pytest.mark.parametrize(
    ("name", "backbone", "setting"),
    [(n, "sasrec", s) for n in CONTRASTIVE for s in ("scratch", "finetune")]
    + [(n, "bert4rec", "scratch") for n in CONTRASTIVE],
)
def test_loss_is_finite_and_decreases(
    small_data, trained_run: Path, name, backbone, setting
) -> None:
    config = tiny_experiment(model__backbone=backbone)
    if setting == "finetune":
        model = load_run_checkpoint(trained_run).model.train()
    else:
        spec = config.model.model_dump()
        model = build_model(ModelConfig(num_items=small_data.num_items, **spec), seed=0)
    train_rows = [s for s in small_data.split().train if len(s) >= 2]
    recipe = build_recipe(name, {}, model.config, train_rows)
    batch = next(
        iterate_batches(train_rows, 64, recipe.window_length(), "last", np.random.default_rng(1))
    )
    before, after = loss_drops(model, recipe, batch)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before, (before, after)


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_finetuned_recipe_starts_from_the_base_weights(
    small_data, trained_run: Path, tmp_path: Path, name
) -> None:
    base = load_file(str(trained_run / "best" / "model.safetensors"))
    trainer = Trainer(
        tiny_experiment(recipe__name=name), small_data, tmp_path / name, init=trained_run
    )
    start = trainer.model.state_dict()
    assert set(start) == set(base)
    assert all(torch.equal(start[k], base[k]) for k in base)


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_finetuned_checkpoint_has_the_backbone_names_only(
    small_data, trained_run: Path, tmp_path: Path, name
) -> None:
    result = train(
        tiny_experiment(
            recipe__name=name,
            recipe__params={"mode": "both"} if name != "cl4srec" else {},
            train__epochs=1,
        ),
        small_data,
        tmp_path / name,
        init=trained_run,
    )
    base = load_file(str(trained_run / "best" / "model.safetensors"))
    for folder in ("best", "last"):
        tuned = load_file(str(result.run_dir / folder / "model.safetensors"))
        assert set(tuned) == set(base), folder
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
    entry = result.history[0]
    assert math.isfinite(entry["loss"])
    assert 0 < entry["recipe/contrastive_share"] < 1
    if name == "ehrec":
        extra = load_file(str(result.run_dir / "last" / "recipe.safetensors"))
        assert "k_stat" in extra and any(k.startswith("threshold.") for k in extra)
        assert math.isfinite(entry["recipe/k_stat"]) and math.isfinite(entry["recipe/k_learn"])


def test_ehrec_resume_carries_k_stat(small_data, tmp_path: Path) -> None:
    config = tiny_experiment(recipe__name="ehrec", train__epochs=3)
    straight = train(config, small_data, tmp_path / "straight")

    resumed = train_killed_and_resumed(config, small_data, tmp_path / "resumed")
    assert [e["recipe/k_stat"] for e in straight.history] == [
        e["recipe/k_stat"] for e in resumed.history
    ]
    a = load_file(str(tmp_path / "straight" / "last" / "recipe.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "recipe.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
