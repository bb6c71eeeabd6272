"""The training loop: learning, early stopping, resume, fine-tune init, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merging.main import main
from tests.support import tiny_experiment, train_killed_and_resumed
from training.run import train
from training.run_folder import load_run_checkpoint
from training.synthetic import SyntheticConfig, generate


def test_small_model_beats_mostpop_by_2x(tmp_path: Path) -> None:
    data = generate(
        SyntheticConfig(seed=2, num_users=1500, num_items=400, mean_length=30, max_length=60)
    )
    config = tiny_experiment(train__epochs=8, model__max_len=30)
    result = train(config, data, tmp_path / "run")
    model = result.metrics["model"]["test"]["full"]["ndcg@10"]
    mostpop = result.metrics["mostpop"]["test"]["full"]["ndcg@10"]
    assert model >= 2 * mostpop, (model, mostpop)


def test_larger_model_scores_higher(small_data, tmp_path: Path) -> None:
    small = tiny_experiment(
        model__hidden_size=8, model__num_layers=1, model__num_heads=1, train__epochs=6
    )
    large = tiny_experiment(model__hidden_size=64, model__num_layers=2, train__epochs=6)
    small_score = train(small, small_data, tmp_path / "small").best_score
    large_score = train(large, small_data, tmp_path / "large").best_score
    assert large_score > small_score, (large_score, small_score)


def test_run_folder_layout_and_metrics(trained_run: Path) -> None:
    for name in (
        "best/checkpoint.json",
        "best/model.safetensors",
        "last/optimizer.safetensors",
        "last/trainer.json",
        "config.yaml",
        "history.json",
        "metrics.json",
    ):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["protocol"]["exclude_seen"] is True
    for part in ("valid", "test"):
        for setting in ("full", "random100", "popular100"):
            assert set(metrics["model"][part][setting]) >= {
                "ndcg@10",
                "ndcg@20",
                "hr@10",
                "hr@20",
                "mrr",
            }
    history = json.loads((trained_run / "history.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_continues_the_same_run(small_data, tmp_path: Path) -> None:
    config = tiny_experiment(train__epochs=3)
    straight = train(config, small_data, tmp_path / "straight")

    resumed = train_killed_and_resumed(config, small_data, tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in straight.history] == [e["loss"] for e in resumed.history]


def test_finetune_starts_from_the_exact_weights(
    small_data, trained_run: Path, tmp_path: Path
) -> None:
    result = train(tiny_experiment(train__epochs=0), small_data, tmp_path / "ft", init=trained_run)
    start = load_file(str(trained_run / "best" / "model.safetensors"))
    copied = load_file(str(result.run_dir / "best" / "model.safetensors"))
    assert all(torch.equal(start[k], copied[k]) for k in start)


def test_validated_start_is_kept_when_training_makes_it_worse(
    small_data, trained_run: Path, tmp_path: Path
) -> None:
    # A learning rate far too high for a fine-tune: epoch 1 is worse than the start.
    config = tiny_experiment(
        train__epochs=2, train__lr=0.3, train__warmup_steps=0, train__validate_initial=True
    )
    result = train(config, small_data, tmp_path / "ft", init=trained_run)
    scores = [e["valid"]["full"]["ndcg@10"] for e in result.history]
    assert [e["epoch"] for e in result.history] == [0, 1, 2]
    assert scores[0] > max(scores[1:])
    assert result.best_epoch == 0
    start = load_file(str(trained_run / "best" / "model.safetensors"))
    kept = load_file(str(result.run_dir / "best" / "model.safetensors"))
    assert all(torch.equal(start[k], kept[k]) for k in start)
    without = train(
        tiny_experiment(train__epochs=2, train__lr=0.3, train__warmup_steps=0),
        small_data,
        tmp_path / "plain",
        init=trained_run,
    )
    assert without.best_epoch >= 1  # without it, the start is never a candidate


def test_init_from_other_data_is_refused(trained_run: Path, tmp_path: Path) -> None:
    other = generate(
        SyntheticConfig(seed=9, num_users=100, num_items=200, mean_length=10, max_length=20)
    )
    with pytest.raises(ValueError, match="trained on data"):
        train(tiny_experiment(train__epochs=1), other, tmp_path / "x", init=trained_run)


def test_bert4rec_cloze_loss_decreases(small_data, tmp_path: Path) -> None:
    result = train(
        tiny_experiment(model__backbone="bert4rec", train__epochs=3), small_data, tmp_path / "b"
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert load_run_checkpoint(result.run_dir).config.backbone == "bert4rec"


def test_cli_train_and_evaluate(small_data_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "cli-run"
    code = main(
        [
            "train",
            "--data",
            str(small_data_dir),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            "model.hidden_size=16",
            "--set",
            "model.max_len=10",
        ]
    )
    assert code == 0
    out = tmp_path / "metrics.json"
    assert (
        main(
            ["evaluate", "--checkpoint", str(run), "--data", str(small_data_dir), "--out", str(out)]
        )
        == 0
    )
    document = json.loads(out.read_text())
    assert document["model"]["test"]["full"]["ndcg@10"] >= 0
    assert "mostpop" in capsys.readouterr().out


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, capsys) -> None:
    code = main(["train", "--out", str(tmp_path / "r"), "--set", "model.hidden_size=-4"])
    assert code == 2
    assert "hidden_size" in capsys.readouterr().err


def test_compiled_blocks_train_like_eager_ones(small_data, tmp_path: Path) -> None:
    # No dropout: compiled code draws its dropout masks from another random stream.
    settings = {"train__epochs": 1, "model__dropout": 0.0, "model__attn_dropout": 0.0}
    eager = train(tiny_experiment(**settings), small_data, tmp_path / "eager")
    compiled = train(
        tiny_experiment(**settings, train__compile=True), small_data, tmp_path / "compiled"
    )
    a = load_file(str(tmp_path / "eager" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "last" / "model.safetensors"))
    assert set(a) == set(b)  # compiling in place keeps the parameter names
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert compiled.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)


def test_user_bootstrap_is_a_seeded_view_of_as_many_users(small_data, tmp_path: Path) -> None:
    from training.trainer import Trainer

    def sequences(**train: Any) -> list[tuple[int, ...]]:
        config = tiny_experiment(**{f"train__{k}": v for k, v in train.items()})
        trainer = Trainer(config, small_data, tmp_path / "run")
        return [tuple(seq) for seq in trainer.train_sequences]

    everyone = sequences()
    bagged = sequences(user_bootstrap=True, seed=3)
    # As many sequences (so a population's members still exchange at the same steps),
    # drawn with replacement from the users: some twice, about 1/e of them not at all.
    assert len(bagged) == len(everyone)
    assert set(bagged) <= set(everyone)
    missing = 1 - len(set(bagged)) / len(set(everyone))
    assert 0.3 < missing < 0.45, missing
    assert bagged == sequences(user_bootstrap=True, seed=3)
    assert bagged != sequences(user_bootstrap=True, seed=4)
